import CGitWorkspace
import Foundation
import Glibc
import Synchronization

/// The running command's process group, so that cancelling the calling task can kill it.
final class RunControl: Sendable {
    private let state = Mutex<(group: pid_t, cancelled: Bool)>((0, false))

    /// Kills the running group, if any, and every later one as soon as it starts.
    func cancel() {
        state.withLock { s in
            s.cancelled = true
            if s.group > 0 { kill(-s.group, SIGKILL) }
        }
    }

    var isCancelled: Bool { state.withLock { $0.cancelled } }

    /// Records `group` as running; kills it at once when the task was cancelled already.
    func started(_ group: pid_t) {
        state.withLock { s in
            s.group = group
            if s.cancelled { kill(-group, SIGKILL) }
        }
    }

    func ended() { state.withLock { $0.group = 0 } }
}

/// One file or directory of the child's private scratch tmpfs.
struct ScratchFile: Sendable {
    var path: String
    /// nil: a directory.
    var contents: [UInt8]?
    var mode: UInt32
}

/// How every command of one initialization runs: in a private mount namespace with a tmpfs
/// at `scratch` holding `files` and the workspace bind-mounted at `workspace`, as `uid`
/// (and gid `uid`, real gid `realGID`), in a session and process group of its own.
struct GitSandbox: Sendable {
    /// Where the child's private tmpfs is mounted, hiding the host's.
    static let scratch = "/tmp"
    /// The workspace inside it: git's working directory.
    static let workspace = "/tmp/workspace"
    /// The real gid of the child: any gid but the sandbox's own makes the process
    /// non-dumpable (see README); 65534 (`nogroup`) grants nothing.
    static let realGID: UInt32 = 65534

    /// The workspace's host path, and a descriptor of the directory it must still name.
    let workspacePath: String
    let workspaceFD: Int32
    let uid: UInt32
    let files: [ScratchFile]
    let control: RunControl

    /// What a command left: its exit status and bounded output.
    struct Output {
        /// The exit code, or 128 + the signal number.
        var status: Int32
        /// The first `stdoutLimit` bytes.
        var stdout: [UInt8]
        var stdoutTruncated: Bool
        /// The last `stderrLimit` bytes (git's error is at the end).
        var stderr: [UInt8]
        var stderrTruncated: Bool
    }

    /// Why a command was ended early.
    enum Ended: Error {
        case timedOut
        case cancelled
    }

    static let stdoutLimit = 64 << 10
    static let stderrLimit = 16 << 10

    /// Runs `argv` (an absolute executable first) with exactly `environment` until it exits or
    /// `deadline` passes; either way its whole process group is killed before this returns.
    /// - Throws: `Ended` at the deadline or on cancellation; `GitWorkspaceError.workspace` when
    ///   the child cannot be set up.
    func run(_ argv: [String], environment: [String], deadline: ContinuousClock.Instant) throws -> Output {
        if control.isCancelled { throw Ended.cancelled }
        var outPipe: [Int32] = [-1, -1]
        var errPipe: [Int32] = [-1, -1]
        guard agentd_git_pipe_cloexec(&outPipe) == 0 else { throw setupError("pipe", errno) }
        guard agentd_git_pipe_cloexec(&errPipe) == 0 else {
            let code = errno
            close(outPipe[0])
            close(outPipe[1])
            throw setupError("pipe", code)
        }
        var readEnds = [outPipe[0], errPipe[0]]
        defer { for fd in readEnds where fd >= 0 { close(fd) } }
        for fd in readEnds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }

        let spawned = spawn(argv, environment: environment, stdout: outPipe[1], stderr: errPipe[1])
        close(outPipe[1])
        close(errPipe[1])
        let pid = try spawned.get()
        control.started(pid)
        defer { control.ended() }
        let pidfd = agentd_git_pidfd_open(pid)
        defer { if pidfd >= 0 { close(pidfd) } }

        var result = Output(status: 0, stdout: [], stdoutTruncated: false, stderr: [], stderrTruncated: false)
        var ended: Ended?
        var exited = false
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while !exited {
            let remaining = deadline - ContinuousClock.now
            if remaining <= .zero {
                ended = .timedOut
                break
            }
            let ms = remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000 + 1
            var fds = [
                pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0),
                pollfd(fd: readEnds[0], events: Int16(POLLIN), revents: 0),
                pollfd(fd: readEnds[1], events: Int16(POLLIN), revents: 0),
            ]
            // Without a pidfd (an old kernel), the end of both pipes stands for the exit.
            if pidfd < 0 && readEnds.allSatisfy({ $0 < 0 }) { break }
            let n = poll(&fds, nfds_t(fds.count), Int32(clamping: ms))
            if n < 0 && errno != EINTR { break }
            exited = fds[0].revents != 0
            drain(&readEnds, into: &result, buffer: &buffer)
        }
        // The leader, still unreaped, keeps the group's id: nothing else can have taken it.
        kill(-pid, SIGKILL)
        drain(&readEnds, into: &result, buffer: &buffer)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if control.isCancelled { throw Ended.cancelled }
        if let ended { throw ended }
        result.status = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return result
    }

    /// Reads what both pipes hold now (they are non-blocking), bounded; a pipe at its end is closed.
    private func drain(_ fds: inout [Int32], into result: inout Output, buffer: inout [UInt8]) {
        for index in fds.indices where fds[index] >= 0 {
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fds[index], $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n < 0 { break }  // EAGAIN: nothing more now
                if n == 0 {
                    close(fds[index])
                    fds[index] = -1
                    break
                }
                if index == 0 {
                    let room = Self.stdoutLimit - result.stdout.count
                    if n > room { result.stdoutTruncated = true }
                    if room > 0 { result.stdout += buffer[0..<min(n, room)] }
                } else {
                    result.stderr += buffer[0..<n]
                    if result.stderr.count > 2 * Self.stderrLimit {
                        result.stderr.removeFirst(result.stderr.count - Self.stderrLimit)
                        result.stderrTruncated = true
                    }
                }
            }
        }
        if result.stderr.count > Self.stderrLimit {
            result.stderr.removeFirst(result.stderr.count - Self.stderrLimit)
            result.stderrTruncated = true
        }
    }

    private func spawn(_ argv: [String], environment: [String], stdout: Int32, stderr: Int32) -> Swift.Result<pid_t, GitWorkspaceError> {
        var allocations: [UnsafeMutableRawPointer] = []
        defer { allocations.forEach { free($0) } }
        func cString(_ s: String) -> UnsafeMutablePointer<CChar> {
            let p = strdup(s)!
            allocations.append(UnsafeMutableRawPointer(p))
            return p
        }
        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map(cString) + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] = environment.map(cString) + [nil]
        let cFiles: [agentd_git_file] = files.map { file in
            var data: UnsafePointer<CChar>?
            if let contents = file.contents {
                let p = malloc(max(1, contents.count))!
                allocations.append(p)
                contents.withUnsafeBytes { if let base = $0.baseAddress { p.copyMemory(from: base, byteCount: contents.count) } }
                data = UnsafePointer(p.assumingMemoryBound(to: CChar.self))
            }
            return agentd_git_file(path: cString(file.path), data: data, length: file.contents?.count ?? 0, mode: file.mode)
        }
        let path = cString(workspacePath)
        let scratch = cString(Self.scratch)
        let target = cString(Self.workspace)
        var pid: pid_t = 0
        var step: Int32 = 0
        let rc = cArgs.withUnsafeBufferPointer { args in
            cEnv.withUnsafeBufferPointer { env in
                cFiles.withUnsafeBufferPointer { filesBuffer in
                    var request = agentd_git_spawn_request(
                        executable: cArgs[0], argv: args.baseAddress, envp: env.baseAddress, workspace_path: path,
                        workspace_fd: workspaceFD, scratch: scratch, workspace_target: target, files: filesBuffer.baseAddress,
                        file_count: filesBuffer.count, uid: uid, gid: uid, real_gid: Self.realGID, stdout_fd: stdout, stderr_fd: stderr)
                    return agentd_git_spawn(&request, &pid, &step)
                }
            }
        }
        guard rc == 0 else { return .failure(setupError(Self.stepName(step), rc, program: argv[0])) }
        return .success(pid)
    }

    private func setupError(_ step: String, _ code: Int32, program: String? = nil) -> GitWorkspaceError {
        let what = program.map { "cannot start \($0) as uid \(uid)" } ?? "cannot prepare to run git"
        let root = code == EPERM ? " (agentd must run as root: it makes a private mount namespace and switches to the sandbox's uid)" : ""
        return GitWorkspaceError(.workspace, repository: "", "\(what): \(step) failed: \(String(cString: strerror(code)))\(root)")
    }

    private static func stepName(_ step: Int32) -> String {
        switch Int(step) {
        case Int(AGENTD_GIT_STEP_FORK): "fork"
        case Int(AGENTD_GIT_STEP_SETSID): "setsid"
        case Int(AGENTD_GIT_STEP_UNSHARE): "unshare(CLONE_NEWNS)"
        case Int(AGENTD_GIT_STEP_PRIVATE): "making the mount namespace private"
        case Int(AGENTD_GIT_STEP_REOPEN): "opening the workspace again in the namespace"
        case Int(AGENTD_GIT_STEP_TMPFS): "mounting a tmpfs on \(scratch)"
        case Int(AGENTD_GIT_STEP_FILES): "writing the scratch files"
        case Int(AGENTD_GIT_STEP_BIND): "bind-mounting the workspace"
        case Int(AGENTD_GIT_STEP_CHDIR): "changing into the workspace"
        case Int(AGENTD_GIT_STEP_SETGROUPS): "setgroups"
        case Int(AGENTD_GIT_STEP_SETGID): "setresgid"
        case Int(AGENTD_GIT_STEP_SETUID): "setresuid"
        case Int(AGENTD_GIT_STEP_STDIO): "redirecting stdio"
        case Int(AGENTD_GIT_STEP_EXEC): "exec"
        default: "step \(step)"
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSandboxAgent
import SandboxAgentProtocol

/// Runs one command for one connection: spawns it in its own session, streams its output,
/// enforces the output limit and the timeout, and reports how it ended.
struct Exec {
    static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    /// How long output is still forwarded after the main process exits, unless the pipes close first.
    static let drainAfterExit: UInt64 = 100_000_000
    /// Output waiting for the host beyond which the agent stops reading the command's pipes.
    static let pendingLimit = 256 << 10

    let server: Server
    let connection: Connection
    let request: AgentExecRequestMessage

    /// A command that could not start: exit code and the line for stderr.
    private struct StartFailure: Error {
        let exitCode: Int32
        let message: String
    }

    func run() throws(ConnectionEnd) {
        guard let program = request.argv.first, !program.isEmpty else {
            throw .violation("exec needs a program: argv is empty")
        }
        let strings = request.argv + request.environment.flatMap { [$0.key, $0.value] } + [request.cwd ?? ""]
        if strings.contains(where: { $0.utf8.contains(0) }) {
            throw .violation("argv, environment and cwd cannot contain NUL bytes")
        }
        if request.environment.keys.contains(where: { $0.isEmpty || $0.contains("=") }) {
            throw .violation("environment names cannot be empty or contain '='")
        }
        if let cwd = request.cwd {
            var st = stat()
            guard stat(cwd, &st) == 0 else { throw .violation("cannot use \(Posix.describe(errno, cwd)) as the working directory") }
            guard st.st_mode & S_IFMT == S_IFDIR else { throw .violation("not a directory: \(cwd) (the working directory)") }
        }
        let started = Posix.now()
        switch resolve(program) {
        case .failure(let failure):
            // Drain a streamed stdin the command will never read, then answer like a shell would.
            if request.streamsStdin { try skipStdin() }
            connection.send(.output(.stderr, Array("agentd-sandbox-agent: \(failure.message)\n".utf8)))
            connection.send(.execResult(AgentExecResultMessage(exitCode: failure.exitCode)))
        case .success(let path):
            try spawnAndServe(path: path, started: started)
        }
    }

    /// The program's path: as given when it contains a slash, else the first executable match in PATH.
    private func resolve(_ program: String) -> Result<String, StartFailure> {
        if program.contains("/") {
            if access(program, X_OK) == 0 { return .success(program) }
            let code = errno
            return .failure(StartFailure(exitCode: code == ENOENT ? 127 : 126, message: Posix.describe(code, program)))
        }
        let searchPath = request.environment["PATH"] ?? Self.defaultPath
        var denied = false
        for dir in searchPath.split(separator: ":", omittingEmptySubsequences: false) {
            let candidate = (dir.isEmpty ? "." : String(dir)) + "/" + program
            var st = stat()
            guard stat(candidate, &st) == 0, st.st_mode & S_IFMT != S_IFDIR else { continue }
            if access(candidate, X_OK) == 0 { return .success(candidate) }
            denied = true
        }
        return .failure(
            StartFailure(
                exitCode: denied ? 126 : 127, message: denied ? "\(program): permission denied" : "\(program): command not found"))
    }

    private func skipStdin() throws(ConnectionEnd) {
        while true {
            switch try connection.receive() {
            case .stdinChunk: continue
            case .stdinEnd: return
            case let other: throw .violation("unexpected \(other.type) frame while reading stdin")
            }
        }
    }

    private func spawnAndServe(path: String, started: UInt64) throws(ConnectionEnd) {
        var stdinPipe: [Int32] = [-1, -1]
        var stdoutPipe: [Int32] = [-1, -1]
        var stderrPipe: [Int32] = [-1, -1]
        var notifyPipe: [Int32] = [-1, -1]
        for i in 0..<4 {
            let rc: Int32
            switch i {
            case 0: rc = csa_pipe2(&stdinPipe, O_CLOEXEC)
            case 1: rc = csa_pipe2(&stdoutPipe, O_CLOEXEC)
            case 2: rc = csa_pipe2(&stderrPipe, O_CLOEXEC)
            default: rc = csa_pipe2(&notifyPipe, O_CLOEXEC | O_NONBLOCK)
            }
            if rc != 0 {
                let code = errno
                for fd in stdinPipe + stdoutPipe + stderrPipe + notifyPipe where fd >= 0 { close(fd) }
                throw .violation("cannot create pipes for the command: \(Posix.message(code))")
            }
        }
        defer {
            close(notifyPipe[0])
            close(notifyPipe[1])
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdinPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, stdoutPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, stderrPipe[1], 2)
        if let cwd = request.cwd { csa_spawn_addchdir(&actions, cwd) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Own session and process group; signal mask cleared and every disposition back to default
        // (the agent blocks and handles signals the command must not inherit).
        posix_spawnattr_setflags(&attributes, csa_spawn_setsid_flag() | Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigdefault(&attributes, &all)

        let argv = request.argv.map { strdup($0) } + [nil]
        let envp = request.environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        var spawnError: Int32 = 0
        let pid = server.reaper.spawnRegistered(notify: notifyPipe[1]) { () -> pid_t? in
            var pid: pid_t = 0
            spawnError = posix_spawn(&pid, path, &actions, &attributes, argv, envp)
            return spawnError == 0 ? pid : nil
        }
        close(stdinPipe[0])
        close(stdoutPipe[1])
        close(stderrPipe[1])
        guard let pid else {
            close(stdinPipe[1])
            close(stdoutPipe[0])
            close(stderrPipe[0])
            if request.streamsStdin { try skipStdin() }
            let code: Int32 = spawnError == ENOENT ? 127 : 126
            connection.send(.output(.stderr, Array("agentd-sandbox-agent: \(Posix.describe(spawnError, path))\n".utf8)))
            connection.send(.execResult(AgentExecResultMessage(exitCode: code)))
            return
        }
        var loop = ExecLoop(
            connection: connection, pid: pid, stdin: stdinPipe[1], stdout: stdoutPipe[0], stderr: stderrPipe[0],
            notify: notifyPipe[0], request: request, started: started)
        let outcome = loop.run(reaper: server.reaper)
        switch outcome {
        case .hostGone:
            kill(-pid, SIGKILL)
            server.reaper.forget(pid)
        case .violation(let message):
            kill(-pid, SIGKILL)
            server.reaper.forget(pid)
            throw .violation(message)
        case .finished(let result):
            connection.send(.execResult(result))
        }
    }
}

/// The poll loop of one running command.
private struct ExecLoop {
    enum Outcome {
        case finished(AgentExecResultMessage)
        case hostGone
        case violation(String)
    }

    let connection: Connection
    let pid: pid_t
    var stdin: Int32
    var stdout: Int32
    var stderr: Int32
    let notify: Int32
    let request: AgentExecRequestMessage
    let started: UInt64

    var pending: [UInt8] = []
    var pendingOffset = 0
    var stdinPending: [UInt8] = []
    var stdinPendingOffset = 0
    var stdinEnded = false
    var forwarded: UInt64 = 0
    var cut: UInt64 = 0
    var status: Int32?
    var timedOut = false
    var drainDeadline: UInt64 = 0
    var buffer = [UInt8](repeating: 0, count: AgentFrame.chunkSize)

    init(
        connection: Connection, pid: pid_t, stdin: Int32, stdout: Int32, stderr: Int32, notify: Int32,
        request: AgentExecRequestMessage, started: UInt64
    ) {
        self.connection = connection
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.notify = notify
        self.request = request
        self.started = started
        if !request.streamsStdin {
            close(stdin)
            self.stdin = -1
            stdinEnded = true
        }
        for fd in [stdout, stderr] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        if self.stdin >= 0 { _ = fcntl(stdin, F_SETFL, fcntl(stdin, F_GETFL) | O_NONBLOCK) }
    }

    mutating func closeAll() {
        for fd in [stdin, stdout, stderr] where fd >= 0 { close(fd) }
        stdin = -1
        stdout = -1
        stderr = -1
    }

    mutating func run(reaper: Reaper) -> Outcome {
        defer { closeAll() }
        let deadline: UInt64? = request.timeoutMilliseconds > 0 ? started + request.timeoutMilliseconds * 1_000_000 : nil
        while true {
            let now = Posix.now()
            if status == nil, !timedOut, let deadline, now >= deadline {
                kill(-pid, SIGKILL)
                timedOut = true
            }
            if status != nil && ((stdout < 0 && stderr < 0) || now >= drainDeadline) { break }

            var fds: [pollfd] = []
            let wantOutput = pending.count - pendingOffset < ExecLoop.pendingLimit
            if wantOutput && stdout >= 0 { fds.append(pollfd(fd: stdout, events: Int16(POLLIN), revents: 0)) }
            if wantOutput && stderr >= 0 { fds.append(pollfd(fd: stderr, events: Int16(POLLIN), revents: 0)) }
            if status == nil { fds.append(pollfd(fd: notify, events: Int16(POLLIN), revents: 0)) }
            var socketEvents = Int16(0)
            // Read from the host while it may send stdin, or to notice it hanging up; stop while
            // stdin waits to be written (backpressure).
            if stdinPendingOffset >= stdinPending.count { socketEvents |= Int16(POLLIN) }
            if pendingOffset < pending.count { socketEvents |= Int16(POLLOUT) }
            fds.append(pollfd(fd: connection.fd, events: socketEvents, revents: 0))
            if stdin >= 0 && stdinPendingOffset < stdinPending.count {
                fds.append(pollfd(fd: stdin, events: Int16(POLLOUT), revents: 0))
            }

            var waitUntil = UInt64.max
            if status == nil, !timedOut, let deadline { waitUntil = deadline }
            if status != nil { waitUntil = drainDeadline }
            let timeout: Int32 =
                waitUntil == .max ? -1 : Int32(clamping: (waitUntil > now ? waitUntil - now : 0) / 1_000_000 + 1)
            let rc = poll(&fds, nfds_t(fds.count), timeout)
            if rc < 0 {
                if errno == EINTR { continue }
                return .violation("poll failed: \(Posix.message(errno))")
            }
            for p in fds where p.revents != 0 {
                if p.fd == stdout || p.fd == stderr {
                    readOutput(p.fd == stdout ? .stdout : .stderr)
                } else if p.fd == notify {
                    var byte: UInt8 = 0
                    while read(notify, &byte, 1) > 0 {}
                    if let s = reaper.collect(pid) {
                        status = s
                        drainDeadline = Posix.now() + Exec.drainAfterExit
                    }
                } else if p.fd == connection.fd {
                    if p.revents & Int16(POLLOUT) != 0 && pendingOffset < pending.count {
                        if !flushSome() { return .hostGone }
                    }
                    if p.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                        if let outcome = readHost() { return outcome }
                    }
                } else if p.fd == stdin {
                    writeStdin()
                    if stdinPendingOffset >= stdinPending.count, let outcome = handleBuffered() { return outcome }
                }
            }
        }
        // Hand the rest of the output to the host (blocking, bounded by the send timeout).
        if pendingOffset < pending.count {
            guard Posix.sendAll(connection.fd, Array(pending[pendingOffset...])) else { return .hostGone }
        }
        let ws = WaitStatus(status ?? 0)
        return .finished(
            AgentExecResultMessage(
                exitCode: ws.exitCode, signal: ws.signal, timedOut: timedOut, cutBytes: cut,
                durationMicroseconds: (Posix.now() - started) / 1000))
    }

    mutating func readOutput(_ stream: AgentStream) {
        let fd = stream == .stdout ? stdout : stderr
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && (errno == EINTR || errno == EAGAIN) { return }
        guard n > 0 else {
            close(fd)
            if stream == .stdout { stdout = -1 } else { stderr = -1 }
            return
        }
        let allowed = forwarded >= request.outputLimit ? 0 : Int(min(UInt64(n), request.outputLimit - forwarded))
        if allowed > 0 {
            if pendingOffset == pending.count {
                pending.removeAll(keepingCapacity: true)
                pendingOffset = 0
            }
            // The frame straight from the read buffer (as `AgentMessage.output(…).frame()`, without
            // its two intermediate copies).
            let type = stream == .stdout ? AgentMessageType.stdoutChunk : .stderrChunk
            pending.append(contentsOf: AgentFrame.header(type: type.rawValue, length: allowed))
            pending.append(contentsOf: buffer[0..<allowed])
            forwarded += UInt64(allowed)
        }
        cut += UInt64(n - allowed)
    }

    /// Sends what the socket takes now; false when the host is gone.
    mutating func flushSome() -> Bool {
        let n = pending[pendingOffset...].withUnsafeBytes { raw in
            send(connection.fd, raw.baseAddress!, raw.count, csa_msg_nosignal() | Int32(MSG_DONTWAIT))
        }
        if n < 0 { return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR }
        pendingOffset += n
        if pendingOffset == pending.count {
            pending.removeAll(keepingCapacity: pending.capacity <= 1 << 20)
            pendingOffset = 0
        }
        return true
    }

    /// Handles what the host sent: stdin frames, or a hang-up.
    mutating func readHost() -> Outcome? {
        guard connection.receiveAvailable() else { return .hostGone }
        return handleBuffered()
    }

    /// Handles the host's frames already read, while no stdin waits to be written (frames stay
    /// buffered, and the socket unread, until the command takes its stdin).
    mutating func handleBuffered() -> Outcome? {
        while stdinPendingOffset >= stdinPending.count {
            let message: AgentMessage?
            do {
                message = try connection.decoded()
            } catch {
                if case .violation(let text) = error { return .violation(text) }
                return .hostGone
            }
            guard let message else { return nil }
            switch message {
            case .stdinChunk(let bytes) where request.streamsStdin && !stdinEnded:
                if stdin >= 0 && !bytes.isEmpty {
                    stdinPending = bytes
                    stdinPendingOffset = 0
                    writeStdin()
                }
            case .stdinEnd where request.streamsStdin && !stdinEnded:
                stdinEnded = true
                if stdin >= 0 && stdinPendingOffset >= stdinPending.count {
                    close(stdin)
                    stdin = -1
                }
            default:
                return .violation("unexpected \(message.type) frame while a command runs")
            }
        }
        return nil
    }

    mutating func writeStdin() {
        guard stdin >= 0 else { return }
        let n = stdinPending[stdinPendingOffset...].withUnsafeBytes { raw in
            write(stdin, raw.baseAddress!, raw.count)
        }
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return }
            // The command closed its stdin (EPIPE): the rest is dropped, as a pipe would.
            close(stdin)
            stdin = -1
            stdinPending = []
            stdinPendingOffset = 0
            return
        }
        stdinPendingOffset += n
        if stdinPendingOffset >= stdinPending.count {
            stdinPending = []
            stdinPendingOffset = 0
            if stdinEnded {
                close(stdin)
                stdin = -1
            }
        }
    }
}

extension ExecLoop {
    static let pendingLimit = Exec.pendingLimit
}

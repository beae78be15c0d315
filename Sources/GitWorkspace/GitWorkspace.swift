import CGitWorkspace
import Foundation
import Glibc
import Policy

/// The host-side git initialization of a sandbox's workspace: the repository fetched and the
/// branch checked out by the host's git, running as the sandbox's uid, with the credential
/// in that git's environment only; `origin` left at the sandbox's route. See README.md.
public enum GitWorkspace {
    /// What `initialize` did.
    public struct Summary: Sendable, Equatable {
        public enum Outcome: String, Sendable, Equatable {
            /// The repository was fetched and the branch checked out.
            case initialized
            /// The workspace already held `.git` (a session's workspace reused by a later
            /// task); nothing was run or changed.
            case alreadyInitialized
        }

        public var outcome: Outcome
        /// The branch checked out (nil when already initialized).
        public var branch: String?
        /// Its commit; nil when the remote is empty (the branch is unborn) or already initialized.
        public var commit: String?
        /// The branch did not exist on the remote: it was made from the default branch (or
        /// unborn, on an empty remote) with `origin/<branch>` as its upstream for the first push.
        public var branchCreated: Bool
        /// The remote's default branch, when it names one.
        public var defaultBranch: String?
        /// How long it took.
        public var duration: Duration

        public init(
            outcome: Outcome, branch: String? = nil, commit: String? = nil, branchCreated: Bool = false, defaultBranch: String? = nil,
            duration: Duration = .zero
        ) {
            self.outcome = outcome
            self.branch = branch
            self.commit = commit
            self.branchCreated = branchCreated
            self.defaultBranch = defaultBranch
            self.duration = duration
        }
    }

    /// Initializes `directory` (the workspace's host path, owned by `uid`) as a checkout of
    /// `initialization.repositoryURL`: `git init`, fetch of every branch, checkout of the
    /// branch (tracking `origin/<branch>`, or made from the default branch when the remote
    /// lacks it), `origin` at `originURL` and the branch's upstream set, so that the
    /// sandbox's own `git pull`/`git push` go through its route. Every git runs as `uid` (gid
    /// `uid`, no supplementary groups), so every file is the sandbox user's. A directory that
    /// already holds `.git` is left alone. A failure after `git init` removes the `.git` it
    /// made, so that a retry starts afresh. Runs on a thread of its own; cancelling the calling
    /// task kills git.
    ///
    /// Call it at most once at a time per directory, best before the sandbox starts: processes
    /// of `uid` that run meanwhile cannot read the credential from git (it is not dumpable),
    /// but they could change the workspace under it.
    /// - Throws: `GitWorkspaceError` naming the repository, never the credential.
    public static func initialize(_ initialization: GitInitialization, in directory: String, uid: Int) async throws -> Summary {
        let control = RunControl()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Summary, any Error>) in
                let thread = Thread {
                    do {
                        continuation.resume(returning: try Initializer(initialization, directory: directory, uid: uid, control: control).run())
                    } catch {
                        continuation.resume(throwing: error)
                    }
                }
                thread.name = "agentd-git-init"
                thread.start()
            }
        } onCancel: {
            control.cancel()
        }
    }
}

/// One initialization, run synchronously on its own thread.
private struct Initializer {
    let initialization: GitInitialization
    let directory: String
    let uid: Int
    let control: RunControl
    let redact: Redactor
    var repository: String { initialization.repositoryURL }

    /// Inside the child's scratch tmpfs.
    static let home = GitSandbox.scratch + "/home"
    static let caPath = GitSandbox.scratch + "/ca.pem"
    static let template = GitSandbox.scratch + "/template"
    /// The most of a CA file read.
    static let caLimit = 1 << 20
    /// What cleaning up a failed initialization may take beyond the deadline.
    static let cleanupTime: Duration = .seconds(15)

    init(_ initialization: GitInitialization, directory: String, uid: Int, control: RunControl) {
        self.initialization = initialization
        self.directory = directory
        self.uid = uid
        self.control = control
        redact = Redactor(header: initialization.header, secrets: initialization.secrets)
    }

    func run() throws -> GitWorkspace.Summary {
        let started = ContinuousClock.now
        let deadline = started + initialization.timeout
        try validate()
        let fd = try openWorkspace()
        defer { close(fd) }
        var st = stat()
        if fstatat(fd, ".git", &st, AT_SYMLINK_NOFOLLOW) == 0 {
            return GitWorkspace.Summary(outcome: .alreadyInitialized, duration: ContinuousClock.now - started)
        }
        let gitPath = try Self.locate(["/usr/bin/git", "/bin/git", "/usr/local/bin/git"], what: "git", repository: repository)
        let sandbox = GitSandbox(workspacePath: directory, workspaceFD: fd, uid: UInt32(uid), files: try scratchFiles(), control: control)

        // 1. What the remote has, before the workspace is touched: a refused credential or a
        //    missing repository leaves it as it was.
        var wanted = ["HEAD"]
        if let branch = initialization.branch { wanted.append("refs/heads/" + branch) }
        let listing = try git(
            sandbox, gitPath, ["ls-remote", "--symref", "--", repository] + wanted, network: true, what: "git ls-remote", deadline: deadline)
        let remote = RemoteHeads(parsing: listing, branch: initialization.branch)
        guard let branch = initialization.branch ?? remote.defaultBranch ?? (remote.headCommit == nil ? "main" : nil) else {
            throw GitWorkspaceError(
                .failed, repository: repository, "the remote does not say which branch is its default; name one in git.branch")
        }

        // 2. The repository, removed again if anything after this fails.
        _ = try git(sandbox, gitPath, ["init", "-q", "--template=" + Self.template, "-b", branch], what: "git init", deadline: deadline)
        do {
            let commit = try populate(sandbox, gitPath, branch: branch, remote: remote, deadline: deadline)
            return GitWorkspace.Summary(
                outcome: .initialized, branch: branch, commit: commit, branchCreated: remote.branchCommit == nil,
                defaultBranch: remote.defaultBranch, duration: ContinuousClock.now - started)
        } catch {
            removePartialRepository(sandbox)
            throw error
        }
    }

    /// Everything after `git init`; returns the checked-out commit.
    private func populate(_ sandbox: GitSandbox, _ git: String, branch: String, remote: RemoteHeads, deadline: ContinuousClock.Instant) throws
        -> String?
    {
        let origin = initialization.originURL
        _ = try self.git(sandbox, git, ["remote", "add", "origin", origin], what: "git remote add", deadline: deadline)
        if let identity = initialization.identity {
            _ = try self.git(sandbox, git, ["config", "user.name", identity.name], what: "git config", deadline: deadline)
            _ = try self.git(sandbox, git, ["config", "user.email", identity.email], what: "git config", deadline: deadline)
        }
        // `origin` rewritten to the upstream for this one fetch (url.<upstream>.insteadOf), so
        // the repository's config never names anything but `originURL`.
        _ = try self.git(
            sandbox, git, ["fetch", "-q", "origin"], network: true, rewriteOrigin: true, what: "git fetch", deadline: deadline)
        if let defaultBranch = remote.defaultBranch, remote.headCommit != nil {
            _ = try self.git(sandbox, git, ["remote", "set-head", "origin", defaultBranch], what: "git remote set-head", deadline: deadline)
        }
        if let commit = remote.branchCommit {
            _ = try self.git(
                sandbox, git, ["checkout", "-q", "-b", branch, "--track", "origin/" + branch], what: "git checkout", deadline: deadline)
            return commit
        }
        // A branch the remote lacks: from the default branch (unborn on an empty remote), with
        // the upstream it will have after the first push.
        if let start = remote.headCommit {
            let from = remote.defaultBranch.map { "origin/" + $0 } ?? start
            _ = try self.git(sandbox, git, ["checkout", "-q", "--no-track", "-b", branch, from], what: "git checkout", deadline: deadline)
        }
        _ = try self.git(sandbox, git, ["config", "branch.\(branch).remote", "origin"], what: "git config", deadline: deadline)
        _ = try self.git(sandbox, git, ["config", "branch.\(branch).merge", "refs/heads/" + branch], what: "git config", deadline: deadline)
        return remote.headCommit
    }

    /// Removes the `.git` a failed initialization made (as the sandbox's uid, like everything
    /// in the workspace); files a checkout had written stay.
    private func removePartialRepository(_ sandbox: GitSandbox) {
        guard let rm = try? Self.locate(["/usr/bin/rm", "/bin/rm"], what: "rm", repository: repository) else { return }
        let cleanup = GitSandbox(workspacePath: sandbox.workspacePath, workspaceFD: sandbox.workspaceFD, uid: sandbox.uid, files: sandbox.files, control: RunControl())
        _ = try? cleanup.run([rm, "-rf", "--", ".git"], environment: ["PATH=/usr/bin:/bin", "LC_ALL=C"], deadline: .now + Self.cleanupTime)
    }

    /// Runs `git arguments` as the sandbox's uid; returns its stdout.
    /// - Throws: `GitWorkspaceError` when it fails, times out or is cancelled.
    private func git(
        _ sandbox: GitSandbox, _ git: String, _ arguments: [String], network: Bool = false, rewriteOrigin: Bool = false, what: String,
        deadline: ContinuousClock.Instant
    ) throws -> String {
        let result: GitSandbox.Output
        do {
            result = try sandbox.run(
                [git] + arguments, environment: environment(network: network, rewriteOrigin: rewriteOrigin), deadline: deadline)
        } catch GitSandbox.Ended.timedOut {
            throw GitWorkspaceError(
                .timedOut, repository: repository,
                "timed out after \(initialization.timeout) during \(what); git was killed (raise the timeout for a large repository)")
        } catch GitSandbox.Ended.cancelled {
            throw GitWorkspaceError(.cancelled, repository: repository, "cancelled during \(what); git was killed")
        } catch let error as GitWorkspaceError {
            throw GitWorkspaceError(error.kind, repository: repository, error.message)
        }
        guard result.status == 0 else {
            throw GitWorkspaceError.gitFailed(
                what, status: result.status, stderr: String(decoding: result.stderr, as: UTF8.self), truncated: result.stderrTruncated,
                repository: repository, redact: redact)
        }
        if result.stdoutTruncated {
            throw GitWorkspaceError(.failed, repository: repository, "\(what) printed more than \(GitSandbox.stdoutLimit) bytes")
        }
        return String(decoding: result.stdout, as: UTF8.self)
    }

    /// git's whole environment: nothing of agentd's, no system or global config, no prompt,
    /// https only, no hooks, no credential helper, no background gc; for a network step also
    /// the credential header (for the repository's URL only), the CA file and low-speed limit.
    private func environment(network: Bool, rewriteOrigin: Bool) -> [String] {
        var config: [(String, String)] = [
            ("core.hooksPath", "/dev/null"),
            ("credential.helper", ""),
            ("protocol.allow", "never"),
            ("protocol.https.allow", "always"),
            ("http.followRedirects", "false"),
            ("gc.auto", "0"),
            ("maintenance.auto", "false"),
            ("core.fsmonitor", "false"),
            ("advice.detachedHead", "false"),
        ]
        if network {
            if let header = initialization.header {
                config.append(("http.\(repository).extraHeader", "\(header.name): \(header.value)"))
            }
            if initialization.caFile != nil { config.append(("http.sslCAInfo", Self.caPath)) }
            for entry in initialization.resolve { config.append(("http.curloptResolve", entry)) }
            // A stalled server ends git even if agentd is gone and cannot kill it.
            config += [("http.lowSpeedLimit", "1"), ("http.lowSpeedTime", "60")]
        }
        if rewriteOrigin { config.append(("url.\(repository).insteadOf", initialization.originURL)) }
        var environment = [
            "PATH=/usr/bin:/bin", "LC_ALL=C", "HOME=" + Self.home, "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null",
            "GIT_TERMINAL_PROMPT=0", "GIT_ALLOW_PROTOCOL=https", "GIT_CEILING_DIRECTORIES=" + GitSandbox.scratch,
            "GIT_CONFIG_COUNT=\(config.count)",
        ]
        for (i, (key, value)) in config.enumerated() {
            environment += ["GIT_CONFIG_KEY_\(i)=\(key)", "GIT_CONFIG_VALUE_\(i)=\(value)"]
        }
        return environment
    }

    /// The child's scratch tmpfs: an empty, read-only `HOME`; the CA file's copy; a template
    /// whose `info/exclude` keeps git out of the filesystem's root-only `lost+found`; the
    /// workspace's mount point.
    private func scratchFiles() throws -> [ScratchFile] {
        var files = [
            ScratchFile(path: Self.home, contents: nil, mode: 0o555),
            ScratchFile(path: Self.template, contents: nil, mode: 0o755),
            ScratchFile(path: Self.template + "/info", contents: nil, mode: 0o755),
            ScratchFile(path: Self.template + "/info/exclude", contents: Array("/lost+found/\n".utf8), mode: 0o644),
            ScratchFile(path: GitSandbox.workspace, contents: nil, mode: 0o755),
        ]
        if let caFile = initialization.caFile {
            files.append(ScratchFile(path: Self.caPath, contents: try readCA(caFile), mode: 0o444))
        }
        return files
    }

    private func readCA(_ path: String) throws -> [UInt8] {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw GitWorkspaceError(.invalidRequest, repository: repository, "cannot read the CA file \(path): \(String(cString: strerror(errno)))")
        }
        defer { try? handle.close() }
        let data = (try? handle.read(upToCount: Self.caLimit + 1)) ?? Data()
        guard !data.isEmpty, data.count <= Self.caLimit else {
            throw GitWorkspaceError(
                .invalidRequest, repository: repository, "the CA file \(path) is \(data.isEmpty ? "empty" : "larger than 1 MiB")")
        }
        return Array(data)
    }

    /// The workspace directory, opened without following a symlink; it must be a directory
    /// owned by `uid`.
    private func openWorkspace() throws -> Int32 {
        let fd = agentd_git_open_directory(directory)
        guard fd >= 0 else {
            throw GitWorkspaceError(
                .workspace, repository: repository, "cannot open the workspace \(directory): \(String(cString: strerror(errno)))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0, Int(st.st_uid) == uid else {
            close(fd)
            throw GitWorkspaceError(
                .workspace, repository: repository, "the workspace \(directory) is owned by uid \(st.st_uid), not the sandbox's uid \(uid)")
        }
        return fd
    }

    private func validate() throws {
        func refuse(_ message: String) -> GitWorkspaceError { GitWorkspaceError(.invalidRequest, repository: repository, message) }
        guard geteuid() == 0 else { throw refuse("agentd must run as root to initialize a workspace as the sandbox's uid") }
        guard uid > 0, uid < Int(UInt32.max), uid != Int(GitSandbox.realGID) else { throw refuse("uid \(uid) is not a sandbox uid") }
        guard let url = URLComponents(string: repository), url.scheme?.lowercased() == "https", url.host?.isEmpty == false,
            url.user == nil, url.password == nil, !Self.hasControl(repository), !repository.contains(" ")
        else { throw refuse("the repository URL must be https://HOST/PATH without user info or spaces") }
        guard !initialization.originURL.isEmpty, !Self.hasControl(initialization.originURL) else {
            throw refuse("the origin URL '\(initialization.originURL)' is not a URL")
        }
        if let branch = initialization.branch, !GitPolicy.isBranchName(branch) { throw refuse("'\(branch)' is not a valid branch name") }
        if let header = initialization.header {
            guard !header.name.isEmpty, header.name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: ":") }),
                !Self.hasControl(header.value)
            else { throw refuse("the credential header's name or value is malformed (a header name, a value without line breaks)") }
        }
        for entry in initialization.resolve where Self.hasControl(entry) || entry.split(separator: ":").count < 3 {
            throw refuse("resolve entry '\(entry)' is not HOST:PORT:ADDRESS")
        }
        if let identity = initialization.identity, Self.hasControl(identity.name + identity.email) {
            throw refuse("the identity has a control character")
        }
    }

    static func hasControl(_ text: String) -> Bool { text.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f } }

    static func locate(_ candidates: [String], what: String, repository: String) throws -> String {
        guard let path = candidates.first(where: { access($0, X_OK) == 0 }) else {
            throw GitWorkspaceError(.workspace, repository: repository, "\(what) is not installed on agentd's host (looked in \(candidates.joined(separator: ", ")))")
        }
        return path
    }
}

/// The remote's HEAD and the wanted branch, from `git ls-remote --symref <url> HEAD refs/heads/<branch>`.
struct RemoteHeads: Equatable {
    /// The branch HEAD names (`ref: refs/heads/main	HEAD`), if the server says.
    var defaultBranch: String?
    /// HEAD's commit; nil for an empty repository.
    var headCommit: String?
    /// The wanted branch's commit; nil when it has none (or none was wanted).
    var branchCommit: String?

    init(parsing output: String, branch: String?) {
        for line in output.split(separator: "\n") {
            let fields = line.split(separator: "\t", maxSplits: 1)
            guard fields.count == 2 else { continue }
            let (left, ref) = (String(fields[0]), String(fields[1]))
            if left.hasPrefix("ref: ") {
                if ref == "HEAD", left.dropFirst(5).hasPrefix("refs/heads/") { defaultBranch = String(left.dropFirst(5 + 11)) }
                continue
            }
            guard left.count >= 40, left.allSatisfy(\.isHexDigit) else { continue }
            if ref == "HEAD" { headCommit = left }
            if let branch, ref == "refs/heads/" + branch { branchCommit = left }
        }
        if branch == nil, defaultBranch != nil { branchCommit = headCommit }
    }
}

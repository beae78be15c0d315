import Foundation
import GitWorkspace
import Policy
import TestSupport
import Testing

/// The host-side git initialization of a workspace against the real loopback git server
/// (nginx + git http-backend over TLS, demanding its canary token). Tests run as root, as
/// agentd does; each workspace belongs to a uid of its own, under a root-only directory as
/// agentd's workspace mounts are.
@Suite struct GitWorkspaceTests {
    @Test func theDefaultBranchIsCheckedOutAsTheSandboxUserWithNoTraceOfTheCredential() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace(ext4: true)
            defer { workspace.remove() }
            let origin = "http://127.0.0.1:3128/gh/agentd/widgets.git"
            let summary = try await GitWorkspace.initialize(server.initialization(origin: origin), in: workspace.path, uid: workspace.uid)
            // Every file is the sandbox user's (but the filesystem's own lost+found); checked
            // first, as the test's own git (root) may rewrite the index.
            #expect(try workspace.entriesNotOwnedByTheUser() == [])

            let main = try server.commit(of: "main")
            #expect(summary.outcome == .initialized)
            #expect(summary.branch == "main" && summary.defaultBranch == "main" && !summary.branchCreated)
            #expect(summary.commit == main)
            #expect(try String(contentsOfFile: workspace.path + "/README.md", encoding: .utf8) == "# agentd/widgets\n")
            #expect(try workspace.git(["rev-parse", "HEAD"]) == main)
            #expect(try workspace.git(["symbolic-ref", "HEAD"]) == "refs/heads/main")
            #expect(try workspace.git(["rev-parse", "--abbrev-ref", "main@{upstream}"]) == "origin/main")
            #expect(try workspace.git(["symbolic-ref", "refs/remotes/origin/HEAD"]) == "refs/remotes/origin/main")
            #expect(try workspace.git(["config", "--get-all", "remote.origin.url"]) == origin)
            #expect(try workspace.git(["status", "--porcelain"]) == "")
            #expect(try String(contentsOfFile: workspace.path + "/.git/info/exclude", encoding: .utf8) == "/lost+found/\n")

            // The credential is nowhere: not in the config, not in any file, raw or encoded.
            let config = try String(contentsOfFile: workspace.path + "/.git/config", encoding: .utf8)
            #expect(!config.lowercased().contains("extraheader") && !config.contains(server.url("agentd/widgets")))
            #expect(try workspace.filesHolding(server.secretForms) == [])
            // The server saw the canary on every request.
            let log = try server.accessLog()
            #expect(log.contains { $0.path.hasSuffix("/git-upload-pack") && $0.status == 200 })
            #expect(!log.isEmpty && log.allSatisfy { $0.tokenID == server.tokenID })
            // git's tmpfs and bind mount lived in its own mount namespace only.
            let mounts = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8).split(separator: "\n")
            #expect(!mounts.contains { $0.split(separator: " ").dropFirst(4).first == "/tmp/workspace" })
        }
    }

    @Test func anExistingBranchIsTrackedAndALaterPullThroughOriginWorks() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            let dev = try server.pushCommit(to: "dev", file: "dev.txt")
            let summary = try await GitWorkspace.initialize(
                server.initialization(origin: server.namedURL, branch: "dev"), in: workspace.path, uid: workspace.uid)
            #expect(summary.branch == "dev" && summary.commit == dev && !summary.branchCreated && summary.defaultBranch == "main")
            #expect(FileManager.default.fileExists(atPath: workspace.path + "/dev.txt"))
            #expect(try workspace.git(["rev-parse", "--abbrev-ref", "dev@{upstream}"]) == "origin/dev")

            let next = try server.pushCommit(to: "dev", file: "next.txt")
            try workspace.git(server.bearerArguments + server.resolveArguments + ["pull", "-q"], environment: server.gitEnvironment)
            #expect(try workspace.git(["rev-parse", "HEAD"]) == next)
            #expect(try workspace.filesHolding(server.secretForms) == [])
        }
    }

    @Test func aBranchTheRemoteLacksIsMadeFromTheDefaultBranchAndPushesThroughOrigin() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            let summary = try await GitWorkspace.initialize(
                server.initialization(origin: server.namedURL, branch: "agent/feature"), in: workspace.path, uid: workspace.uid)
            #expect(summary.outcome == .initialized && summary.branch == "agent/feature" && summary.branchCreated)
            #expect(summary.commit == (try server.commit(of: "main")))
            #expect(try workspace.git(["symbolic-ref", "HEAD"]) == "refs/heads/agent/feature")
            #expect(try workspace.git(["config", "branch.agent/feature.remote"]) == "origin")
            #expect(try workspace.git(["config", "branch.agent/feature.merge"]) == "refs/heads/agent/feature")
            #expect(try workspace.entriesNotOwnedByTheUser() == [])

            // The sandbox's `git push`, with no arguments, creates the branch through origin.
            try "work\n".write(toFile: workspace.path + "/work.txt", atomically: true, encoding: .utf8)
            try workspace.git(["add", "work.txt"])
            try workspace.git(["-c", "user.name=agent", "-c", "user.email=agent@agentd.test", "commit", "-q", "-m", "work"])
            try workspace.git(server.bearerArguments + server.resolveArguments + ["push", "-q"], environment: server.gitEnvironment)
            #expect(try server.commit(of: "agent/feature") == (try workspace.git(["rev-parse", "HEAD"])))
        }
    }

    @Test func anEmptyRemoteGivesAnUnbornBranchWhoseFirstPushCreatesIt() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            let bare = server.repositoriesRoot + "/agentd/empty.git"
            try TestCommand.check(["git", "init", "-q", "--bare", "-b", "main", bare], environment: server.gitEnvironment)
            try TestCommand.check(["git", "-C", bare, "config", "http.receivepack", "true"], environment: server.gitEnvironment)
            var initialization = server.initialization(origin: server.url("agentd/empty", host: TestCA.testHostName))
            initialization.repositoryURL = server.url("agentd/empty")
            let summary = try await GitWorkspace.initialize(initialization, in: workspace.path, uid: workspace.uid)
            #expect(summary.outcome == .initialized && summary.branch == "main" && summary.commit == nil && summary.branchCreated)
            #expect(try workspace.entriesNotOwnedByTheUser() == [])
            #expect(try workspace.git(["symbolic-ref", "HEAD"]) == "refs/heads/main")

            try "first\n".write(toFile: workspace.path + "/first.txt", atomically: true, encoding: .utf8)
            try workspace.git(["add", "first.txt"])
            try workspace.git(["-c", "user.name=agent", "-c", "user.email=agent@agentd.test", "commit", "-q", "-m", "first"])
            try workspace.git(server.bearerArguments + server.resolveArguments + ["push", "-q"], environment: server.gitEnvironment)
            let pushed = try TestCommand.check(["git", "-C", bare, "rev-parse", "refs/heads/main"], environment: server.gitEnvironment)
            #expect(pushed.trimmingCharacters(in: .whitespacesAndNewlines) == (try workspace.git(["rev-parse", "HEAD"])))
        }
    }

    @Test func aCheckoutOverAnUntrackedFileFailsAndLeavesNoRepositoryBehindForTheRetry() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            let mine = workspace.path + "/README.md"
            try "mine\n".write(toFile: mine, atomically: true, encoding: .utf8)
            let error = try await #require(throws: GitWorkspaceError.self) {
                try await GitWorkspace.initialize(server.initialization(origin: server.namedURL), in: workspace.path, uid: workspace.uid)
            }
            #expect(error.kind == .failed)
            #expect(error.description.contains("git checkout") && error.description.contains("README.md"))
            #expect(try workspace.contents() == ["README.md", "lost+found"])
            #expect(try String(contentsOfFile: mine, encoding: .utf8) == "mine\n")

            // Once the file is out of the way, the retry initializes.
            try FileManager.default.removeItem(atPath: mine)
            let summary = try await GitWorkspace.initialize(server.initialization(origin: server.namedURL), in: workspace.path, uid: workspace.uid)
            #expect(try summary.outcome == .initialized && summary.commit == server.commit(of: "main"))
        }
    }

    @Test func aRefusedCredentialIsAnErrorNamingTheRepositoryNotTheTokenAndLeavesTheWorkspaceAlone() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            var initialization = server.initialization(origin: server.namedURL)
            initialization.header = ("Authorization", "Bearer \(server.token)x")
            let error = try await #require(throws: GitWorkspaceError.self) {
                try await GitWorkspace.initialize(initialization, in: workspace.path, uid: workspace.uid)
            }
            #expect(error.kind == .authentication)
            #expect(error.description.contains(server.url("agentd/widgets")))
            #expect(!error.description.contains(server.token))
            #expect(try workspace.contents() == ["lost+found"])
            #expect(try server.accessLog().allSatisfy { $0.status == 401 && $0.tokenID == nil })
        }
    }

    @Test func anUnreachableOrMissingRepositoryIsAnErrorNamingIt() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            var closed = server.initialization(origin: server.namedURL)
            closed.repositoryURL = "https://127.0.0.1:\(try Loopback.freePort())/agentd/widgets.git"
            let unreachable = try await #require(throws: GitWorkspaceError.self) {
                try await GitWorkspace.initialize(closed, in: workspace.path, uid: workspace.uid)
            }
            #expect(unreachable.kind == .unreachable)
            #expect(unreachable.description.contains(closed.repositoryURL))

            var missing = server.initialization(origin: server.namedURL)
            missing.repositoryURL = server.url("agentd/missing")
            let notFound = try await #require(throws: GitWorkspaceError.self) {
                try await GitWorkspace.initialize(missing, in: workspace.path, uid: workspace.uid)
            }
            #expect(notFound.kind == .notFound)
            #expect(notFound.description.contains(missing.repositoryURL))
            #expect(!notFound.description.contains(server.token))
            #expect(try workspace.contents() == ["lost+found"])
        }
    }

    @Test func aWorkspaceThatHoldsGitAlreadyIsLeftAlone() async throws {
        try await GitHTTPServer.with { server in
            let workspace = try TestWorkspace()
            defer { workspace.remove() }
            try FileManager.default.createDirectory(atPath: workspace.path + "/.git", withIntermediateDirectories: false)
            try "earlier task\n".write(toFile: workspace.path + "/.git/marker", atomically: true, encoding: .utf8)
            let summary = try await GitWorkspace.initialize(server.initialization(origin: server.namedURL), in: workspace.path, uid: workspace.uid)
            #expect(summary.outcome == .alreadyInitialized && summary.branch == nil && summary.commit == nil)
            #expect(try FileManager.default.contentsOfDirectory(atPath: workspace.path + "/.git") == ["marker"])
            #expect(try server.accessLog() == [])
        }
    }

    @Test func theTimeoutKillsGit() async throws {
        let stall = try StalledListener()
        defer { stall.close() }
        let workspace = try TestWorkspace()
        defer { workspace.remove() }
        let initialization = GitInitialization(
            repositoryURL: "https://127.0.0.1:\(stall.port)/agentd/widgets.git", header: ("Authorization", "Bearer canary-timeout"),
            originURL: "http://127.0.0.1:3128/gh/agentd/widgets.git", timeout: .seconds(1))
        let started = ContinuousClock.now
        let error = try await #require(throws: GitWorkspaceError.self) {
            try await GitWorkspace.initialize(initialization, in: workspace.path, uid: workspace.uid)
        }
        #expect(error.kind == .timedOut)
        #expect(error.description.contains(initialization.repositoryURL) && !error.description.contains("canary-timeout"))
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(await eventually { workspace.processes().isEmpty })
        #expect(try workspace.contents() == ["lost+found"])
    }

    @Test func otherProcessesOfTheSandboxUserCannotReadGitsEnvironmentAndCancellingKillsGit() async throws {
        let stall = try StalledListener()
        defer { stall.close() }
        let workspace = try TestWorkspace()
        defer { workspace.remove() }
        let canary = "canary-" + Components.testID()
        let initialization = GitInitialization(
            repositoryURL: "https://127.0.0.1:\(stall.port)/agentd/widgets.git", header: ("Authorization", "Bearer \(canary)"),
            originURL: "http://127.0.0.1:3128/gh/agentd/widgets.git", timeout: .seconds(600))
        let task = Task { try await GitWorkspace.initialize(initialization, in: workspace.path, uid: workspace.uid) }
        #expect(await eventually { !workspace.processes().isEmpty })
        for pid in workspace.processes() {
            // The credential is in git's environment (root sees it) ...
            let environ = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/environ"))) ?? Data()
            #expect(String(decoding: environ, as: UTF8.self).contains(canary))
            // ... but another process of the same uid cannot read it.
            let peek = try TestCommand.run(
                ["setpriv", "--reuid=\(workspace.uid)", "--regid=\(workspace.uid)", "--clear-groups", "cat", "/proc/\(pid)/environ"])
            #expect(!peek.succeeded && !peek.output.contains(canary))
        }
        task.cancel()
        let error = try await #require(throws: GitWorkspaceError.self) { try await task.value }
        #expect(error.kind == .cancelled)
        #expect(await eventually { workspace.processes().isEmpty })
    }

    @Test func aWorkspaceOfAnotherOwnerIsRefused() async throws {
        let workspace = try TestWorkspace()
        defer { workspace.remove() }
        let initialization = GitInitialization(repositoryURL: "https://127.0.0.1:1/a/b.git", originURL: "http://127.0.0.1:3128/r/a/b.git")
        let error = try await #require(throws: GitWorkspaceError.self) {
            try await GitWorkspace.initialize(initialization, in: workspace.path, uid: workspace.uid + 1)
        }
        #expect(error.kind == .workspace && error.description.contains("not the sandbox's uid"))
    }

    @Test func aPolicysGitSectionBecomesAnInitializationThroughItsRoute() throws {
        let policy = Policy(
            name: "coding",
            credentials: [Credential(name: "gh", source: .env("GH_TOKEN"))],
            routes: [
                Route(name: "github", upstream: "https://github.com", credential: "gh", caFile: "/etc/agentd/ca.pem"),
                Route(name: "gitlab", upstream: "https://gitlab.example/api/v4", credential: "gh", header: "PRIVATE-TOKEN: {{credential}}"),
            ],
            git: GitPolicy(repository: "https://github.com/agentd/widgets.git", branch: "agent/x", route: "github"))
        let initialization = try GitInitialization(policy: policy, credential: "ghp_secret123")
        #expect(initialization.repositoryURL == "https://github.com/agentd/widgets.git")
        #expect(initialization.originURL == "http://127.0.0.1:3128/github/agentd/widgets.git")
        #expect(initialization.branch == "agent/x" && initialization.caFile == "/etc/agentd/ca.pem")
        #expect(initialization.header?.name == "Authorization" && initialization.header?.value == "Bearer ghp_secret123")
        // The value never shows in a description, a debug description or a dump.
        var dumped = ""
        dump(initialization, to: &dumped)
        for text in ["\(initialization)", String(reflecting: initialization), dumped] { #expect(!text.contains("ghp_secret123")) }

        let gitlab = try #require(policy.route(named: "gitlab"))
        #expect(GitInitialization.routeURL(repository: "https://gitlab.example/api/v4/o/r.git", route: gitlab) == "http://127.0.0.1:3128/gitlab/o/r.git")
        #expect(GitInitialization.routeURL(repository: "https://gitlab.example/other/o/r.git", route: gitlab) == nil)
        #expect(GitInitialization.routeURL(repository: "https://gitlab.example:8443/api/v4/o/r.git", route: gitlab) == nil)

        #expect(throws: GitWorkspaceError.self) { try GitInitialization(policy: policy, credential: nil) }
        var elsewhere = policy
        elsewhere.git?.route = "gitlab"
        #expect(throws: GitWorkspaceError.self) { try GitInitialization(policy: elsewhere, credential: "x") }
        var routeless = policy
        routeless.git?.route = nil
        let direct = try GitInitialization(policy: routeless, credential: nil)
        #expect(direct.originURL == direct.repositoryURL && direct.header == nil)
    }
}

// MARK: - fixtures

extension GitHTTPServer {
    /// The repository by the certificate's host name, resolved to 127.0.0.1 (an `origin`
    /// distinct from the upstream URL that the test's own git can still reach).
    var namedURL: String { url("agentd/widgets", host: TestCA.testHostName) }
    var resolveArguments: [String] { ["-c", "http.curloptResolve=\(TestCA.testHostName):\(port):127.0.0.1"] }

    /// The initialization of `agentd/widgets` with the canary as a bearer token and the test CA.
    func initialization(origin: String, branch: String? = nil) -> GitInitialization {
        GitInitialization(
            repositoryURL: url("agentd/widgets"), branch: branch, header: ("Authorization", "Bearer \(token)"), caFile: ca.caPath,
            originURL: origin, timeout: .seconds(60), resolve: ["\(TestCA.testHostName):\(port):127.0.0.1"])
    }

    /// The token as it could be written down: raw, base64 (as a bearer value and as basic auth).
    var secretForms: [String] {
        [token, Data(token.utf8).base64EncodedString(), Data("Bearer \(token)".utf8).base64EncodedString(),
         Data("\(GitHTTPServer.basicUser):\(token)".utf8).base64EncodedString()]
    }

    func commit(of branch: String) throws -> String {
        try TestCommand.check(["git", "-C", repositoriesRoot + "/agentd/widgets.git", "rev-parse", "refs/heads/" + branch], environment: gitEnvironment)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Pushes a commit adding `file` to `branch` (made from main if missing); returns it.
    func pushCommit(to branch: String, file: String) throws -> String {
        let clone = directory + "/push-\(Components.testID())"
        defer { try? FileManager.default.removeItem(atPath: clone) }
        try TestCommand.check(["git"] + bearerArguments + ["clone", "-q", url("agentd/widgets"), clone], environment: gitEnvironment)
        let exists = try TestCommand.run(["git", "-C", clone, "rev-parse", "--verify", "-q", "origin/" + branch], environment: gitEnvironment)
        try TestCommand.check(["git", "-C", clone, "checkout", "-q", "-B", branch, exists.succeeded ? "origin/" + branch : "origin/main"], environment: gitEnvironment)
        try "\(file)\n".write(toFile: clone + "/" + file, atomically: true, encoding: .utf8)
        try TestCommand.check(["git", "-C", clone, "add", file], environment: gitEnvironment)
        try TestCommand.check(
            ["git", "-C", clone, "-c", "user.name=t", "-c", "user.email=t@agentd.test", "commit", "-q", "-m", file], environment: gitEnvironment)
        try TestCommand.check(["git", "-C", clone] + bearerArguments + ["push", "-q", "origin", "HEAD:refs/heads/" + branch], environment: gitEnvironment)
        return try commit(of: branch)
    }
}

/// A workspace as agentd mounts one: a directory owned by a uid of its own, holding a
/// root-only `lost+found`, below a root-only directory the uid cannot search; with `ext4`, a
/// loop-mounted ext4 image made as `WorkspaceImages` makes them (`mkfs.ext4 -E root_owner=`).
struct TestWorkspace {
    let root: String
    let path: String
    let uid: Int
    let ext4: Bool

    init(ext4: Bool = false) throws {
        uid = 61000 + Int.random(in: 0..<4000)
        self.ext4 = ext4
        root = NSTemporaryDirectory() + "agentd-gitws-\(Components.testID())"
        path = root + "/mnt/ws"
        try FileManager.default.createDirectory(atPath: root + "/mnt", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o755])
        if ext4 {
            let image = root + "/ws.img"
            try TestCommand.check(["truncate", "-s", "64M", image])
            try TestCommand.check(["mkfs.ext4", "-q", "-E", "root_owner=\(uid):\(uid)", image])
            try TestCommand.check(["mount", "-o", "loop,nosuid,nodev", image, path])
            return
        }
        guard chown(path, uid_t(uid), gid_t(uid)) == 0 else { throw FixtureError(description: "chown \(path): \(String(cString: strerror(errno)))") }
        try FileManager.default.createDirectory(atPath: path + "/lost+found", withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
    }

    func remove() {
        if ext4 { _ = try? TestCommand.run(["umount", path]) }
        try? FileManager.default.removeItem(atPath: root)
    }

    /// git in the workspace, as root (the test's own view), its output trimmed.
    @discardableResult
    func git(_ arguments: [String], environment: [String: String] = [:]) throws -> String {
        var env = ["GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0"]
        env.merge(environment) { $1 }
        return try TestCommand.check(["git", "-c", "safe.directory=*", "-C", path] + arguments, environment: env)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func contents() throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: path).sorted() }

    private func walk(_ body: (String, stat) throws -> Void) throws {
        let enumerator = FileManager.default.enumerator(atPath: path)
        while let relative = enumerator?.nextObject() as? String {
            if relative == "lost+found" { enumerator?.skipDescendants(); continue }
            var st = stat()
            guard lstat(path + "/" + relative, &st) == 0 else { continue }
            try body(relative, st)
        }
    }

    /// Paths below the workspace not owned by uid:uid (lost+found aside).
    func entriesNotOwnedByTheUser() throws -> [String] {
        var found: [String] = []
        try walk { relative, st in if Int(st.st_uid) != uid || Int(st.st_gid) != uid { found.append(relative) } }
        return found
    }

    /// Regular files below the workspace holding any of `needles`.
    func filesHolding(_ needles: [String]) throws -> [String] {
        var found: [String] = []
        try walk { relative, st in
            guard st.st_mode & S_IFMT == S_IFREG else { return }
            let data = try Data(contentsOf: URL(fileURLWithPath: path + "/" + relative))
            if needles.contains(where: { data.range(of: Data($0.utf8)) != nil }) { found.append(relative) }
        }
        return found
    }

    /// Live (not zombie) processes running as this workspace's uid.
    func processes() -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry), let status = try? String(contentsOfFile: "/proc/\(entry)/status", encoding: .utf8) else { return nil }
            let lines = status.split(separator: "\n")
            guard let uidLine = lines.first(where: { $0.hasPrefix("Uid:") }),
                uidLine.split(whereSeparator: { $0 == "\t" || $0 == " " }).dropFirst().first == Substring(String(uid)),
                !lines.contains(where: { $0.hasPrefix("State:") && $0.contains("Z") })
            else { return nil }
            return pid
        }
    }
}

/// A TCP port on 127.0.0.1 that takes connections into its backlog and never answers: a
/// server that stalls in the TLS handshake.
struct StalledListener {
    let fd: Int32
    let port: Int

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && listen(fd, 16) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard fd >= 0, ok else { throw FixtureError(description: "cannot listen on 127.0.0.1: \(String(cString: strerror(errno)))") }
        self.fd = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
    }

    func close() { _ = Glibc.close(fd) }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
}

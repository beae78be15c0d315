import EgressProxy
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOPosix
import Policy
import SessionLog
import Testing
import TestSupport

@testable import VaultProxy

/// A git route end to end: host `git` talks to the proxy through a loopback TCP bridge (as a
/// sandbox's agent bridges 127.0.0.1:3128), the proxy to the real smart-HTTP server over TLS
/// with the canary token it alone holds. The sandbox is announced from a policy file through
/// `SandboxSpec.egress(for:)`, as agentd does.
final class GitRouteFixture: @unchecked Sendable {
    let server: GitHTTPServer
    let dir: TempDir
    let proxy: VaultProxy
    let events = EventCollector()
    let logLines = NIOLockedValueBox<[String]>([])
    /// Everything git printed, to prove the token never shows.
    let outputs = NIOLockedValueBox<[String]>([])
    private var bridges: [TCPBridge] = []

    init(server: GitHTTPServer, configuration: ProxyConfiguration = ProxyConfiguration()) throws {
        self.server = server
        dir = try TempDir()
        let lines = logLines
        let events = self.events
        proxy = VaultProxy(
            group: MultiThreadedEventLoopGroup.singleton, configuration: configuration,
            logger: Logger(label: "vault-proxy-test") { _ in CapturingLogHandler(lines: lines) }
        ) { events.receive($0) }
        proxy.setCredentials([try Secret(name: "github_token", value: server.token)])
    }

    /// The coding-agent policy pointed at the test server, with `push` as its `git.push`.
    func policy(push: String) throws -> Policy {
        let yaml = """
            apiVersion: agentd/v1
            kind: Policy
            metadata: {name: coding-agent}
            network: {mode: proxy}
            credentials: [{name: github_token, source: env:GITHUB_TOKEN}]
            routes:
              - {name: github, upstream: "https://127.0.0.1:\(server.port)", credential: github_token, caFile: "\(server.ca.caPath)"}
            git:
              repository: https://127.0.0.1:\(server.port)/example/widgets.git
              route: github
            \(push)
            """
        return try PolicyLoader.load(yaml: yaml, path: "coding-agent.yaml").get()
    }

    /// A sandbox of `policy` with its listener and a TCP bridge to it; returns the bridge's port.
    func sandbox(_ name: String, push: String = "") async throws -> Int {
        let policy = try policy(push: push)
        let spec = try #require(
            SandboxSpec.egress(for: policy, sandbox: name, session: "session-1", task: "task-1", socketPath: dir.path + "/\(name)/proxy.sock"))
        let push = try #require(policy.git?.push)
        #expect(spec.routes.first?.git == GitRouteRule(repository: "/example/widgets.git", pushBranches: push.branches, pushTags: push.tags))
        try await proxy.addSandbox(spec)
        let bridge = try await TCPBridge(to: spec.socketPath)
        bridges.append(bridge)
        return bridge.port
    }

    /// `http://127.0.0.1:<port>/github/<repository>.git`: the sandbox's view of the repository.
    func origin(_ port: Int, _ repository: String = "example/widgets") -> String {
        "http://127.0.0.1:\(port)/github/\(repository).git"
    }

    /// Runs git with no configuration but an identity (and never the token).
    @discardableResult
    func git(_ arguments: [String], in directory: String? = nil) throws -> TestCommand.Result {
        let argv = ["git"] + (directory.map { ["-C", $0] } ?? []) + ["-c", "user.name=agent", "-c", "user.email=agent@agentd.test"] + arguments
        let result = try TestCommand.run(argv, environment: server.gitEnvironment)
        outputs.withLockedValue { $0.append(result.output) }
        return result
    }

    func checkGit(_ arguments: [String], in directory: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
        let result = try git(arguments, in: directory)
        #expect(result.succeeded, "git \(arguments.joined(separator: " ")):\n\(result.output)", sourceLocation: sourceLocation)
        return result.output
    }

    /// Clones through the route into `name` under the fixture's directory.
    func clone(_ port: Int, into name: String) throws -> String {
        let path = dir.path + "/" + name
        _ = try checkGit(["clone", "-q", origin(port), path])
        return path
    }

    func commit(_ clone: String, file: String, content: String) throws {
        try content.write(toFile: clone + "/" + file, atomically: true, encoding: .utf8)
        _ = try checkGit(["add", file], in: clone)
        _ = try checkGit(["commit", "-q", "-m", "change \(file)"], in: clone)
    }

    var bare: String { server.repositoriesRoot + "/example/widgets.git" }

    /// The object a ref names in the upstream's bare repository, nil when it does not exist.
    func upstreamRef(_ ref: String) throws -> String? {
        let r = try TestCommand.run(["git", "-C", bare, "rev-parse", "--verify", "-q", ref], environment: server.gitEnvironment)
        return r.succeeded ? r.output.trimmingCharacters(in: .whitespacesAndNewlines) : nil
    }

    func head(_ clone: String) throws -> String {
        try checkGit(["rev-parse", "HEAD"], in: clone).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    var receivePackPosts: Int {
        ((try? server.accessLog()) ?? []).filter { $0.method == "POST" && $0.path.hasSuffix("/git-receive-pack") }.count
    }

    /// The token is in no git output, no clone's config, no proxy log line.
    func expectNoToken(in clones: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        for output in outputs.withLockedValue({ $0 }) { #expect(!output.contains(server.token), sourceLocation: sourceLocation) }
        for clone in clones {
            #expect(try !String(contentsOfFile: clone + "/.git/config", encoding: .utf8).contains(server.token), sourceLocation: sourceLocation)
        }
        for line in logLines.withLockedValue({ $0 }) { #expect(!line.contains(server.token), sourceLocation: sourceLocation) }
    }

    func shutdown() async {
        bridges = []
        await proxy.shutdown()
    }
}

@Suite(.serialized) struct GitRouteTests {
    /// A git server holding `repositories`, and a proxy with one sandbox `sandbox-1` of the
    /// coding-agent policy (`push`: its `git.push` line); `body` gets the fixture, the port of
    /// the sandbox's TCP bridge and its socket.
    static func withGitRoute(
        repositories: [String] = ["example/widgets"], push: String = "", configuration: ProxyConfiguration = ProxyConfiguration(),
        _ body: (GitRouteFixture, _ port: Int, _ socket: String) async throws -> Void
    ) async throws {
        try await GitHTTPServer.with(repositories: repositories) { server in
            let fixture = try GitRouteFixture(server: server, configuration: configuration)
            do {
                let port = try await fixture.sandbox("sandbox-1", push: push)
                try await body(fixture, port, fixture.dir.path + "/sandbox-1/proxy.sock")
            } catch {
                await fixture.shutdown()
                throw error
            }
            await fixture.shutdown()
        }
    }

    @Test func cloneAndPushesToAgentBranchesGoThroughInBothFramings() async throws {
        try await Self.withGitRoute(repositories: ["example/widgets", "other/gadgets"]) { fixture, port, socket in
            let server = fixture.server
            let clone = try fixture.clone(port, into: "clone")
            #expect(try String(contentsOfFile: clone + "/README.md", encoding: .utf8) == "# example/widgets\n")
            let fetched = await eventually {
                (try? server.accessLog())?.contains { $0.path == "/example/widgets.git/git-upload-pack" && $0.status == 200 && $0.tokenID == server.tokenID } == true
            }
            #expect(fetched, "the clone's fetch reached the server with the route's token")
            #expect(try server.accessLog().allSatisfy { $0.tokenID == server.tokenID }, "every request carried the route's token")

            // A small push (Content-Length) creates agent/x.
            try fixture.commit(clone, file: "change.txt", content: "change\n")
            _ = try fixture.checkGit(["push", "-q", "origin", "HEAD:agent/x"], in: clone)
            #expect(try fixture.upstreamRef("refs/heads/agent/x") == fixture.head(clone))
            let allowed = await fixture.events.first { $0.path == "/example/widgets.git/git-receive-pack" && $0.type == "egress.allowed" }
            #expect(allowed.rule == "route github; git.push refs/heads/agent/x")
            #expect(allowed.status == 200 && allowed.credential == "github_token" && allowed.route == "github")

            // A push larger than git's post buffer goes chunked, after an empty probe request.
            let random = (0..<(300 << 10)).map { _ in UInt8.random(in: 0...255) }
            try Data(random).write(to: URL(fileURLWithPath: clone + "/blob.bin"))
            _ = try fixture.checkGit(["add", "blob.bin"], in: clone)
            _ = try fixture.checkGit(["commit", "-q", "-m", "blob"], in: clone)
            _ = try fixture.checkGit(["-c", "http.postBuffer=65520", "push", "-q", "origin", "HEAD:agent/x"], in: clone)
            #expect(try fixture.upstreamRef("refs/heads/agent/x") == fixture.head(clone))
            #expect(try fixture.upstreamRef("refs/heads/main") != fixture.head(clone))
            let big = await fixture.events.first { $0.type == "egress.allowed" && $0.bytesUp > 300 << 10 }
            #expect(big.rule == "route github; git.push refs/heads/agent/x" && big.status == 200)
            let probe = await fixture.events.first { $0.path == "/example/widgets.git/git-receive-pack" && $0.bytesUp == 4 }
            #expect(probe.type == "egress.allowed" && probe.rule == "route github", "git's empty probe before a large push passes")
            // A force-push to an allowed branch passes: the route sees names, not history.
            _ = try fixture.checkGit(["push", "-q", "--force", "origin", "HEAD~2:agent/x"], in: clone)
            #expect(try fixture.upstreamRef("refs/heads/agent/x") == fixture.checkGit(["rev-parse", "HEAD~2"], in: clone).trimmingCharacters(in: .whitespacesAndNewlines))
            try fixture.expectNoToken(in: [clone])
        }
    }

    @Test func pushesOutsideThePolicyAreRefusedWithTheReasonAndNeverReachTheUpstream() async throws {
        try await Self.withGitRoute() { fixture, port, socket in
            let clone = try fixture.clone(port, into: "clone")
            let main = try #require(try fixture.upstreamRef("refs/heads/main"))
            try fixture.commit(clone, file: "change.txt", content: "change\n")
            _ = try fixture.checkGit(["push", "-q", "origin", "HEAD:agent/x"], in: clone)
            // nginx logs a request once it has answered it, which may be just after git exits.
            #expect(await eventually { fixture.receivePackPosts == 1 })

            func refused(_ arguments: [String], _ reason: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
                let r = try fixture.git(["push", "origin"] + arguments, in: clone)
                #expect(!r.succeeded, "git push \(arguments) succeeded", sourceLocation: sourceLocation)
                #expect(r.output.contains("[remote rejected]"), "\(r.output)", sourceLocation: sourceLocation)
                #expect(r.output.contains("(refused by policy coding-agent: \(reason))"), "\(r.output)", sourceLocation: sourceLocation)
                #expect(r.output.contains("remote: error: refused by policy coding-agent: \(reason)"), "\(r.output)", sourceLocation: sourceLocation)
            }

            try refused(["HEAD:main"], "refs/heads/main is not in git.push.branches (agent/*)")
            try refused(["+HEAD:main"], "refs/heads/main is not in git.push.branches (agent/*)")
            try refused(["HEAD:refs/heads/feature/y"], "refs/heads/feature/y is not in git.push.branches (agent/*)")
            // A rewritten history forced onto main.
            _ = try fixture.checkGit(["checkout", "-q", "--orphan", "rewrite"], in: clone)
            _ = try fixture.checkGit(["commit", "-q", "-m", "rewrite"], in: clone)
            try refused(["--force", "rewrite:main"], "refs/heads/main is not in git.push.branches (agent/*)")
            try refused(["--delete", "agent/x"], "deleting refs/heads/agent/x is not allowed (git.push creates and updates branches only)")
            _ = try fixture.checkGit(["tag", "v1"], in: clone)
            try refused(["v1"], "refs/tags/v1: tags may not be pushed (git.push.tags is false)")
            try refused(["HEAD:refs/notes/x"], "refs/notes/x is neither a branch nor a tag; git.push allows refs/heads/ (git.push.branches) and refs/tags/ (git.push.tags) only")

            // One refused ref refuses the whole push; the other is reported as not pushed.
            let mixed = try fixture.git(["push", "origin", "HEAD:agent/y", "+HEAD:main"], in: clone)
            #expect(!mixed.succeeded)
            #expect(mixed.output.contains("agent/y (not pushed: another ref of this push was refused by policy coding-agent)"), "\(mixed.output)")
            #expect(try fixture.upstreamRef("refs/heads/agent/y") == nil)

            // An allowed push after them all: once it is logged, any earlier one would be too.
            _ = try fixture.checkGit(["push", "-q", "origin", "HEAD:agent/z"], in: clone)
            #expect(await eventually { fixture.receivePackPosts >= 2 })
            #expect(fixture.receivePackPosts == 2, "no refused push reached the upstream")
            #expect(try fixture.upstreamRef("refs/heads/main") == main)
            #expect(try fixture.upstreamRef("refs/heads/agent/x") != nil)
            #expect(try fixture.upstreamRef("refs/tags/v1") == nil)
            let denied = await fixture.events.first { $0.type == "egress.denied" && $0.rule.contains("refs/heads/main") }
            #expect(denied.rule == "git.push: refs/heads/main is not in git.push.branches (agent/*)")
            #expect(denied.status == 200 && denied.route == "github" && denied.credential == nil)
            #expect(denied.path == "/example/widgets.git/git-receive-pack" && denied.method == "POST")
            try fixture.expectNoToken(in: [clone])
        }
    }

    @Test func tagsAreCreatedOnlyWhenThePolicyAllowsAndNeverMoved() async throws {
        try await Self.withGitRoute(push: "  push: {branches: [\"agent/**\"], tags: true}") { fixture, port, socket in
            let clone = try fixture.clone(port, into: "clone")
            _ = try fixture.checkGit(["tag", "v1"], in: clone)
            _ = try fixture.checkGit(["push", "-q", "origin", "v1"], in: clone)
            #expect(try fixture.upstreamRef("refs/tags/v1") == fixture.head(clone))
            // `**` reaches across segments.
            _ = try fixture.checkGit(["push", "-q", "origin", "HEAD:agent/deep/er"], in: clone)
            #expect(try fixture.upstreamRef("refs/heads/agent/deep/er") != nil)

            try fixture.commit(clone, file: "more.txt", content: "more\n")
            _ = try fixture.checkGit(["tag", "-f", "v1"], in: clone)
            let moved = try fixture.git(["push", "--force", "origin", "v1"], in: clone)
            #expect(!moved.succeeded)
            #expect(moved.output.contains("refused by policy coding-agent: refs/tags/v1 already exists; git.push.tags allows creating tags, not moving them"), "\(moved.output)")
            let deleted = try fixture.git(["push", "origin", ":refs/tags/v1"], in: clone)
            #expect(!deleted.succeeded)
            #expect(deleted.output.contains("deleting refs/tags/v1 is not allowed"), "\(deleted.output)")
            #expect(try fixture.upstreamRef("refs/tags/v1") != fixture.head(clone))
            #expect(try fixture.upstreamRef("refs/tags/v1") != nil)
            try fixture.expectNoToken(in: [clone])
        }
    }

    @Test func otherRepositoriesAndPathsAreRefused() async throws {
        try await Self.withGitRoute(repositories: ["example/widgets", "other/gadgets"]) { fixture, port, socket in
            let server = fixture.server
            let other = try fixture.git(["ls-remote", fixture.origin(port, "other/gadgets")])
            #expect(!other.succeeded)
            #expect(other.output.contains("403"), "\(other.output)")
            let otherClone = try fixture.git(["clone", "-q", fixture.origin(port, "other/gadgets"), fixture.dir.path + "/other"])
            #expect(!otherClone.succeeded)
            // Without .git the repository is the same one.
            #expect(try fixture.checkGit(["ls-remote", fixture.origin(port).replacingOccurrences(of: ".git", with: ""), "main"]).hasSuffix("\trefs/heads/main\n"))

            let only = "egress to 127.0.0.1:\(server.port) refused by policy coding-agent: route github serves only the git smart-HTTP endpoints of /example/widgets.git (info/refs, git-upload-pack, git-receive-pack)\n"
            for request in [
                "GET /github/other/gadgets.git/info/refs?service=git-upload-pack",
                "GET /github/example/widgets.git/HEAD",
                "GET /github/example/widgets.git/info/refs",
                "GET /github/example/widgets.git/info/refs?service=git-upload-pack&x=1",
                "POST /github/example/widgets.git/info/refs?service=git-upload-pack",
                "GET /github/example/widgets.git/git-upload-pack",
                "POST /github/example/widgets.git/git-upload-pack?x=1",
                "GET /github/example/widgets.gitx/info/refs?service=git-upload-pack",
                "GET /github/example/widgets.git/objects/info/packs",
                "GET /github/example/widget%73.git/info/refs?service=git-upload-pack",
                "GET /github/",
            ] {
                let answer = try rawExchange(
                    socket, Array("\(request) HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".utf8), readUntilClose: true)
                #expect(answer.hasPrefix("HTTP/1.1 403 "), "\(request): \(answer.prefix(100))")
                #expect(ConnectTests.body(answer) == only, "\(request)")
            }
            let denied = await fixture.events.first { $0.path == "/other/gadgets.git/info/refs?[REDACTED]" }
            #expect(denied.type == "egress.denied" && denied.status == 403 && denied.route == "github")
            #expect(denied.rule == "route github serves only the git smart-HTTP endpoints of /example/widgets.git (info/refs, git-upload-pack, git-receive-pack)")
            #expect(try server.accessLog().allSatisfy { !$0.path.hasPrefix("/other/") }, "nothing reached the other repository")
            try fixture.expectNoToken(in: [])
        }
    }

    @Test func malformedPushesAre400AndCompressedOnes415() async throws {
        try await Self.withGitRoute() { fixture, port, socket in
            func post(_ body: [UInt8], headers: String = "") throws -> String {
                let head = "POST /github/example/widgets.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-git-receive-pack-request\r\n\(headers)Content-Length: \(body.count)\r\n\r\n"
                return try rawExchange(socket, Array(head.utf8) + body, readUntilClose: true)
            }
            let zero = GitRouteUnitTests.zero, one = GitRouteUnitTests.a
            for (body, rule) in [
                (Array("zzzz".utf8), "malformed git push: the command list has a pkt-line without a 4-digit hex length"),
                (Array("0003".utf8), "malformed git push: the command list has a pkt-line of length 3 (a command is 5–65520 bytes, then 0000)"),
                (GitReceivePackReport.pkt("\(zero) \(one)") + Array("0000".utf8), "malformed git push: a command is not '<old-id> <new-id> <ref>'"),
                (GitReceivePackReport.pkt("\(zero) \(one) refs/heads/agent/x\0report-status"), "the push's body ended before its command list's flush-pkt (0000)"),
            ] {
                let answer = try post(body)
                #expect(answer.hasPrefix("HTTP/1.1 400 "), "\(rule): \(answer.prefix(100))")
                #expect(ConnectTests.body(answer) == "request refused by the vault-proxy (policy coding-agent): \(rule)\n")
                let event = await fixture.events.first { $0.rule == rule }
                #expect(event.type == "egress.denied" && event.status == 400 && event.route == "github")
            }
            let gzip = try post(Array("0000".utf8), headers: "Content-Encoding: gzip\r\n")
            #expect(gzip.hasPrefix("HTTP/1.1 415 "))
            #expect(ConnectTests.body(gzip).contains("a push's body must not be compressed (Content-Encoding gzip)"))
            #expect(fixture.receivePackPosts == 0)
            let event = await fixture.events.first { $0.status == 415 }
            #expect(event.type == "egress.denied" && event.route == "github")
        }
    }

    @Test func theReportIsPlainWithoutSideBandAnd403WithoutReportStatus() async throws {
        try await Self.withGitRoute() { fixture, port, socket in
            let server = fixture.server
            let zero = GitRouteUnitTests.zero, one = GitRouteUnitTests.a
            func post(_ capabilities: String, expect: Bool = false) throws -> String {
                let body = GitReceivePackReport.pkt("\(zero) \(one) refs/heads/main\0\(capabilities)") + Array("0000PACK...".utf8)
                let head = "POST /github/example/widgets.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    + (expect ? "Expect: 100-continue\r\n" : "") + "\r\n"
                let chunk = Array(String(body.count, radix: 16).utf8) + [13, 10] + body + Array("\r\n0\r\n\r\n".utf8)
                return try rawExchange(socket, Array(head.utf8) + chunk, readUntilClose: true)
            }
            let reason = "refused by policy coding-agent: refs/heads/main is not in git.push.branches (agent/*)"
            let plain = try post("report-status agent=test")
            #expect(plain.hasPrefix("HTTP/1.1 200 "))
            #expect(plain.contains("Content-Type: application/x-git-receive-pack-result\r\n"))
            let expected = GitReceivePackReport.pkt("unpack ok\n") + GitReceivePackReport.pkt("ng refs/heads/main \(reason)\n") + Array("0000".utf8)
            #expect(ConnectTests.body(plain) == String(decoding: expected, as: UTF8.self))

            let banded = try post("report-status side-band-64k")
            let message = GitReceivePackReport.pkt([2] + Array("error: \(reason)\n".utf8))
            #expect(ConnectTests.body(banded) == String(decoding: message + GitReceivePackReport.pkt([1] + expected) + Array("0000".utf8), as: UTF8.self))

            // The proxy reads the commands itself: it says continue without asking the upstream.
            let continued = try post("report-status", expect: true)
            #expect(continued.hasPrefix("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), "\(continued.prefix(200))")
            #expect(continued.hasSuffix(String(decoding: expected, as: UTF8.self)))

            let none = try post("side-band-64k")
            #expect(none.hasPrefix("HTTP/1.1 403 "))
            #expect(ConnectTests.body(none) == "egress to 127.0.0.1:\(server.port) refused by policy coding-agent: git.push: refs/heads/main is not in git.push.branches (agent/*)\n")
            #expect(fixture.receivePackPosts == 0)
        }
    }
}

extension GitRouteTests {
    /// A refused push whose body never ends is answered at the drain's time bound, and one
    /// larger than the drain's size bound as soon as it passes it; the connection then closes.
    @Test func aRefusedPushIsAnsweredAtItsDrainBounds() async throws {
        var configuration = ProxyConfiguration()
        configuration.gitRefusedPushDrainTimeout = .milliseconds(300)
        configuration.gitRefusedPushDrainLimit = 100_000
        try await Self.withGitRoute(configuration: configuration) { fixture, port, socket in
            let commands = GitReceivePackReport.pkt("\(GitRouteUnitTests.zero) \(GitRouteUnitTests.a) refs/heads/main\0report-status") + Array("0000".utf8)
            let head = Array("POST /github/example/widgets.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".utf8)
            func chunk(_ bytes: [UInt8]) -> [UInt8] { Array(String(bytes.count, radix: 16).utf8) + [13, 10] + bytes + [13, 10] }
            let report = "ng refs/heads/main refused by policy coding-agent: refs/heads/main is not in git.push.branches (agent/*)\n"

            let started = ContinuousClock.now
            let unended = try rawExchange(socket, head + chunk(commands) + chunk(Array(repeating: 0x50, count: 1000)), readUntilClose: true)
            #expect(unended.hasPrefix("HTTP/1.1 200 ") && unended.contains(report), "\(unended.prefix(300))")
            #expect(ContinuousClock.now - started >= .milliseconds(300))

            let oversized = try rawExchange(socket, head + chunk(commands) + chunk(Array(repeating: 0x50, count: 150_000)), readUntilClose: true)
            #expect(oversized.hasPrefix("HTTP/1.1 200 ") && oversized.contains(report), "\(oversized.prefix(300))")
            // The event follows the answer (the client may see the close first).
            let drained = await fixture.events.first { $0.bytesUp > 100_000 }
            #expect(drained.type == "egress.denied" && drained.status == 200 && drained.bytesUp < 150_000, "answered once past the size bound")
        }
    }
}

/// The pieces of a git route without a network: the command-list reader, branch patterns,
/// endpoints, verdicts and the report's framing.
@Suite struct GitRouteUnitTests {
    static let zero = String(repeating: "0", count: 40)
    static let a = String(repeating: "a", count: 40)
    static let b = String(repeating: "b", count: 40)

    static func pkt(_ text: String) -> [UInt8] { GitReceivePackReport.pkt(text) }

    static func read(_ bytes: [UInt8], limit: Int = 64 * 1024) -> GitCommandListReader.Outcome {
        var reader = GitCommandListReader(limit: limit)
        return reader.feed(bytes)
    }

    @Test func aCommandListIsReadWholeOrByteByByte() {
        let body = Self.pkt("shallow \(Self.a)") + Self.pkt("\(Self.zero) \(Self.a) refs/heads/agent/x\0report-status side-band-64k agent=git/2.39\n")
            + Self.pkt("\(Self.a) \(Self.b) refs/heads/main\n") + Self.pkt("\(Self.b) \(Self.zero) refs/tags/v1") + Array("0000PACK\0\0\0\u{2}".utf8)
        let expected = GitCommandListReader.Outcome.complete(
            commands: [
                GitRefCommand(old: Self.zero, new: Self.a, ref: "refs/heads/agent/x"), GitRefCommand(old: Self.a, new: Self.b, ref: "refs/heads/main"),
                GitRefCommand(old: Self.b, new: Self.zero, ref: "refs/tags/v1"),
            ], capabilities: ["report-status", "side-band-64k", "agent=git/2.39"])
        #expect(Self.read(body) == expected)
        var reader = GitCommandListReader(limit: 64 * 1024)
        var outcomes: [GitCommandListReader.Outcome] = []
        for byte in body { outcomes.append(reader.feed([byte])) }
        #expect(outcomes.last == expected)
        #expect(outcomes.firstIndex(of: expected) == body.count - 9, "complete with the flush-pkt's last byte, not before")
        #expect(Self.read(Array("0000".utf8)) == .complete(commands: [], capabilities: []), "git's auth probe is an empty list")
        let sha256 = String(repeating: "c", count: 64)
        #expect(Self.read(Self.pkt("\(String(repeating: "0", count: 64)) \(sha256) refs/heads/agent/z\0object-format=sha256") + Array("0000".utf8))
            == .complete(commands: [GitRefCommand(old: String(repeating: "0", count: 64), new: sha256, ref: "refs/heads/agent/z")], capabilities: ["object-format=sha256"]))
    }

    @Test func malformedCommandListsNameTheirProblem() {
        func problem(_ bytes: [UInt8], limit: Int = 64 * 1024) -> String? {
            if case .malformed(let p) = Self.read(bytes, limit: limit) { return p }
            return nil
        }
        let zero = Self.zero, a = Self.a, b = Self.b
        #expect(problem(Array("00g0".utf8)) == "the command list has a pkt-line without a 4-digit hex length")
        #expect(problem(Array("0001".utf8)) == "the command list has a pkt-line of length 1 (a command is 5–65520 bytes, then 0000)")
        #expect(problem(Array("0004".utf8))?.contains("length 4") == true)
        #expect(problem(Array("fff1".utf8))?.contains("length 65521") == true)
        #expect(problem(Self.pkt("\(zero) \(a)") + Array("0000".utf8)) == "a command is not '<old-id> <new-id> <ref>'")
        #expect(problem(Self.pkt("\(zero) \(a.uppercased()) refs/heads/x") + Array("0000".utf8)) == "a command is not '<old-id> <new-id> <ref>'")
        #expect(problem(Self.pkt("\(zero) \(String(repeating: "a", count: 64)) refs/heads/x") + Array("0000".utf8)) == "a command is not '<old-id> <new-id> <ref>'")
        #expect(problem(Self.pkt("\(zero)  \(a) refs/heads/x") + Array("0000".utf8)) == "a command is not '<old-id> <new-id> <ref>'")
        #expect(problem(Self.pkt("\(zero) \(a) HEAD") + Array("0000".utf8)) == "a command names 'HEAD', which is not a ref name (refs/…)")
        #expect(problem(Self.pkt("\(zero) \(a) refs/heads/x y") + Array("0000".utf8)) == "a command names 'refs/heads/x y', which is not a ref name (refs/…)")
        #expect(problem(Self.pkt("\(zero) \(zero) refs/heads/x") + Array("0000".utf8)) == "a command for refs/heads/x has two zero ids")
        #expect(
            problem(Self.pkt("\(zero) \(a) refs/heads/x") + Self.pkt("\(a) \(b) refs/heads/y\0report-status") + Array("0000".utf8))
                == "only the first command may carry capabilities (NUL after the ref name)")
        #expect(problem(Self.pkt("\(zero) \(a) refs/heads/x") + Self.pkt("shallow \(a)") + Array("0000".utf8)) == "a command is not '<old-id> <new-id> <ref>'")
        #expect(problem(Self.pkt("shallow xyz") + Array("0000".utf8)) == "a shallow line does not name an object id")
        #expect(problem(Self.pkt("push-cert\0report-status") + Array("0000".utf8)) == "signed pushes (push-cert) cannot be checked by the vault-proxy; push without --signed")
        // Longer than the limit without a flush-pkt; and a flush-pkt beyond the limit.
        var long: [UInt8] = []
        for i in 0..<2000 { long += Self.pkt("\(zero) \(a) refs/heads/agent/\(i)") }
        #expect(problem(long, limit: 64 * 1024) == "the command list is longer than 65536 bytes")
        #expect(problem(Array(long.prefix(1000)) + Array("0000".utf8), limit: 1000) == "the command list is longer than 1000 bytes")
        // Incomplete is not malformed yet.
        #expect(Self.read(Array("00".utf8)) == .needMore)
        #expect(Self.read(Array(Self.pkt("\(zero) \(a) refs/heads/x").dropLast())) == .needMore)
    }

    @Test func branchPatterns() {
        let cases: [(String, String, Bool)] = [
            ("agent/*", "agent/x", true), ("agent/*", "agent/x/y", false), ("agent/*", "agent/", true), ("agent/*", "agentx", false),
            ("agent/*", "main", false), ("agent/**", "agent/x/y", true), ("agent/**", "agent", false), ("*", "main", true),
            ("*", "a/b", false), ("**", "a/b", true), ("fix-*-done", "fix-1-done", true), ("fix-*-done", "fix-1/2-done", false),
            ("main", "main", true), ("main", "mainx", false), ("**/x", "a/b/x", true), ("a*b*c", "axxbyyc", true), ("a*b*c", "axxbyy", false),
        ]
        for (pattern, name, expected) in cases {
            #expect(GitBranchPattern.matches(pattern, name) == expected, "\(pattern) ~ \(name)")
        }
    }

    @Test func endpointsOfTheRepositoryOnly() throws {
        for repository in ["/example/widgets.git", "/example/widgets", "/example/widgets.git/"] {
            let git = try ResolvedGitRoute(GitRouteRule(repository: repository, pushBranches: ["agent/*"], pushTags: false), route: "github")
            #expect(git.endpoint(method: "GET", path: "/example/widgets.git/info/refs", query: "service=git-upload-pack") == .advertisement)
            #expect(git.endpoint(method: "GET", path: "/example/widgets/info/refs", query: "service=git-receive-pack") == .advertisement)
            #expect(git.endpoint(method: "POST", path: "/example/widgets.git/git-upload-pack", query: nil) == .uploadPack)
            #expect(git.endpoint(method: "POST", path: "/example/widgets/git-receive-pack", query: nil) == .receivePack)
            #expect(git.endpoint(method: "GET", path: "/example/widgets.git/info/refs", query: nil) == nil)
            #expect(git.endpoint(method: "GET", path: "/example/widgets.git/info/refs", query: "service=git-upload-archive") == nil)
            #expect(git.endpoint(method: "POST", path: "/example/widgets.git/git-receive-pack", query: "") == nil)
            #expect(git.endpoint(method: "PUT", path: "/example/widgets.git/git-receive-pack", query: nil) == nil)
            #expect(git.endpoint(method: "GET", path: "/example/widgets.git.git/info/refs", query: "service=git-upload-pack") == nil)
            #expect(git.endpoint(method: "GET", path: "/example/widgetsx/info/refs", query: "service=git-upload-pack") == nil)
            #expect(git.endpoint(method: "GET", path: "/Example/widgets.git/info/refs", query: "service=git-upload-pack") == nil)
        }
        for bad in ["example/widgets.git", "/", "/.git", "/a/../b.git", "/a/b.git?x", "/a/%2e%2e/b", "/a b.git", "/a//b.git"] {
            #expect(throws: ProxyError.self, "\(bad)") { try ResolvedGitRoute(GitRouteRule(repository: bad, pushBranches: [], pushTags: false), route: "github") }
        }
        #expect(throws: ProxyError.self) { try ResolvedGitRoute(GitRouteRule(repository: "/a/b.git", pushBranches: [""], pushTags: false), route: "github") }
        // An invalid git rule makes the whole route, and so the sandbox, invalid.
        #expect(throws: ProxyError.self) {
            try ResolvedRoute(RouteRule(name: "github", upstream: "https://github.com", git: GitRouteRule(repository: "x", pushBranches: [], pushTags: false)))
        }
    }

    @Test func verdictsPerRef() throws {
        let git = try ResolvedGitRoute(GitRouteRule(repository: "/a/b.git", pushBranches: ["agent/*", "release/**"], pushTags: true), route: "r")
        let zero = Self.zero, a = Self.a, b = Self.b
        func refusal(_ old: String, _ new: String, _ ref: String) -> String? { git.refusal(for: GitRefCommand(old: old, new: new, ref: ref)) }
        #expect(refusal(zero, a, "refs/heads/agent/x") == nil)
        #expect(refusal(a, b, "refs/heads/agent/x") == nil)
        #expect(refusal(a, b, "refs/heads/release/1/2") == nil)
        #expect(refusal(a, zero, "refs/heads/agent/x") == "deleting refs/heads/agent/x is not allowed (git.push creates and updates branches only)")
        #expect(refusal(a, b, "refs/heads/main") == "refs/heads/main is not in git.push.branches (agent/*, release/**)")
        #expect(refusal(zero, a, "refs/tags/v1") == nil)
        #expect(refusal(a, b, "refs/tags/v1") == "refs/tags/v1 already exists; git.push.tags allows creating tags, not moving them")
        #expect(refusal(zero, a, "refs/pull/1/head")?.hasPrefix("refs/pull/1/head is neither a branch nor a tag") == true)
        let none = try ResolvedGitRoute(GitRouteRule(repository: "/a/b.git", pushBranches: [], pushTags: false), route: "r")
        #expect(none.refusal(for: GitRefCommand(old: zero, new: a, ref: "refs/heads/agent/x")) == "refs/heads/agent/x: no branch may be pushed (git.push.branches is empty)")
        #expect(none.refusal(for: GitRefCommand(old: zero, new: a, ref: "refs/tags/v1")) == "refs/tags/v1: tags may not be pushed (git.push.tags is false)")
    }

    @Test func sideBandSplitsLongReportsIntoPackets() {
        let long = [UInt8](repeating: 0x61, count: 70000)
        let framed = GitReceivePackReport.sideband(1, long, packetMax: GitCommandListReader.maxPacket)
        #expect(framed.count == long.count + 2 * 5)
        #expect(Array(framed.prefix(5)) == Array("fff0".utf8) + [1])
        let small = GitReceivePackReport.sideband(2, long, packetMax: 1000)
        #expect(small.count == long.count + 71 * 5)
        #expect(Array(small.prefix(5)) == Array("03e8".utf8) + [2])
    }
}

import EgressProxy
import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing
import TestSupport

@testable import VaultProxy

/// agentd's `ProxySupervisor` with the real `vault-proxy` executable as its child: credentials
/// and sandboxes go over the socketpair, each sandbox's listening socket bound by agentd and
/// passed as a descriptor; requests through a sandbox's socket get the credential injected and
/// scrubbed, events come back; killed with -9, the proxy is gone and so are the sockets
/// (nothing goes out), then it is restarted with every sandbox announced again.
@Suite(.serialized) struct SupervisorTests {
    static var binary: String {
        get throws {
            let path = Components.buildProductsDirectory.appendingPathComponent("vault-proxy").path
            try #require(FileManager.default.isExecutableFile(atPath: path), "vault-proxy is not built at \(path); build with --build-tests")
            return path
        }
    }

    @Test func supervisedProxyServesRestartsAndReannounces() async throws {
        let binary = try Self.binary
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let dir = try TempDir()
        let events = EventCollector()
        let lines = NIOLockedValueBox<[String]>([])
        let logger = Logger(label: "agentd.egress") { _ in CapturingLogHandler(lines: lines) }
        let canary = ProxyFixture.canary
        let supervisor = ProxySupervisor(
            executable: binary, credentials: { ["canary": canary] }, onEgress: { events.receive($0) }, logger: logger)
        try await supervisor.start()
        // Several sandboxes, each with a policy of its own: after a restart every socket must
        // still reach its own sandbox (the descriptors are matched to the right lines).
        let sandboxes = (1...4).map { i in
            SandboxSpec(
                sandbox: "sb-\(i)", session: "sess-\(i)", task: "task-1", policy: "policy-\(i)", socketPath: dir.path + "/sb-\(i)/proxy.sock",
                network: NetworkRules(allowHosts: ["allowed.example"]),
                routes: [RouteRule(name: "echo", upstream: "https://127.0.0.1:\(upstream.port)", credential: "canary", caFile: upstream.ca.caFile)])
        }
        for spec in sandboxes { try await supervisor.addSandbox(spec) }
        try await supervisor.setIntent(sandbox: "sb-1", task: "task-1", seq: 7)
        for spec in sandboxes {
            let mode = try FileManager.default.attributesOfItem(atPath: spec.socketPath)[.posixPermissions] as? Int
            #expect(mode == 0o666, "agentd binds the sandbox's socket 0666 (access is its directory's)")
        }

        let first = try routeGet(sandboxes[0].socketPath)
        #expect(first.hasPrefix("HTTP/1.1 200"), "\(first.prefix(200))")
        #expect(first.contains("[REDACTED:canary]"), "the echoed Authorization header comes back scrubbed")
        for form in canaryForms() { #expect(!first.contains(form)) }
        let allowed = await events.first { $0.type == "egress.allowed" && $0.route == "echo" }
        #expect(allowed.toolIntentSeq == 7 && allowed.credential == "canary" && allowed.session == "sess-1")
        try expectOwnPolicies(sandboxes)
        _ = await events.first { $0.type == "egress.denied" && $0.host.hasPrefix("evil.example") }

        // Killed: the request fails at once and the sockets are gone (fail closed), then it
        // is back with every sandbox.
        let generation = supervisor.generation
        let pid = supervisor.pid
        #expect(pid > 0)
        kill(pid, SIGKILL)
        try expectFailsAtOnce(sandboxes[0].socketPath)
        await supervisor.waitForGeneration(atLeast: generation + 1)
        #expect(supervisor.pid != pid)
        let again = try routeGet(sandboxes[0].socketPath)
        #expect(again.hasPrefix("HTTP/1.1 200") && again.contains("[REDACTED:canary]"), "\(again.prefix(200))")
        try expectOwnPolicies(sandboxes)
        let logged = lines.withLockedValue { $0 }.joined(separator: "\n")
        #expect(logged.contains("vault-proxy exited"))
        for form in canaryForms() { #expect(!logged.contains(form), "no credential in agentd's log") }

        try await supervisor.removeSandbox("sb-1")
        #expect(!FileManager.default.fileExists(atPath: sandboxes[0].socketPath), "removeSandbox takes the listener away")
        await supervisor.stopAndWait()
        #expect(!FileManager.default.fileExists(atPath: sandboxes[1].socketPath), "stop takes every listener away")
        #expect(kill(pid, 0) != 0)
    }

    @Test func startGivesUpOnAProxyThatNeverAnswers() async throws {
        let dir = try TempDir()
        let script = try silentProxy(in: dir.path)
        let supervisor = ProxySupervisor(
            executable: script.path, startTimeout: .seconds(2), credentials: { ["canary": ProxyFixture.canary] }, onEgress: { _ in })
        let began = ContinuousClock.now
        let error = await #expect(throws: (any Error).self) { try await supervisor.start() }
        let waited = ContinuousClock.now - began
        // (How much longer than the deadline it took is the machine's load: `make bench`
        // measures speed, tests do not.)
        #expect(waited >= .seconds(2), "start gave up after \(waited), before its deadline")
        let message = "\(error.map { "\($0)" } ?? "")"
        #expect(message.contains("did not answer its startup messages within 2"), "\(message)")
        let pid = try #require(script.pid(), "the silent proxy never ran")
        #expect(kill(pid, 0) != 0, "the proxy that never answered is stopped")
        #expect(supervisor.pid == 0)
    }
}

/// A stand-in for vault-proxy that starts, writes its pid to `pidFile` and never says a word.
struct SilentProxy {
    let path: String
    let pidFile: String
    func pid() -> pid_t? {
        ((try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? "").split(separator: "\n").first.flatMap { pid_t($0) }
    }
}

func silentProxy(in directory: String) throws -> SilentProxy {
    let path = directory + "/silent-proxy"
    let pidFile = directory + "/silent-proxy.pid"
    try "#!/bin/sh\necho $$ > \(pidFile) 2>/dev/null\nexec sleep 600\n".write(toFile: path, atomically: true, encoding: .utf8)
    chmod(path, 0o755)
    return SilentProxy(path: path, pidFile: pidFile)
}

/// `GET /echo/anything` through a sandbox's socket.
func routeGet(_ socketPath: String) throws -> String {
    try rawExchange(socketPath, Array("GET /echo/anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8), readUntilClose: true)
}

/// Each sandbox's socket reaches that sandbox: a refused CONNECT names its own policy.
func expectOwnPolicies(_ sandboxes: [SandboxSpec]) throws {
    for spec in sandboxes {
        let denied = try rawExchange(spec.socketPath, Array("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".utf8), readUntilClose: true)
        #expect(denied.hasPrefix("HTTP/1.1 403") && denied.contains("refused by policy \(spec.policy):"), "\(spec.sandbox): \(denied.prefix(300))")
    }
}

/// Right after the proxy died a request through `socketPath` fails (refused, or reset when
/// agentd closes the socket), never served.
func expectFailsAtOnce(_ socketPath: String) throws {
    let answer: String
    do { answer = try routeGet(socketPath) } catch { answer = "" }
    #expect(!answer.hasPrefix("HTTP/1.1 200"), "a request went through while the proxy was down")
}

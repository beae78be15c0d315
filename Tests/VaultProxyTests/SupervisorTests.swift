import EgressProxy
import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing
import TestSupport

@testable import VaultProxy

/// agentd's `ProxySupervisor` with the real `vault-proxy` executable: credentials and a
/// sandbox go over the socketpair, requests through the sandbox's socket get the credential
/// injected and scrubbed, events come back; killed with -9, the proxy is gone (nothing goes
/// out), then restarted with the sandbox announced again.
@Suite(.serialized) struct SupervisorTests {
    @Test func supervisedProxyServesRestartsAndReannounces() async throws {
        let binary = Components.buildProductsDirectory.appendingPathComponent("vault-proxy").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "vault-proxy is not built at \(binary); build with --build-tests")
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let dir = try TempDir()
        let socketPath = dir.path + "/sb-1/proxy.sock"
        let events = EventCollector()
        let lines = NIOLockedValueBox<[String]>([])
        let logger = Logger(label: "agentd.egress") { _ in CapturingLogHandler(lines: lines) }
        let canary = ProxyFixture.canary
        let supervisor = ProxySupervisor(
            executable: binary, credentials: { ["canary": canary] }, onEgress: { events.receive($0) }, logger: logger)
        try await supervisor.start()
        defer { supervisor.stop() }
        let spec = SandboxSpec(
            sandbox: "sb-1", session: "sess-1", task: "task-1", policy: "coding-agent", socketPath: socketPath,
            network: NetworkRules(allowHosts: ["allowed.example"]),
            routes: [RouteRule(name: "echo", upstream: "https://127.0.0.1:\(upstream.port)", credential: "canary", caFile: upstream.ca.caFile)])
        try await supervisor.addSandbox(spec)
        try await supervisor.setIntent(sandbox: "sb-1", task: "task-1", seq: 7)

        func get() throws -> String {
            try rawExchange(socketPath, Array("GET /echo/anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8), readUntilClose: true)
        }
        let first = try get()
        #expect(first.hasPrefix("HTTP/1.1 200"), "\(first.prefix(200))")
        #expect(first.contains("[REDACTED:canary]"), "the echoed Authorization header comes back scrubbed")
        for form in canaryForms() { #expect(!first.contains(form)) }
        let allowed = await events.first { $0.type == "egress.allowed" && $0.route == "echo" }
        #expect(allowed.toolIntentSeq == 7 && allowed.credential == "canary" && allowed.session == "sess-1")

        let denied = try rawExchange(socketPath, Array("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".utf8), readUntilClose: true)
        #expect(denied.hasPrefix("HTTP/1.1 403"))
        _ = await events.first { $0.type == "egress.denied" && $0.host.hasPrefix("evil.example") }

        // Killed: nothing listens any more (fail closed), then it is back with the sandbox.
        let generation = supervisor.generation
        let pid = supervisor.pid
        #expect(pid > 0)
        kill(pid, SIGKILL)
        await supervisor.waitForGeneration(atLeast: generation + 1)
        #expect(supervisor.pid != pid)
        let again = try get()
        #expect(again.hasPrefix("HTTP/1.1 200") && again.contains("[REDACTED:canary]"), "\(again.prefix(200))")
        let logged = lines.withLockedValue { $0 }.joined(separator: "\n")
        #expect(logged.contains("vault-proxy exited"))
        for form in canaryForms() { #expect(!logged.contains(form), "no credential in agentd's log") }

        try await supervisor.removeSandbox("sb-1")
        #expect(!FileManager.default.fileExists(atPath: socketPath), "removeSandbox takes the listener away")
    }
}

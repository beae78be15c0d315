import Foundation
import NIOCore
import NIOPosix
import Testing
import TestSupport

@testable import VaultProxy

/// The per-sandbox upstream keep-alive pool, counted at a real HTTPS upstream on loopback. The
/// proxy runs on one event loop here, so every request of a sandbox can reuse its connections
/// (a pooled connection serves only requests on its own event loop).
@Suite(.serialized) struct PoolTests {
    static let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    /// A GET through `socketPath`'s route `echo`; the upstream's JSON echo.
    static func get(_ socketPath: String, _ path: String, _ extra: [String] = []) throws -> (status: Int, doc: [String: Any]?, body: String) {
        let r = try run(["curl", "-sS", "--max-time", "30", "--unix-socket", socketPath, "-w", "\n%{http_code}", "http://127.0.0.1:3128/echo\(path)"] + extra)
        let text = String(decoding: r.out, as: UTF8.self)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let status = Int(lines.last ?? "") ?? 0
        let body = lines.dropLast().joined(separator: "\n")
        let doc = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
        return (status, doc, body)
    }

    /// The upstream's own count of connections that carried a route request (asked directly).
    static func stats(_ upstream: Upstream) throws -> (accepted: Int, open: Int) {
        let r = try run(["curl", "-sS", "--max-time", "30", "--cacert", upstream.ca.caFile, "https://127.0.0.1:\(upstream.port)/stats"])
        let doc = try #require(try JSONSerialization.jsonObject(with: r.out) as? [String: Any])
        return (doc["accepted"] as? Int ?? -1, doc["open"] as? Int ?? -1)
    }

    /// Waits (up to 20 s) until `condition` holds.
    static func eventually(_ what: String, _ condition: () throws -> Bool) async throws {
        let deadline = ContinuousClock.now + .seconds(20)
        while try !condition() {
            guard ContinuousClock.now < deadline else {
                Issue.record("timed out waiting until \(what)")
                return
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    static func peer(_ r: (status: Int, doc: [String: Any]?, body: String)) -> Int { r.doc?["peer"] as? Int ?? -1 }

    @Test func sequentialRequestsOfASandboxReuseOneUpstreamConnection() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop)
        defer { Task { await fixture.shutdown() } }

        let first = try Self.get(fixture.socketPath, "/one")
        let second = try Self.get(fixture.socketPath, "/two")
        let head = try fixture.curl("http://127.0.0.1:3128/echo/three", ["-I"])
        let third = try Self.get(fixture.socketPath, "/four")
        #expect(first.status == 200 && second.status == 200 && head.status == 200 && third.status == 200)
        #expect(Self.peer(first) > 0)
        #expect(Self.peer(second) == Self.peer(first), "the second request went on the first one's connection")
        #expect(Self.peer(third) == Self.peer(first), "a HEAD in between left the connection reusable")
        #expect(try Self.stats(upstream).accepted == 1)
        #expect(fixture.proxy.idleUpstreamConnections(sandbox: "sandbox-1") == 1)
        // Each request still gets its own credential, scrubbing and event.
        #expect(second.body.contains("Bearer [REDACTED:canary]"))
        let event = await fixture.events.first { $0.path == "/two" }
        #expect(event.status == 200 && event.route == "echo" && event.credential == "canary" && event.bytesDown > 0)
    }

    @Test func aConnectionCloseResponseIsNotReused() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop)
        defer { Task { await fixture.shutdown() } }

        let closing = try Self.get(fixture.socketPath, "/close")
        #expect(closing.status == 200 && closing.body == "closing")
        #expect(fixture.proxy.idleUpstreamConnections(sandbox: "sandbox-1") == 0)
        let next = try Self.get(fixture.socketPath, "/after")
        #expect(next.status == 200)
        #expect(try Self.stats(upstream).accepted == 2, "the request after a Connection: close response connected anew")
    }

    @Test func twoSandboxesNeverShareAConnection() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop)
        defer { Task { await fixture.shutdown() } }
        let otherSocket = fixture.dir.path + "/sandbox-2/proxy.sock"
        try await fixture.proxy.addSandbox(
            SandboxSpec(
                sandbox: "sandbox-2", session: "session-2", task: nil, policy: fixture.policy, socketPath: otherSocket,
                network: NetworkRules(allowHosts: [], ports: nil),
                routes: [RouteRule(name: "echo", upstream: "https://127.0.0.1:\(upstream.port)", credential: "canary", caFile: upstream.ca.caFile)]))

        let one = try Self.get(fixture.socketPath, "/a")
        let two = try Self.get(otherSocket, "/b")
        let oneAgain = try Self.get(fixture.socketPath, "/c")
        let twoAgain = try Self.get(otherSocket, "/d")
        #expect([one, two, oneAgain, twoAgain].allSatisfy { $0.status == 200 })
        #expect(Self.peer(two) != Self.peer(one), "sandbox-2 did not get sandbox-1's idle connection")
        #expect(Self.peer(oneAgain) == Self.peer(one))
        #expect(Self.peer(twoAgain) == Self.peer(two))
        #expect(try Self.stats(upstream).accepted == 2)
        #expect(fixture.proxy.idleUpstreamConnections(sandbox: "sandbox-1") == 1)
        #expect(fixture.proxy.idleUpstreamConnections(sandbox: "sandbox-2") == 1)
    }

    @Test func anIdleConnectionTheUpstreamClosesIsDropped() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop)
        defer { Task { await fixture.shutdown() } }

        let dropped = try Self.get(fixture.socketPath, "/drop")
        #expect(dropped.status == 200 && dropped.body == "dropping")
        try await Self.eventually("the upstream has closed its connection") { try Self.stats(upstream).open == 0 }
        try await Self.eventually("the proxy has dropped the closed connection from its pool") {
            fixture.proxy.idleUpstreamConnections(sandbox: "sandbox-1") == 0
        }
        let next = try Self.get(fixture.socketPath, "/next")
        #expect(next.status == 200)
        #expect(Self.peer(next) != Self.peer(dropped))
    }

    @Test func aGetOnAPooledConnectionThatDiesIsRetriedOnceAPostIsNot() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop)
        defer { Task { await fixture.shutdown() } }

        // `/arm`: the upstream closes the connection when its next request comes, unanswered.
        let armed = try Self.get(fixture.socketPath, "/arm")
        #expect(armed.status == 200)
        let retried = try Self.get(fixture.socketPath, "/retried")
        #expect(retried.status == 200, "the GET went again on a fresh connection: \(retried.body)")
        #expect(Self.peer(retried) != Self.peer(armed))
        let event = await fixture.events.first { $0.path == "/retried" }
        #expect(event.status == 200)

        let armedAgain = try Self.get(fixture.socketPath, "/arm")
        #expect(Self.peer(armedAgain) == Self.peer(retried))
        let post = try Self.get(fixture.socketPath, "/posted", ["-X", "POST", "--data", "payload"])
        #expect(post.status == 502, "a POST is never sent twice")
        #expect(post.body.contains("the upstream closed the connection") || post.body.contains("upstream failed"))
        let failed = await fixture.events.first { $0.path == "/posted" }
        #expect(failed.status == 502)
    }

    @Test func removingASandboxClosesItsPooledConnections() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop)
        defer { Task { await fixture.shutdown() } }

        #expect(try Self.get(fixture.socketPath, "/x").status == 200)
        #expect(try Self.stats(upstream).open == 1)
        #expect(fixture.proxy.idleUpstreamConnections(sandbox: "sandbox-1") == 1)
        try await fixture.proxy.removeSandbox("sandbox-1")
        try await Self.eventually("the upstream sees the pooled connection closed") { try Self.stats(upstream).open == 0 }
    }

    @Test func aPoolOfZeroConnectsEveryRequestAnew() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream, group: Self.loop) { $0.idleUpstreamConnectionsPerHost = 0 }
        defer { Task { await fixture.shutdown() } }

        #expect(try Self.get(fixture.socketPath, "/x").status == 200)
        #expect(try Self.get(fixture.socketPath, "/y").status == 200)
        #expect(try Self.stats(upstream).accepted == 2)
        try await Self.eventually("the upstream sees both connections closed") { try Self.stats(upstream).open == 0 }
    }
}

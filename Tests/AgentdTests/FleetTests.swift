import AgentdClient
import AgentdTestSupport
import Foundation
import Synchronization
import Testing
import TestSupport

/// Three real agentd nodes on one machine sharing the environment's PostgreSQL and container
/// engine, each with its own state directory (so its own instance label) and node name.
@Suite("agentd fleet")
struct FleetTests {
    func bash(_ command: String) -> Data { Data(#"{"command": \#(String(reflecting: command))}"#.utf8) }

    @Test("a session driven through node a is served by a from any node (redirects followed); a is killed with -9 and the Brain goes on through b: wake, its call in flight answered outcome unknown, fresh Hands on b said so, no orphan once a's sandboxes are reconciled, verify intact")
    func nodeKilled() async throws {
        let file = try PostgresStoreTests.urlFile()
        let schema = "fleet_" + String((0..<10).map { _ in "abcdefghijklmnopqrstuvwxyz".randomElement()! })
        func arguments(_ node: String) -> [String] {
            ["--store", "postgres", "--store-url-file", file, "--store-schema", schema, "--node", node, "--heartbeat-interval", "250ms", "--node-lease", "2s"]
        }
        let (a, b, c) = (try AgentdProcess(), try AgentdProcess(), try AgentdProcess())
        defer {
            for node in [a, b, c] { node.stop() }
        }
        try await a.start(extraArguments: arguments("a"))
        try await b.start(extraArguments: arguments("b"))
        try await c.start(extraArguments: arguments("c"))

        // Health on any node shows the store and the three live nodes.
        let health = try await b.client.health()
        #expect(health.store?.kind == "postgres" && health.store?.ok == true, "\(String(describing: health.store))")
        let names = try await waitFor { () async throws -> [String]? in
            let nodes = try await b.client.health().nodes ?? []
            return nodes.filter(\.live).count == 3 ? nodes.map(\.name) : nil
        }
        #expect(names == ["a", "b", "c"])

        let id = try await a.client.createSession(policy: "default").id
        let count = "echo run >> runs; wc -l < runs"
        let first = try await a.client.execute(session: id, tool: "bash", input: bash(count), idempotencyKey: "k1")
        #expect(first.output.trimmingCharacters(in: .whitespacesAndNewlines) == "1", "\(first.output)")
        // Through node c: redirected to a, and run in a's sandbox (the count goes on).
        let viaC = try await c.client.execute(session: id, tool: "bash", input: bash(count), idempotencyKey: "k2")
        #expect(viaC.output.trimmingCharacters(in: .whitespacesAndNewlines) == "2", "\(viaC.output)")
        // A streamed execute through c is redirected too: its output streams from a.
        let streamed = Mutex<[UInt8]>([])
        let viaStream = try await c.client.executeStreaming(session: id, tool: "bash", input: bash("echo streamed; wc -l < runs"), idempotencyKey: "k2s") { update in
            if case .output(_, let bytes) = update { streamed.withLock { $0 += bytes } }
        }
        #expect(viaStream.output == "streamed\n2\n", "\(viaStream.output)")
        #expect(String(decoding: streamed.withLock { $0 }, as: UTF8.self) == "streamed\n2\n")
        #expect(try await sandboxes(a.instance, session: id) == 1)
        #expect(try await sandboxes(c.instance, session: id) == 0)

        // A call is in flight on a when a is killed.
        let inFlight = Task { try? await b.client.execute(session: id, tool: "bash", input: bash("sleep 60"), idempotencyKey: "k3") }
        _ = try await waitFor { () async throws -> Bool? in
            try await b.client.events(id).contains { $0.type == "tool.intent" && $0.payload["idempotency_key"]?.stringValue == "k3" } ? true : nil
        }
        a.kill9()
        _ = await inFlight.value

        // The Brain goes on through b: wake, then the same key — answered from the store.
        let lease = try await b.client.wake(id)
        let retried = try await b.client.execute(session: id, tool: "bash", input: bash("sleep 60"), epoch: lease.epoch, idempotencyKey: "k3")
        #expect(retried.isError && retried.output.hasPrefix("outcome unknown: node a stopped"), "\(retried.output)")
        #expect(retried.response.replayed)
        // The task's next call runs on fresh Hands on b, and says so.
        let fresh = try await c.client.execute(session: id, tool: "bash", input: bash(count), epoch: lease.epoch, idempotencyKey: "k4")
        #expect(fresh.output.hasPrefix("[agentd: this call ran on fresh Hands on node b: node a"), "\(fresh.output)")
        #expect(fresh.output.hasSuffix("1\n") || fresh.output.hasSuffix("1"), "a fresh workspace: \(fresh.output)")
        #expect(try await sandboxes(b.instance, session: id) == 1)

        // a's health is seen from the others: dead, missing heartbeats.
        let seen = try await b.client.health().nodes ?? []
        #expect(seen.first { $0.name == "a" }?.live == false && (seen.first { $0.name == "a" }?.missedHeartbeats ?? 0) > 0, "\(seen)")
        let metrics = try await b.client.text("/metrics")
        #expect(metrics.contains("agentd_fleet_node_live{node=\"a\"} 0") && metrics.contains("agentd_fleet_missed_heartbeats{node=\"a\"}"))

        // a comes back: the sandbox it left is reconciled away (the session is b's now).
        #expect(try await sandboxes(a.instance, session: id) == 1)
        try await a.start(extraArguments: arguments("a"))
        #expect(try await sandboxes(a.instance, session: id) == 0)
        // ... and it redirects the session's calls to b.
        let viaA = try await a.client.execute(session: id, tool: "bash", input: bash(count), epoch: lease.epoch, idempotencyKey: "k5")
        #expect(viaA.output.trimmingCharacters(in: .whitespacesAndNewlines) == "2", "\(viaA.output)")

        let events = try await c.client.events(id)
        #expect(events.filter { $0.type == "session.moved" }.count == 1)
        #expect(events.filter { $0.type == "tool.interrupted" }.count == 1)
        let verify = try await a.client.verify(id)
        #expect(verify.intact, "\(verify)")
        for node in [a, b, c] { node.stop() }
        for node in [a, b, c] {
            guard let engine = try? await Components.engine(), !node.instance.isEmpty else { continue }
            for container in (try? await engine.listContainers(labels: ["agentd.instance": node.instance])) ?? [] {
                _ = try? await engine.removeContainer(container.Id)
            }
        }
    }

    @Test("100 sessions driven concurrently across three agentd nodes: each call sent through a random node reaches its session's owner, every key has one intent and one result, no command ran twice, every chain intact")
    func hundredSessions() async throws {
        let file = try PostgresStoreTests.urlFile()
        let schema = "fleet_" + String((0..<10).map { _ in "abcdefghijklmnopqrstuvwxyz".randomElement()! })
        let nodes = try (0..<3).map { _ in try AgentdProcess() }
        defer {
            for node in nodes { node.stop() }
        }
        for (i, node) in nodes.enumerated() {
            try await node.start(extraArguments: [
                "--store", "postgres", "--store-url-file", file, "--store-schema", schema, "--node", "n\(i)", "--max-sandboxes", "40",
            ])
        }
        let clients = nodes.map(\.client)
        let sessions = 100, calls = 2, concurrency = 12
        // Each session: created on one node, then each call sent twice at once through two
        // other nodes (a client retrying too early); the sandbox is released at the end.
        let results = try await withThrowingTaskGroup(of: (String, [String]).self) { group in
            var out: [(String, [String])] = []
            for s in 0..<sessions {
                if s >= concurrency, let done = try await group.next() { out.append(done) }
                group.addTask {
                    let id = try await clients[s % 3].createSession(policy: "default").id
                    var outputs: [String] = []
                    for k in 0..<calls {
                        let command = "echo \(id)-\(k) >> runs; cat runs"
                        async let one = clients[(s + k + 1) % 3].execute(session: id, tool: "bash", input: bash(command), idempotencyKey: "k\(k)")
                        async let two = clients[(s + k + 2) % 3].execute(session: id, tool: "bash", input: bash(command), idempotencyKey: "k\(k)")
                        let (x, y) = try await (one, two)
                        #expect(x.output == y.output && x.response.intentSeq == y.response.intentSeq, "\(x.output) / \(y.output)")
                        outputs.append(x.output)
                    }
                    _ = try await clients[s % 3].post("/v1/sessions/\(id)/tasks/main/end", [:])
                    return (id, outputs)
                }
            }
            for try await done in group { out.append(done) }
            return out
        }
        #expect(results.count == sessions)
        var served = [Int](repeating: 0, count: 3)
        for (id, outputs) in results {
            // Each command ran once, in one sandbox: the file grew by one line per key.
            #expect(outputs == (0..<calls).map { k in (0...k).map { "\(id)-\($0)\n" }.joined() }, "\(id): \(outputs)")
            let events = try await clients[0].events(id)
            let intents = events.filter { $0.type == "tool.intent" }.compactMap { $0.payload["idempotency_key"]?.stringValue }
            let resultsCount = events.filter { $0.type == "tool.result" }.count
            #expect(intents.sorted() == (0..<calls).map { "k\($0)" } && resultsCount == calls, "\(id): intents \(intents), results \(resultsCount)")
            #expect(events.map(\.seq) == Array(1...UInt64(events.count)))
            #expect(try await clients[1].verify(id).intact)
            // Which node provisioned its sandbox (exactly one did).
            let owners = nodes.indices.filter { nodes[$0].log.contains("task=\(id)/main") }
            #expect(owners.count == 1, "\(id) provisioned on nodes \(owners)")
            for i in owners { served[i] += 1 }
        }
        // The sessions spread over the three nodes.
        #expect(served.allSatisfy { $0 > 0 }, "sessions served per node: \(served)")
    }

    /// Polls `probe` every 100 ms until it returns a value (at most 30 s).
    func waitFor<T>(_ probe: () async throws -> T?) async throws -> T {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            if let value = try await probe() { return value }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw Components.Missing(description: "the condition did not hold within 30 s")
    }
}

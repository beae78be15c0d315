import Fleet
import Foundation
import Hands
import Policy
import PostgresNIO
import PostgresStore
import SessionLog
import Synchronization
import Testing

@testable import Runtime

/// Three Runtimes as three nodes of a fleet over one Session store: who serves a session's
/// calls, redirects, a takeover from a dead node (its call in flight answered *outcome
/// unknown*, fresh Hands said so), and 100 sessions driven across the nodes with no event lost
/// and no tool run twice. Each test runs over the file journal with the in-memory registry
/// (fast) and over a real PostgreSQL with the store's registry.
@Suite("Fleet")
struct FleetTests {
    enum Backend: String, CaseIterable, Sendable { case memory, postgres }

    /// Three nodes a, b and c, each a Runtime with its own FakeDriver and FleetNode.
    final class Nodes: Sendable {
        let names = ["a", "b", "c"]
        let runtimes: [Runtime]
        let drivers: [FakeDriver]
        let fleets: [FleetNode]
        let registry: any FleetRegistry
        let dead = Mutex<Set<String>>([])

        let journals: [KillableJournal]

        init(runtimes: [Runtime], drivers: [FakeDriver], fleets: [FleetNode], registry: any FleetRegistry, journals: [KillableJournal]) {
            (self.runtimes, self.drivers, self.fleets, self.registry, self.journals) = (runtimes, drivers, fleets, registry, journals)
        }

        /// Kills node `name` as kill -9 would: from now on it writes nothing to the store and
        /// serves no call (the test's client no longer reaches it), and its lease ends.
        func kill(_ name: String) async throws {
            let i = try #require(names.firstIndex(of: name))
            journals[i].kill()
            dead.withLock { _ = $0.insert(name) }
            await fleets[i].leave()
        }

        /// What agentctl and the Brain do: send to node `start`, follow a redirect to the
        /// owner, and try another node when one does not answer.
        func call<T: Sendable>(_ start: Int, _ body: @Sendable (Runtime) async throws -> T) async throws -> T {
            var index = start % 3
            for _ in 0..<12 {
                if dead.withLock({ $0.contains(names[index]) }) {
                    index = (index + 1) % 3
                    continue
                }
                do {
                    return try await body(runtimes[index])
                } catch where dead.withLock({ $0.contains(names[index]) }) {
                    // It died under the call: to the client, the connection dropped.
                    index = (index + 1) % 3
                } catch let error as RuntimeError where error.code == .elsewhere {
                    let owner = try #require(error.cause as? SessionElsewhere).owner.name
                    index = try #require(names.firstIndex(of: owner))
                }
            }
            throw RuntimeTestFailure("no node served the call")
        }
    }

    /// Runs `body` with three nodes over `backend`, then closes everything.
    func withNodes(_ backend: Backend, _ body: (Nodes) async throws -> Void) async throws {
        let directory = NSTemporaryDirectory() + "agentd-fleet-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory + "/policies", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try policyYAML("default").write(toFile: directory + "/policies/default.yaml", atomically: true, encoding: .utf8)
        let policies = PolicyStore(directory: directory + "/policies")
        let options = SessionStoreOptions(maxEventBytes: Runtime.journalEventCeiling)
        var stores: [any SessionJournal] = []
        let registries: [any FleetRegistry]
        var schema: String?
        switch backend {
        case .memory:
            let store = try await SessionStore.open(directory: directory + "/journal", options: options)
            stores = [store, store, store]
            let registry = MemoryFleetRegistry()
            registries = [registry, registry, registry]
        case .postgres:
            guard let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"] else {
                if ProcessInfo.processInfo.environment["CI"] == "true" {
                    throw RuntimeTestFailure("AGENTD_POSTGRES_URL_FILE is not set: run scripts/env-up and source .agentd-env/env")
                }
                return
            }
            let name = "fleet_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(16)
            schema = String(name)
            for _ in 0..<3 { stores.append(try await PostgresJournal.open(urlFile: file, schema: String(name), options: options)) }
            registries = stores.map { PostgresFleetRegistry(journal: $0 as! PostgresJournal) }
        }
        let journals = stores.map(KillableJournal.init)
        let drivers = (0..<3).map { _ in FakeDriver() }
        var fleets: [FleetNode] = []
        var runtimes: [Runtime] = []
        for (i, name) in ["a", "b", "c"].enumerated() {
            let fleet = try FleetNode(
                registration: NodeRegistration(
                    name: name, address: "unix:///run/agentd-\(name).sock", instance: "fleet-\(name)", interval: .seconds(1), lease: .seconds(120)),
                registry: registries[i])
            try await fleet.beat()
            fleets.append(fleet)
            runtimes.append(Runtime(store: journals[i], hands: HandsManager(driver: drivers[i], instance: "fleet-\(name)"), policies: policies, fleet: fleet))
        }
        let nodes = Nodes(runtimes: runtimes, drivers: drivers, fleets: fleets, registry: registries[0], journals: journals)
        var failure: (any Error)?
        do { try await body(nodes) } catch { failure = error }
        for d in drivers { d.release() }
        if let schema, let pg = stores.first as? PostgresJournal {
            _ = try? await pg.client.query("DROP SCHEMA \(unescaped: schema) CASCADE")
        }
        if backend == .memory {
            try await stores[0].close()
        } else {
            for s in stores { try await s.close() }
        }
        if let failure { throw failure }
    }

    @Test("one node serves a session's calls; another redirects to it; a dead owner's session is taken over on fresh Hands, its call in flight answered outcome unknown", arguments: Backend.allCases)
    func takeover(_ backend: Backend) async throws {
        try await withNodes(backend) { nodes in
            let (a, b, c) = (nodes.runtimes[0], nodes.runtimes[1], nodes.runtimes[2])
            let id = try await a.createSession(policy: nil).id
            let first = try await a.execute(session: id, tool: "bash", input: bash("echo one"), idempotencyKey: "k1")
            #expect(first.result.output == "echo one" && nodes.drivers[0].runs("echo one") == 1)

            // Node b does not run it: it names the owner.
            var redirect: SessionElsewhere?
            do {
                _ = try await b.execute(session: id, tool: "bash", input: bash("echo two"), idempotencyKey: "k2")
            } catch let error as RuntimeError where error.code == .elsewhere {
                redirect = error.cause as? SessionElsewhere
            }
            #expect(redirect?.owner.name == "a" && redirect?.owner.address == "unix:///run/agentd-a.sock")
            #expect(nodes.drivers[1].totalRuns == 0)
            // Reads and wake are served by every node.
            #expect(try await b.summary(id).last_seq == first.result_seq)
            let lease = try await b.wake(id)
            #expect(lease.epoch == 1)

            // A call is in flight on node a when a dies.
            let inFlight = Task { try await a.execute(session: id, tool: "bash", input: bash("hold on"), epoch: 1, idempotencyKey: "k3") }
            await nodes.drivers[0].waitUntilHolding()
            try await nodes.kill("a")

            // The Brain retries it through node b: answered from the store, not run again.
            let retried = try await nodes.call(1) { try await $0.execute(session: id, tool: "bash", input: bash("hold on"), epoch: 1, idempotencyKey: "k3") }
            #expect(retried.result.isError && retried.result.output.hasPrefix("outcome unknown: node a stopped"), "\(retried.result.output)")
            #expect(nodes.drivers[1].runs("hold on") == 0)
            // The task's next call runs on fresh Hands on b, and says so.
            let next = try await nodes.call(2) { try await $0.execute(session: id, tool: "bash", input: bash("echo three"), epoch: 1, idempotencyKey: "k4") }
            #expect(next.result.output.hasPrefix("[agentd: this call ran on fresh Hands on node b: node a"), "\(next.result.output)")
            #expect(next.result.output.hasSuffix("echo three") && nodes.drivers[1].runs("echo three") == 1)
            let after = try await b.execute(session: id, tool: "bash", input: bash("echo four"), epoch: 1, idempotencyKey: "k5")
            #expect(after.result.output == "echo four", "the notice comes once")
            // Node c now redirects to b.
            #expect(await runtimeErrorCode { _ = try await c.execute(session: id, tool: "bash", input: bash("echo five"), epoch: 1) } == .elsewhere)

            var types: [String] = []
            for try await e in try await b.events(id, after: 0, follow: false) { types.append(e.type) }
            #expect(types.filter { $0 == EventType.sessionMoved }.count == 1)
            #expect(types.filter { $0 == EventType.toolInterrupted }.count == 1)
            #expect(try await c.verify(id).isIntact)
            nodes.drivers[0].release()
            _ = try? await inFlight.value
        }
    }

    @Test("a node that lost a session while its call ran does not journal that call's result after the new owner settled it outcome unknown: the database refuses the second settling event, and the node answers with the journaled one")
    func lostSessionDoesNotSettleTwice() async throws {
        try await withNodes(.postgres) { nodes in
            let (a, b) = (nodes.runtimes[0], nodes.runtimes[1])
            let id = try await a.createSession(policy: nil).id
            _ = try await a.execute(session: id, tool: "bash", input: bash("echo one"), idempotencyKey: "k1")
            // A call runs on a; a stops heartbeating (as a node cut off from the store for its
            // lease would) but its journal still reaches the store.
            let inFlight = Task { try await a.execute(session: id, tool: "bash", input: bash("hold on"), idempotencyKey: "k2") }
            await nodes.drivers[0].waitUntilHolding()
            await nodes.fleets[0].leave()
            // b takes the session over and settles the call in flight: outcome unknown.
            let retried = try await b.execute(session: id, tool: "bash", input: bash("hold on"), idempotencyKey: "k2")
            #expect(retried.result.isError && retried.result.output.hasPrefix("outcome unknown: node a stopped"), "\(retried.result.output)")
            // The call ends on a: its result is refused by the store; a answers what is journaled.
            nodes.drivers[0].release()
            let late = try await inFlight.value
            #expect(late.replayed && late.result_seq == retried.result_seq && late.result.output == retried.result.output, "\(late)")
            var settling: [String] = []
            for try await e in try await b.events(id, after: late.intent_seq, follow: false)
            where e.type == EventType.toolResult || e.type == EventType.toolInterrupted {
                settling.append(e.type)
            }
            #expect(settling == [EventType.toolInterrupted], "one settling event for the intent: \(settling)")
            #expect(nodes.drivers[0].runs("hold on") == 1 && nodes.drivers[1].runs("hold on") == 0)
            #expect(try await b.verify(id).isIntact)
        }
    }

    @Test("100 sessions driven concurrently across three nodes, one killed half-way: no event lost or duplicated, no tool run twice", arguments: Backend.allCases)
    func hundredSessions(_ backend: Backend) async throws {
        try await withNodes(backend) { nodes in
            let sessions = 100, calls = 4
            let tally = Tally()
            try await withThrowingTaskGroup(of: String.self) { group in
                for s in 0..<sessions {
                    group.addTask {
                        let id = try await nodes.call(s) { try await $0.createSession(policy: nil).id }
                        for k in 0..<calls {
                            let command = "echo \(id)-\(k)"
                            // Each call is sent twice at once, through two nodes (a client that
                            // retried too early): it runs once, both get its result.
                            async let one = nodes.call(s + k) { try await $0.execute(session: id, tool: "bash", input: bash(command), idempotencyKey: "k\(k)") }
                            async let two = nodes.call(s + k + 1) { try await $0.execute(session: id, tool: "bash", input: bash(command), idempotencyKey: "k\(k)") }
                            let (x, y) = try await (one, two)
                            #expect(x.result == y.result && x.intent_seq == y.intent_seq)
                            tally.answers.withLock { $0["\(id)/k\(k)"] = x.result.output }
                        }
                        if tally.done.add(1, ordering: .relaxed).newValue == sessions / 2 { try await nodes.kill("c") }
                        return id
                    }
                }
                var ids: [String] = []
                for try await id in group { ids.append(id) }
                #expect(ids.count == sessions)
                for id in ids {
                    var seqs: [UInt64] = []
                    var intents: [String: Int] = [:]
                    for try await e in try await nodes.call(0, { try await $0.events(id, after: 0, follow: false) }) {
                        seqs.append(e.seq)
                        if e.type == EventType.toolIntent, let intent = try? JSONDecoder().decode(ToolIntent.self, from: Data(e.payload)) {
                            intents[intent.idempotency_key ?? "", default: 0] += 1
                        }
                    }
                    #expect(seqs == Array(1...UInt64(seqs.count)), "session \(id): seqs without gaps or repeats")
                    #expect(intents.count == calls && intents.values.allSatisfy { $0 == 1 }, "session \(id): one intent per key: \(intents)")
                    if !intents.values.allSatisfy({ $0 == 1 }) {
                        for try await e in try await nodes.call(0, { try await $0.events(id, after: 0, follow: false) }) { print("events of \(id): \(e.seq) \(e.type) \(e.payloadText.prefix(150))") }
                    }
                    #expect(try await nodes.runtimes[0].verify(id).isIntact)
                    for k in 0..<calls {
                        let command = "echo \(id)-\(k)"
                        let runs = nodes.drivers.map { $0.runs(command) }.reduce(0, +)
                        let answer = tally.answers.withLock { $0["\(id)/k\(k)"] } ?? ""
                        if answer.hasPrefix("outcome unknown: node c stopped") {
                            // In flight on c when it died: run there once, or not at all.
                            #expect(runs <= 1, "\(command) ran \(runs) times")
                        } else {
                            #expect(runs == 1, "\(command) ran \(runs) times: \(nodes.drivers.map { $0.runs(command) })")
                            #expect(answer.hasSuffix(command), "\(answer)")
                        }
                    }
                }
            }
            // The sessions spread over the nodes (c may have served few before it died).
            let perNode = nodes.drivers.map(\.totalRuns)
            #expect(perNode.filter { $0 > 0 }.count >= 2, "tools run per node: \(perNode)")
        }
    }
}

/// What the drivers of 100 sessions saw.
final class Tally: Sendable {
    let answers = Mutex<[String: String]>([:])
    let done = Atomic<Int>(0)
}

/// A node's view of the Session store that a test can kill: after `kill()` every write fails,
/// as nothing reaches the store from a process killed with -9.
final class KillableJournal: SessionJournal, Sendable {
    let base: any SessionJournal
    private let killed = Atomic<Bool>(false)

    init(_ base: any SessionJournal) { self.base = base }

    func kill() { killed.store(true, ordering: .sequentiallyConsistent) }

    private func alive() throws {
        if killed.load(ordering: .sequentiallyConsistent) { throw SessionLogError(.closed, "this node was killed") }
    }

    var redactor: Redactor { base.redactor }
    func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64?) async throws -> UInt64 {
        try alive()
        let seq = try await base.append(session: session, type: type, payload: payload, epoch: epoch)
        try alive()
        return seq
    }
    func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64?, settling intent: UInt64) async throws -> UInt64 {
        try alive()
        return try await base.append(session: session, type: type, payload: payload, epoch: epoch, settling: intent)
    }

    func checkpoint(session: SessionID, state: [UInt8], epoch: UInt64?) async throws -> UInt64 {
        try alive()
        return try await base.checkpoint(session: session, state: state, epoch: epoch)
    }
    func wake(session: SessionID) async throws -> Lease {
        try alive()
        return try await base.wake(session: session)
    }
    func event(session: SessionID, seq: UInt64) async throws -> Event? { try await base.event(session: session, seq: seq) }
    func events(session: SessionID, after: UInt64) -> EventSequence { base.events(session: session, after: after) }
    func follow(session: SessionID, after: UInt64) -> EventSequence { base.follow(session: session, after: after) }
    func getSession(_ session: SessionID) async throws -> SessionSnapshot { try await base.getSession(session) }
    func verify(session: SessionID) async throws -> VerifyReport { try await base.verify(session: session) }
    func sessions() async throws -> [SessionID] { try await base.sessions() }
    func lastSeq(session: SessionID) async throws -> UInt64 { try await base.lastSeq(session: session) }
    func leaseEpoch(session: SessionID) async throws -> UInt64 { try await base.leaseEpoch(session: session) }
    func close() async throws {}
}

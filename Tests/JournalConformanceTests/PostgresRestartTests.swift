import Foundation
import NIOCore
import PostgresNIO
import Synchronization
import Testing
import TestSupport

@testable import PostgresStore
@testable import SessionLog

/// A PostgreSQL 15 cluster of the test's own (initdb, pg_ctl), on 127.0.0.1 and a free port,
/// so that it can be restarted and stopped without disturbing anything else.
final class PrivateCluster: Sendable {
    static let bin = "/usr/lib/postgresql/15/bin"
    let directory: String
    let port: Int
    let password = "pw-\(UUID().uuidString)"
    /// More server options (`-c name=value …`), e.g. TLS.
    let serverOptions: String

    var data: String { directory + "/data" }
    var url: PostgresURL { try! PostgresURL(parsing: "postgres://agentd:\(password)@127.0.0.1:\(port)/agentd") }

    /// Creates and starts the cluster with a role and database `agentd` (password login);
    /// without PostgreSQL 15 installed this fails under `CI=true` and returns nil otherwise.
    /// - Parameter prepare: runs after initdb, before the first start (the data directory exists).
    static func start(serverOptions: String = "", prepare: (PrivateCluster) throws -> Void = { _ in }) throws -> PrivateCluster? {
        guard FileManager.default.isExecutableFile(atPath: bin + "/initdb") else {
            let missing = Components.Missing(description: "PostgreSQL 15 is not installed (\(bin)/initdb); scripts/env-up installs it")
            if ProcessInfo.processInfo.environment["CI"] == "true" { throw missing }
            print("note: \(missing); the restart test is skipped")
            return nil
        }
        let cluster = PrivateCluster(directory: "/tmp/agentd-pgrestart-\(Components.testID())", port: try Loopback.freePort(), serverOptions: serverOptions)
        try FileManager.default.createDirectory(atPath: cluster.directory + "/run", withIntermediateDirectories: true)
        if getuid() == 0 { try TestCommand.check(["chown", "-R", "postgres:postgres", cluster.directory]) }
        try cluster.asPostgres(["initdb", "-D", cluster.data, "--auth-local=trust", "--auth-host=scram-sha-256", "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8"])
        try prepare(cluster)
        try cluster.pgctl(["start"])
        try cluster.asPostgres([
            "psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.directory + "/run", "-p", "\(cluster.port)", "-U", "postgres", "-d", "postgres",
            "-c", "CREATE ROLE agentd LOGIN PASSWORD '\(cluster.password)'", "-c", "CREATE DATABASE agentd OWNER agentd",
        ])
        return cluster
    }

    private init(directory: String, port: Int, serverOptions: String) { (self.directory, self.port, self.serverOptions) = (directory, port, serverOptions) }

    /// Runs a PostgreSQL tool as the `postgres` user (initdb refuses root).
    @discardableResult
    func asPostgres(_ argv: [String]) throws -> String {
        let tool = Self.bin + "/" + argv[0]
        let rest = Array(argv.dropFirst())
        return try TestCommand.check(getuid() == 0 ? ["runuser", "-u", "postgres", "--", tool] + rest : [tool] + rest)
    }

    /// `pg_ctl ACTION` (start, stop, restart) with this cluster's options; waits for it.
    func pgctl(_ action: [String]) throws {
        try asPostgres(
            ["pg_ctl", "-D", data, "-l", directory + "/postgres.log", "-w", "-t", "60", "-o", "-p \(port) -k \(directory)/run -c listen_addresses=127.0.0.1 \(serverOptions)"] + action)
    }

    func stop() {
        try? pgctl(["stop", "-m", "immediate"])
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// What the writers saw: every seq an append returned (with its payload) and every error.
final class Observed: Sendable {
    struct State {
        var acknowledged: [SessionID: [(seq: UInt64, payload: [UInt8])]] = [:]
        var errors: [SessionLogError] = []
        var delivered: [UInt64] = []
    }
    let state = Mutex(State())
    let stop = Atomic<Bool>(false)

    func count(_ id: SessionID) -> Int { state.withLock { $0.acknowledged[id]?.count ?? 0 } }
    var minimum: Int { state.withLock { s in s.acknowledged.values.map(\.count).min() ?? 0 } }
    /// Per session the appends acknowledged, and the errors so far (for a failure message).
    var describe: String {
        state.withLock { s in "(acknowledged: \(s.acknowledged.map { "\($0.key): \($0.value.count)" }.sorted()); errors: \(s.errors.map(\.message)))" }
    }
}

/// Waits (polling a condition, not a fixed time) until `condition` holds, failing after `seconds`.
func waitUntil(_ what: String, seconds: Double = 90, state: () -> String = { "" }, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while !condition() {
        guard ContinuousClock.now < deadline else { throw Components.Missing(description: "timed out after \(Int(seconds)) s waiting until \(what) \(state())") }
        try await Task.sleep(for: .milliseconds(10))
    }
}

/// A writer: appends to its session with its lease until told to stop; an error is recorded
/// and the append tried again (a new event).
func write(_ journal: PostgresJournal, _ lease: Lease, _ observed: Observed) async {
    var n = 0
    while !observed.stop.load(ordering: .relaxed) {
        n += 1
        let payload = Array("{\"n\":\(n)}".utf8)
        do {
            let seq = try await journal.append(session: lease.session, type: "tick", payload: payload, epoch: lease.epoch)
            observed.state.withLock { $0.acknowledged[lease.session, default: []].append((seq, payload)) }
        } catch let e as SessionLogError {
            observed.state.withLock { $0.errors.append(e) }
            try? await Task.sleep(for: .milliseconds(20))
        } catch {
            observed.state.withLock { $0.errors.append(SessionLogError(.ioError, "not a SessionLogError: \(error)")) }
        }
    }
}

@Suite("PostgreSQL restarted under the journal", .serialized)
struct PostgresRestartTests {
    @Test("writers keep appending across `pg_ctl restart -m fast`: in-flight appends fail with a clear error naming the server (no password) or are found stored, appends work again without reopening the journal, every acknowledged seq is in the database with the chain intact, and a follow resumes",
        .timeLimit(.minutes(3)))
    func appendsSurviveAFastRestart() async throws {
        try await writeThroughOutages(stopAndStart: false)
    }

    @Test(
        "the same across a stop, a 2 s pause and a start",
        .timeLimit(.minutes(3)))
    func appendsSurviveAStopAndStart() async throws {
        try await writeThroughOutages(stopAndStart: true)
    }

    func writeThroughOutages(stopAndStart: Bool) async throws {
        guard let cluster = try PrivateCluster.start() else { return }
        defer { cluster.stop() }
        let journal = try await PostgresJournal.open(url: cluster.url, schema: "restart", maximumConnections: 8)
        let ids = try (0..<4).map { try SessionID("writer-\($0)") }
        var woken: [Lease] = []
        for id in ids { woken.append(try await journal.wake(session: id)) }
        let leases = woken
        let observed = Observed()
        let follower = Task {
            for try await e in journal.follow(session: ids[0]) { observed.state.withLock { $0.delivered.append(e.seq) } }
        }
        let writers = Task {
            await withTaskGroup(of: Void.self) { group in
                for lease in leases { group.addTask { await write(journal, lease, observed) } }
            }
        }
        try await waitUntil("every writer has 30 acknowledged appends") { observed.minimum >= 30 }

        // 1. A fast restart.
        let before = observed.minimum
        try cluster.pgctl(["restart", "-m", "fast"])
        try await waitUntil("every writer has appended 30 more after the restart", seconds: 45, state: { observed.describe }) { observed.minimum >= before + 30 }

        var duringOutage = 0
        if stopAndStart {
            // 2. Down for a while, then started again.
            try cluster.pgctl(["stop", "-m", "fast"])
            let down = observed.minimum
            try await Task.sleep(for: .seconds(2))  // the outage itself, not a wait for an event
            duringOutage = observed.minimum - down
            try cluster.pgctl(["start"])
            try await waitUntil("every writer has appended 30 more after the start") { observed.minimum >= down + 30 }
        }
        observed.stop.store(true, ordering: .relaxed)
        await writers.value

        // The follower delivers an event appended after both outages.
        let last = try await journal.append(session: ids[0], type: "tick", payload: Array("{\"last\":true}".utf8), epoch: leases[0].epoch)
        try await waitUntil("the follower delivered seq \(last)") { observed.state.withLock { $0.delivered.last ?? 0 } >= last }
        follower.cancel()
        let delivered = observed.state.withLock { $0.delivered }
        #expect(delivered == Array(1...last), "the follow delivered every event once, in order")

        let state = observed.state.withLock { $0 }
        print("restart test: \(state.acknowledged.values.map(\.count).reduce(0, +)) appends acknowledged, \(state.errors.count) failed, \(duringOutage) acknowledged while the server was down")
        for e in state.errors {
            #expect(e.code == .ioError, "\(e)")
            #expect(e.message.contains("127.0.0.1:\(cluster.port)"), "the error names the server: \(e.message)")
            #expect(e.message.contains("retry") || e.message.contains("read the session"), "the error says what to do: \(e.message)")
            #expect(!e.message.contains(cluster.password))
        }
        for e in Set(state.errors.map(\.message)).prefix(5) { print("restart test error: \(e)") }
        for id in ids {
            for (seq, payload) in state.acknowledged[id] ?? [] {
                let stored = try await journal.event(session: id, seq: seq)
                #expect(stored?.payload == payload, "acknowledged seq \(seq) of \(id) is in the database")
            }
            let report = try await journal.verify(session: id)
            #expect(report.isIntact, "\(report)")
        }
        try await journal.close()
    }

    @Test("an append whose connection is killed while its statement waits is answered clearly (it was not stored), the next append takes the next seq on the same journal and the chain stays intact; one that committed before its connection went is reported as stored")
    func connectionKilledMidAppend() async throws {
        guard let cluster = try PrivateCluster.start() else { return }
        defer { cluster.stop() }
        let journal = try await PostgresJournal.open(url: cluster.url, schema: "killed", maximumConnections: 4)
        let id = try SessionID("victim")
        let lease = try await journal.wake(session: id)
        try await journal.append(session: id, type: "a", payload: Array("{}".utf8), epoch: lease.epoch)

        // Another session holds the row lock: the journal's append is sent and waits on it.
        let blocker = try await PostgresConnection.connect(
            configuration: .init(host: "127.0.0.1", port: cluster.port, username: "agentd", password: cluster.password, database: "agentd", tls: .disable),
            id: 99, logger: journal.logger)
        try await blocker.query("BEGIN", logger: journal.logger)
        try await blocker.query("SELECT 1 FROM killed.sessions WHERE session_id = 'victim' FOR UPDATE", logger: journal.logger)
        let pending = Task { try await journal.append(session: id, type: "b", payload: Array("{\"x\":1}".utf8), epoch: lease.epoch) }
        // Kill the backend that is waiting for the lock, once it does.
        var killed = false
        let deadline = ContinuousClock.now + .seconds(60)
        while !killed {
            guard ContinuousClock.now < deadline else {
                pending.cancel()
                Issue.record("the append never waited on the row lock")
                break
            }
            let rows = try await blocker.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = 'agentd' AND wait_event_type = 'Lock'", logger: journal.logger)
            for try await ok in rows.decode(Bool.self) where ok { killed = true }
            if !killed { try await Task.sleep(for: .milliseconds(10)) }
        }
        try await blocker.query("ROLLBACK", logger: journal.logger)
        try await blocker.close()
        do {
            let seq = try await pending.value
            Issue.record("the append whose backend was killed returned seq \(seq)")
        } catch let e as SessionLogError {
            #expect(e.code == .ioError)
            #expect(e.message.contains("was not stored"), "\(e.message)")
            #expect(e.message.contains("127.0.0.1:\(cluster.port)"))
            #expect(!e.message.contains(cluster.password))
        }
        let next = try await journal.append(session: id, type: "c", payload: Array("{}".utf8), epoch: lease.epoch)
        #expect(next == 3)
        #expect(try await journal.verify(session: id).isIntact)

        // An append that committed before the connection went: the lookup finds it.
        let stored = try #require(try await journal.event(session: id, seq: next))
        let hash = JournalChain.hash(
            session: id, seq: next, epoch: stored.epoch, timestampNanos: stored.timestampNanos, type: Array(stored.type.utf8), payload: stored.payload,
            prevHash: try await headHash(journal, id, before: next))
        #expect(try await journal.resolveUnknownOutcome(id, seq: next, hash: hash, what: "append", error: SessionLogError(.ioError, "connection lost (simulated)")))
        try await journal.close()
    }

    /// The stored hash of the record before `seq`.
    func headHash(_ journal: PostgresJournal, _ id: SessionID, before seq: UInt64) async throws -> [UInt8] {
        let rows = try await journal.client.query("SELECT hash FROM \(unescaped: journal.schema).events WHERE session_id = \(id.rawValue) AND seq = \(Int64(seq - 1))")
        for try await h in rows.decode(ByteBuffer.self) { return Array(h.readableBytesView) }
        return JournalChain.zeroHash
    }
}

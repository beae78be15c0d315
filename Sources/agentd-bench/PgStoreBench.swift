import Foundation
import Logging
import NIOCore
import PostgresNIO
import PostgresStore
import SessionLog

/// The PostgreSQL Session store (issue 14): baselines first — bare statements through the same
/// driver and pool — then the store, the file journal next to it, and the ratios.
///
/// - `pg.bare.txn.*`: `BEGIN; INSERT …; COMMIT` of an event-sized row into a table keyed like
///   `events`, without the session row, the lock or the hash: the ceiling of a transactional
///   append through postgres-nio.
/// - `pg.bare.autocommit.*`: one `INSERT` committed on its own (one round trip), for reference.
/// - `pgstore.*`: `PostgresJournal.append`; 64 writers on 64 sessions, and on one session.
/// - `pgstore.follow.nodes2.*`: from an append on one journal to its delivery to a follower on
///   another journal of the same schema (two nodes in one process).
/// - `pgstore.replay.rate`: `events(session:)` over 1 000 000 events of one session
///   (`AGENTD_BENCH_PG_REPLAY_EVENTS` for another count).
///
/// Needs `AGENTD_POSTGRES_URL_FILE` (`make env` writes it). Uses a schema of its own, dropped
/// at the end.
enum PgStoreBench {
    static let writers = 64
    static let replayEvents = ProcessInfo.processInfo.environment["AGENTD_BENCH_PG_REPLAY_EVENTS"].flatMap(Int.init).map { max(1000, $0) } ?? 1_000_000

    static func run(_ report: Reporter) async throws {
        guard let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"] else {
            throw BenchError("pgstore: AGENTD_POSTGRES_URL_FILE is not set; run `make env` (scripts/env-up) and source .agentd-env/env")
        }
        let schema = "bench_\(getpid())"
        let store = try await PostgresJournal.open(urlFile: file, schema: schema, maximumConnections: writers + 1)
        let client = store.client
        let payload = Array("{\"tool\":\"bash\",\"input\":\"\(String(repeating: "x", count: JournalBench.eventBytes - 28))\"}".utf8)
        let payloadBuffer = ByteBuffer(bytes: payload)
        try await client.query("CREATE TABLE \(unescaped: schema).bare (session_id text NOT NULL, seq bigint NOT NULL, payload bytea NOT NULL, PRIMARY KEY (session_id, seq))")
        let counter = SeqCounter()

        @Sendable func bareTxn(_ session: String) async throws {
            let seq = counter.next()
            _ = try await client.withTransaction(logger: Self.quiet) { conn in
                try await conn.query("INSERT INTO \(unescaped: schema).bare VALUES (\(session), \(seq), \(payloadBuffer))", logger: Self.quiet)
            }
        }
        @Sendable func bareAutocommit(_ session: String) async throws {
            let seq = counter.next()
            try await client.query("INSERT INTO \(unescaped: schema).bare VALUES (\(session), \(seq), \(payloadBuffer))")
        }

        // Single writer, paired rounds: bare transaction, autocommit insert, store append.
        let one = try SessionID("pg-single")
        for _ in 0..<50 {
            try await store.append(session: one, type: "tool.intent", payload: payload)
            try await bareTxn("warm")
        }
        var txn: [Double] = [], auto: [Double] = [], append: [Double] = []
        for _ in 0..<8 {
            for _ in 0..<125 {
                var t0 = now()
                try await bareTxn("single")
                txn.append((now() - t0) * 1e6)
                t0 = now()
                try await bareAutocommit("single")
                auto.append((now() - t0) * 1e6)
                t0 = now()
                try await store.append(session: one, type: "tool.intent", payload: payload)
                append.append((now() - t0) * 1e6)
            }
        }
        txn.sort()
        auto.sort()
        append.sort()
        report.figure("pg.bare.txn.p50", percentile(txn, 50), "us")
        report.figure("pg.bare.txn.p99", percentile(txn, 99), "us")
        report.figure("pg.bare.autocommit.p50", percentile(auto, 50), "us")
        report.figure("pg.bare.autocommit.p99", percentile(auto, 99), "us")

        // 64 writers, alternating rounds of the bare loops and the store.
        let ids = try (0..<writers).map { try SessionID("pg-\($0)") }
        var bareMany = Tally(), autoMany = Tally(), storeMany = Tally(), storeOne = Tally()
        for _ in 0..<3 {
            bareMany.add(try await concurrently(writers, seconds: 1) { w in try await bareTxn("w\(w)") })
            autoMany.add(try await concurrently(writers, seconds: 1) { w in try await bareAutocommit("a\(w)") })
            storeMany.add(try await concurrently(writers, seconds: 1) { w in try await store.append(session: ids[w], type: "tool.result", payload: payload) })
            storeOne.add(try await concurrently(writers, seconds: 0.5) { _ in try await store.append(session: one, type: "tool.result", payload: payload) })
        }
        report.figure("pg.bare.txn.writers64.rate", bareMany.rate, "events/s")
        report.figure("pg.bare.autocommit.writers64.rate", autoMany.rate, "events/s")

        report.figure("pgstore.append.p50", percentile(append, 50), "us")
        report.figure("pgstore.append.p99", percentile(append, 99), "us")
        report.figure("pgstore.writers64.rate", storeMany.rate, "events/s")
        report.figure("pgstore.writers64.onesession.rate", storeOne.rate, "events/s")
        guard try await store.verify(session: one).isIntact, try await store.verify(session: ids[0]).isIntact else {
            throw BenchError("pgstore: a chain written by the benchmark does not verify")
        }

        // Follow latency across nodes: a second journal on the same schema (node B) follows a
        // session that node A appends to, one event at a time; from the start of A's append to
        // B's delivery (NOTIFY after the commit, then B's read).
        let nodeB = try await PostgresJournal.open(urlFile: file, schema: schema)
        let followed = try SessionID("pg-follow")
        try await store.append(session: followed, type: "start", payload: payload)
        let (arrivals, tell) = AsyncStream.makeStream(of: UInt64.self)
        let follower = Task {
            for try await e in nodeB.follow(session: followed, after: 0) { tell.yield(e.seq) }
        }
        var arrived = arrivals.makeAsyncIterator()
        _ = await arrived.next()  // B has listened and delivered seq 1
        var followLatencies: [Double] = []
        for _ in 0..<300 {
            let t0 = now()
            let seq = try await store.append(session: followed, type: "tool.result", payload: payload)
            while let s = await arrived.next(), s < seq {}
            followLatencies.append((now() - t0) * 1e6)
        }
        follower.cancel()
        try await nodeB.close()
        followLatencies.sort()
        report.figure("pgstore.follow.nodes2.p50", percentile(followLatencies, 50), "us")
        report.figure("pgstore.follow.nodes2.p99", percentile(followLatencies, 99), "us")

        // The file journal next to it (same payload, same shape).
        let dir = NSTemporaryDirectory() + "agentd-pgstore-bench-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let journal = try await SessionStore.open(directory: dir)
        var fileAppend: [Double] = []
        for _ in 0..<1000 {
            let t0 = now()
            try await journal.append(session: one, type: "tool.intent", payload: payload)
            fileAppend.append((now() - t0) * 1e6)
        }
        fileAppend.sort()
        let fileMany = try await concurrently(writers, seconds: 1) { w in try await journal.append(session: ids[w], type: "tool.result", payload: payload) }
        try await journal.close()
        report.figure("file.append.p50", percentile(fileAppend, 50), "us")
        report.figure("file.append.p99", percentile(fileAppend, 99), "us")
        report.figure("file.writers64.rate", fileMany.events / fileMany.seconds, "events/s")

        // Replay of a long session, through the public async sequence.
        let long = try SessionID("pg-replay")
        let fill = try await timed { try await bulkFill(store, session: long, events: replayEvents, payload: payload) }
        report.figure("pgstore.replay.fill.rate", Double(replayEvents) / fill.seconds, "events/s")
        let replay = try await timed { () async throws -> Int in
            var n = 0
            for try await e in store.events(session: long) { n += e.seq > 0 ? 1 : 0 }
            return n
        }
        guard replay.value == replayEvents else { throw BenchError("pgstore: replay returned \(replay.value) events, expected \(replayEvents)") }
        report.figure("pgstore.replay.events", Double(replayEvents), "events")
        report.figure("pgstore.replay.rate", Double(replayEvents) / replay.seconds, "events/s")

        _ = try? await client.query("DROP SCHEMA \(unescaped: schema) CASCADE")
        try await store.close()

        report.ratio("ratio.pgstore.writers64.vs.bare.txn", "pgstore.writers64.rate", over: "pg.bare.txn.writers64.rate", goal: ">= 0.8")
        report.ratio("ratio.pgstore.writers64.vs.bare.autocommit", "pgstore.writers64.rate", over: "pg.bare.autocommit.writers64.rate", goal: "(reference: one round trip per event)")
        report.ratio("ratio.pgstore.append.p50.vs.bare.txn", "pgstore.append.p50", over: "pg.bare.txn.p50", goal: "(reference)")
        report.ratio("ratio.pgstore.writers64.vs.file", "pgstore.writers64.rate", over: "file.writers64.rate", goal: "(reference: the embedded default)")
        report.ratio("ratio.pgstore.append.p50.vs.file", "pgstore.append.p50", over: "file.append.p50", goal: "(reference)")
    }

    static let quiet = Logger(label: "agentd.bench.pg", factory: { _ in SwiftLogNoOpLogHandler() })

    /// Writes `events` chained events of `session` straight into the store's tables, 1000 rows
    /// per statement (a replay source made quickly; its chain verifies like any other).
    static func bulkFill(_ store: PostgresJournal, session: SessionID, events: Int, payload: [UInt8]) async throws {
        var prev = JournalChain.zeroHash
        let type = "tool.result"
        let epoch: Int64 = 0
        var seq = 0
        while seq < events {
            let n = min(1000, events - seq)
            var binds = PostgresBindings(capacity: n * 7)
            var values: [String] = []
            values.reserveCapacity(n)
            for i in 0..<n {
                let s = seq + i + 1
                let ts = JournalChain.nowNanos()
                let hash = JournalChain.hash(session: session, seq: UInt64(s), epoch: UInt64(epoch), timestampNanos: ts, type: Array(type.utf8), payload: payload, prevHash: prev)
                let b = i * 7
                values.append("('\(session.rawValue)', $\(b + 1), $\(b + 2), $\(b + 3), $\(b + 4), $\(b + 5), $\(b + 6), $\(b + 7))")
                binds.append(Int64(s))
                binds.append(epoch)
                binds.append(ts)
                binds.append(type)
                binds.append(ByteBuffer(bytes: payload))
                binds.append(ByteBuffer(bytes: prev))
                binds.append(ByteBuffer(bytes: hash))
                prev = hash
            }
            try await store.client.query(PostgresQuery(
                unsafeSQL: "INSERT INTO \(store.schema).events (session_id, seq, epoch, ts_nanos, type, payload, prev_hash, hash) VALUES " + values.joined(separator: ","),
                binds: binds))
            seq += n
        }
        try await store.client.query(
            "INSERT INTO \(unescaped: store.schema).sessions (session_id, last_seq, head_hash) VALUES (\(session.rawValue), \(Int64(events)), \(ByteBuffer(bytes: prev)))")
    }

    /// `writers` tasks each calling `body(writer)` until `seconds` have passed.
    static func concurrently(_ writers: Int, seconds: Double, _ body: @escaping @Sendable (Int) async throws -> Void) async throws -> (events: Double, seconds: Double) {
        let deadline = now() + seconds
        let start = now()
        let total = try await withThrowingTaskGroup(of: Int.self) { group in
            for w in 0..<writers {
                group.addTask {
                    var n = 0
                    while now() < deadline {
                        try await body(w)
                        n += 1
                    }
                    return n
                }
            }
            var sum = 0
            for try await n in group { sum += n }
            return sum
        }
        return (Double(total), now() - start)
    }

    struct Tally {
        var events = 0.0, seconds = 0.0
        mutating func add(_ r: (events: Double, seconds: Double)) {
            events += r.events
            seconds += r.seconds
        }
        var rate: Double { seconds > 0 ? events / seconds : 0 }
    }
}

/// Unique sequence numbers for the bare loops' rows.
final class SeqCounter: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `value` is accessed only under `lock`.
    private let lock = NSLock()
    private var value: Int64 = 0
    func next() -> Int64 { lock.withLock { value += 1; return value } }
}

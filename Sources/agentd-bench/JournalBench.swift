import Blocking
import CSQLite
import Foundation
import SessionLog

/// Journal benchmarks (issue 4): baselines first (raw write+fdatasync, SQLite WAL with
/// synchronous=FULL), then the journal's figures, then ratios against the baselines.
///
/// Environment: `AGENTD_BENCH_DIR` (default: a directory under /tmp, on the same disk as the
/// journal would be), `AGENTD_BENCH_LOG_MIB` (size of the log for the replay and recovery
/// figures, default 1024).
enum JournalBench {
    static let eventBytes = 256
    static let samples = 2000
    static let writers = 64

    static func run(_ report: Reporter) async throws {
        let env = ProcessInfo.processInfo.environment
        let root = (env["AGENTD_BENCH_DIR"] ?? NSTemporaryDirectory()) + "/agentd-journal-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        let logMiB = Int(env["AGENTD_BENCH_LOG_MIB"] ?? "") ?? 1024
        let payload = Array("{\"tool\":\"bash\",\"input\":\"\(String(repeating: "x", count: eventBytes - 28))\"}".utf8)

        // The disk's latency drifts over a run (shared VM storage), so each comparison
        // alternates short rounds of the baseline and the journal and pools the samples.
        let rounds = 8
        let perRound = samples / rounds
        let store = try await SessionStore.open(directory: root + "/journal")
        let one = try SessionID("bench-single")
        for _ in 0..<100 { try await store.append(session: one, type: "tool.intent", payload: payload) }
        let raw = try RawFile(path: root + "/raw.bin", size: payload.count + 100)
        let lite = try SQLiteWriter(path: root + "/baseline.sqlite", session: "bench-single", payload: payload)
        var rawLatencies: [Double] = [], journalLatencies: [Double] = []
        var liteSeconds = 0.0
        for _ in 0..<rounds {
            rawLatencies += try await BlockingPool.shared.run { try raw.samples(perRound) }
            liteSeconds += try await BlockingPool.shared.run { try lite.insert(perRound / 2) }
            for _ in 0..<perRound {
                let t0 = now()
                try await store.append(session: one, type: "tool.intent", payload: payload)
                journalLatencies.append((now() - t0) * 1e6)
            }
        }
        rawLatencies.sort()
        journalLatencies.sort()

        // Baselines.
        report.figure("raw.fdatasync.p50", percentile(rawLatencies, 50), "us")
        report.figure("raw.fdatasync.p99", percentile(rawLatencies, 99), "us")
        report.figure("raw.fdatasync.rate", 1e6 * Double(rawLatencies.count) / rawLatencies.reduce(0, +), "ops/s")
        report.figure("sqlite.writers1.rate", Double(rounds * (perRound / 2)) / liteSeconds, "events/s")
        try await sqlite(report, path: root + "/baseline64.sqlite", writers: writers, perWriter: 60, payload: payload)

        // One writer against 64 writers on 64 sessions, alternating.
        let ids = try (0..<writers).map { try SessionID("bench-\($0)") }
        var single = (events: 0.0, seconds: 0.0), many = (events: 0.0, seconds: 0.0), syncs = 0.0
        for _ in 0..<3 {
            let r1 = try await concurrentAppends(store, ids: [one], seconds: 0.5, payload: payload)
            single.events += r1.rate * r1.elapsed
            single.seconds += r1.elapsed
            let r64 = try await concurrentAppends(store, ids: ids, seconds: 1, payload: payload)
            many.events += r64.rate * r64.elapsed
            many.seconds += r64.elapsed
            syncs += r64.syncsPerSecond * r64.elapsed
        }
        report.figure("journal.writers1.rate", single.events / single.seconds, "events/s")
        report.figure("journal.append.p50", percentile(journalLatencies, 50), "us")
        report.figure("journal.append.p99", percentile(journalLatencies, 99), "us")
        report.figure("journal.append.rate", 1e6 * Double(journalLatencies.count) / journalLatencies.reduce(0, +), "events/s")
        report.figure("journal.writers64.rate", many.events / many.seconds, "events/s")
        report.figure("journal.writers64.batch", many.events / max(syncs, 1), "events/fdatasync")
        try await store.close()

        // A large log: fill, replay, recovery.
        try await largeLog(report, directory: root + "/large", mib: logMiB)

        report.ratio("ratio.append.p50.vs.raw", "journal.append.p50", over: "raw.fdatasync.p50", goal: "<= 1.3")
        report.ratio("ratio.append.p99.vs.raw", "journal.append.p99", over: "raw.fdatasync.p99", goal: "<= 1.3")
        report.ratio("ratio.writers64.vs.single", "journal.writers64.rate", over: "journal.writers1.rate", goal: ">= 20")
        report.ratio("ratio.writers64.vs.raw", "journal.writers64.rate", over: "raw.fdatasync.rate", goal: ">= 20")
        report.ratio("ratio.writers64.vs.sqlite64", "journal.writers64.rate", over: "sqlite.writers64.rate", goal: ">= 10")
        report.ratio("ratio.writers1.vs.sqlite1", "journal.append.rate", over: "sqlite.writers1.rate", goal: ">= 1")
        report.ratio("ratio.replay.vs.1M", "journal.replay.rate", over: "goal.replay.rate", goal: ">= 1")
    }

    /// SQLite in WAL mode with synchronous=FULL: `writers` threads, each with its own
    /// connection, inserting the same events one transaction each.
    static func sqlite(_ report: Reporter, path: String, writers: Int, perWriter: Int, payload: [UInt8]) async throws {
        let setup = try SQLiteConnection(path: path)
        try setup.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE IF NOT EXISTS events(session TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, payload BLOB NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY(session, seq));")
        let done = DispatchGroup()
        let failures = ErrorBox()
        let start = now()
        for w in 0..<writers {
            done.enter()
            startDedicatedThread(name: "sqlite-bench-\(w)") {
                defer { done.leave() }
                do {
                    let db = try SQLiteConnection(path: path)
                    try db.exec("PRAGMA synchronous=FULL; PRAGMA busy_timeout=60000;")
                    let insert = try db.prepare("INSERT INTO events(session, seq, type, payload, ts) VALUES (?, ?, 'tool.intent', ?, ?)")
                    defer { sqlite3_finalize(insert) }
                    let session = "bench-\(w)"
                    for seq in 1...perWriter {
                        sqlite3_reset(insert)
                        sqlite3_bind_text(insert, 1, session, -1, sqliteTransient)
                        sqlite3_bind_int64(insert, 2, Int64(seq))
                        _ = payload.withUnsafeBytes { sqlite3_bind_blob(insert, 3, $0.baseAddress, Int32($0.count), sqliteTransient) }
                        sqlite3_bind_int64(insert, 4, Int64(Date().timeIntervalSince1970 * 1e9))
                        let rc = sqlite3_step(insert)
                        guard rc == SQLITE_DONE else { throw BenchError("sqlite insert: \(String(cString: sqlite3_errmsg(db.handle)))") }
                    }
                } catch {
                    failures.set(error)
                }
            }
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in done.notify(queue: .global()) { c.resume() } }
        if let error = failures.get() { throw error }
        let rate = Double(writers * perWriter) / (now() - start)
        report.figure("sqlite.writers\(writers).rate", rate, "events/s")
    }

    /// `writers` tasks appending to one session each, for `seconds`.
    static func concurrentAppends(_ store: SessionStore, ids: [SessionID], seconds: Double, payload: [UInt8]) async throws -> (rate: Double, syncsPerSecond: Double, elapsed: Double) {
        let deadline = now() + seconds
        let start = now()
        let syncsBefore = store.statistics.syncs
        let total = try await withThrowingTaskGroup(of: Int.self) { group in
            for id in ids {
                group.addTask {
                    var n = 0
                    while now() < deadline {
                        try await store.append(session: id, type: "tool.result", payload: payload)
                        n += 1
                    }
                    return n
                }
            }
            var sum = 0
            for try await n in group { sum += n }
            return sum
        }
        let elapsed = now() - start
        return (Double(total) / elapsed, Double(store.statistics.syncs - syncsBefore) / elapsed, elapsed)
    }

    static func largeLog(_ report: Reporter, directory: String, mib: Int) async throws {
        let target = UInt64(mib) << 20
        let payload = Array("{\"tool\":\"bash\",\"output\":\"\(String(repeating: "y", count: 512 - 29))\"}".utf8)
        let store = try await SessionStore.open(directory: directory)
        let ids = try (0..<writers).map { try SessionID("large-\($0)") }
        let start = now()
        let perWriter = Int(target / UInt64(payload.count + 100) / UInt64(writers)) + 1
        try await withThrowingTaskGroup(of: Void.self) { group in
            for id in ids {
                group.addTask {
                    for _ in 0..<perWriter { try await store.append(session: id, type: "tool.result", payload: payload) }
                }
            }
            try await group.waitForAll()
        }
        let fill = now() - start
        let bytes = store.statistics.bytesWritten
        report.figure("journal.large.events", Double(perWriter * writers), "events")
        report.figure("journal.large.bytes", Double(bytes) / Double(1 << 20), "MiB")
        report.figure("journal.large.fill", Double(bytes) / Double(1 << 20) / fill, "MiB/s")

        // Replay: every event of every session, through the public async sequence.
        let replayStart = now()
        var replayed = 0
        for id in ids {
            for try await event in store.events(session: id) { replayed += event.payload.count > 0 ? 1 : 0 }
        }
        let replay = now() - replayStart
        guard replayed == perWriter * writers else { throw BenchError("replay returned \(replayed) events, expected \(perWriter * writers)") }
        report.figure("goal.replay.rate", 1_000_000, "events/s")
        report.figure("journal.replay.rate", Double(replayed) / replay, "events/s")
        try await store.close()

        // Recovery: with the index (written on close), then from a full scan of the log.
        var t0 = now()
        var reopened = try await SessionStore.open(directory: directory)
        report.figure("journal.recovery.index", (now() - t0) * 1000, "ms")
        try await reopened.close()
        try FileManager.default.removeItem(atPath: directory + "/index.bin")
        t0 = now()
        reopened = try await SessionStore.open(directory: directory)
        let rebuild = now() - t0
        guard reopened.lastSeq(session: ids[0]) == UInt64(perWriter) else { throw BenchError("rebuild lost events") }
        report.figure("journal.recovery.rebuild", rebuild * 1000, "ms")
        report.figure("journal.recovery.rebuild.rate", Double(reopened.recovery.scannedBytes) / Double(1 << 20) / rebuild, "MiB/s")
        try await reopened.close()
    }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The raw baseline: `write` of one event-sized record plus `fdatasync`, appending to a file.
final class RawFile: @unchecked Sendable {
    // Invariant: used by one thread at a time (the benchmark awaits each call).
    let fd: Int32
    let buffer: [UInt8]

    init(path: String, size: Int) throws {
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BenchError("open \(path): errno \(errno)") }
        buffer = [UInt8](repeating: 0x61, count: size)
        _ = try samples(50)
    }

    deinit { close(fd) }

    func samples(_ n: Int) throws -> [Double] {
        var out: [Double] = []
        for _ in 0..<n {
            let t0 = now()
            guard buffer.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == buffer.count, fdatasync(fd) == 0 else {
                throw BenchError("write/fdatasync: errno \(errno)")
            }
            out.append((now() - t0) * 1e6)
        }
        return out
    }
}

/// The SQLite baseline for one writer: WAL, synchronous=FULL, one transaction per event.
final class SQLiteWriter: @unchecked Sendable {
    // Invariant: used by one thread at a time (the benchmark awaits each call).
    let db: SQLiteConnection
    let insertStatement: OpaquePointer
    let session: String
    let payload: [UInt8]
    var seq: Int64 = 0

    init(path: String, session: String, payload: [UInt8]) throws {
        db = try SQLiteConnection(path: path)
        try db.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE IF NOT EXISTS events(session TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, payload BLOB NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY(session, seq));")
        insertStatement = try db.prepare("INSERT INTO events(session, seq, type, payload, ts) VALUES (?, ?, 'tool.intent', ?, ?)")
        self.session = session
        self.payload = payload
        _ = try insert(50)
    }

    deinit { sqlite3_finalize(insertStatement) }

    /// Inserts `n` events, each its own transaction; returns the seconds taken.
    func insert(_ n: Int) throws -> Double {
        let start = now()
        for _ in 0..<n {
            seq += 1
            sqlite3_reset(insertStatement)
            sqlite3_bind_text(insertStatement, 1, session, -1, sqliteTransient)
            sqlite3_bind_int64(insertStatement, 2, seq)
            _ = payload.withUnsafeBytes { sqlite3_bind_blob(insertStatement, 3, $0.baseAddress, Int32($0.count), sqliteTransient) }
            sqlite3_bind_int64(insertStatement, 4, Int64(Date().timeIntervalSince1970 * 1e9))
            guard sqlite3_step(insertStatement) == SQLITE_DONE else { throw BenchError("sqlite insert: \(String(cString: sqlite3_errmsg(db.handle)))") }
        }
        return now() - start
    }
}

/// The first error of many threads.
final class ErrorBox: @unchecked Sendable {
    // Invariant: `error` is accessed only under `lock`.
    private let lock = NSLock()
    private var error: (any Error)?
    func set(_ e: any Error) { lock.withLock { if error == nil { error = e } } }
    func get() -> (any Error)? { lock.withLock { error } }
}

let sqliteTransient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

/// One SQLite connection, owned by one thread at a time.
final class SQLiteConnection {
    let handle: OpaquePointer

    init(path: String) throws {
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
        guard rc == SQLITE_OK, let db else { throw BenchError("sqlite3_open_v2 \(path): \(rc)") }
        handle = db
    }

    deinit { sqlite3_close_v2(handle) }

    func exec(_ sql: String) throws {
        var err: UnsafeMutablePointer<CChar>?
        guard sqlite3_exec(handle, sql, nil, nil, &err) == SQLITE_OK else {
            let message = err.map { String(cString: $0) } ?? "?"
            sqlite3_free(err)
            throw BenchError("sqlite3_exec: \(message)")
        }
    }

    func prepare(_ sql: String) throws -> OpaquePointer {
        var stmt: OpaquePointer?
        guard sqlite3_prepare_v2(handle, sql, -1, &stmt, nil) == SQLITE_OK, let stmt else {
            throw BenchError("sqlite3_prepare_v2: \(String(cString: sqlite3_errmsg(handle)))")
        }
        return stmt
    }
}

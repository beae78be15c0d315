import Foundation
import Logging
import NIOCore
import PostgresNIO
import SessionLog

/// The Session journal on PostgreSQL: the same semantics as the file journal (`SessionStore`)
/// behind the same `SessionJournal` protocol, so that several agentd nodes can share sessions.
///
/// - Events are rows keyed by `(session_id, seq)`; each session has one row in `sessions`
///   (`last_seq`, `head_hash`, `lease_epoch`, `checkpoint_seq`).
/// - An append is one statement (one transaction): a conditional `UPDATE` advances the
///   session's row only if it is still at the seq, head hash and epoch this node saw, and the
///   event's `INSERT` rides on it. A stale writer matches no row and writes nothing; the node
///   re-reads the row and refuses (stale epoch) or retries (another writer moved on). Only that
///   session's row is locked: appenders on different sessions do not serialise. Followers are
///   notified after the commit, batched per node.
/// - The hash chain is the file journal's (`JournalChain.hash`), stored per row (`prev_hash`,
///   `hash`), so `verify` means the same on both stores and names the damaged seq.
/// - `follow` waits on `LISTEN/NOTIFY` (payload `session seq`) and re-reads the table.
/// - The redactor runs before anything is sent; no error or description shows the password.
public final class PostgresJournal: SessionJournal, @unchecked Sendable {
    // Invariant for @unchecked Sendable: every stored property is a `let` of a Sendable type,
    // except `closed`, which is read and written only under `lock`.
    public let redactor: Redactor
    /// The server, database and user (never the password).
    public let url: PostgresURL
    /// The PostgreSQL schema holding this store's tables.
    public let schema: String
    /// The limits on events and checkpoints (`maxEventBytes`, `maxCheckpointBytes`); the
    /// file-layout options are ignored.
    public let options: SessionStoreOptions
    /// The connection pool this journal runs on (for operations and benchmarks that compare
    /// the store with bare statements through the same driver).
    public let client: PostgresClient
    let runTask: Task<Void, Never>
    let notifier: Notifier
    let logger: Logger
    let lock = NSLock()
    var closed = false
    /// Per session, the row as this node last wrote or read it (a hint: the database checks it).
    let heads = LockedBox<[SessionID: Head]>([:])
    /// Per session, this process's appends one at a time.
    let gates = SessionGates()
    /// Sends the NOTIFYs of this node's appends, batched, after they committed.
    let announcer: Announcer
    /// Latency of writes and reads, and the server's failures (`storeStats`).
    let recorder = StoreStatsRecorder(store: "postgres")

    /// Write and read latency and the store's own errors since it was opened.
    public var storeStats: StoreStats? { recorder.snapshot }

    /// Channel of the notifications for this schema's appends.
    var channel: String { "agentd_journal_\(schema)" }

    private init(
        url: PostgresURL, schema: String, options: SessionStoreOptions, redactor: Redactor, client: PostgresClient, runTask: Task<Void, Never>,
        followRecheck: Duration, logger: Logger
    ) {
        (self.url, self.schema, self.options, self.redactor, self.client, self.runTask, self.logger) = (url, schema, options, redactor, client, runTask, logger)
        notifier = Notifier(recheckInterval: followRecheck)
        announcer = Announcer(client: client, channel: "agentd_journal_\(schema)", logger: logger)
    }

    /// Connects, applies the schema's migrations and returns the store.
    ///
    /// - Parameters:
    ///   - url: the server (read it with `PostgresURL.read(file:)`).
    ///   - schema: the PostgreSQL schema of the tables (`[a-z_][a-z0-9_]{0,40}`); one per
    ///     isolated store, e.g. per test run.
    ///   - maximumConnections: the pool's size; one connection is kept for `LISTEN`.
    ///   - followRecheck: how often each waiting follower reads again without a notification:
    ///     how late, at most, a follower sees events whose NOTIFY never came.
    /// - Throws: `SessionLogError` (`.invalidArgument` for a bad schema name, `.ioError` when
    ///   the server cannot be reached or refuses the login, naming server, database and user).
    public static func open(
        url: PostgresURL, schema: String = "agentd", options: SessionStoreOptions = SessionStoreOptions(), redactor: Redactor = Redactor(),
        maximumConnections: Int = 32, followRecheck: Duration = .seconds(5), logger: Logger = Logger(label: "agentd.pgstore")
    ) async throws -> PostgresJournal {
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789_")
        guard let first = schema.first, first.isLetter || first == "_", schema.count <= 40, schema.allSatisfy({ allowed.contains($0) }) else {
            throw SessionLogError(.invalidArgument, "the PostgreSQL schema name \"\(schema)\" is not usable: use 1–40 of [a-z0-9_], not starting with a digit")
        }
        // One direct connection first: the pool retries a refused login quietly, a direct
        // connection reports the server's reason (wrong password, no such database) at once.
        do {
            let probe = try await withDeadline(seconds: 10, what: "connecting to \(url)") {
                try await PostgresConnection.connect(
                    configuration: PostgresConnection.Configuration(
                        host: url.host, port: url.port, username: url.user, password: url.password, database: url.database, tls: try url.connectionTLS()),
                    id: 0, logger: logger)
            }
            try? await probe.close()
        } catch {
            throw translateOpening(error, url: url, schema: schema)
        }
        var config = PostgresClient.Configuration(host: url.host, port: url.port, username: url.user, password: url.password, database: url.database, tls: try url.clientTLS())
        config.options.maximumConnections = max(2, maximumConnections)
        config.options.connectTimeout = .seconds(5)
        let client = PostgresClient(configuration: config)
        let runTask = Task { await client.run() }
        let store = PostgresJournal(
            url: url, schema: schema, options: options, redactor: redactor, client: client, runTask: runTask, followRecheck: followRecheck, logger: logger)
        do {
            try await withDeadline(seconds: 15, what: "connecting to \(url)") {
                try await Migrations.apply(client, schema: schema, logger: logger)
            }
        } catch {
            runTask.cancel()
            throw translateOpening(error, url: url, schema: schema)
        }
        store.startListener()
        return store
    }

    /// `open(url:…)` with the URL read from a file.
    public static func open(
        urlFile: String, schema: String = "agentd", options: SessionStoreOptions = SessionStoreOptions(), redactor: Redactor = Redactor(),
        maximumConnections: Int = 32, followRecheck: Duration = .seconds(5), logger: Logger = Logger(label: "agentd.pgstore")
    ) async throws -> PostgresJournal {
        try await open(
            url: PostgresURL.read(file: urlFile), schema: schema, options: options, redactor: redactor, maximumConnections: maximumConnections,
            followRecheck: followRecheck, logger: logger)
    }

    // MARK: Appending

    typealias Kind = JournalChain.Write

    @discardableResult
    public func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64? = nil) async throws -> UInt64 {
        try JournalChain.validate(type: type, session: session)
        return try await submit(session: session, type: Array(type.utf8), payload: payload, kind: .event(epoch)).seq
    }

    /// An append that settles the intent at seq `intent`: refused by the database's unique
    /// index (`.alreadySettled`) when an event settling it is there already.
    @discardableResult
    public func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64?, settling intent: UInt64) async throws -> UInt64 {
        try JournalChain.validate(type: type, session: session)
        return try await submit(session: session, type: Array(type.utf8), payload: payload, kind: .event(epoch), settles: intent).seq
    }

    @discardableResult
    public func checkpoint(session: SessionID, state: [UInt8], epoch: UInt64? = nil) async throws -> UInt64 {
        try await submit(session: session, type: Array(checkpointEventType.utf8), payload: state, kind: .checkpoint(epoch)).seq
    }

    public func wake(session: SessionID) async throws -> Lease {
        let (seq, epoch) = try await submit(session: session, type: Array(leaseEventType.utf8), payload: [], kind: .lease)
        return Lease(session: session, epoch: epoch, seq: seq)
    }

    /// One write, timed into `storeStats`.
    func submit(session: SessionID, type: [UInt8], payload: [UInt8], kind: Kind, settles: UInt64? = nil) async throws -> (seq: UInt64, epoch: UInt64) {
        try await recorder.timeWrite { try await submitUntimed(session: session, type: type, payload: payload, kind: kind, settles: settles) }
    }

    func submitUntimed(session: SessionID, type: [UInt8], payload: [UInt8], kind: Kind, settles: UInt64? = nil) async throws -> (seq: UInt64, epoch: UInt64) {
        let what = kind.what
        try checkOpen("\(what) to session \(session)")
        let (cleanType, clean) = try JournalChain.redacted(kind, session: session, type: type, payload: payload, options: options, redactor: redactor)
        let typeText = String(decoding: cleanType, as: UTF8.self)
        let isCheckpoint = kind.isCheckpoint
        // Appends of one session from this process go one at a time (the database would
        // serialise them on the row anyway); other sessions are not held up.
        await gates.enter(session)
        defer { gates.leave(session) }
        do {
            var reloaded = false
            for _ in 0..<100 {
                let cached = heads.withLock { $0[session] }
                let head: Head
                if let cached { head = cached } else { head = try await bounded("reading session \(session)'s row") { try await self.loadHead(session) }; reloaded = true }
                let recordEpoch: UInt64
                switch kind {
                case .event(let e), .checkpoint(let e):
                    if let e, e != head.epoch {
                        // The cache may be behind another node's wake: decide on the database's row.
                        if !reloaded { forget(session); continue }
                        throw JournalChain.fencingError(what, session: session, epoch: e, current: head.epoch)
                    }
                    recordEpoch = head.epoch
                case .lease:
                    recordEpoch = head.epoch + 1
                }
                let seq = head.last + 1
                let timestamp = JournalChain.nowNanos()
                let hash = JournalChain.hash(
                    session: session, seq: seq, epoch: recordEpoch, timestampNanos: timestamp, type: cleanType, payload: clean, prevHash: head.hash)
                let written: Bool
                do {
                    written = try await bounded("the \(what) of seq \(seq)") {
                        try await self.insert(
                            session, seq: seq, epoch: recordEpoch, after: head, timestamp: timestamp, type: typeText, payload: clean, hash: hash,
                            isCheckpoint: isCheckpoint, settles: settles)
                    }
                } catch let error as PSQLError where settles != nil && error.serverInfo?[.sqlState] == "23505" {
                    // The unique index on (session_id, settles): nothing was written.
                    throw SessionLogError(
                        .alreadySettled,
                        "\(what) to session \(session) refused: the outcome of the tool intent at seq \(settles ?? 0) is journaled already (another node settled it); read it from the journal")
                } catch where Self.isConnectionLoss(error) && !isClosed {
                    // The connection went away (a server restart, a network failure) and the
                    // statement may or may not have committed: the database says which.
                    forget(session)
                    written = try await resolveUnknownOutcome(session, seq: seq, hash: hash, what: what, error: error)
                }
                if written {
                    heads.withLock { $0[session] = Head(last: seq, hash: hash, epoch: recordEpoch) }
                    notifier.deliver(session: session, seq: seq)
                    announcer.post(session: session, seq: seq)
                    return (seq, recordEpoch)
                }
                // Another node appended or woke the session since this node last saw it.
                forget(session)
                reloaded = false
            }
            throw SessionLogError(.ioError, "\(what) to session \(session) gave up: other writers moved the session on 100 times in a row; retry")
        } catch {
            forget(session)
            throw translate(error, "\(what) to session \(session)")
        }
    }

    /// What this node last knew of a session's row.
    struct Head: Sendable {
        var last: UInt64
        var hash: [UInt8]
        var epoch: UInt64
    }

    func forget(_ session: SessionID) { _ = heads.withLock { $0.removeValue(forKey: session) } }

    /// Reads the session's row, creating it (seq 0, zero hash, epoch 0) when absent.
    func loadHead(_ session: SessionID) async throws -> Head {
        if let row = try await sessionRow(session, what: "append") { return Head(last: row.last, hash: row.head, epoch: row.epoch) }
        try await client.query(
            "INSERT INTO \(unescaped: schema).sessions (session_id, head_hash) VALUES (\(session.rawValue), \(ByteBuffer(bytes: JournalChain.zeroHash))) ON CONFLICT (session_id) DO NOTHING",
            logger: logger)
        guard let row = try await sessionRow(session, what: "append") else {
            throw SessionLogError(.ioError, "append to session \(session) failed: its row in \(schema).sessions vanished right after it was created; retry")
        }
        return Head(last: row.last, hash: row.head, epoch: row.epoch)
    }

    /// One statement, one implicit transaction: the session's row advances from exactly `head`
    /// (seq, head hash and lease epoch) to the new event and the event row is inserted (the
    /// followers are notified after the commit, by the caller). The row lock of the UPDATE orders concurrent writers; a writer
    /// whose view is stale (another append, another node's wake) matches no row and nothing is
    /// written — the database itself refuses it.
    /// - Returns: whether the event was written.
    func insert(
        _ session: SessionID, seq: UInt64, epoch: UInt64, after head: Head, timestamp: Int64, type: String, payload: [UInt8], hash: [UInt8], isCheckpoint: Bool,
        settles: UInt64? = nil
    ) async throws -> Bool {
        let settlesValue = settles.map { Int64(clamping: $0) }
        let sid = session.rawValue
        let (newSeq, newEpoch, lastSeq, lastEpoch) = (Int64(seq), Int64(epoch), Int64(head.last), Int64(head.epoch))
        let hashBuffer = ByteBuffer(bytes: hash)
        let prevBuffer = ByteBuffer(bytes: head.hash)
        let rows = try await client.query(
            """
            WITH s AS (
                UPDATE \(unescaped: schema).sessions
                   SET last_seq = \(newSeq), head_hash = \(hashBuffer), lease_epoch = \(newEpoch),
                       checkpoint_seq = CASE WHEN \(isCheckpoint) THEN \(newSeq) ELSE checkpoint_seq END
                 WHERE session_id = \(sid) AND last_seq = \(lastSeq) AND lease_epoch = \(lastEpoch) AND head_hash = \(prevBuffer)
                RETURNING session_id),
            e AS (
                INSERT INTO \(unescaped: schema).events (session_id, seq, epoch, ts_nanos, type, payload, prev_hash, hash, settles)
                SELECT session_id, \(newSeq), \(newEpoch), \(timestamp), \(type), \(ByteBuffer(bytes: payload)), \(prevBuffer), \(hashBuffer), \(settlesValue) FROM s
                RETURNING seq)
            SELECT seq FROM e
            """,
            logger: logger)
        var inserted = 0
        for try await _ in rows { inserted += 1 }
        return inserted == 1
    }

    // MARK: Reading

    public func event(session: SessionID, seq: UInt64) async throws -> Event? {
        guard seq > 0, seq <= UInt64(Int64.max) else { return nil }
        return try await readEvents(session: session, after: seq - 1, limit: 1, what: "read of seq \(seq)").first { $0.seq == seq }
    }

    public func events(session: SessionID, after: UInt64 = 0) -> EventSequence {
        EventSequence(session: session, after: after, follow: false) { [self] in Cursor(store: self, session: session, after: after, follow: false) }
    }

    public func follow(session: SessionID, after: UInt64 = 0) -> EventSequence {
        EventSequence(session: session, after: after, follow: true) { [self] in Cursor(store: self, session: session, after: after, follow: true) }
    }

    /// Up to `limit` events of `session` above `after` (and at most `upTo`), in seq order.
    func readEvents(session: SessionID, after: UInt64, limit: Int, upTo: UInt64 = UInt64(Int64.max), what: String) async throws -> [Event] {
        do {
            return try await readEventsRaw(session: session, after: after, limit: limit, upTo: upTo, what: what)
        } catch {
            throw translate(error, "\(what) of session \(session)")
        }
    }

    /// `readEvents` with the driver's errors as they are (a follower tells a lost connection
    /// from other failures), timed into `storeStats`.
    func readEventsRaw(session: SessionID, after: UInt64, limit: Int, upTo: UInt64 = UInt64(Int64.max), what: String) async throws -> [Event] {
        try checkOpen("\(what) of session \(session)")
        let after = Int64(clamping: after), upTo = Int64(clamping: upTo)
        return try await recorder.timeRead {
            try await reading { [self] in
                let rows = try await client.query(
                    """
                    SELECT seq, epoch, ts_nanos, type, payload FROM \(unescaped: schema).events
                     WHERE session_id = \(session.rawValue) AND seq > \(after) AND seq <= \(upTo) ORDER BY seq LIMIT \(limit)
                    """, logger: logger)
                var out: [Event] = []
                out.reserveCapacity(min(limit, 4096))
                for try await (seq, epoch, ts, type, payload) in rows.decode((Int64, Int64, Int64, String, ByteBuffer).self) {
                    out.append(Event(session: session, seq: UInt64(seq), epoch: UInt64(epoch), timestampNanos: ts, type: type, payload: Array(payload.readableBytesView)))
                }
                return out
            }
        }
    }

    /// The session's row: `(last_seq, lease_epoch, checkpoint_seq, head_hash)`, nil when absent.
    func sessionRow(_ session: SessionID, what: String) async throws -> (last: UInt64, epoch: UInt64, checkpoint: UInt64, head: [UInt8])? {
        try checkOpen("\(what) of session \(session)")
        do {
            return try await recorder.timeRead {
                try await reading { [self] () async throws -> (last: UInt64, epoch: UInt64, checkpoint: UInt64, head: [UInt8])? in
                    let rows = try await client.query(
                        "SELECT last_seq, lease_epoch, checkpoint_seq, head_hash FROM \(unescaped: schema).sessions WHERE session_id = \(session.rawValue)", logger: logger)
                    for try await (last, epoch, cp, head) in rows.decode((Int64, Int64, Int64, ByteBuffer).self) {
                        return (UInt64(last), UInt64(epoch), UInt64(cp), Array(head.readableBytesView))
                    }
                    return nil
                }
            }
        } catch {
            throw translate(error, "\(what) of session \(session)")
        }
    }

    public func getSession(_ session: SessionID) async throws -> SessionSnapshot {
        guard let row = try await sessionRow(session, what: "snapshot"), row.last > 0 else {
            throw SessionLogError(.notFound, "session \(session) has no records in the PostgreSQL journal \(url) (schema \(schema))")
        }
        var checkpoint: Checkpoint?
        var from = row.checkpoint
        if row.checkpoint > 0, let e = try await event(session: session, seq: row.checkpoint) {
            checkpoint = Checkpoint(seq: e.seq, epoch: e.epoch, timestampNanos: e.timestampNanos, state: e.payload)
        } else {
            from = 0
        }
        var events: [Event] = []
        while true {
            let chunk = try await readEvents(session: session, after: from, limit: 4096, upTo: row.last, what: "snapshot")
            guard let last = chunk.last else { break }
            events.append(contentsOf: chunk)
            from = last.seq
        }
        return SessionSnapshot(session: session, checkpoint: checkpoint, events: events, leaseEpoch: row.epoch, lastSeq: row.last)
    }

    public func verify(session: SessionID) async throws -> VerifyReport {
        guard let row = try await sessionRow(session, what: "verify"), row.last > 0 else {
            throw SessionLogError(.notFound, "session \(session) has no records in the PostgreSQL journal \(url) (schema \(schema))")
        }
        let table = "\(schema).events"
        var prev = JournalChain.zeroHash
        var verified: UInt64 = 0
        func broken(_ seq: UInt64, _ reason: String) -> VerifyReport {
            VerifyReport(session: session, verifiedRecords: verified, firstBroken: .init(seq: seq, segment: table, offset: seq, reason: reason), lastHash: JournalChain.hex(prev))
        }
        var after: Int64 = 0
        do {
            while true {
                let rows = try await client.query(
                    """
                    SELECT seq, epoch, ts_nanos, type, payload, prev_hash, hash FROM \(unescaped: schema).events
                     WHERE session_id = \(session.rawValue) AND seq > \(after) ORDER BY seq LIMIT 4096
                    """, logger: logger)
                var count = 0
                for try await (seq, epoch, ts, type, payload, prevHash, hash) in rows.decode((Int64, Int64, Int64, String, ByteBuffer, ByteBuffer, ByteBuffer).self) {
                    count += 1
                    after = seq
                    let expected = verified + 1
                    guard UInt64(seq) == expected else { return broken(expected, "record seq \(expected) is missing (the next row is seq \(seq))") }
                    let storedPrev = Array(prevHash.readableBytesView)
                    guard storedPrev == prev else {
                        return broken(expected, "its previous-record hash \(JournalChain.hex(storedPrev)) does not match the SHA-256 of seq \(expected - 1) (\(JournalChain.hex(prev)))")
                    }
                    let computed = JournalChain.hash(
                        session: session, seq: expected, epoch: UInt64(epoch), timestampNanos: ts, type: Array(type.utf8), payload: Array(payload.readableBytesView),
                        prevHash: prev)
                    guard computed == Array(hash.readableBytesView) else {
                        return broken(expected, "the row's contents do not hash to its stored SHA-256 (the row was changed after it was written)")
                    }
                    prev = computed
                    verified += 1
                }
                if count == 0 { break }
            }
        } catch {
            throw translate(error, "verify of session \(session)")
        }
        if verified < row.last { return broken(verified + 1, "record seq \(verified + 1) is missing (the session's row says its last seq is \(row.last))") }
        if row.head != prev { return broken(row.last, "the session's head hash \(JournalChain.hex(row.head)) is not the SHA-256 of its last record") }
        return VerifyReport(session: session, verifiedRecords: verified, firstBroken: nil, lastHash: JournalChain.hex(prev))
    }

    public func sessions() async throws -> [SessionID] {
        try checkOpen("listing of sessions")
        do {
            var out: [SessionID] = []
            for try await id in try await client.query("SELECT session_id FROM \(unescaped: schema).sessions WHERE last_seq > 0", logger: logger).decode(String.self) {
                if let sid = try? SessionID(id) { out.append(sid) }
            }
            return out.sorted()
        } catch {
            throw translate(error, "listing of sessions")
        }
    }

    public func lastSeq(session: SessionID) async throws -> UInt64 {
        try await sessionRow(session, what: "lastSeq")?.last ?? 0
    }

    public func leaseEpoch(session: SessionID) async throws -> UInt64 {
        try await sessionRow(session, what: "leaseEpoch")?.epoch ?? 0
    }

    // MARK: Closing

    /// Ends followers and closes every connection; later calls fail with `.closed`.
    public func close() async throws {
        let already = lock.withLock {
            let was = closed
            closed = true
            return was
        }
        if already { return }
        notifier.close()
        runTask.cancel()
        await runTask.value
    }

    var isClosed: Bool { lock.withLock { closed } }

    func checkOpen(_ what: String) throws {
        if isClosed { throw SessionLogError(.closed, "\(what) refused: the PostgreSQL journal \(url) is closed") }
    }

    // MARK: LISTEN/NOTIFY

    /// Keeps one pooled connection listening on the store's channel; reconnects after a
    /// failure and wakes every follower so that they re-read what they may have missed.
    func startListener() {
        let (client, channel, notifier, logger) = (self.client, self.channel, self.notifier, self.logger)
        // The safety net under NOTIFY: followers read again every `recheckInterval`.
        Task {
            while !notifier.isClosed {
                try? await Task.sleep(for: notifier.recheckInterval)
                notifier.recheck()
            }
        }
        Task {
            var failures = 0
            while !notifier.isClosed {
                do {
                    try await client.withConnection { conn in
                        try await conn.listen(on: channel) { notifications in
                            notifier.setListening(true)
                            failures = 0
                            for try await n in notifications {
                                let parts = n.payload.split(separator: " ")
                                if parts.count == 2, let sid = try? SessionID(String(parts[0])), let seq = UInt64(parts[1]) {
                                    notifier.deliver(session: sid, seq: seq)
                                }
                            }
                        }
                    }
                } catch {
                    if !notifier.isClosed { logger.warning("journal LISTEN connection lost; reconnecting", metadata: ["channel": "\(channel)"]) }
                }
                notifier.setListening(false)
                if notifier.isClosed { break }
                failures += 1
                try? await Task.sleep(for: .milliseconds(min(2000, 50 * failures)))
            }
        }
    }

    // MARK: Errors

    static func translateOpening(_ error: any Error, url: PostgresURL, schema: String) -> SessionLogError {
        let e = describe(error)
        if e.code != .ioError { return e.error ?? SessionLogError(e.code, e.detail) }
        let hint: String
        if e.detail.contains("sslUnsupported") {
            hint = "the server does not offer TLS, and sslmode=\(url.sslMode.rawValue) requires it — turn ssl on in the server, or use sslmode=prefer"
        } else if e.detail.contains("CERTIFICATE_VERIFY_FAILED") || e.detail.contains("handshakeFailed") {
            hint = "the TLS handshake failed — check that sslrootcert is the CA that signed the server's certificate"
                + (url.sslMode == .verifyFull ? " and that the certificate names \(url.host)" : "")
        } else {
            hint = "check that the server runs, and the URL file's user, password and database"
        }
        return SessionLogError(.ioError, "opening the journal (schema \(schema)) at PostgreSQL \(url) failed: \(e.detail) — \(hint)")
    }

    /// Maps any error to `SessionLogError`: ours pass through; PostgreSQL's name the server,
    /// the SQLSTATE and the server's message (never the password or the query's values).
    func translate(_ error: any Error, _ what: String) -> SessionLogError {
        let e = Self.describe(error)
        if let own = e.error { return own }
        if e.closing, isClosed { return SessionLogError(.closed, "\(what) refused: the PostgreSQL journal \(url) is closed") }
        if e.code == .closed { return SessionLogError(.closed, "\(what) cancelled") }
        return SessionLogError(.ioError, "\(what) failed at PostgreSQL \(url) (schema \(schema)): \(e.detail); nothing unacknowledged was kept — check the server and retry")
    }

    /// What an error says, without secrets: our own error as is, else the SQLSTATE and the
    /// server's message, or the driver's code and the transport's error.
    static func describe(_ error: any Error) -> (error: SessionLogError?, code: SessionLogError.Code, detail: String, closing: Bool) {
        if let e = error as? SessionLogError { return (e, e.code, e.message, false) }
        if let t = error as? PostgresTransactionError, let inner = t.closureError ?? t.beginError ?? t.commitError { return describe(inner) }
        if let p = error as? PSQLError {
            var detail = "\(p.code)"
            if let info = p.serverInfo {
                detail = "SQLSTATE \(info[.sqlState] ?? "?"): \(info[.message] ?? "")"
            } else if let inner = p.underlying as? PSQLError, inner.code != p.code || inner.serverInfo != nil {
                detail += " (\(describe(inner).detail))"
            } else if let underlying = p.underlying, !(underlying is PSQLError) {
                detail += " (\(String(describing: underlying)))"
            }
            return (nil, .ioError, detail, p.code == .poolClosed || p.code == .clientClosedConnection)
        }
        if error is CancellationError { return (nil, .closed, "cancelled", false) }
        // The pool's own error type is in an underscored module: recognise it by name.
        if "\(type(of: error))" == "ConnectionPoolError" {
            let text = "\(error)"
            if text.contains("CircuitBreaker") {
                return (nil, .ioError, "no connection to the server could be made for 60 s (it is down, restarting, or unreachable)", false)
            }
            if text.contains("poolShutdown") { return (nil, .closed, "the connection pool is shut down", true) }
            return (nil, .ioError, "connection pool: \(text)", false)
        }
        return (nil, .ioError, "\(type(of: error))", false)
    }
}

/// Announces committed appends to the other nodes: `NOTIFY` runs in its own statement after
/// the appends committed, never inside them — PostgreSQL serialises the commits of every
/// transaction that notifies (one lock for the whole database, held through the commit's WAL
/// flush), which would take group commit away from concurrent appenders. One sender at a time
/// takes every pending announcement (the highest seq per session) and sends them in one
/// statement, so many appenders share one round trip.
final class Announcer: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `pending` and `sending` are accessed only under `lock`.
    private let lock = NSLock()
    private var pending: [SessionID: UInt64] = [:]
    private var sending = false
    private var silent = false
    private let client: PostgresClient
    private let channel: String
    private let logger: Logger

    init(client: PostgresClient, channel: String, logger: Logger) {
        (self.client, self.channel, self.logger) = (client, channel, logger)
    }

    /// Sends nothing from now on: for tests, a node that dies between its commits and their
    /// NOTIFYs.
    func silence() { lock.withLock { silent = true } }

    func post(session: SessionID, seq: UInt64) {
        let start: Bool = lock.withLock {
            if silent { return false }
            if seq > pending[session] ?? 0 { pending[session] = seq }
            if sending { return false }
            sending = true
            return true
        }
        guard start else { return }
        let (client, channel, logger) = (self.client, self.channel, self.logger)
        Task { [self] in
            while true {
                let batch: [String] = lock.withLock {
                    let out = pending.map { "\($0.key.rawValue) \($0.value)" }
                    pending.removeAll()
                    if out.isEmpty { sending = false }
                    return out
                }
                if batch.isEmpty { return }
                do {
                    try await client.query("SELECT pg_notify(\(channel), p) FROM unnest(\(batch)::text[]) AS p", logger: logger)
                } catch {
                    logger.warning("journal NOTIFY failed; followers on other nodes see these events with the session's next append or their next periodic re-read", metadata: ["count": "\(batch.count)"])
                }
            }
        }
    }
}

/// A value behind a lock.
final class LockedBox<Value>: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `value` is accessed only under `lock`.
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<T>(_ body: (inout Value) -> T) -> T {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}

/// One FIFO gate per session: `enter` waits until the previous holder `leave`s.
final class SessionGates: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `queues` is accessed only under `lock`.
    private let lock = NSLock()
    /// Per held session, the waiters behind the holder (an empty array: held, nobody waiting).
    private var queues: [SessionID: [CheckedContinuation<Void, Never>]] = [:]

    func enter(_ session: SessionID) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let free: Bool = lock.withLock {
                if queues[session] == nil {
                    queues[session] = []
                    return true
                }
                queues[session]!.append(c)
                return false
            }
            if free { c.resume() }
        }
    }

    func leave(_ session: SessionID) {
        let next: CheckedContinuation<Void, Never>? = lock.withLock {
            guard var waiting = queues[session], !waiting.isEmpty else {
                queues[session] = nil
                return nil
            }
            let first = waiting.removeFirst()
            queues[session] = waiting
            return first
        }
        next?.resume()  // the gate passes straight to it
    }
}

/// Runs `body`, failing with `.ioError` when it takes longer than `seconds`.
func withDeadline<T: Sendable>(seconds: Double, what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else {
            throw SessionLogError(.ioError, "\(what) took longer than \(Int(seconds)) s: is PostgreSQL running and reachable?")
        }
        return value
    }
}

/// Where followers wait for new events: fed by the LISTEN connection and by this process's own
/// appends.
final class Notifier: @unchecked Sendable {
    // Invariant for @unchecked Sendable: every `var` is accessed only under `lock`.
    private let lock = NSLock()
    private var latest: [SessionID: UInt64] = [:]
    private var waiters: [SessionID: [UInt64: (above: UInt64, continuation: CheckedContinuation<Void, Never>)]] = [:]
    private var listeningWaiters: [CheckedContinuation<Void, Never>] = []
    private var nextID: UInt64 = 0
    private var listening = false
    private var closed = false
    /// Bumped whenever the LISTEN connection drops: notifications may have been missed.
    private var generation: UInt64 = 0

    /// How often every waiting follower reads again whether or not a notification came: the
    /// bound on how late a follower sees events whose NOTIFY never came (their node died
    /// between the commit and the NOTIFY, or the NOTIFY failed).
    let recheckInterval: Duration

    init(recheckInterval: Duration) { self.recheckInterval = recheckInterval }

    var isClosed: Bool { lock.withLock { closed } }
    var currentGeneration: UInt64 { lock.withLock { generation } }

    /// Whether a follower of `session` waits for a notification now.
    func isWaiting(session: SessionID) -> Bool { lock.withLock { waiters[session]?.isEmpty == false } }

    /// Wakes every waiting follower to read again (see `recheckInterval`).
    func recheck() {
        let woken: [CheckedContinuation<Void, Never>] = lock.withLock {
            defer { waiters.removeAll() }
            return waiters.values.flatMap { $0.values.map(\.continuation) }
        }
        woken.forEach { $0.resume() }
    }

    func setListening(_ on: Bool) {
        let woken: [CheckedContinuation<Void, Never>] = lock.withLock {
            listening = on
            if !on {
                generation += 1
                let all = waiters.values.flatMap { $0.values.map(\.continuation) }
                waiters.removeAll()
                return all
            }
            defer { listeningWaiters.removeAll() }
            return listeningWaiters
        }
        woken.forEach { $0.resume() }
    }

    /// Returns once the LISTEN is in place (or the store closed).
    func waitUntilListening() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            if listening || closed {
                lock.unlock()
                c.resume()
                return
            }
            listeningWaiters.append(c)
            lock.unlock()
        }
    }

    func deliver(session: SessionID, seq: UInt64) {
        let woken: [CheckedContinuation<Void, Never>] = lock.withLock {
            if seq > latest[session] ?? 0 { latest[session] = seq }
            guard var list = waiters[session] else { return [] }
            var out: [CheckedContinuation<Void, Never>] = []
            for (id, w) in list where seq > w.above {
                out.append(w.continuation)
                list.removeValue(forKey: id)
            }
            waiters[session] = list.isEmpty ? nil : list
            return out
        }
        woken.forEach { $0.resume() }
    }

    /// Suspends until an event above `seq` of `session` was announced, the LISTEN connection
    /// changed since `generation`, the store closed, or the task is cancelled.
    func wait(session: SessionID, above seq: UInt64, generation seen: UInt64) async {
        let id: UInt64 = lock.withLock {
            nextID += 1
            return nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                lock.lock()
                if closed || Task.isCancelled || generation != seen || (latest[session] ?? 0) > seq {
                    lock.unlock()
                    c.resume()
                    return
                }
                waiters[session, default: [:]][id] = (seq, c)
                lock.unlock()
            }
        } onCancel: {
            let c = lock.withLock { waiters[session]?.removeValue(forKey: id)?.continuation }
            c?.resume()
        }
    }

    func close() {
        let woken: [CheckedContinuation<Void, Never>] = lock.withLock {
            closed = true
            let all = waiters.values.flatMap { $0.values.map(\.continuation) } + listeningWaiters
            waiters.removeAll()
            listeningWaiters.removeAll()
            return all
        }
        woken.forEach { $0.resume() }
    }
}

/// Reads a session in chunks of 4096 rows; with `follow`, waits on the notifier between them.
final class Cursor: EventCursor {
    let store: PostgresJournal
    let session: SessionID
    var after: UInt64
    let follow: Bool
    var buffer: [Event] = []
    var index = 0
    var listening = false
    /// Reads in a row that failed because the connection was lost (a follow retries them).
    var failures = 0

    init(store: PostgresJournal, session: SessionID, after: UInt64, follow: Bool) {
        (self.store, self.session, self.after, self.follow) = (store, session, after, follow)
    }

    func next() async throws -> Event? {
        while true {
            if index < buffer.count {
                defer { index += 1 }
                after = buffer[index].seq
                return buffer[index]
            }
            if Task.isCancelled { return nil }
            if follow && !listening {
                // Listen before the first read, so that nothing committed after it is missed.
                await store.notifier.waitUntilListening()
                listening = true
            }
            let generation = store.notifier.currentGeneration
            if follow && store.isClosed { return nil }
            let chunk: [Event]
            do {
                chunk = try await store.readEventsRaw(session: session, after: after, limit: 4096, what: follow ? "follow" : "replay")
                failures = 0
            } catch {
                if Task.isCancelled { return nil }  // any read ends when cancelled
                let e = store.translate(error, "\(follow ? "follow" : "replay") of session \(session)")
                if follow && e.code == .closed { return nil }  // a follow ends when the store closes
                // A follow outlives a server restart: it reads again once the server answers.
                guard follow, PostgresJournal.isConnectionLoss(error) else { throw e }
                failures += 1
                if failures == 1 { store.logger.warning("journal follow lost its connection; retrying", metadata: ["session.id": "\(session)"]) }
                try? await Task.sleep(for: .milliseconds(min(2000, 50 * failures)))
                continue
            }
            buffer = chunk
            index = 0
            if !chunk.isEmpty { continue }
            guard follow else { return nil }
            await store.notifier.wait(session: session, above: after, generation: generation)
            if Task.isCancelled || store.isClosed { return nil }
        }
    }
}

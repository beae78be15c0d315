import Foundation
import NIOCore
import PostgresNIO
import SessionLog

/// Importing a session's events verbatim from another store (`agentd migrate-journal`).
extension PostgresJournal {
    /// What `importSession` did, or with `dryRun` would do.
    public struct ImportResult: Sendable {
        public enum Outcome: String, Sendable {
            /// The session was not in the database (or had no events): every event was copied.
            case copied
            /// The database held the first `existing` events (an earlier import stopped
            /// part-way): the rest was copied.
            case resumed
            /// The database already held every event, with the same last hash: nothing copied.
            case present
        }
        public let session: SessionID
        public let outcome: Outcome
        /// Events the database held before, the same as the source's first ones.
        public let existing: UInt64
        /// Events inserted (with `dryRun`: that would be).
        public let copied: UInt64
        /// The session's last seq and the hex SHA-256 of that record (`VerifyReport.lastHash`).
        public let lastSeq: UInt64
        public let lastHash: String
        /// The epoch of the last event (the session's lease epoch) and the seq of its last
        /// checkpoint (0 when none), as the sessions row now holds them.
        public let leaseEpoch: UInt64
        public let checkpointSeq: UInt64
    }

    /// Copies a session's events into this store verbatim — same seq, epoch, timestamp, type
    /// and payload, so the hash chain computes to the same hashes as in the source — and
    /// keeps the `sessions` row (`last_seq`, `head_hash`, `lease_epoch`, `checkpoint_seq`)
    /// exactly as appends would have left it.
    ///
    /// - The chain is computed as the events arrive: seq must run 1, 2, 3 … without gaps.
    /// - Events already in the database are not copied again: when the database holds the
    ///   first n events and the source's seq n hashes to the database's head hash (so the
    ///   whole prefix is the same, by the chain), the import resumes after n; when the source
    ///   ends at n it is `.present`. A session holding other events, or more events than the
    ///   source, is refused and left untouched.
    /// - Events go in batches (`batchEvents`, at most `batchBytes` of payload), one statement
    ///   each: the session's row advances from exactly the state the previous batch left
    ///   (the conditional `UPDATE` appends use) and the rows are inserted with `unnest`. An
    ///   import cut off between batches leaves a consistent prefix, and running it again
    ///   resumes; a writer that touches the session meanwhile makes the next batch match no
    ///   row, and the import stops with an error.
    /// - Not redacted again and not held to `maxEventBytes`: the events are the source's
    ///   stored bytes. Followers are not notified (nobody should follow a session mid-import).
    ///
    /// - Parameters:
    ///   - session: the session; every event must belong to it.
    ///   - events: the source's events in seq order from seq 1 (e.g. `SessionStore.events`).
    ///   - dryRun: compute and compare only; write nothing.
    /// - Throws: `SessionLogError`: `.damaged` when the source's seqs skip or repeat,
    ///   `.importConflict` when the database holds different events, `.notFound` for a
    ///   source without events, `.ioError` for PostgreSQL's failures (no password).
    public func importSession<Events: AsyncSequence>(
        _ session: SessionID, events: Events, dryRun: Bool = false, batchEvents: Int = 2000, batchBytes: Int = 4 << 20
    ) async throws -> ImportResult where Events.Element == Event {
        try checkOpen("import of session \(session)")
        await gates.enter(session)
        defer { gates.leave(session) }
        defer { forget(session) }
        do {
            var row = try await sessionRow(session, what: "import")
            if row == nil, !dryRun {
                try await client.query(
                    "INSERT INTO \(unescaped: schema).sessions (session_id, head_hash) VALUES (\(session.rawValue), \(ByteBuffer(bytes: JournalChain.zeroHash))) ON CONFLICT (session_id) DO NOTHING",
                    logger: logger)
                row = try await sessionRow(session, what: "import")
            }
            let existing = row?.last ?? 0
            // What the row must hold for the next batch to apply.
            var at = Head(last: existing, hash: row?.head ?? JournalChain.zeroHash, epoch: row?.epoch ?? 0)
            var checkpointSeq = row?.checkpoint ?? 0
            var batch = Batch()
            var prev = JournalChain.zeroHash
            var seq: UInt64 = 0
            var lastEpoch: UInt64 = 0
            var copied: UInt64 = 0

            func flush() async throws {
                guard !batch.seqs.isEmpty else { return }
                if !dryRun { try await insertBatch(session, batch, after: at) }
                copied += UInt64(batch.seqs.count)
                at = Head(last: UInt64(batch.seqs.last!), hash: Array(batch.hashes.last!.readableBytesView), epoch: UInt64(batch.epochs.last!))
                if batch.checkpoint > 0 { checkpointSeq = UInt64(batch.checkpoint) }
                batch = Batch()
            }

            for try await e in events {
                guard e.session == session else {
                    throw SessionLogError(.invalidArgument, "import of session \(session) refused: an event of session \(e.session) was given among its events")
                }
                guard e.seq == seq + 1 else {
                    throw SessionLogError(
                        .damaged, "import of session \(session) stopped: the source's seq \(seq + 1) is missing (seq \(e.seq) came after seq \(seq)); nothing after seq \(seq) was copied")
                }
                seq = e.seq
                let prevHash = prev
                let typeBytes = Array(e.type.utf8)
                let hash = JournalChain.hash(
                    session: session, seq: seq, epoch: e.epoch, timestampNanos: e.timestampNanos, type: typeBytes, payload: e.payload, prevHash: prev)
                prev = hash
                lastEpoch = e.epoch
                if seq < existing { continue }
                if seq == existing {
                    guard hash == at.hash else { throw conflict(session, "its seq \(seq) (the last one in PostgreSQL) has hash \(JournalChain.hex(at.hash)) there and \(JournalChain.hex(hash)) in the source") }
                    continue
                }
                batch.add(e, hash: hash, prev: prevHash)
                if batch.seqs.count >= batchEvents || batch.bytes >= batchBytes { try await flush() }
            }
            if seq == 0 { throw SessionLogError(.notFound, "import of session \(session) refused: the source has no events for it") }
            if seq < existing {
                throw conflict(session, "PostgreSQL holds \(existing) events and the source only \(seq)")
            }
            try await flush()
            let outcome: ImportResult.Outcome = copied == 0 ? .present : existing == 0 ? .copied : .resumed
            return ImportResult(
                session: session, outcome: outcome, existing: existing, copied: copied, lastSeq: seq, lastHash: JournalChain.hex(prev),
                leaseEpoch: copied == 0 ? (row?.epoch ?? lastEpoch) : lastEpoch, checkpointSeq: checkpointSeq)
        } catch {
            throw translate(error, "import of session \(session)")
        }
    }

    func conflict(_ session: SessionID, _ why: String) -> SessionLogError {
        SessionLogError(
            .importConflict,
            "import of session \(session) refused: PostgreSQL \(url) (schema \(schema)) already holds other events for it — \(why); nothing was written. Compare the two (agentctl events), and delete one of them or import into another schema")
    }

    /// Columns of the events of one batch, as the arrays `unnest` takes.
    struct Batch {
        var seqs: [Int64] = [], epochs: [Int64] = [], stamps: [Int64] = [], types: [String] = []
        var payloads: [ByteBuffer] = [], prevs: [ByteBuffer] = [], hashes: [ByteBuffer] = []
        var bytes = 0
        /// The seq of the batch's last checkpoint (0: none).
        var checkpoint: Int64 = 0

        mutating func add(_ e: Event, hash: [UInt8], prev: [UInt8]) {
            seqs.append(Int64(e.seq))
            epochs.append(Int64(e.epoch))
            stamps.append(e.timestampNanos)
            types.append(e.type)
            payloads.append(ByteBuffer(bytes: e.payload))
            prevs.append(ByteBuffer(bytes: prev))
            hashes.append(ByteBuffer(bytes: hash))
            bytes += e.payload.count + e.type.utf8.count + 100
            if e.type == checkpointEventType { checkpoint = Int64(e.seq) }
        }
    }

    /// One statement: the session's row advances from exactly `head` to the batch's last
    /// event, and the batch's rows are inserted.
    func insertBatch(_ session: SessionID, _ b: Batch, after head: Head) async throws {
        let (last, lastHash, lastEpoch) = (b.seqs.last!, b.hashes.last!, b.epochs.last!)
        let (fromSeq, fromEpoch, fromHash) = (Int64(head.last), Int64(head.epoch), ByteBuffer(bytes: head.hash))
        let rows = try await client.query(
            """
            WITH s AS (
                UPDATE \(unescaped: schema).sessions
                   SET last_seq = \(last), head_hash = \(lastHash), lease_epoch = \(lastEpoch),
                       checkpoint_seq = CASE WHEN \(b.checkpoint) > 0 THEN \(b.checkpoint) ELSE checkpoint_seq END
                 WHERE session_id = \(session.rawValue) AND last_seq = \(fromSeq) AND lease_epoch = \(fromEpoch) AND head_hash = \(fromHash)
                RETURNING session_id),
            e AS (
                INSERT INTO \(unescaped: schema).events (session_id, seq, epoch, ts_nanos, type, payload, prev_hash, hash)
                SELECT s.session_id, u.seq, u.epoch, u.ts, u.type, u.payload, u.prev, u.hash
                  FROM s, unnest(\(b.seqs)::bigint[], \(b.epochs)::bigint[], \(b.stamps)::bigint[], \(b.types)::text[],
                                 \(b.payloads)::bytea[], \(b.prevs)::bytea[], \(b.hashes)::bytea[]) AS u(seq, epoch, ts, type, payload, prev, hash)
                RETURNING 1)
            SELECT count(*) FROM e
            """,
            logger: logger)
        var inserted: Int64 = 0
        for try await n in rows.decode(Int64.self) { inserted = n }
        guard inserted == Int64(b.seqs.count) else {
            throw SessionLogError(
                .importConflict,
                "import of session \(session) stopped at seq \(head.last): the session changed in PostgreSQL \(url) (schema \(schema)) while it was being imported (another writer?); nothing after seq \(head.last) was written — stop the writer and run the import again (it resumes)")
        }
    }
}

extension SessionLogError.Code {
    /// An import found the session in the destination with other events than the source's.
    public static let importConflict = SessionLogError.Code("importConflict")
}

import Blocking
import Foundation
import Logging
import Synchronization

/// Where a durable record lives.
struct RecordLoc: Sendable, Equatable {
    var segment: UInt32
    var length: UInt32
    var offset: UInt64
}

/// What the store knows about one session. `locs[i]` is the record with seq `i + 1`; only
/// durable records have a location. The `tentative…` fields run ahead of the durable ones
/// while appends wait for their group commit.
struct SessionState: Sendable {
    var locs: [RecordLoc] = []
    var durableHash = Hash32.zero
    var durableEpoch: UInt64 = 0
    var checkpointSeq: UInt64 = 0
    var tentativeSeq: UInt64 = 0
    var tentativeHash = Hash32.zero
    var tentativeEpoch: UInt64 = 0
    var damage: SessionLogError?

    var lastSeq: UInt64 { UInt64(locs.count) }

    mutating func resetTentative() {
        tentativeSeq = lastSeq
        tentativeHash = durableHash
        tentativeEpoch = durableEpoch
    }
}

/// An append waiting for its group commit.
struct PendingRecord {
    var bytes: [UInt8]
    var session: SessionID
    var seq: UInt64
    var epoch: UInt64
    var hash: Hash32
    var isCheckpoint: Bool
    var what: String
    var continuation: UnsafeContinuation<(UInt64, UInt64), any Error>
}

/// The durable Session journal: one host-wide segmented log in a directory, shared by every
/// session, with a per-session index in memory (persisted to `index.bin`).
///
/// Appends from any number of tasks are framed (CRC32C, per-session SHA-256 chain, lease
/// epoch), queued, and written by one dedicated writer thread: each round takes every
/// waiting record, writes them with one `pwrite` and one `fdatasync`, then resumes every
/// waiter (group commit). An append returns only once its record is durable.
///
/// Reads use shared read-only mappings of the segments on the threads of `readPool`, a pool
/// of the journal's own; nothing blocks the cooperative pool. Call `close()` when done: it
/// drains the writer and persists the index (the writer thread keeps the store alive until
/// then).
public final class SessionStore: @unchecked Sendable {
    // Invariant for @unchecked Sendable: every `var` below marked "lock" is read and written
    // only while `lock` is held; the ones marked "writer" only by the writer thread (or by
    // `init`/`close` while no writer thread runs).
    let directory: String
    let options: SessionStoreOptions
    /// The secrets that never reach the disk; callers may redact with it before encoding
    /// (a value JSON-escaped by the caller's encoder is matched too, see `Redactor`).
    public let redactor: Redactor
    let logger: Logger
    /// What recovery found when this store was opened.
    public let recovery: RecoveryReport

    /// The threads that run journal reads (`getSession`, `verify`, `events`, `follow`).
    ///
    /// A pool of the journal's own rather than `BlockingPool.shared`, so that a read never
    /// waits behind someone else's blocking work: an operator's `events` or a snapshot must
    /// answer while every tenant is busy. Reads are short (a mapped copy and a decode), so a
    /// few threads serve many sessions; a replay splits its decode over two of them.
    static let readPool = BlockingPool(name: "agentd-journal-read", threads: 8)

    let lock = NSCondition()
    var table: [SessionID: SessionState]  // lock
    var segments: [UInt32: SegmentFile]  // lock (insertions); files' fds: writer
    var pending: [PendingRecord] = []  // lock
    var closing = false  // lock
    var closed = false  // lock
    var writerExited = false  // lock
    var followers: [SessionID: [UInt64: UnsafeContinuation<Void, Never>]] = [:]  // lock
    var nextFollowerID: UInt64 = 0  // lock
    var stats = SessionStoreStatistics()  // lock
    var gatherTarget = 0  // lock
    let gatherWindow = 0.000_2

    var active: SegmentFile  // writer
    var activeEnd: UInt64  // writer
    var activePreallocated: Bool  // writer
    var rolloversSinceIndex = 0  // writer
    var needsRewind = false  // writer
    let lockFD: Int32

    let completions = CompletionThread()
    /// Mirrors `pending.count` so that the writer can spin briefly without the lock.
    let queued = Atomic<Int>(0)
    let indexLock = NSLock()
    var indexGeneration: UInt64 = 0  // indexLock
    var writtenIndexGeneration: UInt64 = 0  // indexLock
    /// Latency of every write and the store's own errors (`storeStats`).
    let recorder = StoreStatsRecorder(store: "file")

    init(
        directory: String, options: SessionStoreOptions, redactor: Redactor, logger: Logger, recovery: RecoveryReport,
        sessions: [SessionID: SessionState], segments: [UInt32: SegmentFile], active: SegmentFile, activeEnd: UInt64,
        preallocated: Bool, lockFD: Int32
    ) {
        self.directory = directory
        self.options = options
        self.redactor = redactor
        self.logger = logger
        self.recovery = recovery
        self.table = sessions
        self.segments = segments
        self.active = active
        self.activeEnd = activeEnd
        self.activePreallocated = preallocated
        self.lockFD = lockFD
        // Recovery is done with the mappings it scanned; keep their pages out of our RSS.
        for segment in segments.values { segment.mapping?.dropResidentPages() }
    }

    /// The store's options (`SessionStore.Options(maxEventBytes:segmentBytes:)`).
    public typealias Options = SessionStoreOptions

    static let leaseType = Array(leaseEventType.utf8)
    static let checkpointType = Array(checkpointEventType.utf8)

    /// Opens (creating it if needed) the journal in `directory` and recovers it: loads the
    /// index when it is valid, scans the log after it (or all of it), truncates a torn tail,
    /// and locates damage. Only one process may hold a journal directory at a time.
    ///
    /// - Parameters:
    ///   - directory: the journal directory on a local disk.
    ///   - options: limits and segment size.
    ///   - redactor: secrets that must never reach the disk.
    ///   - logger: for recovery findings (info/warning level only).
    /// - Throws: `SessionLogError` (`.locked` when another process holds it; `.ioError`).
    public static func open(
        directory: String, options: SessionStoreOptions = SessionStoreOptions(), redactor: Redactor = Redactor(),
        logger: Logger = Logger(label: "agentd.sessionlog")
    ) async throws -> SessionStore {
        let store = try await BlockingPool.shared.run {
            try SessionStore(directory: directory, options: options, redactor: redactor, logger: logger)
        }
        startDedicatedThread(name: "agentd-journal") { store.writerLoop() }
        let completions = store.completions
        startDedicatedThread(name: "agentd-journal-done") { completions.run() }
        return store
    }

    /// Same as `open(directory:…)` for a file URL.
    public static func open(
        directory: URL, options: SessionStoreOptions = SessionStoreOptions(), redactor: Redactor = Redactor(),
        logger: Logger = Logger(label: "agentd.sessionlog")
    ) async throws -> SessionStore {
        try await open(directory: directory.path, options: options, redactor: redactor, logger: logger)
    }

    // MARK: Appending

    /// Appends an event and returns its sequence number once it is durable (fdatasync).
    ///
    /// - Parameters:
    ///   - session: the session; it is created by its first record.
    ///   - type: the event type (1–256 bytes, no control characters, not starting with `agentd.`).
    ///   - payload: the JSON payload; known secrets are replaced with `[REDACTED:name]`.
    ///   - epoch: the caller's lease epoch; nil for an unfenced append (tools, admin).
    /// - Throws: `SessionLogError`: `.staleEpoch` when a newer Brain took the session over,
    ///   `.eventTooLarge`, `.invalidArgument`, `.diskFull`/`.ioError` (nothing acknowledged is
    ///   lost; retry later), `.damaged`, `.closed`.
    @discardableResult
    public func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64? = nil) async throws -> UInt64 {
        try SessionStore.validate(type: type, session: session)
        return try await submit(session: session, type: Array(type.utf8), payload: payload, kind: .event(epoch)).seq
    }

    /// Same as `append(session:type:payload:epoch:)` for `Data`.
    @discardableResult
    public func append(session: SessionID, type: String, payload: Data, epoch: UInt64? = nil) async throws -> UInt64 {
        try await append(session: session, type: type, payload: [UInt8](payload), epoch: epoch)
    }

    /// Stores a Brain's state as a checkpoint record (type `agentd.checkpoint`) in the
    /// session's chain; `getSession` then starts from it. Returns its sequence number.
    /// - Throws: as `append`; the limit is `options.maxCheckpointBytes`.
    @discardableResult
    public func checkpoint(session: SessionID, state: [UInt8], epoch: UInt64? = nil) async throws -> UInt64 {
        try await submit(session: session, type: SessionStore.checkpointType, payload: state, kind: .checkpoint(epoch)).seq
    }

    /// Hands out the session's lease: a fencing epoch one higher than any before it,
    /// journaled as an `agentd.lease` record. Appends with an older epoch are refused from
    /// now on.
    /// - Throws: `.diskFull`/`.ioError`, `.damaged`, `.closed`.
    public func wake(session: SessionID) async throws -> Lease {
        let (seq, epoch) = try await submit(session: session, type: SessionStore.leaseType, payload: [], kind: .lease)
        return Lease(session: session, epoch: epoch, seq: seq)
    }

    typealias Kind = JournalChain.Write

    static func validate(type: String, session: SessionID) throws {
        let bytes = Array(type.utf8)
        guard !bytes.isEmpty, bytes.count <= Record.maxTypeBytes, !bytes.contains(where: { $0 < 0x20 || $0 == 0x7f }) else {
            throw SessionLogError(.invalidArgument, "append to session \(session) refused: event type must be 1–\(Record.maxTypeBytes) bytes without control characters")
        }
        guard !type.hasPrefix("agentd.") else {
            throw SessionLogError(.invalidArgument, "append to session \(session) refused: event types starting with \"agentd.\" are reserved for the store (use wake/checkpoint)")
        }
    }

    /// One write, timed into `storeStats`.
    func submit(session: SessionID, type: [UInt8], payload: [UInt8], kind: Kind) async throws -> (seq: UInt64, epoch: UInt64) {
        try await recorder.timeWrite { try await submitUntimed(session: session, type: type, payload: payload, kind: kind) }
    }

    func submitUntimed(session: SessionID, type: [UInt8], payload: [UInt8], kind: Kind) async throws -> (seq: UInt64, epoch: UInt64) {
        let what = kind.what
        let (cleanType, clean) = try JournalChain.redacted(kind, session: session, type: type, payload: payload, options: options, redactor: redactor)
        var record = Record.build(session: session, type: cleanType, payload: clean, timestamp: Sys.wallNanos())
        let isCheckpoint = kind.isCheckpoint
        let result = try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<(UInt64, UInt64), any Error>) in
            lock.lock()
            if closing {
                lock.unlock()
                continuation.resume(throwing: SessionLogError(.closed, "\(what) to session \(session) refused: the journal at \(directory) is closed"))
                return
            }
            var state = table.removeValue(forKey: session) ?? SessionState()
            if let damage = state.damage {
                table[session] = state
                lock.unlock()
                continuation.resume(throwing: damage)
                return
            }
            let recordEpoch: UInt64
            switch kind {
            case .event(let e), .checkpoint(let e):
                if let e, e != state.tentativeEpoch {
                    let current = state.tentativeEpoch
                    table[session] = state
                    lock.unlock()
                    continuation.resume(throwing: JournalChain.fencingError(what, session: session, epoch: e, current: current))
                    return
                }
                recordEpoch = state.tentativeEpoch
            case .lease:
                recordEpoch = state.tentativeEpoch + 1
                state.tentativeEpoch = recordEpoch
            }
            let seq = state.tentativeSeq + 1
            let hash = Record.seal(&record, seq: seq, epoch: recordEpoch, prevHash: state.tentativeHash)
            state.tentativeSeq = seq
            state.tentativeHash = hash
            table[session] = state
            pending.append(PendingRecord(bytes: record, session: session, seq: seq, epoch: recordEpoch, hash: hash, isCheckpoint: isCheckpoint, what: what, continuation: continuation))
            queued.store(pending.count, ordering: .releasing)
            if pending.count == 1 || pending.count == gatherTarget { lock.signal() }
            lock.unlock()
        }
        return result
    }

    // MARK: The writer thread (group commit)

    func writerLoop() {
        var batch: [PendingRecord] = []
        var spin = false
        var buffer: [UInt8] = []
        buffer.reserveCapacity(1 << 20)
        while true {
            // A waiter resumed by the last commit usually appends again within microseconds:
            // spin for a moment before sleeping, to spare it a futex wake-up of this thread.
            // Only after a small batch: under load the cores are needed by the appenders.
            if spin {
                let spinUntil = Sys.monotonicNanos() + 40_000
                while queued.load(ordering: .acquiring) == 0 && Sys.monotonicNanos() < spinUntil {}
            }
            lock.lock()
            while pending.isEmpty && !closing { lock.wait() }
            if gatherTarget > 0 {
                // Many waiters were just resumed: give them a moment to append again so they
                // share the next fdatasync instead of alternating between two half batches.
                let deadline = Date(timeIntervalSinceNow: gatherWindow)
                while pending.count < gatherTarget && !closing {
                    if !lock.wait(until: deadline) { break }
                }
                gatherTarget = 0
            }
            if pending.isEmpty {
                completions.stop()
                writerExited = true
                lock.broadcast()
                lock.unlock()
                return
            }
            swap(&batch, &pending)
            queued.store(0, ordering: .releasing)
            lock.unlock()

            buffer.removeAll(keepingCapacity: true)
            for p in batch { buffer.append(contentsOf: p.bytes) }
            do {
                let started = ContinuousClock.now
                let (segment, start) = try writeDurably(buffer)
                let took = ContinuousClock.now - started
                var woken: [UnsafeContinuation<Void, Never>] = []
                lock.lock()
                stats.records += UInt64(batch.count)
                stats.syncs += 1
                stats.bytesWritten += UInt64(buffer.count)
                stats.syncSeconds.observe(Double(took.components.seconds) + Double(took.components.attoseconds) / 1e18)
                stats.batchSizes.observe(Double(batch.count))
                var offset = start
                for p in batch {
                    let loc = RecordLoc(segment: segment, length: UInt32(p.bytes.count), offset: offset)
                    offset += UInt64(p.bytes.count)
                    SessionStore.commit(&table[p.session, default: SessionState()], p, loc)
                    if !followers.isEmpty, let waiting = followers.removeValue(forKey: p.session) { woken.append(contentsOf: waiting.values) }
                }
                lock.unlock()
                if batch.count <= 4 {
                    // Few waiters: resume them here, without a thread hop (single-writer latency).
                    for p in batch { p.continuation.resume(returning: (p.seq, p.epoch)) }
                    for w in woken { w.resume() }
                } else {
                    // Many waiters: let the completion thread resume them while this thread
                    // starts the next write, so the disk never waits for the resumptions.
                    lock.withLock { gatherTarget = batch.count >= 8 ? pending.count + batch.count * 7 / 8 : 0 }
                    completions.hand(batch.map { ($0.continuation, ($0.seq, $0.epoch)) }, woken)
                }
            } catch {
                let failure = (error as? SessionLogError) ?? SessionLogError(.ioError, "journal write failed: \(error)")
                lock.lock()
                // Everything queued after the failed batch was chained onto it: fail it too,
                // and put every session back at its durable head.
                let queued = pending
                pending.removeAll()
                for key in Array(table.keys) { table[key]!.resetTentative() }
                lock.unlock()
                logger.info("journal append failed", metadata: ["journal.error": "\(failure.message)"])
                for p in batch + queued { p.continuation.resume(throwing: failure.forSession(p.session, p.what)) }
            }
            spin = batch.count <= 2
            batch.removeAll(keepingCapacity: true)
        }
    }

    /// Records a durable record in its session's state (one dictionary access per record).
    static func commit(_ state: inout SessionState, _ p: PendingRecord, _ loc: RecordLoc) {
        state.locs.append(loc)
        state.durableHash = p.hash
        state.durableEpoch = p.epoch
        if p.isCheckpoint { state.checkpointSeq = p.seq }
    }

    /// Writes `buffer` at the end of the active segment (rolling over first if it does not
    /// fit), then fdatasyncs. On failure the segment is cut back to its durable end, so no
    /// half-written record can later be mistaken for data.
    func writeDurably(_ buffer: [UInt8]) throws -> (UInt32, UInt64) {
        if needsRewind {
            // A failed write could not be cut back: never write after bytes that may hold
            // unacknowledged records. Try again; until it works, refuse.
            try rewind(to: activeEnd)
        }
        if activeEnd > 0 && activeEnd + UInt64(buffer.count) > UInt64(options.segmentBytes) {
            try rollOver()
        }
        let start = activeEnd
        let context = "appending \(buffer.count) bytes to \(active.name) at offset \(start)"
        do {
            try buffer.withUnsafeBytes { try Sys.pwriteAll(active.fd, $0, at: start, path: active.path, context: context) }
            try Sys.fdatasync(active.fd, path: active.path, context: context)
        } catch {
            try? rewind(to: start)
            throw error
        }
        activeEnd = start + UInt64(buffer.count)
        return (active.id, start)
    }

    /// Cuts the active segment back to `end` after a failed write, then re-preallocates what
    /// space there is.
    func rewind(to end: UInt64) throws {
        do {
            try Sys.truncate(active.fd, to: end, path: active.path)
            try Sys.fsync(active.fd, path: active.path, context: "cutting back a failed write")
            needsRewind = false
        } catch {
            needsRewind = true
            logger.info("could not cut back \(active.name) after a failed write", metadata: ["journal.error": "\(error)"])
            throw error
        }
        activePreallocated = (try? Sys.preallocate(active.fd, from: Int(end), length: options.segmentBytes - Int(end), path: active.path)) ?? false
    }

    /// Seals the active segment and starts the next one (created, preallocated, and made
    /// durable in the directory before any record goes into it).
    func rollOver() throws {
        let nextID = active.id + 1
        let segment = try SessionStore.createSegment(id: nextID, directory: directory, bytes: options.segmentBytes)
        // Seal: release the unused preallocation. Durable records are unaffected; if this
        // is lost in a crash the tail is zeros, which recovery accepts as the end.
        try? Sys.truncate(active.fd, to: activeEnd, path: active.path)
        let sealed = (active.id, activeEnd)
        lock.lock()
        segments[segment.id] = segment
        active = segment
        lock.unlock()
        activeEnd = 0
        activePreallocated = true
        rolloversSinceIndex += 1
        if rolloversSinceIndex >= options.indexEveryRollovers {
            rolloversSinceIndex = 0
            persistIndexInBackground(covered: sealed)
        }
    }

    static func createSegment(id: UInt32, directory: String, bytes: Int) throws -> SegmentFile {
        let path = directory + "/" + SegmentFile.name(id)
        let fd = try Sys.open(path, O_RDWR | O_CREAT | O_EXCL, context: "creating segment \(SegmentFile.name(id))")
        do {
            do {
                _ = try Sys.preallocate(fd, from: 0, length: bytes, path: path)
            } catch let error as SessionLogError where error.code == .diskFull {
                // Not enough room to preallocate: start the segment empty and let it grow, so
                // that whatever space is left can still be used; a write that finds the disk
                // full fails cleanly and is cut back.
                try Sys.truncate(fd, to: 0, path: path)
            }
            try Sys.fsync(fd, path: path, context: "creating segment \(SegmentFile.name(id))")
            try Sys.fsyncDirectory(directory)
        } catch {
            _ = Glibc.close(fd)
            unlink(path)
            try? Sys.fsyncDirectory(directory)
            throw error
        }
        return SegmentFile(id: id, directory: directory, fd: fd)
    }

    // MARK: Reading

    /// The events of `session` with sequence numbers above `after`, in order, then the end.
    /// Every record is checked (CRC32C, identity, seq) as it is read; damage ends the
    /// sequence with a `.damaged` error naming segment and offset.
    /// One event of `session` by its sequence number, read alone (no read-ahead): for callers
    /// that need a single record, such as a replayed result or a session's first event.
    /// - Returns: nil when the session has no record `seq`.
    /// - Throws: `SessionLogError` (`.damaged`, `.closed`, `.ioError`).
    public func event(session: SessionID, seq: UInt64) async throws -> Event? {
        guard seq > 0, seq <= lastSeq(session: session) else { return nil }
        let parts = try await BlockingPool.shared.run { [self] in try readParts(session: session, from: seq, count: 1) }
        return parts.first?.first { $0.seq == seq }
    }

    public func events(session: SessionID, after: UInt64 = 0) -> EventSequence {
        EventSequence(store: self, session: session, after: after, follow: false)
    }

    /// Like `events(session:after:)`, then waits for new events and delivers them as they
    /// become durable, until the task is cancelled or the store closes.
    public func follow(session: SessionID, after: UInt64 = 0) -> EventSequence {
        EventSequence(store: self, session: session, after: after, follow: true)
    }

    /// The last checkpoint of `session` and the events after it (all events when there is
    /// none), read through the index without touching the earlier history.
    /// - Throws: `.notFound` for a session without records, `.damaged`, `.closed`.
    public func getSession(_ session: SessionID) async throws -> SessionSnapshot {
        try await SessionStore.readPool.run { try self.snapshot(session) }
    }

    func snapshot(_ session: SessionID) throws -> SessionSnapshot {
        lock.lock()
        guard let state = table[session], state.lastSeq > 0 || state.damage != nil else {
            lock.unlock()
            throw SessionLogError(.notFound, "session \(session) has no records in the journal at \(directory)")
        }
        let (cp, epoch, last) = (state.checkpointSeq, state.durableEpoch, state.lastSeq)
        lock.unlock()
        var checkpoint: Checkpoint?
        if cp > 0, let e = try readRecords(session: session, from: cp, count: 1).first {
            checkpoint = Checkpoint(seq: e.seq, epoch: e.epoch, timestampNanos: e.timestampNanos, state: e.payload)
        }
        var events: [Event] = []
        var next = cp + 1
        while next <= last {
            let chunk = try readRecords(session: session, from: next, count: 4096, upTo: last)
            if chunk.isEmpty { break }
            events.append(contentsOf: chunk)
            next += UInt64(chunk.count)
        }
        return SessionSnapshot(session: session, checkpoint: checkpoint, events: events, leaseEpoch: epoch, lastSeq: last)
    }

    /// Reads up to `count` durable records of `session` starting at seq `from`.
    func readRecords(session: SessionID, from: UInt64, count: Int, upTo: UInt64 = .max) throws -> [Event] {
        let parts = try readParts(session: session, from: from, count: count, upTo: upTo)
        return parts.count == 1 ? parts[0] : parts.flatMap { $0 }
    }

    /// `readRecords`, as consecutive parts (decoded in parallel for big reads).
    func readParts(session: SessionID, from: UInt64, count: Int, upTo: UInt64 = .max) throws -> [[Event]] {
        lock.lock()
        if closed {
            lock.unlock()
            throw SessionLogError(.closed, "reading session \(session) refused: the journal at \(directory) is closed")
        }
        guard let state = table[session] else {
            lock.unlock()
            return [[]]
        }
        if let damage = state.damage {
            lock.unlock()
            throw damage
        }
        let end = min(state.lastSeq, upTo, from &+ UInt64(count) &- 1)
        guard from >= 1, from <= end else {
            lock.unlock()
            return [[]]
        }
        let locs = Array(state.locs[Int(from - 1)..<Int(end)])
        var maps: [UInt32: Mapping] = [:]
        do {
            for loc in locs {
                let need = Int(loc.offset) + Int(loc.length)
                if let m = maps[loc.segment], m.length >= need { continue }
                guard let seg = segments[loc.segment] else {
                    throw SessionLogError(.damaged, "session \(session): segment \(SegmentFile.name(loc.segment)) is missing from \(directory)", segment: SegmentFile.name(loc.segment), offset: loc.offset)
                }
                maps[loc.segment] = try seg.mapping(covering: need, segmentBytes: options.segmentBytes)
            }
        } catch {
            lock.unlock()
            throw error
        }
        lock.unlock()

        if locs.count < 1024 {
            return [try decode(session: session, from: from, locs: locs[...], maps: maps)]
        }
        // Big batches (replay): decode the second half on another thread at the same time.
        // Whoever claims the second half first decodes it: a pool thread, or this one when
        // none was free, so a busy pool can never leave this thread waiting on itself.
        let half = locs.count / 2
        let second = ResultBox()
        let secondLocs = locs[half...]
        let frozen = maps
        let decodeSecond: @Sendable () -> Void = {
            second.result = Result { try self.decode(session: session, from: from + UInt64(half), locs: secondLocs, maps: frozen) }
        }
        SessionStore.readPool.submit {
            guard second.claim(by: .helper) else { return }
            decodeSecond()
            second.done.signal()
        }
        let first = Result { try decode(session: session, from: from, locs: locs[..<half], maps: maps) }
        if second.claim(by: .caller) { decodeSecond() } else { second.done.wait() }
        return [try first.get(), try second.result!.get()]
    }

    /// Checks and decodes the records at `locs` (seq `from`, `from + 1`, …).
    func decode(session: SessionID, from: UInt64, locs: ArraySlice<RecordLoc>, maps: [UInt32: Mapping]) throws -> [Event] {
        let sid = Array(session.rawValue.utf8)
        var out: [Event] = []
        out.reserveCapacity(locs.count)
        var cachedSegment = UInt32.max
        var base = UnsafeRawPointer(bitPattern: 1)!
        for (i, loc) in locs.enumerated() {
            let seq = from + UInt64(i)
            if loc.segment != cachedSegment {
                cachedSegment = loc.segment
                base = maps[loc.segment]!.base
            }
            let p = base + Int(loc.offset)
            switch Record.parse(p, available: Int(loc.length)) {
            case .success(let h):
                let sidOK = h.sidLen == sid.count && sid.withUnsafeBytes { memcmp(p + Record.fixedSize, $0.baseAddress!, sid.count) == 0 }
                guard sidOK, h.seq == seq, h.length == Int(loc.length) else {
                    throw markDamaged(session, loc, seq: seq, reason: "the record there is not seq \(seq) of this session (the index is out of step with the log)")
                }
                out.append(Event(session: session, seq: seq, epoch: h.epoch, timestampNanos: h.timestamp, type: Record.typeString(p, h), payload: Record.payload(p, h)))
            case .failure(let problem):
                throw markDamaged(session, loc, seq: seq, reason: problem.text)
            }
        }
        return out
    }

    /// Records that `session` is damaged at `loc`; it is refused from now on.
    func markDamaged(_ session: SessionID, _ loc: RecordLoc, seq: UInt64, reason: String) -> SessionLogError {
        let error = SessionStore.damageError(session, segment: SegmentFile.name(loc.segment), offset: loc.offset, seq: seq, reason: reason)
        lock.lock()
        if table[session]?.damage == nil { table[session]?.damage = error }
        let waiting = followers.removeValue(forKey: session)
        lock.unlock()
        waiting?.values.forEach { $0.resume() }
        logger.info("journal damage", metadata: ["session.id": "\(session)", "journal.error": "\(error.message)"])
        return error
    }

    static func damageError(_ session: SessionID, segment: String, offset: UInt64, seq: UInt64?, reason: String) -> SessionLogError {
        SessionLogError(
            .damaged,
            "session \(session) is damaged: \(segment) offset \(offset)\(seq.map { " (seq \($0))" } ?? ""): \(reason); the session is refused rather than silently shortened — restore the journal from a backup",
            segment: segment, offset: offset)
    }

    /// Suspends until `session` has a durable record above `seq`, the store closes, the
    /// session is found damaged, or the task is cancelled.
    func waitForRecord(session: SessionID, above seq: UInt64) async {
        let id: UInt64 = lock.withLock {
            nextFollowerID += 1
            return nextFollowerID
        }
        await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                lock.lock()
                let state = table[session]
                if closing || Task.isCancelled || (state?.lastSeq ?? 0) > seq || state?.damage != nil {
                    lock.unlock()
                    continuation.resume()
                    return
                }
                followers[session, default: [:]][id] = continuation
                lock.unlock()
            }
        } onCancel: {
            lock.lock()
            let c = followers[session]?.removeValue(forKey: id)
            lock.unlock()
            c?.resume()
        }
    }

    // MARK: Inspection

    /// Walks the session's hash chain from its first record: CRC32C, identity, seq order and
    /// each record's link to the SHA-256 of the one before. Reports the first broken link.
    /// - Throws: `.notFound` for a session without records, `.closed`.
    public func verify(session: SessionID) async throws -> VerifyReport {
        try await SessionStore.readPool.run { try self.verifySync(session) }
    }

    func verifySync(_ session: SessionID) throws -> VerifyReport {
        lock.lock()
        guard !closed, let state = table[session] else {
            let isClosed = closed
            lock.unlock()
            throw isClosed
                ? SessionLogError(.closed, "verify of session \(session) refused: the journal at \(directory) is closed")
                : SessionLogError(.notFound, "session \(session) has no records in the journal at \(directory)")
        }
        let locs = state.locs
        var maps: [UInt32: Mapping] = [:]
        for id in Set(locs.map(\.segment)) {
            if let seg = segments[id], let m = try? seg.mapping(covering: 0, segmentBytes: options.segmentBytes) { maps[id] = m }
        }
        let damage = state.damage
        lock.unlock()

        let sid = Array(session.rawValue.utf8)
        var prev = Hash32.zero
        var verified: UInt64 = 0
        for (i, loc) in locs.enumerated() {
            let seq = UInt64(i + 1)
            let segName = SegmentFile.name(loc.segment)
            func broken(_ reason: String) -> VerifyReport {
                VerifyReport(session: session, verifiedRecords: verified, firstBroken: .init(seq: seq, segment: segName, offset: loc.offset, reason: reason), lastHash: prev.description)
            }
            guard var m = maps[loc.segment] else { return broken("segment file is missing") }
            if m.length < Int(loc.offset) + Int(loc.length) {
                lock.lock()
                let remapped = try? segments[loc.segment]?.mapping(covering: Int(loc.offset) + Int(loc.length), segmentBytes: options.segmentBytes)
                lock.unlock()
                guard let remapped else { return broken("segment cannot be mapped") }
                m = remapped
                maps[loc.segment] = remapped
            }
            let p = m.base + Int(loc.offset)
            switch Record.parse(p, available: Int(loc.length)) {
            case .failure(let problem): return broken(problem.text)
            case .success(let h):
                let sidOK = sid.withUnsafeBytes { h.sidLen == sid.count && memcmp(p + Record.fixedSize, $0.baseAddress!, sid.count) == 0 }
                guard sidOK, h.seq == seq else { return broken("the record there is not seq \(seq) of this session") }
                guard h.prevHash == prev else { return broken("its previous-record hash \(h.prevHash) does not match the SHA-256 of seq \(seq - 1) (\(prev))") }
                prev = Record.bodyHash(p, h)
                verified += 1
            }
        }
        if let damage {
            return VerifyReport(session: session, verifiedRecords: verified, firstBroken: .init(seq: verified + 1, segment: damage.segment ?? "?", offset: damage.offset ?? 0, reason: damage.message), lastHash: prev.description)
        }
        return VerifyReport(session: session, verifiedRecords: verified, firstBroken: nil, lastHash: prev.description)
    }

    /// Every session with at least one durable record (damaged ones included), sorted.
    public func sessions() -> [SessionID] {
        lock.withLock { table.filter { $0.value.lastSeq > 0 || $0.value.damage != nil }.keys.sorted() }
    }

    /// The last durable sequence number of `session` (0 when it has no records).
    public func lastSeq(session: SessionID) -> UInt64 {
        lock.withLock { table[session]?.lastSeq ?? 0 }
    }

    /// Counters since the store was opened (for benchmarks and metrics).
    public var statistics: SessionStoreStatistics { lock.withLock { stats } }

    /// Write latency and the store's own errors since it was opened (reads are not timed
    /// here: they are memory-mapped and never wait for the disk's sync).
    public var storeStats: StoreStats? { recorder.snapshot }

    /// The session's current lease epoch (0 before the first wake).
    public func leaseEpoch(session: SessionID) -> UInt64 {
        lock.withLock { table[session]?.durableEpoch ?? 0 }
    }

    // MARK: Closing

    /// Waits for queued appends to become durable, stops the writer thread, persists the
    /// index and releases the directory. Followers end; later calls fail with `.closed`.
    public func close() async throws {
        let already: Bool = lock.withLock {
            let was = closing
            closing = true
            lock.broadcast()
            return was
        }
        if already { return }
        try await BlockingPool.shared.run {
            self.lock.lock()
            while !self.writerExited { self.lock.wait() }
            let snapshot = self.table
            let covered = (self.active.id, self.activeEnd)
            self.lock.unlock()
            var indexError: (any Error)?
            do { try self.persistIndex(snapshot, covered: covered, generation: self.nextIndexGeneration()) } catch { indexError = error }
            self.lock.lock()
            self.closed = true
            let waiting = self.followers.values.flatMap(\.values)
            self.followers.removeAll()
            let files = Array(self.segments.values)
            self.segments.removeAll()
            self.lock.unlock()
            waiting.forEach { $0.resume() }
            files.forEach { $0.closeFile() }
            _ = Glibc.close(self.lockFD)
            if let indexError { throw indexError }
        }
    }
}

/// The events of one session as an async sequence, read in batches through the index.
/// With `follow`, it waits for new events instead of ending.
/// Another store makes one over its own `EventCursor` (`init(cursor:)`).
public struct EventSequence: AsyncSequence, Sendable {
    /// Events in seq order.
    public typealias Element = Event
    let store: SessionStore?
    let session: SessionID
    let after: UInt64
    let follow: Bool
    let makeCursor: (@Sendable () -> any EventCursor)?

    init(store: SessionStore, session: SessionID, after: UInt64, follow: Bool) {
        (self.store, self.session, self.after, self.follow, self.makeCursor) = (store, session, after, follow, nil)
    }

    /// A sequence whose every iteration reads from a fresh cursor made by `cursor`.
    public init(session: SessionID, after: UInt64, follow: Bool, cursor: @escaping @Sendable () -> any EventCursor) {
        (self.store, self.session, self.after, self.follow, self.makeCursor) = (nil, session, after, follow, cursor)
    }

    /// An iterator that starts after `after`.
    public func makeAsyncIterator() -> Iterator {
        if let makeCursor { return Iterator(cursor: makeCursor(), session: session) }
        // No event can follow seq 2^64-1: start there (an empty read) rather than overflow.
        return Iterator(store: store, session: session, next: after == .max ? .max : after + 1, follow: follow)
    }

    /// Reads the session in chunks of 4096 records, reading the next chunk ahead.
    public struct Iterator: AsyncIteratorProtocol {
        let store: SessionStore?
        var cursor: (any EventCursor)?
        let session: SessionID
        var next: UInt64
        let follow: Bool
        var parts: [[Event]] = []
        var part = 0
        var index = 0
        /// The next chunk, read ahead while the caller consumes this one (replay).
        var readAhead: Task<[[Event]], any Error>?

        static let chunk = 4096

        init(cursor: any EventCursor, session: SessionID) {
            (self.store, self.cursor, self.session, self.next, self.follow) = (nil, cursor, session, 0, false)
        }

        init(store: SessionStore?, session: SessionID, next: UInt64, follow: Bool) {
            self.store = store
            self.session = session
            self.next = next
            self.follow = follow
        }

        /// The next event; nil at the end (replay), on cancellation, or when the store
        /// closes (follow). Throws `SessionLogError` (`.damaged`, `.closed`).
        public mutating func next() async throws -> Event? {
            if let cursor { return try await cursor.next() }
            guard let store else { return nil }
            while true {
                if part < parts.count {
                    if index < parts[part].count {
                        defer { index += 1 }
                        return parts[part][index]
                    }
                    part += 1
                    index = 0
                    continue
                }
                try Task.checkCancellation()
                let (session, from) = (self.session, self.next)
                let chunk: [[Event]]
                do {
                    if let readAhead {
                        self.readAhead = nil
                        chunk = try await readAhead.value
                    } else {
                        chunk = try await SessionStore.readPool.run { try store.readParts(session: session, from: from, count: Self.chunk) }
                    }
                } catch let error as SessionLogError where follow && error.code == .closed {
                    return nil  // a live follow ends when the store closes
                }
                parts = chunk
                part = 0
                index = 0
                if let last = chunk.last?.last {
                    let count = Int(last.seq - from + 1)
                    next = last.seq + 1
                    if count == Self.chunk {
                        let ahead = next
                        readAhead = Task { try await SessionStore.readPool.run { try store.readParts(session: session, from: ahead, count: Self.chunk) } }
                    }
                    continue
                }
                guard follow else { return nil }
                let isClosed = store.lock.withLock { store.closing }
                if isClosed { return nil }
                await store.waitForRecord(session: session, above: from - 1)
                if Task.isCancelled { return nil }
            }
        }
    }
}

/// Resumes the waiters of large group commits on a thread of its own, so the writer thread
/// goes straight back to the disk.
final class CompletionThread: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `queue` and `stopped` are accessed only under `condition`.
    typealias Done = (UnsafeContinuation<(UInt64, UInt64), any Error>, (UInt64, UInt64))
    private let condition = NSCondition()
    private var queue: [([Done], [UnsafeContinuation<Void, Never>])] = []
    private var stopped = false

    func hand(_ done: [Done], _ woken: [UnsafeContinuation<Void, Never>]) {
        condition.lock()
        queue.append((done, woken))
        condition.signal()
        condition.unlock()
    }

    func stop() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
    }

    func run() {
        var work: [([Done], [UnsafeContinuation<Void, Never>])] = []
        while true {
            condition.lock()
            while queue.isEmpty && !stopped { condition.wait() }
            if queue.isEmpty && stopped {
                condition.unlock()
                return
            }
            swap(&work, &queue)
            condition.unlock()
            for (done, woken) in work {
                for (c, value) in done { c.resume(returning: value) }
                for w in woken { w.resume() }
            }
            work.removeAll(keepingCapacity: true)
        }
    }
}

/// One half of a parallel decode, claimed by exactly one thread.
final class ResultBox: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `result` is written only by the thread whose `claim`
    // succeeded; the caller reads it after decoding it itself or after `done.wait()`, which
    // the helper signals after writing.
    enum Claimant: Int { case helper = 1, caller = 2 }
    private let state = Atomic<Int>(0)
    let done = DispatchSemaphore(value: 0)
    var result: Result<[Event], any Error>?

    func claim(by who: Claimant) -> Bool {
        state.compareExchange(expected: 0, desired: who.rawValue, ordering: .acquiringAndReleasing).exchanged
    }
}

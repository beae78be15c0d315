import Foundation

/// The store seam: what the Runtime, the Vault and the benches need from a Session journal.
///
/// Two implementations share every type of this module (`Event`, `Lease`, `SessionSnapshot`,
/// `VerifyReport`, `SessionLogError`) and one conformance suite:
/// - `SessionStore`, the embedded on-disk journal (the single-host default);
/// - `PostgresJournal` (module PostgresStore), the same semantics on PostgreSQL for a fleet.
///
/// Semantics every implementation keeps:
/// - per session, sequence numbers 1, 2, 3 … without gaps, each event durable before its
///   append returns;
/// - fencing: `wake` hands out an epoch one higher than any before it (journaled as an
///   `agentd.lease` record); an append or checkpoint carrying another epoch is refused with
///   `.staleEpoch` (older) or `.unknownEpoch` (never handed out);
/// - a per-session SHA-256 hash chain over the record body of `Record.swift`, so `verify`
///   means the same on every store (see `JournalChain`);
/// - the `redactor` runs before anything leaves the process.
///
/// `lastSeq`, `leaseEpoch` and `sessions()` are `async throws` here because a networked store
/// cannot answer them from memory; the file store answers them synchronously.
public protocol SessionJournal: AnyObject, Sendable {
    /// The secrets replaced in every type and payload before they are stored.
    var redactor: Redactor { get }

    /// Appends an event and returns its sequence number once it is durable.
    /// - Parameter epoch: the caller's lease epoch; nil for an unfenced append.
    /// - Throws: `SessionLogError` (`.staleEpoch`, `.unknownEpoch`, `.eventTooLarge`,
    ///   `.invalidArgument`, `.ioError`, `.damaged`, `.closed`).
    @discardableResult
    func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64?) async throws -> UInt64

    /// Appends the event that settles the tool intent at seq `intent` (its result, or its
    /// *outcome unknown*). A store that several nodes write (PostgreSQL) keeps at most one such
    /// event per intent, in the same transaction as the append, so that two nodes can never
    /// both settle one call; a store that one process writes relies on that process.
    /// - Throws: `SessionLogError` (`.alreadySettled` when the intent's outcome is journaled
    ///   already; otherwise as `append`).
    @discardableResult
    func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64?, settling intent: UInt64) async throws -> UInt64

    /// Stores a Brain's state as an `agentd.checkpoint` record; returns its sequence number.
    @discardableResult
    func checkpoint(session: SessionID, state: [UInt8], epoch: UInt64?) async throws -> UInt64

    /// Hands out the session's next lease epoch, journaled as an `agentd.lease` record.
    func wake(session: SessionID) async throws -> Lease

    /// One event by its sequence number; nil when the session has no such record.
    func event(session: SessionID, seq: UInt64) async throws -> Event?

    /// The events with sequence numbers above `after`, in order, then the end.
    func events(session: SessionID, after: UInt64) -> EventSequence

    /// Like `events(session:after:)`, then delivers new events as they become durable, until
    /// the task is cancelled or the store closes.
    func follow(session: SessionID, after: UInt64) -> EventSequence

    /// The last checkpoint and the events after it (all events when there is none).
    /// - Throws: `.notFound` for a session without records.
    func getSession(_ session: SessionID) async throws -> SessionSnapshot

    /// Walks the session's hash chain and reports the first broken link.
    /// - Throws: `.notFound` for a session without records.
    func verify(session: SessionID) async throws -> VerifyReport

    /// Every session with at least one record, sorted.
    func sessions() async throws -> [SessionID]

    /// The last durable sequence number of `session` (0 when it has none).
    func lastSeq(session: SessionID) async throws -> UInt64

    /// The session's current lease epoch (0 before the first wake).
    func leaseEpoch(session: SessionID) async throws -> UInt64

    /// Finishes pending work and releases the store; later calls fail with `.closed`.
    func close() async throws

    /// Latency and error counters since the store was opened, for `/metrics`; nil for a store
    /// that does not keep them (the default).
    var storeStats: StoreStats? { get }
}

extension SessionJournal {
    /// No counters: the default for a store that does not keep `StoreStats`.
    public var storeStats: StoreStats? { nil }

    /// A plain append: the default for a store that one process writes, whose Runtime settles
    /// each intent once.
    @discardableResult
    public func append(session: SessionID, type: String, payload: [UInt8], epoch: UInt64?, settling intent: UInt64) async throws -> UInt64 {
        try await append(session: session, type: type, payload: payload, epoch: epoch)
    }

    /// `append` for `Data`.
    @discardableResult
    public func append(session: SessionID, type: String, payload: Data, epoch: UInt64? = nil) async throws -> UInt64 {
        try await append(session: session, type: type, payload: [UInt8](payload), epoch: epoch)
    }

    /// An unfenced append (tools, admin).
    @discardableResult
    public func append(session: SessionID, type: String, payload: [UInt8]) async throws -> UInt64 {
        try await append(session: session, type: type, payload: payload, epoch: nil)
    }

    /// An unfenced checkpoint.
    @discardableResult
    public func checkpoint(session: SessionID, state: [UInt8]) async throws -> UInt64 {
        try await checkpoint(session: session, state: state, epoch: nil)
    }

    /// All events of the session.
    public func events(session: SessionID) -> EventSequence { events(session: session, after: 0) }

    /// Every event of the session, then live ones.
    public func follow(session: SessionID) -> EventSequence { follow(session: session, after: 0) }
}

extension SessionStore: SessionJournal {}

/// A source of events for an `EventSequence` made by a store other than `SessionStore`.
public protocol EventCursor: AnyObject {
    /// The next event; nil at the end (replay), on cancellation, or when the store closes
    /// (follow).
    func next() async throws -> Event?
}

/// The rules and the hash chain every `SessionJournal` shares with the file journal, so that a
/// chain verified on one store means the same on another.
public enum JournalChain {
    /// The longest event type in bytes.
    public static let maxTypeBytes = Record.maxTypeBytes

    /// One write to a session's chain: an event (with the caller's lease epoch, if any), a
    /// checkpoint, or the lease record `wake` appends.
    public enum Write: Sendable {
        case event(UInt64?)
        case checkpoint(UInt64?)
        case lease

        /// The verb error messages use.
        public var what: String {
            switch self {
            case .event: "append"
            case .checkpoint: "checkpoint"
            case .lease: "wake"
            }
        }

        public var isCheckpoint: Bool {
            if case .checkpoint = self { return true }
            return false
        }
    }

    /// A write's type and payload redacted (nothing unredacted may leave the caller: not to
    /// disk, not over the wire) and checked against the store's limits.
    public static func redacted(
        _ write: Write, session: SessionID, type: [UInt8], payload: [UInt8], options: SessionStoreOptions, redactor: Redactor
    ) throws -> (type: [UInt8], payload: [UInt8]) {
        let (limit, limitName) =
            write.isCheckpoint ? (options.maxCheckpointBytes, "maxCheckpointBytes") : (options.maxEventBytes, "maxEventBytes")
        let clean = redactor.redact(payload)
        let cleanType = redactor.redact(type)
        guard clean.count <= limit else {
            throw SessionLogError(
                .eventTooLarge,
                "\(write.what) to session \(session) refused: the event is \(clean.count) bytes; the limit is \(limit) bytes (option \(limitName))")
        }
        guard cleanType.count <= maxTypeBytes else {
            throw SessionLogError(
                .invalidArgument, "\(write.what) to session \(session) refused: the event type is longer than \(maxTypeBytes) bytes after redaction")
        }
        return (cleanType, clean)
    }

    /// The hash that seq 1's `prevHash` links to: 32 zero bytes.
    public static let zeroHash = [UInt8](repeating: 0, count: 32)

    /// The SHA-256 of the record body the file journal would write for this event (bytes
    /// [16, length) of `Record`): what the next record's `prevHash` must be.
    /// - Parameters: the event's fields, `type` and `payload` already redacted; `prevHash` is
    ///   32 bytes.
    public static func hash(
        session: SessionID, seq: UInt64, epoch: UInt64, timestampNanos: Int64, type: [UInt8], payload: [UInt8], prevHash: [UInt8]
    ) -> [UInt8] {
        var record = Record.build(session: session, type: type, payload: payload, timestamp: timestampNanos)
        let prev = prevHash.count == 32 ? prevHash.withUnsafeBytes { Hash32($0) } : Hash32.zero
        return Record.seal(&record, seq: seq, epoch: epoch, prevHash: prev).bytes
    }

    /// Checks an application event type: 1–256 bytes, no control characters, not reserved.
    /// - Throws: `SessionLogError(.invalidArgument)` naming the session.
    public static func validate(type: String, session: SessionID) throws {
        try SessionStore.validate(type: type, session: session)
    }

    /// The error for an append whose `epoch` is not the session's `current` one.
    public static func fencingError(_ what: String, session: SessionID, epoch: UInt64, current: UInt64) -> SessionLogError {
        if epoch < current {
            return SessionLogError(.staleEpoch, "\(what) to session \(session) refused: lease epoch \(epoch) is stale; a newer Brain holds epoch \(current) (it called wake) — stop this Brain")
        }
        return SessionLogError(.unknownEpoch, "\(what) to session \(session) refused: lease epoch \(epoch) was never handed out (current epoch is \(current)); call wake to get a lease")
    }

    /// The current wall clock in nanoseconds since 1970, as the file journal stamps records.
    public static func nowNanos() -> Int64 { Sys.wallNanos() }

    /// Hex text of a 32-byte hash, as `VerifyReport.lastHash` shows it.
    public static func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
}

import Foundation

/// One journaled event as read back from the store.
public struct Event: Sendable, Equatable {
    /// The session the event belongs to.
    public let session: SessionID
    /// Its sequence number in the session: 1, 2, 3 … without gaps.
    public let seq: UInt64
    /// The lease epoch current when it was appended.
    public let epoch: UInt64
    /// When the store framed it, in nanoseconds since 1970 (UTC).
    public let timestampNanos: Int64
    /// The event type, e.g. `tool.intent`; types starting with `agentd.` are the store's own
    /// (`agentd.lease`, `agentd.checkpoint`).
    public let type: String
    /// The payload bytes (JSON), already redacted.
    public let payload: [UInt8]

    /// `timestampNanos` as a `Date`.
    public var timestamp: Date { Date(timeIntervalSince1970: Double(timestampNanos) / 1e9) }
    /// The payload as UTF-8 text.
    public var payloadText: String { String(decoding: payload, as: UTF8.self) }

    /// An event as a store read it back.
    public init(session: SessionID, seq: UInt64, epoch: UInt64, timestampNanos: Int64, type: String, payload: [UInt8]) {
        (self.session, self.seq, self.epoch, self.timestampNanos, self.type, self.payload) = (session, seq, epoch, timestampNanos, type, payload)
    }
}

/// The event type of lease records written by `wake`.
public let leaseEventType = "agentd.lease"
/// The event type of checkpoint records written by `checkpoint`.
public let checkpointEventType = "agentd.checkpoint"

/// A Brain's saved state, a record of type `agentd.checkpoint` in the session's chain.
public struct Checkpoint: Sendable, Equatable {
    /// The checkpoint's own sequence number; `getSession` returns the events after it.
    public let seq: UInt64
    /// The lease epoch of the Brain that stored it.
    public let epoch: UInt64
    /// When it was stored (ns since 1970).
    public let timestampNanos: Int64
    /// The state bytes, already redacted.
    public let state: [UInt8]

    /// A checkpoint as a store read it back.
    public init(seq: UInt64, epoch: UInt64, timestampNanos: Int64, state: [UInt8]) {
        (self.seq, self.epoch, self.timestampNanos, self.state) = (seq, epoch, timestampNanos, state)
    }
}

/// What a new Brain needs to resume: the last checkpoint and everything after it.
public struct SessionSnapshot: Sendable {
    /// The session.
    public let session: SessionID
    /// The last checkpoint, or nil when none was stored.
    public let checkpoint: Checkpoint?
    /// The events after the checkpoint (or all of them), in order; lease records included.
    public let events: [Event]
    /// The session's current lease epoch (0 before the first `wake`).
    public let leaseEpoch: UInt64
    /// The last durable sequence number.
    public let lastSeq: UInt64

    /// A snapshot as a store assembled it.
    public init(session: SessionID, checkpoint: Checkpoint?, events: [Event], leaseEpoch: UInt64, lastSeq: UInt64) {
        (self.session, self.checkpoint, self.events, self.leaseEpoch, self.lastSeq) = (session, checkpoint, events, leaseEpoch, lastSeq)
    }
}

/// The right to drive a session, handed out by `wake`. Appends must carry `epoch`.
public struct Lease: Sendable, Equatable {
    /// The session the lease is for.
    public let session: SessionID
    /// The fencing epoch: one higher than any before it.
    public let epoch: UInt64
    /// The sequence number of the lease record in the session.
    public let seq: UInt64

    /// A lease as a store handed it out.
    public init(session: SessionID, epoch: UInt64, seq: UInt64) {
        (self.session, self.epoch, self.seq) = (session, epoch, seq)
    }
}

/// The result of walking a session's hash chain.
public struct VerifyReport: Sendable, CustomStringConvertible {
    /// A link of the chain that does not hold.
    public struct BrokenLink: Sendable, Equatable {
        /// The sequence number of the first record that does not verify (the expected one
        /// when the record itself is missing).
        public let seq: UInt64
        /// The segment file holding it.
        public let segment: String
        /// Its byte offset in the segment.
        public let offset: UInt64
        /// What does not hold.
        public let reason: String

        /// A broken link; `segment` and `offset` locate it in the store (for PostgreSQL, the
        /// table and the seq).
        public init(seq: UInt64, segment: String, offset: UInt64, reason: String) {
            (self.seq, self.segment, self.offset, self.reason) = (seq, segment, offset, reason)
        }
    }

    /// The session walked.
    public let session: SessionID
    /// How many records verified before the first broken link (all of them when intact).
    public let verifiedRecords: UInt64
    /// The first broken link, or nil when the chain is intact.
    public let firstBroken: BrokenLink?
    /// Hex SHA-256 of the last verified record.
    public let lastHash: String

    /// A report as a store's walk produced it.
    public init(session: SessionID, verifiedRecords: UInt64, firstBroken: BrokenLink?, lastHash: String) {
        (self.session, self.verifiedRecords, self.firstBroken, self.lastHash) = (session, verifiedRecords, firstBroken, lastHash)
    }

    /// True when every link of the chain holds.
    public var isIntact: Bool { firstBroken == nil }

    public var description: String {
        if let b = firstBroken {
            return "session \(session): chain broken at seq \(b.seq) (\(b.segment) offset \(b.offset)): \(b.reason); \(verifiedRecords) records verified before it"
        }
        return "session \(session): chain intact, \(verifiedRecords) records, head \(lastHash)"
    }
}

/// What recovery found when the store was opened.
public struct RecoveryReport: Sendable {
    /// A torn tail that was cut off: the segment, the offset it was cut at and how many bytes
    /// were dropped (none of them had been acknowledged).
    public struct TornTail: Sendable, Equatable {
        /// The segment file (always the last one).
        public let segment: String
        /// Where the log now ends.
        public let offset: UInt64
        /// How many non-zero bytes were cut off.
        public let droppedBytes: UInt64
    }

    /// Damage found in the log, located; `session` is nil when it could not be attributed.
    public struct Damage: Sendable, Equatable {
        /// The segment file.
        public let segment: String
        /// The byte offset of the first bad byte range.
        public let offset: UInt64
        /// How many bytes up to the next valid record (or the end of the segment).
        public let length: UInt64
        /// The session the damaged record belongs to, when its identity checksum still holds.
        public let session: SessionID?
        /// What is wrong (which check failed).
        public let reason: String
    }

    /// Whether the persisted index was used; when false `indexProblem` says why it was rebuilt.
    public internal(set) var usedIndex = false
    public internal(set) var indexProblem: String?
    public internal(set) var tornTail: TornTail?
    public internal(set) var damage: [Damage] = []
    /// Bytes of log scanned at open.
    public internal(set) var scannedBytes: UInt64 = 0
    /// Sessions refused because of damage.
    public internal(set) var damagedSessions: [SessionID] = []
}

/// Tunables of a store, with documented defaults.
public struct SessionStoreOptions: Sendable {
    /// Largest event payload accepted (after redaction), in bytes. Default 1 MiB.
    public var maxEventBytes: Int
    /// Largest checkpoint state accepted, in bytes. Default 16 MiB.
    public var maxCheckpointBytes: Int
    /// Size of a log segment; segments are preallocated to it. Default 64 MiB.
    public var segmentBytes: Int
    /// Persist the index after every this many segment roll-overs (and always on close).
    public var indexEveryRollovers: Int

    /// Options with the documented defaults; `segmentBytes` is at least 64 KiB, the event
    /// and checkpoint limits at most 256 MiB.
    public init(maxEventBytes: Int = 1 << 20, maxCheckpointBytes: Int = 16 << 20, segmentBytes: Int = 64 << 20, indexEveryRollovers: Int = 1) {
        // A record must stay far below the framing's hard limit (1 GiB).
        self.maxEventBytes = min(max(maxEventBytes, 0), 256 << 20)
        self.maxCheckpointBytes = min(max(maxCheckpointBytes, 0), 256 << 20)
        self.segmentBytes = max(segmentBytes, 64 << 10)
        self.indexEveryRollovers = max(1, indexEveryRollovers)
    }
}

/// Counters of a store since it was opened.
public struct SessionStoreStatistics: Sendable {
    /// Records made durable.
    public var records: UInt64 = 0
    /// Group commits (one write and one fdatasync each).
    public var syncs: UInt64 = 0
    /// Bytes written to the log.
    public var bytesWritten: UInt64 = 0
    /// Seconds each group commit took (its write and its fdatasync).
    public var syncSeconds = Distribution(bounds: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1])
    /// Records per group commit.
    public var batchSizes = Distribution(bounds: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])

    /// All counters at zero (what a store without group commits reports).
    public init() {}
}

/// Observations counted into cumulative buckets (`value <= bound`), with their sum: what a
/// Prometheus histogram shows.
public struct Distribution: Sendable, Equatable {
    public let bounds: [Double]
    /// Per bound, how many observations were at most that bound.
    public private(set) var cumulativeCounts: [UInt64]
    public private(set) var sum = 0.0
    public private(set) var count: UInt64 = 0

    public init(bounds: [Double]) {
        self.bounds = bounds
        cumulativeCounts = [UInt64](repeating: 0, count: bounds.count)
    }

    public mutating func observe(_ value: Double) {
        for (i, bound) in bounds.enumerated() where value <= bound { cumulativeCounts[i] += 1 }
        sum += value
        count += 1
    }
}

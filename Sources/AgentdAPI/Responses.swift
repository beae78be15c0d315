import Foundation
import JSONValues

// Response bodies of agentd's API. Fields that may be absent are encoded as `null` where the
// API has always shown them (`checkpoint`, `first_broken`, `last_error`), and left out
// otherwise (`exit_code`, `outcome`). Decoding ignores fields a newer agentd adds.

/// The body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
public struct ErrorResponse: Codable, Sendable, Equatable {
    public struct Detail: Codable, Sendable, Equatable {
        /// A stable code: `invalid-argument`, `not-found`, `stale-lease`, …
        public var code: String
        /// What was wrong and what to do.
        public var message: String
    }
    public var error: Detail

    public init(code: String, message: String) { error = Detail(code: code, message: message) }
}

/// A session: `GET /v1/sessions/{id}`, each of `GET /v1/sessions`, `POST /v1/sessions` (201).
public struct SessionInfo: Codable, Sendable, Equatable {
    public var id: String
    public var policy: String
    /// The sequence number of its last event (its event count).
    public var lastSeq: UInt64
    /// The epoch of the last `wake`; 0 before any.
    public var leaseEpoch: UInt64
    /// Tasks that hold a sandbox now.
    public var liveTasks: [String]
    /// True once the session was deleted: it refuses changes (410); its events stay readable.
    public var deleted: Bool
    /// Why the session's journal cannot be read (segment and offset), when it is damaged.
    public var damage: String?

    enum CodingKeys: String, CodingKey {
        case id, policy, deleted, damage
        case lastSeq = "last_seq"
        case leaseEpoch = "lease_epoch"
        case liveTasks = "live_tasks"
    }

    public init(id: String, policy: String, lastSeq: UInt64, leaseEpoch: UInt64, liveTasks: [String], deleted: Bool = false, damage: String? = nil) {
        self.id = id
        self.policy = policy
        self.lastSeq = lastSeq
        self.leaseEpoch = leaseEpoch
        self.liveTasks = liveTasks
        self.deleted = deleted
        self.damage = damage
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = try c.decode(String.self, forKey: .id)
        policy = try c.decode(String.self, forKey: .policy)
        lastSeq = try c.decode(UInt64.self, forKey: .lastSeq)
        leaseEpoch = try c.decode(UInt64.self, forKey: .leaseEpoch)
        liveTasks = try c.decode([String].self, forKey: .liveTasks)
        // Absent from agentd before session deletion existed.
        deleted = try c.decodeIfPresent(Bool.self, forKey: .deleted) ?? false
        damage = try c.decodeIfPresent(String.self, forKey: .damage)
    }
}

/// `DELETE /v1/sessions/{id}`.
public struct DeleteSessionResponse: Codable, Sendable, Equatable {
    public var session: String
    /// The seq of the `session.deleted` event (the earlier one when it was already deleted).
    public var deletedSeq: UInt64

    enum CodingKeys: String, CodingKey {
        case session
        case deletedSeq = "deleted_seq"
    }

    public init(session: String, deletedSeq: UInt64) {
        self.session = session
        self.deletedSeq = deletedSeq
    }
}

/// `GET /v1/sessions`.
public struct SessionList: Codable, Sendable, Equatable {
    public var sessions: [SessionInfo]
    public init(sessions: [SessionInfo]) { self.sessions = sessions }
}

/// A journal event as the API shows it (also each server-sent event's `data:`).
public struct EventInfo: Codable, Sendable, Equatable {
    public var seq: UInt64
    public var epoch: UInt64
    /// ISO 8601 with fractional seconds, UTC.
    public var time: String
    public var type: String
    /// The event's payload: JSON when it is JSON, else a string.
    public var payload: JSONValue

    public init(seq: UInt64, epoch: UInt64, time: String, type: String, payload: JSONValue) {
        self.seq = seq
        self.epoch = epoch
        self.time = time
        self.type = type
        self.payload = payload
    }
}

/// `GET /v1/sessions/{id}/events`.
public struct EventList: Codable, Sendable, Equatable {
    public var events: [EventInfo]
    public init(events: [EventInfo]) { self.events = events }
}

/// `POST /v1/sessions/{id}/execute`: the tool's result and where it was journaled.
public struct ExecuteResponse: Codable, Sendable, Equatable {
    public struct Result: Codable, Sendable, Equatable {
        /// The tool's output, or what went wrong as a string a model can read.
        public var output: String
        public var isError: Bool
        /// The command's exit code (`bash`).
        public var exitCode: Int?

        enum CodingKeys: String, CodingKey {
            case output
            case isError = "is_error"
            case exitCode = "exit_code"
        }

        public init(output: String, isError: Bool, exitCode: Int?) {
            self.output = output
            self.isError = isError
            self.exitCode = exitCode
        }
    }
    public var result: Result
    public var intentSeq: UInt64
    public var resultSeq: UInt64
    /// True when an earlier call with the same idempotency key answered it from the journal.
    public var replayed: Bool

    enum CodingKeys: String, CodingKey {
        case result, replayed
        case intentSeq = "intent_seq"
        case resultSeq = "result_seq"
    }

    public init(result: Result, intentSeq: UInt64, resultSeq: UInt64, replayed: Bool) {
        self.result = result
        self.intentSeq = intentSeq
        self.resultSeq = resultSeq
        self.replayed = replayed
    }
}

/// The server-sent events of `POST /v1/sessions/{id}/execute?stream=true`, in order: any
/// number of `output` (and `dropped`) events while the command runs, then exactly one
/// `result` (an `ExecuteResponse`, the body the call answers without `stream`) or `error` (an
/// `ErrorResponse`, the body of the same failure without `stream`). A refusal before anything
/// runs (unknown session, stale epoch, bad input) is a plain HTTP error, not a stream.
public enum ExecuteStreamEvent {
    /// `ExecuteOutputEvent`: a piece of the command's output.
    public static let output = "output"
    /// `ExecuteDroppedEvent`: output the client did not read in time was left out here.
    public static let dropped = "dropped"
    /// `ExecuteResponse`: the result, as journaled; the last event.
    public static let result = "result"
    /// `ErrorResponse`: the call failed after it was accepted; the last event.
    public static let error = "error"
}

/// `event: output` of a streaming execute: a piece of a command's stdout or stderr as it is
/// produced, redacted like the result, no more in all than the policy's output limit. The
/// bytes are in `data` as text when they are UTF-8 (a character split between two pieces is
/// kept whole in the later one), else in `base64`; exactly one of the two is present.
public struct ExecuteOutputEvent: Codable, Sendable, Equatable {
    /// `stdout` or `stderr`.
    public var stream: String
    /// The bytes as UTF-8 text.
    public var data: String?
    /// The bytes in base64, when they are not UTF-8 text.
    public var base64: String?

    /// The event for `bytes`: as text when they are UTF-8, else in base64.
    public init(stream: String, bytes: [UInt8]) {
        self.stream = stream
        if let text = String(validating: bytes, as: UTF8.self) {
            data = text
        } else {
            base64 = Data(bytes).base64EncodedString()
        }
    }

    /// The bytes, whichever way they were carried.
    public var bytes: [UInt8] {
        if let data { return Array(data.utf8) }
        return base64.flatMap { Data(base64Encoded: $0) }.map { Array($0) } ?? []
    }
}

/// `event: dropped` of a streaming execute: the client read more slowly than the command wrote,
/// agentd's buffer for the stream was full, and `bytes` of output were left out at this point
/// (the result still has them, up to the output limit).
public struct ExecuteDroppedEvent: Codable, Sendable, Equatable {
    public var bytes: Int
    public var message: String

    public init(bytes: Int, message: String) {
        self.bytes = bytes
        self.message = message
    }
}

/// `POST /v1/sessions/{id}/wake`: the new lease.
public struct WakeResponse: Codable, Sendable, Equatable {
    public var session: String
    /// The fencing epoch to pass with every later call.
    public var epoch: UInt64
    /// The sequence number of the lease event.
    public var seq: UInt64

    public init(session: String, epoch: UInt64, seq: UInt64) {
        self.session = session
        self.epoch = epoch
        self.seq = seq
    }
}

/// `POST /v1/sessions/{id}/checkpoint`.
public struct CheckpointResponse: Codable, Sendable, Equatable {
    public var seq: UInt64
    public init(seq: UInt64) { self.seq = seq }
}

/// `GET /v1/sessions/{id}/snapshot` (getSession): the last checkpoint and the events after it.
public struct SnapshotResponse: Codable, Sendable, Equatable {
    public struct Checkpoint: Codable, Sendable, Equatable {
        public var seq: UInt64
        public var epoch: UInt64
        public var state: JSONValue
        public init(seq: UInt64, epoch: UInt64, state: JSONValue) {
            self.seq = seq
            self.epoch = epoch
            self.state = state
        }
    }
    public var session: String
    public var leaseEpoch: UInt64
    public var lastSeq: UInt64
    public var checkpoint: Checkpoint?
    public var events: [EventInfo]

    enum CodingKeys: String, CodingKey {
        case session, checkpoint, events
        case leaseEpoch = "lease_epoch"
        case lastSeq = "last_seq"
    }

    public init(session: String, leaseEpoch: UInt64, lastSeq: UInt64, checkpoint: Checkpoint?, events: [EventInfo]) {
        self.session = session
        self.leaseEpoch = leaseEpoch
        self.lastSeq = lastSeq
        self.checkpoint = checkpoint
        self.events = events
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(session, forKey: .session)
        try c.encode(leaseEpoch, forKey: .leaseEpoch)
        try c.encode(lastSeq, forKey: .lastSeq)
        try c.encode(checkpoint, forKey: .checkpoint)  // null when there is none
        try c.encode(events, forKey: .events)
    }
}

/// `GET /v1/sessions/{id}/verify`: the hash chain walked.
public struct VerifyResponse: Codable, Sendable, Equatable {
    public struct BrokenLink: Codable, Sendable, Equatable {
        public var seq: UInt64
        public var segment: String
        public var offset: UInt64
        public var reason: String
        public init(seq: UInt64, segment: String, offset: UInt64, reason: String) {
            self.seq = seq
            self.segment = segment
            self.offset = offset
            self.reason = reason
        }
    }
    public var session: String
    public var intact: Bool
    public var verifiedRecords: UInt64
    public var lastHash: String
    public var firstBroken: BrokenLink?

    enum CodingKeys: String, CodingKey {
        case session, intact
        case verifiedRecords = "verified_records"
        case lastHash = "last_hash"
        case firstBroken = "first_broken"
    }

    public init(session: String, intact: Bool, verifiedRecords: UInt64, lastHash: String, firstBroken: BrokenLink?) {
        self.session = session
        self.intact = intact
        self.verifiedRecords = verifiedRecords
        self.lastHash = lastHash
        self.firstBroken = firstBroken
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(session, forKey: .session)
        try c.encode(intact, forKey: .intact)
        try c.encode(verifiedRecords, forKey: .verifiedRecords)
        try c.encode(lastHash, forKey: .lastHash)
        try c.encode(firstBroken, forKey: .firstBroken)  // null when intact
    }
}

/// `POST /v1/sessions/{id}/tasks/{task}/end`.
public struct TaskEndResponse: Codable, Sendable, Equatable {
    public var task: String
    /// Whether the task had a sandbox (now removed).
    public var releasedSandbox: Bool

    enum CodingKeys: String, CodingKey {
        case task
        case releasedSandbox = "released_sandbox"
    }

    public init(task: String, releasedSandbox: Bool) {
        self.task = task
        self.releasedSandbox = releasedSandbox
    }
}

/// `GET /v1/health`.
public struct HealthResponse: Codable, Sendable, Equatable {
    public struct Sandboxes: Codable, Sendable, Equatable {
        public var live: Int
        public var pooled: Int
        public init(live: Int, pooled: Int) {
            self.live = live
            self.pooled = pooled
        }
    }
    public struct Policies: Codable, Sendable, Equatable {
        public var loaded: [String]
        /// The last refused edit's errors, `FILE:LINE:COL: message`.
        public var errors: [String]
        public init(loaded: [String], errors: [String]) {
            self.loaded = loaded
            self.errors = errors
        }
    }
    /// The Session store: its kind (`file` or `postgres`), whether it answered, and how long
    /// a read of it took.
    public struct Store: Codable, Sendable, Equatable {
        public var kind: String
        public var ok: Bool
        public var latencyMs: Double
        /// Why it did not answer (never a password).
        public var error: String?
        enum CodingKeys: String, CodingKey {
            case kind, ok, error
            case latencyMs = "latency_ms"
        }
        public init(kind: String, ok: Bool, latencyMs: Double, error: String? = nil) {
            (self.kind, self.ok, self.latencyMs, self.error) = (kind, ok, latencyMs, error)
        }
    }
    /// A node of the fleet, as the store last showed it.
    public struct Node: Codable, Sendable, Equatable {
        public var name: String
        public var address: String
        public var live: Bool
        /// Seconds since its last heartbeat, by the store's clock.
        public var sinceHeartbeatSeconds: Double
        public var missedHeartbeats: Int
        /// True for the node that answered.
        public var this: Bool
        enum CodingKeys: String, CodingKey {
            case name, address, live, this
            case sinceHeartbeatSeconds = "since_heartbeat_s"
            case missedHeartbeats = "missed_heartbeats"
        }
        public init(name: String, address: String, live: Bool, sinceHeartbeatSeconds: Double, missedHeartbeats: Int, this: Bool) {
            (self.name, self.address, self.live, self.sinceHeartbeatSeconds, self.missedHeartbeats, self.this) =
                (name, address, live, sinceHeartbeatSeconds, missedHeartbeats, this)
        }
    }
    public var status: String
    public var sessions: Int
    public var sandboxes: Sandboxes
    public var policies: Policies
    public var store: Store?
    /// In a fleet: every node that ever beat (nil on a single host).
    public var nodes: [Node]?

    public init(status: String, sessions: Int, sandboxes: Sandboxes, policies: Policies, store: Store? = nil, nodes: [Node]? = nil) {
        self.status = status
        self.sessions = sessions
        self.sandboxes = sandboxes
        self.policies = policies
        self.store = store
        self.nodes = nodes
    }
}

/// `GET /v1/tools`: the tools every session serves.
public struct ToolList: Codable, Sendable, Equatable {
    public struct Tool: Codable, Sendable, Equatable {
        public var name: String
        public var description: String
        /// The input's JSON Schema (an object schema with `additionalProperties: false`).
        public var inputSchema: JSONValue

        enum CodingKeys: String, CodingKey {
            case name, description
            case inputSchema = "input_schema"
        }

        public init(name: String, description: String, inputSchema: JSONValue) {
            self.name = name
            self.description = description
            self.inputSchema = inputSchema
        }
    }
    public var tools: [Tool]
    public init(tools: [Tool]) { self.tools = tools }
}

/// `GET /v1/pools`: each policy's warm pool.
public struct PoolList: Codable, Sendable, Equatable {
    public struct Pool: Codable, Sendable, Equatable {
        public var policy: String
        public var target: Int
        public var ready: Int
        public var warming: Bool
        /// Why the last refill failed; null when it did not.
        public var lastError: String?

        enum CodingKeys: String, CodingKey {
            case policy, target, ready, warming
            case lastError = "last_error"
        }

        public init(policy: String, target: Int, ready: Int, warming: Bool, lastError: String?) {
            self.policy = policy
            self.target = target
            self.ready = ready
            self.warming = warming
            self.lastError = lastError
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(policy, forKey: .policy)
            try c.encode(target, forKey: .target)
            try c.encode(ready, forKey: .ready)
            try c.encode(warming, forKey: .warming)
            try c.encode(lastError, forKey: .lastError)  // null when the pool is fine
        }
    }
    public var pools: [Pool]
    public init(pools: [Pool]) { self.pools = pools }
}

/// `GET /v1/sandboxes`: the sandboxes serving tasks now (warm ones are in `GET /v1/pools`).
public struct SandboxList: Codable, Sendable, Equatable {
    public struct Sandbox: Codable, Sendable, Equatable {
        public var session: String
        public var task: String
        /// The driver's id: a container id, or a unit name.
        public var id: String
        /// `container` or `unit`.
        public var driver: String
        public var image: String
        /// Tool calls running in it now.
        public var inFlight: Int
        /// Seconds since its last tool call ended (0 while one runs).
        public var idleSeconds: Double

        enum CodingKeys: String, CodingKey {
            case session, task, id, driver, image
            case inFlight = "in_flight"
            case idleSeconds = "idle_s"
        }

        public init(session: String, task: String, id: String, driver: String, image: String, inFlight: Int, idleSeconds: Double) {
            self.session = session
            self.task = task
            self.id = id
            self.driver = driver
            self.image = image
            self.inFlight = inFlight
            self.idleSeconds = idleSeconds
        }
    }
    public var sandboxes: [Sandbox]
    public init(sandboxes: [Sandbox]) { self.sandboxes = sandboxes }
}

/// `GET /v1/policies` and `POST /v1/policies/reload`.
public struct PolicyList: Codable, Sendable, Equatable {
    public struct Policy: Codable, Sendable, Equatable {
        public struct Brain: Codable, Sendable, Equatable {
            public var retries: Int
            public var backoffSeconds: Double
            enum CodingKeys: String, CodingKey {
                case retries
                case backoffSeconds = "backoff_s"
            }
            public init(retries: Int, backoffSeconds: Double) {
                self.retries = retries
                self.backoffSeconds = backoffSeconds
            }
        }
        public var name: String
        public var sha256: String
        public var file: String
        public var driver: String
        /// The longest one tool call may run (`hands.commandTimeout`), in seconds.
        public var commandTimeoutSeconds: Double?
        public var brain: Brain

        enum CodingKeys: String, CodingKey {
            case name, sha256, file, driver, brain
            case commandTimeoutSeconds = "command_timeout_s"
        }

        public init(name: String, sha256: String, file: String, driver: String, commandTimeoutSeconds: Double?, brain: Brain) {
            self.name = name
            self.sha256 = sha256
            self.file = file
            self.driver = driver
            self.commandTimeoutSeconds = commandTimeoutSeconds
            self.brain = brain
        }
    }
    public var policies: [Policy]
    public var generation: Int
    public var errors: [String]
    /// How the reload went (`POST /v1/policies/reload` only).
    public var outcome: String?

    public init(policies: [Policy], generation: Int, errors: [String], outcome: String? = nil) {
        self.policies = policies
        self.generation = generation
        self.errors = errors
        self.outcome = outcome
    }
}

/// `POST /v1/images?name=…` (201): the imported image.
public struct ImageResponse: Codable, Sendable, Equatable {
    public var name: String
    public var id: String
    public var size: Int64
    public init(name: String, id: String, size: Int64) {
        self.name = name
        self.id = id
        self.size = size
    }
}

/// The data of the `event: gap` block that ends a live follow whose reader fell behind: no
/// event after `last_seq` was sent, and `resume` continues from there.
public struct StreamGap: Codable, Sendable, Equatable {
    public var lastSeq: UInt64
    /// The path that continues the stream: `/v1/sessions/ID/events?follow=true&after=N`.
    public var resume: String
    public var message: String

    enum CodingKeys: String, CodingKey {
        case resume, message
        case lastSeq = "last_seq"
    }

    public init(lastSeq: UInt64, resume: String, message: String) {
        self.lastSeq = lastSeq
        self.resume = resume
        self.message = message
    }
}

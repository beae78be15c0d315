import Foundation
import JSONValues

/// The event types agentd writes to a session's journal, and their payloads (JSON objects
/// with snake_case keys). The journal's own types (`agentd.lease`, `agentd.checkpoint`) come
/// from `SessionLog`.
public enum EventType {
    public static let sessionCreated = "session.created"
    public static let taskStarted = "task.started"
    public static let toolIntent = "tool.intent"
    public static let toolResult = "tool.result"
    public static let toolInterrupted = "tool.interrupted"
    public static let handsProvisioned = "hands.provisioned"
    public static let handsReleased = "hands.released"
    public static let handsFailed = "hands.failed"
    /// A restarted agentd took over the task's sandbox (and workspace) left by its predecessor.
    public static let handsAdopted = "hands.adopted"
    public static let taskEnded = "task.ended"
    /// The session was deleted: it refuses every change from then on (reads keep working).
    public static let sessionDeleted = "session.deleted"
    /// In a fleet: a node took the session's calls over from a node that stopped beating.
    public static let sessionMoved = "session.moved"
    /// The vault-proxy let a request of the task's sandbox out (a route or a CONNECT tunnel).
    public static let egressAllowed = "egress.allowed"
    /// The vault-proxy refused a request of the task's sandbox (the rule says why).
    public static let egressDenied = "egress.denied"
}

/// One egress decision of the vault-proxy, as journaled (`egress.allowed` / `egress.denied`).
public struct EgressDecision: Codable, Sendable, Equatable {
    public var task: String?
    /// The `tool.intent` seq of the call whose commands were running (nil: none named yet).
    public var intent_seq: UInt64?
    public var sandbox: String
    /// `GET`, `POST`, `CONNECT` …
    public var method: String
    /// Canonical `host:port` (a route's upstream, or the CONNECT target).
    public var host: String
    public var route: String?
    /// Below the route's name, with any query replaced by `?[REDACTED]`.
    public var path: String?
    /// The name of the credential injected (never its value).
    public var credential: String?
    /// Why: `route github`, `network.allowHosts pypi.org`, or the refusal's rule.
    public var rule: String
    public var status: Int
    public var bytes_up: Int64
    public var bytes_down: Int64
    public var duration_ms: Int64

    public init(
        task: String?, intent_seq: UInt64?, sandbox: String, method: String, host: String, route: String?, path: String?,
        credential: String?, rule: String, status: Int, bytes_up: Int64, bytes_down: Int64, duration_ms: Int64
    ) {
        self.task = task
        self.intent_seq = intent_seq
        self.sandbox = sandbox
        self.method = method
        self.host = host
        self.route = route
        self.path = path
        self.credential = credential
        self.rule = rule
        self.status = status
        self.bytes_up = bytes_up
        self.bytes_down = bytes_down
        self.duration_ms = duration_ms
    }
}

struct SessionCreated: Codable {
    var policy: String
    var policy_sha256: String
}

struct TaskStarted: Codable {
    var task: String
    var policy: String
    var policy_sha256: String
    var driver: String
}

struct ToolIntent: Codable {
    var task: String
    var tool: String
    /// The canonical input (`ToolCall.canonicalInput`), redacted.
    var input: JSONValue
    var idempotency_key: String?
    /// SHA-256 (hex) of the canonical tool and input before redaction: a reused key is
    /// compared with it (absent in journals written before it existed).
    var request_sha256: String?
}

struct ToolResultEvent: Codable {
    var task: String
    var tool: String
    var intent_seq: UInt64
    var output: String
    var is_error: Bool
    var exit_code: Int?
    var duration_ms: Int
    var idempotency_key: String?
}

/// An intent whose result was never journaled (agentd stopped while the tool ran), written
/// once when the session's state is rebuilt. Its `output` is the *outcome unknown* result
/// that every retry with the same idempotency key gets from then on.
struct ToolInterrupted: Codable {
    var task: String
    var intent_seq: UInt64
    var reason: String
    var tool: String?
    var idempotency_key: String?
    var output: String?
}

struct SessionDeleted: Codable {
    var reason: String
}

/// `session.moved`: node `to` serves the session's calls from now on; `from` stopped beating.
struct SessionMoved: Codable {
    var from: String
    var to: String
}

struct HandsEventPayload: Codable {
    var task: String
    var sandbox: String
    var from_pool: Bool?
    var milliseconds: Int?
    var reason: String?
    var kind: String?
    var message: String?
}

struct TaskEnded: Codable {
    var task: String
}

enum JSONCoding {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }()
    static func encode<T: Encodable>(_ value: T) -> [UInt8] { Array((try? encoder.encode(value)) ?? Data()) }
    /// Bytes `text` takes inside a JSON string as `encoder` writes it (without the quotes).
    static func encodedLength(_ text: String) -> Int {
        text.unicodeScalars.reduce(0) { $0 + encodedLength($1) }
    }

    /// The longest prefix of `text` (whole Unicode scalars) whose encoded length is at most
    /// `encodedBytes`.
    static func prefix(of text: String, encodedBytes: Int) -> String {
        var used = 0
        var end = text.unicodeScalars.startIndex
        for index in text.unicodeScalars.indices {
            let n = encodedLength(text.unicodeScalars[index])
            if used + n > encodedBytes { break }
            used += n
            end = text.unicodeScalars.index(after: index)
        }
        return String(text.unicodeScalars[..<end])
    }

    private static func encodedLength(_ scalar: Unicode.Scalar) -> Int {
        switch scalar.value {
        case 0x22, 0x5C, 0x08, 0x09, 0x0A, 0x0C, 0x0D: 2
        case 0..<0x20: 6
        default: UTF8.width(scalar)
        }
    }

    static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) -> T? { try? JSONDecoder().decode(type, from: Data(bytes)) }
}

import Foundation

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
    public static let taskEnded = "task.ended"
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
    var input: JSONValue
    var idempotency_key: String?
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

struct ToolInterrupted: Codable {
    var task: String
    var intent_seq: UInt64
    var reason: String
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

/// Any JSON value, kept as it came (tool inputs are journaled verbatim).
public enum JSONValue: Codable, Sendable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let n): try c.encode(n)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    /// Parses JSON text.
    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
    }

    /// Compact JSON text.
    public var bytes: [UInt8] { Array((try? JSONCoding.encoder.encode(self)) ?? Data("null".utf8)) }
}

enum JSONCoding {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }()
    static func encode<T: Encodable>(_ value: T) -> [UInt8] { Array((try? encoder.encode(value)) ?? Data()) }
    static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) -> T? { try? JSONDecoder().decode(type, from: Data(bytes)) }
}

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

enum JSONCoding {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }()
    static func encode<T: Encodable>(_ value: T) -> [UInt8] { Array((try? encoder.encode(value)) ?? Data()) }
    static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) -> T? { try? JSONDecoder().decode(type, from: Data(bytes)) }
}

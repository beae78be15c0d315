import Foundation
import JSONValues

// Request bodies of agentd's API. Each decodes strictly (an unknown field or a field of the
// wrong type is refused with a message naming it) and encodes the way clients send it (absent
// optional fields are left out).

/// `POST /v1/sessions`: create a session.
public struct CreateSessionRequest: APIRequestBody, Equatable {
    /// The policy's name; agentd uses `default` when absent.
    public var policy: String?
    /// The session's id; agentd generates one when absent.
    public var id: String?

    public static let fields = ["policy", "id"]
    public static let what = "POST /v1/sessions"

    public init(policy: String? = nil, id: String? = nil) {
        self.policy = policy
        self.id = id
    }

    public init(from decoder: any Decoder) throws {
        let o = try StrictObject<Self>(decoder)
        policy = try o.string("policy")
        id = try o.string("id")
    }
}

/// `POST /v1/sessions/{id}/execute`: one tool call on a task's sandbox.
public struct ExecuteRequest: APIRequestBody, Equatable {
    /// The tool's name (`bash`, `read_file`, `write_file`, `list_files`).
    public var tool: String
    /// The tool's input: always a JSON object (`{}` when absent).
    public var input: JSONValue
    /// The task within the session (`main` when absent); each task has its own sandbox.
    public var task: String?
    /// The caller's lease epoch from `wake`.
    public var epoch: UInt64?
    /// A retried call with the same key gets the first call's result.
    public var idempotencyKey: String?

    public static let fields = ["tool", "input", "task", "epoch", "idempotency_key"]
    public static let what = "POST /v1/sessions/{id}/execute"

    enum CodingKeys: String, CodingKey {
        case tool, input, task, epoch
        case idempotencyKey = "idempotency_key"
    }

    /// - Throws: `APIRequestError` when `input` is not a JSON object.
    public init(tool: String, input: JSONValue = .object([:]), task: String? = nil, epoch: UInt64? = nil, idempotencyKey: String? = nil) throws {
        guard case .object = input else {
            throw APIRequestError("the input of \(tool) must be a JSON object (e.g. {\"command\": \"ls\"}), not \(input.kindDescription)")
        }
        self.tool = tool
        self.input = input
        self.task = task
        self.epoch = epoch
        self.idempotencyKey = idempotencyKey
    }

    public init(from decoder: any Decoder) throws {
        let o = try StrictObject<Self>(decoder)
        guard let tool = try o.string("tool") else {
            throw APIRequestError("the body of \(Self.what) needs \"tool\" (one of bash, read_file, write_file, list_files)")
        }
        self.tool = tool
        input = try o.object("input", example: #"{"command": "ls"}"#) ?? .object([:])
        task = try o.string("task")
        epoch = try o.uint64("epoch")
        idempotencyKey = try o.string("idempotency_key")
    }
}

/// `POST /v1/sessions/{id}/checkpoint`: store a Brain's state.
public struct CheckpointRequest: APIRequestBody, Equatable {
    /// Any JSON value but null.
    public var state: JSONValue
    /// The caller's lease epoch.
    public var epoch: UInt64?

    public static let fields = ["state", "epoch"]
    public static let what = "POST /v1/sessions/{id}/checkpoint"

    public init(state: JSONValue, epoch: UInt64? = nil) {
        self.state = state
        self.epoch = epoch
    }

    public init(from decoder: any Decoder) throws {
        let o = try StrictObject<Self>(decoder)
        guard let state = try o.json("state") else {
            throw APIRequestError("the body of \(Self.what) needs \"state\" (any JSON value but null)")
        }
        self.state = state
        epoch = try o.uint64("epoch")
    }
}

/// `POST /v1/sessions/{id}/tasks/{task}/end`: end a task; its sandbox is removed.
public struct TaskEndRequest: APIRequestBody, Equatable {
    /// The caller's lease epoch.
    public var epoch: UInt64?

    public static let fields = ["epoch"]
    public static let what = "POST /v1/sessions/{id}/tasks/{task}/end"

    public init(epoch: UInt64? = nil) { self.epoch = epoch }

    public init(from decoder: any Decoder) throws {
        let o = try StrictObject<Self>(decoder)
        epoch = try o.uint64("epoch")
    }
}

/// `DELETE /v1/sessions/{id}`: delete a session (its sandboxes and workspaces go; its journal
/// stays, with `session.deleted` at the end). Empty, or `{"epoch": N}` to check the caller's
/// lease.
public struct DeleteSessionRequest: APIRequestBody, Equatable {
    /// The caller's lease epoch; when given, it must be the session's current one.
    public var epoch: UInt64?

    public static let fields = ["epoch"]
    public static let what = "DELETE /v1/sessions/{id}"

    public init(epoch: UInt64? = nil) { self.epoch = epoch }

    public init(from decoder: any Decoder) throws {
        let o = try StrictObject<Self>(decoder)
        epoch = try o.uint64("epoch")
    }
}

/// A body with no fields: `POST …/wake`, `POST /v1/policies/reload` (empty, or `{}`).
public struct EmptyRequest: APIRequestBody, Equatable {
    public static let fields: [String] = []
    public static let what = "this request"

    public init() {}

    public init(from decoder: any Decoder) throws { _ = try StrictObject<Self>(decoder) }

    public func encode(to encoder: any Encoder) throws { _ = encoder.container(keyedBy: AnyKey.self) }
}

/// Query parameters and path segments, checked the same way as bodies.
public enum APIParameters {
    /// `after=N` of `GET …/events`: an integer from 0 to 2^64-1 (0 when absent).
    /// - Throws: `APIRequestError` naming the value and the range.
    public static func after(_ text: String?) throws -> UInt64 {
        guard let text else { return 0 }
        guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let n = UInt64(text) else {
            throw APIRequestError("query parameter after='\(APIBody.short(text))' must be an integer from 0 to \(UInt64.max) (the last sequence number already seen)")
        }
        return n
    }

    /// `follow=` of `GET …/events`: true, false, 1 or 0 (false when absent).
    /// - Throws: `APIRequestError` for any other value.
    public static func follow(_ text: String?) throws -> Bool { try flag(text, name: "follow") }

    /// A yes/no query parameter (`follow=`, `stream=`): true, false, 1 or 0 (false when absent).
    /// - Throws: `APIRequestError` for any other value.
    public static func flag(_ text: String?, name: String) throws -> Bool {
        switch text {
        case nil, "false", "0": return false
        case "true", "1": return true
        case let other?: throw APIRequestError("query parameter \(name)='\(APIBody.short(other))' must be true, false, 1 or 0")
        }
    }

    /// The idempotency key of an execute: the body's `idempotency_key` or the
    /// `Idempotency-Key` header (the same when both are given), 1 to 200 bytes.
    /// - Throws: `APIRequestError` for an empty or longer key, or two different ones.
    public static func idempotencyKey(body: String?, header: String?) throws -> String? {
        if let body, let header, body != header {
            throw APIRequestError("the Idempotency-Key header and the body's \"idempotency_key\" differ; give the key once")
        }
        guard let key = body ?? header else { return nil }
        guard !key.isEmpty, key.utf8.count <= 200 else {
            throw APIRequestError("the idempotency key must be 1 to 200 bytes, not \(key.utf8.count)")
        }
        return key
    }

    /// Refuses query parameters a route does not take.
    /// - Throws: `APIRequestError` naming the first unknown one and the ones allowed.
    public static func check(_ query: [String: String], allowed: [String], route: String) throws {
        if let unknown = query.keys.sorted().first(where: { !allowed.contains($0) }) {
            let allowedText = allowed.isEmpty ? "it takes none" : "it takes " + allowed.joined(separator: ", ")
            throw APIRequestError("unknown query parameter '\(APIBody.short(unknown))' on \(route); \(allowedText)")
        }
    }

    /// A path segment that names one thing (a session id, a task): after percent-decoding it
    /// is valid UTF-8, not empty, and holds no `/` or NUL, so that it stays one path
    /// component wherever it is used.
    /// - Throws: `APIRequestError` naming the segment.
    public static func segment(_ raw: String, what: String) throws -> String {
        guard let decoded = raw.removingPercentEncoding, !decoded.isEmpty, decoded != ".", decoded != "..",
            !decoded.contains("/"), !decoded.utf8.contains(0)
        else {
            throw APIRequestError("the \(what) in the path ('\(APIBody.short(raw))') must be one path segment: no '/', not '.' or '..', valid percent-encoding")
        }
        return decoded
    }
}

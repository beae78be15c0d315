import Foundation
import JSONValues

/// A request body or parameter agentd refuses: the message names the field, what it must be
/// and what was sent, so that the caller can fix the request. The server answers it with 400
/// `invalid-argument`.
public struct APIRequestError: Error, Sendable, CustomStringConvertible {
    public let message: String

    public init(_ message: String) { self.message = message }

    public var description: String { message }
}

/// A request body: decoded strictly (`APIBody.decode`), encoded by clients.
public protocol APIRequestBody: Codable, Sendable {
    /// The fields the body may hold, in the order the documentation lists them.
    static var fields: [String] { get }
    /// What the body is, for error messages: `POST /v1/sessions`.
    static var what: String { get }
}

/// Decoding and encoding of API bodies: one JSON configuration for the server and its clients.
public enum APIBody {
    /// Encodes compactly with sorted keys and unescaped slashes (stable, readable answers).
    public static func encode(_ value: some Encodable) -> [UInt8] {
        // Encoding the API's own types cannot fail: every field is a string, a number that is
        // finite, a Bool, a JSONValue or a composition of these.
        Array((try? JSONValue.encoder.encode(value)) ?? Data("{}".utf8))
    }

    /// Decodes a request body: an empty body is `{}`; anything but one JSON object of the
    /// body's fields, each of its type, is refused.
    /// - Throws: `APIRequestError` naming what was wrong (invalid JSON, an unknown field and
    ///   the fields allowed, a field of the wrong type and the type expected).
    public static func decode<Body: APIRequestBody>(_ type: Body.Type, from bytes: [UInt8]) throws -> Body {
        do {
            return try JSONDecoder().decode(Body.self, from: Data(bytes.isEmpty ? Array("{}".utf8) : bytes))
        } catch let error as APIRequestError {
            throw error
        } catch let DecodingError.dataCorrupted(context) where context.codingPath.isEmpty {
            throw APIRequestError("the body of \(Body.what) is not valid JSON (\(short(context.debugDescription))); send a JSON object with the fields \(list(Body.fields))")
        } catch {
            throw APIRequestError("the body of \(Body.what) is not valid: \(short("\(error)")); send a JSON object with the fields \(list(Body.fields))")
        }
    }

    /// Decodes a response body (lenient: fields a newer agentd adds are ignored).
    public static func decodeResponse<Response: Decodable>(_ type: Response.Type, from bytes: [UInt8]) throws -> Response {
        try JSONDecoder().decode(Response.self, from: Data(bytes))
    }

    static func list(_ fields: [String]) -> String {
        fields.isEmpty ? "{} (no fields)" : fields.map { "\"\($0)\"" }.joined(separator: ", ")
    }

    static func short(_ text: String) -> String { text.count > 200 ? String(text.prefix(200)) + "…" : text }
}

/// A coding key for any field name (to see every key a client sent).
struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

/// The fields of one request object, checked as they are read: the object has no field
/// outside `Body.fields`, and each field is of its type. A JSON `null` is refused like any
/// other wrong type (leave an optional field out instead), so that `null` never means
/// something by accident.
struct StrictObject<Body: APIRequestBody> {
    private let container: KeyedDecodingContainer<AnyKey>

    init(_ decoder: any Decoder) throws {
        do {
            container = try decoder.container(keyedBy: AnyKey.self)
        } catch {
            throw APIRequestError("the body of \(Body.what) must be a JSON object with the fields \(APIBody.list(Body.fields)), not \(Self.describe(decoder))")
        }
        if let unknown = container.allKeys.map(\.stringValue).sorted().first(where: { !Body.fields.contains($0) }) {
            throw APIRequestError("unknown field \"\(APIBody.short(unknown))\" in the body of \(Body.what); the fields are \(APIBody.list(Body.fields))")
        }
    }

    /// A field's raw value when present.
    private func value(_ key: String) throws -> JSONValue? {
        let k = AnyKey(stringValue: key)
        guard container.contains(k) else { return nil }
        return try container.decode(JSONValue.self, forKey: k)
    }

    private func wrong(_ key: String, _ expected: String, _ value: JSONValue) -> APIRequestError {
        APIRequestError("field \"\(key)\" in the body of \(Body.what) must be \(expected), not \(value.kindDescription)")
    }

    func string(_ key: String) throws -> String? {
        guard let v = try value(key) else { return nil }
        guard case .string(let s) = v else { throw wrong(key, "a string", v) }
        return s
    }

    func bool(_ key: String) throws -> Bool? {
        guard let v = try value(key) else { return nil }
        guard case .bool(let b) = v else { throw wrong(key, "true or false", v) }
        return b
    }

    /// An integer from 0 to 2^64-1, read from the JSON text itself (a JSONValue's Double
    /// would round large ones).
    func uint64(_ key: String) throws -> UInt64? {
        let k = AnyKey(stringValue: key)
        guard container.contains(k) else { return nil }
        if let n = try? container.decode(UInt64.self, forKey: k) { return n }
        let sent = (try? container.decode(JSONValue.self, forKey: k))?.kindDescription ?? "a number out of range"
        throw APIRequestError("field \"\(key)\" in the body of \(Body.what) must be an integer from 0 to \(UInt64.max), not \(sent)")
    }

    /// Any JSON value but `null`.
    func json(_ key: String) throws -> JSONValue? {
        guard let v = try value(key) else { return nil }
        if case .null = v { throw wrong(key, "a JSON value (leave the field out instead of null)", v) }
        return v
    }

    /// A JSON object.
    func object(_ key: String, example: String) throws -> JSONValue? {
        guard let v = try value(key) else { return nil }
        guard case .object = v else { throw wrong(key, "a JSON object (e.g. \(example))", v) }
        return v
    }

    private static func describe(_ decoder: any Decoder) -> String {
        ((try? JSONValue(from: decoder))?.kindDescription) ?? "that"
    }
}

extension JSONValue {
    /// What kind of value this is, with a short rendering: `a string ("ls")`, `null`,
    /// `the number -1`.
    public var kindDescription: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return "\(b)"
        case .number(let n): return "the number \(n == n.rounded() && abs(n) < 1e15 ? String(Int64(n)) : String(n))"
        case .string(let s): return "a string (\"\(APIBody.short(s))\")"
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}

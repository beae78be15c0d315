import Foundation

/// Any JSON value, `Sendable` and `Codable`, kept as it came: a tool's input (journaled
/// verbatim), a tool's input schema, a content block a Brain does not interpret.
public enum JSONValue: Sendable, Hashable, Codable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .number(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }

    /// Parses JSON text.
    public init(data: Data) throws {
        self = try JSONDecoder().decode(JSONValue.self, from: data)
    }

    /// Compact JSON text with sorted keys (stable, so that it reads the same in the journal).
    public var data: Data {
        // Encoding a JSONValue cannot fail: every case maps to a JSON value.
        (try? JSONValue.encoder.encode(self)) ?? Data("null".utf8)
    }

    /// The value as `JSONSerialization` objects (for request bodies built as dictionaries).
    public var foundationObject: Any {
        (try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])) ?? NSNull()
    }

    /// Converts `JSONSerialization` output to a value.
    public init(foundationObject: Any) throws {
        self = try JSONValue(data: JSONSerialization.data(withJSONObject: foundationObject, options: [.fragmentsAllowed]))
    }

    public subscript(key: String) -> JSONValue? {
        if case .object(let object) = self { object[key] } else { nil }
    }

    public var stringValue: String? {
        if case .string(let value) = self { value } else { nil }
    }

    /// Encodes compactly with sorted keys.
    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }()
}

/// True for a JSON `true`/`false` that `JSONSerialization` produced: a boolean `NSNumber`
/// (`is Bool` holds for every `NSNumber` on Linux, so numbers cannot be told apart that way).
public func isJSONBoolean(_ value: Any) -> Bool {
    String(describing: type(of: value)).contains("Boolean") || type(of: value) == Bool.self
}

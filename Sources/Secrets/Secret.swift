/// A secret value with a name. Its `description` never shows the value, so a secret that
/// ends up in a log line or an error message stays hidden.
public struct Secret: Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    /// The name that replaces the value: `[REDACTED:name]`.
    public let name: String
    /// The secret bytes.
    public let value: [UInt8]

    /// - Parameters:
    ///   - name: 1–64 characters of `[A-Za-z0-9._-]`.
    ///   - value: the secret; must not be empty.
    /// - Throws: `SecretError` for a bad name or an empty value.
    public init(name: String, value: String) throws {
        try self.init(name: name, bytes: Array(value.utf8))
    }

    /// Same as `init(name:value:)` for raw bytes.
    public init(name: String, bytes: [UInt8]) throws {
        guard !name.isEmpty, name.utf8.count <= 64, name.utf8.allSatisfy(Secret.isAllowedInName) else {
            throw SecretError("invalid secret name \"\(name)\": 1–64 characters of [A-Za-z0-9._-] are required")
        }
        guard !bytes.isEmpty else {
            throw SecretError("secret \(name) has an empty value; an empty value cannot be redacted")
        }
        self.name = name
        self.value = bytes
    }

    /// `Secret(name: [REDACTED])`: never the value.
    public var description: String { "Secret(\(name): [REDACTED])" }
    /// Same as `description`.
    public var debugDescription: String { description }

    /// `[A-Za-z0-9._-]`: the bytes a secret's name (and a session id) may contain.
    package static func isAllowedInName(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
            return true
        default:
            return false
        }
    }
}

/// Why a `Secret` could not be made: names the rule broken, never the value.
public struct SecretError: Error, Sendable, CustomStringConvertible, Equatable {
    /// What was wrong and what is required.
    public let message: String
    /// An error with its message.
    public init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}



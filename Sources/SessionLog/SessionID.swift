import Secrets

/// The identity of one session: a single path component of 1–128 characters drawn from
/// `[A-Za-z0-9._-]`, not `.` or `..`, and not starting with `.`.
///
/// Validation happens once, in the initializer, so that every `SessionID` in the system is
/// safe to use in file names, log lines and index keys.
public struct SessionID: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The validated identifier.
    public let rawValue: String

    /// The longest identifier accepted, in bytes.
    public static let maxLength = 128

    /// Validates `rawValue`.
    /// - Throws: `SessionLogError` with code `.invalidSessionID` naming the rule that failed.
    public init(_ rawValue: String) throws {
        if let problem = SessionID.problem(rawValue) {
            throw SessionLogError(.invalidSessionID, "invalid session id \(SessionID.quoted(rawValue)): \(problem)")
        }
        self.rawValue = rawValue
    }

    /// For ids read back from the journal, whose bytes were validated before they were written.
    init(unchecked rawValue: String) { self.rawValue = rawValue }

    /// Returns why `value` is not a valid id, or nil when it is.
    static func problem(_ value: String) -> String? {
        let bytes = Array(value.utf8)
        if bytes.isEmpty { return "it is empty (1–128 characters of [A-Za-z0-9._-] are required)" }
        if bytes.count > maxLength { return "it is \(bytes.count) bytes long; the limit is \(maxLength)" }
        if bytes[0] == UInt8(ascii: ".") { return "it starts with '.' (ids are single path components, and hidden names are refused)" }
        for b in bytes where !isAllowed(b) {
            return "it contains the character \(SessionID.quoted(String(decoding: [b], as: UTF8.self))); only [A-Za-z0-9._-] is allowed"
        }
        return nil
    }

    static func isAllowed(_ b: UInt8) -> Bool { Secret.isAllowedInName(b) }

    /// Parses an id from record bytes; nil when they do not form a valid id.
    static func fromBytes(_ bytes: UnsafeRawBufferPointer) -> SessionID? {
        guard !bytes.isEmpty, bytes.count <= maxLength, bytes[0] != UInt8(ascii: ".") else { return nil }
        for b in bytes where !isAllowed(b) { return nil }
        return SessionID(unchecked: String(decoding: bytes, as: UTF8.self))
    }

    private static func quoted(_ s: String) -> String {
        let shown = s.count > 40 ? String(s.prefix(40)) + "…" : s
        return "\"" + shown.unicodeScalars.map { $0.isASCII && $0.value >= 0x20 && $0.value < 0x7f ? String($0) : "\\u{\(String($0.value, radix: 16))}" }.joined() + "\""
    }

    /// The id itself.
    public var description: String { rawValue }
    /// Orders ids by their text.
    public static func < (a: SessionID, b: SessionID) -> Bool { a.rawValue < b.rawValue }
}

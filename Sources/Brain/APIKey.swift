/// The model API's key. It goes into the `x-api-key` header of model requests and nowhere
/// else: not to agentd, the journal, logs or error messages. Printed, interpolated or dumped it
/// shows `APIKey(redacted)`.
public struct APIKey: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The secret itself; read only to build the request header.
    let secret: String

    /// The key, or nil when `value` is nil or empty (an empty variable counts as unset).
    public init?(_ value: String?) {
        guard let value, !value.isEmpty else { return nil }
        secret = value
    }

    /// `$ANTHROPIC_API_KEY`.
    public static func fromEnvironment(_ environment: [String: String]) -> APIKey? {
        APIKey(environment["ANTHROPIC_API_KEY"])
    }

    public var description: String { "APIKey(redacted)" }
    public var debugDescription: String { description }
    public var customMirror: Mirror { Mirror(self, children: [], displayStyle: .struct) }

    /// `text` with every occurrence of the key replaced, for messages that quote a server's
    /// answer (a server might echo what it was sent).
    func redact(_ text: String) -> String {
        text.replacingOccurrences(of: secret, with: "[redacted]")
    }
}

import AgentdClient

/// The one error type of `Brain`: what stopped the Brain, said so that the user knows what to
/// do. Never contains the API key.
public struct BrainError: Error, Sendable, CustomStringConvertible {
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The model API refused the key (HTTP 401/403).
        public static let authentication = Code(rawValue: "authentication")
        /// The model API refused the request or failed after all retries.
        public static let modelAPI = Code(rawValue: "model-api")
        /// The model's answer is not a Messages API response, or a script has no turn left.
        public static let badModelAnswer = Code(rawValue: "bad-model-answer")
        /// Another Brain woke the session: this one's lease epoch is stale.
        public static let staleLease = Code(rawValue: "stale-lease")
        /// agentd refused a call or could not be reached.
        public static let agentd = Code(rawValue: "agentd")
        /// The session's checkpoint is not a conversation this harness can continue.
        public static let badCheckpoint = Code(rawValue: "bad-checkpoint")
        /// `--max-turns` model turns passed without a final answer.
        public static let turnLimit = Code(rawValue: "turn-limit")
        /// A scripted model's file cannot be read.
        public static let badScript = Code(rawValue: "bad-script")
    }

    public let code: Code
    public let message: String
    /// What failed underneath, when something did.
    public let cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String { message }

    /// Whether the session keeps a conversation that `agentctl run --session ID` can continue
    /// (false when another Brain drives it now).
    public var isResumable: Bool { code != .staleLease && code != .badCheckpoint }

    /// agentd's refusal in Brain terms: a stale epoch (409) means another Brain took over.
    static func agentd(_ error: AgentdClientError, session: String) -> BrainError {
        if error.status == 409 {
            return BrainError(
                .staleLease,
                "another Brain woke session \(session) and drives it now (agentd: \(error.message)); this Brain stops — its work so far is in the session's journal",
                cause: error)
        }
        return BrainError(.agentd, error.message, cause: error)
    }
}

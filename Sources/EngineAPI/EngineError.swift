/// The one error type of `EngineAPI`.
///
/// Transport failures (the socket is missing, the connection broke, a timeout), HTTP failures
/// (the engine answered with a status ≥ 400; its own message is kept verbatim) and decoding
/// failures (the engine answered 2xx with a body we do not understand) stay apart in `code`,
/// so that callers can decide, for instance, that `.unreachable` means "provision again later"
/// while `.http` with status 404 means "no such image".
public struct EngineError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is. Extensible: match on the static members.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The engine's socket or address could not be reached at all.
        public static let unreachable = Code("unreachable")
        /// The request did not finish within its timeout.
        public static let timeout = Code("timeout")
        /// The calling task was cancelled; the request was aborted.
        public static let cancelled = Code("cancelled")
        /// Any other transport failure (connection reset, protocol error).
        public static let transport = Code("transport")
        /// The engine answered with an HTTP error status; `status` and `engineMessage` are set.
        public static let http = Code("http")
        /// The engine answered, but not in the format of the Docker Engine API.
        public static let decoding = Code("decoding")
        /// The caller passed something the engine cannot be asked for.
        public static let invalidArgument = Code("invalid-argument")
    }

    public let code: Code
    /// A human message that says what failed and, where possible, what to do.
    public let message: String
    /// The HTTP status, for `.http`.
    public let status: Int?
    /// The engine's own error message (the `message` field of its JSON body, or the raw body).
    public let engineMessage: String?
    /// The underlying error, if any.
    public let cause: (any Error & Sendable)?

    public init(
        _ code: Code, _ message: String, status: Int? = nil, engineMessage: String? = nil,
        cause: (any Error & Sendable)? = nil
    ) {
        self.code = code
        self.message = message
        self.status = status
        self.engineMessage = engineMessage
        self.cause = cause
    }

    public var description: String { message }

    /// True for an HTTP 404 from the engine (no such container, image or exec).
    public var isNotFound: Bool { code == .http && status == 404 }
}

extension EngineError {
    /// The engine error for a request that got no HTTP answer, with what to do about it.
    init(transportError error: HTTPClientError, endpoint: EngineEndpoint) {
        switch error.code {
        case .unreachable:
            self.init(
                .unreachable,
                "cannot reach the container engine: \(error.message) — is it running? Run `make env` (it starts `podman system service`) and export the AGENTD_ENGINE it prints",
                cause: error)
        case .timeout: self.init(.timeout, "the container engine at \(endpoint) did not answer in time: \(error.message)", cause: error)
        case .cancelled: self.init(.cancelled, error.message, cause: error)
        case .transport: self.init(.transport, "talking to the container engine at \(endpoint): \(error.message)", cause: error)
        case .invalidArgument: self.init(.invalidArgument, error.message, cause: error)
        }
    }
}

import CurlHTTP

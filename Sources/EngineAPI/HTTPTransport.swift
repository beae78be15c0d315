/// One HTTP request to the engine. The body is either in memory or streamed from a file (an
/// image tarball can be large).
public struct HTTPRequest: Sendable {
    public enum Body: Sendable {
        case none
        case bytes([UInt8], contentType: String)
        case file(path: String, contentType: String)
    }

    public var method: String
    /// Path and query, e.g. `/v1.41/containers/create?name=x`.
    public var target: String
    public var body: Body
    /// The whole request, connection included, must finish within this.
    public var timeout: Duration
    /// Response bodies larger than this are cut (the response says so); protects memory.
    public var maxResponseBytes: Int

    public init(
        method: String, target: String, body: Body = .none, timeout: Duration = .seconds(60),
        maxResponseBytes: Int = 64 << 20
    ) {
        self.method = method
        self.target = target
        self.body = body
        self.timeout = timeout
        self.maxResponseBytes = maxResponseBytes
    }
}

/// The engine's answer.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var body: [UInt8]
    /// True when the body was longer than the request's `maxResponseBytes` and was cut.
    public var truncated: Bool

    public init(status: Int, body: [UInt8], truncated: Bool = false) {
        self.status = status
        self.body = body
        self.truncated = truncated
    }
}

/// The seam between the typed client and the wire: `CurlTransport` in production. Tests of
/// client logic may serve a real socket instead; integration tests use the real engine.
public protocol HTTPTransport: Sendable {
    /// Sends `request` and returns the response, whatever its status.
    /// - Throws: `EngineError` with `.unreachable`, `.timeout`, `.cancelled` or `.transport`.
    func send(_ request: HTTPRequest) async throws -> HTTPResponse
}

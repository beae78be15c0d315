import Foundation

/// Where an HTTP server listens: a unix socket, or a base URL (`http://host:port`,
/// `https://host`).
public enum HTTPEndpoint: Sendable, Hashable, CustomStringConvertible {
    case unixSocket(path: String)
    case url(String)

    public var description: String {
        switch self {
        case .unixSocket(let path): "unix://\(path)"
        case .url(let base): base
        }
    }
}

/// One HTTP request. The body is either in memory or streamed from a file (an image tarball
/// can be large).
public struct HTTPRequest: Sendable {
    public enum Body: Sendable {
        case none
        case bytes([UInt8], contentType: String)
        case file(path: String, contentType: String)
    }

    public var method: String
    /// Path and query, e.g. `/v1.41/containers/create?name=x`.
    public var target: String
    /// Extra header lines, e.g. `("Authorization", "Bearer …")`.
    public var headers: [(String, String)] = []
    /// When set, the response body is handed over in pieces as it arrives (server-sent events)
    /// instead of being collected; the call returns when the server ends the response. It is
    /// called on the transport's loop thread, which serves every request: keep it quick.
    public var onData: (@Sendable ([UInt8]) -> Void)?
    /// When set, called as the request body goes out with (bytes sent, bytes in all), from
    /// libcurl's thread, several times a second at most: progress of a large upload.
    public var onUploadProgress: (@Sendable (_ sent: Int64, _ total: Int64) -> Void)?
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

/// The server's answer.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var body: [UInt8]
    /// True when the body was longer than the request's `maxResponseBytes` and was cut.
    public var truncated: Bool
    /// The header fields as (name, value), in the order the server sent them.
    public var headers: [(String, String)]

    public init(status: Int, body: [UInt8], truncated: Bool = false, headers: [(String, String)] = []) {
        self.status = status
        self.body = body
        self.truncated = truncated
        self.headers = headers
    }

    /// The first value of header field `name` (case-insensitive).
    public func header(_ name: String) -> String? {
        headers.first { $0.0.caseInsensitiveCompare(name) == .orderedSame }?.1
    }
}

/// The seam between typed clients and the wire: `CurlTransport` in production. Tests of
/// client logic may serve a real socket instead; integration tests use the real servers.
public protocol HTTPTransport: Sendable {
    /// Where requests go.
    var endpoint: HTTPEndpoint { get }
    /// Sends `request` and returns the response, whatever its status.
    /// - Throws: `HTTPClientError` with `.unreachable`, `.timeout`, `.cancelled` or `.transport`.
    func send(_ request: HTTPRequest) async throws -> HTTPResponse
}

/// The one error type of `CurlHTTP`: the request did not get an HTTP answer.
public struct HTTPClientError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// Nothing listens at the endpoint (no socket, connection refused, no such host).
        case unreachable
        case timeout
        case cancelled
        /// The connection broke or the server spoke no HTTP.
        case transport
        /// The request could not be sent as given (a body file that cannot be opened).
        case invalidArgument = "invalid-argument"
    }

    public let code: Code
    public let message: String
    /// libcurl's error code, when the failure came from libcurl.
    public let curlCode: Int?

    public init(_ code: Code, _ message: String, curlCode: Int? = nil) {
        self.code = code
        self.message = message
        self.curlCode = curlCode
    }

    public var description: String { message }
}

/// Where the container engine's Docker-compatible API listens.
///
/// Written as `unix:///path/to/engine.sock` (or a bare absolute path), `tcp://host:port` or
/// `http://host:port` — the forms of `DOCKER_HOST` and of `make env`'s `AGENTD_ENGINE` line.
public enum EngineEndpoint: Sendable, Hashable, CustomStringConvertible {
    case unixSocket(path: String)
    case tcp(host: String, port: Int)

    /// The environment variable read by `fromEnvironment()`.
    public static let environmentVariable = "AGENTD_ENGINE"

    /// Parses an endpoint string.
    /// - Throws: `EngineError.invalidArgument` naming the text and the accepted forms.
    public init(parsing text: String) throws {
        let t = text.trimmingCharacters(in: .whitespaces)
        if t.hasPrefix("unix://") {
            let path = String(t.dropFirst("unix://".count))
            guard path.hasPrefix("/") else { throw Self.bad(text) }
            self = .unixSocket(path: path)
        } else if t.hasPrefix("/") {
            self = .unixSocket(path: t)
        } else if t.hasPrefix("tcp://") || t.hasPrefix("http://") {
            let rest = t.split(separator: "/", maxSplits: 3, omittingEmptySubsequences: false)
            guard rest.count >= 3 else { throw Self.bad(text) }
            let hostPort = rest[2]
            guard let colon = hostPort.lastIndex(of: ":"), let port = Int(hostPort[hostPort.index(after: colon)...]),
                (1...65535).contains(port), colon != hostPort.startIndex
            else { throw Self.bad(text) }
            self = .tcp(host: String(hostPort[..<colon]), port: port)
        } else {
            throw Self.bad(text)
        }
    }

    private static func bad(_ text: String) -> EngineError {
        EngineError(
            .invalidArgument,
            "'\(text)' is not a container engine address; use unix:///path/to/podman.sock or tcp://host:port")
    }

    public var description: String {
        switch self {
        case .unixSocket(let path): "unix://\(path)"
        case .tcp(let host, let port): "tcp://\(host):\(port)"
        }
    }
}

import Foundation

extension EngineEndpoint {
    /// The endpoint in libcurl's terms.
    var http: HTTPEndpoint {
        switch self {
        case .unixSocket(let path): .unixSocket(path: path)
        case .tcp(let host, let port): .url("http://\(host):\(port)")
        }
    }
}

import CurlHTTP

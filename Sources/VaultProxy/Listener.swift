import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// Limits and hooks of a proxy.
public struct ProxyConfiguration: Sendable {
    /// Largest request head (request line and headers) accepted; larger gets 400.
    public var maxHeaderBytes = 32 * 1024
    /// A connection (client or upstream, or a tunnel) with no traffic this long is closed.
    public var idleTimeout: TimeAmount = .seconds(300)
    /// Longest wait for an upstream's TCP connection.
    public var connectTimeout: TimeAmount = .seconds(15)
    /// Idle upstream connections a sandbox keeps per upstream (host, port, CAs, SNI) for its
    /// next route requests; 0 turns the pool off (every request connects anew).
    public var idleUpstreamConnectionsPerHost = 4
    /// A pooled upstream connection unused this long is closed.
    public var upstreamIdleTimeout: TimeAmount = .seconds(30)
    /// Open connections per sandbox listener; more are closed at once.
    public var maxConnectionsPerListener = 128
    /// Longest command list a git route reads at the start of a push (more gets 400).
    public var gitCommandListLimit = 64 * 1024
    /// A refused push's body is read and discarded up to this many bytes, or for this long,
    /// before the report goes back (then the connection closes, whatever is left unsent).
    public var gitRefusedPushDrainLimit: Int64 = 256 << 20
    public var gitRefusedPushDrainTimeout: TimeAmount = .seconds(60)
    /// Resolves CONNECT host names; its answers are checked (no private addresses).
    public var resolver: any HostResolver = SystemResolver()
    /// Canonical host name → addresses used for CONNECT *without* the address check. For tests
    /// that must reach a loopback upstream through an allowlisted name; never set in service.
    public var trustedOverrides: [String: [IPAddress]] = [:]

    public init() {}
}

/// Resolves a host name to addresses (the proxy then checks and dials exactly those).
public protocol HostResolver: Sendable {
    func resolve(_ host: String) async throws -> [IPAddress]
}

/// `getaddrinfo` on a thread of its own (it blocks).
public struct SystemResolver: HostResolver {
    public init() {}

    public func resolve(_ host: String) async throws -> [IPAddress] {
        try await withCheckedThrowingContinuation { continuation in
            let thread = NIOThreadPool.singleton
            thread.submit { _ in
                continuation.resume(with: Result { try SystemResolver.lookup(host) })
            }
        }
    }

    static func lookup(_ host: String) throws -> [IPAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, nil, &hints, &result)
        guard rc == 0, let first = result else {
            throw ProxyError("cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(first) }
        var addresses: [IPAddress] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor {
            if info.pointee.ai_family == AF_INET, let sa = info.pointee.ai_addr {
                let a = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
                addresses.append(.v4(UInt32(bigEndian: a)))
            } else if info.pointee.ai_family == AF_INET6, let sa = info.pointee.ai_addr {
                let bytes = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in withUnsafeBytes(of: p.pointee.sin6_addr) { Array($0) } }
                addresses.append(.v6(bytes))
            }
            cursor = info.pointee.ai_next
        }
        var unique: [IPAddress] = []
        for a in addresses where !unique.contains(a) { unique.append(a) }
        return unique
    }
}

/// What one listener knows: its sandbox, policy rules, and the proxy's shared state.
final class ListenerContext: Sendable {
    let spec: SandboxSpec
    let routes: [String: ResolvedRoute]
    let patterns: [HostPattern]
    let ports: [Int]
    let proxy: ProxyCore
    /// Open connections of this listener, closed when the sandbox is removed.
    let connections = NIOLockedValueBox<[ObjectIdentifier: any Channel]>([:])
    /// This sandbox's idle upstream connections (never shared with another sandbox).
    let pool: UpstreamPool
    /// Task and `tool.intent` seq, set by agentd as the sandbox's calls come and go.
    let intent: NIOLockedValueBox<(task: String?, seq: Int64?)>

    init(spec: SandboxSpec, proxy: ProxyCore) throws(ProxyError) {
        self.spec = spec
        self.proxy = proxy
        pool = UpstreamPool(maxIdlePerKey: proxy.configuration.idleUpstreamConnectionsPerHost, idleTimeout: proxy.configuration.upstreamIdleTimeout)
        var routes: [String: ResolvedRoute] = [:]
        for rule in spec.routes {
            guard routes[rule.name] == nil else { throw ProxyError("route '\(rule.name)' is defined twice") }
            routes[rule.name] = try ResolvedRoute(rule)
        }
        self.routes = routes
        var patterns: [HostPattern] = []
        for entry in spec.network.allowHosts {
            guard let p = HostPattern(entry) else { throw ProxyError("network.allowHosts entry '\(entry)' is not host, host:port, *.domain or an IP literal") }
            patterns.append(p)
        }
        self.patterns = patterns
        let ports = spec.network.ports ?? [443]
        guard ports.allSatisfy({ (1...65535).contains($0) }) else { throw ProxyError("network.ports must be 1–65535") }
        self.ports = ports
        intent = NIOLockedValueBox((spec.task, nil))
    }

    /// A fresh event with this sandbox's identity and current intent.
    func event(allowed: Bool, method: String, host: String, rule: String, status: Int) -> EgressEvent {
        let (task, seq) = intent.withLockedValue { $0 }
        return EgressEvent(
            type: allowed ? "egress.allowed" : "egress.denied", sandbox: spec.sandbox, session: spec.session, task: task,
            toolIntentSeq: seq, method: method, host: host, route: nil, path: nil, credential: nil, rule: rule, status: status,
            bytesUp: 0, bytesDown: 0, durationMs: 0)
    }

    /// `egress to HOST refused by policy P: RULE`.
    func refusal(_ host: String, _ rule: String) -> String {
        "egress to \(host) refused by policy \(spec.policy): \(rule)\n"
    }
}

/// The outcome of checking a CONNECT target.
enum ConnectCheck {
    case refused(status: Int, host: String, rule: String)
    /// Allowed by `rule`; dial one of `addresses` (nil: resolve `name` and check the answers).
    case allowed(host: CheckedHost, port: Int, rule: String)
}

extension ListenerContext {
    /// Parses and checks a CONNECT target (`host:port`, `[v6]:port`) against the policy.
    func checkConnect(_ target: String) -> ConnectCheck {
        var hostText: Substring
        let portText: Substring
        if target.hasPrefix("[") {
            guard let close = target.firstIndex(of: "]"), target[target.index(after: close)...].hasPrefix(":") else {
                return .refused(status: 400, host: target, rule: "malformed CONNECT target (expected host:port)")
            }
            hostText = target[...close]
            portText = target[target.index(close, offsetBy: 2)...]
        } else {
            guard let colon = target.lastIndex(of: ":") else {
                return .refused(status: 400, host: target, rule: "malformed CONNECT target (expected host:port)")
            }
            hostText = target[..<colon]
            portText = target[target.index(after: colon)...]
        }
        guard !portText.isEmpty, portText.count <= 5, portText.allSatisfy(\.isASCII), portText.allSatisfy(\.isNumber),
            let port = Int(portText), (1...65535).contains(port)
        else {
            return .refused(status: 400, host: target, rule: "malformed CONNECT target (expected host:port)")
        }
        if hostText.hasSuffix(".") && !hostText.hasPrefix("[") { hostText = hostText.dropLast() }
        let host: CheckedHost
        if let literal = IPAddress(literal: String(hostText)) {
            host = .address(literal)
        } else if let name = HostName.canonical(String(hostText)) {
            host = .name(name)
        } else {
            return .refused(status: 403, host: target, rule: "'\(hostText)' is not a valid host name")
        }
        let shown = "\(host):\(port)"
        if let index = patterns.indices.first(where: { patterns[$0].allows(host, port: port, defaultPorts: ports) }) {
            return .allowed(host: host, port: port, rule: "network.allowHosts \(spec.network.allowHosts[index])")
        }
        let naming = patterns.filter { $0.names(host) }
        if !naming.isEmpty {
            var allowed: [Int] = []
            for p in naming {
                for candidate in p.entryPort.map({ [$0] }) ?? ports where !allowed.contains(candidate) { allowed.append(candidate) }
            }
            return .refused(
                status: 403, host: shown,
                rule: "port \(port) is not allowed for \(host) (allowed: \(allowed.sorted().map(String.init).joined(separator: ", ")))")
        }
        if case .address = host {
            return .refused(status: 403, host: shown, rule: "IP literals are refused unless network.allowHosts lists them")
        }
        return .refused(status: 403, host: shown, rule: "not in network.allowHosts")
    }
}

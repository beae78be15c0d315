/// A sandbox's network rules as agentd sends them in `addSandbox` (see README).
public struct NetworkRules: Codable, Sendable, Hashable {
    /// `host`, `host:port`, `*.domain` or an IP literal (`10.1.2.3`, `[2001:db8::1]:8443`).
    public var allowHosts: [String]
    /// Ports CONNECT may reach for entries without a port; default `[443]`.
    public var ports: [Int]?

    public init(allowHosts: [String] = [], ports: [Int]? = nil) {
        self.allowHosts = allowHosts
        self.ports = ports
    }
}

/// A route as agentd sends it in `addSandbox`.
public struct RouteRule: Codable, Sendable, Hashable {
    public var name: String
    /// `https://host[:port][/prefix]`.
    public var upstream: String
    /// The name of a credential sent with `credentials`; nil for a route without one.
    public var credential: String?
    /// `Header-Name: text with {{credential}}`; default `Authorization: Bearer {{credential}}`.
    public var header: String?
    /// A PEM file of CA certificates the upstream is verified against instead of the system's.
    public var caFile: String?
    /// The same as PEM text (agentd reads `caFile` and sends this, so the proxy opens no
    /// file); takes precedence over `caFile`.
    public var ca: String?
    /// Makes this a git route: only this repository's smart-HTTP endpoints, pushes checked
    /// against its ref policy. nil: any path below the upstream.
    public var git: GitRouteRule?

    public init(
        name: String, upstream: String, credential: String? = nil, header: String? = nil, caFile: String? = nil, ca: String? = nil,
        git: GitRouteRule? = nil
    ) {
        self.name = name
        self.upstream = upstream
        self.credential = credential
        self.header = header
        self.caFile = caFile
        self.ca = ca
        self.git = git
    }
}

/// An `allowHosts` entry, parsed once when the sandbox is added.
enum HostPattern: Hashable, Sendable {
    case exact(String, port: Int?)
    case suffix(String, port: Int?)
    case address(IPAddress, port: Int?)

    /// Parses `host`, `host:port`, `*.domain[:port]`, `a.b.c.d[:port]`, `[v6]` or `[v6]:port`.
    init?(_ text: String) {
        var hostPart = Substring(text)
        var port: Int?
        if hostPart.hasPrefix("[") {
            guard let close = hostPart.firstIndex(of: "]") else { return nil }
            let after = hostPart[hostPart.index(after: close)...]
            if after.hasPrefix(":") {
                guard let p = Int(after.dropFirst()), (1...65535).contains(p) else { return nil }
                port = p
            } else if !after.isEmpty { return nil }
            hostPart = hostPart[...close]
        } else if let colon = hostPart.lastIndex(of: ":"), hostPart.firstIndex(of: ":") == colon {
            guard let p = Int(hostPart[hostPart.index(after: colon)...]), (1...65535).contains(p) else { return nil }
            port = p
            hostPart = hostPart[..<colon]
        }
        if let address = IPAddress(literal: String(hostPart)) {
            self = .address(address, port: port)
        } else if hostPart.hasPrefix("*.") {
            guard let domain = HostName.canonical(String(hostPart.dropFirst(2))) else { return nil }
            self = .suffix(domain, port: port)
        } else {
            guard let host = HostName.canonical(String(hostPart)) else { return nil }
            self = .exact(host, port: port)
        }
    }

    /// The port this entry is limited to, if any.
    var entryPort: Int? {
        switch self {
        case .exact(_, let p), .suffix(_, let p), .address(_, let p): return p
        }
    }

    /// Whether this entry names `host` (canonical name or literal), regardless of port.
    func names(_ target: CheckedHost) -> Bool {
        switch (self, target) {
        case (.exact(let h, _), .name(let n)): return h == n
        case (.suffix(let d, _), .name(let n)): return n.hasSuffix("." + d)
        case (.address(let a, _), .address(let b)): return a == b
        default: return false
        }
    }

    func allows(_ target: CheckedHost, port: Int, defaultPorts: [Int]) -> Bool {
        guard names(target) else { return false }
        if let p = entryPort { return p == port }
        return defaultPorts.contains(port)
    }
}

/// A CONNECT target after parsing: a canonical name or an IP literal.
enum CheckedHost: Hashable, Sendable, CustomStringConvertible {
    case name(String)
    case address(IPAddress)

    var description: String {
        switch self {
        case .name(let n): return n
        case .address(.v6(let b)): return "[\(IPAddress.v6(b))]"
        case .address(let a): return a.description
        }
    }
}

/// A route ready to use: its upstream split up and its header template checked.
struct ResolvedRoute: Sendable {
    let rule: RouteRule
    let host: String
    let port: Int
    /// The upstream's path prefix without a trailing `/` ("" for none).
    let prefix: String
    let headerName: String
    let headerTemplate: String
    /// `headerTemplate` split at each `{{credential}}`: the value is these joined by the credential.
    let headerParts: [String]
    /// The route's git restriction, if it is a git route.
    let git: ResolvedGitRoute?
    /// Whether the upstream is an IP literal (no server name is sent, and the certificate's IP
    /// SANs are checked).
    let isLiteralHost: Bool
    /// The `Host` header for the upstream.
    let hostHeader: String
    /// Which idle upstream connections can carry this route's requests.
    let poolKey: UpstreamPool.Key

    init(_ rule: RouteRule) throws(ProxyError) {
        self.rule = rule
        if let gitRule = rule.git { git = try ResolvedGitRoute(gitRule, route: rule.name) } else { git = nil }
        guard RouteRule.validName(rule.name) else {
            throw ProxyError("route name '\(rule.name)' must be 1–64 characters of [A-Za-z0-9._-]")
        }
        let upstream = rule.upstream
        guard upstream.lowercased().hasPrefix("https://") else {
            throw ProxyError("route '\(rule.name)': upstream '\(upstream)' must start with https://")
        }
        let rest = upstream.dropFirst("https://".count)
        let authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        var path = String(rest.dropFirst(authority.count))
        guard !path.contains("?"), !path.contains("#"), !authority.contains("@") else {
            throw ProxyError("route '\(rule.name)': upstream '\(upstream)' must be https://host[:port][/prefix] without query, fragment or user")
        }
        while path.hasSuffix("/") { path.removeLast() }
        prefix = path
        var hostText = Substring(authority)
        var port = 443
        if let colon = hostText.lastIndex(of: ":"), !hostText.hasSuffix("]") {
            guard let p = Int(hostText[hostText.index(after: colon)...]), (1...65535).contains(p) else {
                throw ProxyError("route '\(rule.name)': upstream '\(upstream)' has a bad port")
            }
            port = p
            hostText = hostText[..<colon]
        }
        if hostText.hasPrefix("[") { hostText = hostText.dropFirst().dropLast() }
        let host: String
        if let literal = IPAddress(literal: String(hostText)) {
            host = literal.description
        } else if let name = HostName.canonical(String(hostText)) {
            host = name
        } else {
            throw ProxyError("route '\(rule.name)': upstream '\(upstream)' has no valid host")
        }
        self.host = host
        self.port = port
        isLiteralHost = IPAddress(literal: host) != nil
        let bracketed = host.contains(":") ? "[\(host)]" : host
        hostHeader = port == 443 ? bracketed : "\(bracketed):\(port)"
        poolKey = UpstreamPool.Key(host: host, port: port, trust: rule.trustKey, serverName: isLiteralHost ? nil : host)
        if rule.credential != nil {
            let header = rule.header ?? "Authorization: Bearer {{credential}}"
            guard let colon = header.firstIndex(of: ":") else {
                throw ProxyError("route '\(rule.name)': header template must be 'Name: value with {{credential}}'")
            }
            headerName = String(header[..<colon]).trimmingCharacters(in: " \t")
            headerTemplate = String(header[header.index(after: colon)...]).trimmingCharacters(in: " \t")
            guard !headerName.isEmpty, headerName.utf8.allSatisfy(ResolvedRoute.isTokenByte),
                headerTemplate.contains("{{credential}}"), !headerTemplate.contains("\r"), !headerTemplate.contains("\n")
            else {
                throw ProxyError("route '\(rule.name)': header template must be 'Name: value with {{credential}}'")
            }
        } else {
            headerName = ""
            headerTemplate = ""
        }
        headerParts = headerTemplate.split(separator: "{{credential}}", omittingEmptySubsequences: false).map(String.init)
    }

    static func isTokenByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || "!#$%&'*+-.^_`|~".utf8.contains(b)
    }
}

extension RouteRule {
    static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 64
            && name.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D }
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

/// The one error type of `VaultProxy`: a message safe to show (it never holds a credential).
public struct ProxyError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A sandbox as agentd announces it (`addSandbox`): who it is, its policy's network rules
/// and routes, and where its listener goes.
public struct SandboxSpec: Codable, Sendable, Hashable {
    public var sandbox: String
    public var session: String
    public var task: String?
    public var policy: String
    /// The unix socket to listen on, inside a directory of this sandbox's own.
    public var socketPath: String
    public var network: NetworkRules
    public var routes: [RouteRule]

    public init(
        sandbox: String, session: String, task: String? = nil, policy: String, socketPath: String,
        network: NetworkRules = NetworkRules(), routes: [RouteRule] = []
    ) {
        self.sandbox = sandbox
        self.session = session
        self.task = task
        self.policy = policy
        self.socketPath = socketPath
        self.network = network
        self.routes = routes
    }
}

/// One egress decision (`egress.allowed` / `egress.denied`), sent back to agentd, which
/// journals it in the sandbox's session with the `tool.intent` seq it names.
public struct EgressEvent: Codable, Sendable, Hashable {
    /// `egress.allowed` or `egress.denied`.
    public var type: String
    public var sandbox: String
    public var session: String
    public var task: String?
    /// The `tool.intent` seq agentd last set for this sandbox (`setIntent`), if any.
    public var toolIntentSeq: Int64?
    /// `CONNECT`, `GET`, `POST` …
    public var method: String
    /// Canonical `host:port` (the upstream for a route, the target for CONNECT; as sent when
    /// it could not be parsed).
    public var host: String
    public var route: String?
    /// The path (for a route, below the route name) with any query replaced by `?[REDACTED]`.
    public var path: String?
    /// The credential's name (never its value).
    public var credential: String?
    /// Why: `route github`, `network.allowHosts pypi.org`, or the refusal's rule.
    public var rule: String
    /// The status the sandbox got (200 for an established tunnel).
    public var status: Int
    /// Bytes from the sandbox to the upstream (request body or tunnel), and back.
    public var bytesUp: Int64
    public var bytesDown: Int64
    public var durationMs: Int64
}

extension EgressEvent {
    /// The control channel's line for this event (`{"type":"egress","event":{…}}` and `\n`),
    /// written directly: the proxy sends one per request, and `JSONEncoder` cost more than the
    /// rest of a small request's handling. Same JSON as the `Codable` form; absent optionals
    /// are left out.
    func line() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(320 + rule.utf8.count + (path?.utf8.count ?? 0))
        out += #"{"type":"egress","event":{"type":"#.utf8
        Self.string(type, into: &out)
        func key(_ name: StaticString) {
            out.append(0x2C)
            Self.string(name, into: &out)
            out.append(0x3A)
        }
        for (name, value) in [("sandbox", sandbox), ("session", session), ("task", task)] as [(StaticString, String?)] {
            if let value { key(name); Self.string(value, into: &out) }
        }
        if let toolIntentSeq { key("toolIntentSeq"); out += String(toolIntentSeq).utf8 }
        for (name, value) in [("method", method), ("host", host), ("route", route), ("path", path), ("credential", credential), ("rule", rule)]
            as [(StaticString, String?)]
        {
            if let value { key(name); Self.string(value, into: &out) }
        }
        for (name, value) in [("status", Int64(status)), ("bytesUp", bytesUp), ("bytesDown", bytesDown), ("durationMs", durationMs)] as [(StaticString, Int64)] {
            key(name)
            out += String(value).utf8
        }
        out += "}}\n".utf8
        return out
    }

    private static func string(_ key: StaticString, into out: inout [UInt8]) {
        out.append(0x22)
        key.withUTF8Buffer { out += $0 }
        out.append(0x22)
    }

    /// A JSON string: `"` and `\` escaped, control characters as `\u00XX`, the rest as UTF-8.
    private static func string(_ value: String, into out: inout [UInt8]) {
        out.append(0x22)
        for b in value.utf8 {
            switch b {
            case 0x22, 0x5C: out += [0x5C, b]
            case 0x00..<0x20: out += [0x5C, 0x75, 0x30, 0x30, hexDigits[Int(b >> 4)], hexDigits[Int(b & 0x0F)]]
            default: out.append(b)
            }
        }
        out.append(0x22)
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)
}

/// Messages on the control channel, one JSON object per line (newline-delimited JSON; JSON
/// strings escape newlines, so a line is a message). `type` says which. See README.
public enum ControlMessage: Sendable {
    /// agentd → proxy: credential values by name; merged into those known.
    case credentials(id: Int64?, [String: String])
    /// agentd → proxy: a sandbox and its rules; `listenerFD`: its listening socket comes with
    /// the line (SCM_RIGHTS) instead of the proxy binding `socketPath` itself.
    case addSandbox(id: Int64?, SandboxSpec, listenerFD: Bool = false)
    case removeSandbox(id: Int64?, sandbox: String)
    /// agentd → proxy: the current task and `tool.intent` seq of a sandbox (seq nil: none).
    case setIntent(id: Int64?, sandbox: String, task: String?, seq: Int64?)
    /// proxy → agentd.
    case ready
    case ok(id: Int64?)
    case error(id: Int64?, message: String)
    case egress(EgressEvent)
}

extension ControlMessage: CustomStringConvertible {
    /// Never shows a credential value.
    public var description: String {
        switch self {
        case .credentials(let id, let values): return "credentials(id: \(id.map(String.init) ?? "-"), names: \(values.keys.sorted()))"
        case .addSandbox(let id, let spec, _): return "addSandbox(id: \(id.map(String.init) ?? "-"), sandbox: \(spec.sandbox))"
        case .removeSandbox(let id, let sandbox): return "removeSandbox(id: \(id.map(String.init) ?? "-"), sandbox: \(sandbox))"
        case .setIntent(_, let sandbox, let task, let seq): return "setIntent(sandbox: \(sandbox), task: \(task ?? "-"), seq: \(seq.map(String.init) ?? "-"))"
        case .ready: return "ready"
        case .ok(let id): return "ok(\(id.map(String.init) ?? "-"))"
        case .error(let id, let message): return "error(\(id.map(String.init) ?? "-"): \(message))"
        case .egress(let e): return "egress(\(e.type) \(e.method) \(e.host))"
        }
    }
}

extension ControlMessage: Codable {
    private enum Keys: String, CodingKey {
        case type, id, credentials, sandbox, task, seq, message, event
        case session, policy, socketPath, network, routes, listenerFD
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        let type = try c.decode(String.self, forKey: .type)
        let id = try c.decodeIfPresent(Int64.self, forKey: .id)
        switch type {
        case "credentials": self = .credentials(id: id, try c.decode([String: String].self, forKey: .credentials))
        case "addSandbox":
            self = .addSandbox(id: id, try SandboxSpec(from: decoder), listenerFD: try c.decodeIfPresent(Bool.self, forKey: .listenerFD) ?? false)
        case "removeSandbox": self = .removeSandbox(id: id, sandbox: try c.decode(String.self, forKey: .sandbox))
        case "setIntent":
            self = .setIntent(
                id: id, sandbox: try c.decode(String.self, forKey: .sandbox), task: try c.decodeIfPresent(String.self, forKey: .task),
                seq: try c.decodeIfPresent(Int64.self, forKey: .seq))
        case "ready": self = .ready
        case "ok": self = .ok(id: id)
        case "error": self = .error(id: id, message: try c.decode(String.self, forKey: .message))
        case "egress": self = .egress(try c.decode(EgressEvent.self, forKey: .event))
        default:
            throw DecodingError.dataCorruptedError(
                forKey: .type, in: c,
                debugDescription: "unknown message type '\(type)' (credentials, addSandbox, removeSandbox, setIntent)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        switch self {
        case .credentials(let id, let values):
            try c.encode("credentials", forKey: .type)
            try c.encodeIfPresent(id, forKey: .id)
            try c.encode(values, forKey: .credentials)
        case .addSandbox(let id, let spec, let listenerFD):
            try c.encode("addSandbox", forKey: .type)
            try c.encodeIfPresent(id, forKey: .id)
            if listenerFD { try c.encode(true, forKey: .listenerFD) }
            try spec.encode(to: encoder)
        case .removeSandbox(let id, let sandbox):
            try c.encode("removeSandbox", forKey: .type)
            try c.encodeIfPresent(id, forKey: .id)
            try c.encode(sandbox, forKey: .sandbox)
        case .setIntent(let id, let sandbox, let task, let seq):
            try c.encode("setIntent", forKey: .type)
            try c.encodeIfPresent(id, forKey: .id)
            try c.encode(sandbox, forKey: .sandbox)
            try c.encodeIfPresent(task, forKey: .task)
            try c.encodeIfPresent(seq, forKey: .seq)
        case .ready:
            try c.encode("ready", forKey: .type)
        case .ok(let id):
            try c.encode("ok", forKey: .type)
            try c.encodeIfPresent(id, forKey: .id)
        case .error(let id, let message):
            try c.encode("error", forKey: .type)
            try c.encodeIfPresent(id, forKey: .id)
            try c.encode(message, forKey: .message)
        case .egress(let event):
            try c.encode("egress", forKey: .type)
            try c.encode(event, forKey: .event)
        }
    }

    /// One line of the channel: the JSON object and `\n`.
    public func line() -> [UInt8] {
        if case .egress(let event) = self { return event.line() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var bytes = Array((try? encoder.encode(self)) ?? Data("{\"type\":\"error\",\"message\":\"unencodable message\"}".utf8))
        bytes.append(0x0A)
        return bytes
    }

    /// Parses one line; the error message never repeats the line (it may hold a credential).
    public static func parse(_ line: [UInt8]) throws(ProxyError) -> ControlMessage {
        do {
            return try JSONDecoder().decode(ControlMessage.self, from: Data(line))
        } catch let DecodingError.keyNotFound(key, _) {
            throw ProxyError("control message lacks '\(key.stringValue)'")
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context) {
            throw ProxyError("control message field '\(context.codingPath.map(\.stringValue).joined(separator: "."))' has the wrong type")
        } catch let DecodingError.dataCorrupted(context) {
            throw ProxyError("control message is not valid: \(context.debugDescription.prefix(200))")
        } catch {
            throw ProxyError("control message is not valid JSON")
        }
    }
}

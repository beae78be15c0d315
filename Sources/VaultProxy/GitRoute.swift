/// A route that serves one git repository (`routes[].git` in `addSandbox`): only that
/// repository's smart-HTTP endpoints pass, and a push may only touch the refs it allows.
public struct GitRouteRule: Codable, Sendable, Hashable {
    /// The repository's path below the route's upstream, e.g. `/example/widgets.git`; requests
    /// may name it with or without `.git`.
    public var repository: String
    /// Glob patterns over branch names (without `refs/heads/`) a push may create or update:
    /// `*` matches within one path segment, `**` across segments, e.g. `agent/*`.
    public var pushBranches: [String]
    /// Whether a push may create tags (never move or delete them).
    public var pushTags: Bool

    public init(repository: String, pushBranches: [String], pushTags: Bool) {
        self.repository = repository
        self.pushBranches = pushBranches
        self.pushTags = pushTags
    }
}

/// The smart-HTTP endpoints a git route lets through.
enum GitEndpoint: Equatable {
    /// `GET <repo>/info/refs?service=git-upload-pack|git-receive-pack`.
    case advertisement
    /// `POST <repo>/git-upload-pack` (fetch and clone).
    case uploadPack
    /// `POST <repo>/git-receive-pack` (push): its command list is checked first.
    case receivePack
}

/// A `GitRouteRule` checked once when the sandbox is added.
struct ResolvedGitRoute: Sendable {
    let rule: GitRouteRule
    /// The repository path without a trailing `/` or `.git`.
    let base: String

    init(_ rule: GitRouteRule, route: String) throws(ProxyError) {
        self.rule = rule
        var path = rule.repository
        while path.hasSuffix("/") { path.removeLast() }
        if path.hasSuffix(".git") { path.removeLast(4) }
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        guard rule.repository.hasPrefix("/"), !segments.isEmpty,
            segments.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }),
            !path.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F || $0 == 0x3F || $0 == 0x23 || $0 == 0x25 || $0 == 0x5C })
        else {
            throw ProxyError("route '\(route)': git.repository '\(rule.repository)' must be a path like /owner/repo.git (no query, '%', '\\', '.' or '..' segments)")
        }
        base = path
        for pattern in rule.pushBranches where pattern.isEmpty || pattern.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F }) {
            throw ProxyError("route '\(route)': git push branch pattern '\(pattern)' must be non-empty, without spaces or control characters")
        }
    }

    /// Which endpoint a request is, or nil when the route does not serve it. `path` is the raw
    /// path below the route name; `query` the raw query (nil without `?`).
    func endpoint(method: String, path: String, query: Substring?) -> GitEndpoint? {
        let rest: Substring
        if path.hasPrefix(base + ".git/") {
            rest = path.dropFirst(base.utf8.count + 4)
        } else if path.hasPrefix(base + "/") {
            rest = path.dropFirst(base.utf8.count)
        } else {
            return nil
        }
        switch (method, rest, query) {
        case ("GET", "/info/refs", "service=git-upload-pack"?), ("GET", "/info/refs", "service=git-receive-pack"?): return .advertisement
        case ("POST", "/git-upload-pack", nil): return .uploadPack
        case ("POST", "/git-receive-pack", nil): return .receivePack
        default: return nil
        }
    }

    /// Why a route of this rule refuses anything else (for the 403 and the event).
    func onlyRule(route: String) -> String {
        "route \(route) serves only the git smart-HTTP endpoints of \(rule.repository) (info/refs, git-upload-pack, git-receive-pack)"
    }

    /// Each command with its refusal, if the policy refuses it.
    func verdicts(_ commands: [GitRefCommand]) -> [GitVerdict] {
        commands.map { GitVerdict(command: $0, refusal: refusal(for: $0)) }
    }

    func refusal(for command: GitRefCommand) -> String? {
        let ref = command.ref
        if command.isDelete {
            return "deleting \(ref) is not allowed (git.push creates and updates branches only)"
        }
        if ref.hasPrefix("refs/heads/") {
            let branch = String(ref.dropFirst("refs/heads/".count))
            if rule.pushBranches.contains(where: { GitBranchPattern.matches($0, branch) }) { return nil }
            guard !rule.pushBranches.isEmpty else { return "\(ref): no branch may be pushed (git.push.branches is empty)" }
            return "\(ref) is not in git.push.branches (\(rule.pushBranches.joined(separator: ", ")))"
        }
        if ref.hasPrefix("refs/tags/") {
            guard rule.pushTags else { return "\(ref): tags may not be pushed (git.push.tags is false)" }
            return command.isCreate ? nil : "\(ref) already exists; git.push.tags allows creating tags, not moving them"
        }
        return "\(ref) is neither a branch nor a tag; git.push allows refs/heads/ (git.push.branches) and refs/tags/ (git.push.tags) only"
    }
}

/// Glob patterns over branch names: `*` matches any run of characters other than `/`, `**` any
/// run including `/`; every other character stands for itself.
enum GitBranchPattern {
    private enum Token: Equatable { case byte(UInt8), star, doubleStar }

    static func matches(_ pattern: String, _ name: String) -> Bool {
        var tokens: [Token] = []
        var bytes = Array(pattern.utf8)[...]
        while let b = bytes.popFirst() {
            if b == 0x2A {
                if bytes.first == 0x2A {
                    bytes = bytes.dropFirst()
                    tokens.append(.doubleStar)
                } else {
                    tokens.append(.star)
                }
            } else {
                tokens.append(.byte(b))
            }
        }
        // reached[j]: the first j tokens match the name read so far (a star may match nothing).
        let n = tokens.count
        var reached = [Bool](repeating: false, count: n + 1)
        reached[0] = true
        func closeOverStars(_ states: inout [Bool]) {
            for j in 0..<n where states[j] && (tokens[j] == .star || tokens[j] == .doubleStar) { states[j + 1] = true }
        }
        closeOverStars(&reached)
        for c in name.utf8 {
            var next = [Bool](repeating: false, count: n + 1)
            for j in 0..<n {
                switch tokens[j] {
                case .byte(let b): if reached[j] && b == c { next[j + 1] = true }
                case .star: if reached[j + 1] && c != 0x2F { next[j + 1] = true }
                case .doubleStar: if reached[j + 1] { next[j + 1] = true }
                }
            }
            closeOverStars(&next)
            guard next.contains(true) else { return false }
            reached = next
        }
        return reached[n]
    }
}

/// A command of a push and why the policy refuses it (nil: allowed).
struct GitVerdict: Equatable, Sendable {
    let command: GitRefCommand
    let refusal: String?
}

/// One command of a push: `<old> <new> <ref>`.
struct GitRefCommand: Equatable, Sendable {
    let old: String
    let new: String
    let ref: String

    var isDelete: Bool { new.utf8.allSatisfy { $0 == 0x30 } }
    var isCreate: Bool { old.utf8.allSatisfy { $0 == 0x30 } }
}

/// Reads the command list at the start of a `git-receive-pack` request body (see git's
/// gitprotocol-pack: `*shallow`, then commands in pkt-lines, the first with `\0capabilities`,
/// then a flush-pkt), fed chunk by chunk, holding at most `limit` bytes.
struct GitCommandListReader {
    enum Outcome: Equatable {
        case needMore
        case complete(commands: [GitRefCommand], capabilities: [String])
        case malformed(String)
    }

    let limit: Int
    private var bytes: [UInt8] = []
    private var offset = 0
    private var commands: [GitRefCommand] = []
    private var capabilities: [String] = []
    private var finished: Outcome?

    init(limit: Int) { self.limit = limit }

    /// The largest pkt-line git sends (`LARGE_PACKET_MAX`).
    static let maxPacket = 65520

    mutating func feed<Bytes: Collection>(_ chunk: Bytes) -> Outcome where Bytes.Element == UInt8 {
        if let finished { return finished }
        bytes += chunk.prefix(Swift.max(0, limit - bytes.count))
        let outcome = parse()
        if outcome != .needMore { finished = outcome }
        return outcome
    }

    private mutating func parse() -> Outcome {
        while bytes.count - offset >= 4 {
            guard let length = Self.hexLength(bytes[offset..<offset + 4]) else {
                return .malformed("the command list has a pkt-line without a 4-digit hex length")
            }
            if length == 0 {
                return .complete(commands: commands, capabilities: capabilities)
            }
            guard length > 4, length <= Self.maxPacket else {
                return .malformed("the command list has a pkt-line of length \(length) (a command is 5–\(Self.maxPacket) bytes, then 0000)")
            }
            guard bytes.count - offset >= length else { break }
            let payload = bytes[(offset + 4)..<(offset + length)]
            offset += length
            if let problem = line(payload) { return .malformed(problem) }
        }
        if bytes.count >= limit {
            return .malformed("the command list is longer than \(limit) bytes")
        }
        return .needMore
    }

    /// Reads one command (or shallow) line; the problem when it is not one.
    private mutating func line(_ payload: ArraySlice<UInt8>) -> String? {
        var text = payload
        if text.last == 0x0A { text = text.dropLast() }
        if commands.isEmpty, text.starts(with: Array("shallow ".utf8)) {
            return Self.isObjectID(text.dropFirst(8)) ? nil : "a shallow line does not name an object id"
        }
        if text.starts(with: Array("push-cert".utf8)) {
            return "signed pushes (push-cert) cannot be checked by the vault-proxy; push without --signed"
        }
        if let nul = text.firstIndex(of: 0) {
            guard commands.isEmpty else { return "only the first command may carry capabilities (NUL after the ref name)" }
            capabilities = text[(nul + 1)...].split(separator: 0x20).map { String(decoding: $0, as: UTF8.self) }
            text = text[..<nul]
        }
        let fields = text.split(separator: 0x20, maxSplits: 2, omittingEmptySubsequences: false)
        guard fields.count == 3, Self.isObjectID(fields[0]), Self.isObjectID(fields[1]), fields[0].count == fields[1].count else {
            return "a command is not '<old-id> <new-id> <ref>'"
        }
        let ref = fields[2]
        guard ref.starts(with: Array("refs/".utf8)), ref.count > 5, !ref.contains(where: { $0 <= 0x20 || $0 == 0x7F }) else {
            return "a command names '\(String(decoding: ref.prefix(200), as: UTF8.self))', which is not a ref name (refs/…)"
        }
        let command = GitRefCommand(
            old: String(decoding: fields[0], as: UTF8.self), new: String(decoding: fields[1], as: UTF8.self), ref: String(decoding: ref, as: UTF8.self))
        if command.isDelete && command.isCreate { return "a command for \(command.ref) has two zero ids" }
        commands.append(command)
        return nil
    }

    static func hexLength(_ digits: ArraySlice<UInt8>) -> Int? {
        var value = 0
        for d in digits {
            guard let v = hexValue(d) else { return nil }
            value = value * 16 + v
        }
        return value
    }

    static func hexValue(_ d: UInt8) -> Int? {
        switch d {
        case 0x30...0x39: return Int(d - 0x30)
        case 0x61...0x66: return Int(d - 0x61 + 10)
        case 0x41...0x46: return Int(d - 0x41 + 10)
        default: return nil
        }
    }

    /// A SHA-1 (40) or SHA-256 (64) object id in lowercase hex.
    static func isObjectID(_ text: ArraySlice<UInt8>) -> Bool {
        (text.count == 40 || text.count == 64) && text.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }
}

/// The answer to a refused push: a report-status (`unpack ok`, `ng <ref> <reason>` each,
/// flush), inside side-band-64k (band 1, after the reasons as band 2 messages, which git
/// prints as `remote: …`) when the client asked for side-band, as git's receive-pack does.
enum GitReceivePackReport {
    /// Every ref is `ng`: those the policy refuses with their reason, the others as not pushed
    /// (the push never reaches the upstream).
    static func refusal(_ verdicts: [GitVerdict], policy: String, capabilities: [String]) -> [UInt8] {
        var status = pkt("unpack ok\n")
        var messages: [UInt8] = []
        for verdict in verdicts {
            if let refusal = verdict.refusal {
                status += pkt("ng \(verdict.command.ref) refused by policy \(policy): \(refusal)\n")
                messages += Array("error: refused by policy \(policy): \(refusal)\n".utf8)
            } else {
                status += pkt("ng \(verdict.command.ref) not pushed: another ref of this push was refused by policy \(policy)\n")
            }
        }
        status += Array("0000".utf8)
        let packetMax: Int
        if capabilities.contains("side-band-64k") {
            packetMax = GitCommandListReader.maxPacket
        } else if capabilities.contains("side-band") {
            packetMax = 1000
        } else {
            return status
        }
        return sideband(2, messages, packetMax: packetMax) + sideband(1, status, packetMax: packetMax) + Array("0000".utf8)
    }

    /// One pkt-line: 4 hex digits of length (including themselves), then the payload.
    static func pkt(_ payload: String) -> [UInt8] { pkt(Array(payload.utf8)) }

    static func pkt(_ payload: [UInt8]) -> [UInt8] {
        let hex = String(payload.count + 4, radix: 16)
        return Array((String(repeating: "0", count: 4 - hex.count) + hex).utf8) + payload
    }

    /// `data` in pkt-lines of at most `packetMax` bytes, each payload led by the band byte.
    static func sideband(_ band: UInt8, _ data: [UInt8], packetMax: Int) -> [UInt8] {
        var out: [UInt8] = []
        var rest = data[...]
        while !rest.isEmpty {
            let piece = rest.prefix(packetMax - 5)
            rest = rest.dropFirst(piece.count)
            out += pkt([band] + piece)
        }
        return out
    }
}

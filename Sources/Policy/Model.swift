import Foundation

// The typed policy model. Every type is a plain value: a `Policy` handed to a task is its own
// immutable snapshot, whatever reloads happen afterwards. Field defaults are documented in
// README.md and are the single source of truth for `agentctl policy show`.

/// One loaded, validated policy file.
public struct Policy: Sendable, Hashable, Codable {
    /// The only `apiVersion` this build understands.
    public static let apiVersion = "agentd/v1"
    /// The only `kind` this build understands.
    public static let kind = "Policy"
    /// The policy used when a session names none.
    public static let defaultName = "default"

    /// `metadata.name`: a single path component, unique across the policy directory.
    public var name: String
    /// `metadata.summary`: free text for humans.
    public var summary: String?
    /// The file the policy was loaded from, as named to the loader (empty for in-memory YAML).
    public var sourcePath: String
    /// SHA-256 of the file's bytes, lowercase hex; the journal records it for every task.
    public var sha256: String
    public var hands: HandsPolicy
    public var pool: PoolPolicy
    public var network: NetworkPolicy
    /// Where credentials come from. Values are never part of the model, only their sources.
    public var credentials: [Credential]
    /// Proxy routes: `http://127.0.0.1:3128/<name>/…` → `upstream` with a credential header.
    public var routes: [Route]
    public var git: GitPolicy?
    public var brain: BrainPolicy
    public var session: SessionPolicy

    public init(
        name: String, summary: String? = nil, sourcePath: String = "", sha256: String = "",
        hands: HandsPolicy = HandsPolicy(), pool: PoolPolicy = PoolPolicy(),
        network: NetworkPolicy = NetworkPolicy(), credentials: [Credential] = [], routes: [Route] = [],
        git: GitPolicy? = nil, brain: BrainPolicy = BrainPolicy(), session: SessionPolicy = SessionPolicy()
    ) {
        self.name = name
        self.summary = summary
        self.sourcePath = sourcePath
        self.sha256 = sha256
        self.hands = hands
        self.pool = pool
        self.network = network
        self.credentials = credentials
        self.routes = routes
        self.git = git
        self.brain = brain
        self.session = session
    }

    /// The credential called `name`, if the policy defines one.
    public func credential(named name: String) -> Credential? { credentials.first { $0.name == name } }
    /// The route called `name`, if the policy defines one.
    public func route(named name: String) -> Route? { routes.first { $0.name == name } }
}

/// How a task's Hands are provisioned.
public enum HandsDriverKind: String, Sendable, Hashable, Codable, CaseIterable {
    /// A container through the Docker Engine API.
    case container
    /// A transient, sandboxed systemd unit.
    case unit
}

/// How long a Hands workspace lives.
public enum WorkspacePersistence: String, Sendable, Hashable, Codable, CaseIterable {
    /// Discarded when the task ends.
    case task
    /// Kept for the next task of the same session.
    case session
}

/// Optional resource limits applied with `setrlimit` inside the sandbox.
public struct Ulimits: Sendable, Hashable, Codable {
    /// `RLIMIT_NOFILE`; nil keeps the driver's default.
    public var nofile: Int?
    /// `RLIMIT_NPROC`; nil keeps the driver's default.
    public var nproc: Int?

    public init(nofile: Int? = nil, nproc: Int? = nil) {
        self.nofile = nofile
        self.nproc = nproc
    }
}

/// The sandbox a task runs in (`hands:`).
public struct HandsPolicy: Sendable, Hashable, Codable {
    public var driver: HandsDriverKind
    /// Container image (container driver).
    public var image: String
    /// Memory limit in bytes (`hands.memory`, e.g. `512MiB`).
    public var memoryBytes: Int
    /// CPU quota in CPUs; 0 < cpus ≤ 256.
    public var cpus: Double
    /// Maximum number of processes and threads (`pids.max`).
    public var pids: Int
    /// Who commands run as: only `auto`, a uid and gid of their own per sandbox, allocated by
    /// agentd from its `--sandbox-uids` range. A fixed uid would be shared by every sandbox of
    /// the policy and let one reach another's files and processes, so the checker refuses it.
    public var user: String
    /// Longest a single tool call may run, in seconds (`hands.commandTimeout`, e.g. `120s`).
    public var commandTimeoutSeconds: Double
    /// Hands idle this long (seconds) are released (`hands.idleTimeout`).
    public var idleTimeoutSeconds: Double
    /// Tool output beyond this many bytes is truncated (`hands.outputLimit`).
    public var outputLimitBytes: Int
    /// Size of the workspace's own filesystem in bytes (`hands.disk`, e.g. `1GiB`): writing
    /// past it fails with ENOSPC inside the sandbox, never on the host's disk.
    public var diskBytes: Int
    public var workspace: WorkspacePersistence
    public var ulimits: Ulimits

    public init(
        driver: HandsDriverKind = .container, image: String = "agentd-base:latest",
        memoryBytes: Int = 512 << 20, cpus: Double = 1.0, pids: Int = 256, user: String = HandsPolicy.autoUser,
        commandTimeoutSeconds: Double = 120, idleTimeoutSeconds: Double = 300,
        outputLimitBytes: Int = 1 << 20, diskBytes: Int = 1 << 30, workspace: WorkspacePersistence = .task, ulimits: Ulimits = Ulimits()
    ) {
        self.driver = driver
        self.image = image
        self.memoryBytes = memoryBytes
        self.cpus = cpus
        self.pids = pids
        self.user = user
        self.commandTimeoutSeconds = commandTimeoutSeconds
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.outputLimitBytes = outputLimitBytes
        self.diskBytes = diskBytes
        self.workspace = workspace
        self.ulimits = ulimits
    }

    /// `hands.user`'s one value: a uid per sandbox, allocated by agentd.
    public static let autoUser = "auto"

    public var commandTimeout: Duration { .seconds(commandTimeoutSeconds) }
    public var idleTimeout: Duration { .seconds(idleTimeoutSeconds) }
}

/// Warm Hands kept ready (`pool:`).
public struct PoolPolicy: Sendable, Hashable, Codable {
    /// Number of pre-provisioned Hands; 0 disables the pool.
    public var size: Int

    public init(size: Int = 0) { self.size = size }
}

/// Whether and how a sandbox reaches the outside.
public enum NetworkMode: String, Sendable, Hashable, Codable, CaseIterable {
    /// No network at all.
    case none
    /// Only through the vault-proxy: routes and allowlisted CONNECT hosts.
    case proxy
}

/// The sandbox's network (`network:`).
public struct NetworkPolicy: Sendable, Hashable, Codable {
    public var mode: NetworkMode
    /// Hosts the proxy lets through with CONNECT (no credentials added): `host`, `host:port`
    /// or `*.domain`, lowercase.
    public var allowHosts: [String]

    public init(mode: NetworkMode = .none, allowHosts: [String] = []) {
        self.mode = mode
        self.allowHosts = allowHosts
    }
}

/// Where a credential's value comes from. The value itself never enters the model.
public enum CredentialSource: Sendable, Hashable, Codable, CustomStringConvertible {
    /// An environment variable of the vault-proxy process.
    case env(String)
    /// A file on the host (absolute path).
    case file(String)
    /// A systemd credential (`LoadCredential=`), read from `$CREDENTIALS_DIRECTORY/NAME`.
    case systemd(String)

    /// `env:NAME`, `file:PATH` or `systemd:NAME` — the only form shown to users.
    public var description: String {
        switch self {
        case .env(let name): "env:\(name)"
        case .file(let path): "file:\(path)"
        case .systemd(let name): "systemd:\(name)"
        }
    }

    /// Parses `env:NAME`, `file:/abs/path` or `systemd:NAME`; nil for anything else.
    public init?(_ text: String) {
        guard let colon = text.firstIndex(of: ":") else { return nil }
        let scheme = text[..<colon]
        let rest = String(text[text.index(after: colon)...])
        switch scheme {
        case "env":
            guard let first = rest.unicodeScalars.first, first == "_" || (first.isASCII && first.properties.isAlphabetic),
                rest.unicodeScalars.allSatisfy({ $0 == "_" || ($0.isASCII && $0.properties.isAlphabetic) || ("0"..."9").contains($0) })
            else { return nil }
            self = .env(rest)
        case "file":
            guard rest.hasPrefix("/"), rest.count > 1, !rest.contains("\0") else { return nil }
            self = .file(rest)
        case "systemd":
            guard !rest.isEmpty, !rest.contains("/"), rest != ".", rest != "..",
                rest.unicodeScalars.allSatisfy({ $0.isASCII && $0.value > 0x20 && $0.value < 0x7f })
            else { return nil }
            self = .systemd(rest)
        default:
            return nil
        }
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let source = CredentialSource(text) else {
            throw DecodingError.dataCorrupted(
                .init(codingPath: decoder.codingPath, debugDescription: "not a credential source: \(text)"))
        }
        self = source
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// A named credential and its source (`credentials:` entries).
public struct Credential: Sendable, Hashable, Codable {
    public var name: String
    public var source: CredentialSource

    public init(name: String, source: CredentialSource) {
        self.name = name
        self.source = source
    }
}

/// A proxy route (`routes:` entries).
public struct Route: Sendable, Hashable, Codable {
    /// The default header template for a route with a credential.
    public static let defaultHeader = "Authorization: Bearer {{credential}}"
    /// The placeholder a header template must contain.
    public static let placeholder = "{{credential}}"

    /// The first path component of `http://127.0.0.1:3128/<name>/…`.
    public var name: String
    /// `https://host[:port][/prefix]`.
    public var upstream: String
    /// The name of an entry under `credentials`, or nil for a route that adds no header.
    public var credential: String?
    /// `Header-Name: value with {{credential}}`; nil when `credential` is nil.
    public var header: String?
    /// An absolute path to a PEM file: the upstream's certificate is checked against these CAs
    /// only (nil: the system trust store).
    public var caFile: String?

    public init(name: String, upstream: String, credential: String? = nil, header: String? = nil, caFile: String? = nil) {
        self.name = name
        self.upstream = upstream
        self.credential = credential
        self.header = header ?? (credential == nil ? nil : Route.defaultHeader)
        self.caFile = caFile
    }

    /// The header the proxy adds, with the placeholder replaced by `value`; nil without a template.
    public func renderHeader(credential value: String) -> (name: String, value: String)? {
        guard let header, let colon = header.firstIndex(of: ":") else { return nil }
        let name = String(header[..<colon]).trimmingWhitespace()
        let template = String(header[header.index(after: colon)...]).trimmingWhitespace()
        return (name, template.replacingOccurrences(of: Route.placeholder, with: value))
    }
}

/// The task's git repository, reached through a route (`git:`).
public struct GitPolicy: Sendable, Hashable, Codable {
    /// `https://…` clone URL.
    public var repository: String
    /// Branch to check out; nil uses the remote's default branch.
    public var branch: String?
    /// The route the workspace remote points at, so pushes carry the route's credential. The
    /// proxy makes it a git route: only this repository's smart-HTTP endpoints, and pushes
    /// checked against `push`.
    public var route: String?
    /// Which refs a push through `route` may touch (`git.push`).
    public var push: GitPushPolicy

    public init(repository: String, branch: String? = nil, route: String? = nil, push: GitPushPolicy = GitPushPolicy()) {
        self.repository = repository
        self.branch = branch
        self.route = route
        self.push = push
    }

    private enum CodingKeys: String, CodingKey { case repository, branch, route, push }

    /// Decodes JSON written before `push` existed with the default push policy.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        repository = try c.decode(String.self, forKey: .repository)
        branch = try c.decodeIfPresent(String.self, forKey: .branch)
        route = try c.decodeIfPresent(String.self, forKey: .route)
        push = try c.decodeIfPresent(GitPushPolicy.self, forKey: .push) ?? GitPushPolicy()
    }

    /// The repository's path below `upstream` (a route's `https://host[:port][/prefix]`), e.g.
    /// `/example/widgets.git` for `https://github.com`; nil when the repository is not on that
    /// host and port or not below the prefix.
    public func repositoryPath(below upstream: String) -> String? {
        guard let repo = URLComponents(string: repository), let route = URLComponents(string: upstream),
            repo.scheme?.lowercased() == "https", route.scheme?.lowercased() == "https",
            let repoHost = repo.host?.lowercased(), repoHost == route.host?.lowercased(), (repo.port ?? 443) == (route.port ?? 443)
        else { return nil }
        var prefix = route.percentEncodedPath
        while prefix.hasSuffix("/") { prefix.removeLast() }
        var path = repo.percentEncodedPath
        while path.hasSuffix("/") { path.removeLast() }
        guard path.hasPrefix(prefix + "/") else { return nil }
        let below = String(path.dropFirst(prefix.count))
        return below.count > 1 ? below : nil
    }
}

/// Which refs a push may touch (`git.push`); the vault-proxy reads each push's commands and
/// refuses the whole push if any is not allowed. Deleting a ref is never allowed.
public struct GitPushPolicy: Sendable, Hashable, Codable {
    /// The default `git.push.branches`: the agent's own namespace.
    public static let defaultBranches = ["agent/*"]

    /// Glob patterns over branch names (without `refs/heads/`) that may be created or updated:
    /// `*` matches within one path segment (not `/`), `**` across segments.
    public var branches: [String]
    /// Whether new tags may be pushed (an existing tag is never moved or deleted).
    public var tags: Bool

    public init(branches: [String] = GitPushPolicy.defaultBranches, tags: Bool = false) {
        self.branches = branches
        self.tags = tags
    }

    /// Why `pattern` is not a branch pattern, or nil when it is one.
    public static func patternProblem(_ pattern: String) -> String? {
        if pattern.isEmpty { return "is empty" }
        if pattern.hasPrefix("refs/") { return "names a ref; write the branch name without refs/heads/ (e.g. agent/*)" }
        if pattern.contains("***") { return "has more than two '*' in a row (* matches within a path segment, ** across segments)" }
        let literal = pattern.replacingOccurrences(of: "**", with: "x").replacingOccurrences(of: "*", with: "x")
        guard GitPolicy.isBranchName(literal) else {
            return "is not a branch pattern (branch-name characters; * matches within a path segment, ** across segments)"
        }
        return nil
    }
}

extension GitPolicy {
    /// Whether `name` is a branch name `git.branch` accepts: a subset of
    /// `git check-ref-format --branch` (no component starting with `.`, no `..`, `@{`, `//`,
    /// control characters, space or `~^:?*[\`, not ending in `/`, `.` or `.lock`, not `@`,
    /// `HEAD` or starting with `-`).
    public static func isBranchName(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 255, !name.hasPrefix("-"), !name.hasPrefix("/"), !name.hasSuffix("/"),
            !name.hasSuffix(".lock"), !name.hasSuffix("."), !name.contains(".."), !name.contains("//"), !name.contains("@{"),
            name != "@", name != "HEAD"
        else { return false }
        return name.unicodeScalars.allSatisfy { $0.value > 0x20 && $0.value != 0x7f && !"~^:?*[\\".unicodeScalars.contains($0) }
            && !name.split(separator: "/").contains { $0.hasPrefix(".") }
    }
}

/// The Brain's retry behaviour (`brain:`).
public struct BrainPolicy: Sendable, Hashable, Codable {
    /// Retries of a failed model call or tool provisioning before the task fails.
    public var retries: Int
    /// Initial backoff between retries, in seconds (doubles on each retry).
    public var backoffSeconds: Double

    public init(retries: Int = 3, backoffSeconds: Double = 1) {
        self.retries = retries
        self.backoffSeconds = backoffSeconds
    }

    public var backoff: Duration { .seconds(backoffSeconds) }
}

/// Limits on a session: its journal and its sandboxes (`session:`).
public struct SessionPolicy: Sendable, Hashable, Codable {
    /// Largest single event appended to the journal, in bytes (`session.maxEventSize`).
    public var maxEventBytes: Int
    /// Most sandboxes (tasks holding Hands) the session may have at once
    /// (`session.maxSandboxes`); a call that would provision one more is an error result.
    public var maxSandboxes: Int

    public init(maxEventBytes: Int = 1 << 20, maxSandboxes: Int = 8) {
        self.maxEventBytes = maxEventBytes
        self.maxSandboxes = maxSandboxes
    }
}

import Foundation
import Policy

/// What `GitWorkspace.initialize` does to a workspace: which repository and branch it checks
/// out, with which credential, and where `origin` points afterwards.
///
/// The header is a secret: the value never appears in `description`, `debugDescription` or a
/// `Mirror` of this value, nor in any error.
public struct GitInitialization: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The upstream clone URL, `https://HOST[:PORT]/…` (no user info): what the host fetches from.
    public var repositoryURL: String
    /// The branch to check out; nil: the remote's default branch.
    public var branch: String?
    /// The credential header the host's git sends to `repositoryURL` (and only there).
    public var header: (name: String, value: String)?
    /// Further secret strings that must never appear in an error (the raw credential when the
    /// header wraps it, e.g. in `Basic …`). The header's value, and its part after the scheme
    /// (`Bearer <this>`), are redacted anyway, raw and base64-encoded.
    public var secrets: [String]
    /// A PEM file of CAs the upstream's certificate is checked against instead of the system's
    /// (read by agentd, as root: it may be private to root).
    public var caFile: String?
    /// What `origin` points at afterwards: the sandbox's route URL
    /// (`http://127.0.0.1:3128/<route>/<owner>/<repo>.git`), through which the sandbox's own
    /// `git push`/`git pull` go.
    public var originURL: String
    /// The longest the whole initialization may take; git is killed (its process group) then.
    public var timeout: Duration
    /// `HOST:PORT:ADDRESS` entries (curl's `--resolve`, git's `http.curloptResolve`): a host
    /// name reached at a given address. For tests; empty in production.
    public var resolve: [String]
    /// A `user.name`/`user.email` written to the repository's local config; nil writes none.
    /// Local config outranks the sandbox's `~/.gitconfig`, so only set it when the sandbox
    /// image brings no identity of its own (`GIT_AUTHOR_*`/`GIT_COMMITTER_*` still win).
    public var identity: Identity?

    /// A commit identity for the repository's local config.
    public struct Identity: Sendable, Hashable {
        public var name: String
        public var email: String
        public init(name: String, email: String) {
            self.name = name
            self.email = email
        }
    }

    /// The default timeout: five minutes for the whole fetch and checkout.
    public static let defaultTimeout: Duration = .seconds(300)
    /// The sandbox's end of the vault-proxy, where its routes are.
    public static let proxyBase = "http://127.0.0.1:3128"

    public init(
        repositoryURL: String, branch: String? = nil, header: (name: String, value: String)? = nil, secrets: [String] = [],
        caFile: String? = nil, originURL: String, timeout: Duration = defaultTimeout, resolve: [String] = [], identity: Identity? = nil
    ) {
        self.repositoryURL = repositoryURL
        self.branch = branch
        self.header = header
        self.secrets = secrets
        self.caFile = caFile
        self.originURL = originURL
        self.timeout = timeout
        self.resolve = resolve
        self.identity = identity
    }

    /// The initialization a policy's `git:` section asks for: the repository and branch, the
    /// route's header with `credential` (the value of the route's credential, resolved by the
    /// caller) and CA file, and `origin` at the route's URL (`proxy` + `/<route>/<path>`). A
    /// policy without `git.route` leaves `origin` at the repository itself and sends no header.
    /// - Throws: `GitWorkspaceError.invalidRequest` when the route is not in the policy, its
    ///   credential's value is missing, or the repository is not below the route's upstream.
    public init(policy: Policy, credential: String?, proxy: String = proxyBase, timeout: Duration = defaultTimeout) throws {
        guard let git = policy.git else {
            throw GitWorkspaceError(.invalidRequest, repository: "", "policy '\(policy.name)' has no git section")
        }
        var origin = git.repository
        var header: (name: String, value: String)?
        var caFile: String?
        if let name = git.route {
            guard let route = policy.route(named: name) else {
                throw GitWorkspaceError(.invalidRequest, repository: git.repository, "git.route '\(name)' is not a route of policy '\(policy.name)'")
            }
            guard let url = Self.routeURL(repository: git.repository, route: route, proxy: proxy) else {
                throw GitWorkspaceError(
                    .invalidRequest, repository: git.repository,
                    "the repository is not below route '\(name)''s upstream \(route.upstream); git.route must name a route that reaches it")
            }
            origin = url
            if let credentialName = route.credential {
                guard let credential, !credential.isEmpty else {
                    throw GitWorkspaceError(
                        .invalidRequest, repository: git.repository,
                        "route '\(name)' names credential '\(credentialName)' but no value was given for it")
                }
                header = route.renderHeader(credential: credential)
            }
            caFile = route.caFile
        }
        self.init(
            repositoryURL: git.repository, branch: git.branch, header: header, secrets: credential.map { [$0] } ?? [],
            caFile: caFile, originURL: origin, timeout: timeout)
    }

    /// The URL through `route` for `repository`: `proxy/<route>/<the path below the upstream>`;
    /// nil when the repository is not on the route's upstream host and port, or not below its
    /// path prefix.
    public static func routeURL(repository: String, route: Route, proxy: String = proxyBase) -> String? {
        guard let repo = URLComponents(string: repository), let upstream = URLComponents(string: route.upstream),
            repo.scheme?.lowercased() == "https", upstream.scheme?.lowercased() == "https",
            let repoHost = repo.host?.lowercased(), repoHost == upstream.host?.lowercased(),
            (repo.port ?? 443) == (upstream.port ?? 443)
        else { return nil }
        var prefix = upstream.percentEncodedPath
        while prefix.hasSuffix("/") { prefix.removeLast() }
        let path = repo.percentEncodedPath
        guard path.hasPrefix(prefix + "/"), path.count > prefix.count + 1 else { return nil }
        var base = proxy
        while base.hasSuffix("/") { base.removeLast() }
        return base + "/" + route.name + path.dropFirst(prefix.count)
    }

    public var description: String {
        let branch = branch.map { "branch \($0)" } ?? "the default branch"
        let header = header.map { ", header \($0.name): [REDACTED]" } ?? ""
        return "git \(repositoryURL) (\(branch)\(header)) → origin \(originURL)"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(
            self,
            children: [
                "repositoryURL": repositoryURL, "branch": branch as Any, "header": header.map { "\($0.name): [REDACTED]" } as Any,
                "caFile": caFile as Any, "originURL": originURL, "timeout": timeout, "resolve": resolve, "identity": identity as Any,
            ])
    }
}

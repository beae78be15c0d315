import Foundation
import Policy
import VaultProxy

extension SandboxSpec {
    /// What the proxy needs to know of a sandbox whose policy has `network.mode: proxy`: its
    /// allowlist and routes (credentials by name only), and the socket to listen on. The route
    /// named by `git.route` becomes a git route for `git.repository` with `git.push`'s rules.
    /// - Returns: nil for any other network mode (such a sandbox gets no listener).
    public static func egress(
        for policy: Policy, sandbox: String, session: String, task: String?, socketPath: String
    ) -> SandboxSpec? {
        guard policy.network.mode == .proxy else { return nil }
        return SandboxSpec(
            sandbox: sandbox, session: session, task: task, policy: policy.name, socketPath: socketPath,
            network: NetworkRules(allowHosts: policy.network.allowHosts),
            routes: policy.routes.map { route in
                RouteRule(
                    name: route.name, upstream: route.upstream, credential: route.credential, header: route.header, caFile: route.caFile,
                    git: policy.git.flatMap { $0.route == route.name ? GitRouteRule(git: $0, upstream: route.upstream) : nil })
            })
    }
}

extension GitRouteRule {
    /// The git route serving `git` through a route to `upstream`: the repository's path below
    /// the upstream (the checker makes sure it is below it; if it is not, the URL's whole path,
    /// which the route then serves below its prefix — never more than the one repository).
    init(git: GitPolicy, upstream: String) {
        let path = git.repositoryPath(below: upstream) ?? URLComponents(string: git.repository)?.percentEncodedPath ?? git.repository
        self.init(repository: path, pushBranches: git.push.branches, pushTags: git.push.tags)
    }
}

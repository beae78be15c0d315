import Policy
import VaultProxy

extension SandboxSpec {
    /// What the proxy needs to know of a sandbox whose policy has `network.mode: proxy`: its
    /// allowlist and routes (credentials by name only), and the socket to listen on.
    /// - Returns: nil for any other network mode (such a sandbox gets no listener).
    public static func egress(
        for policy: Policy, sandbox: String, session: String, task: String?, socketPath: String
    ) -> SandboxSpec? {
        guard policy.network.mode == .proxy else { return nil }
        return SandboxSpec(
            sandbox: sandbox, session: session, task: task, policy: policy.name, socketPath: socketPath,
            network: NetworkRules(allowHosts: policy.network.allowHosts),
            routes: policy.routes.map {
                RouteRule(name: $0.name, upstream: $0.upstream, credential: $0.credential, header: $0.header, caFile: $0.caFile)
            })
    }
}

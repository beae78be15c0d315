import Foundation
import Hands
import Logging
import Policy
import VaultProxy

/// agentd's `SandboxAttachments`: gives each task's sandbox its way out and its repository.
///
/// - **Listener.** For a policy with `network.mode: proxy`, the sandbox's own listener on the
///   vault-proxy is announced (`addSandbox`) at `proxy.sock` in the sandbox's socket
///   directory (`AgentHands.proxySocketPath`), which only that sandbox sees (at
///   `/run/agentd`), so the proxy knows the sandbox, task and session of every request
///   without any token. The sandbox's agent bridges `127.0.0.1:3128` to it. The proxy's name
///   for the sandbox is its agent name (the `agentd.agent` label).
/// - **Intent.** Before each tool call, the call's `tool.intent` seq is named to the proxy,
///   which journals every decision with it.
/// - **Detach** removes the listener before the sandbox goes.
///
/// A proxy-mode sandbox is never served without its listener: when the proxy is not there
/// or refuses, attaching fails and so does the provisioning (the call gets the error string).
public final class SandboxNetwork: SandboxAttachments {
    private let supervisor: ProxySupervisor?
    private let agent: AgentHands
    private let policy: @Sendable (String) async -> Policy?
    private let prepareWorkspace: (@Sendable (SandboxHandle, TaskKey, Policy) async throws -> Void)?
    private let logger: Logger

    /// - Parameters:
    ///   - supervisor: the running vault-proxy, or nil when agentd has none (proxy-mode
    ///     sandboxes are then refused with an error saying so).
    ///   - agent: where the sandboxes' socket directories are.
    ///   - policy: the policy in force by name.
    ///   - prepareWorkspace: run once for a fresh (not adopted) sandbox whose policy names
    ///     `git` (the host-side clone; see `GitWorkspace`).
    public init(
        supervisor: ProxySupervisor?, agent: AgentHands, policy: @escaping @Sendable (String) async -> Policy?,
        prepareWorkspace: (@Sendable (SandboxHandle, TaskKey, Policy) async throws -> Void)? = nil,
        logger: Logger = Logger(label: "agentd.egress")
    ) {
        self.supervisor = supervisor
        self.agent = agent
        self.policy = policy
        self.prepareWorkspace = prepareWorkspace
        self.logger = logger
    }

    public func attach(_ sandbox: SandboxHandle, for key: TaskKey, adopted: Bool) async throws {
        let name = sandbox.spec.policyName
        guard let policy = await policy(name) else {
            // Only a proxy-mode sandbox needs its policy here; others have nothing to attach.
            guard sandbox.spec.egressProxy else { return }
            throw HandsError(.provisioning, "policy '\(name)' is no longer loaded, so the sandbox's network cannot be set up; restore it in the policy directory")
        }
        if sandbox.spec.egressProxy {
            guard let agentName = sandbox.agent else {
                throw HandsError(.provisioning, "the sandbox \(sandbox.id.prefix(12)) has no agent directory for its vault-proxy listener")
            }
            guard let supervisor else {
                throw HandsError(
                    .provisioning,
                    "policy '\(name)' has network.mode: proxy, but agentd runs without the vault-proxy (install vault-proxy next to agentd or pass --vault-proxy PATH); the sandbox would have no way out")
            }
            guard
                let spec = SandboxSpec.egress(
                    for: policy, sandbox: agentName, session: key.session, task: key.task, socketPath: agent.proxySocketPath(agentName))
            else {
                throw HandsError(.provisioning, "policy '\(name)' no longer has network.mode: proxy; the task's next sandbox follows the policy as loaded")
            }
            do {
                try await supervisor.addSandbox(spec)
            } catch {
                throw HandsError(.provisioning, "the vault-proxy could not give the sandbox its listener: \(error)")
            }
        }
        if !adopted, policy.git != nil, let prepareWorkspace {
            try await prepareWorkspace(sandbox, key, policy)
        }
    }

    public func setIntent(_ sandbox: SandboxHandle, for key: TaskKey, seq: UInt64?) async {
        guard sandbox.spec.egressProxy, let supervisor, let agentName = sandbox.agent else { return }
        do {
            try await supervisor.setIntent(sandbox: agentName, task: key.task, seq: seq.map { Int64($0) })
        } catch {
            // The proxy is down (it fails closed); its decisions resume with the next call.
            logger.debug("could not name the tool call to the vault-proxy", metadata: ["sandbox": "\(agentName)", "error": "\(error)"])
        }
    }

    public func detach(_ sandbox: SandboxHandle) async {
        guard let supervisor, let agentName = sandbox.agent else { return }
        do {
            try await supervisor.removeSandbox(agentName)
        } catch {
            logger.debug("could not remove a sandbox's vault-proxy listener", metadata: ["sandbox": "\(agentName)", "error": "\(error)"])
        }
    }
}

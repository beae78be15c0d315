import Foundation
import GitWorkspace
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
/// - **Repository.** For a policy with `git`, a fresh sandbox's workspace is initialized on
///   the host before its first command (`GitWorkspace`: fetched with the route's credential as
///   the sandbox's uid, `origin` pointing at the route, `git.branch` checked out); a workspace
///   that holds `.git` already (a session's, from an earlier task) is left alone. One
///   initialization per workspace at a time.
/// - **Detach** removes the listener before the sandbox goes.
///
/// A proxy-mode sandbox is never served without its listener: when the proxy is not there
/// or refuses, attaching fails and so does the provisioning (the call gets the error string).
public final class SandboxNetwork: SandboxAttachments {
    private let supervisor: ProxySupervisor?
    private let agent: AgentHands
    private let policy: @Sendable (String) async -> Policy?
    private let workspaces: WorkspaceImages?
    private let credentials: ProxyCredentials?
    private let initializing = KeyedSerializer()
    private let logger: Logger

    /// - Parameters:
    ///   - supervisor: the running vault-proxy, or nil when agentd has none (proxy-mode
    ///     sandboxes are then refused with an error saying so).
    ///   - agent: where the sandboxes' socket directories are.
    ///   - policy: the policy in force by name.
    ///   - workspaces: where the sandboxes' workspaces are mounted on the host, for `git`
    ///     (nil: a policy with `git` is refused).
    ///   - credentials: the credential values, for the route `git.route` names.
    public init(
        supervisor: ProxySupervisor?, agent: AgentHands, policy: @escaping @Sendable (String) async -> Policy?,
        workspaces: WorkspaceImages? = nil, credentials: ProxyCredentials? = nil, logger: Logger = Logger(label: "agentd.egress")
    ) {
        self.supervisor = supervisor
        self.agent = agent
        self.policy = policy
        self.workspaces = workspaces
        self.credentials = credentials
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
        if !adopted, policy.git != nil {
            try await initializeRepository(sandbox, policy: policy)
        }
    }

    /// The host-side git initialization of the sandbox's workspace (see the type's notes).
    private func initializeRepository(_ sandbox: SandboxHandle, policy: Policy) async throws {
        guard let workspaces, let workspace = sandbox.workspace, let uid = sandbox.uid else {
            throw HandsError(.provisioning, "policy '\(policy.name)' names a git repository, but the sandbox has no workspace agentd can initialize")
        }
        let credentialName = policy.git?.route.flatMap { policy.route(named: $0) }?.credential
        let started = ContinuousClock.now
        do {
            let initialization = try GitInitialization(policy: policy, credential: credentialName.flatMap { credentials?.value(named: $0) })
            let summary = try await initializing.run(workspace) {
                try await GitWorkspace.initialize(initialization, in: workspaces.hostPath(workspace), uid: uid)
            }
            logger.info(
                "workspace repository ready",
                metadata: ["sandbox": "\(sandbox.id.prefix(12))", "outcome": "\(summary.outcome)", "branch": "\(summary.branch ?? "-")", "elapsed": "\(ContinuousClock.now - started)"])
        } catch let error as GitWorkspaceError {
            throw HandsError(.provisioning, "the workspace's git repository could not be set up: \(error)")
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
        // (The workspace stays: its repository belongs to the workspace, not the listener.)
        guard let supervisor, let agentName = sandbox.agent else { return }
        do {
            try await supervisor.removeSandbox(agentName)
        } catch {
            logger.debug("could not remove a sandbox's vault-proxy listener", metadata: ["sandbox": "\(agentName)", "error": "\(error)"])
        }
    }
}

/// Runs one body at a time per key (one git initialization per workspace).
actor KeyedSerializer {
    private var busy: Set<String> = []
    private var waiters: [String: [CheckedContinuation<Void, Never>]] = [:]

    func run<T: Sendable>(_ key: String, _ body: @Sendable () async throws -> T) async throws -> T {
        while busy.contains(key) {
            await withCheckedContinuation { waiters[key, default: []].append($0) }
        }
        busy.insert(key)
        defer {
            busy.remove(key)
            if var queue = waiters[key], !queue.isEmpty {
                queue.removeFirst().resume()
                waiters[key] = queue.isEmpty ? nil : queue
            }
        }
        return try await body()
    }
}

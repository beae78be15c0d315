/// What a task's sandbox gets from outside its driver: its listener on the vault-proxy (the
/// sandbox's only way out, for `network.mode: proxy`) and its git workspace. `HandsManager`
/// attaches a sandbox once it serves a task — fresh, from the warm pool, or adopted after a
/// restart of agentd — before the task's first command runs in it, names the tool call each
/// command belongs to, and detaches it before the sandbox is destroyed.
///
/// A failure to attach fails the provisioning (the sandbox is destroyed; the call gets the
/// error string and the next call tries again).
public protocol SandboxAttachments: Sendable {
    /// Makes `sandbox` ready for `key`'s commands. `adopted`: the sandbox was left by a
    /// previous run of agentd and its workspace is the task's already (nothing to clone).
    func attach(_ sandbox: SandboxHandle, for key: TaskKey, adopted: Bool) async throws
    /// The `tool.intent` seq of the call whose commands run in `sandbox` now (nil: none).
    func setIntent(_ sandbox: SandboxHandle, for key: TaskKey, seq: UInt64?) async
    /// Undoes `attach`; called for every sandbox before it is destroyed (also for sandboxes
    /// never attached). Never throws.
    func detach(_ sandbox: SandboxHandle) async
}

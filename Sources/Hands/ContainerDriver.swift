import EngineAPI
import Foundation

/// Hands as containers, through the container engine's Docker API.
///
/// Every sandbox is hardened by default: no network, read-only root filesystem with a
/// writable `/workspace` and a tmpfs `/tmp`, all capabilities dropped, `no-new-privileges`,
/// memory (without swap), pids and CPU limits, and ulimits at or below the host's hard limits.
///
/// **PID 1 is the sandbox agent** (`AgentHands`): its static executable bind-mounted read-only
/// at `/.agentd/agent`, its socket in the sandbox's own host directory bind-mounted at
/// `/run/agentd`. It reaps every orphan, and every command, file read and file write goes
/// through it: one round trip on a unix socket instead of the engine's exec create, start and
/// inspect. A command's timeout kills its whole process group; its output streams to the
/// caller as it is produced. The image needs no shell: commands given as argv run as they are.
/// The sandbox is ready (`provision` returns) once the agent answers.
///
/// **User and workspace.** Each sandbox runs as a uid of its own (`SandboxUIDs`, recorded in
/// its `agentd.uid` label) and its `/workspace` is a filesystem of its own of the policy's
/// `hands.disk` size (`WorkspaceImages`, a host path bind-mounted with `HostConfig.Binds`;
/// its name is the `agentd.workspace` label). The engine must run on this host, as root.
///
/// **Files.** `write_file` and `read_file` are the agent's, as the sandbox's user, never the
/// engine's archive API (which acts as root on the container's whole filesystem): a write
/// lands only where the sandbox's user may write, and a symlink planted in the workspace
/// resolves inside the sandbox, never on the host.
public struct ContainerDriver: HandsDriver {
    public let engine: EngineClient
    public let instance: String
    /// Where workspaces are made and mounted (shared with the unit driver, for one uid range).
    public let workspaces: WorkspaceImages
    /// The sandbox agent: its executable and the sandboxes' socket directories.
    public let agent: AgentHands
    public var kind: String { "container" }

    /// The workspace mount point inside every sandbox.
    public static let workspace = "/workspace"

    public init(engine: EngineClient, instance: String, workspaces: WorkspaceImages, agent: AgentHands) {
        self.engine = engine
        self.instance = instance
        self.workspaces = workspaces
        self.agent = agent
    }

    /// The engine's create request for a sandbox of `spec` with `labels` (instance and policy
    /// labels added) running as `workspace`'s uid with it at `/workspace` and the agent named
    /// `agentName` as PID 1: exactly what `provision` sends. Without a workspace and agent
    /// (benchmarks' baselines), `/workspace` is the image's own and PID 1 only sleeps.
    public func containerSpec(
        _ spec: SandboxSpec, labels: [String: String], workspace: WorkspaceImages.Workspace? = nil, agentName: String? = nil
    ) -> ContainerSpec {
        var allLabels = labels
        allLabels[SandboxLabel.instance] = instance
        allLabels[SandboxLabel.policy] = spec.policyName
        if let workspace {
            allLabels[SandboxLabel.uid] = String(workspace.uid)
            allLabels[SandboxLabel.workspace] = workspace.name
        }
        if let agentName { allLabels[SandboxLabel.agent] = agentName }
        let uid = workspace?.uid ?? 65534
        var container = ContainerSpec(
            image: spec.image,
            command: agentName == nil ? ["sleep", "2147483647"] : AgentHands.command(proxy: spec.egressProxy),
            user: "\(uid):\(uid)", workingDirectory: Self.workspace, labels: allLabels)
        var host = HostConfig()
        host.NetworkMode = "none"
        host.ReadonlyRootfs = true
        host.CapDrop = ["ALL"]
        host.SecurityOpt = ["no-new-privileges"]
        host.Memory = spec.memoryBytes
        host.MemorySwap = spec.memoryBytes
        host.NanoCpus = Int(spec.cpus * 1_000_000_000)
        host.PidsLimit = spec.pids
        host.Ulimits = HostConfig.Ulimit.withinHostLimits(nofile: spec.nofile, nproc: spec.nproc)
        host.Tmpfs = ["/tmp": "rw,nosuid,nodev,size=\(spec.tmpBytes)"]
        var binds: [String] = []
        if let workspace { binds.append("\(workspace.hostPath):\(Self.workspace):rw,nosuid,nodev") }
        if let agentName {
            binds.append("\(agent.executable):\(AgentHands.sandboxExecutable):ro")
            // Only this sandbox's own directory: no other sandbox's socket, not agentd's API.
            binds.append("\(agent.hostDirectory(agentName)):\(AgentHands.sandboxDirectory):rw,nosuid,nodev,noexec")
        }
        if !binds.isEmpty { host.Binds = binds }
        container.HostConfig = host
        return container
    }

    /// The name of the workspace a new sandbox of `spec` uses.
    func workspaceName(_ spec: SandboxSpec, labels: [String: String]) -> String {
        if spec.workspace == .session, let session = labels[SandboxLabel.session] {
            return WorkspaceImages.sessionName(instance: instance, session: session)
        }
        return WorkspaceImages.taskName("c" + String(UInt64.random(in: 0...UInt64.max), radix: 36))
    }

    public func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        try agent.checkExecutable()
        let workspace = try await workspaces.open(workspaceName(spec, labels: labels), sizeBytes: spec.diskBytes)
        let agentName = AgentHands.freshName()
        do {
            try agent.prepare(agentName, uid: workspace.uid)
        } catch {
            await workspaces.close(workspace.name)
            throw error
        }
        let container = containerSpec(spec, labels: labels, workspace: workspace, agentName: agentName)
        let allLabels = container.Labels ?? [:]
        let id: String
        do {
            let name = labels[SandboxLabel.session].flatMap { session in
                labels[SandboxLabel.task].map { Self.containerName(TaskKey(session: session, task: $0), instance: instance) }
            }
            id = try await engine.createContainer(container, name: name)
        } catch let error as EngineError {
            agent.remove(agentName)
            await workspaces.close(workspace.name)
            throw Self.translate(error, doing: "provisioning a sandbox from image \(spec.image)", provisioning: true)
        }
        let sandbox = SandboxHandle(id: id, spec: spec, labels: allLabels)
        do {
            do {
                try await engine.startContainer(id)
            } catch let error as EngineError {
                throw Self.translate(error, doing: "starting a sandbox from image \(spec.image)", provisioning: true)
            }
            try await agent.waitReady(agentName, state: { await self.state(of: sandbox) })
        } catch {
            _ = try? await engine.removeContainer(id, force: true)
            agent.remove(agentName)
            await workspaces.close(workspace.name)
            throw error
        }
        return sandbox
    }

    /// Whether the agent of `sandbox` answers (a sandbox found after a restart of agentd is
    /// usable only when it does).
    public func agentAnswers(_ sandbox: SandboxHandle, timeout: Duration = .seconds(5)) async -> Bool {
        await agent.answers(sandbox, timeout: timeout)
    }

    public func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {
        do {
            try await engine.renameContainer(sandbox.id, to: Self.containerName(key, instance: instance))
        } catch let error as EngineError {
            throw Self.translate(error, doing: "assigning a pooled sandbox to \(key)")
        }
    }

    /// The name of a task's container, `agentd-<session>-<task>-<random>`, so that the engine's
    /// own listing tells whose it is; the random part keeps a replacement from colliding with
    /// a predecessor still being removed.
    public static func containerName(_ key: TaskKey, instance: String) -> String {
        "agentd-\(key.session)-\(key.task)-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
    }

    public func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        try await agent.run(argv, in: sandbox, workingDirectory: workingDirectory, timeout: timeout, output: output, state: { await self.state(of: sandbox) })
    }

    public func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        try await agent.writeFile(path, contents: contents, in: sandbox, state: { await self.state(of: sandbox) })
    }

    public func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        try await agent.readFile(path, in: sandbox, state: { await self.state(of: sandbox) })
    }

    public func destroy(_ sandbox: SandboxHandle) async throws {
        try await remove(sandbox.id)
        if let name = sandbox.agent { agent.remove(name) }
        if let name = sandbox.workspace { await workspaces.close(name) }
    }

    public func destroy(id: String) async throws {
        // Known only by id (reconcile): its labels name its workspace and agent.
        let labels = (try? await engine.inspectContainer(id))?.Config?.Labels ?? [:]
        try await remove(id)
        if let name = labels[SandboxLabel.agent] { agent.remove(name) }
        if let name = labels[SandboxLabel.workspace] { await workspaces.closeOrphan(name) }
    }

    public func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? {
        let found = SandboxHandle(id: id, spec: spec, labels: labels)
        guard let name = labels[SandboxLabel.workspace], let uid = labels[SandboxLabel.uid].flatMap({ Int($0) }),
            await answers(found), let workspace = await workspaces.attach(name, uid: uid)
        else { return nil }
        var all = labels
        all[SandboxLabel.uid] = String(workspace.uid)
        return SandboxHandle(id: id, spec: spec, labels: all)
    }

    /// Whether the sandbox's agent answers its health check (the liveness check of `adopt`).
    func answers(_ sandbox: SandboxHandle) async -> Bool {
        await agent.answers(sandbox)
    }

    private func remove(_ id: String) async throws {
        do {
            try await engine.removeContainer(id, force: true)
        } catch let error as EngineError {
            throw Self.translate(error, doing: "removing sandbox \(id.prefix(12))")
        }
    }

    public func removeSessionData(session: String) async throws {
        try await workspaces.remove(WorkspaceImages.sessionName(instance: instance, session: session))
    }

    public func list(instance: String) async throws -> [(id: String, labels: [String: String])] {
        do {
            let found = try await engine.listContainers(labels: [SandboxLabel.instance: instance]).map { ($0.Id, $0.Labels ?? [:]) }
            // Sandboxes that outlived a previous run keep their uids until they are removed.
            for (_, labels) in found {
                if let name = labels[SandboxLabel.workspace], let uid = labels[SandboxLabel.uid].flatMap({ Int($0) }) {
                    workspaces.adopt(name, uid: uid)
                }
            }
            return found
        } catch let error as EngineError {
            throw Self.translate(error, doing: "listing sandboxes")
        }
    }

    // MARK: - errors

    static func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : workspace + "/" + path
    }

    /// What the engine says of `sandbox` when its agent does not answer: nil while it runs,
    /// else why it does not (gone, stopped, killed for memory).
    func state(of sandbox: SandboxHandle) async -> HandsError? {
        do {
            let inspect = try await engine.inspectContainer(sandbox.id)
            return inspect.State?.Running == true ? nil : Self.stateError(inspect, spec: sandbox.spec)
        } catch let error as EngineError where error.isNotFound {
            return HandsError(.sandboxGone, "the sandbox no longer exists (removed from outside?)")
        } catch {
            return nil
        }
    }

    static func stateError(_ inspect: ContainerInspect, spec: SandboxSpec) -> HandsError {
        if inspect.State?.OOMKilled == true {
            return HandsError(
                .outOfMemory,
                "the sandbox ran out of memory (limit \(formatBytes(spec.memoryBytes))) and was killed — files in /tmp are held in memory and count against it")
        }
        let status = inspect.State?.Status ?? "stopped"
        let code = inspect.State?.ExitCode.map { ", exit code \($0)" } ?? ""
        if inspect.State?.ExitCode == 128 + Int(SIGKILL) {
            // The engine does not always flag an OOM kill of PID 1 (the agent): say both causes.
            return HandsError(
                .sandboxGone,
                "the sandbox is no longer running (\(status)\(code)): its agent was killed — by the OOM killer when the sandbox's memory (limit \(formatBytes(spec.memoryBytes))) ran out, or from outside; files in /tmp are held in memory and count against it")
        }
        return HandsError(.sandboxGone, "the sandbox is no longer running (\(status)\(code))")
    }

    static func translate(_ error: EngineError, doing what: String, provisioning: Bool = false) -> HandsError {
        switch error.code {
        case .unreachable, .transport, .cancelled:
            return HandsError(.unreachable, "the container engine is unreachable while \(what): \(error.message)")
        case .timeout:
            return HandsError(.unreachable, "the container engine did not answer in time while \(what)")
        default:
            if error.isNotFound && !provisioning {
                return HandsError(.invalidRequest, "\(what): \(error.engineMessage ?? error.message)")
            }
            return HandsError(provisioning ? .provisioning : .invalidRequest, "\(what): \(error.engineMessage ?? error.message)")
        }
    }
}

/// `268435456` → `256 MiB`.
func formatBytes(_ bytes: Int) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 && value.truncatingRemainder(dividingBy: 1024) == 0 {
        value /= 1024
        unit += 1
    }
    return value == value.rounded() ? "\(Int(value)) \(units[unit])" : String(format: "%.1f %@", value, units[unit])
}

import Foundation
import Glibc
import Synchronization
import SystemdBus

/// Hands as transient systemd units (`driver: unit` in a policy).
///
/// A task's sandbox is a transient slice holding the task's limits (`MemoryMax`, `TasksMax`,
/// `CPUQuota`, shared by all its processes, like a container's cgroup), a workspace of its
/// own, a filesystem of the policy's `hands.disk` size (`WorkspaceImages`), and one long-lived
/// transient service in that slice running the sandbox agent (`UnitAgentService`, named after
/// the slice, see `UnitNames`), isolated with `PrivateNetwork`, `PrivateTmp`,
/// `PrivateDevices`, `PrivateIPC`, `ProtectSystem=strict`, `ProtectHome=tmpfs`,
/// `ProtectProc=invisible` and `ProcSubset=pid`, `NoNewPrivileges`,
/// `SystemCallFilter=@system-service`, the workspace bind-mounted at `/workspace` as its only
/// writable path, and optionally `RootDirectory=` an unpacked image (otherwise the host's
/// root, read-only). Commands, file reads and writes go through the agent's socket
/// (`AgentHands`, shared with the container driver): a command is a fork and an exec inside
/// the sandbox, its output streams as it is produced, its timeout kills its process group, and
/// files are read and written by the agent as the sandbox's user, with the sandbox's own mount
/// view, so that a symlink planted in the workspace resolves inside the sandbox, never on the
/// host.
///
/// **User.** Each sandbox has a uid (and gid) of its own from `SandboxUIDs`, the owner of its
/// workspace's root, as `User=`/`Group=`. `DynamicUser=yes` is not used: the workspace must
/// keep one owner across the tasks of a session. systemd resolves `User=` through NSS, so the
/// uid gets a user record while the sandbox lives (`UserRecords`, in `/run/userdb`).
///
/// **Restart.** The slice's description ends in `, uid N, workspace NAME, agent NAME)`, so
/// that a restarted agentd knows a surviving sandbox's uid, workspace and agent socket.
///
/// **Environment.** The manager's own environment (on a `systemd --user` manager started from
/// a shell, everything that shell had) is removed from the agent's with `UnsetEnvironment=`;
/// commands get only what `AgentHands` gives them (`HOME`, `PATH`).
public struct UnitDriver: HandsDriver {
    public let manager: SystemdManager
    public let instance: String
    /// Where workspaces (`workspaces/`, unless given) live; root-owned.
    public let stateDirectory: String
    /// Where workspaces are made and mounted (shared with the container driver, for one uid range).
    public let workspaces: WorkspaceImages
    /// The sandbox agent's executable and socket directories (shared with the container driver).
    public let agent: AgentHands
    /// Workspace and agent names of each sandbox slice this driver knows (a slice id alone
    /// does not say whether its workspace is the task's or the session's).
    private let sliceRecords = SliceRecords()
    /// An unpacked image used as `RootDirectory=`, or nil for the host's root (read-only).
    /// It must be traversable by the sandbox user and hold `/workspace`, `/tmp` and `/run`.
    public let rootDirectory: String?
    private let cache = EnvironmentCache()
    /// Held per session slice while a sandbox slice starts in it, or while it is stopped
    /// because its last sandbox went: a stop never takes a sibling starting at that moment.
    private let sessionSlices = KeyedLock()
    public var kind: String { "unit" }

    /// The workspace mount point inside every sandbox (the same as the container driver's).
    public static let workspace = ContainerDriver.workspace

    /// - Parameters:
    ///   - agent: the sandbox agent; by default its executable next to this process's own and
    ///     its sockets under `<stateDirectory>/agents`.
    ///   - workspaces: the store to share with the container driver; by default one under
    ///     `<stateDirectory>/workspaces`.
    /// - Throws: `HandsError.provisioning` when the state directory cannot be made.
    public init(
        manager: SystemdManager, instance: String, stateDirectory: String, agent: AgentHands? = nil, rootDirectory: String? = nil,
        workspaces: WorkspaceImages? = nil
    ) throws {
        self.manager = manager
        self.instance = instance
        self.stateDirectory = stateDirectory
        self.rootDirectory = rootDirectory
        // Without an image, the host's root is the sandbox's (read-only) and needs the mount
        // point /workspace; systemd would create it at the first start anyway — an empty,
        // root-owned directory. With an image the image provides it.
        let mountPoint = rootDirectory == nil ? [Self.workspace] : []
        for dir in [stateDirectory] + mountPoint {
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw HandsError(.provisioning, "cannot create the unit driver's directory \(dir): \(error.localizedDescription)")
            }
        }
        self.agent = try agent ?? AgentHands(directory: stateDirectory + "/agents")
        self.workspaces = try workspaces ?? WorkspaceImages(directory: stateDirectory + "/workspaces")
    }

    /// The workspace name of a new sandbox slice `id`.
    private func workspaceName(_ spec: SandboxSpec, id: String, labels: [String: String]) -> String {
        if spec.workspace == .session, let session = labels[SandboxLabel.session] {
            return WorkspaceImages.sessionName(instance: instance, session: session)
        }
        return WorkspaceImages.taskName(String(id.dropLast(".slice".count)))
    }

    // MARK: - provisioning

    public func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        try agent.checkExecutable()
        let stem = UnitNames.sandboxStem(instance: instance, session: labels[SandboxLabel.session], task: labels[SandboxLabel.task])
        let id = stem + ".slice"
        let workspace = try await workspaces.open(workspaceName(spec, id: id, labels: labels), sizeBytes: spec.diskBytes)
        let agentName = AgentHands.freshName()
        do {
            try UserRecords.write(workspace.uid)
            try agent.prepare(agentName, uid: workspace.uid)
        } catch {
            agent.remove(agentName)
            await closeWorkspace(workspace.name, uid: workspace.uid)
            throw error
        }
        var allLabels = labels
        allLabels[SandboxLabel.instance] = instance
        allLabels[SandboxLabel.policy] = spec.policyName
        allLabels[SandboxLabel.uid] = String(workspace.uid)
        allLabels[SandboxLabel.workspace] = workspace.name
        allLabels[SandboxLabel.agent] = agentName
        let sandbox = SandboxHandle(id: id, spec: spec, labels: allLabels)
        sliceRecords.set(id, workspace: workspace.name, agent: agentName)
        do {
            try await startSlice(sandbox, description: Self.description(labels: labels, spec: spec, workspace: workspace, agent: agentName))
            try await startAgent(sandbox, workspace: workspace, agentName: agentName)
        } catch {
            try? await stop(id)
            sliceRecords.remove(id)
            agent.remove(agentName)
            await closeWorkspace(workspace.name, uid: workspace.uid)
            throw error
        }
        return sandbox
    }

    /// Starts the sandbox's slice, with its limits, in its session's slice.
    private func startSlice(_ sandbox: SandboxHandle, description: String) async throws {
        let parent = UnitNames.sessionSlice(ofSlice: sandbox.id, instance: instance)
        if let parent { await sessionSlices.lock(parent) }
        defer { if let parent { sessionSlices.unlock(parent) } }
        do {
            try await manager.startSlice(
                sandbox.id,
                properties: [
                    .string("Description", description),
                    .uint64("MemoryMax", UInt64(sandbox.spec.memoryBytes)),
                    .uint64("TasksMax", UInt64(sandbox.spec.pids)),
                    .cpuQuota(sandbox.spec.cpus),
                ])
        } catch let error as SystemdError {
            throw Self.translate(error, doing: "creating the sandbox slice \(sandbox.id)", provisioning: true)
        }
    }

    /// Starts the sandbox's agent service in its slice and waits until the agent answers.
    private func startAgent(_ sandbox: SandboxHandle, workspace: WorkspaceImages.Workspace, agentName: String) async throws {
        let service = UnitAgentService.name(ofSlice: sandbox.id)
        let setup = UnitAgentService.Setup(
            slice: sandbox.id, uid: workspace.uid, workspace: workspace.hostPath, socketDirectory: agent.hostDirectory(agentName),
            agent: agent.executable, rootDirectory: rootDirectory, nofile: sandbox.spec.nofile,
            unsetEnvironment: try await cache.managerEnvironmentNames(manager), proxy: sandbox.spec.egressProxy)
        do {
            let result = try await manager.startTransientUnit(service, properties: UnitAgentService.properties(setup))
            guard result == "done" else {
                throw HandsError(.provisioning, "the sandbox's agent service \(service) did not start (job \(result))\(await serviceEnding(service))")
            }
        } catch let error as SystemdError {
            throw Self.translate(error, doing: "starting the sandbox's agent service \(service)", provisioning: true)
        }
        try await agent.waitReady(agentName) { await self.agentServiceState(sandbox) }
    }

    /// `, result R, status S` of a service that ended, for an error message ("" when unknown).
    private func serviceEnding(_ service: String) async -> String {
        guard let state = try? await manager.unitProperties(service), !state.result.isEmpty else { return "" }
        return ", result \(state.result), exit status \(state.execMainStatus)"
    }

    /// What systemd says of the sandbox: nil while its slice and agent service run, otherwise
    /// the `sandboxGone` error saying which stopped (for `AgentHands` when the agent does not
    /// answer). The manager unreachable is `unreachable`.
    func agentServiceState(_ sandbox: SandboxHandle) async -> HandsError? {
        let service = UnitAgentService.name(ofSlice: sandbox.id)
        do {
            let slice = try await manager.unitProperties(sandbox.id)
            guard Self.isUsable(slice) else {
                // Active with a job other than a start pending: being stopped.
                let how = slice.activeState == "active" ? "stopping" : slice.activeState.isEmpty ? "gone" : slice.activeState
                return HandsError(.sandboxGone, "the sandbox is no longer running (its slice is \(how))")
            }
            let state = try await manager.unitProperties(service)
            guard Self.isUsable(state) else {
                let how =
                    state.activeState.isEmpty || state.loadState == "not-found" ? "gone" : state.activeState == "active" ? "stopping" : state.activeState
                let result = state.result.isEmpty || state.result == "success" ? "" : ", result \(state.result)"
                return HandsError(.sandboxGone, "the sandbox is no longer running (its agent service is \(how)\(result))")
            }
            return nil
        } catch let error as SystemdError {
            return Self.translate(error, doing: "checking the sandbox")
        } catch {
            return HandsError(.unreachable, "checking the sandbox: \(error)")
        }
    }

    /// Whether the agent of `sandbox` answers (a sandbox found after a restart is kept only
    /// when it does).
    public func agentAnswers(_ sandbox: SandboxHandle, timeout: Duration = .seconds(5)) async -> Bool {
        await agent.answers(sandbox, timeout: timeout)
    }

    /// `agentd sandbox SESSION/TASK (policy P, uid N, workspace W, agent A)`: a slice's
    /// description, which a restarted agentd reads back.
    static func description(labels: [String: String], spec: SandboxSpec, workspace: WorkspaceImages.Workspace, agent: String) -> String {
        "agentd sandbox \(labels[SandboxLabel.session] ?? "pool")/\(labels[SandboxLabel.task] ?? "-") (policy \(spec.policyName), uid \(workspace.uid), workspace \(workspace.name), agent \(agent))"
    }

    /// The uid, workspace name and agent name a slice's description carries, if it has them
    /// (a slice of an agentd before the agent has no agent name).
    static func parseDescription(_ description: String) -> (uid: Int, workspace: String, agent: String?)? {
        guard let range = description.range(of: ", uid ", options: .backwards), description.hasSuffix(")") else { return nil }
        let parts = description[range.upperBound...].dropLast().split(separator: " ")
        guard parts.count == 3 || parts.count == 5, parts[0].hasSuffix(","), parts[1] == "workspace", let uid = Int(parts[0].dropLast()) else {
            return nil
        }
        if parts.count == 3 { return (uid, String(parts[2]), nil) }
        guard parts[2].hasSuffix(","), parts[3] == "agent" else { return nil }
        return (uid, String(parts[2].dropLast()), String(parts[4]))
    }

    /// A pooled sandbox keeps its pool name (a slice cannot be renamed); the manager tracks
    /// it by id and labels.
    public func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {}

    // MARK: - commands and files

    public func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        let out = try await agent.run(argv, in: sandbox, workingDirectory: workingDirectory, timeout: timeout, output: output) {
            await self.agentServiceState(sandbox)
        }
        // Killed by a signal, not by its timeout: the sandbox may be stopping (systemd signals
        // every process of the service, and the agent still answers before it exits).
        if out.exitCode > 128, !out.timedOut, let gone = await agentServiceState(sandbox), gone.kind == .sandboxGone { throw gone }
        return out
    }

    public func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        try await agent.writeFile(path, contents: contents, in: sandbox) { await self.agentServiceState(sandbox) }
    }

    public func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        try await agent.readFile(path, in: sandbox) { await self.agentServiceState(sandbox) }
    }

    /// A unit (slice or service) is usable while active with no stop (or other, or vanished)
    /// job pending.
    static func isUsable(_ unit: UnitStatus) -> Bool {
        unit.activeState == "active" && (unit.jobType == nil || unit.jobType == "start")
    }

    // MARK: - removal and listing

    public func destroy(_ sandbox: SandboxHandle) async throws {
        try await stop(sandbox.id)
        sliceRecords.remove(sandbox.id)
        if let name = sandbox.agent { agent.remove(name) }
        if let name = sandbox.workspace { await closeWorkspace(name, uid: sandbox.uid) }
    }

    /// Closes workspace `name`; once its uid is free, removes the uid's user record.
    private func closeWorkspace(_ name: String, uid: Int?, orphan: Bool = false) async {
        let held = uid ?? workspaces.uids.uid(of: name)
        if orphan { await workspaces.closeOrphan(name) } else { await workspaces.close(name) }
        if let held, workspaces.uids.uid(of: name) == nil { UserRecords.remove(held) }
    }

    public func destroy(id: String) async throws {
        try await stop(id)
        // Only a name of this instance's form, so that no id can name another's workspace.
        guard UnitNames.labels(ofSlice: id, instance: instance) != nil else { return }
        let record = sliceRecords.remove(id)
        if let name = record?.agent { agent.remove(name) }
        await closeWorkspace(record?.workspace ?? WorkspaceImages.taskName(String(id.dropLast(".slice".count))), uid: nil, orphan: true)
    }

    public func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? {
        guard let name = labels[SandboxLabel.workspace], let uid = labels[SandboxLabel.uid].flatMap({ Int($0) }) else { return nil }
        var all = labels
        all[SandboxLabel.instance] = instance
        all[SandboxLabel.policy] = all[SandboxLabel.policy] ?? spec.policyName
        let handle = SandboxHandle(id: id, spec: spec, labels: all)
        // The user record lives in /run and may be gone (a reboot of the manager's host).
        guard (try? UserRecords.write(uid)) != nil, await agentAnswers(handle), let workspace = await workspaces.attach(name, uid: uid) else { return nil }
        sliceRecords.set(id, workspace: workspace.name, agent: handle.agent)
        return handle
    }

    public func removeSessionData(session: String) async throws {
        try await workspaces.remove(WorkspaceImages.sessionName(instance: instance, session: session))
    }

    /// Stops the sandbox's agent service (its commands with it), then its slice.
    private func stop(_ slice: String) async throws {
        let service = UnitAgentService.name(ofSlice: slice)
        do {
            try await manager.stopUnitAndWait(service, timeout: .seconds(30))
            try? await manager.resetFailedUnit(service)
            try await manager.stopUnitAndWait(slice, timeout: .seconds(30))
            try? await manager.resetFailedUnit(slice)
        } catch let error as SystemdError {
            throw Self.translate(error, doing: "stopping sandbox \(slice)")
        }
        try await stopSessionSliceIfEmpty(of: slice)
    }

    /// Stops the per-session slice systemd made implicitly around `slice` once no sandbox of
    /// the session is left in it: it would otherwise stay active for as long as the manager runs.
    private func stopSessionSliceIfEmpty(of slice: String) async throws {
        guard let parent = UnitNames.sessionSlice(ofSlice: slice, instance: instance) else { return }
        await sessionSlices.lock(parent)
        defer { sessionSlices.unlock(parent) }
        do {
            let siblings = try await manager.listUnits(
                matching: [String(parent.dropLast(".slice".count)) + "-*.slice"], states: ["active", "activating", "reloading"])
            guard siblings.isEmpty else { return }
            _ = try await manager.stopUnitAndWait(parent, timeout: .seconds(30))
        } catch let error as SystemdError {
            throw Self.translate(error, doing: "stopping the session slice \(parent)")
        }
    }

    public func list(instance: String) async throws -> [(id: String, labels: [String: String])] {
        do {
            return try await manager.listUnits(matching: [UnitNames.pattern(instance: instance)]).compactMap { unit in
                guard unit.activeState != "inactive", var labels = UnitNames.labels(ofSlice: unit.name, instance: instance) else { return nil }
                if let (uid, workspace, agentName) = Self.parseDescription(unit.description) {
                    // A sandbox that outlived a previous run keeps its uid until it is removed.
                    workspaces.adopt(workspace, uid: uid)
                    sliceRecords.set(unit.name, workspace: workspace, agent: agentName)
                    labels[SandboxLabel.uid] = String(uid)
                    labels[SandboxLabel.workspace] = workspace
                    labels[SandboxLabel.agent] = agentName
                }
                return (unit.name, labels)
            }
        } catch let error as SystemdError {
            throw Self.translate(error, doing: "listing sandboxes")
        }
    }

    // MARK: - errors

    static func translate(_ error: SystemdError, doing what: String, provisioning: Bool = false) -> HandsError {
        switch error.code {
        case .unreachable, .closed:
            return HandsError(.unreachable, "the systemd manager is unreachable while \(what): \(error.message)")
        case .timeout:
            return HandsError(.unreachable, "the systemd manager did not answer in time while \(what)")
        default:
            return HandsError(provisioning ? .provisioning : .invalidRequest, "\(what): \(error.message)")
        }
    }

}

/// Slice id → its workspace and agent names, for `destroy(id:)`.
private final class SliceRecords: Sendable {
    struct Record {
        var workspace: String
        var agent: String?
    }
    private let table = Mutex<[String: Record]>([:])
    func set(_ id: String, workspace: String, agent: String?) { table.withLock { $0[id] = Record(workspace: workspace, agent: agent) } }
    @discardableResult
    func remove(_ id: String) -> Record? { table.withLock { $0.removeValue(forKey: id) } }
}

/// A lock per name, held across suspension points (`lock` waits without blocking a thread).
final class KeyedLock: Sendable {
    /// Each held name with the callers waiting for it, first come first served.
    private let held = Mutex<[String: [CheckedContinuation<Void, Never>]]>([:])

    func lock(_ name: String) async {
        await withCheckedContinuation { (waiter: CheckedContinuation<Void, Never>) in
            let acquired = held.withLock { table -> Bool in
                guard table[name] != nil else {
                    table[name] = []
                    return true
                }
                table[name, default: []].append(waiter)
                return false
            }
            if acquired { waiter.resume() }
        }
    }

    func unlock(_ name: String) {
        let next = held.withLock { table -> CheckedContinuation<Void, Never>? in
            guard var waiters = table[name], !waiters.isEmpty else {
                table[name] = nil
                return nil
            }
            let first = waiters.removeFirst()
            table[name] = waiters
            return first
        }
        next?.resume()
    }
}

/// The names in the manager's environment block, read once per driver.
private final class EnvironmentCache: Sendable {
    private let names = Mutex<[String]?>(nil)

    func managerEnvironmentNames(_ manager: SystemdManager) async throws -> [String] {
        if let cached = names.withLock({ $0 }) { return cached }
        let value: BusValue
        do {
            value = try await manager.property(path: "/org/freedesktop/systemd1", interface: "org.freedesktop.systemd1.Manager", name: "Environment")
        } catch let error as SystemdError {
            throw UnitDriver.translate(error, doing: "reading the manager's environment")
        }
        var list: [String] = []
        if case .variant(.array(_, let items)) = value {
            list = items.compactMap { $0.stringValue?.split(separator: "=", maxSplits: 1).first.map(String.init) }
        } else if case .array(_, let items) = value {
            list = items.compactMap { $0.stringValue?.split(separator: "=", maxSplits: 1).first.map(String.init) }
        }
        list.removeAll { $0 == "PATH" || $0 == "HOME" }
        names.withLock { $0 = list }
        return list
    }
}

import Foundation
import Glibc
import Synchronization
import SystemdBus

/// Hands as transient systemd units (`driver: unit` in a policy).
///
/// A task's sandbox is a transient slice holding the task's limits (`MemoryMax`, `TasksMax`,
/// `CPUQuota`, shared by all its processes, like a container's cgroup) plus a workspace of
/// its own, a filesystem of the policy's `hands.disk` size (`WorkspaceImages`). Every command
/// is one transient service in that slice (see `UnitNames` for the naming), isolated with
/// `PrivateNetwork`, `PrivateTmp`, `PrivateDevices`, `PrivateIPC`, `ProtectSystem=strict`,
/// `ProtectHome=tmpfs`, `ProtectProc=invisible` and `ProcSubset=pid` (no other user's
/// processes, and nothing but processes, in its `/proc`: neither other sandboxes nor the
/// host's command lines), `NoNewPrivileges`, `SystemCallFilter=@system-service`, the workspace
/// bind-mounted at `/workspace` as its only writable path, `RuntimeMaxSec=` the command's
/// timeout, and optionally `RootDirectory=` an unpacked image (otherwise the host's root,
/// read-only). Its stdout and stderr reach agentd through pipes passed as
/// `StandardOutputFileDescriptor`/`StandardErrorFileDescriptor`, the way
/// `systemd-run --pipe` does.
///
/// **User.** Each sandbox has a uid (and gid) of its own from `SandboxUIDs`, the owner of its
/// workspace's root, as `User=`/`Group=`; it is written in the slice's description
/// (`…, uid N, workspace NAME)`) so that a restarted agentd knows it. `DynamicUser=yes` is
/// not used: it would give every command's unit a uid of its own, and the workspace must keep
/// one owner across the commands of a task. systemd resolves `User=` through NSS, so the uid
/// gets a user record while the sandbox lives (`UserRecords`, in `/run/userdb`).
///
/// **Files.** `write_file` and `read_file` run as short units of the same kind, as the
/// sandbox's user and with the sandbox's own mount view, so that a symlink planted in the
/// workspace resolves inside the sandbox and with its permissions — never on the host.
///
/// **Environment.** The manager's own environment (on a `systemd --user` manager started from
/// a shell, everything that shell had) is removed with `UnsetEnvironment=`; commands see
/// only `HOME`, `PATH` and what systemd itself sets.
public struct UnitDriver: HandsDriver {
    public let manager: SystemdManager
    public let instance: String
    /// Where workspaces (`workspaces/`, unless given) and staging files (`tmp/`) live; root-owned.
    public let stateDirectory: String
    /// Where workspaces are made and mounted (shared with the container driver, for one uid range).
    public let workspaces: WorkspaceImages
    /// Workspace name of each sandbox slice this driver knows (a slice id alone does not say
    /// whether its workspace is the task's or the session's).
    private let sliceWorkspaces = SliceWorkspaces()
    /// An unpacked image used as `RootDirectory=`, or nil for the host's root (read-only).
    /// It must be traversable by the sandbox user and hold `/workspace`, `/tmp` and `/bin/sh`.
    public let rootDirectory: String?
    private let cache = EnvironmentCache()
    /// Held per session slice while a sandbox slice starts in it, or while it is stopped
    /// because its last sandbox went: a stop never takes a sibling starting at that moment.
    private let sessionSlices = KeyedLock()
    public var kind: String { "unit" }

    /// The workspace mount point inside every sandbox (the same as the container driver's).
    public static let workspace = ContainerDriver.workspace

    /// - Parameter workspaces: the store to share with the container driver; by default one
    ///   under `<stateDirectory>/workspaces`.
    /// - Throws: `HandsError.provisioning` when the state directory cannot be made.
    public init(
        manager: SystemdManager, instance: String, stateDirectory: String, rootDirectory: String? = nil, workspaces: WorkspaceImages? = nil
    ) throws {
        self.manager = manager
        self.instance = instance
        self.stateDirectory = stateDirectory
        self.rootDirectory = rootDirectory
        // Without an image, the host's root is the sandbox's (read-only) and needs the mount
        // point /workspace; systemd would create it at the first command anyway — an empty,
        // root-owned directory. With an image the image provides it.
        let mountPoint = rootDirectory == nil ? [Self.workspace] : []
        for dir in [stateDirectory, stateDirectory + "/tmp"] + mountPoint {
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw HandsError(.provisioning, "cannot create the unit driver's directory \(dir): \(error.localizedDescription)")
            }
        }
        self.workspaces = try workspaces ?? WorkspaceImages(directory: stateDirectory + "/workspaces")
    }

    private var staging: String { stateDirectory + "/tmp" }

    /// The workspace name of a new sandbox slice `id`.
    private func workspaceName(_ spec: SandboxSpec, id: String, labels: [String: String]) -> String {
        if spec.workspace == .session, let session = labels[SandboxLabel.session] {
            return WorkspaceImages.sessionName(instance: instance, session: session)
        }
        return WorkspaceImages.taskName(String(id.dropLast(".slice".count)))
    }

    // MARK: - provisioning

    public func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        let stem = UnitNames.sandboxStem(instance: instance, session: labels[SandboxLabel.session], task: labels[SandboxLabel.task])
        let id = stem + ".slice"
        let workspace = try await workspaces.open(workspaceName(spec, id: id, labels: labels), sizeBytes: spec.diskBytes)
        do { try UserRecords.write(workspace.uid) } catch {
            await closeWorkspace(workspace.name, uid: workspace.uid)
            throw error
        }
        var allLabels = labels
        allLabels[SandboxLabel.instance] = instance
        allLabels[SandboxLabel.policy] = spec.policyName
        allLabels[SandboxLabel.uid] = String(workspace.uid)
        allLabels[SandboxLabel.workspace] = workspace.name
        let sandbox = SandboxHandle(id: id, spec: spec, labels: allLabels)
        sliceWorkspaces.set(id, workspace.name)
        let parent = UnitNames.sessionSlice(ofSlice: sandbox.id, instance: instance)
        if let parent { await sessionSlices.lock(parent) }
        defer { if let parent { sessionSlices.unlock(parent) } }
        do {
            try await manager.startSlice(
                sandbox.id,
                properties: [
                    .string(
                        "Description",
                        "agentd sandbox \(labels[SandboxLabel.session] ?? "pool")/\(labels[SandboxLabel.task] ?? "-") (policy \(spec.policyName)\(Self.descriptionSuffix(workspace)))"),
                    .uint64("MemoryMax", UInt64(spec.memoryBytes)),
                    .uint64("TasksMax", UInt64(spec.pids)),
                    .cpuQuota(spec.cpus),
                ])
        } catch let error as SystemdError {
            sliceWorkspaces.remove(id)
            await closeWorkspace(workspace.name, uid: workspace.uid)
            throw Self.translate(error, doing: "creating the sandbox slice \(sandbox.id)", provisioning: true)
        }
        return sandbox
    }

    /// `, uid N, workspace NAME`: what a restarted agentd reads back from a slice's description.
    static func descriptionSuffix(_ workspace: WorkspaceImages.Workspace) -> String {
        ", uid \(workspace.uid), workspace \(workspace.name)"
    }

    /// The uid and workspace name a slice's description carries, if it has them.
    static func parseDescription(_ description: String) -> (uid: Int, workspace: String)? {
        guard let range = description.range(of: ", uid ", options: .backwards), description.hasSuffix(")") else { return nil }
        let parts = description[range.upperBound...].dropLast().split(separator: " ")
        guard parts.count == 3, parts[0].hasSuffix(","), parts[1] == "workspace", let uid = Int(parts[0].dropLast()) else { return nil }
        return (uid, String(parts[2]))
    }

    /// A pooled sandbox keeps its pool name (a slice cannot be renamed); the manager tracks
    /// it by id and labels.
    public func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {}

    // MARK: - commands

    public func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        let result = try await runUnit(argv, in: sandbox, workingDirectory: workingDirectory, timeout: timeout, outputLimit: sandbox.spec.outputLimitBytes + 4096).output
        // Collected at the end: the sink sees everything at once.
        if let output {
            if !result.stdout.isEmpty { output(.stdout, result.stdout) }
            if !result.stderr.isEmpty { output(.stderr, result.stderr) }
        }
        return result
    }

    public func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        let absolute = ContainerDriver.absolute(path)
        let input = try UnitIO.contentsFile(contents, in: staging)
        defer { close(input) }
        let (out, _) = try await runUnit(["/bin/sh", "-c", SandboxFiles.writeScript, "sh", absolute], in: sandbox, workingDirectory: nil, timeout: .seconds(120), stdin: input, outputLimit: 64 << 10)
        guard out.exitCode == 0 else {
            throw HandsError(.invalidRequest, "cannot write \(absolute): \(SandboxFiles.text(out.stderr))")
        }
    }

    public func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        let absolute = ContainerDriver.absolute(path)
        let limit = sandbox.spec.fileLimitBytes
        let (out, _) = try await runUnit(
            ["/bin/sh", "-c", SandboxFiles.readScript(limit: limit), "sh", absolute], in: sandbox, workingDirectory: nil, timeout: .seconds(120),
            outputLimit: limit + 1)
        return try SandboxFiles.checkedRead(out, path: absolute, limit: limit)
    }

    /// Runs `argv` as one transient service in the sandbox's slice and collects its output.
    private func runUnit(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, stdin: Int32? = nil, outputLimit: Int
    ) async throws -> (output: CommandOutput, outcome: UnitOutcome) {
        let slice = try await checkedSlice(sandbox)
        let oomBefore = Self.memoryEvents(controlGroup: slice.controlGroup)
        let name = String(sandbox.id.dropLast(".slice".count)) + "_" + UnitNames.random() + ".service"
        // Everything that may throw comes before the pipes: once the reads run, only the
        // closing of the write ends below lets them finish.
        var properties = try await commandProperties(argv, sandbox: sandbox, workingDirectory: workingDirectory, timeout: timeout)
        let out = try UnitIO.pipe()
        let err: (read: Int32, write: Int32)
        do { err = try UnitIO.pipe() } catch {
            close(out.read)
            close(out.write)
            throw error
        }
        async let stdoutBytes = UnitIO.drain(out.read, limit: outputLimit)
        async let stderrBytes = UnitIO.drain(err.read, limit: outputLimit)
        properties += [.fileDescriptor("StandardOutputFileDescriptor", out.write), .fileDescriptor("StandardErrorFileDescriptor", err.write)]
        if let stdin { properties.append(.fileDescriptor("StandardInputFileDescriptor", stdin)) }
        let outcome: UnitOutcome
        do {
            outcome = try await manager.runTransientService(name, properties: properties, timeout: timeout + .seconds(30))
            // sd-bus duplicated the write ends into the message; ours go now, so that the
            // reads end when the unit's processes are gone.
            close(out.write)
            close(err.write)
        } catch let error as SystemdError {
            close(out.write)
            close(err.write)
            _ = try? await manager.stopUnitAndWait(name, timeout: .seconds(10))
            _ = await (stdoutBytes, stderrBytes)
            if error.code == .timeout {
                throw HandsError(.timeout, "the command did not finish within \(timeout) and the manager stopped answering about it")
            }
            throw Self.translate(error, doing: "running a command")
        }
        let (stdoutResult, stderrResult) = await (stdoutBytes, stderrBytes)
        let truncated = stdoutResult.truncated || stderrResult.truncated
        var output = CommandOutput(stdout: stdoutResult.bytes, stderr: stderrResult.bytes, exitCode: 0, truncated: truncated)
        switch (outcome.result, outcome.execMainCode) {
        case ("timeout", _):
            output.exitCode = 137
            output.timedOut = true
            return (output, outcome)
        case ("oom-kill", _):
            throw HandsError(.outOfMemory, "the sandbox ran out of memory (limit \(formatBytes(sandbox.spec.memoryBytes))) and the command was killed")
        case (_, 1):
            output.exitCode = Int(outcome.execMainStatus)
        default:
            // Killed (2) or dumped (3): the shell convention, 128 + signal.
            output.exitCode = 128 + Int(outcome.execMainStatus)
        }
        if output.exitCode == 137 && Self.memoryEvents(controlGroup: slice.controlGroup) > oomBefore {
            // SIGKILL while the slice's memory cgroup counted an OOM event.
            throw HandsError(.outOfMemory, "the sandbox ran out of memory (limit \(formatBytes(sandbox.spec.memoryBytes))) and the command was killed")
        }
        if outcome.execMainCode != 1 || outcome.activeState == "inactive" {
            // Killed, or stopped (a unit that exited by itself stays active, RemainAfterExit):
            // the sandbox may have been stopped from outside.
            if let state = try? await manager.unitProperties(sandbox.id), !Self.isUsable(state) {
                throw HandsError(.sandboxGone, "the sandbox is no longer running (its slice is \(state.jobType == "stop" ? "stopping" : state.activeState))")
            }
        }
        if outcome.execMainCode == 1, output.stdout.isEmpty, output.stderr.isEmpty {
            // systemd's own exit codes for a unit it could not set up (systemd.exec(5)).
            switch outcome.execMainStatus {
            case 200: throw HandsError(.invalidRequest, "the working directory \(workingDirectory ?? Self.workspace) does not exist in the sandbox")
            case 203, 216, 217, 226, 228:
                throw HandsError(.provisioning, "systemd could not set up the command's unit (exit status \(outcome.execMainStatus), see systemd.exec(5))")
            default: break
            }
        }
        return (output, outcome)
    }

    /// The sandbox's slice, checked to be active: a command started in a slice stopped from
    /// outside would run in a new, implicitly created slice without the sandbox's limits.
    private func checkedSlice(_ sandbox: SandboxHandle) async throws -> UnitStatus {
        let state: UnitStatus
        do {
            state = try await manager.unitProperties(sandbox.id)
        } catch let error as SystemdError {
            throw Self.translate(error, doing: "checking the sandbox")
        }
        guard Self.isUsable(state) else {
            throw HandsError(.sandboxGone, "the sandbox is no longer running (its slice is \(state.activeState.isEmpty ? "gone" : state.activeState))")
        }
        return state
    }

    /// A sandbox slice is usable while active with no stop (or other, or vanished) job pending. (A command started
    /// while the slice's stop job waits would cancel that job: its start requires the slice.)
    static func isUsable(_ slice: UnitStatus) -> Bool {
        slice.activeState == "active" && (slice.jobType == nil || slice.jobType == "start")
    }

    private func commandProperties(_ argv: [String], sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration) async throws -> [UnitProperty] {
        guard let uid = sandbox.uid, let workspace = sandbox.workspace else {
            throw HandsError(.sandboxGone, "the sandbox has no uid or workspace (made by an older agentd?); a fresh one is needed")
        }
        let spec = sandbox.spec
        let command = argv.first?.hasPrefix("/") == true ? argv : ["/bin/sh", "-c", #"exec "$@""#, "sh"] + argv
        let directory = workingDirectory.map { $0.hasPrefix("/") ? $0 : Self.workspace + "/" + $0 } ?? Self.workspace
        var properties: [UnitProperty] = [
            .string("Description", "agentd command in \(sandbox.id)"),
            .execStart(command),
            .string("Slice", sandbox.id),
            .string("User", String(uid)),
            .string("Group", String(uid)),
            .string("WorkingDirectory", directory),
            .bindPaths([(workspaces.hostPath(workspace), Self.workspace)]),
            .strings("ReadWritePaths", [Self.workspace]),
            .string("ProtectSystem", "strict"),
            .string("ProtectHome", "tmpfs"),
            .bool("PrivateNetwork", true),
            .bool("PrivateTmp", true),
            .bool("PrivateDevices", true),
            .bool("PrivateIPC", true),
            .string("ProtectProc", "invisible"),
            .string("ProcSubset", "pid"),
            // systemd gives a unit with its own root an empty, world-writable /run; the host's
            // /run holds sockets and user records. Either way: an empty, read-only one.
            UnitProperty("TemporaryFileSystem", .array(elementSignature: "(ss)", [.structure([.string("/run"), .string("ro,mode=0755")])])),
            .bool("NoNewPrivileges", true),
            .systemCallFilter(["@system-service"]),
            UnitProperty("SystemCallErrorNumber", .int32(EPERM)),
            .duration("RuntimeMaxUSec", timeout),
            .duration("TimeoutStopUSec", .seconds(2)),
            .uint64("LimitNOFILE", UInt64(spec.nofile)),
            .strings("Environment", ["HOME=\(Self.workspace)", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
        ]
        if let rootDirectory {
            properties += [.string("RootDirectory", rootDirectory), .bool("MountAPIVFS", true)]
        }
        let unset = try await cache.managerEnvironmentNames(manager)
        if !unset.isEmpty { properties.append(.strings("UnsetEnvironment", unset)) }
        return properties
    }

    /// OOM kills counted for the cgroup `controlGroup`: cgroup v2's `memory.events` `oom_kill`
    /// (hierarchical) or, on cgroup v1, `memory.failcnt`, the number of times the slice hit
    /// its limit (v1 counts OOM kills only in the victim's own, by then removed, cgroup).
    static func memoryEvents(controlGroup: String) -> Int {
        guard !controlGroup.isEmpty else { return 0 }
        for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            if let text = try? String(contentsOfFile: base + controlGroup + "/memory.events", encoding: .utf8) {
                for line in text.split(separator: "\n") where line.hasPrefix("oom_kill ") {
                    return Int(line.dropFirst("oom_kill ".count)) ?? 0
                }
            }
        }
        if let text = try? String(contentsOfFile: "/sys/fs/cgroup/memory" + controlGroup + "/memory.failcnt", encoding: .utf8) {
            return Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        }
        return 0
    }

    // MARK: - removal and listing

    public func destroy(_ sandbox: SandboxHandle) async throws {
        try await stop(sandbox.id)
        sliceWorkspaces.remove(sandbox.id)
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
        let name = sliceWorkspaces.remove(id) ?? WorkspaceImages.taskName(String(id.dropLast(".slice".count)))
        await closeWorkspace(name, uid: nil, orphan: true)
    }

    public func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? {
        guard let name = labels[SandboxLabel.workspace], let uid = labels[SandboxLabel.uid].flatMap({ Int($0) }) else { return nil }
        var all = labels
        all[SandboxLabel.instance] = instance
        all[SandboxLabel.policy] = all[SandboxLabel.policy] ?? spec.policyName
        let handle = SandboxHandle(id: id, spec: spec, labels: all)
        // The user record lives in /run and may be gone (a reboot of the manager's host).
        guard (try? UserRecords.write(uid)) != nil, await answers(handle), let workspace = await workspaces.attach(name, uid: uid) else { return nil }
        sliceWorkspaces.set(id, workspace.name)
        return handle
    }

    /// Whether the sandbox's slice is active and a trivial command runs in it (the liveness
    /// check of `adopt`).
    func answers(_ sandbox: SandboxHandle) async -> Bool {
        guard let out = try? await runUnit(["/bin/true"], in: sandbox, workingDirectory: nil, timeout: .seconds(10), outputLimit: 4096).output
        else { return false }
        return out.exitCode == 0
    }

    public func removeSessionData(session: String) async throws {
        try await workspaces.remove(WorkspaceImages.sessionName(instance: instance, session: session))
    }

    private func stop(_ slice: String) async throws {
        do {
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
                if let (uid, workspace) = Self.parseDescription(unit.description) {
                    // A sandbox that outlived a previous run keeps its uid until it is removed.
                    workspaces.adopt(workspace, uid: uid)
                    sliceWorkspaces.set(unit.name, workspace)
                    labels[SandboxLabel.uid] = String(uid)
                    labels[SandboxLabel.workspace] = workspace
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

/// Slice id → workspace name, for `destroy(id:)`.
private final class SliceWorkspaces: Sendable {
    private let table = Mutex<[String: String]>([:])
    func set(_ id: String, _ name: String) { table.withLock { $0[id] = name } }
    @discardableResult
    func remove(_ id: String) -> String? { table.withLock { $0.removeValue(forKey: id) } }
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

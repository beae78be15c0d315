import Synchronization
import EngineAPI
import Foundation

/// Hands as containers, through the container engine's Docker API.
///
/// Every sandbox is hardened by default: no network, read-only root filesystem with a
/// writable `/workspace` and a tmpfs `/tmp`, all capabilities dropped, `no-new-privileges`,
/// memory (without swap), pids and CPU limits, and ulimits at or below the host's hard limits.
///
/// **User and workspace.** Each sandbox runs as a uid of its own (`SandboxUIDs`, recorded in
/// its `agentd.uid` label) and its `/workspace` is a filesystem of its own of the policy's
/// `hands.disk` size (`WorkspaceImages`, a host path bind-mounted with `HostConfig.Binds`;
/// its name is the `agentd.workspace` label). The engine must run on this host, as root.
///
/// **Files.** `write_file` and `read_file` never use the engine's archive API, which acts as
/// root on the container's whole filesystem: the bytes to write are staged in the workspace
/// (a fresh random name, `O_EXCL|O_NOFOLLOW`, owned by the sandbox's uid) and copied into
/// place by an exec as the sandbox's user; a read is an exec of `cat` as that user. So a
/// write lands only where the sandbox's user may write, and a symlink planted in the workspace
/// resolves inside the sandbox, never on the host. (The staged copy counts against
/// `hands.disk` until it is copied, so a write needs room for its bytes twice.)
public struct ContainerDriver: HandsDriver {
    public let engine: EngineClient
    public let instance: String
    /// Where workspaces are made and mounted (shared with the unit driver, for one uid range).
    public let workspaces: WorkspaceImages
    public var kind: String { "container" }

    /// The workspace mount point inside every sandbox.
    public static let workspace = "/workspace"

    public init(engine: EngineClient, instance: String, workspaces: WorkspaceImages) {
        self.engine = engine
        self.instance = instance
        self.workspaces = workspaces
    }

    /// The engine's create request for a sandbox of `spec` with `labels` (instance and policy
    /// labels added) running as `workspace`'s uid with it at `/workspace`: exactly what
    /// `provision` sends. Without a workspace (benchmarks), `/workspace` is the image's own.
    public func containerSpec(_ spec: SandboxSpec, labels: [String: String], workspace: WorkspaceImages.Workspace? = nil) -> ContainerSpec {
        var allLabels = labels
        allLabels[SandboxLabel.instance] = instance
        allLabels[SandboxLabel.policy] = spec.policyName
        if let workspace {
            allLabels[SandboxLabel.uid] = String(workspace.uid)
            allLabels[SandboxLabel.workspace] = workspace.name
        }
        let uid = workspace?.uid ?? 65534
        var container = ContainerSpec(
            image: spec.image,
            // PID 1 only waits; every command arrives through exec.
            command: ["sleep", "2147483647"],
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
        if let workspace { host.Binds = ["\(workspace.hostPath):\(Self.workspace):rw,nosuid,nodev"] }
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

    /// The argv an exec of `argv` runs: killed inside the sandbox at `timeout`.
    public static func wrapped(_ argv: [String], timeout: Duration) -> [String] {
        let seconds = max(1, Int((Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18).rounded(.up)))
        return ["timeout", "-s", "KILL", String(seconds)] + argv
    }

    public func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        let workspace = try await workspaces.open(workspaceName(spec, labels: labels), sizeBytes: spec.diskBytes)
        let container = containerSpec(spec, labels: labels, workspace: workspace)
        let allLabels = container.Labels ?? [:]
        let id: String
        do {
            let name = labels[SandboxLabel.session].flatMap { session in
                labels[SandboxLabel.task].map { Self.containerName(TaskKey(session: session, task: $0), instance: instance) }
            }
            id = try await engine.createContainer(container, name: name)
        } catch let error as EngineError {
            await workspaces.close(workspace.name)
            throw Self.translate(error, doing: "provisioning a sandbox from image \(spec.image)", provisioning: true)
        }
        do {
            try await engine.startContainer(id)
        } catch let error as EngineError {
            _ = try? await engine.removeContainer(id, force: true)
            await workspaces.close(workspace.name)
            throw Self.translate(error, doing: "starting a sandbox from image \(spec.image)", provisioning: true)
        }
        return SandboxHandle(id: id, spec: spec, labels: allLabels)
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
        let result = try await runExec(argv, in: sandbox, workingDirectory: workingDirectory, timeout: timeout)
        // The engine's exec answers at the end: the sink sees everything at once.
        if let output {
            if !result.stdout.isEmpty { output(.stdout, result.stdout) }
            if !result.stderr.isEmpty { output(.stderr, result.stderr) }
        }
        return result
    }

    private func runExec(_ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration) async throws -> CommandOutput {
        // The command is killed inside the sandbox at its timeout; the request's own timeout is
        // a backstop a few seconds later, after which the whole sandbox is discarded.
        let wrapped = Self.wrapped(argv, timeout: timeout)
        let seconds = Int(wrapped[3]) ?? 1
        let started = ContinuousClock.now
        let result: ExecResult
        do {
            result = try await engine.exec(
                sandbox.id, command: wrapped, workingDirectory: workingDirectory.map(Self.absolute) ?? Self.workspace,
                timeout: timeout + .seconds(10), maxOutputBytes: sandbox.spec.outputLimitBytes + 4096)
        } catch let error as EngineError {
            if error.code == .timeout {
                throw HandsError(.timeout, "the command did not finish within \(seconds)s and the sandbox stopped answering")
            }
            throw await diagnose(error, sandbox: sandbox, doing: "running a command")
        }
        let elapsed = ContinuousClock.now - started
        if result.exitCode == 137 {
            // Killed: by our timeout, by the OOM killer, or the sandbox is going away.
            if let inspect = try? await engine.inspectContainer(sandbox.id) {
                if inspect.State?.OOMKilled == true || inspect.State?.Running == false {
                    throw Self.stateError(inspect, spec: sandbox.spec)
                }
            }
            if elapsed >= timeout - .milliseconds(200) {
                return CommandOutput(stdout: result.stdout, stderr: result.stderr, exitCode: 137, truncated: result.truncated, timedOut: true)
            }
            // Killed early: the command's own doing, the OOM killer, or a sandbox whose memory
            // is used up (then every command is killed as it starts). The probe tells which.
            if let health = await probe(sandbox) {
                if let broken = Self.unusable(health, spec: sandbox.spec) { throw broken }
                // A process killed by the OOM killer while PID 1 survives does not set the
                // engine's OOMKilled flag; the sandbox's memory cgroup counts it.
                if health.oomKills > 0 {
                    throw HandsError(.outOfMemory, "the sandbox ran out of memory (limit \(formatBytes(sandbox.spec.memoryBytes))) and the command was killed")
                }
            }
        } else if Self.runtimeRefused(result), let health = await probe(sandbox), let broken = Self.unusable(health, spec: sandbox.spec) {
            // The runtime could not start the command (the engine reports 125–127 with its own
            // message): a sandbox out of pids (unreaped zombies) answers so to every call.
            throw broken
        }
        return CommandOutput(stdout: result.stdout, stderr: result.stderr, exitCode: result.exitCode, truncated: result.truncated)
    }

    /// What a probe exec found: whether a trivial command still runs, how many zombies hold
    /// process slots, and the `oom_kill` count of the sandbox's memory cgroup (cgroup v1
    /// `memory.oom_control`, v2 `memory.events`).
    struct Health: Sendable, Equatable {
        var exitCode: Int
        var stderr: String
        var zombies: Int = 0
        var oomKills: Int = 0
    }

    /// Counts zombies with shell builtins only (no process to fork), then reads the OOM counters.
    static let probeScript = #"""
        z=0; for f in /proc/[0-9]*/stat; do read -r l < "$f" 2>/dev/null || continue; case "$l" in *") Z "*) z=$((z+1));; esac; done
        echo "zombies $z"
        cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events 2>/dev/null
        exit 0
        """#

    /// Runs the probe in `sandbox`; nil when the engine could not be asked (the caller keeps
    /// the command's own result then).
    private func probe(_ sandbox: SandboxHandle) async -> Health? {
        guard let out = try? await engine.exec(sandbox.id, command: ["sh", "-c", Self.probeScript], timeout: .seconds(10), maxOutputBytes: 64 << 10)
        else { return nil }
        var health = Health(exitCode: out.exitCode, stderr: String(decoding: out.stderr, as: UTF8.self))
        for line in String(decoding: out.stdout, as: UTF8.self).split(separator: "\n") {
            if line.hasPrefix("oom_kill ") { health.oomKills = Int(line.dropFirst("oom_kill ".count)) ?? 0 }
            if line.hasPrefix("zombies ") { health.zombies = Int(line.dropFirst("zombies ".count)) ?? 0 }
        }
        return health
    }

    /// Process slots a command needs besides the zombies: the runtime's init and its threads,
    /// the `timeout` wrapper, the shell and what it starts.
    static let slotsPerCommand = 8

    /// Whether an exec failed before the command ran: the runtime refused to start it (Podman
    /// and Docker answer 125–127 with `…OCI runtime…` on stderr), or the `timeout` wrapper
    /// could not fork it.
    static func runtimeRefused(_ result: ExecResult) -> Bool {
        guard result.exitCode != 0 else { return false }
        let text = String(decoding: result.stderr.prefix(4096), as: UTF8.self)
        if text.hasPrefix("timeout: ") || text.contains("can't fork") { return true }
        return (125...127).contains(result.exitCode) && (text.contains("OCI runtime") || text.contains("exec failed") || text.contains("fork/exec"))
    }

    /// The error for a sandbox whose probe could not run, naming what broke; nil when the
    /// probe ran (the sandbox is usable).
    static func unusable(_ health: Health, spec: SandboxSpec) -> HandsError? {
        if health.exitCode == 0 {
            // Nothing reaps them (PID 1 only sleeps): once zombies hold nearly every slot, a
            // command starts only by luck, and never will again.
            guard health.zombies + slotsPerCommand >= spec.pids else { return nil }
            return HandsError(
                .unusable,
                "the sandbox can no longer start processes: \(health.zombies) of its \(spec.pids) process slots (pids) are held by zombies — exited background processes that nothing in the sandbox reaps")
        }
        if health.exitCode == 137 {
            return HandsError(
                .unusable,
                "the sandbox can no longer run commands: even a trivial one is killed as it starts (exit code 137) because its memory (limit \(formatBytes(spec.memoryBytes))) is used up — files in /tmp are held in memory and count against it")
        }
        let said = health.stderr.split(separator: "\n").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        let runtime = said.isEmpty ? "" : ": \(said.hasPrefix("Error: ") ? String(said.dropFirst(7)) : said)"
        // runc's `init-p` pipe breaks when its init process cannot fork; a shell says "can't fork".
        let outOfPids = ["fork", "init-p", "Resource temporarily unavailable"].contains { health.stderr.contains($0) }
        if outOfPids {
            return HandsError(
                .unusable,
                "the sandbox can no longer start processes (exit code \(health.exitCode)\(runtime)); it has run out of process slots (limit \(spec.pids) pids), which zombies — exited background processes that nothing reaps — hold for good")
        }
        if (125...127).contains(health.exitCode) {
            return HandsError(.unusable, "the container runtime can no longer start processes in the sandbox (exit code \(health.exitCode)\(runtime))")
        }
        return HandsError(.unusable, "the sandbox can no longer run commands: a trivial probe failed with exit code \(health.exitCode)\(runtime)")
    }

    public func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        let absolute = Self.absolute(path)
        guard let name = sandbox.workspace, let uid = sandbox.uid else {
            throw HandsError(.sandboxGone, "the sandbox has no workspace label (made by an older agentd?); a fresh one is needed")
        }
        let staged = try await workspaces.stage(contents, in: name, uid: uid)
        let out = try await run(
            ["sh", "-c", SandboxFiles.copyScript, "sh", Self.workspace + "/" + staged, absolute], in: sandbox, workingDirectory: nil,
            timeout: .seconds(120))
        guard out.exitCode == 0 else {
            throw HandsError(.invalidRequest, "cannot write \(absolute): \(SandboxFiles.text(out.stderr))")
        }
    }

    public func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        let absolute = Self.absolute(path)
        let limit = sandbox.spec.fileLimitBytes
        let result: ExecResult
        do {
            result = try await engine.exec(
                sandbox.id, command: Self.wrapped(["sh", "-c", SandboxFiles.readScript(limit: limit), "sh", absolute], timeout: .seconds(120)),
                workingDirectory: Self.workspace, timeout: .seconds(130), maxOutputBytes: limit + 1)
        } catch let error as EngineError {
            throw await diagnose(error, sandbox: sandbox, doing: "reading \(absolute)")
        }
        let out = CommandOutput(stdout: result.stdout, stderr: result.stderr, exitCode: result.exitCode, truncated: result.truncated)
        return try SandboxFiles.checkedRead(out, path: absolute, limit: limit)
    }

    public func destroy(_ sandbox: SandboxHandle) async throws {
        try await remove(sandbox.id)
        if let name = sandbox.workspace { await workspaces.close(name) }
    }

    public func destroy(id: String) async throws {
        // Known only by id (reconcile): its labels name its workspace.
        let name = (try? await engine.inspectContainer(id))?.Config?.Labels?[SandboxLabel.workspace]
        try await remove(id)
        if let name { await workspaces.closeOrphan(name) }
    }

    public func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? {
        guard let name = labels[SandboxLabel.workspace], let uid = labels[SandboxLabel.uid].flatMap({ Int($0) }),
            await answers(id), let workspace = await workspaces.attach(name, uid: uid)
        else { return nil }
        var all = labels
        all[SandboxLabel.uid] = String(workspace.uid)
        return SandboxHandle(id: id, spec: spec, labels: all)
    }

    /// Whether sandbox `id` runs and a trivial command runs in it (the liveness check of
    /// `adopt`).
    func answers(_ id: String) async -> Bool {
        guard let inspect = try? await engine.inspectContainer(id), inspect.State?.Running == true,
            let out = try? await engine.exec(id, command: ["true"], timeout: .seconds(10), maxOutputBytes: 4096)
        else { return false }
        return out.exitCode == 0
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

    /// Works out what an engine error means for the sandbox: gone, out of memory, or only
    /// this request failed.
    private func diagnose(_ error: EngineError, sandbox: SandboxHandle, doing what: String) async -> HandsError {
        if error.code == .http, let status = error.status, status == 404 || status == 409 || status == 500 {
            if let inspect = try? await engine.inspectContainer(sandbox.id) {
                if inspect.State?.Running != true { return Self.stateError(inspect, spec: sandbox.spec) }
            } else if error.code != .unreachable {
                return HandsError(.sandboxGone, "the sandbox no longer exists (removed from outside?) while \(what)")
            }
        }
        return Self.translate(error, doing: what)
    }

    static func stateError(_ inspect: ContainerInspect, spec: SandboxSpec) -> HandsError {
        if inspect.State?.OOMKilled == true {
            return HandsError(.outOfMemory, "the sandbox ran out of memory (limit \(formatBytes(spec.memoryBytes)))")
        }
        let status = inspect.State?.Status ?? "stopped"
        let code = inspect.State?.ExitCode.map { ", exit code \($0)" } ?? ""
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

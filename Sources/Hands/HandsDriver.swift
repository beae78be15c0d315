/// What a task's sandbox looks like: image, identity and limits. Drivers map it onto their
/// own isolation (engine `HostConfig`, systemd unit properties).
public struct SandboxSpec: Sendable, Hashable, Codable {
    public enum WorkspacePersistence: String, Sendable, Codable { case task, session }

    /// Which driver provisions it: `container` or `unit`.
    public var driver: String = "container"
    public var image: String = "agentd-base:latest"
    /// Who the task's commands run as: `auto`, the only value, is a uid (and gid) of the
    /// sandbox's own from `SandboxUIDs` — see `SandboxHandle.uid`.
    public var user: String = "auto"
    public var memoryBytes: Int = 512 << 20
    public var cpus: Double = 1.0
    public var pids: Int = 256
    public var nofile: Int = 1024
    public var nproc: Int = 1024
    public var tmpBytes: Int = 64 << 20
    /// Longest a single command may run.
    public var commandTimeout: Duration = .seconds(120)
    /// A sandbox unused this long is released.
    public var idleTimeout: Duration = .seconds(300)
    /// Output returned to the Brain is cut beyond this many bytes (stdout and stderr together).
    public var outputLimitBytes: Int = 1 << 20
    /// Largest file `read_file` returns.
    public var fileLimitBytes: Int = 16 << 20
    public var workspace: WorkspacePersistence = .task
    /// Most sandboxes one session may hold at once (its policy's `session.maxSandboxes`);
    /// nil for no limit.
    public var maxSandboxesPerSession: Int?
    /// Size of the workspace's filesystem (`hands.disk`).
    public var diskBytes: Int = 1 << 30
    /// Name of the policy the spec came from (labelled on every sandbox).
    public var policyName: String = "default"
    /// The sandbox reaches out only through the vault-proxy (`network.mode: proxy`): its
    /// agent bridges `127.0.0.1:3128` to the proxy's listener in the sandbox's socket
    /// directory, and every command gets `HTTP_PROXY`/`HTTPS_PROXY` (both cases) and
    /// `NO_PROXY` (see `AgentHands.environment(proxy:)`). The sandbox still has no network
    /// interface of its own.
    public var egressProxy: Bool = false

    public init() {}
}

/// Which task a sandbox serves.
public struct TaskKey: Sendable, Hashable, CustomStringConvertible {
    public var session: String
    public var task: String
    public init(session: String, task: String) {
        self.session = session
        self.task = task
    }
    public var description: String { "\(session)/\(task)" }
}

/// A provisioned sandbox as its driver knows it.
public struct SandboxHandle: Sendable, Hashable {
    /// The driver's id (container id, unit name).
    public var id: String
    public var spec: SandboxSpec
    /// Labels as the driver recorded them (`agentd.session`, `agentd.task`, …).
    public var labels: [String: String]

    public init(id: String, spec: SandboxSpec, labels: [String: String]) {
        self.id = id
        self.spec = spec
        self.labels = labels
    }

    /// The sandbox's own uid (and gid), recorded in its `agentd.uid` label.
    public var uid: Int? { labels[SandboxLabel.uid].flatMap { Int($0) } }
    /// The name of its workspace in `WorkspaceImages`, recorded in its `agentd.workspace` label.
    public var workspace: String? { labels[SandboxLabel.workspace] }
    /// The name of its agent's socket directory in `AgentHands`, recorded in its `agentd.agent` label.
    public var agent: String? { labels[SandboxLabel.agent] }
}

/// What one command produced.
public struct CommandOutput: Sendable, Equatable {
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    public var exitCode: Int
    /// Whether output was cut beyond the limit.
    public var truncated: Bool
    public var timedOut: Bool
    /// How many bytes were cut beyond the limit, when the driver knows (0 otherwise).
    public var cutBytes: Int

    public init(stdout: [UInt8], stderr: [UInt8], exitCode: Int, truncated: Bool = false, timedOut: Bool = false, cutBytes: Int = 0) {
        self.stdout = stdout
        self.stderr = stderr
        self.exitCode = exitCode
        self.truncated = truncated
        self.timedOut = timedOut
        self.cutBytes = cutBytes
    }
}

/// Which of a command's streams a chunk of output came from.
public enum OutputStream: String, Sendable, Codable { case stdout, stderr }

/// Receives a command's output as it is produced, in order, before `run` returns. A driver
/// that cannot stream calls it once per stream with everything at the end. What it is given
/// is at most the command's output limit in total; the final `CommandOutput` still holds it all.
public typealias OutputSink = @Sendable (OutputStream, [UInt8]) -> Void

/// A driver provisions sandboxes and runs commands and file actions in them. It knows
/// nothing of sessions beyond the labels it is given. Failures are `HandsError`s, whose kind
/// tells the manager whether the sandbox can be used again.
public protocol HandsDriver: Sendable {
    /// `container` or `unit`.
    var kind: String { get }
    /// Creates and starts a sandbox with `labels`: a task's (session and task labels) or a
    /// pooled one (`agentd.pool`). The driver names it after its task where it can.
    func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle
    /// Gives a pooled sandbox its task's name (so that the engine's own listing shows it).
    func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws
    /// Runs `argv` in the sandbox; `output`, when given, sees the output as it is produced.
    func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput
    func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws
    func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8]
    /// Removes the sandbox and whatever it alone used. Idempotent.
    func destroy(_ sandbox: SandboxHandle) async throws
    /// Every sandbox carrying `agentd.instance=instance`, as (id, labels).
    func list(instance: String) async throws -> [(id: String, labels: [String: String])]
    /// Removes a sandbox known only by id (reconcile).
    func destroy(id: String) async throws
    /// Takes over a sandbox that a previous run of agentd left (`list` found it as `id` with
    /// `labels`) for a task that is still live, to serve it as `spec` from now on: checks
    /// that it still runs and answers a trivial command, and takes its workspace back into
    /// use. Returns nil when it does not answer; then nothing was taken, and the caller
    /// removes it with `destroy(id:)`.
    func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle?
    /// Removes what `session` kept between its tasks (its `workspace: session` image), once
    /// its sandboxes are gone: the session was deleted. Idempotent.
    /// - Throws: `HandsError.invalidRequest` while a sandbox still uses it.
    func removeSessionData(session: String) async throws
}

extension HandsDriver {
    /// Runs `argv` in the sandbox without watching its output as it comes.
    public func run(_ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration) async throws -> CommandOutput {
        try await run(argv, in: sandbox, workingDirectory: workingDirectory, timeout: timeout, output: nil)
    }
}

/// Label keys on everything agentd makes.
public enum SandboxLabel {
    public static let session = "agentd.session"
    public static let task = "agentd.task"
    public static let instance = "agentd.instance"
    public static let policy = "agentd.policy"
    public static let pool = "agentd.pool"
    /// The sandbox's own uid (see `SandboxUIDs`).
    public static let uid = "agentd.uid"
    /// The name of the sandbox's workspace (see `WorkspaceImages`).
    public static let workspace = "agentd.workspace"
    /// The name of the sandbox's agent socket directory (see `AgentHands`).
    public static let agent = "agentd.agent"
}

/// Routes each sandbox to the driver its spec names (`container` or `unit`), so that one
/// `HandsManager` serves policies of both kinds.
public struct DriverRouter: HandsDriver {
    private let drivers: [String: any HandsDriver]
    /// Which driver made each sandbox id (filled by provision and list, read by destroy(id:)).
    private let owners = OwnerTable()
    public var kind: String { "router" }

    public init(_ drivers: [any HandsDriver]) {
        self.drivers = Dictionary(drivers.map { ($0.kind, $0) }, uniquingKeysWith: { a, _ in a })
    }

    private func driver(_ kind: String) throws -> any HandsDriver {
        guard let d = drivers[kind] else {
            let hint = kind == "unit"
                ? "no systemd manager is connected (run agentd under systemd, or set AGENTD_SYSTEMD)"
                : "no container engine is configured (set AGENTD_ENGINE or pass --engine)"
            throw HandsError(.provisioning, "the policy asks for the '\(kind)' driver, but \(hint)")
        }
        return d
    }

    public func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        let handle = try await driver(spec.driver).provision(spec, labels: labels)
        owners.set(handle.id, spec.driver)
        return handle
    }
    public func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {
        try await driver(sandbox.spec.driver).assign(sandbox, to: key)
    }
    public func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        try await driver(sandbox.spec.driver).run(argv, in: sandbox, workingDirectory: workingDirectory, timeout: timeout, output: output)
    }
    public func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        try await driver(sandbox.spec.driver).writeFile(path, contents: contents, in: sandbox)
    }
    public func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        try await driver(sandbox.spec.driver).readFile(path, in: sandbox)
    }
    public func destroy(_ sandbox: SandboxHandle) async throws {
        try await driver(sandbox.spec.driver).destroy(sandbox)
        owners.remove(sandbox.id)
    }
    public func list(instance: String) async throws -> [(id: String, labels: [String: String])] {
        var all: [(id: String, labels: [String: String])] = []
        for (kind, d) in drivers {
            for entry in try await d.list(instance: instance) {
                owners.set(entry.id, kind)
                all.append(entry)
            }
        }
        return all
    }
    public func destroy(id: String) async throws {
        guard let kind = owners.get(id), let d = drivers[kind] else { return }
        try await d.destroy(id: id)
        owners.remove(id)
    }
    public func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? {
        // Only the driver that listed it can serve it: a policy moved to another driver since
        // gets a fresh sandbox.
        guard owners.get(id) == spec.driver, let d = drivers[spec.driver] else { return nil }
        return await d.adopt(id: id, labels: labels, spec: spec)
    }
    public func removeSessionData(session: String) async throws {
        for d in drivers.values { try await d.removeSessionData(session: session) }
    }
}

private final class OwnerTable: Sendable {
    private let table = Mutex<[String: String]>([:])
    func set(_ id: String, _ kind: String) { table.withLock { $0[id] = kind } }
    func get(_ id: String) -> String? { table.withLock { $0[id] } }
    func remove(_ id: String) { _ = table.withLock { $0.removeValue(forKey: id) } }
}

import Synchronization

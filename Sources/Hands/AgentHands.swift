import Foundation
import Glibc
import SandboxAgentClient
import Synchronization

/// The host side of the sandbox agent, shared by the container and unit drivers: where the
/// agent's executable is, the per-sandbox directory its socket lives in, waiting for it to
/// answer after the sandbox starts, and commands and files through it with its errors as
/// `HandsError`s.
///
/// **Layout.** Every sandbox runs the agent (`agentd-sandbox-agent`, a static executable) as
/// its user, bind-mounted read-only at `/.agentd/agent`, listening on
/// `/run/agentd/agent.sock`. `/run/agentd` is the sandbox's own host directory
/// `<directory>/<name>` (`name` is the sandbox's `agentd.agent` label), so a sandbox reaches
/// its own agent's socket and nothing else: not another sandbox's, not agentd's API.
/// `<directory>` is root's, mode 0700.
///
/// **Sealing.** The directory is made owned by the sandbox's uid (mode 0700) so that the agent
/// can create its socket there; once the agent answers — before any command of the sandbox
/// has run — it becomes root's (mode 0755): the sandbox keeps its socket but can neither add
/// files to agentd's disk there nor replace the socket with one of its own.
///
/// **Trust.** What the agent sends is hostile input: the client bounds frames and times out
/// every read; error texts from the agent are clipped before they reach a result string.
public struct AgentHands: Sendable {
    /// The agent's executable on the host (agentd's `--sandbox-agent`).
    public let executable: String
    /// Holds each sandbox's socket directory; root's, mode 0700.
    public let directory: String
    /// The OOM-kill count last read from each sandbox's agent (by agent name), so that a
    /// command killed by SIGKILL is named out of memory only when the count rose.
    private let oomCounts = OOMCounts()

    /// The executable's file name, next to agentd's own by default.
    public static let executableName = "agentd-sandbox-agent"
    /// Where the executable is inside a sandbox.
    public static let sandboxExecutable = "/.agentd/agent"
    /// Where the sandbox's socket directory is inside it.
    public static let sandboxDirectory = "/run/agentd"
    public static let socketName = "agent.sock"
    /// The agent's socket inside the sandbox.
    public static let sandboxSocket = sandboxDirectory + "/" + socketName
    /// The vault-proxy's listener for the sandbox, next to the agent's socket (made by agentd
    /// when the sandbox is attached; see `SandboxAttachments`).
    public static let proxySocketName = "proxy.sock"
    /// Where programs in a sandbox reach the vault-proxy: the agent bridges this loopback
    /// address to `proxySocketName` (`--bridge`).
    public static let proxyAddress = "127.0.0.1:3128"
    /// The sandbox's PID 1: the agent on its socket, bridging the proxy port when the sandbox
    /// reaches out through the vault-proxy.
    public static func command(proxy: Bool) -> [String] {
        [sandboxExecutable] + arguments(proxy: proxy)
    }
    /// The agent's arguments (after its executable's path).
    public static func arguments(proxy: Bool) -> [String] {
        var arguments = ["--socket", sandboxSocket]
        if proxy { arguments += ["--bridge", "\(proxyAddress)=\(sandboxDirectory)/\(proxySocketName)"] }
        return arguments
    }
    /// The environment of every command: nothing of agentd's own, nothing of the image's.
    public static let environment = [
        "HOME": ContainerDriver.workspace,
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    /// `environment`, and for a sandbox that reaches out through the vault-proxy the proxy
    /// variables in both cases (curl reads only the lower-case `http_proxy`; Python and Go
    /// read either), with loopback left direct: a route is addressed as
    /// `http://127.0.0.1:3128/<route>/…`, the proxy itself.
    public static func environment(proxy: Bool) -> [String: String] {
        guard proxy else { return environment }
        var env = environment
        let url = "http://\(proxyAddress)"
        let direct = "localhost,127.0.0.1,::1"
        for (name, value) in [("HTTP_PROXY", url), ("HTTPS_PROXY", url), ("NO_PROXY", direct)] {
            env[name] = value
            env[name.lowercased()] = value
        }
        return env
    }
    /// How long a new sandbox's agent has to answer after the sandbox started.
    public static let readyTimeout: Duration = .seconds(30)
    /// How long a file action may take.
    public static let fileTimeout: Duration = .seconds(120)

    /// - Parameters:
    ///   - executable: the agent's executable on the host; by default `agentd-sandbox-agent`
    ///     next to this process's own executable (`/proc/self/exe`).
    ///   - directory: where the sandboxes' socket directories go (made, mode 0700).
    /// - Throws: `HandsError.provisioning` when the directory cannot be made or its sockets'
    ///   paths would be too long for a unix socket address.
    public init(executable: String? = nil, directory: String) throws {
        // Absolute: the engine bind-mounts it, and systemd takes only absolute paths.
        let given = executable ?? Self.defaultExecutable()
        self.executable = given.hasPrefix("/") ? given : FileManager.default.currentDirectoryPath + "/" + given
        self.directory = directory
        // sockaddr_un holds 107 bytes of path: <directory>/<name>/agent.sock.
        let longest = directory.utf8.count + 1 + Self.nameLength + 1 + Self.socketName.utf8.count
        guard longest <= 107 else {
            throw HandsError(
                .provisioning,
                "the sandbox agents' directory \(directory) is too long for unix socket paths (\(longest) of at most 107 bytes); use a shorter --state-dir")
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            chmod(directory, 0o700)
        } catch {
            throw HandsError(.provisioning, "cannot create the sandbox agents' directory \(directory): \(error.localizedDescription)")
        }
    }

    /// `agentd-sandbox-agent` in the directory of this process's executable.
    public static func defaultExecutable() -> String {
        let own = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: own).deletingLastPathComponent().appendingPathComponent(executableName).path
    }

    /// - Throws: `HandsError.provisioning` saying what to do when the executable is missing.
    public func checkExecutable() throws {
        var st = stat()
        guard stat(executable, &st) == 0, st.st_mode & S_IFMT == S_IFREG, access(executable, X_OK) == 0 else {
            throw HandsError(
                .provisioning,
                "the sandbox agent \(executable) is missing or not executable; build it (swift build --product \(Self.executableName)) or pass agentd --sandbox-agent PATH")
        }
    }

    // MARK: - per-sandbox directories

    private static let nameLength = 14

    /// A new sandbox's agent name: `a` and 13 random base-36 digits (its directory's name,
    /// recorded in the sandbox's `agentd.agent` label).
    public static func freshName() -> String {
        let digits = Array("0123456789abcdefghijklmnopqrstuvwxyz")
        return "a" + String((1..<nameLength).map { _ in digits.randomElement()! })
    }

    /// The host directory of agent `name`, bind-mounted at `/run/agentd`.
    public func hostDirectory(_ name: String) -> String { directory + "/" + name }
    /// The agent's socket on the host.
    public func socketPath(_ name: String) -> String { hostDirectory(name) + "/" + Self.socketName }
    /// The vault-proxy's listener for agent `name`'s sandbox, on the host.
    public func proxySocketPath(_ name: String) -> String { hostDirectory(name) + "/" + Self.proxySocketName }

    /// Makes agent `name`'s directory for a new sandbox, owned by `uid` (and gid), mode 0700;
    /// an existing one (a leftover) is emptied first. Returns its host path.
    /// - Throws: `HandsError.provisioning` when it cannot be made, or `name` is not one.
    @discardableResult
    public func prepare(_ name: String, uid: Int) throws -> String {
        try Self.checkName(name)
        let path = hostDirectory(name)
        remove(name)
        guard mkdir(path, 0o700) == 0 else {
            throw HandsError(.provisioning, "cannot create the sandbox agent's directory \(path): \(String(cString: strerror(errno)))")
        }
        guard chown(path, uid_t(uid), gid_t(uid)) == 0 else {
            let e = errno
            rmdir(path)
            throw HandsError(.provisioning, "cannot give the sandbox agent's directory \(path) to uid \(uid): \(String(cString: strerror(e)))")
        }
        return path
    }

    /// Removes agent `name`'s directory and what is in it, and forgets what was read from it.
    /// Idempotent.
    public func remove(_ name: String) {
        guard (try? Self.checkName(name)) != nil else { return }
        oomCounts.remove(name)
        let path = hostDirectory(name)
        // Only entries the agent made (its socket); never follows a link.
        if let entries = try? FileManager.default.contentsOfDirectory(atPath: path) {
            for entry in entries { unlink(path + "/" + entry) }
        }
        rmdir(path)
    }

    /// Removes every sandbox directory but those of `keeping` (agent names): what sandboxes
    /// that vanished while agentd was down (removed by hand, lost with the engine's state) left.
    /// Called once after a successful restore at start, before anything is provisioned.
    /// - Returns: the names removed.
    @discardableResult
    public func sweep(keeping: Set<String>) -> [String] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter {
            (try? Self.checkName($0)) != nil && !keeping.contains($0)
        }
        for name in names { remove(name) }
        return names.sorted()
    }

    /// Makes the directory root's, mode 0755 (see the type).
    private func seal(_ name: String) throws {
        let path = hostDirectory(name)
        guard chown(path, 0, 0) == 0, chmod(path, 0o755) == 0 else {
            throw HandsError(.provisioning, "cannot seal the sandbox agent's directory \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// The agent name of `sandbox` (its `agentd.agent` label).
    /// - Throws: `HandsError.sandboxGone` when it has none (made by an older agentd).
    public func name(of sandbox: SandboxHandle) throws -> String {
        guard let name = sandbox.agent, (try? Self.checkName(name)) != nil else {
            throw HandsError(.sandboxGone, "the sandbox has no agent (made by an older agentd?); a fresh sandbox is needed")
        }
        return name
    }

    /// The client of agent `name`.
    public func client(_ name: String) -> SandboxAgentClient { SandboxAgentClient(socketPath: socketPath(name)) }

    static func checkName(_ name: String) throws {
        guard name.utf8.count == nameLength, name.hasPrefix("a"),
            name.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x7A) })
        else { throw HandsError(.invalidRequest, "'\(name)' is not a sandbox agent name") }
    }

    // MARK: - readiness

    /// Waits until the agent of a sandbox just started answers, then seals its directory.
    /// - Parameters:
    ///   - state: what the driver sees of the sandbox: nil while it runs, else why it does not.
    /// - Throws: `HandsError.provisioning` when the agent does not answer within `timeout`,
    ///   answers garbage, or the sandbox stops first.
    public func waitReady(_ name: String, timeout: Duration = readyTimeout, state: @Sendable () async -> HandsError?) async throws {
        let connection = client(name)
        let deadline = ContinuousClock.now + timeout
        var pause: Duration = .milliseconds(2)
        var last = "no answer yet"
        while true {
            do {
                _ = try await connection.health(timeout: min(.seconds(5), max(.milliseconds(100), deadline - .now)))
                break
            } catch let error as SandboxAgentError {
                if error.kind == .protocolViolation || error.kind == .failed {
                    throw HandsError(.provisioning, "the sandbox's agent answered its health check wrongly: \(Self.clip(error.message))")
                }
                last = Self.clip(error.message)
            }
            // Not there yet (no socket, or nothing listening): the sandbox may have died.
            if pause >= .milliseconds(64), let gone = await state() {
                throw HandsError(.provisioning, "the sandbox stopped before its agent answered: \(gone.message)")
            }
            guard ContinuousClock.now < deadline else {
                if let gone = await state() { throw HandsError(.provisioning, "the sandbox stopped before its agent answered: \(gone.message)") }
                throw HandsError(.provisioning, "the sandbox's agent did not answer within \(timeout) of the sandbox's start (\(last))")
            }
            try await Task.sleep(for: pause)
            pause = min(pause * 2, .milliseconds(100))
        }
        try seal(name)
        if let kills = (try? await connection.limits(timeout: .seconds(5)))?.oomKills { oomCounts.set(name, Int(clamping: kills)) }
    }

    /// Whether the agent of `sandbox` answers its health check within `timeout` (a sandbox
    /// found after a restart is adopted only when it does).
    public func answers(_ sandbox: SandboxHandle, timeout: Duration = .seconds(5)) async -> Bool {
        guard let agentName = try? name(of: sandbox) else { return false }
        return (try? await client(agentName).health(timeout: timeout)) != nil
    }

    /// Forgets what was read from agent `name` (its sandbox is gone; `remove` does it too).
    public func forget(_ name: String) { oomCounts.remove(name) }

    // MARK: - commands and files

    /// Runs `argv` (no shell unless it names one) in `sandbox` through its agent, as the
    /// sandbox's user, in `workingDirectory` (relative: under `/workspace`; default
    /// `/workspace`), with `environment`, killing the command's process group at `timeout`.
    /// - Parameters:
    ///   - output: sees the output as it is produced, at most the sandbox's output limit.
    ///   - state: what the driver sees of the sandbox when its agent does not answer.
    /// - Throws: `HandsError`: `.outOfMemory` when the command was killed while the sandbox's
    ///   OOM count rose; `.timeout` when the agent did not answer past the command's timeout;
    ///   `.unusable` when the agent does not answer or breaks the protocol (or what `state`
    ///   says); `.invalidRequest` when the agent could not start the command.
    public func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?,
        state: @Sendable () async -> HandsError?
    ) async throws -> CommandOutput {
        let agentName = try name(of: sandbox)
        let connection = client(agentName)
        let request = AgentExecRequest(
            argv: argv, cwd: ContainerDriver.absolute(workingDirectory ?? ContainerDriver.workspace), environment: Self.environment(proxy: sandbox.spec.egressProxy), stdin: nil,
            timeout: timeout, outputLimit: sandbox.spec.outputLimitBytes)
        var forward: (@Sendable (AgentStream, [UInt8]) -> Void)?
        if let output {
            forward = { @Sendable stream, bytes in output(stream == .stderr ? .stderr : .stdout, bytes) }
        }
        let result: AgentExecResult
        do {
            result = try await connection.exec(request, output: forward)
        } catch let error as SandboxAgentError {
            throw await translate(error, doing: "running \(Self.describe(argv))", sandbox: sandbox, commandTimeout: timeout, state: state)
        }
        if result.signal == Int(SIGKILL), !result.timedOut, let oom = await outOfMemory(connection, name: agentName, spec: sandbox.spec) { throw oom }
        if result.exitCode == 126, Self.spawnFailedForWantOfProcesses(result.stderr) {
            // The agent could not start the command at all: the sandbox's process slots are
            // used up (a fork bomb's or an earlier command's background processes), and every
            // later command would fail the same way.
            throw await pidsUsedUp(sandbox)
                ?? HandsError(
                    .unusable,
                    "the sandbox can no longer start processes (its agent says: \(Self.clip(String(decoding: result.stderr, as: UTF8.self)).trimmingCharacters(in: .whitespacesAndNewlines))): its process slots (limit \(sandbox.spec.pids) pids) are used up, e.g. by background processes an earlier command left running")
        }
        return CommandOutput(
            stdout: result.stdout, stderr: result.stderr, exitCode: result.exitCode, truncated: result.cutBytes > 0, timedOut: result.timedOut,
            cutBytes: result.cutBytes)
    }

    /// The file at `path` (relative: under `/workspace`), read by the agent as the sandbox's user.
    /// - Throws: `HandsError.invalidRequest` saying why it cannot be read (missing, a
    ///   directory, larger than the sandbox's file limit); as `run` when the agent fails.
    public func readFile(_ path: String, in sandbox: SandboxHandle, state: @Sendable () async -> HandsError?) async throws -> [UInt8] {
        let absolute = ContainerDriver.absolute(path)
        let connection = client(try name(of: sandbox))
        do {
            return try await connection.readFile(absolute, limit: sandbox.spec.fileLimitBytes, timeout: Self.fileTimeout)
        } catch let error as SandboxAgentError {
            throw await translate(error, doing: "cannot read \(absolute)", sandbox: sandbox, commandTimeout: nil, state: state)
        }
    }

    /// Writes `contents` to `path` (relative: under `/workspace`) as the sandbox's user.
    /// - Throws: `HandsError.invalidRequest` saying why it cannot be written (no permission,
    ///   the workspace is full); as `run` when the agent fails.
    public func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle, state: @Sendable () async -> HandsError?) async throws {
        let absolute = ContainerDriver.absolute(path)
        let connection = client(try name(of: sandbox))
        do {
            try await connection.writeFile(absolute, contents: contents, mode: nil, timeout: Self.fileTimeout)
        } catch let error as SandboxAgentError {
            throw await translate(error, doing: "cannot write \(absolute)", sandbox: sandbox, commandTimeout: nil, state: state)
        }
    }

    // MARK: - errors

    /// The error for a command killed by SIGKILL while the sandbox's OOM count rose; nil
    /// when it did not (the command's own doing, or a kill from inside the sandbox).
    private func outOfMemory(_ client: SandboxAgentClient, name: String, spec: SandboxSpec) async -> HandsError? {
        guard let limits = try? await client.limits(timeout: .seconds(5)), let kills = limits.oomKills.map({ Int(clamping: $0) }) else { return nil }
        let before = oomCounts.get(name) ?? 0
        oomCounts.set(name, kills)
        guard kills > before else { return nil }
        var message = "the sandbox ran out of memory (limit \(formatBytes(spec.memoryBytes))) and the command was killed"
        if let current = limits.memoryCurrent.map({ Int(clamping: $0) }), current / 10 * 10 >= spec.memoryBytes / 10 * 9 {
            // Still full after the kill: what holds it outlives commands.
            message += "; its memory is still used up (\(formatBytes(current))) — files in /tmp are held in memory and count against it"
        }
        return HandsError(.outOfMemory, message)
    }

    /// `error` as a `HandsError` for what was being done.
    private func translate(
        _ error: SandboxAgentError, doing what: String, sandbox: SandboxHandle, commandTimeout: Duration?, state: @Sendable () async -> HandsError?
    ) async -> HandsError {
        // The client names the socket's host path; the result names the sandbox's agent instead.
        var said = error.message
        if let name = sandbox.agent {
            for prefix in ["sandbox agent at \(socketPath(name)) broke the protocol: ", "sandbox agent at \(socketPath(name)) "] where said.hasPrefix(prefix) {
                said = String(said.dropFirst(prefix.count))
                break
            }
        }
        said = Self.clip(said)
        if error.kind != .unreachable, said.lowercased().contains("resource temporarily unavailable") {
            // The agent could not start a thread or process: the sandbox's pids are used up.
            return HandsError(
                .unusable,
                "the sandbox can no longer start processes (its agent says: \(said)): its process slots (limit \(sandbox.spec.pids) pids) are used up, e.g. by background processes an earlier command left running")
        }
        switch error.kind {
        case .failed:
            // "cannot read /x: no such file: /x" says the path once.
            let path = what.split(separator: " ", maxSplits: 2).dropFirst(2).first.map(String.init)
            if let path, said.hasSuffix(": " + path) { said = String(said.dropLast(path.count + 2)) }
            if let path, path.hasPrefix(ContainerDriver.workspace + "/"), said.lowercased().contains("no space left") {
                said += " — the workspace is full (its size is the policy's hands.disk)"
            }
            return HandsError(.invalidRequest, "\(what): \(said)")
        case .protocolViolation:
            // An agent that died mid-answer looks the same as one that broke the protocol, and
            // one that could not start a thread closes the connection.
            if let gone = await settledState(sandbox, state: state) { return gone }
            if let full = await pidsUsedUp(sandbox) { return full }
            return HandsError(.unusable, "the sandbox's agent broke the protocol while \(Self.gerund(what)): \(said)")
        case .unreachable:
            if let gone = await settledState(sandbox, state: state) { return gone }
            return HandsError(.unusable, "the sandbox's agent does not answer while \(Self.gerund(what)) (\(said))")
        case .timeout:
            if let gone = await settledState(sandbox, state: state) { return gone }
            if let commandTimeout {
                return HandsError(.timeout, "the command did not finish within \(commandTimeout) and the sandbox's agent stopped answering")
            }
            return HandsError(.unusable, "the sandbox's agent did not answer in time while \(Self.gerund(what))")
        }
    }

    /// What `state` says of a sandbox whose agent failed a call, once it has settled: an agent
    /// that just died may leave its sandbox running for a moment, so while the agent does not
    /// answer, `state` is asked again for up to 2 s. Nil when the sandbox still runs.
    private func settledState(_ sandbox: SandboxHandle, state: @Sendable () async -> HandsError?) async -> HandsError? {
        let deadline = ContinuousClock.now + .seconds(2)
        while true {
            if let gone = await state() { return gone }
            if await answers(sandbox, timeout: .milliseconds(500)) || ContinuousClock.now >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(100))
        }
    }

    /// Whether a command's stderr is the agent's own report that it could not start the
    /// command because no process could be made (`EAGAIN` from posix_spawn).
    static func spawnFailedForWantOfProcesses(_ stderr: [UInt8]) -> Bool {
        let text = String(decoding: stderr.prefix(512), as: UTF8.self)
        return text.hasPrefix("agentd-sandbox-agent: ") && text.lowercased().contains("resource temporarily unavailable")
    }

    /// The error for a sandbox whose process slots are (nearly) all in use, as its agent's
    /// limits say; nil when they are not, or the agent cannot say.
    private func pidsUsedUp(_ sandbox: SandboxHandle) async -> HandsError? {
        guard let name = sandbox.agent, let limits = try? await client(name).limits(timeout: .seconds(2)),
            let current = limits.pidsCurrent, let max = limits.pidsMax, current + 2 >= max
        else { return nil }
        return HandsError(
            .unusable,
            "the sandbox can no longer start processes: \(current) of its \(max) process slots (pids) are in use, e.g. by background processes an earlier command left running")
    }

    /// `cannot read /x` → `reading /x` (for "while …").
    private static func gerund(_ what: String) -> String {
        if what.hasPrefix("cannot read ") { return "reading " + what.dropFirst("cannot read ".count) }
        if what.hasPrefix("cannot write ") { return "writing " + what.dropFirst("cannot write ".count) }
        return what
    }

    /// The command in a message: its program name.
    private static func describe(_ argv: [String]) -> String {
        "a command" + (argv.first.map { " (\(clip($0, max: 80)))" } ?? "")
    }

    /// Text from the agent as it may appear in a result: printable, at most `max` characters.
    static func clip(_ text: String, max: Int = 500) -> String {
        var out = ""
        for scalar in text.unicodeScalars.prefix(max) {
            out.unicodeScalars.append(scalar.properties.generalCategory == .control ? " " : scalar)
        }
        return text.unicodeScalars.count > max ? out + "…" : out
    }
}

/// Agent name → OOM-kill count last read.
private final class OOMCounts: Sendable {
    private let table = Mutex<[String: Int]>([:])
    func get(_ name: String) -> Int? { table.withLock { $0[name] } }
    func set(_ name: String, _ count: Int) { table.withLock { $0[name] = count } }
    func remove(_ name: String) { _ = table.withLock { $0.removeValue(forKey: name) } }
}

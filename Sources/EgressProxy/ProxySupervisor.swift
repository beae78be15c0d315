import Foundation
import Logging
import Policy
import Synchronization
import Vault
import VaultProxy

#if canImport(Glibc)
import Glibc
#endif

/// Runs `vault-proxy --control-fd 3` as agentd's supervised child: sends it the credentials
/// (values only on the private socketpair, never logged), announces every live sandbox
/// (`addSandbox`), restarts it when it dies and then re-sends credentials and sandboxes, and
/// hands each `egress` event to `onEgress`.
///
/// Fails closed: while the proxy is down its listening sockets are gone, so a sandbox has no
/// way out at all; `addSandbox` while it is down throws.
public final class ProxySupervisor: Sendable {
    /// What a state change looks like (for logs and tests).
    public enum Change: Sendable, Equatable {
        /// The proxy (re)started and every live sandbox was announced again; `generation`
        /// counts starts from 1.
        case running(generation: Int, pid: Int32)
        /// The proxy exited; it is restarted after `restartIn`.
        case exited(generation: Int, status: Int32)
    }

    private struct State {
        var fd: Int32 = -1
        var pid: Int32 = 0
        var generation = 0
        var stopped = false
        var nextID: Int64 = 1
        var sandboxes: [String: SandboxSpec] = [:]
        var pending: [Int64: CheckedContinuation<Void, any Error>] = [:]
        var changeWaiters: [(Int, CheckedContinuation<Void, Never>)] = []
        var running = false
        /// The id of the last startup message; its answer means the proxy is running.
        var startupID: Int64?
    }

    private let executable: String
    private let arguments: [String]
    private let credentials: @Sendable () -> [String: String]
    private let onEgress: @Sendable (EgressEvent) -> Void
    private let onChange: @Sendable (Change) -> Void
    private let logger: Logger
    private let state = Mutex(State())
    private let writeLock = Mutex(())
    /// Sandboxes re-announced at the current start (only touched on the supervision thread).
    nonisolated(unsafe) private var announced = 0

    /// - Parameters:
    ///   - executable: the `vault-proxy` binary.
    ///   - arguments: extra arguments after `--control-fd 3` (e.g. `--log-level`).
    ///   - credentials: name → value of every credential the policies name; called at each
    ///     (re)start and by `reloadCredentials()`.
    ///   - onEgress: each `egress.allowed` / `egress.denied` event.
    ///   - onChange: starts and exits of the proxy.
    public init(
        executable: String, arguments: [String] = [], credentials: @escaping @Sendable () -> [String: String],
        onEgress: @escaping @Sendable (EgressEvent) -> Void, onChange: @escaping @Sendable (Change) -> Void = { _ in },
        logger: Logger = Logger(label: "agentd.egress")
    ) {
        self.executable = executable
        self.arguments = arguments
        self.credentials = credentials
        self.onEgress = onEgress
        self.onChange = onChange
        self.logger = logger
    }

    /// The resolved values of every credential the policies in `set` name (unresolvable ones
    /// are left out; `CredentialRegistrar` reports them).
    public static func credentialValues(_ set: PolicySet, resolver: CredentialResolver) -> [String: String] {
        var values: [String: String] = [:]
        for secret in resolver.resolveAll(set).secrets { values[secret.name] = String(decoding: secret.value, as: UTF8.self) }
        return values
    }

    /// Starts the supervision thread; returns once the first proxy has started and announced
    /// itself (or throws if the executable cannot be started at all).
    public func start() async throws {
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            throw VaultError("vault-proxy is not an executable at \(executable) (install it next to agentd or pass --vault-proxy PATH)")
        }
        let thread = Thread { [self] in supervise() }
        thread.name = "agentd.egress"
        thread.start()
        await waitForGeneration(atLeast: 1)
    }

    /// Stops the proxy for good: closes the channel (the proxy exits) and does not restart it.
    public func stop() {
        let (fd, pid) = state.withLock { s -> (Int32, Int32) in
            s.stopped = true
            return (s.fd, s.pid)
        }
        if fd >= 0 { shutdown(fd, Int32(SHUT_RDWR)) }
        if pid > 0 { kill(pid, SIGTERM) }
    }

    /// The running proxy's pid (0 when none).
    public var pid: Int32 { state.withLock { $0.running ? $0.pid : 0 } }
    /// Starts so far.
    public var generation: Int { state.withLock { $0.generation } }

    /// Waits until the proxy has (re)started `generation` times and announced every sandbox.
    public func waitForGeneration(atLeast generation: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.generation >= generation && s.running { return true }
                s.changeWaiters.append((generation, c))
                return false
            }
            if now { c.resume() }
        }
    }

    /// Announces a sandbox; its listener exists once this returns. Kept and re-announced after
    /// every restart until `removeSandbox`.
    /// - Throws: the proxy's error, or that the proxy is not running (fail closed).
    public func addSandbox(_ spec: SandboxSpec) async throws {
        state.withLock { $0.sandboxes[spec.sandbox] = spec }
        do {
            try await request { .addSandbox(id: $0, spec) }
        } catch {
            _ = state.withLock { $0.sandboxes.removeValue(forKey: spec.sandbox) }
            throw error
        }
    }

    /// Removes a sandbox's listener (best effort when the proxy is down: it is not re-announced).
    public func removeSandbox(_ sandbox: String) async throws {
        let known = state.withLock { $0.sandboxes.removeValue(forKey: sandbox) != nil }
        guard known else { return }
        try await request { .removeSandbox(id: $0, sandbox: sandbox) }
    }

    /// Names the `tool.intent` seq the sandbox's next egress belongs to.
    public func setIntent(sandbox: String, task: String?, seq: Int64?) async throws {
        guard state.withLock({ $0.sandboxes[sandbox] != nil }) else { return }
        try await request { .setIntent(id: $0, sandbox: sandbox, task: task, seq: seq) }
    }

    /// Sends the credentials again (after a policy reload).
    public func reloadCredentials() async throws {
        let values = credentials()
        try await request { .credentials(id: $0, values) }
    }

    // MARK: - the channel

    private func request(_ make: (Int64) -> ControlMessage) async throws {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            let (fd, id) = state.withLock { s -> (Int32, Int64) in
                guard s.running, s.fd >= 0 else { return (-1, 0) }
                let id = s.nextID
                s.nextID += 1
                s.pending[id] = c
                return (s.fd, id)
            }
            guard fd >= 0 else {
                c.resume(throwing: VaultError("the egress proxy is not running (it is being restarted); no egress until it is back"))
                return
            }
            if !send(make(id), on: fd) {
                if let c = state.withLock({ $0.pending.removeValue(forKey: id) }) {
                    c.resume(throwing: VaultError("the egress proxy's control channel is closed"))
                }
            }
        }
    }

    private func send(_ message: ControlMessage, on fd: Int32) -> Bool {
        let bytes = message.line()
        return writeLock.withLock { _ in
            var offset = 0
            while offset < bytes.count {
                let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL)) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                offset += n
            }
            return true
        }
    }

    /// The supervision loop (its own thread): spawn, announce, read until EOF, reap, back off.
    private func supervise() {
        var delayMs = 100
        while !state.withLock({ $0.stopped }) {
            let started = Date()
            if let status = runOnce() {
                let generation = state.withLock { $0.generation }
                logger.warning("vault-proxy exited (status \(status)); sandboxes have no egress until it is restarted")
                onChange(.exited(generation: generation, status: status))
            }
            if state.withLock({ $0.stopped }) { break }
            delayMs = Date().timeIntervalSince(started) > 10 ? 100 : min(delayMs * 2, 5000)
            usleep(useconds_t(delayMs * 1000))
        }
    }

    /// One life of the proxy. Returns its wait status (nil if it could not be started).
    private func runOnce() -> Int32? {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            logger.error("vault-proxy: cannot make a socketpair: \(String(cString: strerror(errno)))")
            return nil
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, pair[1], 3)
        // Nothing else of agentd's reaches the proxy (an inherited pipe end would also keep
        // another child's channel from ever closing).
        // (addclosefrom_np is not visible to Swift: close each open descriptor above 3; one
        // closed meanwhile is ignored by glibc.)
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for fd in open.compactMap(Int32.init) where fd > 3 && fd != pair[1] {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
        let argv = [executable, "--control-fd", "3"] + arguments
        let cArgs = argv.map { strdup($0) } + [nil]
        let environment = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"]
        let cEnv = environment.map { strdup($0) } + [nil]
        defer { (cArgs + cEnv).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, nil, cArgs, cEnv)
        close(pair[1])
        guard rc == 0 else {
            close(pair[0])
            logger.error("vault-proxy: cannot start \(executable): \(String(cString: strerror(rc)))")
            return nil
        }
        let fd = pair[0]
        state.withLock { s in
            s.fd = fd
            s.pid = pid
        }
        // Credentials first, then every live sandbox; the proxy counts as running once it has
        // answered the last of these (so every listener exists again).
        let (sandboxes, firstID) = state.withLock { s -> ([SandboxSpec], Int64) in
            let list = Array(s.sandboxes.values)
            let first = s.nextID
            s.nextID += Int64(list.count + 1)
            s.startupID = first + Int64(list.count)
            return (list, first)
        }
        var ok = send(.credentials(id: firstID, credentials()), on: fd)
        for (i, spec) in sandboxes.enumerated() where ok { ok = send(.addSandbox(id: firstID + 1 + Int64(i), spec), on: fd) }
        announced = sandboxes.count
        if ok { readUntilClosed(fd) }

        let pending = state.withLock { s -> [CheckedContinuation<Void, any Error>] in
            s.running = false
            s.startupID = nil
            s.fd = -1
            let p = Array(s.pending.values)
            s.pending.removeAll()
            return p
        }
        _ = writeLock.withLock { _ in close(fd) }
        for c in pending { c.resume(throwing: VaultError("the egress proxy exited before answering")) }
        kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }

    private func readUntilClosed(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var line: [UInt8] = []
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            var start = 0
            for i in 0..<n where buffer[i] == 0x0A {
                line += buffer[start..<i]
                handle(line)
                line.removeAll(keepingCapacity: true)
                start = i + 1
            }
            line += buffer[start..<n]
            // A proxy that never ends a line is broken: drop it (4 MiB, the channel's bound).
            if line.count > 4 << 20 { return }
        }
    }

    /// Whether `id` answers the last startup message; if so the proxy is now running.
    private func startupAnswered(_ id: Int64?) -> Bool {
        guard let id else { return false }
        let result = state.withLock { s -> (Int, Int32, [CheckedContinuation<Void, Never>])? in
            guard s.startupID == id else { return nil }
            s.startupID = nil
            s.generation += 1
            s.running = true
            let ready = s.changeWaiters.filter { $0.0 <= s.generation }.map(\.1)
            s.changeWaiters.removeAll { $0.0 <= s.generation }
            return (s.generation, s.pid, ready)
        }
        guard let (generation, pid, waiters) = result else { return false }
        logger.info("vault-proxy started (pid \(pid), \(announced) sandbox(es) announced)")
        onChange(.running(generation: generation, pid: pid))
        waiters.forEach { $0.resume() }
        return true
    }

    private func handle(_ line: [UInt8]) {
        guard !line.isEmpty else { return }
        let message: ControlMessage
        do { message = try ControlMessage.parse(line) } catch {
            logger.warning("vault-proxy sent an unreadable message: \(error)")
            return
        }
        switch message {
        case .ready: return
        case .ok(let id):
            if startupAnswered(id) { return }
            if let id, let c = state.withLock({ $0.pending.removeValue(forKey: id) }) { c.resume() }
        case .error(let id, let text):
            if startupAnswered(id) || id == nil || state.withLock({ !$0.running }) {
                logger.warning("vault-proxy refused a startup message: \(text)")
            } else if let id, let c = state.withLock({ $0.pending.removeValue(forKey: id) }) {
                c.resume(throwing: VaultError("egress proxy: \(text)"))
            } else {
                logger.warning("vault-proxy: \(text)")
            }
        case .egress(let event): onEgress(event)
        case .credentials, .addSandbox, .removeSandbox, .setIntent:
            logger.warning("vault-proxy sent an agentd → proxy message; ignored")
        }
    }
}

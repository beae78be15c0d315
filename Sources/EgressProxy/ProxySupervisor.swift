import Foundation
import Logging
import Policy
import Synchronization
import SystemdBus
import Vault
import VaultProxy

#if canImport(Glibc)
import Glibc
#endif

/// Runs the `vault-proxy` and drives it: sends it the credentials (values only on the private
/// control channel, never logged), announces every live sandbox (`addSandbox`) with the
/// sandbox's listening socket, which agentd binds and passes as a descriptor, restarts it when
/// it dies and then re-sends credentials and sandboxes, and hands each `egress` event to
/// `onEgress`.
///
/// Two modes: with a `SystemdUnit`, the proxy is a hardened transient service of its own
/// (its own uid, no writable path) that connects to agentd's control socket, and agentd
/// checks the peer before anything is sent; without, it is agentd's child with one end of a
/// socketpair as fd 3 (`--control-fd 3`).
///
/// Fails closed: while the proxy is down agentd closes and removes the sandboxes' listening
/// sockets, so a sandbox's connection is refused at once; `addSandbox` while it is down throws.
public final class ProxySupervisor: Sendable {
    /// What a state change looks like (for logs and tests).
    public enum Change: Sendable, Equatable {
        /// The proxy (re)started and every live sandbox was announced again; `generation`
        /// counts starts from 1.
        case running(generation: Int, pid: Int32)
        /// The proxy exited (its wait status as a child; -1 as a unit, whose status is
        /// systemd's) and is started again.
        case exited(generation: Int, status: Int32)
    }

    private struct Announced {
        /// As sent: route CAs inline (`ca`), no `caFile`.
        var spec: SandboxSpec
        /// agentd's listening socket for the sandbox; -1 while the proxy is down.
        var listener: Int32 = -1
    }

    private struct State {
        /// The live control connection (-1 when none) and the count of connections so far.
        var fd: Int32 = -1
        var epoch = 0
        var pid: Int32 = 0
        var generation = 0
        var stopped = false
        var nextID: Int64 = 1
        var sandboxes: [String: Announced] = [:]
        var pending: [Int64: CheckedContinuation<Void, any Error>] = [:]
        var nextWaiter = 0
        var changeWaiters: [(id: Int, generation: Int, continuation: CheckedContinuation<Bool, Never>)] = []
        var running = false
        /// The id of the last startup message; its answer means the proxy is running.
        var startupID: Int64?
        /// Sandboxes announced at the current start.
        var announced = 0
        /// Why the last life ended badly (for `start()`'s error).
        var lastFailure: String?
        /// The supervision thread's wake-up socket (its write end) and whether it has ended.
        var wake: Int32 = -1
        var finished = false
        var finishWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let executable: String
    private let arguments: [String]
    private let unit: SystemdUnit?
    private let startTimeout: Duration
    private let credentials: @Sendable () -> [String: String]
    private let onEgress: @Sendable (EgressEvent) -> Void
    private let onChange: @Sendable (Change) -> Void
    private let logger: Logger
    private let state = Mutex(State())
    private let writeLock = Mutex(())

    /// - Parameters:
    ///   - executable: the `vault-proxy` binary.
    ///   - arguments: extra arguments after `--control-fd 3` / `--control-socket PATH` (e.g.
    ///     `--log-level`).
    ///   - unit: run the proxy as this transient systemd unit; nil: as agentd's child.
    ///   - startTimeout: how long a (re)started proxy has to answer its startup messages (and,
    ///     as a unit, to connect); `start()` throws after it, a later start is killed and
    ///     retried.
    ///   - credentials: name → value of every credential the policies name; called at each
    ///     (re)start and by `reloadCredentials()`.
    ///   - onEgress: each `egress.allowed` / `egress.denied` event.
    ///   - onChange: starts and exits of the proxy.
    public init(
        executable: String, arguments: [String] = [], unit: SystemdUnit? = nil, startTimeout: Duration = .seconds(10),
        credentials: @escaping @Sendable () -> [String: String], onEgress: @escaping @Sendable (EgressEvent) -> Void,
        onChange: @escaping @Sendable (Change) -> Void = { _ in }, logger: Logger = Logger(label: "agentd.egress")
    ) {
        self.executable = executable
        self.arguments = arguments
        self.unit = unit
        self.startTimeout = startTimeout
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

    /// Starts the proxy (as a unit: the unit, after checking its paths) and its supervision;
    /// returns once the first proxy has answered its startup messages.
    /// - Throws: when the executable or (as a unit) the control socket is unusable, the
    ///   manager refuses the unit, or the proxy has not answered within `startTimeout` (it is
    ///   then stopped).
    public func start() async throws {
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            throw VaultError("vault-proxy is not an executable at \(executable) (install it next to agentd or pass --vault-proxy PATH)")
        }
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw VaultError("cannot make a socketpair: \(String(cString: strerror(errno)))")
        }
        var control: Int32 = -1
        if let unit {
            do {
                control = try await startUnit(unit)
            } catch {
                close(pair[0])
                close(pair[1])
                throw error
            }
        }
        state.withLock { $0.wake = pair[1] }
        let (wake, listening) = (pair[0], control)
        let thread = Thread { [self] in supervise(control: listening, wake: wake) }
        thread.name = "agentd.egress"
        thread.start()
        guard await waitForGeneration(atLeast: 1, within: startTimeout) else {
            var why = state.withLock { $0.lastFailure } ?? "it never answered"
            if let unit, let status = try? await unit.manager.unitProperties(unit.name) {
                why += "; unit \(unit.name) is \(status.activeState)/\(status.subState), result \(status.result), exit status \(status.execMainStatus)"
            }
            await stopAndWait()
            let log = unit.map { "journalctl -u \($0.name)" } ?? "agentd's stderr"
            throw VaultError("vault-proxy did not answer its startup messages within \(startTimeout) (\(why)); it was stopped. See its log (\(log)).")
        }
    }

    /// Stops the proxy for good and does not restart it; the sandboxes' listening sockets are
    /// closed and removed. Returns at once; `stopAndWait()` waits until it is gone.
    public func stop() {
        state.withLock { s in
            s.stopped = true
            var byte: UInt8 = 1
            if s.wake >= 0 { _ = Glibc.send(s.wake, &byte, 1, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
        }
        if let unit {
            Task { [unit] in await Self.stopUnit(unit) }
        }
    }

    /// `stop()`, then waits until the supervision has ended and (as a unit) the unit has stopped.
    public func stopAndWait() async {
        stop()
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let done = state.withLock { s -> Bool in
                if s.finished || s.wake < 0 { return true }
                s.finishWaiters.append(c)
                return false
            }
            if done { c.resume() }
        }
        if let unit { await Self.stopUnit(unit) }
    }

    private static func stopUnit(_ unit: SystemdUnit) async {
        _ = try? await unit.manager.stopUnitAndWait(unit.name, timeout: .seconds(15))
        try? await unit.manager.resetFailedUnit(unit.name)
    }

    /// The running proxy's pid (0 when none).
    public var pid: Int32 { state.withLock { $0.running ? $0.pid : 0 } }
    /// Starts so far.
    public var generation: Int { state.withLock { $0.generation } }

    /// Waits until the proxy has (re)started `generation` times and announced every sandbox
    /// (or the supervisor was stopped).
    public func waitForGeneration(atLeast generation: Int) async {
        _ = await waitForGeneration(atLeast: generation, within: nil)
    }

    /// - Returns: false when `timeout` passed or the supervisor stopped first.
    private func waitForGeneration(atLeast generation: Int, within timeout: Duration?) async -> Bool {
        let id = state.withLock { s -> Int in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        let timer = timeout.map { timeout in
            Task { [self] in
                try? await Task.sleep(for: timeout)
                let waiter = state.withLock { s -> CheckedContinuation<Bool, Never>? in
                    guard let i = s.changeWaiters.firstIndex(where: { $0.id == id }) else { return nil }
                    return s.changeWaiters.remove(at: i).continuation
                }
                waiter?.resume(returning: false)
            }
        }
        defer { timer?.cancel() }
        return await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
            let now = state.withLock { s -> Bool? in
                if s.generation >= generation && s.running { return true }
                if s.finished { return false }
                s.changeWaiters.append((id, generation, c))
                return nil
            }
            if let now { c.resume(returning: now) }
        }
    }

    /// Announces a sandbox: binds its listening socket at `spec.socketPath` (mode 0666;
    /// access is its directory's), reads the routes' `caFile`s, and passes both to the proxy;
    /// the sandbox can connect once this returns. Kept and re-announced after every restart
    /// until `removeSandbox`.
    /// - Throws: a `caFile` that cannot be read, a socket that cannot be bound, the proxy's
    ///   error, or that the proxy is not running (fail closed).
    public func addSandbox(_ spec: SandboxSpec) async throws {
        let wire = try Self.inliningCAs(spec)
        try state.withLock { s in
            guard s.running, s.fd >= 0 else { throw Self.notRunning }
            guard s.sandboxes[spec.sandbox] == nil else {
                throw VaultError("sandbox \(spec.sandbox) is already announced to the egress proxy; remove it first")
            }
            let listener = try Self.bindListener(spec)
            s.sandboxes[spec.sandbox] = Announced(spec: wire, listener: listener)
        }
        do {
            try await request(listenerOf: spec.sandbox) { .addSandbox(id: $0, wire, listenerFD: true) }
        } catch {
            forget(spec.sandbox)
            // The proxy may have got it through a restart meanwhile.
            try? await request { .removeSandbox(id: $0, sandbox: spec.sandbox) }
            throw error
        }
    }

    /// Removes a sandbox: its listening socket is closed and removed at once (whether the
    /// proxy is up or not), and the proxy closes its connections.
    /// - Throws: the proxy's error.
    public func removeSandbox(_ sandbox: String) async throws {
        guard forget(sandbox) else { return }
        do {
            try await request { .removeSandbox(id: $0, sandbox: sandbox) }
        } catch let error as VaultError where error.message == Self.notRunning.message {
            // Down: nothing to tell it; it is not announced again.
        }
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

    // MARK: - sandboxes' sockets

    private static let notRunning = VaultError("the egress proxy is not running (it is being restarted); no egress until it is back")

    /// Bounds a route CA file read by agentd for the proxy.
    private static let maxCABytes = 1 << 20

    /// `spec` as the proxy gets it: every route's `caFile` read into `ca` (so the proxy, which
    /// may read no file of agentd's, needs none).
    static func inliningCAs(_ spec: SandboxSpec) throws -> SandboxSpec {
        var wire = spec
        for i in wire.routes.indices {
            guard wire.routes[i].ca == nil, let path = wire.routes[i].caFile else { continue }
            let name = wire.routes[i].name
            guard let handle = FileHandle(forReadingAtPath: path) else {
                throw VaultError("route \(name): cannot read its caFile \(path): \(String(cString: strerror(errno)))")
            }
            defer { try? handle.close() }
            let data = (try? handle.read(upToCount: maxCABytes + 1)) ?? Data()
            guard data.count <= maxCABytes else { throw VaultError("route \(name): caFile \(path) is larger than \(maxCABytes) bytes") }
            let text = String(decoding: data, as: UTF8.self)
            guard text.contains("-----BEGIN CERTIFICATE-----") else {
                throw VaultError("route \(name): caFile \(path) holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
            }
            wire.routes[i].ca = text
            wire.routes[i].caFile = nil
        }
        return wire
    }

    /// A listening socket at `spec.socketPath` (0666; its directory made 0700 if missing).
    private static func bindListener(_ spec: SandboxSpec) throws -> Int32 {
        let directory = (spec.socketPath as NSString).deletingLastPathComponent
        guard spec.socketPath.hasPrefix("/") else { throw VaultError("sandbox \(spec.sandbox): socketPath must be absolute, not \(spec.socketPath)") }
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        do {
            return try UnixSocket.listen(path: spec.socketPath, mode: 0o666)
        } catch {
            throw VaultError("sandbox \(spec.sandbox): \(error)")
        }
    }

    /// Closes and removes a listening socket: a connection attempt is refused from now on.
    private static func closeListener(_ entry: inout Announced) {
        guard entry.listener >= 0 else { return }
        close(entry.listener)
        entry.listener = -1
        unlink(entry.spec.socketPath)
    }

    /// Drops a sandbox and its socket. - Returns: whether it was known.
    @discardableResult
    private func forget(_ sandbox: String) -> Bool {
        state.withLock { s in
            guard var entry = s.sandboxes.removeValue(forKey: sandbox) else { return false }
            Self.closeListener(&entry)
            return true
        }
    }

    // MARK: - the channel

    /// Sends a request and waits for its answer. `listenerOf`: the sandbox whose listening
    /// socket goes with it (a copy taken under the lock, so a restart cannot swap it).
    private func request(listenerOf sandbox: String? = nil, _ make: (Int64) -> ControlMessage) async throws {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            let taken = state.withLock { s -> (epoch: Int, id: Int64, listener: Int32?)? in
                guard s.running, s.fd >= 0 else { return nil }
                var listener: Int32?
                if let sandbox {
                    guard let fd = s.sandboxes[sandbox]?.listener, fd >= 0 else { return nil }
                    listener = dup(fd)
                }
                let id = s.nextID
                s.nextID += 1
                s.pending[id] = c
                return (s.epoch, id, listener)
            }
            guard let taken else {
                c.resume(throwing: Self.notRunning)
                return
            }
            let sent = send(make(taken.id), epoch: taken.epoch, passing: taken.listener)
            if let listener = taken.listener { close(listener) }
            if !sent, let c = state.withLock({ $0.pending.removeValue(forKey: taken.id) }) {
                c.resume(throwing: VaultError("the egress proxy's control channel is closed"))
            }
        }
    }

    /// Writes one message (one `sendmsg` for its first bytes and `passing`) on the connection
    /// of `epoch`, if it is still the live one.
    private func send(_ message: ControlMessage, epoch: Int, passing descriptor: Int32? = nil) -> Bool {
        let bytes = message.line()
        return writeLock.withLock { _ in
            let fd = state.withLock { s in s.epoch == epoch ? s.fd : -1 }
            guard fd >= 0 else { return false }
            return UnixSocket.send(fd, bytes, passing: descriptor)
        }
    }

    // MARK: - supervision (its own thread)

    /// A connected proxy: the control connection and its process.
    private struct Peer {
        var fd: Int32
        var pid: Int32
    }

    private var isStopped: Bool { state.withLock { $0.stopped } }

    /// The loop: get a proxy (spawn a child / accept the unit's connection), serve it until
    /// it is gone, and again until stopped.
    private func supervise(control: Int32, wake: Int32) {
        var delayMs = 100
        while !isStopped {
            let began = ContinuousClock.now
            let peer: Peer?
            if let unit { peer = acceptProxy(control: control, wake: wake, unit: unit) } else { peer = spawnChild() }
            if let peer {
                let status = serve(peer, control: control, wake: wake)
                let generation = state.withLock { $0.generation }
                if isStopped {
                    logger.info("vault-proxy stopped (status \(status))")
                } else {
                    logger.warning("vault-proxy exited (status \(status)); sandboxes have no egress until it is restarted")
                }
                onChange(.exited(generation: generation, status: status))
            }
            // A unit is restarted by systemd (accept waits for it); a child after a pause.
            guard unit == nil, !isStopped else { continue }
            delayMs = ContinuousClock.now - began > .seconds(10) ? 100 : min(delayMs * 2, 5000)
            var wakeup = pollfd(fd: wake, events: Int16(POLLIN), revents: 0)
            _ = poll(&wakeup, 1, Int32(delayMs))
        }
        if control >= 0 {
            close(control)
            if let unit { unlink(unit.controlSocket) }
        }
        let (waiters, finishers, writeEnd) = state.withLock { s in
            s.finished = true
            defer {
                s.changeWaiters.removeAll()
                s.finishWaiters.removeAll()
                s.wake = -1
            }
            return (s.changeWaiters.map(\.continuation), s.finishWaiters, s.wake)
        }
        close(wake)
        close(writeEnd)
        waiters.forEach { $0.resume(returning: false) }
        finishers.forEach { $0.resume() }
    }

    /// Spawns `vault-proxy --control-fd 3` with a socketpair end as fd 3 and nothing else of
    /// agentd's (stdin/stdout /dev/null, stderr agentd's).
    private func spawnChild() -> Peer? {
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
            let why = "cannot start \(executable): \(String(cString: strerror(rc)))"
            state.withLock { $0.lastFailure = why }
            logger.error("vault-proxy: \(why)")
            return nil
        }
        return Peer(fd: pair[0], pid: pid)
    }

    /// Waits for the unit's proxy to connect to the control socket and checks who it is: the
    /// peer (SO_PEERCRED) must run as the unit's uid and be a process of the unit. Anyone else
    /// is closed at once, having been sent nothing. Nil when stopped.
    private func acceptProxy(control: Int32, wake: Int32, unit: SystemdUnit) -> Peer? {
        while !isStopped {
            var fds = [pollfd(fd: control, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 2, -1) > 0 else { continue }
            if fds[1].revents != 0 { continue }
            if let peer = acceptAndCheck(control, unit: unit) { return peer }
        }
        return nil
    }

    /// Accepts one connection on the control socket; the peer if it is the unit's proxy.
    private func acceptAndCheck(_ control: Int32, unit: SystemdUnit) -> Peer? {
        let fd = accept(control, nil, nil)
        guard fd >= 0 else { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        guard let peer = UnixSocket.peerCredentials(fd) else {
            logger.warning("refused a connection to the proxy's control socket: its peer's credentials are unreadable")
            close(fd)
            return nil
        }
        var refusal: String?
        if peer.uid != unit.uid {
            refusal = "it runs as uid \(peer.uid), the proxy as \(unit.uid)"
        } else {
            let pid = peer.pid
            let owner: String?
            do { owner = try blockingAwait { try await unit.manager.unit(ofPID: pid) } } catch {
                owner = nil
                refusal = "cannot ask systemd which unit pid \(pid) is in: \(error)"
            }
            if refusal == nil, owner != unit.name { refusal = "it is in \(owner ?? "no unit"), not \(unit.name)" }
        }
        if let refusal {
            logger.warning("refused a connection to the proxy's control socket from pid \(peer.pid): \(refusal)")
            close(fd)
            return nil
        }
        return Peer(fd: fd, pid: peer.pid)
    }

    /// One life of a connected proxy: announce, read until it is gone (or stopped, or silent
    /// past the start deadline), then tear down. Returns its wait status (-1 as a unit).
    private func serve(_ peer: Peer, control: Int32, wake: Int32) -> Int32 {
        // Credentials first, then every live sandbox with a freshly bound socket; the proxy
        // counts as running once it has answered the last of these (so every listener exists).
        let (epoch, firstID, announce) = state.withLock { s -> (Int, Int64, [(SandboxSpec, Int32)]) in
            s.epoch += 1
            s.fd = peer.fd
            s.pid = peer.pid
            var announce: [(SandboxSpec, Int32)] = []
            for name in s.sandboxes.keys.sorted() {
                guard var entry = s.sandboxes[name] else { continue }
                if entry.listener < 0 {
                    do { entry.listener = try Self.bindListener(entry.spec) } catch {
                        logger.error("sandbox \(name) has no egress: \(error)")
                        continue
                    }
                    s.sandboxes[name] = entry
                }
                announce.append((entry.spec, dup(entry.listener)))
            }
            let first = s.nextID
            s.nextID += Int64(announce.count + 1)
            s.startupID = first + Int64(announce.count)
            s.announced = announce.count
            return (s.epoch, first, announce)
        }
        var ok = send(.credentials(id: firstID, credentials()), epoch: epoch)
        for (i, (spec, listener)) in announce.enumerated() {
            if ok { ok = send(.addSandbox(id: firstID + 1 + Int64(i), spec, listenerFD: true), epoch: epoch, passing: listener) }
            close(listener)
        }
        if ok { readUntilGone(peer, control: control, wake: wake) }

        let pending = state.withLock { s -> [CheckedContinuation<Void, any Error>] in
            s.running = false
            s.startupID = nil
            s.fd = -1
            for name in Array(s.sandboxes.keys) { Self.closeListener(&s.sandboxes[name]!) }
            defer { s.pending.removeAll() }
            return Array(s.pending.values)
        }
        writeLock.withLock { _ in _ = close(peer.fd) }
        for c in pending { c.resume(throwing: VaultError("the egress proxy exited before answering")) }
        guard unit == nil else { return -1 }
        kill(peer.pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(peer.pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }

    /// Reads the proxy's messages until it closes the channel, the supervisor is stopped, or
    /// it has not answered its startup messages by the deadline (then it is killed). Further
    /// connections to the control socket meanwhile are refused.
    private func readUntilGone(_ peer: Peer, control: Int32, wake: Int32) {
        let deadline = ContinuousClock.now + startTimeout
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var line: [UInt8] = []
        var fds = [pollfd(fd: peer.fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
        if control >= 0 { fds.append(pollfd(fd: control, events: Int16(POLLIN), revents: 0)) }
        while true {
            var timeout: Int32 = -1
            if !state.withLock({ $0.running }) {
                let left = deadline - ContinuousClock.now
                timeout = Int32(max(0, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
            }
            let ready = poll(&fds, nfds_t(fds.count), timeout)
            if ready < 0 && errno == EINTR { continue }
            if ready == 0 {
                let why = "pid \(peer.pid) did not answer its startup messages within \(startTimeout)"
                state.withLock { $0.lastFailure = why }
                logger.error("vault-proxy \(why); killing it")
                kill(peer.pid, SIGKILL)
                return
            }
            if ready < 0 || isStopped { return }
            if fds.count > 2 && fds[2].revents != 0, let extra = acceptAndCheck(control, unit: unit!) {
                logger.warning("refused a second connection from the proxy's unit (pid \(extra.pid)): one is live")
                close(extra.fd)
            }
            guard fds[0].revents != 0 else { continue }
            let n = buffer.withUnsafeMutableBytes { read(peer.fd, $0.baseAddress, $0.count) }
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
            if line.count > ControlChannel.maxMessageBytes {
                logger.error("vault-proxy sent a line longer than \(ControlChannel.maxMessageBytes) bytes; dropping it")
                kill(peer.pid, SIGKILL)
                return
            }
        }
    }

    /// Whether `id` answers the last startup message; if so the proxy is now running.
    private func startupAnswered(_ id: Int64?) -> Bool {
        guard let id else { return false }
        let result = state.withLock { s -> (Int, Int32, Int, [CheckedContinuation<Bool, Never>])? in
            guard s.startupID == id else { return nil }
            s.startupID = nil
            s.generation += 1
            s.running = true
            s.lastFailure = nil
            let generation = s.generation
            let ready = s.changeWaiters.filter { $0.generation <= generation }.map(\.continuation)
            s.changeWaiters.removeAll { $0.generation <= generation }
            return (generation, s.pid, s.announced, ready)
        }
        guard let (generation, pid, announced, waiters) = result else { return false }
        logger.info("vault-proxy started (pid \(pid), \(announced) sandbox(es) announced)")
        onChange(.running(generation: generation, pid: pid))
        waiters.forEach { $0.resume(returning: true) }
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

    // MARK: - unit mode

    /// Checks the paths, makes the uid known, listens on the control socket (owned by the
    /// proxy's uid, 0600) and starts the unit (replacing one of that name left over).
    /// - Returns: the listening control socket.
    private func startUnit(_ unit: SystemdUnit) async throws -> Int32 {
        try unit.checkReachable(executable, what: "the vault-proxy executable", executable: true)
        try unit.checkReachable(unit.controlSocket, what: "the proxy's control socket")
        try unit.ensureUserRecord()
        let control: Int32
        do {
            control = try UnixSocket.listen(path: unit.controlSocket, mode: 0o600, backlog: 16)
        } catch {
            throw VaultError("the proxy's control socket: \(error)")
        }
        do {
            guard chown(unit.controlSocket, unit.uid, unit.uid) == 0 else {
                throw VaultError("cannot give the control socket \(unit.controlSocket) to uid \(unit.uid): \(String(cString: strerror(errno)))")
            }
            _ = try? await unit.manager.stopUnitAndWait(unit.name, timeout: .seconds(15))
            try? await unit.manager.resetFailedUnit(unit.name)
            var owner = unit.boundTo
            if owner == nil, let own = try? await unit.manager.unit(ofPID: getpid()), own != "init.scope",
                own.hasSuffix(".service") || own.hasSuffix(".scope")
            {
                owner = own
            }
            let argv = [executable, "--control-socket", unit.controlSocket] + arguments
            var result = try await unit.manager.startTransientUnit(unit.name, properties: unit.properties(argv: argv, owner: owner))
            if result != "done", try await unit.manager.unitProperties(unit.name).execMainStatus == 226 {
                logger.warning(
                    "the systemd manager cannot set up \(SystemdUnit.kernelProtections.joined(separator: "/")) (exit status 226); starting \(unit.name) without them")
                await Self.stopUnit(unit)
                result = try await unit.manager.startTransientUnit(
                    unit.name, properties: unit.properties(argv: argv, owner: owner, kernelProtections: false))
            }
            guard result == "done" else {
                let status = try? await unit.manager.unitProperties(unit.name)
                throw VaultError(
                    "the start job of \(unit.name) ended with '\(result)'\(status.map { " (result \($0.result), exit status \($0.execMainStatus))" } ?? ""); see journalctl -u \(unit.name)")
            }
            logger.info("vault-proxy runs as unit \(unit.name) (uid \(unit.uid)), connecting to \(unit.controlSocket)\(owner.map { ", bound to \($0)" } ?? "")")
            return control
        } catch {
            close(control)
            unlink(unit.controlSocket)
            // A unit whose start failed would be restarted forever (Restart=always).
            await Self.stopUnit(unit)
            throw error
        }
    }
}

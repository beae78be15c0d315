import Blocking
import CSystemd
import Foundation
import Glibc
import Synchronization

/// A helper process of agentd's own (the credential proxy, for one) that lives and dies with
/// agentd.
///
/// Under a systemd manager, when agentd itself runs in one of that manager's units, the
/// sidecar is a transient service with `BindsTo=` and `PartOf=` that unit: systemd stops it
/// when agentd stops or dies, restarts it (`Restart=always`) when it dies alone, and its
/// logs, limits and cgroup are systemd's. Otherwise (no manager, or agentd started from a
/// shell) it is a supervised child: spawned with `PR_SET_PDEATHSIG=SIGKILL` (the kernel kills
/// it when agentd dies, even by SIGKILL) and restarted when it exits, until `stop()`.
public enum Sidecar {
    /// Starts `argv` (an absolute program path first) with `environment` as sidecar `name`.
    ///
    /// - Parameters:
    ///   - manager: the systemd manager agentd may run under, or nil to supervise a child.
    ///   - boundTo: the unit to bind to; by default the unit of this process
    ///     (`Manager.GetUnitByPID`). When there is none, the sidecar is a supervised child.
    ///   - restartDelay: the pause before a dead sidecar is started again.
    /// - Throws: `SystemdError` when the manager refuses the unit or the child cannot be spawned.
    public static func start(
        name: String, argv: [String], environment: [String: String] = [:], manager: SystemdManager?, boundTo: String? = nil,
        restartDelay: Duration = .milliseconds(500)
    ) async throws -> SidecarHandle {
        guard let program = argv.first, program.hasPrefix("/") else {
            throw SystemdError(.invalidArgument, "a sidecar's argv must start with an absolute program path, not \(argv.first ?? "nothing")")
        }
        guard !name.isEmpty, name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) else {
            throw SystemdError(.invalidArgument, "sidecar name '\(name)' must be ASCII letters, digits, '-' or '_'")
        }
        if let manager {
            let owner: String?
            if let boundTo { owner = boundTo } else { owner = try await manager.unit(ofPID: getpid()) }
            // init.scope is the manager itself: a process outside the manager's units maps there.
            if let owner, owner != "init.scope", owner.hasSuffix(".service") || owner.hasSuffix(".scope") {
                let unit = "agentd-sidecar-\(name)-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).service"
                let result = try await manager.startTransientUnit(
                    unit,
                    properties: [
                        .string("Description", "agentd sidecar \(name) of \(owner)"),
                        .execStart(argv),
                        .strings("Environment", environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }),
                        .string("Type", "exec"),
                        .strings("BindsTo", [owner]),
                        .strings("PartOf", [owner]),
                        .string("Restart", "always"),
                        .duration("RestartUSec", restartDelay),
                        .string("CollectMode", "inactive-or-failed"),
                    ])
                guard result == "done" else {
                    throw SystemdError(.callFailed, "sidecar \(name): the start job of \(unit) ended with '\(result)'")
                }
                return SidecarHandle(name: name, mode: .unit(unit), manager: manager, supervisor: nil)
            }
        }
        let supervisor = try await ChildSupervisor.start(argv: argv, environment: environment, restartDelay: restartDelay)
        return SidecarHandle(name: name, mode: .child, manager: nil, supervisor: supervisor)
    }
}

/// A running sidecar.
public final class SidecarHandle: Sendable {
    public enum Mode: Sendable, Equatable {
        /// A transient service of this name, bound to agentd's unit.
        case unit(String)
        /// A supervised child process.
        case child
    }

    public let name: String
    public let mode: Mode
    private let manager: SystemdManager?
    private let supervisor: ChildSupervisor?

    init(name: String, mode: Mode, manager: SystemdManager?, supervisor: ChildSupervisor?) {
        self.name = name
        self.mode = mode
        self.manager = manager
        self.supervisor = supervisor
    }

    /// The sidecar's current process id (the unit's `MainPID`), nil while it is not running.
    public func pid() async throws -> pid_t? {
        switch mode {
        case .unit(let unit):
            let pid = try await manager!.unitProperties(unit).mainPID
            return pid == 0 ? nil : pid_t(pid)
        case .child:
            return supervisor!.currentPID
        }
    }

    /// How often the sidecar was started again after it died.
    public func restarts() async throws -> Int {
        switch mode {
        case .unit(let unit): Int(try await manager!.unitProperties(unit).restarts)
        case .child: supervisor!.restartCount
        }
    }

    /// Stops the sidecar for good (SIGTERM, then the unit's or our own SIGKILL) and waits.
    public func stop() async throws {
        switch mode {
        case .unit(let unit): try await manager!.stopUnitAndWait(unit)
        case .child: await supervisor!.stop()
        }
    }
}

/// Spawns a child with PR_SET_PDEATHSIG on a dedicated thread, waits for it there and starts
/// it again after `restartDelay` until stopped.
///
/// The death signal is tied to the thread that forked, so spawning and waiting stay on this
/// one long-lived thread (never a pool thread that might exit).
final class ChildSupervisor: Sendable {
    private struct State {
        var pid: pid_t?
        var restarts = 0
        var stopping = false
        var finished = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    private init() {}

    /// Starts the supervising thread and waits until it spawned the child the first time.
    static func start(argv: [String], environment: [String: String], restartDelay: Duration) async throws -> ChildSupervisor {
        let supervisor = ChildSupervisor()
        let delayUsec = UInt32(clamping: restartDelay.components.seconds * 1_000_000 + restartDelay.components.attoseconds / 1_000_000_000_000)
        try await withCheckedThrowingContinuation { (started: CheckedContinuation<Void, any Error>) in
            startDedicatedThread(name: "agentd-sidecar") {
                supervisor.supervise(argv: argv, environment: environment, delayUsec: delayUsec, started: started)
            }
        }
        return supervisor
    }

    /// The thread's body: spawn, wait, respawn until stopped.
    private func supervise(argv: [String], environment: [String: String], delayUsec: UInt32, started: CheckedContinuation<Void, any Error>) {
        var pid: pid_t
        do {
            pid = try Self.spawn(argv, environment)
        } catch {
            state.withLock { $0.finished = true }
            started.resume(throwing: error)
            return
        }
        state.withLock { $0.pid = pid }
        started.resume()
        while true {
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            if state.withLock({ s in s.pid = nil; return s.stopping }) { break }
            usleep(delayUsec)
            if state.withLock({ $0.stopping }) { break }
            guard let next = try? Self.spawn(argv, environment) else { continue }
            pid = next
            let stopped = state.withLock { s -> Bool in
                s.pid = next
                s.restarts += 1
                return s.stopping
            }
            if stopped { kill(next, SIGTERM) }
        }
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.finished = true
            defer { s.waiters.removeAll() }
            return s.waiters
        }
        for w in waiters { w.resume() }
    }

    var currentPID: pid_t? { state.withLock { $0.pid } }
    var restartCount: Int { state.withLock { $0.restarts } }

    /// SIGTERM, and SIGKILL after two seconds; returns once the child is reaped.
    func stop() async {
        let pid = state.withLock { s -> pid_t? in
            s.stopping = true
            return s.pid
        }
        if let pid { kill(pid, SIGTERM) }
        let killer = Task {
            try await Task.sleep(for: .seconds(2))
            if let pid = self.currentPID { kill(pid, SIGKILL) }
        }
        await withCheckedContinuation { continuation in
            let done = state.withLock { s -> Bool in
                if s.finished { return true }
                s.waiters.append(continuation)
                return false
            }
            if done { continuation.resume() }
        }
        killer.cancel()
    }

    /// `csd_spawn_pdeathsig`: fork + prctl(PR_SET_PDEATHSIG, SIGKILL) + execve.
    private static func spawn(_ argv: [String], _ environment: [String: String]) throws -> pid_t {
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (cArgs + cEnv).forEach { free($0) } }
        let pid = csd_spawn_pdeathsig(argv[0], cArgs, cEnv, SIGKILL, -1)
        guard pid > 0 else { throw SystemdError.syscall("fork", -errno, "starting sidecar \(argv[0])", code: .invalidArgument) }
        return pid
    }
}

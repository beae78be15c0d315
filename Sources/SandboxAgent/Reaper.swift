#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization

/// Reaps every child of the agent — its commands and, as a subreaper, every orphan below them —
/// and hands each command's own exit status to the connection waiting for it.
///
/// A command is spawned and registered under the same lock the reaper holds while it calls
/// `waitpid`, so a command that exits at once is never reaped before it is registered.
final class Reaper: Sendable {
    private struct State {
        /// Commands being waited for: pid → the write end of their handler's notification pipe.
        var waiting: [pid_t: Int32] = [:]
        /// Exit statuses reaped and not yet collected.
        var exited: [pid_t: Int32] = [:]
    }

    private let state = Mutex(State())
    private let orphans = Atomic<UInt64>(0)

    /// Children reaped that were not the agent's own commands.
    var orphansReaped: UInt64 { orphans.load(ordering: .relaxed) }

    var runningCount: Int { state.withLock { $0.waiting.count } }

    /// Runs `spawn` (which returns a pid, or nil) and registers the pid before any reaping can
    /// see it; the reaper writes one byte to `notify` when it exits.
    func spawnRegistered(notify: Int32, _ spawn: () -> pid_t?) -> pid_t? {
        state.withLock { state in
            guard let pid = spawn() else { return nil }
            state.waiting[pid] = notify
            return pid
        }
    }

    /// The exit status of a registered command once reaped (nil before); unregisters it.
    func collect(_ pid: pid_t) -> Int32? {
        state.withLock { state in
            guard let status = state.exited.removeValue(forKey: pid) else { return nil }
            return status
        }
    }

    /// Forgets a command whose handler is gone; if it is still running it will be reaped as an orphan.
    func forget(_ pid: pid_t) {
        state.withLock { state in
            state.waiting[pid] = nil
            state.exited[pid] = nil
        }
    }

    /// The process groups of the running commands.
    func runningGroups() -> [pid_t] { state.withLock { Array($0.waiting.keys) } }

    /// Reaps every child that has exited; returns at once when none has.
    func reapAll() {
        while true {
            let reaped: Bool = state.withLock { state in
                var status: Int32 = 0
                let pid = waitpid(-1, &status, WNOHANG)
                guard pid > 0 else { return false }
                if let notify = state.waiting.removeValue(forKey: pid) {
                    state.exited[pid] = status
                    var byte: UInt8 = 1
                    _ = write(notify, &byte, 1)
                } else {
                    orphans.add(1, ordering: .relaxed)
                }
                return true
            }
            if !reaped { return }
        }
    }
}

/// Decoded wait status.
struct WaitStatus {
    let exitCode: Int32
    let signal: Int32

    init(_ status: Int32) {
        let sig = status & 0x7f
        if sig == 0 {
            exitCode = (status >> 8) & 0xff
            signal = 0
        } else {
            signal = sig
            exitCode = 128 + sig
        }
    }
}

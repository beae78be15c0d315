import CSystemd
import Foundation
import Glibc

/// Tells the service manager how the service is doing (`sd_notify(3)`): `READY=1`,
/// `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`.
///
/// Every call is a no-op when the process was not started by systemd with a notification
/// socket (`$NOTIFY_SOCKET` unset), so that agentd runs the same with or without systemd.
/// `sd_notify` sends one datagram on a unix socket; it does not wait for the manager.
public struct ServiceNotifier: Sendable {
    /// `$NOTIFY_SOCKET` as the process found it at start.
    public let notifySocket: String?
    /// The watchdog interval the manager expects pings within (`$WATCHDOG_USEC`, when
    /// `$WATCHDOG_PID` is unset or this process), or nil when the watchdog is off.
    public let watchdogInterval: Duration?

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from `environment`.
    public init(environment: [String: String] = ProcessInfo.processInfo.environment) {
        let socket = environment["NOTIFY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
        notifySocket = socket
        var interval: Duration?
        if socket != nil, let text = environment["WATCHDOG_USEC"], let usec = UInt64(text), usec > 0 {
            let pidMatches = environment["WATCHDOG_PID"].map { pid_t($0) == getpid() } ?? true
            if pidMatches { interval = .microseconds(Int64(clamping: usec)) }
        }
        watchdogInterval = interval
    }

    /// True when a manager listens for notifications.
    public var isEnabled: Bool { notifySocket != nil }

    /// Sends `state` (newline-separated `KEY=value` assignments) with `sd_notify`.
    /// - Returns: false when there is no manager to tell (a no-op).
    /// - Throws: `SystemdError.callFailed` naming `sd_notify` and the errno when sending failed.
    @discardableResult
    public func notify(_ state: String) throws -> Bool {
        guard isEnabled else { return false }
        let r = csd_notify(0, state)
        if r < 0 { throw SystemdError.syscall("sd_notify", r, "notifying the service manager (\(state.prefix(40)))") }
        return r > 0
    }

    /// `READY=1` (with `STATUS=` when given): start-up is complete. For `Type=notify` the
    /// manager holds the unit in `activating` until this arrives.
    @discardableResult
    public func ready(status: String? = nil) throws -> Bool {
        try notify("READY=1" + (status.map { "\nSTATUS=\(Self.oneLine($0))" } ?? ""))
    }

    /// `STATUS=…`: a line `systemctl status` shows.
    @discardableResult
    public func status(_ text: String) throws -> Bool { try notify("STATUS=\(Self.oneLine(text))") }

    /// `STOPPING=1`: shutdown has begun.
    @discardableResult
    public func stopping() throws -> Bool { try notify("STOPPING=1") }

    /// `WATCHDOG=1`: one keep-alive ping.
    @discardableResult
    public func watchdogPing() throws -> Bool { try notify("WATCHDOG=1") }

    /// Pings the watchdog every half of `watchdogInterval` until the calling task is
    /// cancelled; returns at once when the watchdog is off. A failed ping is retried at the
    /// next tick (the manager restarts the service if pings stay away).
    public func runWatchdog() async {
        guard let interval = watchdogInterval else { return }
        while !Task.isCancelled {
            _ = try? watchdogPing()
            do { try await Task.sleep(for: interval / 2) } catch { return }
        }
    }

    private static func oneLine(_ text: String) -> String {
        text.replacingOccurrences(of: "\n", with: " ")
    }
}

/// Socket activation (`sd_listen_fds(3)`): the listening sockets the manager passed.
public enum SocketActivation {
    /// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
    public static let firstDescriptor: Int32 = 3

    /// The descriptors passed with `$LISTEN_FDS` for this process (`$LISTEN_PID`), starting
    /// at 3, marked close-on-exec; empty when the process was not socket-activated.
    /// With `unsetEnvironment` the variables are removed so that children do not see them.
    /// - Throws: `SystemdError.invalidArgument` naming `sd_listen_fds` and the errno when the
    ///   variables are malformed.
    public static func listenFDs(unsetEnvironment: Bool = true) throws -> [Int32] {
        let n = sd_listen_fds(unsetEnvironment ? 1 : 0)
        if n < 0 { throw SystemdError.syscall("sd_listen_fds", n, "reading the sockets passed by the service manager", code: .invalidArgument) }
        return (0..<n).map { firstDescriptor + $0 }
    }
}

/// Descriptors to pass to a unit as `StandardOutputFileDescriptor` or
/// `StandardErrorFileDescriptor` (what `systemd-run --pipe` does), or to a child process, made
/// close-on-exec so that no other child inherits them.
public enum UnitStreams {
    /// A pipe (`pipe2(O_CLOEXEC)`): keep `read`, pass `write` to the unit.
    /// - Throws: `SystemdError.invalidArgument` naming `pipe2` and the errno.
    public static func pipe() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        guard csd_pipe_cloexec(&fds) == 0 else { throw SystemdError.syscall("pipe2", -errno, "making a pipe for a unit's output", code: .invalidArgument) }
        return (fds[0], fds[1])
    }
}

import Foundation
import Glibc
import SystemdBus
import Testing
import TestSupport

/// `ServiceNotifier` and `SocketActivation` in a real Type=notify service (notify-probe)
/// started as a transient unit under the real manager.
@Suite("sd_notify, watchdog and socket activation under the real manager")
struct NotifyTests {
    @Test("a Type=notify unit becomes active only after READY=1")
    func readyGating() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let dir = try Probe.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let unit = "agentd-test-notify-\(Components.testID()).service"
        try await withUnits(manager, [unit]) {
        let started = ContinuousClock.now
        async let job = manager.startTransientUnit(
            unit, properties: [.execStart([try Probe.path, dir, "--ready-after-ms", "1500"]), .string("Type", "notify")], timeout: .seconds(20))
        var states: [String] = []
        var logAtActive: [String] = []
        _ = try await eventually(.seconds(15)) {
            let s = try await manager.unitProperties(unit).activeState
            if states.last != s { states.append(s) }
            if s == "active" { logAtActive = Probe.log(dir) }
            return s == "active"
        }
        let result = try await job
        let elapsed = ContinuousClock.now - started
        #expect(result == "done")
        #expect(states.contains("activating"), "states seen: \(states)")
        #expect(states.last == "active", "states seen: \(states)")
        // The probe logs "ready" right before READY=1: active never precedes it.
        #expect(logAtActive.contains { $0.hasPrefix("ready ") }, "log when active: \(logAtActive)")
        #expect(elapsed >= .milliseconds(1500))
        }
    }

    @Test("pinging at half of WatchdogSec keeps a unit up; a stalled watchdog gets it restarted")
    func watchdog() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let healthyDir = try Probe.directory(), stalledDir = try Probe.directory()
        defer { for d in [healthyDir, stalledDir] { try? FileManager.default.removeItem(atPath: d) } }
        let healthy = "agentd-test-wd-ok-\(Components.testID()).service"
        let stalled = "agentd-test-wd-stall-\(Components.testID()).service"
        try await withUnits(manager, [healthy, stalled]) {
        func properties(_ dir: String, stall: Bool) throws -> [UnitProperty] {
            [
                .execStart([try Probe.path, dir] + (stall ? ["--stall-watchdog"] : [])), .string("Type", "notify"),
                .duration("WatchdogUSec", .seconds(1)), .string("Restart", "on-watchdog"), .duration("RestartUSec", .milliseconds(200)),
                // The default SIGABRT would meet Swift's crash backtracer, which takes its time.
                UnitProperty("WatchdogSignal", .int32(SIGKILL)),
            ]
        }
        #expect(try await manager.startTransientUnit(healthy, properties: try properties(healthyDir, stall: false)) == "done")
        #expect(try await manager.startTransientUnit(stalled, properties: try properties(stalledDir, stall: true)) == "done")
        let firstStalledPID = try await manager.unitProperties(stalled).mainPID
        // NRestarts counts the restart once scheduled; the new process logs its start a little later.
        let restarted = try await eventually(.seconds(10)) {
            try await manager.unitProperties(stalled).restarts >= 1 && Set(Probe.log(stalledDir).filter { $0.hasPrefix("start ") }).count >= 2
        }
        #expect(restarted, "the stalled unit was not restarted by its watchdog; log: \(Probe.log(stalledDir))")
        #expect(try await manager.unitProperties(stalled).mainPID != firstStalledPID)
        // Over three watchdog intervals and more, the pinging unit kept its one process.
        try await Task.sleep(for: .seconds(2))
        let ok = try await manager.unitProperties(healthy)
        #expect(ok.activeState == "active" && ok.restarts == 0, "\(ok)")
        #expect(Probe.log(healthyDir).filter { $0.hasPrefix("start ") }.count == 1)
        }
    }

    @Test("socket activation hands the listening socket to the service")
    func socketActivation() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let dir = try Probe.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let stem = "agentd-test-sock-\(Components.testID())"
        let path = dir + "/api.sock"
        try await withUnits(manager, [stem + ".socket", stem + ".service"]) {
        let result = try await manager.startTransientUnit(
            stem + ".socket", properties: [.listen([("Stream", path)]), UnitProperty("SocketMode", .uint32(0o660))],
            auxiliary: [(stem + ".service", [.execStart([try Probe.path, dir]), .string("Type", "notify")])])
        #expect(result == "done")
        // Nothing runs until a client connects.
        #expect(Probe.log(dir).isEmpty)
        #expect(try await manager.unitProperties(stem + ".service").activeState == "inactive")
        let reply = try await Task.detached { try Self.connectAndRead(path) }.value
        let log = Probe.log(dir)
        let pid = try #require(log.first { $0.hasPrefix("start ") }).dropFirst("start ".count)
        #expect(reply == "probe \(pid) fds=1\n")
        #expect(try await eventually { try await manager.unitProperties(stem + ".service").activeState == "active" })
        }
    }

    /// Connects to the unix socket at `path` and reads until EOF (5 s receive timeout).
    static func connectAndRead(_ path: String) throws -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket: errno \(errno)") }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = b }
        }
        let r = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard r == 0 else { throw Failure("connect(\(path)): errno \(errno)") }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// The ServiceNotifier outside systemd: every call is a no-op, nothing fails.
@Suite("ServiceNotifier without systemd")
struct NotifierWithoutSystemdTests {
    @Test("without NOTIFY_SOCKET nothing is sent and the watchdog loop returns at once")
    func noManager() async throws {
        let notifier = ServiceNotifier(environment: [:])
        #expect(!notifier.isEnabled)
        #expect(notifier.watchdogInterval == nil)
        #expect(try notifier.ready(status: "up") == false)
        await notifier.runWatchdog()
        #expect(try SocketActivation.listenFDs(unsetEnvironment: false).isEmpty)
    }

    @Test("WATCHDOG_USEC is honoured only for this process")
    func watchdogInterval() {
        let mine = ServiceNotifier(environment: ["NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "\(getpid())"])
        #expect(mine.watchdogInterval == .seconds(4))
        let other = ServiceNotifier(environment: ["NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"])
        #expect(other.watchdogInterval == nil)
    }
}

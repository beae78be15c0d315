import Foundation
import Glibc
import SystemdBus
import Testing
import TestSupport

/// Sidecars in both modes: a transient unit bound to its owner's unit, and a supervised child.
@Suite("sidecars")
struct SidecarTests {
    /// True while `pid` is a live process (not gone, not a zombie).
    static func alive(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return false }
        return !stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
    }

    @Test("under a manager: a transient unit bound to its owner, restarted when it dies, stopped with its owner")
    func unitMode() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        // The owner stands in for agentd's own unit.
        let owner = "agentd-test-owner-\(Components.testID()).service"
        try await manager.startTransientUnit(owner, properties: [.execStart(["/bin/sleep", "600"])])
        let sidecar = try await Sidecar.start(name: "probe", argv: ["/bin/sleep", "600"], manager: manager, boundTo: owner, restartDelay: .milliseconds(100))
        guard case .unit(let unit) = sidecar.mode else {
            Issue.record("expected a unit sidecar, got \(sidecar.mode)")
            await cleanUp(manager, [owner])
            return
        }
        try await withUnits(manager, [owner, unit]) {
        let firstPID = try #require(try await sidecar.pid())
        kill(firstPID, SIGKILL)
        let restarted = try await eventually {
            let restarts = try await sidecar.restarts()
            let pid = try await sidecar.pid()
            return restarts >= 1 && pid != nil && pid != firstPID
        }
        #expect(restarted)
        try await manager.stopUnitAndWait(owner)
        #expect(try await eventually { try await manager.unitProperties(unit).activeState != "active" }, "the sidecar outlived its owner")
        }
    }

    @Test("a process in no unit of the manager gets a supervised child")
    func fallback() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let own = try await manager.unit(ofPID: getpid())
        #expect(own == nil || own == "init.scope", "the test process runs in \(own ?? "no unit")")
        let sidecar = try await Sidecar.start(name: "fallback", argv: ["/bin/sleep", "600"], manager: manager)
        #expect(sidecar.mode == .child)
        try await sidecar.stop()
    }

    @Test("without a manager: a child restarted when it dies and gone after stop")
    func childMode() async throws {
        let sidecar = try await Sidecar.start(name: "child", argv: ["/bin/sleep", "600"], manager: nil, restartDelay: .milliseconds(100))
        #expect(sidecar.mode == .child)
        let first = try #require(try await sidecar.pid())
        #expect(Self.alive(first))
        kill(first, SIGKILL)
        #expect(try await eventually { (try await sidecar.pid()).map { $0 != first } == true })
        #expect(try await sidecar.restarts() == 1)
        let second = try #require(try await sidecar.pid())
        try await sidecar.stop()
        #expect(await eventually(.seconds(3)) { !Self.alive(second) })
        #expect(try await sidecar.pid() == nil)
    }

    @Test("a child sidecar dies with its parent, even one killed with SIGKILL")
    func diesWithParent() async throws {
        let dir = try Probe.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/sidecar.pid"
        let parent = try ChildProcess.spawn([try Probe.path, "sidecar", file], environment: [:])
        var sidecarPID: pid_t?
        _ = await eventually {
            sidecarPID = ((try? String(contentsOfFile: file, encoding: .utf8)) ?? "").split(separator: "\n").first.flatMap { pid_t($0) }
            return sidecarPID != nil
        }
        let pid = try #require(sidecarPID, "the probe never started its sidecar")
        #expect(Self.alive(pid))
        parent.signal(SIGKILL)
        parent.wait()
        #expect(await eventually(.seconds(5)) { !Self.alive(pid) }, "sidecar \(pid) outlived its parent")
    }
}

import Foundation
import Hands
import SystemdBus
import Testing
import TestSupport

/// The unit driver's limits and lifecycle against the real manager. This host has cgroups v1
/// (hybrid): each test says which limit it checked and how; none is assumed.
@Suite("Hands on systemd units: limits and reconcile")
struct UnitLimitsTests {
    @Test("TasksMax is enforced: forking beyond the limit fails inside the sandbox")
    func tasksLimit() async throws {
        try await DriverFixture.with(.unit) { f in
            var spec = SandboxSpec()
            spec.pids = 8
            let result = await f.manager.execute(
                TaskKey(session: "m2", task: "t1"), spec: spec, tool: "bash",
                input: Input.bash("for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 3 & done; wait; echo finished"))
            #expect(result.output.lowercased().contains("fork"), "\(result.output)")
            print("unit limits: checked TasksMax — the 9th process of a slice with TasksMax=8 could not be forked")
        }
    }

    @Test("CPUQuota reaches the kernel where the cpu controller is available")
    func cpuQuota() async throws {
        try await DriverFixture.with(.unit) { f in
            let key = TaskKey(session: "m3", task: "t1")
            var spec = SandboxSpec()
            spec.cpus = 0.25
            _ = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("true"))
            let sandbox = try #require(await f.manager.sandbox(of: key))
            let status = try await #require(f.systemd).unitProperties(sandbox.id)
            let quotaFiles = ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"].map { $0 + status.controlGroup + "/cpu.cfs_quota_us" }
                + ["/sys/fs/cgroup" + status.controlGroup + "/cpu.max"]
            if let file = quotaFiles.first(where: { FileManager.default.fileExists(atPath: $0) }) {
                let text = try String(contentsOfFile: file, encoding: .utf8)
                #expect(text.hasPrefix("25000"), "\(file): \(text)")
                print("unit limits: checked CPUQuota — \(file) holds \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
            } else {
                // The manager realizes the cpu controller for the slice only where it may; say so.
                print("unit limits: CPUQuota NOT checked — no cpu controller file for \(status.controlGroup) on this host")
            }
            // Whatever the kernel does, the slice carries the limit the policy asked for.
            let quota = try await #require(f.systemd).property(
                path: SystemdManager.unitPath(sandbox.id), interface: "org.freedesktop.systemd1.Slice", name: "CPUQuotaPerSecUSec")
            #expect(quota.uint64Value == 250_000)
        }
    }

    @Test("nothing of the manager's environment reaches a command")
    func environment() async throws {
        try await DriverFixture.with(.unit) { f in
            let manager = try #require(f.systemd)
            let value = try await manager.property(path: "/org/freedesktop/systemd1", interface: "org.freedesktop.systemd1.Manager", name: "Environment")
            guard case .variant(.array(_, let items)) = value else { Issue.record("Manager.Environment is not an array: \(value)"); return }
            let names = items.compactMap { $0.stringValue?.split(separator: "=").first.map(String.init) }.filter { $0 != "PATH" && $0 != "HOME" }
            #expect(!names.isEmpty, "the test manager should have an environment of its own to leak")
            let env = await f.manager.execute(TaskKey(session: "m4", task: "t1"), spec: SandboxSpec(), tool: "bash", input: Input.bash("env"))
            // PWD and SHLVL are the shell's own.
            let inside = Set(env.output.split(separator: "\n").compactMap { $0.split(separator: "=").first.map(String.init) })
                .subtracting(["PWD", "SHLVL", "_"])
            #expect(inside.isDisjoint(with: names), "leaked: \(inside.intersection(names).sorted())")
            #expect(inside.contains("HOME") && inside.contains("PATH"))
        }
    }

    @Test("a sandbox stopped from outside during a command: an error string, then fresh Hands")
    func stoppedFromOutside() async throws {
        try await DriverFixture.with(.unit) { f in
            let key = TaskKey(session: "m5", task: "t1")
            _ = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("true"))
            let first = try #require(await f.manager.sandbox(of: key))
            async let long = f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("sleep 60"))
            // Stop the sandbox once the command runs in it, beside its agent (not after a fixed
            // pause, which on a loaded machine may come before the command has started).
            let systemd = try #require(f.systemd)
            _ = try await IsolationTests.waitForProcesses(uid: try #require(first.uid), count: 2)
            try await systemd.stopUnit(first.id)
            let result = await long
            #expect(result.isError)
            #expect(result.output.contains("fresh sandbox"), "\(result.output)")
            let again = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo recovered"))
            #expect(again.output == "recovered\n")
            #expect(try #require(await f.manager.sandbox(of: key)).id != first.id)
            #expect(await f.count(session: "m5") == 1)
        }
    }

    @Test("units left by a killed agentd are stopped by the next one's reconcile")
    func reconcile() async throws {
        try await DriverFixture.with(.unit) { f in
            let systemd = try #require(f.systemd)
            // The "killed" agentd: same instance, its own manager, never shut down.
            let crashed = HandsManager(driver: f.driver, instance: f.instance)
            for t in 1...2 { _ = await crashed.execute(TaskKey(session: "r1", task: "t\(t)"), spec: SandboxSpec(), tool: "bash", input: Input.bash("echo x > f")) }
            let running = Task { await crashed.execute(TaskKey(session: "r1", task: "t1"), spec: SandboxSpec(), tool: "bash", input: Input.bash("sleep 300")) }
            // The long command runs beside the sandbox's agent.
            let uid = try #require(await crashed.sandbox(of: TaskKey(session: "r1", task: "t1"))?.uid)
            _ = try await IsolationTests.waitForProcesses(uid: uid, count: 2)
            let services = try await systemd.listUnits(matching: ["agentd-\(f.instance)-*.service"], states: ["active"])
            #expect(services.count == 2, "one agent service per sandbox: \(services.map(\.name))")
            #expect(await f.count(session: "r1") == 2)
            #expect(f.workspaces.imageNames().count == 2)
            #expect(TestWorkspaces.mounted(f.workspaces.directory).count == 2)

            let removed = try await f.manager.reconcile()
            #expect(removed.count == 2)
            #expect(await f.count(session: "r1") == 0)
            let left = try await systemd.listUnits(matching: ["agentd-\(f.instance)-*"], states: ["active", "activating", "deactivating"])
            #expect(left.filter { !$0.name.hasSuffix("r1.slice") }.isEmpty, "still running: \(left.map(\.name))")
            #expect(f.workspaces.imageNames().isEmpty)
            #expect(TestWorkspaces.mounted(f.workspaces.directory).isEmpty)
            let interrupted = await running.value
            #expect(interrupted.isError, "\(interrupted.output)")
        }
    }
}

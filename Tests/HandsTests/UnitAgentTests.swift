import Foundation
import Glibc
import Hands
import SystemdBus
import Testing
import TestSupport

/// The unit driver's sandbox is one long-lived service running the sandbox agent: commands and
/// files go through the agent's socket, with the service's isolation and the slice's limits.
/// (Exact output, large files, timeouts, limits and orphans: `AgentConformanceTests`; streaming:
/// `AgentContainerTests.streaming`; both over both drivers.)
@Suite("Hands on systemd units: the sandbox agent", .serialized)
struct UnitAgentTests {
    @Test("the sandbox is one agent service in its slice; commands leave no unit behind; destroy stops service, slice and socket")
    func oneServicePerSandbox() async throws {
        try await DriverFixture.with(.unit) { f in
            let systemd = try #require(f.systemd)
            let key = TaskKey(session: "svc", task: "t")
            for i in 0..<5 {
                let r = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo \(i)"))
                #expect(r.output == "\(i)\n")
            }
            let sandbox = try #require(await f.manager.sandbox(of: key))
            let units = try await systemd.listUnits(matching: ["agentd-\(f.instance)-*"])
            let services = units.filter { $0.name.hasSuffix(".service") }
            #expect(services.map(\.name) == [String(sandbox.id.dropLast(".slice".count)) + ".service"], "\(units.map(\.name))")
            #expect(services.first?.activeState == "active")
            #expect(await f.manager.endTask(key))
            let left = try await systemd.listUnits(matching: ["agentd-\(f.instance)-*"], states: ["active", "activating", "deactivating", "failed"])
            #expect(left.isEmpty, "\(left.map(\.name))")
            let sockets = (try? FileManager.default.contentsOfDirectory(atPath: f.stateDirectory + "/agents")) ?? []
            #expect(sockets.isEmpty, "socket directories left: \(sockets)")
        }
    }

    @Test("a unit sandbox sees only its own socket directory, which takes no files, and nothing of agentd's state; it goes with the sandbox")
    func ownSocketOnly() async throws {
        try await DriverFixture.with(.unit) { f in
            let key = TaskKey(session: "own", task: "t")
            let driver = try #require(f.driver as? UnitDriver)
            let result = await f.manager.execute(
                key, spec: SandboxSpec(), tool: "bash",
                input: Input.bash(
                    "ls -A /run/agentd; touch /run/agentd/x 2>/dev/null || echo refused; ls -A /run /run/user; ls \(f.stateDirectory) 2>/dev/null || echo no-state"))
            // /run/user is ProtectHome's empty tmpfs.
            #expect(result.output == "agent.sock\nrefused\n/run:\nagentd\nagentd-agent\nuser\n\n/run/user:\nno-state\n", "\(result.output)")
            try await f.expectAgentDirectorySealedUntilTheEnd(key, agent: driver.agent)
        }
    }

    @Test("a warm pool's unit sandbox has its agent running before any task, serves the task that takes it, and refills")
    func warmPool() async throws {
        try await DriverFixture.with(.unit) { f in
            let systemd = try #require(f.systemd)
            var spec = SandboxSpec()
            spec.driver = "unit"
            await f.manager.setPoolSize(1, for: spec)
            await f.manager.fillPools()
            #expect(await f.manager.pooledCount == 1)
            let pooled = try await systemd.listUnits(matching: ["agentd-\(f.instance)-pool_*.service"], states: ["active"])
            #expect(pooled.count == 1, "the pooled sandbox's agent service: \(pooled.map(\.name))")
            let key = TaskKey(session: "pool", task: "t")
            let result = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo warm; id -u"))
            let sandbox = try #require(await f.manager.sandbox(of: key))
            #expect(result.output == "warm\n\(try #require(sandbox.uid))\n")
            #expect(sandbox.id == pooled.first.map { String($0.name.dropLast(".service".count)) + ".slice" })
            await f.manager.fillPools()
            #expect(await f.manager.pooledCount == 1)
        }
    }

    @Test("a restarted agentd's driver lists a live sandbox with its uid, workspace and agent, finds the agent answering, and removes it all")
    func restartedDriverFindsTheAgent() async throws {
        try await withSandbox { f, sandbox in
            try await f.driver.writeFile("kept.txt", contents: Array("kept".utf8), in: sandbox)
            // A new driver over the same manager and state: nothing in memory but what systemd says.
            let restarted = try UnitDriver(
                manager: try #require(f.systemd), instance: f.instance, stateDirectory: f.stateDirectory, rootDirectory: try UnitRootfs.path(),
                workspaces: f.workspaces)
            let listed = try await restarted.list(instance: f.instance)
            #expect(listed.map(\.id) == [sandbox.id])
            let labels = try #require(listed.first?.labels)
            for key in [SandboxLabel.uid, SandboxLabel.workspace, SandboxLabel.agent, SandboxLabel.session, SandboxLabel.task] {
                #expect(labels[key] == sandbox.labels[key], "\(key)")
            }
            let found = SandboxHandle(id: sandbox.id, spec: sandbox.spec, labels: labels)
            #expect(await restarted.agentAnswers(found))
            #expect(try await restarted.readFile("kept.txt", in: found) == Array("kept".utf8))
            try await restarted.destroy(id: sandbox.id)
            #expect(await !restarted.agentAnswers(found))
            let left = try await #require(f.systemd).listUnits(matching: ["agentd-\(f.instance)-*"], states: ["active", "activating", "deactivating", "failed"])
            #expect(left.isEmpty, "\(left.map(\.name))")
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: f.stateDirectory + "/agents")) ?? []).isEmpty)
            #expect(TestWorkspaces.mounted(f.workspaces.directory).isEmpty)
        }
    }

    // MARK: - helpers

    /// A unit fixture with one provisioned sandbox, destroyed afterwards.
    func withSandbox(_ body: (DriverFixture, SandboxHandle) async throws -> Void) async throws {
        try await DriverFixture.with(.unit) { f in
            let sandbox = try await f.driver.provision(SandboxSpec(), labels: [SandboxLabel.session: "agent", SandboxLabel.task: "t"])
            do {
                try await body(f, sandbox)
                try await f.driver.destroy(sandbox)
            } catch {
                try? await f.driver.destroy(sandbox)
                throw error
            }
        }
    }
}

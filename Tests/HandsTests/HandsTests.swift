import EngineAPI
import Foundation
import Hands
import Testing
import TestSupport

/// Container Hands against the real engine.
@Suite("Hands on containers")
struct ContainerHandsTests {
    /// Runs `body` with a manager of a fresh instance id; shuts it down and removes whatever
    /// the instance made afterwards, whatever happens.
    func withManager<T>(
        engine given: EngineClient? = nil, _ body: (HandsManager, EngineClient, String) async throws -> T
    ) async throws -> T {
        let engine: EngineClient
        if let given { engine = given } else { engine = try await Components.engine() }
        let instance = "t" + Components.testID()
        let (workspaces, directory) = try TestWorkspaces.make(instance)
        let manager = HandsManager(driver: ContainerDriver(engine: engine, instance: instance, workspaces: workspaces, agent: try TestWorkspaces.agent(directory)), instance: instance)
        do {
            let result = try await body(manager, engine, instance)
            await cleanup(manager, engine, instance)
            TestWorkspaces.remove(directory)
            return result
        } catch {
            await cleanup(manager, engine, instance)
            TestWorkspaces.remove(directory)
            throw error
        }
    }

    func cleanup(_ manager: HandsManager, _ engine: EngineClient, _ instance: String) async {
        await manager.shutdown()
        for c in (try? await engine.listContainers(labels: [SandboxLabel.instance: instance])) ?? [] {
            _ = try? await engine.removeContainer(c.Id)
        }
    }

    /// How many containers of `session` the engine lists (-1 when it cannot list).
    func count(_ engine: EngineClient, _ instance: String, session: String) async -> Int {
        (try? await engine.listContainers(labels: [SandboxLabel.instance: instance, SandboxLabel.session: session]).count) ?? -1
    }

    func bash(_ command: String, timeout: Int? = nil) -> [UInt8] {
        var object: [String: Any] = ["command": command]
        if let timeout { object["timeout_s"] = timeout }
        return Array(try! JSONSerialization.data(withJSONObject: object))
    }

    func json(_ object: [String: Any]) -> [UInt8] { Array(try! JSONSerialization.data(withJSONObject: object)) }

    @Test("no container before the first execute, exactly one after, none after the task ends")
    func onDemand() async throws {
        try await withManager { manager, engine, instance in
            let key = TaskKey(session: "s1", task: "t1")
            #expect(await self.count(engine, instance, session: "s1") == 0)
            let result = await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("echo hello; id -u"))
            let uid = try #require(await manager.sandbox(of: key)?.uid)
            #expect(result == ToolResult(output: "hello\n\(uid)\n", isError: false, exitCode: 0))
            #expect(await self.count(engine, instance, session: "s1") == 1)
            _ = await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("true"))
            #expect(await self.count(engine, instance, session: "s1") == 1)
            #expect(await manager.endTask(key))
            #expect(await self.count(engine, instance, session: "s1") == 0)
        }
    }

    @Test("sandboxes are hardened, as the engine's own inspect shows")
    func hardening() async throws {
        try await withManager { manager, engine, instance in
            let key = TaskKey(session: "s2", task: "t1")
            var spec = SandboxSpec()
            spec.memoryBytes = 256 << 20
            spec.cpus = 0.5
            spec.pids = 64
            spec.policyName = "hardening-test"
            _ = await manager.execute(key, spec: spec, tool: "bash", input: bash("true"))
            let sandbox = try #require(await manager.sandbox(of: key))
            let inspect = try await engine.inspectContainer(sandbox.id)
            let host = try #require(inspect.HostConfig)
            #expect(host.NetworkMode == "none")
            #expect(host.ReadonlyRootfs == true)
            // Docker reports ["ALL"]; Podman lists every default capability it dropped.
            let dropped = Set((host.CapDrop ?? []).map { $0.uppercased().replacingOccurrences(of: "CAP_", with: "") })
            #expect(dropped.contains("ALL") || dropped.isSuperset(of: ["CHOWN", "SETUID", "SETGID", "KILL", "NET_RAW", "DAC_OVERRIDE"]))
            #expect(host.CapAdd?.isEmpty ?? true)
            #expect(host.SecurityOpt?.contains { $0.contains("no-new-privileges") } == true)
            #expect(host.Memory == 256 << 20)
            #expect(host.NanoCpus == 500_000_000)
            #expect(host.PidsLimit == 64)
            #expect(host.Ulimits?.contains { $0.Name.lowercased().hasSuffix("nofile") } == true)
            #expect(inspect.Config?.User == "\(try #require(sandbox.uid)):\(try #require(sandbox.uid))")
            #expect(host.Binds?.contains { $0.contains(":/workspace:") } == true, "\(host.Binds ?? [])")
            // PID 1 is the sandbox agent: its executable read-only, its own socket directory.
            #expect(host.Binds?.contains { $0.contains(":\(AgentHands.sandboxExecutable):ro") } == true, "\(host.Binds ?? [])")
            #expect(host.Binds?.contains { $0.contains(":\(AgentHands.sandboxDirectory):") } == true, "\(host.Binds ?? [])")
            #expect(inspect.Config?.Cmd == AgentHands.command(proxy: false))
            let labels = try #require(inspect.Config?.Labels)
            #expect(labels[SandboxLabel.session] == "s2")
            #expect(labels[SandboxLabel.task] == "t1")
            #expect(labels[SandboxLabel.instance] == instance)
            #expect(labels[SandboxLabel.policy] == "hardening-test")
            #expect(inspect.Name?.contains("agentd-s2-t1") == true)
            // And from inside: no network but loopback, read-only root, writable workspace and /tmp.
            let probe = await manager.execute(
                key, spec: spec, tool: "bash",
                input: bash("ls /sys/class/net; touch /etc/x 2>&1; touch /workspace/ok /tmp/ok && echo writable; grep CapEff /proc/self/status"))
            #expect(probe.output.contains("lo"))
            #expect(!probe.output.contains("eth0"))
            #expect(probe.output.contains("Read-only file system"))
            #expect(probe.output.contains("writable"))
            #expect(probe.output.contains("CapEff:\t0000000000000000"))
        }
    }

    @Test("a failing command comes back as an error string with its output and exit code")
    func failingCommand() async throws {
        try await withManager { manager, _, _ in
            let result = await manager.execute(
                TaskKey(session: "s3", task: "t1"), spec: SandboxSpec(), tool: "bash", input: bash("echo partial; echo oops >&2; exit 3"))
            #expect(result.isError)
            #expect(result.exitCode == 3)
            #expect(result.output == "partial\n[stderr]\noops\n[exit code 3]")
        }
    }

    @Test("bad tool input and unknown tools are error strings naming what is wrong")
    func badInput() async throws {
        try await withManager { manager, engine, instance in
            let key = TaskKey(session: "s4", task: "t1")
            let unknown = await manager.execute(key, spec: SandboxSpec(), tool: "rm_rf", input: json([:]))
            #expect(unknown.isError && unknown.output.contains("unknown tool 'rm_rf'") && unknown.output.contains("bash"))
            let missing = await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: json(["cmd": "ls"]))
            #expect(missing.isError && missing.output.contains("missing field 'command'"))
            let notJSON = await manager.execute(key, spec: SandboxSpec(), tool: "write_file", input: Array("{path".utf8))
            #expect(notJSON.isError && notJSON.output.contains("not valid JSON"))
            // Refused before any sandbox was made.
            #expect(await self.count(engine, instance, session: "s4") == 0)
        }
    }

    @Test("files round-trip byte-exactly: text, binary and 10 MiB; the task's user can change them")
    func files() async throws {
        try await withManager { manager, _, _ in
            let key = TaskKey(session: "s5", task: "t1")
            let spec = SandboxSpec()
            let text = "héllo\nwörld\n"
            let w = await manager.execute(key, spec: spec, tool: "write_file", input: json(["path": "src/hello.txt", "content": text]))
            #expect(!w.isError, "\(w.output)")
            let r = await manager.execute(key, spec: spec, tool: "read_file", input: json(["path": "/workspace/src/hello.txt"]))
            #expect(r == ToolResult(output: text, isError: false))
            let append = await manager.execute(key, spec: spec, tool: "bash", input: bash("echo more >> src/hello.txt && cat src/hello.txt"))
            #expect(append.output == text + "more\n")

            var binary = [UInt8](repeating: 0, count: 10 << 20)
            var state: UInt64 = 0x9E37_79B9_7F4A_7C15
            for i in binary.indices {
                state = state &* 6364136223846793005 &+ 1442695040888963407
                binary[i] = UInt8(truncatingIfNeeded: state >> 33)
            }
            let wb = await manager.execute(
                key, spec: spec, tool: "write_file", input: json(["path": "blob.bin", "content": Data(binary).base64EncodedString(), "encoding": "base64"]))
            #expect(!wb.isError, "\(wb.output)")
            let asText = await manager.execute(key, spec: spec, tool: "read_file", input: json(["path": "blob.bin"]))
            #expect(asText.isError && asText.output.contains("base64"))
            let rb = await manager.execute(key, spec: spec, tool: "read_file", input: json(["path": "blob.bin", "encoding": "base64"]))
            #expect(!rb.isError)
            #expect(Data(base64Encoded: rb.output).map(Array.init) == binary)
            let size = await manager.execute(key, spec: spec, tool: "bash", input: bash("wc -c < blob.bin"))
            #expect(size.output.trimmingCharacters(in: .whitespacesAndNewlines) == "\(10 << 20)")

            let list = await manager.execute(key, spec: spec, tool: "list_files", input: json([:]))
            #expect(list.output.contains("blob.bin") && list.output.contains("src"))
            let missing = await manager.execute(key, spec: spec, tool: "read_file", input: json(["path": "nope.txt"]))
            #expect(missing.isError && missing.output.contains("nope.txt"))
            let directory = await manager.execute(key, spec: spec, tool: "read_file", input: json(["path": "src"]))
            #expect(directory.isError && directory.output.contains("directory"))
            // The sandbox survived every one of those errors.
            #expect(await manager.liveCount == 1)
        }
    }

    @Test("output beyond the policy's limit is cut with a note saying how much")
    func outputCap() async throws {
        try await withManager { manager, _, _ in
            var spec = SandboxSpec()
            spec.outputLimitBytes = 1000
            let result = await manager.execute(TaskKey(session: "s6", task: "t1"), spec: spec, tool: "bash", input: bash("head -c 5000 /dev/zero | tr '\\0' a"))
            #expect(result.output.hasPrefix(String(repeating: "a", count: 1000)))
            #expect(result.output.contains("[output cut: 4000 more bytes beyond the limit of 1000 B]"))
        }
    }

    @Test("a command past its timeout is killed and reported; the sandbox stays usable")
    func timeout() async throws {
        try await withManager { manager, _, _ in
            let key = TaskKey(session: "s7", task: "t1")
            var spec = SandboxSpec()
            spec.commandTimeout = .seconds(2)
            let started = ContinuousClock.now
            let result = await manager.execute(key, spec: spec, tool: "bash", input: bash("echo started; sleep 30"))
            // Killed at its timeout: well before the command would have ended by itself (30 s).
            #expect(ContinuousClock.now - started < .seconds(25))
            #expect(result.isError)
            #expect(result.output.contains("started"))
            #expect(result.output.contains("timed out after 2"))
            let after = await manager.execute(key, spec: spec, tool: "bash", input: bash("echo still here"))
            #expect(after.output == "still here\n")
        }
    }

    @Test("a sandbox killed during a long command: an error string, then fresh Hands")
    func killedSandbox() async throws {
        try await withManager { manager, engine, instance in
            let key = TaskKey(session: "s8", task: "t1")
            _ = await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("true"))
            let first = try #require(await manager.sandbox(of: key))
            async let long = manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("sleep 60"))
            try await Task.sleep(for: .milliseconds(800))
            try await engine.killContainer(first.id)
            let result = await long
            #expect(result.isError)
            #expect(result.output.contains("fresh sandbox"), "\(result.output)")
            let again = await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("echo recovered"))
            #expect(again.output == "recovered\n")
            let second = try #require(await manager.sandbox(of: key))
            #expect(second.id != first.id)
            #expect(await self.count(engine, instance, session: "s8") == 1)
        }
    }

    @Test("a sandbox out of memory: the error string names the limit, then fresh Hands")
    func outOfMemory() async throws {
        try await withManager { manager, _, _ in
            let key = TaskKey(session: "s9", task: "t1")
            var spec = SandboxSpec()
            spec.memoryBytes = 32 << 20
            let result = await manager.execute(key, spec: spec, tool: "bash", input: bash("dd if=/dev/zero of=/dev/null bs=256M count=1"))
            #expect(result.isError)
            #expect(result.output.contains("memory"), "\(result.output)")
            #expect(result.output.contains("32 MiB"), "\(result.output)")
            let again = await manager.execute(key, spec: spec, tool: "bash", input: bash("echo alive"))
            #expect(again.output == "alive\n")
        }
    }

    @Test("with the engine down, a running sandbox goes on through its agent, a new one is an error string; both work once it is back")
    func engineDown() async throws {
        let engine = try PrivateEngine()
        try await engine.start()
        let client = EngineClient(endpoint: engine.endpoint)
        defer { engine.stop() }  // also keeps the service alive (and running) until the end
        try await withManager(engine: client) { manager, _, _ in
            let key = TaskKey(session: "s10", task: "t1")
            let other = TaskKey(session: "s10", task: "t2")
            #expect(await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("echo up")).output == "up\n")
            engine.stop()
            // The sandbox's agent answers without the engine.
            let running = await manager.execute(key, spec: SandboxSpec(), tool: "bash", input: bash("echo still up"))
            #expect(running == ToolResult(output: "still up\n", isError: false, exitCode: 0))
            let down = await manager.execute(other, spec: SandboxSpec(), tool: "bash", input: bash("echo up"))
            #expect(down.isError)
            #expect(down.output.contains("unreachable") && down.output.contains("try again"), "\(down.output)")
            try await engine.start()
            let back = await manager.execute(other, spec: SandboxSpec(), tool: "bash", input: bash("echo back"))
            #expect(back == ToolResult(output: "back\n", isError: false, exitCode: 0))
            _ = try await manager.reconcile()
        }
    }

    @Test("after a crash of its owner, reconcile removes the instance's orphaned sandboxes, their mounts and their images")
    func reconcileOrphans() async throws {
        let engine = try await Components.engine()
        let instance = "t" + Components.testID()
        let (workspaces, directory) = try TestWorkspaces.make(instance)
        defer { TestWorkspaces.remove(directory) }
        let crashed = HandsManager(driver: ContainerDriver(engine: engine, instance: instance, workspaces: workspaces, agent: try TestWorkspaces.agent(directory)), instance: instance)
        for t in 1...2 { _ = await crashed.execute(TaskKey(session: "s11", task: "t\(t)"), spec: SandboxSpec(), tool: "bash", input: bash("true")) }
        #expect(await self.count(engine, instance, session: "s11") == 2)
        #expect(TestWorkspaces.mounted(directory).count == 2)
        // A new owner of the same instance and state directory (agentd after kill -9 and
        // restart) knows none of them.
        let restarted = HandsManager(
            driver: ContainerDriver(engine: engine, instance: instance, workspaces: try WorkspaceImages(directory: directory), agent: try TestWorkspaces.agent(directory)), instance: instance)
        let removed = try await restarted.reconcile()
        await cleanup(restarted, engine, instance)
        #expect(removed.count == 2)
        #expect(await self.count(engine, instance, session: "s11") == 0)
        #expect(TestWorkspaces.mounted(directory) == [])
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory + "/images") == [])
    }

    @Test("restore after a crash: a live task sharing its session's workspace with an ended one is adopted, the shared mount stays, its uid is kept; the rest and leftover mounts go")
    func restoreSharedSessionWorkspace() async throws {
        let engine = try await Components.engine()
        let instance = "t" + Components.testID()
        let (workspaces, directory) = try TestWorkspaces.make(instance)
        defer { TestWorkspaces.remove(directory) }
        let spec = {
            var s = SandboxSpec()
            s.workspace = .session
            return s
        }()
        let crashed = HandsManager(driver: ContainerDriver(engine: engine, instance: instance, workspaces: workspaces, agent: try TestWorkspaces.agent(directory)), instance: instance)
        let live = TaskKey(session: "s20", task: "live")
        let ended = TaskKey(session: "s20", task: "ended")
        let silent = TaskKey(session: "s21", task: "main")
        #expect(await crashed.execute(live, spec: spec, tool: "write_file", input: json(["path": "kept.txt", "content": "kept"])).output.hasPrefix("wrote"))
        #expect(await crashed.execute(ended, spec: spec, tool: "bash", input: bash("true")).exitCode == 0)
        #expect(await crashed.execute(silent, spec: SandboxSpec(), tool: "bash", input: bash("true")).exitCode == 0)
        let liveID = try #require(await crashed.sandbox(of: live)?.id)
        let silentID = try #require(await crashed.sandbox(of: silent)?.id)
        let uid = try #require(await crashed.sandbox(of: live)?.uid)
        // One sandbox stops answering while no agentd runs: its container is killed.
        try await engine.killContainer(silentID)
        _ = try await engine.waitContainer(silentID)
        #expect(TestWorkspaces.mounted(directory).count == 2)

        // The restarted owner: a new store over the same directory, and the journal's word on
        // which tasks are live.
        let store = try WorkspaceImages(directory: directory)
        let restarted = HandsManager(driver: ContainerDriver(engine: engine, instance: instance, workspaces: store, agent: try TestWorkspaces.agent(directory)), instance: instance)
        let restored = try await restarted.restore(liveTask: { key in key == live || key == silent ? spec : nil })
        await store.sweep()
        #expect(restored.adopted.map(\.id) == [liveID])
        #expect(restored.removed.count == 2 && restored.removed.contains(silentID))
        #expect(TestWorkspaces.mounted(directory).count == 1, "the shared session workspace stays mounted; the silent one's is gone")
        #expect(store.uids.uid(of: WorkspaceImages.sessionName(instance: instance, session: "s20")) == uid, "the adopted workspace keeps its uid")
        let read = await restarted.execute(live, spec: spec, tool: "read_file", input: json(["path": "kept.txt"]))
        #expect(read.output == "kept")
        #expect(await restarted.sandbox(of: live)?.id == liveID)
        #expect(try await restarted.reconcile() == [])
        await restarted.endTask(live)
        #expect(TestWorkspaces.mounted(directory) == [])
        await cleanup(restarted, engine, instance)
    }

    @Test("a warm pool hands out a started sandbox, renamed for its task, and refills")
    func warmPool() async throws {
        try await withManager { manager, engine, instance in
            let spec = SandboxSpec()
            await manager.setPoolSize(1, for: spec)
            await manager.fillPools()
            #expect(await manager.pooledCount == 1)
            let key = TaskKey(session: "s12", task: "t1")
            let result = await manager.execute(key, spec: spec, tool: "bash", input: bash("echo warm"))
            #expect(result.output == "warm\n")
            let sandbox = try #require(await manager.sandbox(of: key))
            let inspect = try await engine.inspectContainer(sandbox.id)
            #expect(inspect.Name?.contains("agentd-s12-t1") == true)
            await manager.fillPools()
            #expect(await manager.pooledCount == 1)
            #expect(try await engine.listContainers(labels: [SandboxLabel.instance: instance]).count == 2)
        }
    }
}

import EngineAPI
import Foundation
import Glibc
import Hands
import SystemdBus
import Testing
import TestSupport

/// Sandboxes that break are named and replaced, limits on how many a session and a host may
/// hold, and nothing a task made outlives it — against the real engine and systemd manager.
/// Each test asserts what a Brain would see: the result string, and that the next call works.
///
/// Serialized: on a cgroup v1 host where the systemd manager's devices cgroup is the root, a
/// unit starting or stopping can empty the devices cgroups of containers started meanwhile
/// (their execs then fail with `…/devices/libpod_parent/…/cgroup.procs: no such file`).
@Suite("Hands robustness: broken sandboxes, limits, leaks", .serialized)
struct RobustnessTests {
    // MARK: - broken sandboxes

    @Test("a sandbox whose memory is held by files in /tmp is named in the result, /tmp included, and replaced on the next call")
    func fullMemoryTmpfs() async throws {
        try await DriverFixture.with(.container) { f in
            let key = TaskKey(session: "z2", task: "t1")
            var spec = SandboxSpec()
            // /tmp is memory-backed and larger than the memory limit: filling it uses the
            // sandbox's memory up, and the pages stay when the writer is killed.
            spec.tmpBytes = 64 << 20
            spec.memoryBytes = 40 << 20
            let first = try await AgentConformanceTests.sandbox(f, key, spec: spec)
            let fill = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("head -c \(64 << 20) /dev/zero > /tmp/fill; echo filled"))
            #expect(fill.isError)
            #expect(fill.output.contains("memory") && fill.output.contains("limit 40 MiB") && fill.output.contains("/tmp"), "\(fill.output)")
            #expect(fill.output.contains("fresh sandbox"), "\(fill.output)")
            let again = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo hello"))
            #expect(again == ToolResult(output: "hello\n", isError: false, exitCode: 0))
            #expect(await f.manager.sandbox(of: key)?.id != first.id)
        }
    }

    @Test("a command's own exit codes 125 and 137 leave a healthy sandbox alone")
    func ownExitCodes() async throws {
        try await DriverFixture.with(.container) { f in
            let key = TaskKey(session: "z3", task: "t1")
            let own = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo 'Error: OCI runtime error' >&2; exit 125"))
            #expect(own.output == "[stderr]\nError: OCI runtime error\n[exit code 125]")
            let first = try #require(await f.manager.sandbox(of: key))
            let killed = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("kill -9 $$"))
            #expect(killed.output == "[exit code 137]")
            #expect(await f.manager.sandbox(of: key)?.id == first.id)
        }
    }

    // MARK: - limits

    @Test("a session at its policy's sandbox limit gets an error naming the limit; ending a task makes room")
    func sessionLimit() async throws {
        try await DriverFixture.with(.container) { f in
            var spec = SandboxSpec()
            spec.maxSandboxesPerSession = 2
            for t in 1...2 {
                let ok = await f.manager.execute(TaskKey(session: "l1", task: "t\(t)"), spec: spec, tool: "bash", input: Input.bash("echo t\(t)"))
                #expect(ok.output == "t\(t)\n")
            }
            let third = TaskKey(session: "l1", task: "t3")
            let refused = await f.manager.execute(third, spec: spec, tool: "bash", input: Input.bash("echo t3"))
            #expect(refused.isError)
            #expect(refused.output.contains("session.maxSandboxes: 2") && refused.output.contains("task end"), "\(refused.output)")
            #expect(await f.count(session: "l1") == 2)
            // Another session is not affected, and ending a task lets the third one in.
            #expect(await f.manager.execute(TaskKey(session: "l2", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo other")).output == "other\n")
            #expect(await f.manager.endTask(TaskKey(session: "l1", task: "t1")))
            #expect(await f.manager.execute(third, spec: spec, tool: "bash", input: Input.bash("echo t3")).output == "t3\n")
        }
    }

    @Test("the host's sandbox limit counts warm sandboxes, which give way to tasks; beyond it, an error naming the option")
    func hostCountLimit() async throws {
        try await withLimitedManager(HostLimits(maxSandboxes: 2)) { manager, f in
            var warm = SandboxSpec()
            warm.policyName = "warm"
            await manager.setPoolSize(1, for: warm)
            await manager.fillPools()
            #expect(await manager.pooledCount == 1)
            let spec = SandboxSpec()
            #expect(await manager.execute(TaskKey(session: "h1", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo one")).output == "one\n")
            // The pooled sandbox makes two: the next task takes its place.
            #expect(await manager.execute(TaskKey(session: "h2", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo two")).output == "two\n")
            #expect(await manager.pooledCount == 0)
            let refused = await manager.execute(TaskKey(session: "h3", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo three"))
            #expect(refused.isError)
            #expect(refused.output.contains("--max-sandboxes 2"), "\(refused.output)")
            // The pool cannot refill past the limit either, and says why.
            await manager.fillPools()
            #expect(await manager.pooledCount == 0)
            #expect(await manager.poolStatus(warm).lastError?.contains("--max-sandboxes 2") == true)
            let listed = try await f.driver.list(instance: f.instance)
            #expect(listed.count == 2)
        }
    }

    @Test("the host's memory budget refuses a sandbox whose limit would not fit, naming both figures")
    func hostMemoryBudget() async throws {
        try await withLimitedManager(HostLimits(memoryBytes: 600 << 20, memorySource: "600 MiB")) { manager, f in
            var spec = SandboxSpec()
            spec.memoryBytes = 256 << 20
            for s in 1...2 {
                #expect(await manager.execute(TaskKey(session: "b\(s)", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo ok")).output == "ok\n")
            }
            let refused = await manager.execute(TaskKey(session: "b3", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo ok"))
            #expect(refused.isError)
            #expect(refused.output.contains("256 MiB") && refused.output.contains("512 MiB") && refused.output.contains("600 MiB"), "\(refused.output)")
            let listed = try await f.driver.list(instance: f.instance)
            #expect(listed.count == 2)
            #expect(await manager.endTask(TaskKey(session: "b1", task: "t1")))
            #expect(await manager.execute(TaskKey(session: "b3", task: "t1"), spec: spec, tool: "bash", input: Input.bash("echo ok")).output == "ok\n")
        }
    }

    @Test("memory budgets parse as a share of the host's RAM or a size; anything else says what is accepted")
    func memoryBudgetParsing() throws {
        let size: (String) -> Int? = { $0 == "16GiB" ? 16 << 30 : nil }
        #expect(try HostLimits.memoryBudget("50%", hostMemory: 8 << 30, parseSize: size).bytes == 4 << 30)
        #expect(try HostLimits.memoryBudget("16GiB", hostMemory: nil, parseSize: size).bytes == 16 << 30)
        #expect(try HostLimits.memoryBudget("0", hostMemory: nil, parseSize: size).bytes == nil)
        for bad in ["150%", "lots", "-1%"] {
            #expect(throws: HandsError.self) { try HostLimits.memoryBudget(bad, hostMemory: 8 << 30, parseSize: size) }
        }
        #expect((HostLimits.hostMemoryBytes() ?? 0) > 0)
    }

    // MARK: - leaks

    @Test("ending a unit task stops its slice, its commands and the session's slice")
    func unitSlicesGo() async throws {
        try await DriverFixture.with(.unit) { f in
            let systemd = try #require(f.systemd)
            let key = TaskKey(session: "k1", task: "t1")
            #expect(await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo hi")).output == "hi\n")
            let pattern = "agentd-\(f.instance)-*"
            let during = try await systemd.listUnits(matching: [pattern], states: ["active", "activating"])
            #expect(during.contains { $0.name.hasSuffix("-k1.slice") }, "the session's slice: \(during.map(\.name))")
            #expect(await f.manager.endTask(key))
            let left = try await systemd.listUnits(matching: [pattern], states: ["active", "activating", "deactivating", "reloading"])
            #expect(left.isEmpty, "still active after the task ended: \(left.map(\.name))")
            // The next call of the session starts cleanly in a new slice.
            #expect(await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo again")).output == "again\n")
        }
    }

    @Test("a SysV shared memory segment made in a sandbox does not outlive its task on the host", arguments: DriverKind.allCases)
    func ipcSegmentsGo(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "i1", task: "t1")
            // The image has no ipcmk: bring the host's, with its loader and libc, into the workspace.
            try await IPCTool.install(in: f.manager, key: key)
            let size = 4096 + Int.random(in: 1...4095)
            let made = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash(IPCTool.command("-M \(size)")))
            #expect(!made.isError && made.output.contains("Shared memory id"), "\(made.output)")
            #expect(await f.manager.endTask(key))
            let leaked = IPCTool.hostSegments(size: size)
            for id in leaked { shmctl(Int32(id), IPC_RMID, nil) }
            #expect(leaked.isEmpty, "\(kind) sandbox left shm segments \(leaked) of \(size) bytes in the host's /proc/sysvipc/shm")
        }
    }

    // MARK: - relative cwd

    @Test("a relative cwd is under /workspace in both drivers", arguments: DriverKind.allCases)
    func relativeWorkingDirectory(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "c1", task: "t1")
            let wrote = await f.manager.execute(key, spec: SandboxSpec(), tool: "write_file", input: Input.json(["path": "src/app/x.txt", "content": "in app"]))
            #expect(!wrote.isError, "\(wrote.output)")
            let ran = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.json(["command": "pwd; cat x.txt", "cwd": "src/app"]))
            #expect(ran == ToolResult(output: "/workspace/src/app\nin app", isError: false, exitCode: 0))
        }
    }

    // MARK: - helpers

    /// A container manager with `limits`, over a fixture whose teardown removes what it made.
    func withLimitedManager(_ limits: HostLimits, _ body: (HandsManager, DriverFixture) async throws -> Void) async throws {
        try await DriverFixture.with(.container) { f in
            let manager = HandsManager(driver: f.driver, instance: f.instance, limits: limits)
            do {
                try await body(manager, f)
                await manager.shutdown()
            } catch {
                await manager.shutdown()
                throw error
            }
        }
    }
}

/// The host's `ipcmk`, run inside a sandbox through its own dynamic loader and libc.
enum IPCTool {
    static let files = ["/usr/bin/ipcmk": "ipcmk", "/lib64/ld-linux-x86-64.so.2": "ld.so", "/lib/x86_64-linux-gnu/libc.so.6": "libc.so.6"]

    static func install(in manager: HandsManager, key: TaskKey) async throws {
        for (host, name) in files {
            let bytes = try Data(contentsOf: URL(fileURLWithPath: host))
            let result = await manager.execute(
                key, spec: SandboxSpec(), tool: "write_file",
                input: Input.json(["path": ".ipc/\(name)", "content": bytes.base64EncodedString(), "encoding": "base64"]))
            guard !result.isError else { throw FixtureMissing("cannot copy \(host) into the sandbox: \(result.output)") }
        }
    }

    static func command(_ arguments: String) -> String {
        "cd /workspace/.ipc && chmod +x ld.so ipcmk && ./ld.so --library-path . ./ipcmk \(arguments)"
    }

    /// Ids of the host's shm segments of `size` bytes (`/proc/sysvipc/shm`: key shmid perms size …).
    static func hostSegments(size: Int) -> [Int] {
        guard let text = try? String(contentsOfFile: "/proc/sysvipc/shm", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").dropFirst().compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count > 3, Int(fields[3]) == size else { return nil }
            return Int(fields[1])
        }
    }
}

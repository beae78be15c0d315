import Foundation
import Glibc
import Hands
import Synchronization
import SystemdBus
import Testing
import TestSupport

/// The unit driver's sandbox is one long-lived service running the sandbox agent: commands and
/// files go through the agent's socket, with the service's isolation and the slice's limits.
@Suite("Hands on systemd units: the sandbox agent", .serialized)
struct UnitAgentTests {
    @Test("stdout, stderr and the exit code come back exactly, binary bytes included")
    func exactOutput() async throws {
        try await withSandbox { f, sandbox in
            let out = try await f.driver.run(["sh", "-c", "printf 'out\\n'; printf 'err' >&2; exit 7"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(out == CommandOutput(stdout: Array("out\n".utf8), stderr: Array("err".utf8), exitCode: 7))
            let binary = try await f.driver.run(["printf", "\\000\\001\\200\\377"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(binary.stdout == [0, 1, 0x80, 0xFF] && binary.exitCode == 0, "\(binary)")
            let signalled = try await f.driver.run(["sh", "-c", "kill -TERM $$"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(signalled.exitCode == 128 + Int(SIGTERM) && !signalled.timedOut)
        }
    }

    @Test("300 000 random bytes round trip through write_file, a command's stdout and read_file; the file is the sandbox user's")
    func roundTrip() async throws {
        try await withSandbox { f, sandbox in
            var generator = SeededGenerator(seed: 300_000)
            let bytes = (0..<300_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
            try await f.driver.writeFile("data/random.bin", contents: bytes, in: sandbox)
            let cat = try await f.driver.run(["cat", "data/random.bin"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(cat.stdout == bytes && cat.exitCode == 0 && !cat.truncated)
            #expect(try await f.driver.readFile("/workspace/data/random.bin", in: sandbox) == bytes)
            // Written by the agent as the sandbox's user, never root.
            var st = stat()
            let host = f.workspaces.hostPath(try #require(sandbox.workspace))
            #expect(stat(host + "/data/random.bin", &st) == 0)
            #expect(Int(st.st_uid) == sandbox.uid && Int(st.st_gid) == sandbox.uid)
            #expect(stat(host + "/data", &st) == 0 && Int(st.st_uid) == sandbox.uid)
        }
    }

    @Test("a command past its timeout is killed with its whole process group: no process of it survives")
    func timeoutKillsTheGroup() async throws {
        try await withSandbox { f, sandbox in
            let uid = try #require(sandbox.uid)
            let before = Set(IsolationTests.processes(uid: uid))
            let out = try await f.driver.run(
                ["sh", "-c", "sleep 300 & sleep 300 & echo started; sleep 300"], in: sandbox, workingDirectory: nil, timeout: .seconds(2))
            #expect(out.timedOut && out.exitCode == 137, "\(out)")
            #expect(out.stdout == Array("started\n".utf8))
            // Only the agent is left (killed processes are reaped as they die).
            let clean = await eventually(.seconds(10)) { Set(IsolationTests.processes(uid: uid)) == before }
            #expect(clean, "left behind: \(Set(IsolationTests.processes(uid: uid)).subtracting(before).map(Self.commandLine))")
            let again = try await f.driver.run(["echo", "still here"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(again.stdout == Array("still here\n".utf8))
        }
    }

    @Test("a fork bomb is contained by the slice's TasksMax: forks fail inside, nothing of it survives, the sandbox runs commands again")
    func forkBomb() async throws {
        var spec = SandboxSpec()
        spec.pids = 64
        try await withSandbox(spec) { f, sandbox in
            // Every level forks two more until the slice's 64 tasks are used up; then forks fail
            // and the bomb collapses (or is killed with its group at the timeout).
            let out = try await f.driver.run(["sh", "-c", "b() { b | b; }; b"], in: sandbox, workingDirectory: nil, timeout: .seconds(20))
            let stderr = String(decoding: out.stderr, as: UTF8.self)
            #expect(stderr.contains("can't fork") || stderr.contains("Resource temporarily unavailable"), "\(out.exitCode) \(stderr.prefix(300))")
            let uid = try #require(sandbox.uid)
            let settled = await eventually(.seconds(10)) { IsolationTests.processes(uid: uid).count == 1 }
            #expect(settled, "processes of the sandbox after the bomb: \(IsolationTests.processes(uid: uid).map(Self.commandLine))")
            let again = try await f.driver.run(["echo", "alive"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(again.stdout == Array("alive\n".utf8))
        }
    }

    @Test("1000 orphaned children leave no zombie: the agent reaps them")
    func orphansAreReaped() async throws {
        try await withSandbox { f, sandbox in
            // Each subshell starts a child and exits at once: the child is orphaned. Unreaped,
            // 1000 of them would exhaust the slice's 256 pids long before the loop ends.
            let out = try await f.driver.run(
                ["sh", "-c", "i=0; while [ $i -lt 1000 ]; do (sleep 0 &); i=$((i+1)); done; echo looped"], in: sandbox, workingDirectory: nil,
                timeout: .seconds(120))
            // No fork failed on the way (stderr would say "can't fork").
            #expect(out.stdout == Array("looped\n".utf8) && out.exitCode == 0 && out.stderr.isEmpty, "\(String(decoding: out.stderr.prefix(300), as: UTF8.self))")
            let uid = try #require(sandbox.uid)
            let none = await eventually(.seconds(10)) { Self.zombies(uid: uid) == 0 }
            #expect(none, "\(Self.zombies(uid: uid)) zombies left")
        }
    }

    @Test("output streams: the first chunk reaches the sink while the command still runs")
    func streaming() async throws {
        try await withSandbox { f, sandbox in
            // The command waits for a file that only the sink creates, on the host, when it
            // sees the first line: it ends only if that line arrived before the end.
            let signal = f.workspaces.hostPath(try #require(sandbox.workspace)) + "/go"
            let chunks = Mutex<[(Hands.OutputStream, [UInt8])]>([])
            let out = try await f.driver.run(
                ["sh", "-c", "echo first; while [ ! -e /workspace/go ]; do sleep 0.05; done; echo second >&2"], in: sandbox, workingDirectory: nil,
                timeout: .seconds(20)
            ) { stream, bytes in
                chunks.withLock { $0.append((stream, bytes)) }
                if stream == .stdout, bytes.starts(with: Array("first".utf8)) { _ = FileManager.default.createFile(atPath: signal, contents: Data()) }
            }
            #expect(!out.timedOut && out.exitCode == 0, "the command never saw the first line delivered: \(out)")
            let seen = chunks.withLock { $0 }
            #expect(seen.first?.0 == .stdout && seen.first?.1 == Array("first\n".utf8))
            #expect(seen.last?.0 == .stderr && seen.last?.1 == Array("second\n".utf8))
            #expect(out.stdout == Array("first\n".utf8) && out.stderr == Array("second\n".utf8))
        }
    }

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

    /// A unit fixture with one provisioned sandbox of `spec`, destroyed afterwards.
    func withSandbox(_ spec: SandboxSpec = SandboxSpec(), _ body: (DriverFixture, SandboxHandle) async throws -> Void) async throws {
        try await DriverFixture.with(.unit) { f in
            let sandbox = try await f.driver.provision(spec, labels: [SandboxLabel.session: "agent", SandboxLabel.task: "t"])
            do {
                try await body(f, sandbox)
                try await f.driver.destroy(sandbox)
            } catch {
                try? await f.driver.destroy(sandbox)
                throw error
            }
        }
    }

    /// Zombies among the host's processes of `uid`.
    static func zombies(uid: Int) -> Int {
        IsolationTests.processes(uid: uid).filter { pid in
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
            return stat[stat.index(after: close)...].hasPrefix(" Z")
        }.count
    }

    static func commandLine(_ pid: pid_t) -> String {
        let raw = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline"))) ?? Data()
        return "\(pid): " + String(decoding: raw.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
    }
}

import Foundation
import Glibc
import Hands
import Testing
import TestSupport

/// What every driver's commands must do exactly, through `HandsDriver` itself (bytes, not
/// rendered strings) and through the manager (what a Brain sees): exact output and exit
/// status, binary data, timeouts that leave nothing behind, memory and process limits named
/// or contained, orphans reaped.
@Suite("Hands driver conformance: exact commands and limits")
struct AgentConformanceTests {
    /// The sandbox of `key`, provisioned by a first call.
    static func sandbox(_ f: DriverFixture, _ key: TaskKey, spec: SandboxSpec = SandboxSpec()) async throws -> SandboxHandle {
        let first = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("true"))
        return try #require(await f.manager.sandbox(of: key), "\(first.output)")
    }

    @Test("stdout, stderr and exit status come back byte for byte, NUL bytes and signals included", arguments: DriverKind.allCases)
    func exactOutput(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let sandbox = try await Self.sandbox(f, TaskKey(session: "x1", task: "t"))
            let out = try await f.driver.run(
                ["sh", "-c", #"printf 'out\000\377x'; printf 'err\n' >&2; exit 7"#], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(out.stdout == [0x6F, 0x75, 0x74, 0x00, 0xFF, 0x78])
            #expect(out.stderr == Array("err\n".utf8))
            #expect(out.exitCode == 7)
            #expect(!out.timedOut && !out.truncated)
            let signalled = try await f.driver.run(["sh", "-c", "kill -TERM $$"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(signalled.exitCode == 128 + Int(SIGTERM))
            let quiet = try await f.driver.run(["true"], in: sandbox, workingDirectory: "/tmp", timeout: .seconds(30))
            #expect(quiet == CommandOutput(stdout: [], stderr: [], exitCode: 0))
        }
    }

    @Test("300 000 random bytes written, read back and printed by cat are the same bytes, owned by the sandbox's user", arguments: DriverKind.allCases)
    func randomBytes(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "x2", task: "t")
            let sandbox = try await Self.sandbox(f, key)
            var generator = SystemRandomNumberGenerator()
            let bytes = (0..<300_000).map { _ in UInt8.random(in: 0...255, using: &generator) }
            try await f.driver.writeFile("random/r.bin", contents: bytes, in: sandbox)
            #expect(try await f.driver.readFile("/workspace/random/r.bin", in: sandbox) == bytes)
            let cat = try await f.driver.run(["cat", "random/r.bin"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(cat.exitCode == 0)
            #expect(cat.stdout == bytes)
            let owner = try await f.driver.run(["stat", "-c", "%u %s", "random/r.bin"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            #expect(String(decoding: owner.stdout, as: UTF8.self) == "\(try #require(sandbox.uid)) 300000\n")
        }
    }

    @Test("a command past its timeout is killed with its whole process group: nothing it started survives", arguments: DriverKind.allCases)
    func timeoutLeavesNoSurvivor(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "x3", task: "t")
            var spec = SandboxSpec()
            spec.commandTimeout = .seconds(2)
            let started = ContinuousClock.now
            let result = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("sleep 3000 & sleep 3001 & echo started; wait"))
            #expect(ContinuousClock.now - started < .seconds(20))
            #expect(result.isError && result.output.contains("timed out after 2"), "\(result.output)")
            // The killed processes are gone once reaped: wait for that, never for a fixed time.
            let survivors = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done | grep -c '^sleep 300' || true"
            let gone = await eventually {
                await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash(survivors)).output == "0\n"
            }
            let left = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash(survivors)).output
            #expect(gone, "processes left: \(left)")
        }
    }

    @Test("a command that exhausts the memory limit is named out of memory; the next call works", arguments: DriverKind.allCases)
    func outOfMemoryNamed(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "x4", task: "t")
            var spec = SandboxSpec()
            spec.memoryBytes = 48 << 20
            let result = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("dd if=/dev/zero of=/dev/null bs=256M count=1"))
            #expect(result.isError)
            #expect(result.output.contains("out of memory") && result.output.contains("48 MiB"), "\(result.output)")
            let again = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo alive"))
            #expect(again == ToolResult(output: "alive\n", isError: false, exitCode: 0))
        }
    }

    @Test("a fork bomb is contained by the pids limit and its timeout; the task goes on", arguments: DriverKind.allCases)
    func forkBomb(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "x5", task: "t")
            var spec = SandboxSpec()
            spec.pids = 64
            spec.commandTimeout = .seconds(5)
            let sandbox = try await Self.sandbox(f, key, spec: spec)
            let uid = try #require(sandbox.uid)
            let started = ContinuousClock.now
            let bomb = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("bomb() { bomb | bomb & }; bomb; wait"))
            #expect(ContinuousClock.now - started < .seconds(30))
            // Stopped by the pids limit (forks fail) or by its timeout, whichever comes first.
            #expect(bomb.output.contains("can't fork") || bomb.output.contains("timed out"), "\(bomb.output.prefix(300))")
            var after = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo contained"))
            if after.isError {
                // The bomb's background processes may still hold every slot (then even the
                // agent cannot start a thread): the sandbox is replaced.
                #expect(after.output.contains("fresh sandbox"), "\(after.output)")
                after = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo contained"))
            }
            #expect(after == ToolResult(output: "contained\n", isError: false, exitCode: 0))
            // Nothing of the bomb is left: at most a sandbox's agent runs as its user.
            #expect(await eventually { IsolationTests.processes(uid: uid).count <= 1 }, "\(IsolationTests.processes(uid: uid))")
        }
    }

    @Test("1000 orphaned children leave no zombie, and the sandbox keeps working", arguments: DriverKind.allCases)
    func orphansReaped(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "x6", task: "t")
            var spec = SandboxSpec()
            // Far fewer process slots than orphans: unreaped, they would use them all up.
            spec.pids = 64
            let sandbox = try await Self.sandbox(f, key, spec: spec)
            let flood = await f.manager.execute(
                key, spec: spec, tool: "bash",
                input: Input.bash("i=0; while [ $i -lt 1000 ]; do (sleep 0 &); i=$((i+1)); done; echo flooded"))
            // A fork may fail while the reaper catches up; what counts is what is left after.
            #expect(flood.output.hasPrefix("flooded\n"), "\(flood.output.prefix(300))")
            let zombies = #"z=0; for f in /proc/[0-9]*/stat; do read -r l < "$f" 2>/dev/null || continue; case "$l" in *") Z "*) z=$((z+1));; esac; done; echo $z"#
            let none = await eventually {
                await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash(zombies)).output == "0\n"
            }
            let count = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash(zombies)).output
            #expect(none, "zombies: \(count)")
            let after = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo hello"))
            #expect(after == ToolResult(output: "hello\n", isError: false, exitCode: 0))
            #expect(await f.manager.sandbox(of: key)?.id == sandbox.id, "the same sandbox, not a replacement")
        }
    }
}

import Foundation
import Hands
import Testing
import TestSupport

/// One suite, run against every Hands driver: what a Brain sees must not depend on whether
/// its Hands are containers or systemd units.
@Suite("Hands driver conformance")
struct ConformanceTests {
    @Test("no sandbox before the first execute, exactly one after, none after the task ends", arguments: DriverKind.allCases)
    func onDemand(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "s1", task: "t1")
            #expect(await f.count(session: "s1") == 0)
            let result = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo hello; id -u"))
            // The sandbox's own uid, from the range, recorded on the sandbox.
            let uid = try #require(await f.manager.sandbox(of: key)?.uid)
            #expect(SandboxUIDs.defaultRange.contains(uid))
            #expect(result == ToolResult(output: "hello\n\(uid)\n", isError: false, exitCode: 0))
            #expect(await f.count(session: "s1") == 1)
            _ = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("true"))
            #expect(await f.count(session: "s1") == 1)
            #expect(await f.manager.endTask(key))
            #expect(await f.count(session: "s1") == 0)
        }
    }

    @Test("stdout, stderr and exit codes render identically; a failing command is an error string", arguments: DriverKind.allCases)
    func rendering(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "s2", task: "t1")
            let failing = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("echo partial; echo oops >&2; exit 3"))
            #expect(failing == ToolResult(output: "partial\n[stderr]\noops\n[exit code 3]", isError: true, exitCode: 3))
            let ok = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("printf 'a\\nb'; printf warn >&2"))
            #expect(ok == ToolResult(output: "a\nb\n[stderr]\nwarn", isError: false, exitCode: 0))
            let missing = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("no-such-command-xyz"))
            #expect(missing.isError && missing.exitCode == 127 && missing.output.contains("no-such-command-xyz"), "\(missing.output)")
            // Errors of the command never cost the task its sandbox.
            #expect(await f.manager.liveCount == 1)
        }
    }

    @Test("files round-trip byte-exactly: text, base64 binary and 10 MiB", arguments: DriverKind.allCases)
    func files(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "s3", task: "t1")
            let spec = SandboxSpec()
            let text = "héllo\nwörld\n"
            let w = await f.manager.execute(key, spec: spec, tool: "write_file", input: Input.json(["path": "src/hello.txt", "content": text]))
            #expect(w == ToolResult(output: "wrote \(text.utf8.count) bytes to src/hello.txt", isError: false))
            let r = await f.manager.execute(key, spec: spec, tool: "read_file", input: Input.json(["path": "/workspace/src/hello.txt"]))
            #expect(r == ToolResult(output: text, isError: false))
            let append = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo more >> src/hello.txt && cat src/hello.txt"))
            #expect(append.output == text + "more\n")

            var binary = [UInt8](repeating: 0, count: 10 << 20)
            var state: UInt64 = 0x9E37_79B9_7F4A_7C15
            for i in binary.indices {
                state = state &* 6364136223846793005 &+ 1442695040888963407
                binary[i] = UInt8(truncatingIfNeeded: state >> 33)
            }
            let wb = await f.manager.execute(
                key, spec: spec, tool: "write_file",
                input: Input.json(["path": "blob.bin", "content": Data(binary).base64EncodedString(), "encoding": "base64"]))
            #expect(!wb.isError, "\(wb.output)")
            let asText = await f.manager.execute(key, spec: spec, tool: "read_file", input: Input.json(["path": "blob.bin"]))
            #expect(asText.isError && asText.output.contains("base64"))
            let rb = await f.manager.execute(key, spec: spec, tool: "read_file", input: Input.json(["path": "blob.bin", "encoding": "base64"]))
            #expect(!rb.isError)
            let roundTripped = Data(base64Encoded: rb.output).map(Array.init) == binary
            #expect(roundTripped)
            let size = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("wc -c < blob.bin"))
            #expect(size.output.trimmingCharacters(in: .whitespacesAndNewlines) == "\(10 << 20)")

            let list = await f.manager.execute(key, spec: spec, tool: "list_files", input: Input.json([:]))
            #expect(list.output.contains("blob.bin") && list.output.contains("src"))
            let missing = await f.manager.execute(key, spec: spec, tool: "read_file", input: Input.json(["path": "nope.txt"]))
            #expect(missing.isError && missing.output.contains("nope.txt"))
            let directory = await f.manager.execute(key, spec: spec, tool: "read_file", input: Input.json(["path": "src"]))
            #expect(directory.isError && directory.output.contains("directory"))
            #expect(await f.manager.liveCount == 1)
        }
    }

    @Test("output beyond the policy's limit is cut with a note saying how much", arguments: DriverKind.allCases)
    func outputCap(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            var spec = SandboxSpec()
            spec.outputLimitBytes = 1000
            let result = await f.manager.execute(
                TaskKey(session: "s4", task: "t1"), spec: spec, tool: "bash", input: Input.bash("head -c 5000 /dev/zero | tr '\\0' a"))
            #expect(result.output.hasPrefix(String(repeating: "a", count: 1000)))
            #expect(result.output.contains("[output cut: 4000 more bytes beyond the limit of 1000 B]"), "\(result.output.suffix(120))")
        }
    }

    @Test("a command past its timeout is killed and reported; the task goes on", arguments: DriverKind.allCases)
    func timeout(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "s5", task: "t1")
            var spec = SandboxSpec()
            spec.commandTimeout = .seconds(2)
            let started = ContinuousClock.now
            let result = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo started; sleep 30"))
            // Killed at its timeout: well before the command would have ended by itself (30 s).
            #expect(ContinuousClock.now - started < .seconds(25))
            #expect(result.isError)
            #expect(result.output.contains("started"), "\(result.output)")
            #expect(result.output.contains("timed out after 2"), "\(result.output)")
            let after = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo still here"))
            #expect(after.output == "still here\n")
        }
    }

    @Test("isolated: only loopback, root filesystem read-only outside the workspace, not root, no capabilities", arguments: DriverKind.allCases)
    func isolation(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "s6", task: "t1")
            let net = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("cat /proc/self/net/dev"))
            let interfaces = net.output.split(separator: "\n").compactMap { line -> String? in
                guard let colon = line.firstIndex(of: ":"), !line.contains("|") else { return nil }
                return line[..<colon].trimmingCharacters(in: .whitespaces)
            }
            #expect(interfaces == ["lo"], "\(net.output)")
            let fs = await f.manager.execute(
                key, spec: SandboxSpec(), tool: "bash",
                input: Input.bash("touch /etc/x 2>&1; touch /usr/x 2>&1; touch /workspace/ok /tmp/ok && echo writable"))
            #expect(fs.output.components(separatedBy: "Read-only file system").count == 3, "\(fs.output)")
            #expect(fs.output.contains("writable"))
            let who = await f.manager.execute(key, spec: SandboxSpec(), tool: "bash", input: Input.bash("id -u; id -g; grep CapEff /proc/self/status"))
            let uid = try #require(await f.manager.sandbox(of: key)?.uid)
            #expect(who.output == "\(uid)\n\(uid)\nCapEff:\t0000000000000000\n", "\(who.output)")
        }
    }
}

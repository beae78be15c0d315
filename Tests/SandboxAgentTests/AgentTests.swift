import Foundation
import SandboxAgentClient
import Synchronization
import Testing
import TestSupport

/// The real agent binary, run as a host process on a temporary socket, through the real client.
@Suite struct AgentTests {
    static let env = ["PATH": "/usr/local/bin:/usr/bin:/bin"]

    func shell(_ command: String, timeout: Duration = .seconds(20), limit: Int = 1 << 20, stdin: [UInt8]? = nil, cwd: String? = nil)
        -> AgentExecRequest
    {
        .shell(command, cwd: cwd, environment: Self.env, stdin: stdin, timeout: timeout, outputLimit: limit)
    }

    @Test func exactStdoutStderrAndExitCode() async throws {
        try await RunningAgent.with { agent in
            let r = try await agent.client.exec(shell("printf 'out\\nput'; printf 'err' >&2; exit 7"), output: nil)
            #expect(String(decoding: r.stdout, as: UTF8.self) == "out\nput")
            #expect(String(decoding: r.stderr, as: UTF8.self) == "err")
            #expect(r.exitCode == 7)
            #expect(r.signal == nil)
            #expect(!r.timedOut)
            #expect(r.cutBytes == 0)
            #expect(r.cutNote == nil)
        }
    }

    @Test func argvRunsWithoutAShellAndMissingProgramsSay127() async throws {
        try await RunningAgent.with { agent in
            let r = try await agent.client.exec(
                AgentExecRequest(argv: ["printf", "%s|", "a b", "$HOME", "*"], environment: Self.env, timeout: .seconds(10), outputLimit: 100),
                output: nil)
            #expect(String(decoding: r.stdout, as: UTF8.self) == "a b|$HOME|*|")
            let missing = try await agent.client.exec(
                AgentExecRequest(argv: ["no-such-program"], environment: Self.env, timeout: .seconds(10), outputLimit: 1000), output: nil)
            #expect(missing.exitCode == 127)
            #expect(String(decoding: missing.stderr, as: UTF8.self).contains("no-such-program: command not found"))
        }
    }

    @Test func binaryOutputIsByteExact() async throws {
        try await RunningAgent.with { agent in
            let all = (0...255).map { UInt8($0) }
            let path = agent.directory + "/all-bytes"
            try await agent.client.writeFile(path, contents: all, timeout: .seconds(10))
            let r = try await agent.client.exec(shell("cat '\(path)'; cat '\(path)' >&2"), output: nil)
            #expect(r.stdout == all)
            #expect(r.stderr == all)
        }
    }

    @Test func threeHundredThousandRandomBytesRoundTrip() async throws {
        try await RunningAgent.with { agent in
            let bytes = randomBytes(300_000, seed: 42)
            let path = agent.directory + "/deep/er/random.bin"
            try await agent.client.writeFile(path, contents: bytes, timeout: .seconds(20))
            let back = try await agent.client.readFile(path, limit: 300_000, timeout: .seconds(20))
            #expect(back.count == bytes.count && back == bytes, "read back \(back.count) bytes, not the ones written")
            let wc = try await agent.client.exec(shell("wc -c < '\(path)'"), output: nil)
            #expect(String(decoding: wc.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) == "300000")
            // Through a command's stdin and stdout as well.
            let cat = try await agent.client.exec(shell("cat", limit: 400_000, stdin: bytes), output: nil)
            #expect(cat.stdout.count == bytes.count && cat.stdout == bytes, "cat gave \(cat.stdout.count) bytes, not its stdin")
            #expect(!cat.timedOut)
        }
    }

    @Test func timeoutKillsTheWholeProcessGroup() async throws {
        try await RunningAgent.with { agent in
            let r = try await agent.client.exec(
                shell("sleep 30 & echo $!; echo $$; sleep 30", timeout: .seconds(1)), output: nil)
            #expect(r.timedOut)
            #expect(r.exitCode == 137)
            #expect(r.signal == 9)
            let pids = String(decoding: r.stdout, as: UTF8.self).split(separator: "\n").compactMap { pid_t($0) }
            #expect(pids.count == 2)
            for pid in pids {
                #expect(await eventually { !processRuns(pid) }, "process \(pid) survived the timeout")
            }
        }
    }

    @Test func aBackgroundProcessHoldingThePipesDoesNotHoldTheResult() async throws {
        try await RunningAgent.with { agent in
            // The background sleep keeps stdout and stderr open for 30 s; the result comes once
            // the shell exits (after a brief drain), and the background process keeps running.
            let r = try await agent.client.exec(shell("sleep 30 & echo $!; echo done"), output: nil)
            let lines = String(decoding: r.stdout, as: UTF8.self).split(separator: "\n")
            #expect(lines.last == "done")
            #expect(r.exitCode == 0)
            let background = try #require(lines.first.flatMap { pid_t($0) })
            #expect(processRuns(background), "the result waited for the background process")
            kill(background, SIGKILL)
        }
    }

    @Test func outputOverTheLimitIsCutAndCounted() async throws {
        try await RunningAgent.with { agent in
            let delivered = Mutex(0)
            let r = try await agent.client.exec(shell("head -c 100000 /dev/zero; echo tail >&2", limit: 1000)) { _, bytes in
                delivered.withLock { $0 += bytes.count }
            }
            #expect(r.stdout.count + r.stderr.count == 1000)
            #expect(delivered.withLock { $0 } == 1000)
            #expect(r.cutBytes == 100_000 + 5 - 1000)
            #expect(r.cutNote == "[output truncated: 99005 more bytes were cut]")
            #expect(r.exitCode == 0)
        }
    }

    @Test func aSignalIsReportedAsSignalAnd128Plus() async throws {
        try await RunningAgent.with { agent in
            let r = try await agent.client.exec(shell("kill -TERM $$"), output: nil)
            #expect(r.signal == 15)
            #expect(r.exitCode == 143)
            #expect(!r.timedOut)
        }
    }

    @Test func environmentIsExactlyWhatTheHostGaveAndCwdIsUsed() async throws {
        try await RunningAgent.with { agent in
            let r = try await agent.client.exec(
                AgentExecRequest(
                    argv: ["/usr/bin/env"], cwd: agent.directory, environment: ["A": "b c", "PATH": "/bin"], timeout: .seconds(10),
                    outputLimit: 10_000), output: nil)
            #expect(String(decoding: r.stdout, as: UTF8.self).split(separator: "\n").sorted() == ["A=b c", "PATH=/bin"])
            let pwd = try await agent.client.exec(shell("pwd", cwd: agent.directory), output: nil)
            #expect(String(decoding: pwd.stdout, as: UTF8.self) == agent.directory + "\n")
            await #expect(throws: SandboxAgentError(.failed, "cannot use no such file or directory: /no/such/dir as the working directory")) {
                try await agent.client.exec(shell("pwd", cwd: "/no/such/dir"), output: nil)
            }
        }
    }

    @Test func outputStreamsWhileTheCommandStillRuns() async throws {
        try await RunningAgent.with { agent in
            let fifo = agent.directory + "/gate"
            #expect(mkfifo(fifo, 0o600) == 0)
            let (chunks, continuation) = AsyncStream<String>.makeStream()
            let run = Task {
                try await agent.client.exec(shell("echo first; cat '\(fifo)'; echo last")) { _, bytes in
                    continuation.yield(String(decoding: bytes, as: UTF8.self))
                }
            }
            // The command cannot finish before the gate opens, and the gate opens only after the
            // first chunk arrived: the chunk came while the command was blocked.
            var iterator = chunks.makeAsyncIterator()
            let first = await iterator.next()
            #expect(first == "first\n")
            let gate = open(fifo, O_WRONLY)
            _ = write(gate, "go\n", 3)
            close(gate)
            let r = try await run.value
            #expect(String(decoding: r.stdout, as: UTF8.self) == "first\ngo\nlast\n")
        }
    }

    @Test func connectionsAreServedConcurrently() async throws {
        try await RunningAgent.with { agent in
            let fifo = agent.directory + "/gate"
            #expect(mkfifo(fifo, 0o600) == 0)
            let blocked = Task { try await agent.client.exec(shell("cat '\(fifo)'"), output: nil) }
            // While one command waits on the gate, others run to completion.
            for i in 0..<5 {
                let r = try await agent.client.exec(shell("echo \(i)"), output: nil)
                #expect(r.stdout == Array("\(i)\n".utf8))
            }
            #expect(try await agent.client.health().runningCommands >= 1)
            let gate = open(fifo, O_WRONLY)
            _ = write(gate, "open\n", 5)
            close(gate)
            #expect(try await blocked.value.stdout == Array("open\n".utf8))
        }
    }

    @Test func aHostThatHangsUpKillsTheCommand() async throws {
        try await RunningAgent.with { agent in
            let (pids, continuation) = AsyncStream<pid_t>.makeStream()
            let run = Task {
                try await agent.client.exec(shell("echo $$; sleep 30")) { _, bytes in
                    if let pid = pid_t(String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) {
                        continuation.yield(pid)
                    }
                }
            }
            var iterator = pids.makeAsyncIterator()
            let pid = try #require(await iterator.next())
            #expect(processRuns(pid))
            run.cancel()
            _ = try? await run.value
            #expect(await eventually { !processRuns(pid) }, "the command outlived its connection")
        }
    }

    @Test func orphansAreReaped() async throws {
        try await RunningAgent.with { agent in
            // Each sleep outlives the subshell that started it, so it is orphaned to the agent
            // (a `sleep 0` may end first and be reaped by its own subshell, uncounted).
            let r = try await agent.client.exec(shell("for i in $(seq 1000); do (sleep 0.5 &) ; done", timeout: .seconds(120)), output: nil)
            #expect(r.exitCode == 0)
            let agentPID = agent.process.pid
            var reaped: UInt64 = 0
            let deadline = ContinuousClock.now + .seconds(30)
            while reaped < 1000, ContinuousClock.now < deadline {
                reaped = try await agent.client.health().zombiesReaped
                if reaped < 1000 { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(reaped >= 1000, "orphans reaped by the agent: \(reaped)")
            #expect(await eventually { children(of: agentPID).allSatisfy { $0.state != "Z" } }, "zombies left under the agent")
        }
    }

    @Test func fileErrorsAreClear() async throws {
        try await RunningAgent.with { agent in
            let dir = agent.directory
            try await agent.client.writeFile(dir + "/five", contents: Array("12345".utf8), timeout: .seconds(5))
            await #expect(throws: SandboxAgentError(.failed, "file too large: \(dir)/five is 5 bytes, the limit is 4 bytes")) {
                try await agent.client.readFile(dir + "/five", limit: 4, timeout: .seconds(5))
            }
            await #expect(throws: SandboxAgentError(.failed, "is a directory: \(dir)")) {
                try await agent.client.readFile(dir, limit: 4, timeout: .seconds(5))
            }
            await #expect(throws: SandboxAgentError(.failed, "no such file or directory: \(dir)/none")) {
                try await agent.client.readFile(dir + "/none", limit: 4, timeout: .seconds(5))
            }
            await #expect(throws: SandboxAgentError(.failed, "not a directory: \(dir)/five/x")) {
                try await agent.client.writeFile(dir + "/five/x", contents: [1], timeout: .seconds(5))
            }
            await #expect(throws: SandboxAgentError(.failed, "is a directory: \(dir)")) {
                try await agent.client.writeFile(dir, contents: [1], timeout: .seconds(5))
            }
            await #expect(throws: SandboxAgentError(.failed, "not a directory: \(dir)/five")) {
                try await agent.client.list(dir + "/five", timeout: .seconds(5))
            }
        }
    }

    @Test func writesKeepModesAndListingsDescribeEntries() async throws {
        try await RunningAgent.with { agent in
            let dir = agent.directory + "/tree"
            try await agent.client.writeFile(dir + "/tool", contents: Array("#!/bin/sh\n".utf8), mode: 0o750, timeout: .seconds(5))
            try await agent.client.writeFile(dir + "/tool", contents: Array("#!/bin/sh\necho\n".utf8), timeout: .seconds(5))
            #expect(symlink("tool", dir + "/link") == 0)
            // Writing through a symlink writes its target, as a program in the sandbox would.
            try await agent.client.writeFile(dir + "/link", contents: Array("via link".utf8), timeout: .seconds(5))
            #expect(mkdir(dir + "/sub", 0o700) == 0)
            let entries = try await agent.client.list(dir, timeout: .seconds(5))
            #expect(entries.map(\.name) == ["link", "sub", "tool"])
            let tool = try #require(entries.first { $0.name == "tool" })
            #expect(tool.type == .regular && tool.mode == 0o750 && tool.size == 8 && tool.uid == getuid())
            let link = try #require(entries.first { $0.name == "link" })
            #expect(link.type == .symlink && link.symlinkTarget == "tool")
            let sub = try #require(entries.first { $0.name == "sub" })
            #expect(sub.type == .directory && sub.mode == 0o700)
            #expect(abs(Double(tool.modificationTime) - Date().timeIntervalSince1970) < 600)
            // No temporary files are left behind.
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir).sorted() == ["link", "sub", "tool"])
        }
    }

    @Test func aFailedStreamLeavesTheTargetUntouched() async throws {
        struct SourceFailed: Error {}
        try await RunningAgent.with { agent in
            let path = agent.directory + "/kept"
            try await agent.client.writeFile(path, contents: Array("original".utf8), timeout: .seconds(5))
            let failing = AsyncThrowingStream<[UInt8], any Error> { continuation in
                continuation.yield(Array("partial".utf8))
                continuation.finish(throwing: SourceFailed())
            }
            await #expect(throws: SourceFailed.self) {
                try await agent.client.writeFile(path, chunks: failing, mode: nil, timeout: .seconds(5))
            }
            #expect(try await agent.client.readFile(path, limit: 100, timeout: .seconds(5)) == Array("original".utf8))
            #expect(await eventually { (try? FileManager.default.contentsOfDirectory(atPath: agent.directory).count) == 3 })
        }
    }

    @Test func healthAndLimitsDescribeTheAgent() async throws {
        try await RunningAgent.with { agent in
            let health = try await agent.client.health()
            #expect(health.pid == agent.process.pid)
            #expect(health.uid == getuid())
            #expect(health.protocolVersion == AgentFrame.protocolVersion)
            #expect(health.software.hasPrefix("agentd-sandbox-agent"))
            let limits = try await agent.client.limits()
            #expect(limits.cgroupVersion == 1 || limits.cgroupVersion == 2)
            #expect((limits.memoryCurrent ?? 0) > 0)
        }
    }

    @Test func sigtermIsForwardedToCommandsBeforeTheAgentExits() async throws {
        let agent = try await RunningAgent()
        defer { Task { await agent.stop() } }
        let (lines, continuation) = AsyncStream<String>.makeStream()
        let run = Task {
            try await agent.client.exec(shell("trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done")) {
                _, bytes in continuation.yield(String(decoding: bytes, as: UTF8.self))
            }
        }
        var iterator = lines.makeAsyncIterator()
        #expect(await iterator.next() == "ready\n")
        agent.process.signal(SIGTERM)
        let r = try await run.value
        #expect(String(decoding: r.stdout, as: UTF8.self) == "ready\ngot TERM\n")
        #expect(r.exitCode == 3)
        var status: Int32?
        #expect(await eventually { status = agent.process.exitStatusIfExited(); return status != nil })
        #expect(status == 0)
        #expect(!FileManager.default.fileExists(atPath: agent.socket))
    }

    @Test func theBridgeSplicesALoopbackPortToAUnixSocket() async throws {
        // An upstream unix server that answers each connection with a fixed greeting.
        let upstream = try FakeAgent(script: Array("upstream says hi".utf8), hold: false)
        defer { upstream.stop() }
        let port = Int.random(in: 20_000..<60_000)
        let agent = try await RunningAgent(arguments: ["--bridge", "127.0.0.1:\(port)=\(upstream.socket)"])
        defer { Task { await agent.stop() } }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(rc == 0)
        _ = write(fd, "hello", 5)
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            received += buffer[0..<n]
        }
        #expect(String(decoding: received, as: UTF8.self) == "upstream says hi")
    }

    @Test func helpExplainsTheOptions() throws {
        let dir = try RunningAgent.temporaryDirectory("agentd-agent-help")
        let child = try ChildProcess.spawn([try RunningAgent.binary, "--help"], environment: [:], output: dir + "/out")
        var status: Int32?
        while status == nil { status = child.exitStatusIfExited() }
        let text = try String(contentsOfFile: dir + "/out", encoding: .utf8)
        #expect(status == 0)
        #expect(text.contains("--socket PATH") && text.contains("--bridge"))
        let bad = try ChildProcess.spawn([try RunningAgent.binary, "--bridge", "nonsense"], environment: [:], output: dir + "/bad")
        status = nil
        while status == nil { status = bad.exitStatusIfExited() }
        #expect(status.map { ($0 >> 8) & 0xff } == 2)
        #expect(try String(contentsOfFile: dir + "/bad", encoding: .utf8).contains("--bridge takes ADDRESS:PORT=SOCKET_PATH"))
        try? FileManager.default.removeItem(atPath: dir)
    }
}

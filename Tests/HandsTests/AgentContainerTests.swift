import EngineAPI
import Foundation
import Glibc
import Hands
import Synchronization
import Testing
import TestSupport

/// The container driver's sandbox agent: PID 1 of every sandbox, the only way commands and
/// files reach it.
@Suite("Container sandboxes run the sandbox agent")
struct AgentContainerTests {
    @Test("output streams to the sink as it is produced: the first chunk arrives before the command ends, in order", arguments: DriverKind.allCases)
    func streaming(_ kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let sandbox = try await AgentConformanceTests.sandbox(f, TaskKey(session: "y1", task: "t"))
            let go = f.workspaces.hostPath(try #require(sandbox.workspace)) + "/go"
            let chunks = Mutex<[(Hands.OutputStream, [UInt8])]>([])
            // The command waits for a file the sink makes once it has seen the first line:
            // it ends only if that line reached the sink before its end.
            let out = try await f.driver.run(
                ["sh", "-c", "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second; echo third >&2"], in: sandbox,
                workingDirectory: nil, timeout: .seconds(30),
                output: { stream, bytes in
                    chunks.withLock { $0.append((stream, bytes)) }
                    if String(decoding: bytes, as: UTF8.self).contains("first") { close(open(go, O_CREAT | O_WRONLY, 0o644)) }
                })
            #expect(!out.timedOut, "the first line never reached the sink before the command's end")
            #expect(out.stdout == Array("first\nsecond\n".utf8) && out.stderr == Array("third\n".utf8))
            let seen = chunks.withLock { $0 }
            #expect(seen.first?.0 == .stdout && String(decoding: seen.first?.1 ?? [], as: UTF8.self).hasPrefix("first"))
            #expect(seen.filter { $0.0 == .stdout }.flatMap(\.1) == out.stdout)
            #expect(seen.filter { $0.0 == .stderr }.flatMap(\.1) == out.stderr)
        }
    }

    @Test("the agent is PID 1; a sandbox sees only its own socket directory, which takes no files; it goes with the sandbox")
    func ownSocketOnly() async throws {
        try await DriverFixture.with(.container) { f in
            let key = TaskKey(session: "y2", task: "t")
            let driver = try #require(f.driver as? ContainerDriver)
            let result = await f.manager.execute(
                key, spec: SandboxSpec(), tool: "bash",
                input: Input.bash("tr '\\0' ' ' < /proc/1/cmdline; echo; ls -A /run/agentd; touch /run/agentd/x 2>/dev/null || echo refused; ls /.agentd"))
            #expect(result.output == "\(AgentHands.command(proxy: false).joined(separator: " ")) \nagent.sock\nrefused\nagent\n", "\(result.output)")
            try await f.expectAgentDirectorySealedUntilTheEnd(key, agent: driver.agent)
        }
    }

    @Test("an image without a shell runs commands given as argv; a shell command says what is missing")
    func imageWithoutShell() async throws {
        try await DriverFixture.with(.container) { f in
            let driver = try #require(f.driver as? ContainerDriver)
            let image = try await NoShellImage.make(driver.engine)
            var spec = SandboxSpec()
            spec.image = image
            let key = TaskKey(session: "y3", task: "t")
            do {
                let sandbox = try await f.driver.provision(spec, labels: [SandboxLabel.session: key.session, SandboxLabel.task: key.task])
                let echo = try await f.driver.run(["echo", "no", "shell"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
                #expect(echo == CommandOutput(stdout: Array("no shell\n".utf8), stderr: [], exitCode: 0))
                try await f.driver.writeFile("kept.txt", contents: Array("kept".utf8), in: sandbox)
                #expect(try await f.driver.readFile("kept.txt", in: sandbox) == Array("kept".utf8))
                // The bash tool needs sh: the result says it is missing, and the sandbox stays.
                let shell = try await f.driver.run(["sh", "-c", "echo hi"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
                #expect(shell.exitCode == 127 && String(decoding: shell.stderr, as: UTF8.self).contains("sh"), "\(shell)")
                #expect(try await f.driver.run(["echo", "still"], in: sandbox, workingDirectory: nil, timeout: .seconds(30)).stdout == Array("still\n".utf8))
                try await f.driver.destroy(sandbox)
            } catch {
                _ = try? await driver.engine.removeImage(image, force: true)
                throw error
            }
            _ = try? await driver.engine.removeImage(image, force: true)
        }
    }
}

/// A tiny image with no shell: `/bin/busybox` (static) and `/bin/echo` linking to it.
enum NoShellImage {
    static func make(_ engine: EngineClient) async throws -> String {
        let id = Components.testID()
        let root = "/tmp/agentd-noshell-\(id)"
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/bin", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: root + "/bin/busybox")
        try FileManager.default.createSymbolicLink(atPath: root + "/bin/echo", withDestinationPath: "busybox")
        let tarball = root + ".tar"
        defer { unlink(tarball) }
        guard try ChildProcess.spawn(["/bin/tar", "-C", root, "-cf", tarball, "."], environment: [:]).wait() == 0 else {
            throw FixtureMissing("tar could not pack \(root)")
        }
        let repository = "agentd-test-noshell"
        try await engine.importImage(tarball: tarball, repository: repository, tag: id)
        return repository + ":" + id
    }
}

/// Hostile agents: what a sandbox that took its agent over could answer.
@Suite("A hostile sandbox agent costs agentd an error string, never a hang")
struct HostileAgentTests {
    @Test("an agent that never answers, answers garbage or claims an oversized frame: an error string within the timeout, then fresh Hands", arguments: FakeAgent.Mode.allCases)
    func hostileAgent(_ mode: FakeAgent.Mode) async throws {
        try await DriverFixture.with(.container) { f in
            let key = TaskKey(session: "h-\(mode)", task: "t")
            var spec = SandboxSpec()
            spec.commandTimeout = .seconds(2)
            let sandbox = try await AgentConformanceTests.sandbox(f, key, spec: spec)
            let driver = try #require(f.driver as? ContainerDriver)
            // The socket's directory is root's once the agent answered: only the host can do this.
            let fake = try FakeAgent(path: driver.agent.socketPath(try #require(sandbox.agent)), mode: mode)
            defer { fake.stop() }
            let started = ContinuousClock.now
            let result = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo hi"))
            let elapsed = ContinuousClock.now - started
            #expect(result.isError && result.output.contains("agent") && result.output.contains("fresh sandbox"), "\(result.output)")
            // The command's 2 s, the client's grace after it, a moment to tell a dead agent apart.
            #expect(elapsed < .seconds(20), "answered after \(elapsed)")
            #expect(await f.manager.sandbox(of: key) == nil, "the sandbox was discarded")
            let again = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("echo back"))
            #expect(again == ToolResult(output: "back\n", isError: false, exitCode: 0))
        }
    }
}

/// A fake agent on a unix socket: accepts every connection and then stays silent, sends
/// garbage, or sends a frame header claiming 4 GiB — and never closes until stopped.
final class FakeAgent: @unchecked Sendable {
    // Invariant: `connections` is touched only by the accept thread until `stop`, which joins it.
    enum Mode: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case silent, garbage, oversized
        var testDescription: String { rawValue }
    }

    let listener: Int32
    let mode: Mode
    private var connections: [Int32] = []
    private let done = DispatchSemaphore(value: 0)

    init(path: String, mode: Mode) throws {
        self.mode = mode
        unlink(path)
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard listener >= 0, bound == 0, listen(listener, 16) == 0 else { throw FixtureMissing("cannot listen on \(path): errno \(errno)") }
        Thread.detachNewThread { [self] in
            while true {
                let connection = accept(listener, nil, nil)
                if connection < 0 { break }
                connections.append(connection)
                switch mode {
                case .silent: break
                case .garbage:
                    var noise = (0..<4096).map { _ in UInt8.random(in: 0...255) }
                    noise[4] = 0xEE  // no such message type
                    _ = noise.withUnsafeBytes { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                case .oversized:
                    let header: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0x01]
                    _ = header.withUnsafeBytes { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                }
            }
            done.signal()
        }
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        done.wait()
        close(listener)
        for c in connections { close(c) }
    }
}

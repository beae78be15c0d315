import EngineAPI
import Foundation
import Hands
import SandboxAgentClient
import Synchronization

/// Bulk throughput through the sandbox agent: 1 GiB of a command's output streamed out of a
/// warm container sandbox, and a 1 GiB file written into and read back from its workspace,
/// each against `cat` moving the same bytes on the host.
enum ThroughputBench {
    static let size = 1 << 30
    static let mib = Double(1 << 20)

    static func run(_ report: Reporter) async throws {
        let engine = try EngineClient.fromEnvironment()
        let instance = "bench" + String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let scratch = NSTemporaryDirectory() + "agentd-bench-throughput-" + instance
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let workspaces = try WorkspaceImages(directory: scratch + "/workspaces")
        let agent = try AgentHands(directory: scratch + "/agents")
        let driver = ContainerDriver(engine: engine, instance: instance, workspaces: workspaces, agent: agent)
        var spec = SandboxSpec()
        spec.diskBytes = 2 << 30  // room for the 1 GiB file
        let sandbox = try await driver.provision(spec, labels: [SandboxLabel.session: "bench", SandboxLabel.task: "throughput"])
        defer { Task { try? await driver.destroy(sandbox) } }
        let client = agent.client(try agent.name(of: sandbox))

        // 1. Output: `dd … | cat` on the host into a pipe read and counted here, vs the same
        // `dd` in the warm sandbox, streamed through the agent and counted. dd, not `head -c`:
        // the image's busybox head alone needs ~10 s for 1 GiB in a 1-CPU sandbox, and the
        // figure is about the stream, not the producer.
        let producer = "dd if=/dev/zero bs=1048576 count=\(size >> 20) 2>/dev/null"
        let hostOut = try hostPipe(["sh", "-c", producer + " | cat"])
        let counted = Atomic<Int>(0)
        let t0 = now()
        let result = try await client.exec(
            .shell(producer, timeout: .seconds(600), outputLimit: size), keepOutput: false
        ) { _, bytes in counted.add(bytes.count, ordering: .relaxed) }
        let streamed = now() - t0
        guard result.exitCode == 0, counted.load(ordering: .relaxed) == size, result.cutBytes == 0 else {
            throw RawUnixHTTP.Failure(description: "the streamed command delivered \(counted.load(ordering: .relaxed)) of \(size) bytes (exit \(result.exitCode), cut \(result.cutBytes))")
        }
        report.figure("raw.host.cat_pipe_1GiB", Double(size) / mib / hostOut, "MiB/s")
        report.figure("agent.exec.stream_1GiB", Double(size) / mib / streamed, "MiB/s")
        report.ratio("agent.exec.stream_1GiB.vs_cat", "agent.exec.stream_1GiB", over: "raw.host.cat_pipe_1GiB", goal: ">= 0.5")

        // 2. Files: `cat` copying a 1 GiB file on the host vs writing it into the workspace and
        // reading it back through the agent's streamed file API, 1 MiB pieces at a time.
        let source = scratch + "/source", copy = scratch + "/copy"
        _ = try hostPipe(["sh", "-c", "head -c \(size) /dev/zero > \(source)"])
        let hostCopy = try hostPipe(["sh", "-c", "cat \(source) > \(copy)"])
        try? FileManager.default.removeItem(atPath: copy)
        let path = ContainerDriver.workspace + "/big"
        let t1 = now()
        try await client.writeFile(path, chunks: Zeros(total: size, piece: 1 << 20), mode: nil, timeout: .seconds(600))
        let wrote = now() - t1
        let read = Atomic<Int>(0)
        let t2 = now()
        try await client.readFile(path, limit: size, timeout: .seconds(600)) { chunk in read.add(chunk.count, ordering: .relaxed) }
        let readTime = now() - t2
        guard read.load(ordering: .relaxed) == size else {
            throw RawUnixHTTP.Failure(description: "reading \(path) back gave \(read.load(ordering: .relaxed)) of \(size) bytes")
        }
        // For reference: the same 1 GiB written and read by a command inside the sandbox (its
        // workspace is a filesystem image of its own), as the agent measures the command.
        let inside = try await client.exec(
            .shell("dd if=/dev/zero of=\(path).dd bs=1048576 count=\(size >> 20) 2>/dev/null && cat \(path).dd > /dev/null", timeout: .seconds(600), outputLimit: 4096),
            output: nil)
        let insideRead = try await client.exec(.shell("cat \(path).dd > /dev/null", timeout: .seconds(600), outputLimit: 4096), output: nil)
        _ = try await client.exec(.shell("rm -f \(path).dd", timeout: .seconds(60), outputLimit: 4096), output: nil)
        let insideWrite = inside.duration - insideRead.duration
        report.figure("sandbox.dd_write_workspace_1GiB", Double(size) / mib / seconds(insideWrite), "MiB/s")
        report.figure("sandbox.cat_read_workspace_1GiB", Double(size) / mib / seconds(insideRead.duration), "MiB/s")
        report.figure("raw.host.cat_copy_1GiB", Double(size) / mib / hostCopy, "MiB/s")
        report.figure("agent.file.write_1GiB", Double(size) / mib / wrote, "MiB/s")
        report.figure("agent.file.read_1GiB", Double(size) / mib / readTime, "MiB/s")
        report.ratio("agent.file.write_1GiB.vs_cat", "agent.file.write_1GiB", over: "raw.host.cat_copy_1GiB", goal: ">= 0.5")
        report.ratio("agent.file.read_1GiB.vs_cat", "agent.file.read_1GiB", over: "raw.host.cat_copy_1GiB", goal: ">= 0.5")
        // The workspace's own filesystem bounds a write, whoever writes: the agent against `dd`
        // writing the same bytes from inside the sandbox.
        report.ratio("agent.file.write_1GiB.vs_sandbox_dd", "agent.file.write_1GiB", over: "sandbox.dd_write_workspace_1GiB", goal: "report (>= 1: the agent adds nothing to the workspace's own cost)")
        try await driver.destroy(sandbox)
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    /// Runs `argv` with its stdout a pipe that is read here (1 MiB at a time) and counted;
    /// returns the seconds until it ended.
    static func hostPipe(_ argv: [String]) throws -> Double {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = argv
        let pipe = Pipe()
        process.standardOutput = pipe
        let t0 = now()
        try process.run()
        let fd = pipe.fileHandleForReading.fileDescriptor
        try? pipe.fileHandleForWriting.close()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 { continue }
            if n < 0, errno == EINTR { continue }
            break
        }
        process.waitUntilExit()
        let t = now() - t0
        guard process.terminationStatus == 0 else { throw RawUnixHTTP.Failure(description: "\(argv) exited \(process.terminationStatus)") }
        return t
    }
}

/// `total` zero bytes as pieces of `piece` bytes.
private struct Zeros: AsyncSequence, Sendable {
    let total: Int
    let piece: Int
    struct AsyncIterator: AsyncIteratorProtocol {
        var left: Int
        let chunk: [UInt8]
        mutating func next() async -> [UInt8]? {
            guard left > 0 else { return nil }
            defer { left -= chunk.count }
            return left >= chunk.count ? chunk : Array(chunk[0..<left])
        }
    }
    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(left: total, chunk: [UInt8](repeating: 0, count: piece)) }
}

import Foundation
import SandboxAgentClient
import Testing
import TestSupport

/// A real agent binary running as a host process on a socket in a fresh temporary directory.
final class RunningAgent: @unchecked Sendable {
    let directory: String
    let socket: String
    let process: ChildProcess
    let client: SandboxAgentClient

    static var binary: String {
        get throws {
            let path = Components.buildProductsDirectory.appendingPathComponent("agentd-sandbox-agent").path
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw Components.Missing(description: "agentd-sandbox-agent is not built at \(path); build with --build-tests")
            }
            return path
        }
    }

    static func temporaryDirectory(_ prefix: String) throws -> String {
        let dir = "/tmp/\(prefix)-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    init(arguments: [String] = []) async throws {
        directory = try Self.temporaryDirectory("agentd-agent")
        socket = directory + "/agent.sock"
        process = try ChildProcess.spawn(
            [try Self.binary, "--socket", socket] + arguments, environment: ["PATH": "/usr/bin:/bin"], output: directory + "/log")
        client = SandboxAgentClient(socketPath: socket)
        // Wait for the agent to answer (the socket appears when it listens).
        let until = ContinuousClock.now + .seconds(20)
        while true {
            do {
                _ = try await client.health(timeout: .seconds(2))
                return
            } catch let error as SandboxAgentError where error.kind == .unreachable && ContinuousClock.now < until {
                if let status = process.exitStatusIfExited() {
                    throw Components.Missing(description: "the agent exited with status \(status): \(log)")
                }
                try await Task.sleep(for: .milliseconds(10))
            }
        }
    }

    var log: String { (try? String(contentsOfFile: directory + "/log", encoding: .utf8)) ?? "" }

    /// Stops the agent with SIGTERM and waits for it.
    func stop() async {
        process.signal(SIGTERM)
        let until = ContinuousClock.now + .seconds(10)
        while process.exitStatusIfExited() == nil && ContinuousClock.now < until {
            try? await Task.sleep(for: .milliseconds(10))
        }
        if process.exitStatusIfExited() == nil { process.signal(SIGKILL) }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Runs `body` with a fresh agent, stopping it afterwards.
    static func with<T>(_ body: (RunningAgent) async throws -> T) async throws -> T {
        let agent = try await RunningAgent()
        do {
            let result = try await body(agent)
            await agent.stop()
            return result
        } catch {
            await agent.stop()
            throw error
        }
    }
}

/// Whether a process exists (a zombie counts as gone: nothing runs).
func processRuns(_ pid: pid_t) -> Bool {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return false }
    guard let close = stat.lastIndex(of: ")") else { return false }
    let state = stat[stat.index(close, offsetBy: 2)]
    return state != "Z" && state != "X"
}

/// Waits (bounded) for `condition`, checking on each turn; returns its last value.
func eventually(within: Duration = .seconds(10), _ condition: () -> Bool) async -> Bool {
    let until = ContinuousClock.now + within
    while !condition() {
        if ContinuousClock.now >= until { return false }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return true
}

/// Processes whose parent is `pid`, with their state letter.
func children(of pid: pid_t) -> [(pid: pid_t, state: Character)] {
    guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
    var out: [(pid_t, Character)] = []
    for entry in entries {
        guard let child = pid_t(entry), let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { continue }
        let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
        guard fields.count > 2, pid_t(fields[1]) == pid, let state = fields[0].first else { continue }
        out.append((child, state))
    }
    return out
}

/// Peak resident memory of this process since `resetPeakMemory`, in bytes.
func peakMemory() -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
        return (Int(line.split(separator: " ")[1]) ?? 0) * 1024
    }
    return 0
}

func currentMemory() -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return (Int(line.split(separator: " ")[1]) ?? 0) * 1024
    }
    return 0
}

/// Resets the kernel's peak-RSS mark of this process (`/proc/self/clear_refs`, value 5).
func resetPeakMemory() {
    try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)
}

/// Deterministic pseudo-random bytes.
func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix(seed: seed)
    var out = [UInt8]()
    out.reserveCapacity(count)
    while out.count < count {
        var v = rng.next()
        for _ in 0..<8 where out.count < count {
            out.append(UInt8(truncatingIfNeeded: v))
            v >>= 8
        }
    }
    return out
}

/// A fake agent: a unix socket server that answers every connection with `script` (raw bytes),
/// after reading what the client sends first; with `hold`, it then keeps the connection open.
final class FakeAgent: @unchecked Sendable {
    let socket: String
    let directory: String
    private let listener: Int32

    init(script: [UInt8], then repeated: [UInt8] = [], times: Int = 0, hold: Bool = true) throws {
        directory = try RunningAgent.temporaryDirectory("agentd-fake")
        socket = directory + "/agent.sock"
        listener = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in socket.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(listener, 16) == 0 else { throw Components.Missing(description: "fake agent cannot listen") }
        let listening = self.listener
        Thread.detachNewThread {
            while true {
                let fd = accept(listening, nil, nil)
                if fd < 0 { return }
                Thread.detachNewThread {
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    _ = read(fd, &buffer, buffer.count)
                    var sent = FakeAgent.send(fd, script)
                    for _ in 0..<times where sent { sent = FakeAgent.send(fd, repeated) }
                    if hold {
                        // Keep the connection open (reading whatever comes) until the client closes it.
                        while read(fd, &buffer, buffer.count) > 0 {}
                    }
                    close(fd)
                }
            }
        }
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                if n <= 0 { return false }
                offset += n
            }
            return true
        }
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        try? FileManager.default.removeItem(atPath: directory)
    }

    static let hello = AgentMessage.hello(AgentHello(software: "fake")).frame()
}

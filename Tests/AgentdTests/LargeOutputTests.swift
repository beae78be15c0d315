import AgentdClient
import AgentdTestSupport
import Foundation
import Synchronization
import Testing

/// 1 GiB of output through a real agentd's streaming execute: the command runs to its end,
/// the output limit applies (and says how much it cut), and agentd's memory stays bounded.
@Suite("A command that prints 1 GiB, streamed")
struct LargeOutputTests {
    static let gib = 1 << 30
    /// The shipped policies' `hands.outputLimit` (default and offline-data): 1 MiB.
    static let outputLimit = 1 << 20
    /// agentd's peak RSS during the call may exceed its RSS before the call by at most this.
    /// What the call may legitimately hold: the output limit twice (the relay's kept copy and
    /// the result being rendered and journaled), the stream's 256 KiB buffer, a few 1 MiB agent
    /// frames in flight and NIO/allocator slack — a few MiB to a few tens of MiB. 150 MiB is
    /// far above that and far below the 1 GiB that holding the output would cost, so the
    /// check fails exactly when output is held (or copied) in proportion to its size.
    static let rssBoundKiB = 150 << 10

    /// `VmHWM:` or `VmRSS:` of `/proc/PID/status`, in KiB.
    static func statusKiB(_ pid: pid_t, _ field: String) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix(field) } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }

    /// Resets the process's peak RSS (`VmHWM`) to its current RSS (`clear_refs` value 5).
    static func resetPeak(_ pid: pid_t) -> Bool {
        (try? "5".write(toFile: "/proc/\(pid)/clear_refs", atomically: false, encoding: .utf8)) != nil
    }

    @Test("1 GiB of output: the result says how much was cut, the stream carries at most the output limit, agentd's peak RSS stays bounded", arguments: ["default", "offline-data"])
    func gibibyteOfOutput(policy: String) async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let pid = try #require(agentd.pid)
            let session = try #require(try await c.post("/v1/sessions", ["policy": policy])["id"] as? String)
            // Provision first, so that the figures below measure the output alone.
            let warm = try await c.execute(session: session, tool: "bash", input: Data(#"{"command": "true"}"#.utf8))
            #expect(!warm.isError, "\(warm.output)")

            let before = Self.statusKiB(pid, "VmRSS:")
            let reset = Self.resetPeak(pid)
            let delivered = Atomic<Int>(0)
            let dropped = Atomic<Int>(0)
            let command = #"{"command": "head -c \#(Self.gib) /dev/zero", "timeout_s": 600}"#
            let result = try await c.executeStreaming(session: session, tool: "bash", input: Data(command.utf8), timeout: .seconds(900)) { update in
                switch update {
                case .output(_, let bytes): delivered.add(bytes.count, ordering: .relaxed)
                case .dropped(let bytes, _): dropped.add(bytes, ordering: .relaxed)
                }
            }
            let peak = Self.statusKiB(pid, "VmHWM:")
            let streamed = delivered.load(ordering: .relaxed)
            let left = dropped.load(ordering: .relaxed)

            // The command ran to its end (exit 0); the limit cut the rest, and the result says how much.
            #expect(result.exitCode == 0)
            let cut = Self.gib - Self.outputLimit
            let tail = String(result.output.suffix(300).filter { $0 != "\0" })
            let failed = result.isError
            #expect(!failed, "\(tail)")
            // (The output, 1 MiB of NUL bytes, stays out of the expectation's own text: the
            // test output would stop at its first NUL.)
            let noted = result.output.hasSuffix("[output cut: \(cut) more bytes beyond the limit of 1 MiB]")
            #expect(noted, "the result ends with: \(tail)")
            // The stream: at most the output limit (what a slow reader missed is announced).
            #expect(streamed <= Self.outputLimit, "streamed \(streamed) bytes")
            #expect(streamed + left == Self.outputLimit, "streamed \(streamed) + dropped \(left) bytes")
            // agentd's memory: bounded, not proportional to the output.
            #expect(before > 0 && peak > 0)
            #expect(peak - before < Self.rssBoundKiB, "agentd's peak RSS \(peak) KiB vs \(before) KiB before the call (peak reset: \(reset))")
            print("LargeOutputTests[\(policy)]: agentd RSS before \(before) KiB, peak during the call \(peak) KiB (+\(peak - before) KiB); streamed \(streamed) B, dropped \(left) B")
        }
    }
}

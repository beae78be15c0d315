import AgentdClient
import AgentdTestSupport
import Foundation
import Synchronization
import Testing
import TestSupport

/// One tenant's long commands must not stall another tenant, nor the journal (issue 16, "one
/// tenant's long commands stall everyone"): a command in flight holds no shared thread. The
/// drivers run one after the other, to keep the load on a small CI machine to 40 commands.
@Suite("long commands do not stall other sessions", .serialized)
struct LongCommandsTests {
    /// More than the 32 threads of the pool that every exec used to hold.
    static let longCommands = 40

    /// How many long calls have returned.
    final class Counter: Sendable {
        let value = Atomic<Int>(0)
    }

    /// Runs `command` with the bash tool in `session` and returns the result object.
    static func bash(_ c: AgentdClient, _ session: String, _ command: String) async throws -> [String: Any] {
        let reply = try await c.post("/v1/sessions/\(session)/execute", ["tool": "bash", "input": ["command": command]])
        return reply["result"] as? [String: Any] ?? [:]
    }

    @Test(
        "with 40 long commands in flight, another session's echo, a snapshot and a verify all complete while every long command still runs",
        arguments: ["default", "offline-data"])
    func otherSessionsKeepGoing(policy: String) async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let busy = try #require(try await c.post("/v1/sessions", ["policy": policy])["id"] as? String)
            let quiet = try #require(try await c.post("/v1/sessions", ["policy": policy])["id"] as? String)
            @Sendable func bash(_ session: String, _ command: String) async throws -> [String: Any] {
                try await Self.bash(c, session, command)
            }
            // The busy task's sandbox exists before the long commands start.
            #expect(try await bash(busy, "echo ready")["output"] as? String == "ready\n")

            // Each long command leaves a marker, then sleeps far longer than this test runs
            // (ending the task below stops them all).
            let finished = Counter()
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<Self.longCommands {
                    group.addTask {
                        _ = try? await bash(busy, "touch started.\(i) && exec sleep 110")
                        finished.value.add(1, ordering: .relaxed)
                    }
                }
                // Every long command is running (its marker exists).
                let started = await eventually(.seconds(100)) {
                    let out = (try? await bash(busy, "ls started.* | wc -l"))?["output"] as? String
                    return out?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(Self.longCommands)"
                }
                #expect(started, "the \(Self.longCommands) long commands did not all start")

                // Another session: provisioning and an echo. The busy session's journal: a
                // snapshot and a verify.
                let echo = try await bash(quiet, "echo hello")
                #expect(echo["output"] as? String == "hello\n")
                let snapshot = try await c.get("/v1/sessions/\(busy)/snapshot")
                #expect(snapshot["events"] is [Any])
                let verify = try await c.get("/v1/sessions/\(busy)/verify")
                #expect(verify["intact"] as? Bool == true)
                // …all while every long command is still running.
                #expect(finished.value.load(ordering: .relaxed) == 0, "long commands ended before the other session's calls did")

                // Ending the task stops the long commands; their calls return.
                _ = try await c.post("/v1/sessions/\(busy)/tasks/main/end")
                try await group.waitForAll()
            }
            #expect(finished.value.load(ordering: .relaxed) == Self.longCommands)
        }
    }
}

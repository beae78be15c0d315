import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// agentd's sandbox limits end to end: a policy's `session.maxSandboxes` and the host's
/// `--max-sandboxes` answer a Brain with an error result naming the limit, and no sandbox is made.
@Suite("agentd: sandbox limits")
struct SandboxLimitTests {
    func execute(_ c: AgentdClient, _ session: String, task: String) async throws -> (output: String, isError: Bool) {
        let reply = try await c.post("/v1/sessions/\(session)/execute", ["tool": "bash", "input": ["command": "echo \(task)"], "task": task])
        let result = reply["result"] as? [String: Any] ?? [:]
        return (result["output"] as? String ?? "", (result["is_error"] as? Bool) ?? false)
    }

    @Test("session.maxSandboxes and --max-sandboxes are error results naming the limit; nothing beyond them is provisioned")
    func limits() async throws {
        let policies = try shippedPoliciesCopy { file, text in
            if file == "default.yaml" { text = text.replacingOccurrences(of: "session:\n", with: "session:\n  maxSandboxes: 1\n") }
        }
        try await withAgentd(policies: policies, arguments: ["--max-sandboxes", "2"]) { agentd in
            let c = agentd.client
            var sessions: [String] = []
            for _ in 0..<3 { sessions.append(try #require(try await c.post("/v1/sessions", ["policy": "default"])["id"] as? String)) }
            #expect(try await execute(c, sessions[0], task: "a") == ("a\n", false))
            let second = try await execute(c, sessions[0], task: "b")
            #expect(second.isError && second.output.contains("session.maxSandboxes: 1"), "\(second.output)")
            #expect(try await execute(c, sessions[1], task: "a") == ("a\n", false))
            let third = try await execute(c, sessions[2], task: "a")
            #expect(third.isError && third.output.contains("--max-sandboxes 2"), "\(third.output)")
            #expect(try await sandboxes(agentd.instance) == 2)
        }
    }

    @Test("a memory budget agentd cannot read stops it at start with a message saying what it takes")
    func badBudget() async throws {
        let agentd = try AgentdProcess()
        await #expect(throws: (any Error).self) { try await agentd.start(extraArguments: ["--sandbox-memory", "lots"]) }
        #expect(agentd.log.contains("--sandbox-memory") && agentd.log.contains("75%"), "\(agentd.log)")
    }
}

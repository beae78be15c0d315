import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// Exactly-once execution against the real agentd binary and the real engine: a crash in the
/// middle of a call, and a key reused for another call.
@Suite("agentd exactly once")
struct ExactlyOnceTests {
    func exec(_ c: AgentdClient, _ id: String, _ command: String, key: String) async throws -> AgentdClient.Reply {
        try await c.post("/v1/sessions/\(id)/execute", ["tool": "bash", "input": ["command": command], "idempotency_key": key])
    }

    func events(_ c: AgentdClient, _ id: String) async throws -> [[String: Any]] {
        (try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]]) ?? []
    }

    func payload(_ event: [String: Any]) -> [String: Any] { event["payload"] as? [String: Any] ?? [:] }

    @Test("kill -9 mid-call: a retry with the key is answered with the journaled outcome-unknown result, never re-run, across restarts")
    func killedMidCallIsNeverRerun() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let command = "echo started; sleep 120"
            let inFlight = Task { try? await exec(c, id, command, key: "long") }
            // The call is in flight once its intent is journaled and its sandbox is there.
            let started = try await eventually(.seconds(60)) {
                let all = try await events(c, id)
                return all.contains { $0["type"] as? String == "tool.intent" && payload($0)["idempotency_key"] as? String == "long" }
                    && all.contains { $0["type"] as? String == "hands.provisioned" }
            }
            #expect(started, "the call's intent and sandbox appeared")
            agentd.kill9()
            _ = await inFlight.value
            try await agentd.start()

            let retry = try await exec(c, id, command, key: "long")
            let result = retry["result"] as? [String: Any] ?? [:]
            #expect(retry["replayed"] as? Bool == true)
            #expect(result["is_error"] as? Bool == true)
            #expect((result["output"] as? String ?? "").contains("may or may not have run"), "\(result)")
            let resultSeq = try #require((retry["result_seq"] as? NSNumber)?.uint64Value)

            // Another restart: the same journaled answer, still not run again.
            agentd.stop()
            try await agentd.start()
            let again = try await exec(c, id, command, key: "long")
            #expect(again["replayed"] as? Bool == true && (again["result_seq"] as? NSNumber)?.uint64Value == resultSeq)
            let all = try await events(c, id)
            let intents = all.filter { $0["type"] as? String == "tool.intent" && payload($0)["idempotency_key"] as? String == "long" }
            #expect(intents.count == 1, "the call was never re-run")
            #expect(all.filter { $0["type"] as? String == "tool.interrupted" }.count == 1, "the outcome was journaled once")
            #expect(!all.contains { $0["type"] as? String == "tool.result" })

            // The key names that call: reusing it for another is a 422, and nothing runs.
            do {
                _ = try await exec(c, id, "echo something else", key: "long")
                Issue.record("a reused key with another command was accepted")
            } catch let e as AgentdClientError {
                #expect(e.status == 422 && e.code == "idempotency-conflict", "\(e.status) \(e.code): \(e.message)")
            }
        }
    }
}


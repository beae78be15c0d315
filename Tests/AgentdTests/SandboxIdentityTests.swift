import AgentdClient
import AgentdTestSupport
import EngineAPI
import Foundation
import Testing
import TestSupport

/// agentd's `--sandbox-uids` and `--workspace-reserve-mib`, end to end through the API.
@Suite("agentd: sandbox uids and the journal's disk reserve")
struct SandboxIdentityTests {
    /// Runs `body` with agentd started with `arguments`; stops it and removes its sandboxes.
    func withAgentd(_ arguments: [String], _ body: (AgentdProcess, AgentdClient) async throws -> Void) async throws {
        let agentd = try AgentdProcess()
        do {
            try await agentd.start(extraArguments: arguments)
            try await body(agentd, agentd.client)
        } catch {
            await Self.cleanup(agentd)
            throw error
        }
        await Self.cleanup(agentd)
    }

    static func cleanup(_ agentd: AgentdProcess) async {
        agentd.stop()
        guard let engine = try? await Components.engine(), !agentd.instance.isEmpty else { return }
        for c in (try? await engine.listContainers(labels: ["agentd.instance": agentd.instance])) ?? [] {
            _ = try? await engine.removeContainer(c.Id, force: true)
        }
    }

    func execute(_ c: AgentdClient, _ session: String, _ command: String) async throws -> (output: String, isError: Bool) {
        let reply = try await c.post("/v1/sessions/\(session)/execute", ["tool": "bash", "input": ["command": command]])
        let result = reply["result"] as? [String: Any] ?? [:]
        return (result["output"] as? String ?? "", (result["is_error"] as? Bool) ?? true)
    }

    @Test("a uid still used by a live sandbox is never handed out again; it is once that sandbox is gone")
    func uidsAreNeverShared() async throws {
        try await withAgentd(["--sandbox-uids", "650000-650000"]) { agentd, c in
            let first = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let second = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let a = try await execute(c, first, "id -u")
            #expect(a.output == "650000\n" && !a.isError, "\(a.output)")
            let refused = try await execute(c, second, "id -u")
            #expect(refused.isError)
            #expect(refused.output.contains("all 1 sandbox uids (650000-650000) are in use"), "\(refused.output)")
            _ = try await c.post("/v1/sessions/\(first)/tasks/main/end", [:])
            let b = try await execute(c, second, "id -u")
            #expect(b.output == "650000\n" && !b.isError, "\(b.output)")
        }
    }

    @Test("a workspace that would eat into the journal's reserve is refused with a clear error; nothing is made")
    func reserveRefusesWorkspaces() async throws {
        // A reserve larger than any test host's disk: every workspace would cross it.
        try await withAgentd(["--workspace-reserve-mib", String(1 << 30)]) { agentd, c in
            let session = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let result = try await execute(c, session, "echo hi")
            #expect(result.isError)
            #expect(result.output.contains("refusing to make a 1 GiB workspace"), "\(result.output)")
            #expect(result.output.contains("kept for the journal"), "\(result.output)")
            #expect(try await sandboxes(agentd.instance) == 0)
            let images = (try? FileManager.default.contentsOfDirectory(atPath: agentd.stateDir + "/hands/workspaces/images")) ?? []
            #expect(images.isEmpty, "\(images)")
        }
    }

    @Test("--sandbox-uids with host ids is refused at start")
    func badRangeRefused() async throws {
        let agentd = try AgentdProcess()
        defer { agentd.stop() }
        do {
            try await agentd.start(extraArguments: ["--sandbox-uids", "1000-2000"])
            Issue.record("agentd started with a uid range of host users")
        } catch {
            #expect(agentd.log.contains("65536-4294967294"), "\(agentd.log)")
        }
    }
}

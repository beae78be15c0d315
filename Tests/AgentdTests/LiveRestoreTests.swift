import AgentdClient
import AgentdTestSupport
import Foundation
import SystemdBus
import Testing
import TestSupport

/// Live restore against the real agentd binary, engine and systemd manager: a kill -9 while
/// tasks are live keeps their sandboxes and workspaces.
@Suite("agentd live restore")
struct LiveRestoreTests {
    func exec(_ c: AgentdClient, _ id: String, _ tool: String, _ input: [String: Any], task: String, key: String? = nil) async throws -> AgentdClient.Reply {
        var body: [String: Any] = ["tool": tool, "input": input, "task": task]
        if let key { body["idempotency_key"] = key }
        return try await c.post("/v1/sessions/\(id)/execute", body)
    }

    func output(_ reply: AgentdClient.Reply) -> String { (reply["result"] as? [String: Any])?["output"] as? String ?? "" }

    func events(_ c: AgentdClient, _ id: String) async throws -> [[String: Any]] {
        (try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]]) ?? []
    }

    func payload(_ event: [String: Any]) -> [String: Any] { event["payload"] as? [String: Any] ?? [:] }

    /// Active sandbox slices of `instance` on the systemd manager (`…_<random>.slice`; the
    /// per-session slices around them have no `_`).
    func slices(_ manager: SystemdManager, _ instance: String) async throws -> Int {
        try await manager.listUnits(matching: ["agentd-\(instance)-*.slice"], states: ["active", "activating"]).filter { $0.name.contains("_") }.count
    }

    @Test("kill -9 with three live tasks, one running `sleep 30`: after the restart the workspaces are intact, the cut call is outcome unknown and never re-run, nothing leaks once the tasks end")
    func killNineKeepsLiveTasks() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        try await withAgentd { agentd in
            let c = agentd.client
            let containers = try #require(try await c.post("/v1/sessions", ["policy": "default"])["id"] as? String)
            let units = try #require(try await c.post("/v1/sessions", ["policy": "offline-data"])["id"] as? String)
            let tasks = [(containers, "a"), (containers, "b"), (units, "u")]
            for (session, task) in tasks {
                let wrote = try await exec(c, session, "write_file", ["path": "notes/keep.txt", "content": "kept by \(task)\n"], task: task)
                #expect(output(wrote).hasPrefix("wrote "), "\(wrote)")
            }
            #expect(try await sandboxes(agentd.instance) == 2)
            #expect(try await slices(manager, agentd.instance) == 1)

            // Task a runs a long command when agentd dies.
            let command = "echo started >> notes/runs; sleep 30"
            let inFlight = Task { try? await exec(c, containers, "bash", ["command": command], task: "a", key: "long") }
            let started = try await eventually(.seconds(60)) {
                try await events(c, containers).contains { $0["type"] as? String == "tool.intent" && payload($0)["idempotency_key"] as? String == "long" }
            }
            #expect(started, "the long call's intent was journaled")
            // The command runs once its line is in the workspace.
            let running = try await eventually(.seconds(30)) {
                output(try await exec(c, containers, "read_file", ["path": "notes/runs"], task: "a")) == "started\n"
            }
            #expect(running, "the long command started")
            agentd.kill9()
            _ = await inFlight.value
            #expect(try await sandboxes(agentd.instance) == 2, "a crash leaves the sandboxes running")
            try await agentd.start()

            // Every task's sandbox was adopted, with its workspace.
            for (session, task) in tasks {
                let adopted = try await events(c, session).contains { $0["type"] as? String == "hands.adopted" && payload($0)["task"] as? String == task }
                #expect(adopted, "hands.adopted journaled for \(task)")
                let read = try await exec(c, session, "read_file", ["path": "notes/keep.txt"], task: task)
                #expect(output(read) == "kept by \(task)\n", "\(task): \(read)")
            }
            #expect(try await sandboxes(agentd.instance) == 2, "no sandbox was provisioned anew")
            #expect(try await slices(manager, agentd.instance) == 1)

            // The cut call: outcome unknown, journaled once, never run again.
            let retry = try await exec(c, containers, "bash", ["command": command], task: "a", key: "long")
            #expect(retry["replayed"] as? Bool == true)
            #expect(output(retry).contains("may or may not have run"), "\(retry)")
            let intents = try await events(c, containers).filter {
                $0["type"] as? String == "tool.intent" && payload($0)["idempotency_key"] as? String == "long"
            }
            #expect(intents.count == 1)
            let runs = try await exec(c, containers, "read_file", ["path": "notes/runs"], task: "a")
            #expect(output(runs) == "started\n", "the command ran once: \(runs)")

            // Nothing leaks once the tasks end.
            for (session, task) in tasks {
                let end = try await c.post("/v1/sessions/\(session)/tasks/\(task)/end", [:])
                #expect(end["released_sandbox"] as? Bool == true, "\(task): \(end)")
            }
            #expect(try await sandboxes(agentd.instance) == 0)
            #expect(try await slices(manager, agentd.instance) == 0)
        }
    }
}

import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// agentd over its real socket, with real Podman: the demo's story, crashes, bad input.
@Suite("agentd end to end")
struct EndToEndTests {
    func exec(_ c: AgentdClient, _ id: String, _ tool: String, _ input: [String: Any], epoch: UInt64? = nil, key: String? = nil, task: String = "main") async throws -> AgentdClient.Reply {
        var body: [String: Any] = ["tool": tool, "input": input, "task": task]
        if let epoch { body["epoch"] = epoch }
        if let key { body["idempotency_key"] = key }
        return try await c.post("/v1/sessions/\(id)/execute", body)
    }

    func result(_ reply: AgentdClient.Reply) -> (output: String, isError: Bool) {
        let r = reply["result"] as? [String: Any] ?? [:]
        return (r["output"] as? String ?? "", (r["is_error"] as? Bool) ?? false)
    }

    func events(_ c: AgentdClient, _ id: String) async throws -> [[String: Any]] {
        (try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]]) ?? []
    }

    @Test("the demo's story: on-demand Hands, kill -9 half-way, wake, fencing, idempotent retry, error strings, timeline, verify")
    func story() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", ["policy": "default"])["id"] as? String)
            #expect(try await sandboxes(agentd.instance, session: id) == 0)
            let epoch1 = try #require((try await c.post("/v1/sessions/\(id)/wake")["epoch"] as? NSNumber)?.uint64Value)

            let write = try await exec(c, id, "write_file", ["path": "app/hello.sh", "content": "echo hello from $1\n"], epoch: epoch1, key: "w1")
            #expect(result(write).output == "wrote 19 bytes to app/hello.sh")
            #expect(try await sandboxes(agentd.instance, session: id) == 1)
            let run = try await exec(c, id, "bash", ["command": "sh app/hello.sh agentd"], epoch: epoch1, key: "r1")
            #expect(result(run).output == "hello from agentd\n")

            // Crash: the task is still live, so a restart adopts its sandboxes (workspace and
            // all) and the journal is intact.
            agentd.kill9()
            #expect(try await sandboxes(agentd.instance, session: id) == 1)
            try await agentd.start()
            #expect(try await sandboxes(agentd.instance, session: id) == 1)

            let epoch2 = try #require((try await c.post("/v1/sessions/\(id)/wake")["epoch"] as? NSNumber)?.uint64Value)
            #expect(epoch2 == epoch1 + 1)
            let stale = await #expect(throws: AgentdClientError.self) {
                _ = try await self.exec(c, id, "bash", ["command": "echo stale"], epoch: epoch1)
            }
            #expect(stale?.status == 409)
            #expect(stale?.message.contains("newer Brain") == true)

            // The retried call is answered from the journal, not run again.
            let retried = try await exec(c, id, "bash", ["command": "sh app/hello.sh agentd"], epoch: epoch2, key: "r1")
            #expect(retried["replayed"] as? Bool == true)
            #expect(result(retried).output == "hello from agentd\n")

            // The workspace survived the crash.
            let kept = try await exec(c, id, "bash", ["command": "sh app/hello.sh again"], epoch: epoch2)
            #expect(result(kept).output == "hello from again\n")

            let failing = try await exec(c, id, "bash", ["command": "sh app/missing.sh"], epoch: epoch2)
            #expect(result(failing).isError)
            #expect(result(failing).output.contains("No such file"))

            let end = try await c.post("/v1/sessions/\(id)/tasks/main/end", ["epoch": epoch2])
            #expect(end["released_sandbox"] as? Bool == true)
            #expect(try await sandboxes(agentd.instance, session: id) == 0)

            let types = try await events(c, id).compactMap { $0["type"] as? String }
            #expect(types.first == "session.created")
            #expect(types.filter { $0 == "agentd.lease" }.count == 2)
            #expect(types.contains("hands.provisioned"))
            #expect(types.contains("hands.released"))
            #expect(types.last == "hands.released" || types.last == "task.ended")
            // Every intent has its result (the crash came between calls, not during one).
            #expect(types.filter { $0 == "tool.intent" }.count == types.filter { $0 == "tool.result" }.count)

            let verify = try await c.get("/v1/sessions/\(id)/verify")
            #expect(verify["intact"] as? Bool == true)
            #expect((verify["verified_records"] as? NSNumber)?.intValue == types.count)
        }
    }

    @Test("kill -9 during concurrent executes: every acknowledged result survives, nothing is orphaned, the cut calls are marked interrupted")
    func crashDuringExecutes() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let acknowledged = Acknowledged()
            await withTaskGroup(of: Void.self) { group in
                for t in 0..<6 {
                    group.addTask {
                        for i in 0..<50 {
                            // Short calls on some tasks, slow ones on others: the kill lands mid-flight.
                            let command = t % 2 == 0 ? "echo t\(t)-\(i)" : "sleep 0.4; echo t\(t)-\(i)"
                            guard let reply = try? await self.exec(c, id, "bash", ["command": command], task: "t\(t)") else { return }
                            if let seq = (reply["result_seq"] as? NSNumber)?.uint64Value { await acknowledged.add(seq, "t\(t)-\(i)\n") }
                        }
                    }
                }
                group.addTask {
                    // Mid-flight: once a dozen calls were acknowledged (not after a fixed pause,
                    // which on a loaded machine may come before the sandboxes are up).
                    _ = await eventually(.seconds(60)) { await acknowledged.all.count >= 12 }
                    agentd.kill9()
                }
            }
            let acked = await acknowledged.all
            #expect(acked.count > 5, "some calls were acknowledged before the kill")
            try await agentd.start()
            // The six tasks are live: their sandboxes are adopted, none is left over or doubled.
            #expect(try await sandboxes(agentd.instance) <= 6, "the restart kept one sandbox per live task at most")
            let adopted = try await events(c, id).filter { $0["type"] as? String == "hands.adopted" }.count
            #expect(adopted == (try await sandboxes(agentd.instance)), "every sandbox left is an adopted one")
            // Reading the session rebuilds its state: intents without a result get marked.
            _ = try await c.get("/v1/sessions/\(id)")
            let all = try await events(c, id)
            var results: [UInt64: String] = [:]
            for e in all where e["type"] as? String == "tool.result" {
                let p = e["payload"] as? [String: Any] ?? [:]
                results[(e["seq"] as? NSNumber)!.uint64Value] = p["output"] as? String
            }
            for (seq, output) in acked { #expect(results[seq] == output, "acknowledged result #\(seq) is in the journal") }
            let intents = all.filter { $0["type"] as? String == "tool.intent" }.count
            let interrupted = all.filter { $0["type"] as? String == "tool.interrupted" }.count
            #expect(intents == results.count + interrupted)
            let verify = try await c.get("/v1/sessions/\(id)/verify")
            #expect(verify["intact"] as? Bool == true)
            // And the session works again.
            let after = try await exec(c, id, "bash", ["command": "echo alive"], task: "t0")
            #expect(result(after).output == "alive\n")
        }
    }

    @Test("bad input gets a clear 4xx JSON error and stores nothing")
    func badInput() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let before = (try await c.get("/v1/sessions/\(id)")["last_seq"] as? NSNumber)?.intValue

            func status(_ method: String, _ path: String, _ body: String?) async -> (Int, String) {
                do {
                    let r = try await c.call(method, path, body: body.map { Data($0.utf8) })
                    return (r.status, "")
                } catch let e as AgentdClientError {
                    return (e.status, e.message)
                } catch {
                    return (-1, "\(error)")
                }
            }
            let malformed = await status("POST", "/v1/sessions/\(id)/execute", "{\"tool\": ")
            #expect(malformed.0 == 400 && malformed.1.contains("not valid JSON"))
            let unknownTool = await status("POST", "/v1/sessions/\(id)/execute", #"{"tool": "rm_rf", "input": {}}"#)
            #expect(unknownTool.0 == 400 && unknownTool.1.contains("unknown tool 'rm_rf'"))
            let badToolInput = await status("POST", "/v1/sessions/\(id)/execute", #"{"tool": "bash", "input": {"cmd": "ls"}}"#)
            #expect(badToolInput.0 == 400 && badToolInput.1.contains("missing field 'command'"))
            let badID = await status("GET", "/v1/sessions/..%2Fetc", nil)
            #expect(badID.0 == 400)
            let missing = await status("GET", "/v1/sessions/no-such-session", nil)
            #expect(missing.0 == 404)
            let oversized = await status("POST", "/v1/sessions/\(id)/execute", "{\"tool\": \"bash\", \"input\": {\"command\": \"" + String(repeating: "x", count: 9 << 20) + "\"}}")
            #expect(oversized.0 == 413)
            let wrongEpoch = await status("POST", "/v1/sessions/\(id)/execute", #"{"tool": "bash", "input": {"command": "true"}, "epoch": 7}"#)
            #expect(wrongEpoch.0 == 400 && wrongEpoch.1.contains("epoch 7"))
            let badEpochType = await status("POST", "/v1/sessions/\(id)/execute", #"{"tool": "bash", "input": {"command": "true"}, "epoch": "x"}"#)
            #expect(badEpochType.0 == 400)
            let noRoute = await status("GET", "/v1/nothing", nil)
            #expect(noRoute.0 == 404)
            let wrongMethod = await status("DELETE", "/v1/sessions", nil)
            #expect(wrongMethod.0 == 405)
            let unknownPolicy = await status("POST", "/v1/sessions", #"{"policy": "nope"}"#)
            #expect(unknownPolicy.0 == 404 && unknownPolicy.1.contains("no policy named 'nope'"))

            let after = (try await c.get("/v1/sessions/\(id)")["last_seq"] as? NSNumber)?.intValue
            #expect(before == after, "nothing was journaled by the refused requests")
            #expect(try await sandboxes(agentd.instance, session: id) == 0)
            // agentd is still up.
            #expect(try await c.get("/v1/health")["status"] as? String == "ok")
        }
    }

    @Test("events --follow streams new events live")
    func follow() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let seen = Acknowledged()
            let follower = Task {
                try await c.follow("/v1/sessions/\(id)/events?follow=true") { type, _ in
                    Task { await seen.add(0, type) }
                }
            }
            _ = try await exec(c, id, "bash", ["command": "echo live"])
            var types: [String] = []
            for _ in 0..<100 {
                types = await seen.all.map(\.1)
                if types.contains("tool.result") { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            follower.cancel()
            #expect(types.contains("session.created"))
            #expect(types.contains("tool.intent"))
            #expect(types.contains("tool.result"))
        }
    }

    @Test("SIGTERM: the execute in flight finishes and is answered, agentd exits 0, no sandbox stays, the journal has the result")
    func gracefulStop() async throws {
        let agentd = try AgentdProcess()
        try await agentd.start()
        let c = agentd.client
        let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
        _ = try await exec(c, id, "bash", ["command": "echo warm"])
        let slow = Task { try await exec(c, id, "bash", ["command": "sleep 2; echo finished after the stop began"], key: "slow") }
        // Stop once the call is running (its intent is journaled).
        #expect(await eventually(.seconds(20)) { ((try? await events(c, id)) ?? []).filter { $0["type"] as? String == "tool.intent" }.count == 2 })
        let stopping = Task.detached { agentd.stop() }
        let answer = try await slow.value
        #expect(result(answer).output == "finished after the stop began\n")
        #expect(await stopping.value == 0, "agentd's exit status; log: \(agentd.log)")
        #expect(try await sandboxes(agentd.instance) == 0)

        try await agentd.start()
        defer { agentd.stop() }
        let all = try await events(c, id)
        #expect(all.filter { $0["type"] as? String == "tool.result" }.count == 2)
        #expect(!all.contains { $0["type"] as? String == "tool.interrupted" })
        // The same key after the restart: answered from the journal, not run again.
        let again = try await exec(c, id, "bash", ["command": "sleep 2; echo finished after the stop began"], key: "slow")
        #expect(again["replayed"] as? Bool == true)
    }

    @Test("/metrics shows sessions, sandboxes, execute latency and the journal's fsync latency and batch sizes")
    func metrics() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            _ = try await exec(c, id, "bash", ["command": "echo measured"])
            _ = try await exec(c, id, "bash", ["command": "exit 3"])
            let text = try await c.text("/metrics")
            func value(_ series: String) -> Double? {
                text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
            }
            #expect(value("agentd_sessions") == 1)
            #expect(value("agentd_sandboxes_live") == 1)
            #expect(value("agentd_execute_seconds_count") == 2)
            #expect(value("agentd_execute_errors_total") == 1)
            // The session's events so far: created, two intents, a provisioning, two results.
            let records = try #require(value("agentd_journal_records_total"))
            let syncs = try #require(value("agentd_journal_syncs_total"))
            #expect(records >= 6 && syncs >= 1 && syncs <= records)
            #expect(value("agentd_journal_sync_seconds_count") == syncs)
            #expect((value("agentd_journal_sync_seconds_sum") ?? 0) > 0)
            #expect(value("agentd_journal_batch_records_sum") == records)
            #expect(value("agentd_journal_batch_records_bucket{le=\"+Inf\"}") == syncs)
            #expect(text.contains("# TYPE agentd_journal_sync_seconds histogram"))
        }
    }
}

actor Acknowledged {
    private(set) var all: [(UInt64, String)] = []
    func add(_ seq: UInt64, _ value: String) { all.append((seq, value)) }
}

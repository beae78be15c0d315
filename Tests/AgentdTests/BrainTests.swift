import AgentdClient
import AgentdTestSupport
import Brain
import Foundation
import Testing
import TestSupport

/// `agentctl run` as a user runs it: a Brain process driving a real agentd with real Podman
/// sandboxes, its model a fake Messages API server on loopback that checks every request the
/// way the real API does and plays back the test's turns.
@Suite("agentctl run: a Brain")
struct BrainTests {
    @Test("the model writes a file, runs it and answers: the sandbox's output reaches the model, the journal has each call under its tool_use id, a 529 is retried after its retry-after, the key appears nowhere")
    func writeRunAnswer() async throws {
        let key = Self.makeKey()
        let script: [FakeMessagesAPI.Reply] = [
            // The policy's backoff is 1 s; the API asks for 2.
            .error(529, "overloaded_error", "Overloaded").with(header: "retry-after", "2"),
            .turn([text("I'll write the script."), toolUse("toolu_01write", "write_file", ["path": "hello.sh", "content": "echo hello from $1\n"])], stopReason: "tool_use"),
            .turn([toolUse("toolu_02bash", "bash", ["command": "sh hello.sh the-sandbox"])], stopReason: "tool_use"),
            .turn([text("The script printed: hello from the-sandbox")], stopReason: "end_turn"),
        ]
        try await FakeMessagesAPI.with(key: key, script: script) { api in
            try await withAgentd { agentd in
                let run = try await runAgentctl(
                    ["run", "--model-url", api.url, "--model", "claude-test", "Write hello.sh and run it"], socket: agentd.socket,
                    environment: ["ANTHROPIC_API_KEY": key])
                #expect(run.status == 0, "\(run.stderr)")
                #expect(run.stdout == "The script printed: hello from the-sandbox\n")
                #expect(api.violations.isEmpty, "requests the real API would refuse: \(api.violations)")

                let requests = api.requests
                try #require(requests.count == 4, "the 529, then one request per turn: \(requests.count)")
                for request in requests {
                    #expect(request.headers["x-api-key"] == key)
                    #expect(request.headers["anthropic-version"] == "2023-06-01")
                }
                #expect(requests[1].body == requests[0].body, "the overloaded request was sent again as it was")
                #expect(requests[1].received - requests[0].received >= .milliseconds(1900), "retried after the API's retry-after of 2 s")
                #expect(requests[0].json["model"] as? String == "claude-test")
                let tools = (requests[0].json["tools"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                #expect(Set(tools) == ["bash", "read_file", "write_file", "list_files"])
                #expect(requests[0].messages.count == 1)
                #expect(toolResults(requests[2]) == [ToolResultSeen(id: "toolu_01write", content: "wrote 19 bytes to hello.sh", isError: false)])
                #expect(toolResults(requests[3]) == [ToolResultSeen(id: "toolu_02bash", content: "hello from the-sandbox\n", isError: false)],
                    "the sandbox's real output went back to the model")

                let id = try await onlySession(agentd)
                let events = try await agentd.client.get(AgentdClient.sessionPath(id) + "/events")
                let intents = Self.intents(events)
                #expect(intents.map(\.tool) == ["write_file", "bash"])
                #expect(intents.map(\.key) == ["toolu_01write", "toolu_02bash"], "each call's idempotency key is its tool_use id")
                #expect(!events.text.contains(key), "the key is in no journal event")
                #expect(!run.stdout.contains(key) && !run.stderr.contains(key), "the key is not printed")
                #expect(run.stderr.contains("529 overloaded_error"), "the retry is reported: \(run.stderr)")
                #expect(run.stderr.contains(#"bash {"command":"sh hello.sh the-sandbox"} → ok"#), "\(run.stderr)")
                // The command's output line was shown as progress as it came, before the call's own line.
                let progress = try #require(run.stderr.range(of: "run:   │ hello from the-sandbox\n"), "\(run.stderr)")
                let done = try #require(run.stderr.range(of: #"bash {"command":"sh hello.sh the-sandbox"} → ok"#))
                #expect(progress.lowerBound < done.lowerBound)
            }
        }
    }

    @Test("a Brain killed while the model thinks is resumed by another: no call runs twice, the old lease is refused, calls whose results were lost are answered from the journal, a finished conversation is not sent again")
    func killAndResume() async throws {
        let key = Self.makeKey()
        let thinking = FakeMessagesAPI.Gate()
        let answer = "The log has one line."
        let script: [FakeMessagesAPI.Reply] = [
            .turn(
                [
                    toolUse("toolu_01note", "write_file", ["path": "note.txt", "content": "started\n"]),
                    toolUse("toolu_02log", "bash", ["command": "echo ran >> runs.log && wc -l < runs.log"]),
                ], stopReason: "tool_use"),
            // The first Brain's second request waits here until it is killed.
            .turn([text("never delivered")], stopReason: "end_turn").held(by: thinking),
            .turn([text(answer)], stopReason: "end_turn"),
            .turn([text(answer)], stopReason: "end_turn"),
        ]
        try await FakeMessagesAPI.with(key: key, script: script) { api in
            try await withAgentd { agentd in
                let environment = agentctlEnvironment(socket: agentd.socket, adding: ["ANTHROPIC_API_KEY": key])
                let brainLog = "/tmp/agentd-brain-\(Components.testID()).log"
                let brain = try ChildProcess.spawn(
                    [try agentctlBinary(), "run", "--model-url", api.url, "Log a line, then tell me how many lines the log has"],
                    environment: environment, output: brainLog)
                var reaped = false
                defer { if !reaped { brain.signal(SIGKILL); brain.wait() } }
                let thought = await api.awaitRequests(2)
                try #require(thought, "the first Brain did not ask the model a second time; its output: \((try? String(contentsOfFile: brainLog, encoding: .utf8)) ?? "")")
                let id = try await onlySession(agentd)
                let session = AgentdClient.sessionPath(id)
                let oldEpoch = try #require((try await agentd.client.get(session)["lease_epoch"] as? NSNumber)?.uint64Value)
                brain.signal(SIGKILL)
                brain.wait()
                reaped = true

                let resumed = try await runAgentctl(["run", "--session", id, "--model-url", api.url], socket: agentd.socket, environment: ["ANTHROPIC_API_KEY": key])
                #expect(resumed.status == 0, "\(resumed.stderr)")
                #expect(resumed.stdout == answer + "\n")
                let requests = api.requests
                try #require(requests.count == 3)
                #expect(requests[2].body == requests[1].body, "the new Brain continued exactly where the old one was")
                #expect(toolResults(requests[2]).map(\.content) == ["wrote 8 bytes to note.txt", "1\n"])
                #expect(try await logLines(agentd, id) == 1, "the bash call ran exactly once")
                let newEpoch = try #require((try await agentd.client.get(session)["lease_epoch"] as? NSNumber)?.uint64Value)
                #expect(newEpoch > oldEpoch)
                let stale = await #expect(throws: AgentdClientError.self) {
                    try await agentd.client.execute(session: id, tool: "bash", input: Data(#"{"command": "echo late"}"#.utf8), epoch: oldEpoch)
                }
                #expect(stale?.status == 409, "the killed Brain's epoch is refused")

                // A Brain that died after its tools ran but before it stored their results:
                // its checkpoint ends with the turn that asked for them.
                let stored = try #require((try await agentd.client.get(session + "/snapshot")["checkpoint"] as? [String: Any])?["state"] as? [String: Any])
                let messages = try #require(stored["messages"] as? [[String: Any]])
                var truncated = stored
                truncated["messages"] = Array(messages.prefix(2))
                let epoch = try #require((try await agentd.client.post(session + "/wake")["epoch"] as? NSNumber)?.uint64Value)
                _ = try await agentd.client.post(session + "/checkpoint", ["state": truncated, "epoch": epoch])
                let replayed = try await runAgentctl(["run", "--session", id, "--model-url", api.url], socket: agentd.socket, environment: ["ANTHROPIC_API_KEY": key])
                #expect(replayed.status == 0, "\(replayed.stderr)")
                #expect(replayed.stdout == answer + "\n")
                #expect(replayed.stderr.components(separatedBy: "already done").count == 3, "both calls were answered from the journal: \(replayed.stderr)")
                #expect(try await logLines(agentd, id) == 1, "the bash call still ran exactly once")
                let intents = Self.intents(try await agentd.client.get(session + "/events"))
                #expect(intents.filter { $0.tool == "bash" }.count == 1)
                #expect(api.requests.last?.body == requests[2].body, "the model saw the same results as before")

                // The conversation is finished: resuming it prints the answer without asking the model.
                let count = api.requests.count
                let finished = try await runAgentctl(["run", "--session", id, "--model-url", api.url], socket: agentd.socket, environment: ["ANTHROPIC_API_KEY": key])
                #expect(finished.status == 0, "\(finished.stderr)")
                #expect(finished.stdout == answer + "\n")
                #expect(api.requests.count == count, "a finished conversation is not sent to the model again")
                #expect(api.violations.isEmpty, "\(api.violations)")
            }
        }
    }

    @Test("no key, a key the API refuses, an unknown session: exit 1 saying what to do, the key never printed")
    func refusals() async throws {
        let key = Self.makeKey()
        try await FakeMessagesAPI.with(key: key, script: []) { api in
            try await withAgentd { agentd in
                let noKey = try await runAgentctl(["run", "--model-url", api.url, "hello"], socket: agentd.socket, environment: ["ANTHROPIC_API_KEY": ""])
                #expect(noKey.status == 1)
                #expect(noKey.stderr.contains("set ANTHROPIC_API_KEY"), "\(noKey.stderr)")
                #expect((try await agentd.client.get("/v1/sessions")["sessions"] as? [Any])?.isEmpty == true, "no session was made")
                #expect(api.requests.isEmpty)

                let wrong = Self.makeKey()
                let refused = try await runAgentctl(["run", "--model-url", api.url, "hello"], socket: agentd.socket, environment: ["ANTHROPIC_API_KEY": wrong])
                #expect(refused.status == 1)
                #expect(refused.stderr.contains("401 authentication_error") && refused.stderr.contains("check ANTHROPIC_API_KEY"), "\(refused.stderr)")
                #expect(!refused.stderr.contains(wrong) && !refused.stdout.contains(wrong), "the key is not printed")
                #expect(api.requests.count == 1, "a refused key is not retried")

                let unknown = try await runAgentctl(
                    ["run", "--session", "no-such-session", "--model-url", api.url], socket: agentd.socket, environment: ["ANTHROPIC_API_KEY": key])
                #expect(unknown.status == 1)
                #expect(unknown.stderr.contains("no session no-such-session"), "\(unknown.stderr)")
                #expect(api.requests.count == 1)
            }
        }
    }

    @Test("the API key prints as APIKey(redacted): description, debugDescription, interpolation, dump")
    func keyRedactsItself() throws {
        let secret = Self.makeKey()
        let key = try #require(APIKey(secret))
        var dumped = ""
        dump(key, to: &dumped)
        for shown in [key.description, key.debugDescription, "\(key)", String(describing: key), String(reflecting: key), dumped] {
            #expect(!shown.contains(secret))
            #expect(shown.contains("APIKey(redacted)"), "\(shown)")
        }
        #expect(APIKey("") == nil && APIKey(nil) == nil, "an empty ANTHROPIC_API_KEY counts as unset")
    }

    // MARK: - helpers

    /// A key shaped like a real one and random per test, so that finding it anywhere but in
    /// `x-api-key` means it leaked.
    static func makeKey() -> String { "sk-ant-api03-\(Components.testID())-\(Components.testID())" }

    /// The `tool.intent` events: tool and idempotency key.
    static func intents(_ events: AgentdClient.Reply) -> [(tool: String, key: String)] {
        ((events["events"] as? [[String: Any]]) ?? []).filter { $0["type"] as? String == "tool.intent" }.compactMap {
            let payload = $0["payload"] as? [String: Any]
            return (payload?["tool"] as? String ?? "", payload?["idempotency_key"] as? String ?? "")
        }
    }
}

/// The one session of a fresh agentd (the Brain created it).
private func onlySession(_ agentd: AgentdProcess) async throws -> String {
    let sessions = try await agentd.client.get("/v1/sessions")["sessions"] as? [[String: Any]] ?? []
    try #require(sessions.count == 1, "one session: \(sessions)")
    return try #require(sessions[0]["id"] as? String)
}

/// Lines of `runs.log` in the session's workspace.
private func logLines(_ agentd: AgentdProcess, _ session: String) async throws -> Int {
    // The session was woken: the read carries the current lease epoch (fencing).
    let epoch = (try await agentd.client.get(AgentdClient.sessionPath(session))["lease_epoch"] as? NSNumber)?.uint64Value
    let log = try await agentd.client.execute(session: session, tool: "read_file", input: Data(#"{"path": "runs.log"}"#.utf8), epoch: epoch)
    return log.output.split(separator: "\n").count
}

private func text(_ text: String) -> [String: Any] { ["type": "text", "text": text] }

private func toolUse(_ id: String, _ name: String, _ input: [String: Any]) -> [String: Any] {
    ["type": "tool_use", "id": id, "name": name, "input": input]
}

/// A `tool_result` block as the model received it.
struct ToolResultSeen: Equatable {
    let id: String
    let content: String
    let isError: Bool
}

/// The tool results in the last message of a request.
private func toolResults(_ request: FakeMessagesAPI.Request) -> [ToolResultSeen] {
    let content = request.messages.last?["content"] as? [[String: Any]] ?? []
    return content.filter { $0["type"] as? String == "tool_result" }.map {
        ToolResultSeen(id: $0["tool_use_id"] as? String ?? "", content: $0["content"] as? String ?? "", isError: $0["is_error"] as? Bool ?? false)
    }
}

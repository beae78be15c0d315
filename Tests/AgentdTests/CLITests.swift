import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// agentctl as a user types it: tables and `--json` on every command, a live timeline,
/// completion scripts; and agentd's optional TCP listener with its bearer token.
@Suite("agentctl output, live timeline, completion; agentd over TCP")
struct CLITests {
    @Test("every command prints a readable table or line, and valid JSON with --json")
    func textAndJSON() async throws {
        try await withAgentd { agentd in
            let s = agentd.socket
            let id = try await runAgentctl(["session", "create", "--policy", "default"], socket: s).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(id.hasPrefix("s-") && id.count == 18, "session create prints the id: '\(id)'")

            let list = try await runAgentctl(["session", "list"], socket: s)
            let rows = list.stdout.split(separator: "\n")
            #expect(rows.first?.hasPrefix("ID") == true && rows.first?.contains("POLICY") == true)
            #expect(rows.contains { $0.hasPrefix(id) && $0.contains("default") })
            let exec = try await runAgentctl(["exec", id, "bash", #"{"command": "echo table"}"#], socket: s)
            #expect(exec.stdout == "table\n" && exec.status == 0)
            // The task's sandbox is listed while it lives.
            let live = try await runAgentctl(["sandboxes"], socket: s)
            #expect(live.status == 0 && live.stdout.contains(id) && live.stdout.contains("main"), "\(live.stdout)")

            // --json on every command that talks to agentd: each prints one JSON object.
            let commands: [[String]] = [
                ["session", "create"], ["session", "list"], ["session", "show", id], ["session", "events", id],
                // wake last but one: after it, changes must carry the epoch (fencing).
                ["exec", id, "bash", #"{"command": "echo json"}"#], ["checkpoint", id, #"{"step": 1}"#], ["task", "end", id],
                ["wake", id], ["verify", id], ["health"], ["pool", "status"], ["sandboxes"],
            ]
            for command in commands {
                let run = try await runAgentctl(command + ["--json"], socket: s)
                #expect(run.status == 0, "\(command): \(run.stderr)")
                let object = (try? JSONSerialization.jsonObject(with: Data(run.stdout.utf8))) as? [String: Any]
                #expect(object != nil, "\(command) --json printed: \(run.stdout.prefix(200))")
            }
            let show = try await runAgentctl(["session", "show", id, "--json"], socket: s)
            let shown = try #require(try JSONSerialization.jsonObject(with: Data(show.stdout.utf8)) as? [String: Any])
            #expect(shown["id"] as? String == id && (shown["lease_epoch"] as? NSNumber)?.intValue == 1)

            // Bad input: what was wrong, exit 1 (or the parser's usage error for missing arguments).
            let badJSON = try await runAgentctl(["exec", id, "bash", "{not json"], socket: s)
            #expect(badJSON.status != 0 && badJSON.stderr.contains("JSON"), "\(badJSON.stderr)")
            let unknown = try await runAgentctl(["session", "show", "s-nosuchsession00"], socket: s)
            #expect(unknown.status == 1 && unknown.stderr.hasPrefix("agentctl: ") && unknown.stdout.isEmpty, "\(unknown.stderr)")
        }
    }

    @Test(
        "agentctl exec prints a command's output as it comes, stdout to stdout and stderr to stderr, then the result's notes",
        arguments: ["default", "offline-data"])
    func execStreams(policy: String) async throws {
        try await withAgentd { agentd in
            let s = agentd.socket
            let id = try #require(try await agentd.client.post("/v1/sessions", ["policy": policy])["id"] as? String)
            let run = try await runAgentctl(
                ["exec", id, "bash", #"{"command": "for i in 1 2 3; do echo $i; sleep 0.1; done; echo oops >&2; exit 2"}"#], socket: s)
            #expect(run.status == 1, "a failing command exits 1: \(run.stderr)")
            #expect(run.stdout == "1\n2\n3\n[exit code 2]\n", "\(run.stdout.debugDescription)")
            #expect(run.stderr == "oops\n", "\(run.stderr.debugDescription)")
            // --json keeps the one result object, with stdout and stderr rendered together.
            let json = try await runAgentctl(["exec", id, "bash", #"{"command": "echo a; echo b >&2"}"#, "--json"], socket: s)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
            #expect((object["result"] as? [String: Any])?["output"] as? String == "a\n[stderr]\nb\n")
        }
    }

    @Test("session events --follow prints the timeline live, as events happen")
    func liveTimeline() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let output = NSTemporaryDirectory() + "follow-\(Components.testID()).txt"
            defer { try? FileManager.default.removeItem(atPath: output) }
            let follower = try ChildProcess.spawn(
                [try agentctlBinary(), "session", "events", id, "--follow"], environment: agentctlEnvironment(socket: agentd.socket),
                output: output)
            defer {
                follower.signal(SIGKILL)
                follower.wait()
            }
            let read = { (try? String(contentsOfFile: output, encoding: .utf8)) ?? "" }
            #expect(await eventually(.seconds(20)) { read().contains("session.created") }, "\(read())")
            #expect(!read().contains("tool.intent"))
            // Something happens now; the running follower prints it.
            _ = try await c.post("/v1/sessions/\(id)/execute", ["tool": "bash", "input": ["command": "echo followed live"]])
            #expect(await eventually(.seconds(20)) { read().contains("tool.result") }, "\(read())")
            let lines = read().split(separator: "\n")
            #expect(lines.contains { $0.contains("tool.intent") && $0.contains("echo followed live") })
            #expect(lines.contains { $0.contains("tool.result") && $0.contains("followed live") })
        }
    }

    @Test("completion scripts for bash, zsh and fish name every command")
    func completion() async throws {
        for shell in ["bash", "zsh", "fish"] {
            let run = try await runAgentctl(["--generate-completion-script", shell])
            #expect(run.status == 0, "\(shell): \(run.stderr)")
            for command in ["session", "exec", "wake", "verify", "policy", "image", "pool", "mcp", "run"] {
                #expect(run.stdout.contains(command), "the \(shell) script lacks \(command)")
            }
        }
    }

    @Test("--listen-tcp serves the API on TCP only with the bearer token; without a token agentd refuses to start")
    func tcpListener() async throws {
        let port = try Loopback.freePort()
        let token = "tok-\(UUID().uuidString)"
        let agentd = try AgentdProcess()
        try await agentd.start(extraArguments: ["--listen-tcp", "127.0.0.1:\(port)"], extraEnvironment: ["AGENTD_TOKEN": token])
        defer { agentd.stop() }
        let good = AgentdClient(url: "http://127.0.0.1:\(port)", token: token)
        #expect(try await good.get("/v1/health")["status"] as? String == "ok")
        let created = try await good.post("/v1/sessions", [:])
        #expect(created.status == 201)
        for bad in [nil, "wrong-\(token)", String(token.dropLast())] {
            await #expect {
                _ = try await AgentdClient(url: "http://127.0.0.1:\(port)", token: bad).get("/v1/health")
            } throws: { error in
                (error as? AgentdClientError)?.status == 401 && "\(error)".contains("Bearer")
            }
        }
        // The unix socket needs no token (its mode guards it).
        #expect(try await agentd.client.get("/v1/health")["status"] as? String == "ok")

        // No token (or a short one): agentd says why and exits.
        let refused = try AgentdProcess()
        await #expect(throws: (any Error).self) {
            try await refused.start(extraArguments: ["--listen-tcp", "127.0.0.1:\(port + 1)"], extraEnvironment: ["AGENTD_TOKEN": "short"])
        }
        #expect(refused.log.contains("AGENTD_TOKEN"), "\(refused.log)")
        refused.kill9()
    }
}

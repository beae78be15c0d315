import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// Egress through the vault-proxy against the real agentd binary, engine, proxy and a loopback
/// HTTPS upstream: a sandbox of a `network.mode: proxy` policy reaches a route with a
/// credential it never holds, is refused elsewhere with the rule, has no other way out, and
/// every decision is in its session's timeline.
@Suite("agentd egress through the vault-proxy", .serialized)
struct EgressTests {
    static let credentialVariable = "AGENTD_TEST_ECHO_TOKEN"

    /// A policies directory holding one proxy-mode policy whose route `echo` goes to `server`
    /// with the credential from `credentialVariable` as `X-Api-Key`.
    static func policies(_ server: HTTPSEchoServer, driver: String = "container") throws -> String {
        let directory = NSTemporaryDirectory() + "agentd-egress-policies-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let yaml = """
            apiVersion: agentd/v1
            kind: Policy
            metadata:
              name: egress-test
            hands:
              driver: \(driver)
            \(driver == "container" ? "  image: agentd-dev:latest" : "")
              memory: 512MiB
              commandTimeout: 60s
              workspace: task
            network:
              mode: proxy
              allowHosts:
                - allowed.example
            credentials:
              - name: echo_token
                source: env:\(credentialVariable)
            routes:
              - name: echo
                upstream: \(server.url(""))
                credential: echo_token
                header: "X-Api-Key: {{credential}}"
                caFile: \(server.ca.caPath)
            """
        try yaml.write(toFile: directory + "/egress-test.yaml", atomically: true, encoding: .utf8)
        return directory
    }

    /// Everything the API answered in a test, searched for the canary at the end.
    final class Replies: @unchecked Sendable {
        private let lock = NSLock()
        private var texts: [String] = []
        func add(_ reply: AgentdClient.Reply) -> AgentdClient.Reply {
            lock.withLock { texts.append(reply.text) }
            return reply
        }
        var all: String { lock.withLock { texts.joined(separator: "\n") } }
    }

    func bash(_ c: AgentdClient, _ session: String, _ command: String, replies: Replies) async throws -> (output: String, intent: Int) {
        let reply = replies.add(try await c.post("/v1/sessions/\(session)/execute", ["tool": "bash", "input": ["command": command], "task": "t"]))
        let output = (reply["result"] as? [String: Any])?["output"] as? String ?? reply.text
        return (output, reply["intent_seq"] as? Int ?? -1)
    }

    func events(_ c: AgentdClient, _ session: String, replies: Replies) async throws -> [[String: Any]] {
        (replies.add(try await c.get("/v1/sessions/\(session)/events"))["events"] as? [[String: Any]]) ?? []
    }

    func payload(_ event: [String: Any]) -> [String: Any] { event["payload"] as? [String: Any] ?? [:] }

    /// Runs `body` with an echo upstream, agentd on a proxy-mode policy (`driver`) whose route
    /// carries a fresh canary, and a session of it.
    func withEgress(
        driver: String = "container", _ body: (_ agentd: AgentdProcess, _ server: HTTPSEchoServer, _ session: String, _ canary: Canary, _ replies: Replies) async throws -> Void
    ) async throws {
        let canary = Canary()
        try await HTTPSEchoServer.with { server in
            let policies = try Self.policies(server, driver: driver)
            defer { try? FileManager.default.removeItem(atPath: policies) }
            let replies = Replies()
            try await withAgentd(policies: policies, environment: [Self.credentialVariable: canary.value]) { agentd in
                let session = try #require(replies.add(try await agentd.client.post("/v1/sessions", ["policy": "egress-test"]))["id"] as? String)
                try await body(agentd, server, session, canary, replies)
            }
        }
    }

    /// Searches the sandbox's whole filesystem (but /proc and /sys) for every form of
    /// `canary`, each given to the search in two halves, so that the search's own argv is the
    /// only place the value is assembled; returns what was found, by form.
    func canaryInSandbox(_ c: AgentdClient, _ session: String, _ canary: Canary, replies: Replies) async throws -> [String] {
        var found: [String] = []
        for (name, form) in canary.forms.sorted(by: { $0.key < $1.key }) {
            let half = form.index(form.startIndex, offsetBy: form.count / 2)
            let search = try await bash(
                c, session, "a='\(form[..<half])'; b='\(form[half...])'; grep -rlsF --exclude-dir=proc --exclude-dir=sys \"$a$b\" / | head -5; echo searched",
                replies: replies)
            if search.output.trimmingCharacters(in: .whitespacesAndNewlines) != "searched" { found.append("\(name): \(search.output)") }
        }
        return found
    }

    @Test("a route injects the credential and the echoed canary comes back scrubbed; CONNECT elsewhere and direct connections are refused; every decision is journaled; the canary is nowhere")
    func routesAndRefusals() async throws {
        try await withEgress { agentd, server, session, canary, replies in
                let c = agentd.client

                // A route: the sandbox forges the header; the proxy replaces it with the
                // credential, and the upstream's echo of it is scrubbed on the way back.
                let route = try await bash(
                    c, session, "curl -sS -H 'X-Api-Key: forged' -H 'Proxy-Authorization: Basic Zm9vOmJhcg==' 'http://127.0.0.1:3128/echo/v1/things?q=secret'",
                    replies: replies)
                #expect(route.output.contains("\"path\": \"/v1/things?q=secret\""), "\(route.output)")
                #expect(route.output.contains("[REDACTED:echo_token]"), "the injected header came back scrubbed: \(route.output)")
                #expect(!route.output.contains("forged"), "the sandbox's own X-Api-Key was not passed on: \(route.output)")
                #expect(!route.output.lowercased().contains("proxy-authorization"), "\(route.output)")

                // The proxy variables are set for every command; NO_PROXY keeps the route direct.
                let env = try await bash(c, session, "env | grep -i _proxy | sort", replies: replies)
                for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                    #expect(env.output.contains("\(name)=http://127.0.0.1:3128"), "\(name): \(env.output)")
                }
                #expect(env.output.contains("NO_PROXY=localhost,127.0.0.1,::1"), "\(env.output)")

                // CONNECT to a host not in allowHosts: 403 naming the policy and the rule.
                let refused = try await bash(
                    c, session,
                    #"python3 -c "import socket; s=socket.create_connection(('127.0.0.1',3128)); s.sendall(b'CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n'); print(s.recv(4096).decode())""#,
                    replies: replies)
                #expect(refused.output.contains("403"), "\(refused.output)")
                #expect(refused.output.contains("egress to evil.example:443 refused by policy egress-test"), "\(refused.output)")
                #expect(refused.output.contains("network.allowHosts"), "\(refused.output)")
                // curl through HTTPS_PROXY sees the refusal too.
                let viaCurl = try await bash(c, session, "curl -sS https://evil.example/ 2>&1; echo exit=$?", replies: replies)
                #expect(viaCurl.output.contains("403"), "\(viaCurl.output)")

                // A program that ignores the proxy variables reaches nothing.
                let direct = try await bash(
                    c, session, "curl -sS --noproxy '*' --max-time 5 --cacert /dev/null \(server.url("/")) 2>&1; echo exit=$?", replies: replies)
                #expect(direct.output.contains("exit=7") || direct.output.contains("exit=28"), "no direct way out: \(direct.output)")
                let interfaces = try await bash(c, session, "ls /sys/class/net", replies: replies)
                #expect(interfaces.output.trimmingCharacters(in: .whitespacesAndNewlines) == "lo", "only loopback: \(interfaces.output)")

                // Every decision is a journaled event with the call's intent seq.
                let journaled = try await eventually(.seconds(20)) {
                    let types = try await events(c, session, replies: replies).compactMap { $0["type"] as? String }
                    return types.filter { $0 == "egress.allowed" }.count >= 1 && types.filter { $0 == "egress.denied" }.count >= 2
                }
                #expect(journaled)
                let all = try await events(c, session, replies: replies)
                let allowed = try #require(all.first { $0["type"] as? String == "egress.allowed" }.map(payload))
                #expect(allowed["route"] as? String == "echo")
                #expect(allowed["credential"] as? String == "echo_token")
                #expect(allowed["method"] as? String == "GET")
                #expect(allowed["host"] as? String == "127.0.0.1:\(server.port)")
                #expect(allowed["path"] as? String == "/v1/things?[REDACTED]", "the query is redacted: \(allowed)")
                #expect(allowed["status"] as? Int == 200)
                #expect(allowed["task"] as? String == "t")
                #expect(allowed["intent_seq"] as? Int == route.intent, "\(allowed)")
                #expect((allowed["bytes_down"] as? Int ?? 0) > 0)
                let denied = all.filter { $0["type"] as? String == "egress.denied" }.map(payload)
                #expect(denied.contains { $0["intent_seq"] as? Int == refused.intent && $0["host"] as? String == "evil.example:443" && ($0["rule"] as? String ?? "").contains("network.allowHosts") }, "\(denied)")

                // The timeline shows them.
                let timeline = try await runAgentctl(["session", "events", session], socket: agentd.socket).stdout
                #expect(timeline.contains("egress.allowed") && timeline.contains("route echo/v1/things?[REDACTED] with echo_token → 200"), "\(timeline)")
                #expect(timeline.contains("egress.denied") && timeline.contains("CONNECT evil.example:443 → 403"), "\(timeline)")

                // The canary, in any form, is nowhere: the sandbox's environment and processes…
                let procs = try await bash(c, session, "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '", replies: replies)
                #expect(canary.found(in: procs.output).isEmpty, "sandbox /proc: \(canary.found(in: procs.output))")
                // …its whole filesystem…
                let inSandbox = try await canaryInSandbox(c, session, canary, replies: replies)
                #expect(inSandbox.isEmpty, "found in the sandbox: \(inSandbox)")
                // …the engine's inspect output…
                let engine = try await Components.engine()
                for container in try await engine.listContainers(labels: ["agentd.instance": agentd.instance]) {
                    let inspect = try TestCommand.check(["podman", "--url", ProcessInfo.processInfo.environment["AGENTD_ENGINE"] ?? "", "inspect", container.Id])
                    #expect(canary.found(in: inspect).isEmpty, "engine inspect: \(canary.found(in: inspect))")
                }
                // …the journal's files, agentd's log (the proxy's goes there too) and every API answer.
                #expect(canary.found(underDirectory: agentd.stateDir + "/journal").isEmpty, "journal: \(canary.found(underDirectory: agentd.stateDir + "/journal"))")
                #expect(canary.found(in: agentd.log).isEmpty, "agentd log: \(canary.found(in: agentd.log))")
                #expect(canary.found(in: replies.all).isEmpty, "API answers: \(canary.found(in: replies.all))")
        }
    }

    @Test("a unit-driver sandbox reaches the route through the same bridge and has no other way out")
    func unitSandboxes() async throws {
        try await withEgress(driver: "unit") { agentd, server, session, canary, replies in
                let c = agentd.client
                let route = try await bash(c, session, "curl -sS 'http://127.0.0.1:3128/echo/unit'", replies: replies)
                #expect(route.output.contains("\"path\": \"/unit\"") && route.output.contains("[REDACTED:echo_token]"), "\(route.output)")
                let direct = try await bash(
                    c, session, "curl -sS --noproxy '*' --max-time 5 \(server.url("/")) 2>&1; echo exit=$?; ls /sys/class/net", replies: replies)
                #expect(direct.output.contains("exit=7") || direct.output.contains("exit=28"), "\(direct.output)")
                #expect(direct.output.hasSuffix("lo\n"), "only loopback: \(direct.output)")
                #expect(canary.found(in: replies.all).isEmpty)
                #expect(canary.found(in: agentd.log).isEmpty)
        }
    }

    @Test("the vault-proxy killed during a call: the call gets an error, the proxy comes back, and the next call works")
    func proxyKilledFailsClosedAndRecovers() async throws {
        try await withEgress { agentd, server, session, canary, replies in
                let c = agentd.client
                let first = try await bash(c, session, "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:3128/echo/ping", replies: replies)
                #expect(first.output.hasPrefix("200"), "\(first.output)")
                let proxies = { Self.proxies(instance: agentd.instance) }
                let proxy = try #require(proxies().first, "agentd runs the vault-proxy")

                // A download through the route (of 4 GB at 4 MB/s: whatever the sockets buffer drains
                // in seconds) is under way when the proxy dies.
                let slow = Task {
                    try await bash(
                        c, session, "curl -sS --limit-rate 4M -o /dev/null http://127.0.0.1:3128/echo/bytes/4000000000 2>&1; echo exit=$?", replies: replies)
                }
                let downloading = await eventually(.seconds(30)) { Self.hasUpstreamConnection(pid: proxy, port: server.port) }
                #expect(downloading, "the proxy is carrying the download")
                kill(proxy, SIGKILL)
                let cut = try await slow.value
                #expect(!cut.output.contains("exit=0"), "the call got an error: \(cut.output)")
                #expect(cut.output.contains("exit="), "\(cut.output)")

                // The proxy comes back (a new pid) and the next call works.
                let back = await eventually(.seconds(30)) { proxies().contains { $0 != proxy } && agentd.log.contains("generation: 2") }
                #expect(back, "the vault-proxy was restarted")
                let next = try await bash(c, session, "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:3128/echo/ping", replies: replies)
                #expect(next.output.hasPrefix("200"), "\(next.output)")
                #expect(canary.found(in: agentd.log).isEmpty)
                #expect(canary.found(in: replies.all).isEmpty)
        }
    }

    /// The vault-proxy processes of agentd `instance` (its unit's, whose control socket is
    /// named after the instance, or its child's).
    static func proxies(instance: String) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }.filter { pid in
            let comm = ((try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            let cmdline = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
            return comm == "vault-proxy" && cmdline.contains(instance)
        }
    }

    /// Whether process `pid` holds an established TCP connection to 127.0.0.1:`port` (as
    /// iproute2's `ss` lists sockets with their processes).
    static func hasUpstreamConnection(pid: pid_t, port: Int) -> Bool {
        let listing = (try? TestCommand.check(["ss", "-Htnp", "state", "established", "dst", "127.0.0.1:\(port)"])) ?? ""
        return listing.contains("pid=\(pid),")
    }
}

import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// A policy's git repository end to end, against the real agentd binary, engine, vault-proxy
/// and a git smart-HTTP server over TLS that demands a canary token: the workspace is
/// initialized on the host, the sandbox fetches and pushes through the route with a token it
/// never holds, and pushes outside `git.push` are refused with the reason.
@Suite("agentd git through the vault-proxy", .serialized)
struct GitEgressTests {
    static let credentialVariable = "AGENTD_TEST_GIT_TOKEN"

    static func policies(_ server: GitHTTPServer) throws -> String {
        let directory = NSTemporaryDirectory() + "agentd-git-policies-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let yaml = """
            apiVersion: agentd/v1
            kind: Policy
            metadata:
              name: git-test
            hands:
              driver: container
              image: agentd-dev:latest
              memory: 512MiB
              commandTimeout: 60s
              workspace: task
            network:
              mode: proxy
            credentials:
              - name: git_token
                source: env:\(credentialVariable)
            routes:
              - name: git
                upstream: https://127.0.0.1:\(server.port)
                credential: git_token
                header: "Authorization: Bearer {{credential}}"
                caFile: \(server.ca.caPath)
            git:
              repository: \(server.url("agentd/widgets"))
              branch: main
              route: git
              push:
                branches: ["agent/*"]
            """
        try yaml.write(toFile: directory + "/git-test.yaml", atomically: true, encoding: .utf8)
        return directory
    }

    @Test("the workspace is cloned at initialization as the sandbox user with origin on the route; a push to agent/* works, pushes to main (plain or forced) and to another repository are refused with the reason; the token is nowhere")
    func cloneAndPushThroughTheRoute() async throws {
        try await GitHTTPServer.with(repositories: ["agentd/widgets", "agentd/other"]) { server in
            let canary = Canary(server.token)
            let policies = try Self.policies(server)
            defer { try? FileManager.default.removeItem(atPath: policies) }
            let replies = EgressTests.Replies()
            let egress = EgressTests()
            try await withAgentd(policies: policies, environment: [Self.credentialVariable: server.token]) { agentd in
                let c = agentd.client
                let session = try #require(replies.add(try await c.post("/v1/sessions", ["policy": "git-test"]))["id"] as? String)
                func bash(_ command: String) async throws -> String { try await egress.bash(c, session, command, replies: replies).output }

                // Initialized before the first command: main checked out, origin on the route,
                // every file the sandbox user's, no token in the config.
                let state = try await bash(
                    "cd /workspace && git status --short --branch && git remote get-url origin && stat -c '%u %U' README.md .git/config && id -u && cat .git/config")
                #expect(state.contains("## main...origin/main"), "\(state)")
                #expect(state.contains("http://127.0.0.1:3128/git/agentd/widgets.git"), "\(state)")
                let lines = state.split(separator: "\n").map(String.init)
                if let uid = lines.last(where: { Int($0) != nil }) {
                    #expect(lines.filter { $0.hasPrefix("\(uid) ") }.count == 2, "README.md and .git/config belong to the sandbox user \(uid): \(state)")
                }

                // Commit and push to an allowed branch, through the route.
                let pushed = try await bash(
                    "cd /workspace && git checkout -q -b agent/fix && echo fixed > fix.txt && git add fix.txt && git -c user.name=agent -c user.email=agent@agentd.test commit -qm fix && git push origin agent/fix 2>&1; echo exit=$?")
                #expect(pushed.contains("exit=0"), "\(pushed)")
                let upstream = try TestCommand.check(
                    ["git", "--git-dir", server.repositoriesRoot + "/agentd/widgets.git", "log", "--format=%s", "agent/fix"], environment: server.gitEnvironment)
                #expect(upstream.hasPrefix("fix\n"), "the branch reached the server: \(upstream)")
                // A fetch through the route works too.
                let fetched = try await bash("cd /workspace && git fetch origin 2>&1; echo exit=$?")
                #expect(fetched.contains("exit=0"), "\(fetched)")

                // Refused, with git showing why.
                let toMain = try await bash("cd /workspace && git push origin HEAD:main 2>&1; echo exit=$?")
                #expect(toMain.contains("refused by policy git-test") && toMain.contains("git.push.branches"), "\(toMain)")
                #expect(!toMain.contains("exit=0"))
                let forced = try await bash("cd /workspace && git push --force origin HEAD:main 2>&1; echo exit=$?")
                #expect(forced.contains("refused by policy git-test") && !forced.contains("exit=0"), "\(forced)")
                let other = try await bash("cd /workspace && git push http://127.0.0.1:3128/git/agentd/other.git HEAD:agent/fix 2>&1; echo exit=$?")
                #expect(!other.contains("exit=0") && other.contains("403"), "\(other)")
                let mainHead = try TestCommand.check(
                    ["git", "--git-dir", server.repositoriesRoot + "/agentd/widgets.git", "log", "--format=%s", "main"], environment: server.gitEnvironment)
                #expect(mainHead == "Initial commit\n", "main was not touched: \(mainHead)")
                #expect(!FileManager.default.fileExists(atPath: server.repositoriesRoot + "/agentd/other.git/refs/heads/agent/fix"))

                // The server saw the token on every request that reached it.
                let log = try server.accessLog()
                #expect(log.contains { $0.path.contains("git-receive-pack") && $0.status == 200 && $0.tokenID == server.tokenID }, "\(log)")
                #expect(!log.contains { $0.path.contains("other.git") }, "the other repository was never reached")

                // The timeline has the decisions.
                let events = try await egress.events(c, session, replies: replies)
                #expect(events.contains { $0["type"] as? String == "egress.allowed" && (egress.payload($0)["path"] as? String ?? "").contains("git-receive-pack") })
                #expect(events.contains { $0["type"] as? String == "egress.denied" && (egress.payload($0)["rule"] as? String ?? "").contains("git.push") })

                // The token is nowhere: the sandbox (environment, processes, files), the
                // journal, agentd's log and the API's answers.
                let procs = try await bash("env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; cat /workspace/.git/config")
                #expect(canary.found(in: procs).isEmpty, "\(canary.found(in: procs))")
                let inSandbox = try await egress.canaryInSandbox(c, session, canary, replies: replies)
                #expect(inSandbox.isEmpty, "found in the sandbox: \(inSandbox)")
                #expect(canary.found(underDirectory: agentd.stateDir + "/journal").isEmpty)
                #expect(canary.found(in: agentd.log).isEmpty, "\(canary.found(in: agentd.log))")
                #expect(canary.found(in: replies.all).isEmpty, "\(canary.found(in: replies.all))")
            }
        }
    }
}

import Foundation
import TestSupport
import Testing

/// The loopback git server the vault-proxy and git tests rely on: a real smart-HTTP server
/// over TLS that refuses anyone without its canary token and records the token's use.
@Suite struct GitHTTPServerTests {
    @Test func cloneWithTheTokenOverVerifiedTLSSucceedsAndIsLogged() async throws {
        try await GitHTTPServer.with { server in
            let clone = server.directory + "/clone"
            try TestCommand.check(
                ["git"] + server.bearerArguments + ["clone", "-q", server.url("agentd/widgets"), clone], environment: server.gitEnvironment)
            #expect(try String(contentsOfFile: clone + "/README.md", encoding: .utf8) == "# agentd/widgets\n")
            let branch = try TestCommand.check(["git", "-C", clone, "rev-parse", "--abbrev-ref", "HEAD"], environment: server.gitEnvironment)
            #expect(branch == "main\n")
            let served = try server.accessLog()
            #expect(served.contains { $0.path.hasSuffix("/git-upload-pack") && $0.status == 200 && $0.tokenID == server.tokenID })
            #expect(served.allSatisfy { $0.tokenID == server.tokenID })
            // The log names the token; it never holds it.
            #expect(try !String(contentsOfFile: server.accessLogPath, encoding: .utf8).contains(server.token))
        }
    }

    @Test func theTokenAsBasicAuthPasswordWorksToo() async throws {
        try await GitHTTPServer.with { server in
            let url = server.url("agentd/widgets").replacingOccurrences(of: "https://", with: "https://\(GitHTTPServer.basicUser):\(server.token)@")
            try TestCommand.check(["git", "ls-remote", url, "main"], environment: server.gitEnvironment)
            #expect(try server.accessLog().contains { $0.status == 200 && $0.tokenID == server.tokenID })
        }
    }

    @Test func cloneWithoutTheTokenOrWithAnotherIsRefused() async throws {
        try await GitHTTPServer.with { server in
            let without = try TestCommand.run(
                ["git", "clone", "-q", server.url("agentd/widgets"), server.directory + "/a"], environment: server.gitEnvironment)
            #expect(!without.succeeded)
            #expect(without.output.contains("401") || without.output.contains("Authentication failed") || without.output.contains("could not read Username"))
            let wrong = try TestCommand.run(
                ["git", "-c", "http.extraHeader=Authorization: Bearer \(server.token)x", "clone", "-q", server.url("agentd/widgets"), server.directory + "/b"],
                environment: server.gitEnvironment)
            #expect(!wrong.succeeded)
            let log = try server.accessLog()
            #expect(!log.isEmpty && log.allSatisfy { $0.status == 401 && $0.tokenID == nil })
            #expect(!FileManager.default.fileExists(atPath: server.directory + "/a/.git/HEAD"))
        }
    }

    @Test func tlsIsVerifiedAgainstTheTestCAOnly() async throws {
        try await GitHTTPServer.with { server in
            var environment = server.gitEnvironment
            environment["GIT_SSL_CAINFO"] = "/etc/ssl/certs/ca-certificates.crt"
            let untrusted = try TestCommand.run(["git"] + server.bearerArguments + ["ls-remote", server.url("agentd/widgets")], environment: environment)
            #expect(!untrusted.succeeded)
            #expect(untrusted.output.contains("certificate"))
            // The certificate also names git.agentd.test.
            let byName = try TestCommand.run(
                ["git"] + server.bearerArguments + [
                    "-c", "http.curloptResolve=\(TestCA.testHostName):\(server.port):127.0.0.1",
                    "ls-remote", server.url("agentd/widgets", host: TestCA.testHostName), "main",
                ], environment: server.gitEnvironment)
            #expect(byName.succeeded, "\(byName.output)")
            #expect(byName.output.hasSuffix("\trefs/heads/main\n"))
        }
    }

    @Test func pushToABranchLandsInTheBareRepository() async throws {
        try await GitHTTPServer.with(repositories: ["agentd/widgets", "other/gadgets"]) { server in
            let env = server.gitEnvironment
            let clone = server.directory + "/clone"
            try TestCommand.check(["git"] + server.bearerArguments + ["clone", "-q", server.url("agentd/widgets"), clone], environment: env)
            try "change\n".write(toFile: clone + "/change.txt", atomically: true, encoding: .utf8)
            try TestCommand.check(["git", "-C", clone, "add", "change.txt"], environment: env)
            try TestCommand.check(["git", "-C", clone, "-c", "user.name=t", "-c", "user.email=t@agentd.test", "commit", "-q", "-m", "change"], environment: env)
            try TestCommand.check(["git", "-C", clone] + server.bearerArguments + ["push", "-q", "origin", "HEAD:refs/heads/agent/change"], environment: env)
            let pushed = try TestCommand.check(["git", "-C", clone, "rev-parse", "HEAD"], environment: env)
            let landed = try TestCommand.check(
                ["git", "-C", server.repositoriesRoot + "/agentd/widgets.git", "rev-parse", "refs/heads/agent/change"], environment: env)
            #expect(landed == pushed)
            #expect(try server.accessLog().contains { $0.path == "/agentd/widgets.git/git-receive-pack" && $0.status == 200 && $0.tokenID == server.tokenID })
            // The second repository exists on its own.
            let other = try TestCommand.check(["git"] + server.bearerArguments + ["ls-remote", server.url("other/gadgets"), "main"], environment: env)
            #expect(other.hasSuffix("\trefs/heads/main\n"))
        }
    }

    @Test func stopLeavesNoProcessBehind() async throws {
        let server = try await GitHTTPServer.start()
        // A request makes fcgiwrap start git http-backend at least once.
        try TestCommand.check(["git"] + server.bearerArguments + ["ls-remote", server.url("agentd/widgets")], environment: server.gitEnvironment)
        let processes = server.processes
        #expect(processes.count >= 3)  // nginx master and worker, fcgiwrap
        server.stop()
        #expect(processes.filter(Loopback.alive) == [])
        #expect(!Loopback.accepts(port: server.port))
        #expect(!FileManager.default.fileExists(atPath: server.directory))
    }
}

import Foundation
import TestSupport
import Testing

/// The loopback HTTPS upstream the vault-proxy tests rely on.
@Suite struct HTTPSEchoServerTests {
    struct Echo: Decodable {
        let method: String
        let path: String
        let requestLine: String
        let headers: [[String]]
        let body: String
        func header(_ name: String) -> [String] {
            headers.filter { $0.first?.lowercased() == name.lowercased() }.compactMap { $0.last }
        }
    }

    @Test func echoesTheRequestLineHeadersAndBody() async throws {
        try await HTTPSEchoServer.with { server in
            let out = try TestCommand.check([
                "curl", "-sS", "--fail", "--cacert", server.ca.caPath, "-H", "X-Agentd-Canary: canary-123",
                "--data-binary", "hello body", server.url("/v1/things?x=1"),
            ])
            let echo = try JSONDecoder().decode(Echo.self, from: Data(out.utf8))
            #expect(echo.method == "POST")
            #expect(echo.path == "/v1/things?x=1")
            #expect(echo.requestLine == "POST /v1/things?x=1 HTTP/1.1")
            #expect(echo.header("x-agentd-canary") == ["canary-123"])
            #expect(echo.body == "hello body")
        }
    }

    @Test func servesExactlyTheBytesAskedFor() async throws {
        try await HTTPSEchoServer.with { server in
            let out = try TestCommand.check([
                "curl", "-sS", "--fail", "--cacert", server.ca.caPath, "-o", "/dev/null", "-w", "%{size_download} %{http_code}",
                server.url("/bytes/1048576"),
            ])
            #expect(out == "1048576 200")
        }
    }

    @Test func answersStatusesAndRedirectsWithoutFollowing() async throws {
        try await HTTPSEchoServer.with { server in
            let status = try TestCommand.check(["curl", "-sS", "--cacert", server.ca.caPath, "-o", "/dev/null", "-w", "%{http_code}", server.url("/status/418")])
            #expect(status == "418")
            let redirect = try TestCommand.check([
                "curl", "-sS", "--cacert", server.ca.caPath, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                server.url("/redirect?to=https://elsewhere.example/x"),
            ])
            #expect(redirect == "302 https://elsewhere.example/x")
        }
    }

    @Test func theCertificateNamesTheTestHostAndIsRefusedWithoutTheCA() async throws {
        try await HTTPSEchoServer.with { server in
            let byName = try TestCommand.check([
                "curl", "-sS", "--fail", "--cacert", server.ca.caPath, "--resolve", "\(TestCA.testHostName):\(server.port):127.0.0.1",
                "-o", "/dev/null", "-w", "%{http_code}", server.url("/", host: TestCA.testHostName),
            ])
            #expect(byName == "200")
            let untrusted = try TestCommand.run(["curl", "-sS", "-o", "/dev/null", server.url("/")])
            #expect(untrusted.status == 60)  // curl: peer certificate cannot be authenticated
        }
    }

    @Test func stopEndsTheServer() async throws {
        let server = try await HTTPSEchoServer.start()
        let pid = try #require(server.pid)
        #expect(Loopback.accepts(port: server.port))
        server.stop()
        #expect(!Loopback.alive(pid))
        #expect(!Loopback.accepts(port: server.port))
    }
}

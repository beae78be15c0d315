import Crypto
import Foundation
import Testing
import TestSupport

@testable import VaultProxy

/// Routes against a real HTTPS upstream on loopback, with curl as the sandbox's client.
@Suite(.serialized) struct RouteTests {
    static func json(_ data: Data) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    static func sha256(_ text: String) -> String {
        SHA256.hash(data: Data(text.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    @Test func routeInjectsTheCredentialAndReplacesTheClientsOwnHeaders() async throws {
        let ca = try TestCA()
        let upstream = try Upstream(ca: ca)
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        try fixture.proxy.setIntent(sandbox: "sandbox-1", task: "task-7", seq: 42)

        let r = try fixture.curl(
            "http://127.0.0.1:3128/echo/hello/world?q=secret-query",
            ["-H", "Authorization: Bearer client-own", "-H", "Proxy-Authorization: Basic c2VjcmV0", "-H", "Accept-Encoding: gzip", "-H", "X-Kept: yes"])
        #expect(r.status == 200)
        let doc = try Self.json(r.body)
        #expect(doc["authSha256"] as? String == Self.sha256("Bearer " + ProxyFixture.canary), "the upstream got the route's credential")
        #expect(doc["authCount"] as? Int == 1, "one Authorization header: the client's own was replaced, not added to")
        #expect(doc["path"] as? String == "/hello/world?q=secret-query")
        let headers = (doc["headers"] as? [[String]] ?? []).map { ($0[0].lowercased(), $0[1]) }
        #expect(!headers.contains { $0.0 == "proxy-authorization" })
        #expect(headers.contains { $0.0 == "accept-encoding" && $0.1 == "identity" })
        #expect(headers.contains { $0.0 == "host" && $0.1 == "127.0.0.1:\(upstream.port)" })
        #expect(headers.contains { $0.0 == "x-kept" && $0.1 == "yes" })
        #expect(!headers.contains { $0.1.contains("client-own") })
        // The echoed Authorization header comes back scrubbed.
        let body = String(decoding: r.body, as: UTF8.self)
        #expect(body.contains("Bearer [REDACTED:canary]"))
        for form in canaryForms() { #expect(!body.contains(form)) }
        let event = await fixture.events.first { $0.path?.hasPrefix("/hello/world") == true }
        #expect(event.type == "egress.allowed")
        #expect(event.sandbox == "sandbox-1" && event.session == "session-1" && event.task == "task-7")
        #expect(event.toolIntentSeq == 42)
        #expect(event.method == "GET")
        #expect(event.host == "127.0.0.1:\(upstream.port)")
        #expect(event.route == "echo")
        #expect(event.path == "/hello/world?[REDACTED]")
        #expect(event.credential == "canary")
        #expect(event.rule == "route echo")
        #expect(event.status == 200)
        #expect(event.bytesDown > 0 && event.bytesUp == 0)
        #expect(event.durationMs >= 0)

        // A route with a path prefix and a host name checked against the certificate.
        let prefixed = try fixture.curl("http://127.0.0.1:3128/prefixed/repos/x")
        #expect(prefixed.status == 200)
        #expect(try Self.json(prefixed.body)["path"] as? String == "/api/v3/repos/x")
        // Absolute-form (a client that sends everything to the proxy) reaches the route too.
        let absolute = try fixture.raw("GET http://127.0.0.1:3128/echo/abs HTTP/1.1\r\nHost: 127.0.0.1:3128\r\nConnection: close\r\n\r\n")
        #expect(absolute.hasPrefix("HTTP/1.1 200 "))

        // Without the route's CA file the system trust store does not know the test CA: 502.
        let untrusted = try fixture.curl("http://127.0.0.1:3128/systemca/x")
        #expect(untrusted.status == 502)

        for line in fixture.logLines.withLockedValue({ $0 }) {
            for form in canaryForms() { #expect(!line.contains(form), "the proxy logged the credential") }
        }
    }

    @Test func echoedCredentialIsScrubbedInEveryEncodingAcrossChunks() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        let r = try fixture.curl("http://127.0.0.1:3128/echo/leak")
        #expect(r.status == 200)
        let body = String(decoding: r.body, as: UTF8.self)
        for form in canaryForms() {
            #expect(!body.contains(form), "form \(form.count) bytes long leaked")
            #expect(!r.headers.contains(form))
        }
        let lines = body.split(separator: "\n")
        #expect(lines.count == 4)
        for line in lines { #expect(line.contains("[REDACTED:canary]"), "\(line)") }
        #expect(r.headers.lowercased().contains("x-echo: [redacted:canary]"))
        #expect(r.headers.lowercased().contains("transfer-encoding: chunked"), "a scrubbed body is re-framed as chunked")
    }

    @Test func redirectsAreNotFollowedAndCarryNoCredential() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        let r = try fixture.curl("http://127.0.0.1:3128/echo/redirect")
        #expect(r.status == 302)
        let location = r.headers.split(separator: "\r\n").first { $0.lowercased().hasPrefix("location:") }.map(String.init) ?? ""
        #expect(location.contains("https://elsewhere.example/cb?t=[REDACTED:canary]"))
        for form in canaryForms() { #expect(!r.headers.contains(form)) }
        let event = await fixture.events.first { $0.path == "/redirect" }
        #expect(event.status == 302)
    }

    @Test func compressedResponsesAreRefusedNotPassedUnscrubbed() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        let r = try fixture.curl("http://127.0.0.1:3128/echo/gzip")
        #expect(r.status == 502)
        #expect(String(decoding: r.body, as: UTF8.self).contains("Content-Encoding gzip"))
    }

    @Test func pathTraversalUnknownRoutesAndPlainHTTPAreRefused() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        for path in ["/echo/../x", "/echo/%2e%2e/x", "/echo/a/%2E%2E%2Fb", "/echo/a/..%5cb", "/echo/./x"] {
            let r = try fixture.curl("http://127.0.0.1:3128" + path)
            #expect(r.status == 403, "\(path)")
            #expect(
                String(decoding: r.body, as: UTF8.self)
                    == "egress to 127.0.0.1:\(upstream.port) refused by policy coding-agent: route paths must not contain '.' or '..' segments (plain or percent-encoded)\n",
                "\(path)")
        }
        let unknown = try fixture.curl("http://127.0.0.1:3128/nope/x")
        #expect(unknown.status == 403)
        #expect(String(decoding: unknown.body, as: UTF8.self).contains("no route 'nope' (routes: echo, prefixed, systemca)"))
        let plain = try fixture.raw("GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        #expect(plain.hasPrefix("HTTP/1.1 403 "))
        #expect(ConnectTests.body(plain).hasPrefix("egress to evil.example refused by policy coding-agent: plain HTTP egress is refused"))
        let denied = await fixture.events.first { $0.path == "/../x" }
        #expect(denied.type == "egress.denied" && denied.status == 403 && denied.route == "echo")
    }

    @Test func requestBodiesStreamUpInBothFramings() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        let file = fixture.dir.path + "/upload"
        let payload = String(repeating: "0123456789abcdef", count: 65536)  // 1 MiB
        try payload.write(toFile: file, atomically: true, encoding: .utf8)
        for extra in [[String](), ["-H", "Transfer-Encoding: chunked"]] {
            let r = try fixture.curl("http://127.0.0.1:3128/echo/upload", ["-X", "POST", "--data-binary", "@" + file] + extra)
            #expect(r.status == 200)
            let doc = try Self.json(r.body)
            #expect((doc["body"] as? String)?.count == payload.count)
        }
        let event = await fixture.events.first { $0.path == "/upload" }
        #expect(event.bytesUp == Int64(payload.utf8.count))
    }

    @Test func aLargeDownloadStreamsWithoutBuffering() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        let size = 100 << 20
        let before = Self.maxRSS()
        let start = ContinuousClock.now
        let out = fixture.dir.path + "/download"
        let r = try run(["curl", "-sS", "--max-time", "120", "--unix-socket", fixture.socketPath, "-o", out, "-w", "%{http_code}", "http://127.0.0.1:3128/echo/bytes/\(size)"])
        let elapsed = ContinuousClock.now - start
        #expect(String(decoding: r.out, as: UTF8.self) == "200")
        let attributes = try FileManager.default.attributesOfItem(atPath: out)
        #expect((attributes[.size] as? Int) == size)
        let growth = Self.maxRSS() - before
        print("100 MiB through a route: \(elapsed), peak RSS growth \(growth >> 20) MiB")
        #expect(growth < 64 << 20, "the proxy buffered the body: peak RSS grew by \(growth >> 20) MiB")
        let event = await fixture.events.first { $0.path == "/bytes/\(size)" }
        #expect(event.bytesDown == Int64(size))
    }

    static func maxRSS() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_maxrss * 1024
    }
}

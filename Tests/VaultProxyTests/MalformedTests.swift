import Foundation
import NIOCore
import SessionLog
import Testing
import TestSupport

@testable import VaultProxy

@Suite(.serialized) struct MalformedRequestTests {
    @Test func smugglingFramingsAndOversizedHeadsGet400() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: upstream)
        defer { Task { await fixture.shutdown() } }
        let big = String(repeating: "a", count: 40_000)
        let requests = [
            "POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
            "POST /echo/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            "POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /echo/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "POST /echo/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            "GET /echo/x HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
            "GET /echo/x HTTP/1.1\r\nHost: a\r\nX-A: a\nb\r\n\r\n",
            "GET /echo/x\r HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /echo/x HTTP/1.1\r\nHost: a\r\nX-Big: \(big)\r\n\r\n",
            "GET /echo/x HTTP/1.1\r\nHost: a\r\n Folded: x\r\n\r\n",
        ]
        for request in requests {
            let answer = try fixture.raw(request)
            #expect(answer.hasPrefix("HTTP/1.1 400 "), "\(request.prefix(120).debugDescription): \(answer.prefix(200))")
            #expect(answer.contains("request refused by the vault-proxy (policy coding-agent)"), "\(request.prefix(80).debugDescription)")
        }
        // Nothing of these reached the upstream as a request.
        #expect(!fixture.events.events.contains { $0.type == "egress.allowed" })
    }

    @Test func connectionsPerListenerAreBounded() async throws {
        let fixture = try await ProxyFixture(upstream: nil) { $0.maxConnectionsPerListener = 2 }
        defer { Task { await fixture.shutdown() } }
        var held: [Int32] = []
        defer { for fd in held { close(fd) } }
        for _ in 0..<2 { held.append(try openUnix(fixture.socketPath)) }
        // Wait until the proxy has admitted both, then the third is closed without an answer.
        #expect(await eventually { fixture.proxy.openConnections(sandbox: "sandbox-1") == 2 })
        let third = try fixture.raw("GET /echo/x HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(third.isEmpty)
        close(held.removeFirst())
        let admitted = await eventually { (try? fixture.raw("GET /nope/x HTTP/1.1\r\nHost: a\r\n\r\n"))?.hasPrefix("HTTP/1.1 403") == true }
        #expect(admitted)
    }
}

func openUnix(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b } }
    let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
    guard ok == 0 else { throw ProxyError("connect failed") }
    // A request the proxy must answer proves the connection was admitted (not just queued).
    _ = "GET /x HTTP/1.1\r\n".withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
    return fd
}

@Suite struct ScrubberTests {
    @Test func matchesAcrossEveryChunkSplitEqualTheWholeScrub() throws {
        let secret = try Secret(name: "tok", value: "s3cr3t/+=\"\\ value-0123456789")
        let patterns = ScrubPatterns([secret])
        let forms = ScrubPatterns.forms(of: secret.value).map { String(decoding: $0, as: UTF8.self) }
        var rng = SeededGenerator(seed: 0x5C2B)
        let allocator = ByteBufferAllocator()
        for round in 0..<300 {
            var text = ""
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                text += String(repeating: "x", count: Int.random(in: 0...40, using: &rng))
                text += forms.randomElement(using: &rng)!
            }
            let bytes = Array(text.utf8)
            var scrubber = StreamScrubber(patterns)
            var out = allocator.buffer(capacity: 0)
            var offset = 0
            while offset < bytes.count {
                let n = min(bytes.count - offset, Int.random(in: 1...9, using: &rng))
                var piece = scrubber.feed(ByteBuffer(bytes: bytes[offset..<offset + n]), allocator: allocator)
                out.writeBuffer(&piece)
                offset += n
            }
            var tail = scrubber.finish(allocator: allocator)
            out.writeBuffer(&tail)
            let result = String(buffer: out)
            #expect(result == StreamScrubber.scrub(text, with: patterns), "round \(round)")
            #expect(!result.contains("s3cr3t"), "round \(round): \(result)")
            #expect(!result.contains(Data("s3cr3t/+=\"\\ value-0123456789".utf8).base64EncodedString().prefix(20)))
        }
    }

    @Test func base64InsideALongerBase64TextIsFound() throws {
        let secret = try Secret(name: "tok", value: "ghp_abcdefghijklmnop0123")
        let patterns = ScrubPatterns([secret])
        for prefix in ["", "x", "x-access-token:", "ab:"] {
            let encoded = Data((prefix + "ghp_abcdefghijklmnop0123").utf8).base64EncodedString()
            let result = StreamScrubber.scrub("Basic " + encoded, with: patterns)
            #expect(result.contains("[REDACTED:tok]"), "prefix '\(prefix)': \(result)")
        }
    }

    @Test func literalSpellingsAndEmbeddedAddresses() {
        for (text, expected) in [
            ("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"), ("0177.0.0.01", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"), ("[::ffff:7f00:1]", "::ffff:127.0.0.1"), ("169.254.43518", "169.254.169.254"),
        ] {
            #expect(IPAddress(literal: text)?.description == expected, "\(text)")
        }
        for text in ["example.com", "1.2.3.4.5", "256.1.1.1", "[::1%eth0]", "1e100"] { #expect(IPAddress(literal: text) == nil, "\(text)") }
        for refused in [
            "127.0.0.1", "10.0.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.100.100.200", "224.0.0.1",
            "0.0.0.0", "255.255.255.255", "::1", "::", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1", "2002:a00:1::", "fe80::1",
            "fd00:ec2::254", "ff02::1", "2001::1", "::ffff:0:7f00:1",
        ] {
            #expect(IPAddress(literal: refused)?.refusal != nil, "\(refused) must be refused")
        }
        for allowed in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            #expect(IPAddress(literal: allowed)?.refusal == nil, "\(allowed) is public")
        }
        #expect(HostName.canonical("ALLOWED.Example.") == "allowed.example")
        #expect(HostName.canonical("a..b") == nil)
        #expect(HostName.canonical("exämple.com") == nil)
        #expect(HostName.canonical("foo.123") == nil)
    }

    @Test func controlMessagesNeverShowCredentialValues() throws {
        let line = Array(#"{"type":"credentials","id":1,"credentials":{"gh":"hunter2-secret"}}"#.utf8)
        let message = try ControlMessage.parse(line)
        #expect(!"\(message)".contains("hunter2"))
        #expect("\(message)".contains("gh"))
        let bad = Array(#"{"type":"credentials","credentials":{"gh":5},"x":"hunter2-secret"}"#.utf8)
        #expect(throws: ProxyError.self) { try ControlMessage.parse(bad) }
        do { _ = try ControlMessage.parse(bad) } catch { #expect(!error.message.contains("hunter2")) }
        let secret = try Secret(name: "gh", value: "hunter2-secret")
        #expect(!"\(secret)".contains("hunter2") && !"\(ScrubPatterns([secret]))".contains("hunter2"))
    }

    /// An egress event's line is written by hand (not `JSONEncoder`): agentd must read back
    /// exactly the event, whatever its strings hold (a path and a rule come from the sandbox).
    @Test func egressEventLinesReadBackAsTheSameEvent() throws {
        let hostile = "q\"uo\\te\u{0}\u{1F}\n\r\t/é😀\u{7F}"
        let full = EgressEvent(
            type: "egress.denied", sandbox: "sb-1", session: "s-1", task: "t\(hostile)", toolIntentSeq: 42, method: "GET",
            host: "evil.example:443", route: "r\(hostile)", path: "/a?[REDACTED]\(hostile)", credential: "gh", rule: "rule \(hostile)",
            status: 403, bytesUp: 1 << 40, bytesDown: 0, durationMs: 7)
        var sparse = full
        (sparse.task, sparse.toolIntentSeq, sparse.route, sparse.path, sparse.credential) = (nil, nil, nil, nil, nil)
        for event in [full, sparse] {
            let line = ControlMessage.egress(event).line()
            #expect(line.last == 0x0A && line.dropLast().allSatisfy { $0 != 0x0A }, "one line")
            guard case .egress(let back) = try ControlMessage.parse(Array(line.dropLast())) else {
                Issue.record("not an egress message: \(String(decoding: line, as: UTF8.self))")
                continue
            }
            #expect(back == event)
        }
    }
}

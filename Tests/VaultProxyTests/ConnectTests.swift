import Foundation
import NIOPosix
import Testing
import TestSupport

@testable import VaultProxy

/// Answers fixed addresses for names; its answers are checked like the system resolver's.
struct StaticResolver: HostResolver {
    let table: [String: [IPAddress]]
    func resolve(_ host: String) async throws -> [IPAddress] {
        guard let addresses = table[host] else { throw ProxyError("cannot resolve \(host): no such test name") }
        return addresses
    }
}

@Suite(.serialized) struct ConnectTests {
    static func status(_ answer: String) -> Int {
        answer.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0
    }

    static func body(_ answer: String) -> String {
        answer.range(of: "\r\n\r\n").map { String(answer[$0.upperBound...]) } ?? ""
    }

    @Test func tunnelReachesAnAllowedHostWithoutCredentials() async throws {
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let fixture = try await ProxyFixture(upstream: nil, allowHosts: ["allowed.example"], ports: [upstream.port]) {
            $0.trustedOverrides["allowed.example"] = [IPAddress(literal: "127.0.0.1")!]
        }
        defer { Task { await fixture.shutdown() } }
        try fixture.proxy.setIntent(sandbox: "sandbox-1", task: nil, seq: 9)
        let bridge = try await TCPBridge(to: fixture.socketPath)
        let r = try run([
            "curl", "-sS", "--max-time", "30", "--proxy", "http://127.0.0.1:\(bridge.port)", "--cacert", upstream.ca.caFile,
            "https://allowed.example:\(upstream.port)/through/tunnel",
        ])
        #expect(r.status == 0, "\(r.err)")
        let doc = try #require(try JSONSerialization.jsonObject(with: r.out) as? [String: Any])
        #expect(doc["path"] as? String == "/through/tunnel")
        #expect(doc["authCount"] as? Int == 0, "CONNECT adds no credential")

        let event = await fixture.events.first { $0.method == "CONNECT" && $0.status == 200 }
        #expect(event.type == "egress.allowed")
        #expect(event.host == "allowed.example:\(upstream.port)")
        #expect(event.rule == "network.allowHosts allowed.example")
        #expect(event.toolIntentSeq == 9 && event.task == "task-1")
        #expect(event.bytesUp > 0 && event.bytesDown > 0)

        // Upper case and a trailing dot are the same name.
        let canonical = try fixture.rawHead("CONNECT ALLOWED.EXAMPLE.:\(upstream.port) HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(Self.status(canonical) == 200, "\(canonical)")
    }

    @Test func refusalsNameThePolicyAndTheRule() async throws {
        let resolver = StaticResolver(table: [
            "private.example": [IPAddress(literal: "10.1.2.3")!],
            "mapped.example": [IPAddress(literal: "::ffff:127.0.0.1")!],
            "nat64.example": [IPAddress(literal: "64:ff9b::a9fe:a9fe")!],
            "sixtofour.example": [IPAddress(literal: "2002:7f00:1::1")!],
            "mixed.example": [IPAddress(literal: "93.184.216.34")!, IPAddress(literal: "169.254.169.254")!],
        ])
        let fixture = try await ProxyFixture(
            upstream: nil,
            allowHosts: ["allowed.example", "private.example", "mapped.example", "nat64.example", "sixtofour.example", "mixed.example", "*.pkg.example", "ssh.example:22"]
        ) { $0.resolver = resolver }
        defer { Task { await fixture.shutdown() } }

        func refused(_ target: String, _ expectedBody: String, status: Int = 403, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let answer = try fixture.raw("CONNECT \(target) HTTP/1.1\r\nHost: \(target)\r\n\r\n")
            #expect(Self.status(answer) == status, "\(target): \(answer)", sourceLocation: sourceLocation)
            #expect(Self.body(answer) == expectedBody, "\(target)", sourceLocation: sourceLocation)
        }
        let literal = "IP literals are refused unless network.allowHosts lists them"
        try refused("127.1:443", "egress to 127.0.0.1:443 refused by policy coding-agent: \(literal)\n")
        try refused("2130706433:443", "egress to 127.0.0.1:443 refused by policy coding-agent: \(literal)\n")
        try refused("0x7f.0.0.1:443", "egress to 127.0.0.1:443 refused by policy coding-agent: \(literal)\n")
        try refused("0177.0.0.1:443", "egress to 127.0.0.1:443 refused by policy coding-agent: \(literal)\n")
        try refused("[::ffff:7f00:1]:443", "egress to [::ffff:127.0.0.1]:443 refused by policy coding-agent: \(literal)\n")
        try refused("[::ffff:169.254.169.254]:443", "egress to [::ffff:169.254.169.254]:443 refused by policy coding-agent: \(literal)\n")
        try refused("[::1]:443", "egress to [::1]:443 refused by policy coding-agent: \(literal)\n")
        try refused("evil.example:443", "egress to evil.example:443 refused by policy coding-agent: not in network.allowHosts\n")
        try refused(
            "allowed.example.evil.example:443", "egress to allowed.example.evil.example:443 refused by policy coding-agent: not in network.allowHosts\n")
        try refused("pkg.example:443", "egress to pkg.example:443 refused by policy coding-agent: not in network.allowHosts\n")
        try refused("allowed.example:22", "egress to allowed.example:22 refused by policy coding-agent: port 22 is not allowed for allowed.example (allowed: 443)\n")
        try refused("ssh.example:443", "egress to ssh.example:443 refused by policy coding-agent: port 443 is not allowed for ssh.example (allowed: 22)\n")
        try refused(
            "private.example:443",
            "egress to private.example:443 refused by policy coding-agent: private.example resolves to 10.1.2.3, a private address (10.0.0.0/8)\n")
        try refused(
            "mapped.example:443",
            "egress to mapped.example:443 refused by policy coding-agent: mapped.example resolves to ::ffff:127.0.0.1, an IPv4-mapped form of a loopback address (127.0.0.0/8)\n"
        )
        try refused(
            "nat64.example:443",
            "egress to nat64.example:443 refused by policy coding-agent: nat64.example resolves to 64:ff9b::a9fe:a9fe, a NAT64 form of the cloud metadata address\n")
        try refused(
            "sixtofour.example:443",
            "egress to sixtofour.example:443 refused by policy coding-agent: sixtofour.example resolves to 2002:7f00:1::1, a 6to4 form of a loopback address (127.0.0.0/8)\n"
        )
        try refused(
            "mixed.example:443",
            "egress to mixed.example:443 refused by policy coding-agent: mixed.example resolves to 169.254.169.254, the cloud metadata address\n")
        try refused("bad_host!:443", "egress to bad_host!:443 refused by policy coding-agent: 'bad_host!' is not a valid host name\n")
        // Malformed targets are 400s.
        let noPort = try fixture.raw("CONNECT allowed.example HTTP/1.1\r\n\r\n")
        #expect(Self.status(noPort) == 400)
        let crlf = try fixture.raw("CONNECT allowed.example:443\r\nX: y HTTP/1.1\r\n\r\n")
        #expect(Self.status(crlf) == 400, "\(crlf)")
        let cr = try fixture.raw("CONNECT allowed.example\r:443 HTTP/1.1\r\n\r\n")
        #expect(Self.status(cr) == 400, "\(cr)")

        let event = await fixture.events.first { $0.host == "evil.example:443" }
        #expect(event.type == "egress.denied")
        #expect(event.method == "CONNECT" && event.status == 403 && event.rule == "not in network.allowHosts")
        #expect(event.sandbox == "sandbox-1" && event.session == "session-1" && event.task == "task-1")
    }

    @Test func listedLiteralsAndAllowedSuffixesPassTheCheck() throws {
        let context = try ListenerContext(
            spec: SandboxSpec(
                sandbox: "s", session: "s", policy: "p", socketPath: "/tmp/x",
                network: NetworkRules(allowHosts: ["*.pkg.example", "203.0.113.7", "[2001:db8::1]:8443"], ports: [443, 8443])),
            proxy: ProxyCore(group: MultiThreadedEventLoopGroup.singleton, configuration: ProxyConfiguration(), logger: .init(label: "t"), emit: { _ in }))
        func allowed(_ target: String) -> Bool {
            if case .allowed = context.checkConnect(target) { return true }
            return false
        }
        #expect(allowed("a.pkg.example:443"))
        #expect(allowed("A.B.PKG.EXAMPLE.:8443"))
        #expect(!allowed("pkg.example:443"))
        #expect(!allowed("xpkg.example:443"))
        #expect(allowed("203.0.113.7:443"))
        #expect(allowed("3405803783:443"), "another spelling of a listed literal is the same address")
        #expect(allowed("[2001:db8::1]:8443"))
        #expect(!allowed("[2001:db8::1]:443"))
    }
}

extension ProxyFixture {
    /// Sends `request` and returns the first response head without waiting for a close.
    func rawHead(_ request: String) throws -> String { try rawExchange(socketPath, Array(request.utf8), readUntilClose: false) }
}

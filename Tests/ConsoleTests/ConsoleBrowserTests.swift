import AgentdAPI
import AgentdClient
import Foundation
import JSONValues
@testable import SessionLog
import Testing
import TestSupport

/// The web console in a real browser: headless Chromium from Debian, driven over the DevTools
/// protocol, against a real agentd on a TCP listener with a token.
///
/// `AGENTD_CONSOLE_SCREENSHOTS=docs/console` (a directory, relative to the repository) makes
/// the tests write the screenshots docs/console.md shows.
@Suite("web console in headless Chromium", .serialized)
struct ConsoleBrowserTests {
    @Test("a session's timeline shows its events in order, follows a new one without a reload, and shows the chain intact")
    func timelineFollowsLive() async throws {
        try await withConsole { agentd, browser in
            let c = agentd.client
            let id = try await c.createSession(policy: "default").id
            let epoch = try await c.wake(id).epoch
            _ = try await c.execute(session: id, tool: "bash", input: Data(#"{"command": "echo hello from the sandbox; seq 1 40"}"#.utf8), epoch: epoch)
            _ = try await c.checkpoint(id, state: .object(["step": .number(1)]), epoch: epoch)
            let journaled = try await c.events(id)
            try await browser.navigate(agentd.url("/ui/#/session/\(id)"))
            try await browser.waitFor("document.querySelectorAll('#timeline > li').length >= \(journaled.count)")
            let shown = try await browser.evaluate(
                "[...document.querySelectorAll('#timeline > li')].map(li => [Number(li.dataset.seq), li.dataset.type])", as: [[Seq]].self)
            #expect(shown.map { $0[0].number } == journaled.map { Int($0.seq) }, "the timeline lists every event once, in journal order")
            #expect(shown.map { $0[1].text } == journaled.map(\.type))
            #expect(journaled.map(\.type).contains("tool.result") && journaled.map(\.type).contains("hands.provisioned"))
            let output = try await browser.evaluate("document.querySelector('#timeline li[data-type=\"tool.result\"]').textContent", as: String.self)
            #expect(output.contains("hello from the sandbox"), "the tool call's output is on the timeline")
            try await browser.waitFor("document.querySelector('#verify').dataset.state === 'intact'")
            try await browser.waitFor("document.querySelector('#stream').textContent === 'following live'")

            // A new event, appended through the API while the page is open, appears on it.
            _ = try await browser.evaluate("(window.__sameDocument = 'yes')", as: String.self)
            let next = try await c.checkpoint(id, state: .object(["step": .number(2)]), epoch: epoch).seq
            try await browser.waitFor("document.querySelector('#timeline > li[data-seq=\"\(next)\"][data-type=\"agentd.checkpoint\"]')")
            #expect(try await browser.evaluate("window.__sameDocument", as: String.self) == "yes", "no reload happened")
            try await agentd.screenshot(browser, "timeline.png")
        }
    }

    @Test("a damaged session shows the seq where its hash chain breaks")
    func brokenChain() async throws {
        try await withConsole { agentd, browser in
            let c = agentd.client
            let id = try await c.createSession(policy: "default").id
            let epoch = try await c.wake(id).epoch
            var marked: UInt64 = 0
            for step in 1...6 {
                let seq = try await c.checkpoint(id, state: .object(["mark": .string("step-\(step)-of-six")]), epoch: epoch).seq
                if step == 3 { marked = seq }
            }
            // Rewrite one payload on disk and fix both checksums, as an attacker would: only
            // the hash chain can tell, at the next record.
            agentd.stop()
            try damagePayload(in: agentd.stateDir + "/journal", marker: "step-3-of-six")
            try await agentd.start()
            let verify = try await c.verify(id)
            #expect(verify.intact == false)
            let broken = try #require(verify.firstBroken).seq
            #expect(broken == marked + 1, "the record after the rewritten one no longer links")

            try await browser.navigate(agentd.url("/ui/#/session/\(id)"))
            try await browser.waitFor("document.querySelector('#verify').dataset.state === 'broken'")
            #expect(try await browser.evaluate("document.querySelector('#verify').dataset.seq", as: String.self) == "\(broken)")
            let text = try await browser.evaluate("document.querySelector('#verify').textContent", as: String.self)
            #expect(text.contains("Chain broken at seq \(broken)") && text.contains("seg-"), "\(text)")
            try await agentd.screenshot(browser, "broken-chain.png")
        }
    }

    @Test("over TCP a page or API call without the token is refused (401); the login cookie opens the console for reads only")
    func tokenRequired() async throws {
        try await withConsole(login: false) { agentd, browser in
            let c = agentd.client
            let id = try await c.createSession(policy: "default").id
            // Two more, so that the list (and its screenshot) has something to filter.
            let other = try await c.createSession(policy: "offline-data").id
            _ = try await c.checkpoint(try await c.createSession(policy: "default").id, state: .object(["step": .number(1)]))
            for path in ["/ui/", "/v1/sessions"] {
                try await browser.navigate(agentd.url(path))
                #expect(try await browser.evaluate("performance.getEntriesByType('navigation')[0].responseStatus", as: Int.self) == 401, "\(path)")
            }
            try await browser.navigate(agentd.url("/ui/"))
            try await browser.waitFor("document.getElementById('refused')")

            // A wrong token brings the login page back, with no cookie.
            try await agentd.logIn(browser, token: "wrong-" + agentd.token)
            #expect(try await browser.evaluate("location.pathname", as: String.self) == "/ui/login")
            try await browser.navigate(agentd.url("/ui/"))
            #expect(try await browser.evaluate("performance.getEntriesByType('navigation')[0].responseStatus", as: Int.self) == 401)

            try await agentd.logIn(browser, token: agentd.token)
            try await browser.waitFor("document.querySelector('#sessions tr[data-session=\"\(id)\"]')")
            #expect(try await browser.evaluate("document.cookie", as: String.self) == "", "the cookie is HttpOnly")
            // The cookie reads; it changes nothing.
            let get = try await browser.evaluate("fetch('/v1/sessions').then(r => r.status)", as: Int.self)
            let post = try await browser.evaluate(
                "fetch('/v1/sessions', {method: 'POST', headers: {'content-type': 'application/json'}, body: '{}'}).then(r => r.status)", as: Int.self)
            #expect(get == 200 && post == 401, "GET \(get), POST \(post)")
            #expect(try await c.sessions().count == 3, "the refused POST created nothing")
            try await browser.waitFor("document.querySelectorAll('#sessions tbody tr').length === 3")
            try await agentd.screenshot(browser, "sessions.png")
            // The policy filter keeps the matching session only.
            try await browser.navigate(agentd.url("/ui/#/sessions?policy=offline-data"))
            try await browser.waitFor("document.querySelectorAll('#sessions tbody tr').length === 1")
            #expect(try await browser.evaluate("document.querySelector('#sessions tbody tr').dataset.session", as: String.self) == other)
        }
    }

    @Test("event content with HTML and script in it is shown as text, never run")
    func hostileContentIsText() async throws {
        try await withConsole { agentd, browser in
            let c = agentd.client
            let id = try await c.createSession(policy: "default").id
            let epoch = try await c.wake(id).epoch
            let hostile = #"<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b id="injected">bold</b>"#
            let seq = try await c.checkpoint(id, state: .object(["note": .string(hostile)]), epoch: epoch).seq
            try await browser.navigate(agentd.url("/ui/#/session/\(id)"))
            let item = "document.querySelector('#timeline > li[data-seq=\"\(seq)\"]')"
            try await browser.waitFor(item)
            #expect(try await browser.evaluate("\(item).textContent.includes('<img src=x onerror=')", as: Bool.self), "the markup shows as text")
            #expect(try await browser.evaluate("document.querySelectorAll('#view img, #view script, #injected').length", as: Int.self) == 0)
            #expect(try await browser.evaluate("typeof window.__pwned", as: String.self) == "undefined")
        }
    }

    @Test("the sandboxes page lists a live sandbox and the warm pools; the policies page shows an error at file:line:col")
    func sandboxesAndPolicies() async throws {
        // The shipped policies and one broken file.
        let policies = "/tmp/agentd-console-policies-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: policies, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: policies) }
        for name in try FileManager.default.contentsOfDirectory(atPath: ConsoleAgentd.shippedPolicies) where name.hasSuffix(".yaml") {
            try FileManager.default.copyItem(atPath: ConsoleAgentd.shippedPolicies + "/" + name, toPath: policies + "/" + name)
        }
        try await withConsole(policies: policies) { agentd, browser in
            let c = agentd.client
            // A broken file, reloaded: the set is refused (the last good one stays) and its
            // errors are what GET /v1/policies reports.
            try "name: broken\nhands:\n  driver: container\n  memory: [not, a, size\n".write(toFile: policies + "/broken.yaml", atomically: true, encoding: .utf8)
            _ = try await c.call("POST", "/v1/policies/reload", body: Data("{}".utf8))
            #expect(try await c.policies().errors.contains { $0.contains("broken.yaml:") })
            let id = try await c.createSession(policy: "default").id
            let epoch = try await c.wake(id).epoch
            _ = try await c.execute(session: id, tool: "bash", input: Data(#"{"command": "true"}"#.utf8), task: "build", epoch: epoch)
            let live = try await c.sandboxes()
            #expect(live.contains { $0.session == id && $0.task == "build" }, "GET /v1/sandboxes lists the task's sandbox")

            try await browser.navigate(agentd.url("/ui/#/sandboxes"))
            try await browser.waitFor("document.querySelector('#sandboxes tr[data-sandbox] a')?.textContent === '\(id)'")
            try await browser.waitFor("document.querySelector('#pools table, #pools p')")
            try await agentd.screenshot(browser, "sandboxes.png")

            try await browser.navigate(agentd.url("/ui/#/policies"))
            try await browser.waitFor("document.querySelector('#policies tr[data-policy=\"default\"]')")
            let errors = try await browser.evaluate("[...document.querySelectorAll('.policy-error')].map(e => e.textContent)", as: [String].self)
            #expect(errors.contains { $0.range(of: #"broken\.yaml:\d+:\d+: "#, options: .regularExpression) != nil }, "\(errors)")
            try await agentd.screenshot(browser, "policies.png")
        }
    }
}

/// A number or a string in a JSON array the page returns.
enum Seq: Decodable {
    case number(Int), text(String)
    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(Int.self) { self = .number(n) } else { self = .text(try c.decode(String.self)) }
    }
    var number: Int? { if case .number(let n) = self { n } else { nil } }
    var text: String? { if case .text(let s) = self { s } else { nil } }
}

/// Rewrites one byte of the payload holding `marker` in a journal segment of `directory` and
/// fixes the record's two checksums (the layout in Sources/SessionLog/Record.swift), so that
/// only the hash chain can tell.
func damagePayload(in directory: String, marker: String) throws {
    let needle = Array(marker.utf8)
    for name in try FileManager.default.contentsOfDirectory(atPath: directory).sorted() where name.hasPrefix("seg-") {
        let path = directory + "/" + name
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        guard let at = firstIndex(of: needle, in: bytes) else { continue }
        let magic = Array("AGJR".utf8)
        var start = at
        while start >= 0, Array(bytes[start..<(start + 4)]) != magic { start -= 1 }
        #expect(start >= 0, "the record holding the marker starts with AGJR")
        let length = Int(UInt32(littleEndian: bytes[(start + 4)..<(start + 8)].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }))
        bytes[at + needle.count - 5] ^= 0x01  // "-of-six": a letter of the payload
        let record = Array(bytes[start..<(start + length)])
        let sidLen = Int(record[18])
        let body = CRC32C.checksum(Array(record[16...]))
        let identity = CRC32C.checksum(Array(record[16..<(88 + sidLen)]))
        withUnsafeBytes(of: body.littleEndian) { for i in 0..<4 { bytes[start + 8 + i] = $0[i] } }
        withUnsafeBytes(of: identity.littleEndian) { for i in 0..<4 { bytes[start + 12 + i] = $0[i] } }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return
    }
    throw Chromium.Failure(description: "no segment in \(directory) holds \(marker)")
}

private func firstIndex(of needle: [UInt8], in haystack: [UInt8]) -> Int? {
    guard haystack.count >= needle.count else { return nil }
    for i in 0...(haystack.count - needle.count) where haystack[i] == needle[0] && Array(haystack[i..<(i + needle.count)]) == needle {
        return i
    }
    return nil
}

@testable import Console
import Foundation
import Testing

/// The login cookie and the router without a browser: what is let in, and what is not.
@Suite("console auth and router")
struct ConsoleAuthTests {
    let auth = ConsoleAuth(token: "a-token-of-sixteen-chars-or-more")
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    /// The `agentd_console=…` pair a right login sets.
    func loginCookie(_ auth: ConsoleAuth, body: String) -> String? {
        let page = auth.answer(method: "POST", path: "/ui/login", body: Array(body.utf8), now: now)
        return page.headers.first { $0.0 == "set-cookie" }.map { String($0.1.split(separator: ";")[0]) }
    }

    @Test("a right token gets a cookie that opens GETs only, until it expires; a wrong one gets none")
    func cookie() throws {
        #expect(loginCookie(auth, body: "token=wrong") == nil)
        let cookie = try #require(loginCookie(auth, body: "token=a-token-of-sixteen-chars-or-more"))
        let page = auth.answer(method: "POST", path: "/ui/login", body: Array("token=a-token-of-sixteen-chars-or-more".utf8), now: now)
        let attributes = page.headers.first { $0.0 == "set-cookie" }?.1 ?? ""
        #expect(attributes.contains("HttpOnly") && attributes.contains("SameSite=Strict"))
        #expect(auth.admit(method: "GET", path: "/v1/sessions", bearerValid: false, cookies: ["x=1; " + cookie], now: now) == .admitted)
        #expect(auth.admit(method: "GET", path: "/ui/", bearerValid: false, cookies: [cookie], now: now) == .admitted)
        for method in ["POST", "DELETE", "PUT", "PATCH"] {
            #expect(auth.admit(method: method, path: "/v1/sessions", bearerValid: false, cookies: [cookie], now: now) == .refused, "\(method)")
        }
        let later = now.addingTimeInterval(ConsoleAuth.lifetime + 1)
        #expect(auth.admit(method: "GET", path: "/v1/sessions", bearerValid: false, cookies: [cookie], now: later) == .refused, "expired")
        let other = ConsoleAuth(token: "another-token-of-sixteen-chars")
        #expect(other.admit(method: "GET", path: "/v1/sessions", bearerValid: false, cookies: [cookie], now: now) == .refused, "another token's")
        var tampered = cookie
        tampered.removeLast()
        tampered += cookie.hasSuffix("0") ? "1" : "0"
        #expect(auth.admit(method: "GET", path: "/v1/sessions", bearerValid: false, cookies: [tampered], now: now) == .refused)
        // A later expiry with the old MAC is refused too.
        let parts = cookie.split(separator: ".")
        let extended = "\(parts[0]).\(Int(parts[1])! + 3600).\(parts[2])"
        #expect(auth.admit(method: "GET", path: "/v1/sessions", bearerValid: false, cookies: [extended], now: now) == .refused)
    }

    @Test("only the login page, its stylesheet, login and logout are open without the token")
    func openPaths() {
        #expect(auth.admit(method: "GET", path: "/ui/login", bearerValid: false, cookies: []) == .open)
        #expect(auth.admit(method: "GET", path: "/ui/console.css", bearerValid: false, cookies: []) == .open)
        #expect(auth.admit(method: "POST", path: "/ui/login", bearerValid: false, cookies: []) == .open)
        for path in ["/ui/", "/ui/console.js", "/ui", "/v1/health", "/metrics"] {
            #expect(auth.admit(method: "GET", path: path, bearerValid: false, cookies: []) == .refused, "\(path)")
        }
        #expect(ConsoleAuth.refusal(path: "/ui/")?.status == 401)
        #expect(ConsoleAuth.refusal(path: "/v1/sessions") == nil, "the API answers its own JSON 401")
        #expect(auth.admit(method: "POST", path: "/v1/sessions", bearerValid: true, cookies: []) == .admitted)
    }

    @Test("pages come with their content type, a strict CSP and an ETag; a match is a 304; the console is read-only")
    func router() throws {
        let js = try #require(ConsoleAssets.respond(method: "GET", path: "/ui/console.js"))
        #expect(js.status == 200 && !js.body.isEmpty)
        let headers = Dictionary(js.headers, uniquingKeysWith: { a, _ in a })
        #expect(headers["content-type"] == "text/javascript; charset=utf-8")
        #expect(headers["content-security-policy"]?.contains("script-src 'self'") == true)
        #expect(headers["x-content-type-options"] == "nosniff")
        let etag = try #require(headers["etag"])
        #expect(ConsoleAssets.respond(method: "GET", path: "/ui/console.js", ifNoneMatch: etag)?.status == 304)
        #expect(ConsoleAssets.respond(method: "GET", path: "/ui/")?.headers.contains { $0 == ("content-type", "text/html; charset=utf-8") } == true)
        #expect(ConsoleAssets.respond(method: "GET", path: "/ui")?.status == 303)
        #expect(ConsoleAssets.respond(method: "GET", path: "/ui/nope")?.status == 404)
        #expect(ConsoleAssets.respond(method: "DELETE", path: "/ui/")?.status == 405)
        #expect(ConsoleAssets.respond(method: "GET", path: "/v1/sessions") == nil)
        // No inline script anywhere: the CSP would block it, and the pages do not need it.
        let html = String(decoding: try #require(ConsoleAssets.respond(method: "GET", path: "/ui/")).body, as: UTF8.self)
        #expect(!html.contains("<script>") && html.contains(#"<script src="/ui/console.js""#))
        let script = String(decoding: js.body, as: UTF8.self)
        #expect(!script.contains("innerHTML") && !script.contains("insertAdjacentHTML") && !script.contains("document.write"))
    }
}

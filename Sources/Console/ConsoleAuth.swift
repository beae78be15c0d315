import Crypto
import Foundation

/// How a browser proves it holds the TCP listener's token, since it cannot put a bearer header
/// on a navigation or a streaming request.
///
/// `POST /ui/login` takes the token from a form (no JavaScript) and answers with a cookie
/// `agentd_console=v1.<expiry>.<HMAC-SHA256(token, "agentd console v1 " + expiry)>`:
/// HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), valid for
/// ``lifetime``. The cookie is accepted **only on GET and HEAD**, which change nothing: a
/// forged cross-site request can at worst read nothing (it cannot see the answer), and every
/// request that changes state still needs `Authorization: Bearer`. The cookie is not the
/// token: it cannot be replayed as a bearer, and it expires. Rotating `AGENTD_TOKEN` (a
/// restart) invalidates every cookie.
///
/// This holds only while no GET route of the API changes state: keep it so.
public struct ConsoleAuth: Sendable {
    public static let cookieName = "agentd_console"
    /// How long a login lasts (12 h).
    public static let lifetime: TimeInterval = 12 * 3600
    /// The largest login form accepted (the token is far smaller).
    public static let maxLoginBytes = 4096

    private let token: [UInt8]

    public init(token: String) {
        self.token = Array(token.utf8)
    }

    /// What the server does with a request on a listener that needs the token.
    public enum Admission: Sendable, Equatable {
        /// Let it through to the API (the bearer token or a valid cookie on a GET).
        case admitted
        /// A console request that needs no token: the login page, its stylesheet, logging in
        /// and out. The server reads its (small) body and calls ``answer(method:path:body:now:)``
        /// for a POST.
        case open
        /// Refuse it (401): ``refusal(path:)`` says how.
        case refused
    }

    /// Decides on a request from its head: `bearerValid` is whether its `Authorization`
    /// header carries the token (the server checks that), `cookies` its `Cookie` headers.
    public func admit(method: String, path: String, bearerValid: Bool, cookies: [String], now: Date = Date()) -> Admission {
        if bearerValid { return .admitted }
        if ConsoleAssets.isConsole(path) {
            if method == "POST", path == "/ui/login" || path == "/ui/logout" { return .open }
            if method == "GET" || method == "HEAD", ConsoleAssets.publicPaths.contains(path) { return .open }
        }
        if method == "GET" || method == "HEAD", cookies.contains(where: { accepts(cookieHeader: $0, now: now) }) { return .admitted }
        return .refused
    }

    /// The 401 for a refused request: for a console page, an HTML page that links to the login
    /// page; nil for an API path (the server answers with its JSON error).
    public static func refusal(path: String) -> ConsoleAssets.Page? {
        guard ConsoleAssets.isConsole(path) else { return nil }
        let body = """
            <!doctype html><html lang="en"><head><meta charset="utf-8"><title>agentd: log in</title>\
            <link rel="stylesheet" href="/ui/console.css"></head><body><main class="narrow"><h1>agentd</h1>\
            <p id="refused">This listener needs the token. <a href="/ui/login">Log in</a> with AGENTD_TOKEN.</p></main></body></html>

            """
        return ConsoleAssets.Page(
            status: 401, headers: ConsoleAssets.headers(type: "text/html; charset=utf-8") + [("www-authenticate", "Bearer")], body: Array(body.utf8))
    }

    /// The answer to `POST /ui/login` (a form with `token=`) or `POST /ui/logout` on a listener
    /// that needs the token.
    public func answer(method: String, path: String, body: [UInt8], now: Date = Date()) -> ConsoleAssets.Page {
        if path == "/ui/logout" {
            return ConsoleAssets.redirect("/ui/login", extra: [("set-cookie", "\(Self.cookieName)=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")])
        }
        guard body.count <= Self.maxLoginBytes else { return ConsoleAssets.text(413, "the login form is larger than \(Self.maxLoginBytes) bytes") }
        let given = Self.formField("token", in: body).map { Array($0.utf8) } ?? []
        guard Self.constantTimeEqual(given, token) else {
            return ConsoleAssets.redirect("/ui/login#wrong-token")
        }
        let attributes = "Path=/; Max-Age=\(Int(Self.lifetime)); HttpOnly; SameSite=Strict"
        return ConsoleAssets.redirect("/ui/", extra: [("set-cookie", "\(Self.cookieName)=\(cookieValue(now: now)); \(attributes)")])
    }

    /// The cookie value issued at `now`.
    func cookieValue(now: Date) -> String {
        let expiry = Int(now.timeIntervalSince1970 + Self.lifetime)
        return "v1.\(expiry).\(mac(expiry))"
    }

    /// Whether a `Cookie` header holds a console cookie of this token that has not expired.
    func accepts(cookieHeader: String, now: Date) -> Bool {
        for pair in cookieHeader.split(separator: ";") {
            let kv = pair.trimmingCharacters(in: .whitespaces).split(separator: "=", maxSplits: 1)
            guard kv.count == 2, kv[0] == Self.cookieName else { continue }
            let parts = kv[1].split(separator: ".")
            guard parts.count == 3, parts[0] == "v1", let expiry = Int(parts[1]), Double(expiry) > now.timeIntervalSince1970 else { continue }
            if Self.constantTimeEqual(Array(parts[2].utf8), Array(mac(expiry).utf8)) { return true }
        }
        return false
    }

    private func mac(_ expiry: Int) -> String {
        let code = HMAC<SHA256>.authenticationCode(for: Array("agentd console v1 \(expiry)".utf8), using: SymmetricKey(data: token))
        return code.map { String(format: "%02x", $0) }.joined()
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return zip(a, b).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
    }

    /// A field of an `application/x-www-form-urlencoded` body, decoded.
    static func formField(_ name: String, in body: [UInt8]) -> String? {
        for pair in String(decoding: body, as: UTF8.self).split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard kv.first == Substring(name) else { continue }
            let raw = kv.count > 1 ? String(kv[1]).replacingOccurrences(of: "+", with: " ") : ""
            return raw.removingPercentEncoding ?? raw
        }
        return nil
    }
}

/// The web console's static pages, served from the binary at `/ui/`.
///
/// The assets are the files in `Assets/`, embedded at build time by SwiftPM
/// (`resources: [.embedInCode(...)]` in Package.swift turns each file into a `[UInt8]` in the
/// generated `PackageResources`), so that editing the console is editing plain HTML, CSS and
/// JavaScript, and agentd needs nothing next to its executable. The pages hold no data: the
/// script reads everything from the same public API that agentctl uses.
public enum ConsoleAssets {
    /// An answer to a `/ui/` request.
    public struct Page: Sendable {
        public var status: Int
        public var headers: [(String, String)]
        public var body: [UInt8]
    }

    /// The Content-Security-Policy of every console answer: the page's own script and style
    /// only, no inline script, no framing, requests to its own origin only. Event content is
    /// hostile; the script renders it with `textContent` only, and this is the second wall.
    public static let contentSecurityPolicy =
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        + "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

    private struct Asset {
        let bytes: [UInt8]
        let type: String
        let etag: String
        init(_ bytes: [UInt8], _ type: String) {
            self.bytes = bytes
            self.type = type
            etag = "\"" + fnv1a(bytes) + "\""
        }
    }

    private static let assets: [String: Asset] = [
        "/ui/": Asset(PackageResources.index_html, "text/html; charset=utf-8"),
        "/ui/login": Asset(PackageResources.login_html, "text/html; charset=utf-8"),
        "/ui/console.js": Asset(PackageResources.console_js, "text/javascript; charset=utf-8"),
        "/ui/console.css": Asset(PackageResources.console_css, "text/css; charset=utf-8"),
    ]

    /// The paths a TCP client may fetch without the token: the login page and its stylesheet
    /// (static, no data).
    static let publicPaths: Set<String> = ["/ui/login", "/ui/console.css"]

    /// Whether `path` is the console's (`/ui` or below).
    public static func isConsole(_ path: String) -> Bool { path == "/ui" || path.hasPrefix("/ui/") }

    /// The answer to `method path` when the path is the console's, nil otherwise (an API route).
    /// Reaching here means the request is authorized (the unix socket, or a TCP request the
    /// server let through; a login on TCP is answered by ``ConsoleAuth`` before this).
    /// - Parameter ifNoneMatch: the request's `If-None-Match`, for a 304.
    public static func respond(method: String, path: String, ifNoneMatch: String? = nil) -> Page? {
        guard isConsole(path) else { return nil }
        if path == "/ui" { return redirect("/ui/") }
        // On the unix socket there is no token to give: logging in or out only goes on.
        if method == "POST", path == "/ui/login" || path == "/ui/logout" { return redirect("/ui/") }
        guard let asset = assets[path] else {
            return text(404, "no console page at \(path); the console starts at /ui/")
        }
        guard method == "GET" || method == "HEAD" else {
            return text(405, "\(method) is not allowed on \(path): the console is read-only")
        }
        if let tag = ifNoneMatch, tag == asset.etag {
            return Page(status: 304, headers: headers(type: asset.type) + [("etag", asset.etag)], body: [])
        }
        return Page(status: 200, headers: headers(type: asset.type) + [("etag", asset.etag)], body: method == "HEAD" ? [] : asset.bytes)
    }

    /// The security and cache headers of every console answer. Pages and assets are
    /// revalidated on each load (`no-cache` with an ETag), so that an upgraded agentd serves
    /// its own console at once.
    static func headers(type: String) -> [(String, String)] {
        [
            ("content-type", type), ("cache-control", "no-cache"), ("content-security-policy", contentSecurityPolicy),
            ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer"), ("x-frame-options", "DENY"),
            ("cross-origin-opener-policy", "same-origin"),
        ]
    }

    static func redirect(_ location: String, extra: [(String, String)] = []) -> Page {
        Page(status: 303, headers: headers(type: "text/plain; charset=utf-8") + [("location", location)] + extra, body: Array("see \(location)\n".utf8))
    }

    static func text(_ status: Int, _ message: String) -> Page {
        Page(status: status, headers: headers(type: "text/plain; charset=utf-8"), body: Array((message + "\n").utf8))
    }

    /// FNV-1a, 64 bits, as hex: an ETag that changes with the content.
    private static func fnv1a(_ bytes: [UInt8]) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        return String(hash, radix: 16)
    }
}

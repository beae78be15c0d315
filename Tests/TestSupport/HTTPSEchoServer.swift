import Foundation

/// An HTTPS server on 127.0.0.1 for one test (python3's `http.server` with `ssl`, a child
/// process), with a certificate from its own `TestCA`:
/// - any method on any path answers 200 with JSON `{"method", "path", "requestLine",
///   "headers": [[name, value], …], "body"}`: a test sees what reached the upstream (an
///   injected header) and what the upstream sends back (an echoed canary);
/// - `GET /bytes/N` streams N bytes (`x`), 64 KiB at a time, with a Content-Length;
/// - `GET /status/N` answers status N; `GET /redirect?to=URL` answers 302 to URL.
public final class HTTPSEchoServer: @unchecked Sendable {
    // Invariant: `child` is set by `start` and cleared once by `stop` (under `lock`).
    public let directory: String
    public let ca: TestCA
    public let port: Int
    private let lock = NSLock()
    private var child: ChildProcess?

    /// `https://127.0.0.1:<port><path>` (or with `host` instead of the address).
    public func url(_ path: String = "/", host: String = "127.0.0.1") -> String { "https://\(host):\(port)\(path)" }

    public static func with<T>(_ body: (HTTPSEchoServer) async throws -> T) async throws -> T {
        let server = try await start()
        defer { server.stop() }
        return try await body(server)
    }

    public static func start() async throws -> HTTPSEchoServer {
        let directory = NSTemporaryDirectory() + "agentd-echo-server-\(Components.testID())"
        let ca = try TestCA.make(in: directory + "/tls")
        let script = directory + "/echo.py"
        try Self.script.write(toFile: script, atomically: true, encoding: .utf8)
        // Debian's python3 (env-up installs it) before whatever PATH offers.
        let python = try access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : TestCommand.locate("python3")
        let log = directory + "/server.log"
        let child = try ChildProcess.spawn(
            [python, "-u", script, ca.certificatePath, ca.keyPath], environment: ["PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"], output: log)
        // The script binds port 0 and prints `listening <port>` once it accepts connections.
        var port: Int?
        _ = await eventually(.seconds(20)) {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            port = text.split(separator: "\n").first { $0.hasPrefix("listening ") }.flatMap { Int($0.dropFirst("listening ".count)) }
            return port != nil || child.exitStatusIfExited() != nil
        }
        guard let port else {
            child.terminate()
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            try? FileManager.default.removeItem(atPath: directory)
            throw TestCommand.Failed(description: "the HTTPS echo server did not start; its log:\n\(text)")
        }
        return HTTPSEchoServer(directory: directory, ca: ca, port: port, child: child)
    }

    private init(directory: String, ca: TestCA, port: Int, child: ChildProcess) {
        self.directory = directory
        self.ca = ca
        self.port = port
        self.child = child
    }

    /// The server's pid while it runs.
    public var pid: pid_t? { lock.withLock { child?.pid } }

    /// Stops the server (SIGTERM, then waits) and removes its directory.
    public func stop() {
        guard let c = lock.withLock({ () -> ChildProcess? in defer { child = nil }; return child }) else { return }
        c.terminate()
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }

    static let script = #"""
        import http.server, json, ssl, sys, urllib.parse

        CHUNK = b"x" * 65536

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "agentd-test-echo"

            def log_message(self, fmt, *args):
                sys.stderr.write("%s\n" % (fmt % args))

            def read_body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def reply(self, status, body, content_type="application/json", extra=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in extra:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_any(self):
                body = self.read_body()
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.split("/")
                if len(parts) == 3 and parts[1] == "bytes" and parts[2].isdigit():
                    remaining = int(parts[2])
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(remaining))
                    self.end_headers()
                    while remaining > 0 and self.command != "HEAD":
                        piece = CHUNK[:min(remaining, len(CHUNK))]
                        self.wfile.write(piece)
                        remaining -= len(piece)
                    return
                if len(parts) == 3 and parts[1] == "status" and parts[2].isdigit():
                    return self.reply(int(parts[2]), b"")
                if url.path == "/redirect":
                    target = urllib.parse.parse_qs(url.query).get("to", ["/"])[0]
                    return self.reply(302, b"", "text/plain", [("Location", target)])
                echo = {
                    "method": self.command,
                    "path": self.path,
                    "requestLine": self.requestline,
                    "headers": [[name, value] for name, value in self.headers.items()],
                    "body": body.decode("utf-8", "replace"),
                }
                self.reply(200, json.dumps(echo).encode())

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request, client_address):
                # The TLS handshake happens in the connection's own thread, so a slow client
                # never holds up accept.
                request = context.wrap_socket(request, server_side=True)
                super().finish_request(request, client_address)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[1], sys.argv[2])
        server = Server(("127.0.0.1", 0), Handler)
        print("listening %d" % server.server_address[1], flush=True)
        server.serve_forever()
        """#
}

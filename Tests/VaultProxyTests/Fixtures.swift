import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import SessionLog
import TestSupport

@testable import VaultProxy

/// A temporary directory removed when the fixture goes.
final class TempDir: @unchecked Sendable {
    let path: String
    init() throws {
        path = NSTemporaryDirectory() + "vaultproxy-" + UUID().uuidString.prefix(8).lowercased()
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs a command and returns its exit status, stdout and stderr.
@discardableResult
func run(_ argv: [String], stdin: Data? = nil) throws -> (status: Int32, out: Data, err: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = argv
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    let input = Pipe()
    process.standardInput = input
    try process.run()
    if let stdin { input.fileHandleForWriting.write(stdin) }
    try input.fileHandleForWriting.close()
    // Read both pipes to the end (on two threads, so a full stderr cannot block stdout).
    let errBox = NIOLockedValueBox(Data())
    let errDone = DispatchSemaphore(value: 0)
    let errThread = Thread {
        let data = err.fileHandleForReading.readDataToEndOfFile()
        errBox.withLockedValue { $0 = data }
        errDone.signal()
    }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    errDone.wait()
    return (process.terminationStatus, outData, String(decoding: errBox.withLockedValue { $0 }, as: UTF8.self))
}

/// A test CA and a server certificate for `allowed.example`, `localhost` and 127.0.0.1, made
/// with openssl.
struct TestCA {
    let dir: TempDir
    var caFile: String { dir.path + "/ca.pem" }
    var certFile: String { dir.path + "/server.pem" }
    var keyFile: String { dir.path + "/server.key" }

    init() throws {
        dir = try TempDir()
        let d = dir.path
        let steps: [[String]] = [
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "\(d)/ca.key",
             "-out", "\(d)/ca.pem", "-days", "2", "-subj", "/CN=vault-proxy test CA"],
            ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "\(d)/server.key",
             "-out", "\(d)/server.csr", "-subj", "/CN=allowed.example"],
        ]
        for step in steps {
            let r = try run(step)
            guard r.status == 0 else { throw ProxyError("openssl failed: \(r.err)") }
        }
        try "subjectAltName=DNS:allowed.example,DNS:localhost,IP:127.0.0.1\n".write(toFile: "\(d)/ext.cnf", atomically: true, encoding: .utf8)
        let sign = try run([
            "openssl", "x509", "-req", "-in", "\(d)/server.csr", "-CA", "\(d)/ca.pem", "-CAkey", "\(d)/ca.key", "-CAcreateserial",
            "-out", "\(d)/server.pem", "-days", "2", "-extfile", "\(d)/ext.cnf",
        ])
        guard sign.status == 0 else { throw ProxyError("openssl x509 failed: \(sign.err)") }
    }
}

/// A real HTTPS upstream on 127.0.0.1 (python3's http.server over ssl with the test CA's
/// certificate). `/bytes/N` serves N bytes; `/leak` echoes the bearer token raw, base64,
/// percent-encoded and JSON-escaped in 7-byte writes; `/redirect` answers 302 to another
/// origin with the token in the Location; `/gzip` answers a gzip-encoded body; `/close` answers
/// with `Connection: close`; `/drop` answers and then closes the connection (without saying so);
/// `/arm` answers and makes the connection's next request be met by a close without an answer;
/// `/stats` counts the connections that carried an Authorization header (`accepted`, `open`);
/// anything else echoes method, path, headers (and a SHA-256 of Authorization), body and the
/// client's port (`peer`: one per connection) as JSON.
final class Upstream: @unchecked Sendable {
    let process: Process
    let port: Int
    let ca: TestCA
    private let dir: TempDir

    static let script = #"""
    import sys, ssl, json, base64, urllib.parse, gzip, hashlib, threading
    from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
    LOCK = threading.Lock(); OPEN = set(); ROUTED = set()
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def setup(self):
            BaseHTTPRequestHandler.setup(self)
            with LOCK: OPEN.add(self.client_address[1])
        def finish(self):
            try: BaseHTTPRequestHandler.finish(self)
            finally:
                with LOCK: OPEN.discard(self.client_address[1])
        def body(self):
            if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
                data = b''
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline(); return data
                    data += self.rfile.read(size); self.rfile.readline()
            n = int(self.headers.get('Content-Length') or 0)
            return self.rfile.read(n) if n else b''
        def send(self, status, payload, headers=()):
            self.send_response(status)
            for k, v in headers: self.send_header(k, v)
            self.send_header('Content-Length', str(len(payload)))
            self.end_headers()
            if self.command != 'HEAD': self.wfile.write(payload)
        def any(self):
            body = self.body()
            p = urllib.parse.urlsplit(self.path)
            auth = self.headers.get('Authorization', '')
            token = auth.split(' ', 1)[1] if ' ' in auth else auth
            peer = self.client_address[1]
            if p.path == '/stats':
                with LOCK: stats = {'accepted': len(ROUTED), 'open': len(ROUTED & OPEN)}
                return self.send(200, json.dumps(stats).encode(), [('Content-Type', 'application/json')])
            if getattr(self, 'die_next', False):
                self.close_connection = True
                return
            if auth:
                with LOCK: ROUTED.add(peer)
            if p.path.startswith('/bytes/'):
                n = int(p.path[7:])
                self.send_response(200); self.send_header('Content-Length', str(n)); self.end_headers()
                chunk = b'x' * 65536
                while n > 0:
                    k = min(n, len(chunk)); self.wfile.write(chunk[:k]); n -= k
                return
            if p.path == '/redirect':
                return self.send(302, b'', [('Location', 'https://elsewhere.example/cb?t=' + urllib.parse.quote(token, safe=''))])
            if p.path == '/leak':
                forms = [token, base64.b64encode(token.encode()).decode(), urllib.parse.quote(token, safe=''), json.dumps(token)[1:-1]]
                payload = ''.join('form%d=%s\n' % (i, f) for i, f in enumerate(forms)).encode()
                self.send_response(200); self.send_header('Content-Length', str(len(payload))); self.send_header('X-Echo', token); self.end_headers()
                for i in range(0, len(payload), 7):
                    self.wfile.write(payload[i:i + 7]); self.wfile.flush()
                return
            if p.path == '/gzip':
                return self.send(200, gzip.compress(b'hello'), [('Content-Encoding', 'gzip')])
            if p.path == '/close':
                return self.send(200, b'closing', [('Connection', 'close')])
            if p.path == '/drop':
                self.send(200, b'dropping')
                self.close_connection = True
                return
            if p.path == '/arm':
                self.die_next = True
            doc = {'peer': peer, 'method': self.command, 'path': self.path, 'headers': [[k, v] for k, v in self.headers.items()],
                   'authSha256': hashlib.sha256(auth.encode()).hexdigest(), 'authCount': len(self.headers.get_all('Authorization') or []),
                   'body': body.decode('latin-1')}
            self.send(200, json.dumps(doc).encode(), [('Content-Type', 'application/json')])
        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = any
    srv = ThreadingHTTPServer(('127.0.0.1', 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
    """#

    static let python: String = {
        let r = try? run(["python3", "-c", "import sys; print(sys.executable)"])
        return r.map { String(decoding: $0.out, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) } ?? "/usr/bin/python3"
    }()

    init(ca: TestCA) throws {
        self.ca = ca
        dir = try TempDir()
        try Upstream.script.write(toFile: dir.path + "/upstream.py", atomically: true, encoding: .utf8)
        process = Process()
        // The interpreter itself, not a wrapper (a pyenv shim forks python as its child, and
        // killing the shim would leave the server running).
        process.executableURL = URL(fileURLWithPath: Upstream.python)
        process.arguments = [dir.path + "/upstream.py", ca.certFile, ca.keyFile]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        var line = Data()
        while true {
            let byte = out.fileHandleForReading.readData(ofLength: 1)
            if byte.isEmpty || byte == Data([0x0A]) { break }
            line.append(byte)
        }
        guard let port = Int(String(decoding: line, as: UTF8.self)) else { throw ProxyError("the python upstream did not start") }
        self.port = port
    }

    /// Kills the server (SIGKILL and reap; Foundation's waitUntilExit can stall a test thread).
    func stop() {
        let pid = process.processIdentifier
        guard pid > 0, kill(pid, 0) == 0 else { return }
        kill(pid, SIGKILL)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
    }

    deinit { stop() }
}

/// Records everything logged through it, to prove no credential is ever logged.
struct CapturingLogHandler: LogHandler {
    let lines: NIOLockedValueBox<[String]>
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { $1 }
        lines.withLockedValue { $0.append("\(event.level) \(event.message) \(all)") }
    }
}

/// Events as they arrive, awaitable.
final class EventCollector: Sendable {
    private let all = NIOLockedValueBox<[EgressEvent]>([])
    private let waiters = NIOLockedValueBox<[(predicate: @Sendable (EgressEvent) -> Bool, continuation: CheckedContinuation<EgressEvent, Never>)]>([])

    func receive(_ event: EgressEvent) {
        all.withLockedValue { $0.append(event) }
        let ready = waiters.withLockedValue { list in
            let matched = list.filter { $0.predicate(event) }
            list.removeAll { $0.predicate(event) }
            return matched
        }
        for w in ready { w.continuation.resume(returning: event) }
    }

    var events: [EgressEvent] { all.withLockedValue { $0 } }

    /// The first event (past or future) matching `predicate`.
    func first(where predicate: @escaping @Sendable (EgressEvent) -> Bool) async -> EgressEvent {
        await withCheckedContinuation { continuation in
            let existing: EgressEvent? = all.withLockedValue { events in
                if let e = events.first(where: predicate) { return e }
                waiters.withLockedValue { $0.append((predicate, continuation)) }
                return nil
            }
            if let existing { continuation.resume(returning: existing) }
        }
    }
}

/// A proxy in this process with one sandbox, its captured log and events.
final class ProxyFixture: @unchecked Sendable {
    /// Random, with characters that every encoding changes (`/`, `+`, `=`, `"`, `\`, space).
    static let canary = "tok-" + String(UInt64.random(in: 1...UInt64.max), radix: 16) + "/+=\"\\ end"
    let dir: TempDir
    let proxy: VaultProxy
    let events = EventCollector()
    let logLines = NIOLockedValueBox<[String]>([])
    let socketPath: String
    let policy = "coding-agent"

    init(
        upstream: Upstream?, allowHosts: [String] = ["allowed.example"], ports: [Int]? = nil,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, configure: (inout ProxyConfiguration) -> Void = { _ in }
    ) async throws {
        dir = try TempDir()
        socketPath = dir.path + "/sandbox-1/proxy.sock"
        var configuration = ProxyConfiguration()
        configure(&configuration)
        let lines = logLines
        let logger = Logger(label: "vault-proxy-test") { _ in CapturingLogHandler(lines: lines) }
        let events = self.events
        proxy = VaultProxy(group: group, configuration: configuration, logger: logger) { events.receive($0) }
        proxy.setCredentials([try Secret(name: "canary", value: ProxyFixture.canary)])
        var routes: [RouteRule] = []
        if let upstream {
            routes.append(RouteRule(name: "echo", upstream: "https://127.0.0.1:\(upstream.port)", credential: "canary", caFile: upstream.ca.caFile))
            routes.append(RouteRule(name: "prefixed", upstream: "https://localhost:\(upstream.port)/api/v3/", credential: "canary", caFile: upstream.ca.caFile))
            routes.append(RouteRule(name: "systemca", upstream: "https://127.0.0.1:\(upstream.port)", credential: "canary"))
        }
        try await proxy.addSandbox(
            SandboxSpec(
                sandbox: "sandbox-1", session: "session-1", task: "task-1", policy: policy, socketPath: socketPath,
                network: NetworkRules(allowHosts: allowHosts, ports: ports), routes: routes))
    }

    func shutdown() async { await proxy.shutdown() }

    /// `curl` through the sandbox's socket; returns status, headers and body.
    func curl(_ url: String, _ extra: [String] = []) throws -> (status: Int, headers: String, body: Data) {
        let headerFile = dir.path + "/headers-\(UUID().uuidString)"
        let r = try run(["curl", "-sS", "--path-as-is", "--max-time", "60", "--unix-socket", socketPath, "-D", headerFile, "-o", "-", url] + extra)
        let headers = (try? String(contentsOfFile: headerFile, encoding: .utf8)) ?? ""
        let statusLine = headers.split(separator: "\r\n").last { $0.hasPrefix("HTTP/") } ?? ""
        let status = statusLine.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0
        guard r.status == 0 || status != 0 else { throw ProxyError("curl failed (\(r.status)): \(r.err)") }
        return (status, headers, r.out)
    }

    /// Writes `request` to the sandbox's socket as is and reads until the proxy closes.
    func raw(_ request: String) throws -> String { try rawExchange(socketPath, Array(request.utf8), readUntilClose: true) }
}

/// Connects to a unix socket, writes bytes, reads the answer (up to the close, or up to the
/// end of the first response head when `readUntilClose` is false). 30 s receive timeout.
func rawExchange(_ path: String, _ bytes: [UInt8], readUntilClose: Bool) throws -> String {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw ProxyError("socket failed") }
    defer { close(fd) }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
    }
    let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
    guard ok == 0 else { throw ProxyError("connect \(path) failed: errno \(errno)") }
    var timeout = timeval(tv_sec: 30, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    var answer: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        answer += buffer[0..<n]
        if !readUntilClose, answer.count >= 4, answer.suffix(4) == [0x0D, 0x0A, 0x0D, 0x0A] { break }
    }
    return String(decoding: answer, as: UTF8.self)
}

/// A loopback TCP port bridged to a unix socket, as the sandbox agent bridges 127.0.0.1:3128.
final class TCPBridge: @unchecked Sendable {
    let channel: any Channel
    var port: Int { channel.localAddress!.port! }

    init(to socketPath: String) async throws {
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { inbound in
                ClientBootstrap(group: inbound.eventLoop)
                    .channelOption(.autoRead, value: false)
                    .connect(unixDomainSocketPath: socketPath)
                    .flatMap { outbound in
                        let (a, b) = GlueHandler.pair { _, _ in }
                        return inbound.eventLoop.makeCompletedFuture {
                            try inbound.pipeline.syncOperations.addHandler(a)
                            try outbound.pipeline.syncOperations.addHandler(b)
                        }.flatMap {
                            inbound.setOption(.autoRead, value: true).and(outbound.setOption(.autoRead, value: true)).map { _ in }
                        }
                    }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
    }

    deinit { channel.close(promise: nil) }
}

/// The forms in which the canary must never reach a sandbox or a log.
func canaryForms(_ value: String = ProxyFixture.canary) -> [String] {
    let bytes = Array(value.utf8)
    let base64 = Data(bytes).base64EncodedString()
    let percent = value.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? value
    let json = String(decoding: try! JSONEncoder().encode(value), as: UTF8.self).dropFirst().dropLast()
    return [value, base64, percent, String(json)]
}

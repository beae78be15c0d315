import Blocking
import Console
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle

/// An HTTP request as the API handler sees it: fully read, bounded in size.
public struct APIRequest: Sendable {
    public var method: String
    public var path: String
    public var query: [String: String]
    public var headers: [(String, String)]
    public var body: [UInt8]
    /// Who connected over the unix socket (`SO_PEERCRED`), when known.
    public var peer: PeerCredentials?
    /// For a spooled route: the file holding the body (`body` is then empty). The server
    /// removes it once the handler has answered.
    public var bodyFile: String?

    public func header(_ name: String) -> String? {
        headers.first { $0.0.caseInsensitiveCompare(name) == .orderedSame }?.1
    }
}

/// The process on the other end of a unix socket connection.
public struct PeerCredentials: Sendable, CustomStringConvertible {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    public var description: String { "pid=\(pid) uid=\(uid) gid=\(gid)" }
}

/// An HTTP response: a body in memory, or a stream written as it is produced (server-sent
/// events).
public struct APIResponse: Sendable {
    public enum Body: Sendable {
        case bytes([UInt8])
        /// Written with backpressure: the producer waits while the client is not reading.
        case stream(ResponseStream)
    }
    public var status: Int
    public var headers: [(String, String)]
    public var body: Body

    public init(status: Int, headers: [(String, String)] = [], body: Body = .bytes([])) {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// Where the API listens.
public enum Listener: Sendable {
    /// A unix socket created at `path` with `mode` (0660 by default).
    case unixSocket(path: String, mode: mode_t = 0o660)
    /// An already-bound listening socket handed over by systemd (socket activation).
    case inherited(fd: Int32)
    /// TCP on `host:port`; every request must carry `Authorization: Bearer <token>`, or be a
    /// GET with the web console's login cookie (see `ConsoleAuth`).
    case tcp(host: String, port: Int, token: String)
}

/// A small HTTP/1.1 server on SwiftNIO: unix sockets (also inherited from systemd) and TCP
/// with a bearer token. It reads each request whole (up to `maxBodyBytes`, else 413), calls
/// the handler, and writes the response, streaming it when the handler streams.
///
/// No client can hold the server: every phase of a connection has a bound (``Limits``), each
/// listener has its own connection cap (a flood on TCP leaves the unix socket answering), and
/// a request without the TCP listener's token is refused at its head, before any body is read.
public final class HTTPServer: Service, Sendable {
    public typealias Handler = @Sendable (APIRequest) async -> APIResponse

    /// How long each phase of a connection may take, and how many connections a listener
    /// holds. A connection that overruns a bound is closed; the defaults suit a local API that
    /// also takes multi-gigabyte image uploads.
    public struct Limits: Sendable {
        /// A new connection's whole first request head must arrive within this (10 s), so that
        /// half-open or trickling clients cannot hold connections.
        public var headerTimeout: Duration
        /// A request body's first bytes must arrive within this (60 s) after the head…
        public var bodyTimeout: Duration
        /// …and the rest at least this fast on average (16 KiB/s): a body may take
        /// `bodyTimeout + received / minBodyBytesPerSecond`, so a large upload on a slow link
        /// goes through while a trickle does not.
        public var minBodyBytesPerSecond: Int
        /// A keep-alive connection's next request head must arrive within this (60 s).
        public var idleTimeout: Duration
        /// A response write the client does not take within this (60 s) ends the connection; a
        /// live event stream ends with an `event: gap` block saying where to resume.
        public var writeTimeout: Duration
        /// How long a refused request's body is read and dropped before the connection closes
        /// (5 s; also at most `HTTPServer.maxDrainBytes`), so that the client reads the refusal
        /// instead of a reset.
        public var lingerTimeout: Duration
        /// Open connections per TCP listener (256); more are closed at once.
        public var maxTCPConnections: Int
        /// Open connections per unix-socket listener, inherited ones too (1024); more are
        /// closed at once.
        public var maxUnixConnections: Int

        /// Limits with the documented defaults, any of them overridden.
        public init(
            headerTimeout: Duration = .seconds(10), bodyTimeout: Duration = .seconds(60), minBodyBytesPerSecond: Int = 16 << 10,
            idleTimeout: Duration = .seconds(60), writeTimeout: Duration = .seconds(60), lingerTimeout: Duration = .seconds(5),
            maxTCPConnections: Int = 256, maxUnixConnections: Int = 1024
        ) {
            self.headerTimeout = headerTimeout
            self.bodyTimeout = bodyTimeout
            self.minBodyBytesPerSecond = minBodyBytesPerSecond
            self.idleTimeout = idleTimeout
            self.writeTimeout = writeTimeout
            self.lingerTimeout = lingerTimeout
            self.maxTCPConnections = maxTCPConnections
            self.maxUnixConnections = maxUnixConnections
        }
    }

    private let listeners: [Listener]
    private let maxBodyBytes: Int
    private let limits: Limits
    private let handler: Handler
    private let logger: Logger
    private let ready: NIOLockedValueBox<Readiness> = .init(.waiting([]))

    /// Whether the listeners are bound yet: who waits for it, or how it ended.
    private enum Readiness {
        case waiting([CheckedContinuation<Void, any Error>])
        case listening
        case failed(ListenFailure)
    }

    /// The server could not bind its listeners: `waitUntilListening` throws it, so that what
    /// waits for the server (readiness, the start-up trim) ends and agentd exits with the
    /// reason instead of hanging.
    public struct ListenFailure: Error, CustomStringConvertible {
        public let description: String
    }
    /// Open connections and whether each is between requests (idle) — so that a graceful
    /// shutdown can close idle keep-alive connections (and streams) at once while requests in
    /// flight finish.
    private let connections = ConnectionRegistry()
    /// The TCP listeners' ports once bound (port 0 picks a free one).
    let boundTCPPorts = NIOLockedValueBox<[Int]>([])

    private let spool: Spool?
    /// How much of a refused upload's body is read and dropped before the connection is closed
    /// anyway.
    static let maxDrainBytes = 64 << 20
    /// A response body is written in pieces of this size, so that a write timeout measures the
    /// client's progress rather than the size of the answer.
    static let writeChunkBytes = 64 << 10

    /// - Parameters:
    ///   - listeners: where to listen; each gets its own connection cap.
    ///   - maxBodyBytes: the largest request body held in memory (8 MiB); larger ones get 413.
    ///   - limits: timeouts and connection caps (``Limits`` documents the defaults).
    ///   - spool: which requests are uploads spooled to disk instead.
    ///   - logger: connection-level events (debug), refusals at the cap (warning).
    ///   - handler: answers each request.
    public init(
        listeners: [Listener], maxBodyBytes: Int = 8 << 20, limits: Limits = Limits(), spool: Spool? = nil, logger: Logger,
        handler: @escaping Handler
    ) {
        self.listeners = listeners
        self.maxBodyBytes = maxBodyBytes
        self.limits = limits
        self.spool = spool
        self.logger = logger
        self.handler = handler
    }

    /// Requests whose bodies go to a file instead of memory (image uploads): up to `maxBytes`,
    /// each in a 0600 file under `directory`, removed after the answer (and at start, for
    /// what a crash left).
    public struct Spool: Sendable {
        public var directory: String
        public var maxBytes: Int64
        /// Which requests are spooled, by method and path.
        public var matches: @Sendable (_ method: String, _ path: String) -> Bool
        /// Checked when the request head arrives, before any of the body is read: an answer
        /// refuses the upload (bad parameters, no room) without receiving it.
        public var preflight: @Sendable (APIRequest) -> APIResponse?

        public init(
            directory: String, maxBytes: Int64, matches: @escaping @Sendable (String, String) -> Bool,
            preflight: @escaping @Sendable (APIRequest) -> APIResponse?
        ) {
            self.directory = directory
            self.maxBytes = maxBytes
            self.matches = matches
            self.preflight = preflight
        }
    }

    /// Returns once every listener is bound (immediately if they already are).
    /// - Throws: `ListenFailure` when binding failed (the address is taken, no permission).
    public func waitUntilListening() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let outcome = ready.withLockedValue { state -> Result<Void, ListenFailure>? in
                switch state {
                case .waiting(let waiters):
                    state = .waiting(waiters + [continuation])
                    return nil
                case .listening: return .success(())
                case .failed(let failure): return .failure(failure)
                }
            }
            if let outcome { continuation.resume(with: outcome) }
        }
    }

    /// Settles readiness once: every waiter resumes (or throws `failure`).
    private func settle(_ failure: ListenFailure?) {
        let waiters = ready.withLockedValue { state -> [CheckedContinuation<Void, any Error>] in
            guard case .waiting(let waiters) = state else { return [] }
            state = failure.map { .failed($0) } ?? .listening
            return waiters
        }
        for waiter in waiters {
            if let failure { waiter.resume(throwing: failure) } else { waiter.resume() }
        }
    }

    typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPPart<HTTPResponseHead, IOData>>

    public func run() async throws {
        if let spool {
            // Uploads a crash cut short are of no use to anyone.
            try? FileManager.default.removeItem(atPath: spool.directory)
            try FileManager.default.createDirectory(atPath: spool.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        let group = MultiThreadedEventLoopGroup.singleton
        var bound: [(NIOAsyncChannel<Connection, Never>, String?)] = []
        do {
        for listener in listeners {
            let name: String, cap: Int
            switch listener {
            case .unixSocket(let path, _): (name, cap) = (path, limits.maxUnixConnections)
            case .inherited(let fd): (name, cap) = ("fd \(fd)", limits.maxUnixConnections)
            case .tcp(let host, let port, _): (name, cap) = ("\(host):\(port)", limits.maxTCPConnections)
            }
            // NIO's ServerBootstrap already backs accepting off for a second when the process is
            // out of file descriptors (AcceptBackoffHandler); the cap keeps one listener from
            // taking them all, counted here where connections are accepted, before any task
            // or buffer is spent on them.
            let gate = ConnectionGate(listener: name, limit: cap, logger: logger)
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            let initializer: @Sendable (Channel) -> EventLoopFuture<Connection> = { child in
                guard gate.admit() else {
                    child.close(promise: nil)
                    return child.eventLoop.makeFailedFuture(ConnectionGate.Full())
                }
                child.closeFuture.whenComplete { _ in gate.release() }
                return child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    return try Connection(wrappingChannelSynchronously: child)
                }
            }
            switch listener {
            case .unixSocket(let path, let mode):
                let server = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true, childChannelInitializer: initializer)
                chmod(path, mode)
                logger.info("listening", metadata: ["socket": "\(path)", "mode": "\(String(mode, radix: 8))", "max-connections": "\(cap)"])
                bound.append((server, nil))
            case .inherited(let fd):
                let server = try await bootstrap.bind(fd, childChannelInitializer: initializer)
                logger.info("listening on the socket systemd passed", metadata: ["fd": "\(fd)", "max-connections": "\(cap)"])
                bound.append((server, nil))
            case .tcp(let host, let port, let token):
                let server = try await bootstrap.bind(host: host, port: port, childChannelInitializer: initializer)
                let actual = server.channel.localAddress?.port ?? port
                boundTCPPorts.withLockedValue { $0.append(actual) }
                logger.info("listening", metadata: ["tcp": "\(host):\(actual)", "auth": "bearer token", "max-connections": "\(cap)"])
                bound.append((server, token))
            }
        }
        } catch {
            // One listener that cannot bind stops the server: close those already bound, and
            // let whoever waits for readiness know instead of waiting forever.
            for (server, _) in bound { try? await server.channel.close() }
            settle(ListenFailure(description: "cannot listen: \(error)"))
            throw error
        }
        settle(nil)
        let servers = bound
        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                for (server, token) in servers {
                    group.addTask {
                        try await server.executeThenClose { inbound in
                            try await withThrowingDiscardingTaskGroup { connections in
                                for try await connection in inbound.cancelOnGracefulShutdown() {
                                    connections.addTask { await self.serve(connection, token: token) }
                                }
                            }
                        }
                    }
                }
            }
        } onGracefulShutdown: {
            for (server, _) in servers { server.channel.close(promise: nil) }
            self.connections.shutDown()
        }
    }

    private func serve(_ connection: Connection, token: String?) async {
        let peer = await Self.peerCredentials(connection.channel)
        if let peer { logger.debug("connection", metadata: ["peer": "\(peer)"]) }
        let id = connections.register(connection.channel)
        defer { connections.remove(id) }
        let deadline = ConnectionDeadline(channel: connection.channel)
        defer { deadline.clear() }
        // The token's other form, for browsers: the console's login cookie (GET only).
        let auth = token.map(ConsoleAuth.init)
        deadline.set(after: limits.headerTimeout, "the request head did not arrive within \(limits.headerTimeout)")
        do {
            try await connection.executeThenClose { inbound, outbound in
                var head: HTTPRequestHead?
                var body: [UInt8] = []
                var tooLarge = false
                var upload: SpoolFile?
                defer { upload?.remove() }
                // A request refused at its head: what still comes is read and dropped.
                var refused = false
                // A console login or logout on a listener that needs the token: answered here,
                // since only the server knows the token.
                var consoleForm = false
                var drained = 0
                // The body's progress, for its deadline.
                var bodyStarted = NIODeadline.now()
                var received = 0
                for try await part in inbound {
                    switch part {
                    case .head(let h):
                        connections.setBusy(id, true)
                        head = h
                        body.removeAll(keepingCapacity: true)
                        tooLarge = false
                        bodyStarted = .now()
                        received = 0
                        deadline.set(after: limits.bodyTimeout, "the request body did not arrive within \(limits.bodyTimeout)")
                        let path = String(h.uri.split(separator: "?").first ?? "")
                        let spooled = spool.map { $0.matches(h.method.rawValue, path) } ?? false
                        // Refuse what can be refused before its body comes: no token first (an
                        // unauthenticated client gets nothing read on its behalf), then an
                        // upload's own checks, then a body too large to hold.
                        var refusal: APIResponse?
                        consoleForm = false
                        if let token, let auth {
                            let bearer = Self.authorized(h.headers["authorization"].first, token: token)
                            switch auth.admit(method: h.method.rawValue, path: path, bearerValid: bearer, cookies: h.headers["cookie"]) {
                            case .admitted: break
                            case .open: consoleForm = h.method == .POST
                            case .refused:
                                refusal = ConsoleAuth.refusal(path: path).map(Self.response)
                                    ?? APIError.response(401, "unauthorized", "this listener needs `Authorization: Bearer <token>`")
                            }
                        }
                        if refusal != nil {
                        } else if consoleForm, (h.headers["content-length"].first.flatMap { Int($0) } ?? Int.max) > ConsoleAuth.maxLoginBytes {
                            refusal = APIError.response(413, "too-large", "a console login needs a Content-Length of at most \(ConsoleAuth.maxLoginBytes) bytes")
                        } else if spooled, let spool {
                            if let answer = spool.preflight(Self.request(h, body: [], peer: peer)) {
                                refusal = answer
                            } else {
                                do {
                                    upload = try SpoolFile(directory: spool.directory, maxBytes: spool.maxBytes)
                                } catch {
                                    refusal = APIError.response(507, "storage", "cannot store the upload: \(error)")
                                }
                            }
                        } else if let length = h.headers["content-length"].first.flatMap({ Int($0) }), length > maxBodyBytes {
                            refusal = Self.tooLarge(maxBodyBytes)
                        }
                        if let refusal {
                            // Answer now. A client that waited for `100 Continue` sends nothing
                            // more; one that did not is drained before the close (a "lingering
                            // close", bounded in bytes and time), since closing on unread bytes
                            // resets the connection and can destroy the answer before the client
                            // reads it.
                            try await write(refusal, keepAlive: false, version: h.version, connection: id, channel: connection.channel, deadline: deadline, to: outbound)
                            refused = true
                            connections.setBusy(id, false)
                            deadline.set(after: limits.lingerTimeout, "lingering close after a refusal")
                            continue
                        }
                        if h.headers["expect"].first?.lowercased() == "100-continue" {
                            try await outbound.write(.head(HTTPResponseHead(version: h.version, status: .continue)))
                        }
                    case .body(let buffer):
                        if refused {
                            drained += buffer.readableBytes
                            if drained > Self.maxDrainBytes { return }
                            continue
                        }
                        received += buffer.readableBytes
                        deadline.set(
                            at: bodyStarted + timeAmount(limits.bodyTimeout) + Self.allowance(for: received, rate: limits.minBodyBytesPerSecond),
                            "the request body came slower than \(limits.minBodyBytesPerSecond) bytes/s")
                        if let file = upload {
                            // Off the cooperative threads (a write may block on a busy disk);
                            // awaiting it also slows the reading, which slows the sender.
                            await file.append(buffer)
                        } else if body.count + buffer.readableBytes > maxBodyBytes {
                            tooLarge = true
                        } else {
                            body.append(contentsOf: buffer.readableBytesView)
                        }
                    case .end:
                        if refused { return }
                        guard let h = head else { continue }
                        // The handler may take as long as the request needs (a long command).
                        deadline.clear()
                        let response: APIResponse
                        if let file = upload, let failure = file.failure {
                            response = failure
                        } else if tooLarge {
                            response = Self.tooLarge(maxBodyBytes)
                        } else if consoleForm, let auth {
                            response = Self.response(auth.answer(method: h.method.rawValue, path: String(h.uri.split(separator: "?").first ?? ""), body: body))
                        } else {
                            var request = Self.request(h, body: body, peer: peer)
                            request.bodyFile = upload?.close()
                            response = await handler(request)
                        }
                        upload?.remove()
                        upload = nil
                        let keepAlive = h.isKeepAlive && !connections.isShuttingDown
                        try await write(response, keepAlive: keepAlive, version: h.version, connection: id, channel: connection.channel, deadline: deadline, to: outbound)
                        if !keepAlive || !connection.channel.isActive { return }
                        connections.setBusy(id, false)
                        deadline.set(after: limits.idleTimeout, "no new request within \(limits.idleTimeout)")
                        head = nil
                    }
                }
            }
        } catch {
            logger.debug("connection ended", metadata: ["error": "\(error)"])
        }
        if let reason = deadline.expired { logger.debug("connection closed", metadata: ["reason": "\(reason)"]) }
    }

    /// A console answer as a response.
    static func response(_ page: ConsoleAssets.Page) -> APIResponse {
        APIResponse(status: page.status, headers: page.headers, body: .bytes(page.body))
    }

    private static func tooLarge(_ max: Int) -> APIResponse {
        APIError.response(413, "too-large", "the request body is larger than \(max) bytes")
    }

    /// The time `bytes` may take at `rate` bytes per second (saturating, for any input).
    static func allowance(for bytes: Int, rate: Int) -> TimeAmount {
        guard rate > 0 else { return .hours(24 * 365) }
        let (nanos, overflow) = (bytes / rate).multipliedReportingOverflow(by: 1_000_000_000)
        return overflow ? .hours(24 * 365) : .nanoseconds(Int64(clamping: nanos))
    }

    private func write(
        _ response: APIResponse, keepAlive: Bool, version: HTTPVersion, connection id: Int, channel: Channel, deadline: ConnectionDeadline,
        to outbound: NIOAsyncChannelOutboundWriter<HTTPPart<HTTPResponseHead, IOData>>
    ) async throws {
        var headers = HTTPHeaders(response.headers)
        if case .bytes(let bytes) = response.body { headers.replaceOrAdd(name: "content-length", value: String(bytes.count)) }
        headers.replaceOrAdd(name: "connection", value: keepAlive ? "keep-alive" : "close")
        // Each write must be taken within the write timeout; the deadline closes the connection
        // of a client that stopped reading.
        let stalled = "the client took nothing of the response for \(limits.writeTimeout)"
        deadline.set(after: limits.writeTimeout, stalled)
        try await outbound.write(.head(HTTPResponseHead(version: version, status: .init(statusCode: response.status), headers: headers)))
        switch response.body {
        case .bytes(let bytes):
            var offset = 0
            while offset < bytes.count {
                let end = min(offset + Self.writeChunkBytes, bytes.count)
                deadline.set(after: limits.writeTimeout, stalled)
                try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: bytes[offset..<end]))))
                offset = end
            }
        case .stream(let stream):
            // A stream may last forever and be quiet for long: its writer bounds each write
            // itself. A graceful shutdown closes it like an idle connection, and a closed
            // connection (the client went away, or that shutdown) ends it at once, not at its
            // next write (which may be a heartbeat 15 s away).
            deadline.clear()
            connections.setBusy(id, false)
            let connections = connections
            let writer = ResponseStreamWriter(
                outbound: outbound, channel: channel, writeTimeout: limits.writeTimeout, logger: logger, isShuttingDown: { connections.isShuttingDown })
            let pump = Task { await stream.produce(writer) }
            channel.closeFuture.whenComplete { _ in pump.cancel() }
            await withTaskCancellationHandler { await pump.value } onCancel: { pump.cancel() }
            // A stream that ended itself (a slow reader's notice) closed the connection.
            if writer.isFinished || !channel.isActive { return }
            deadline.set(after: limits.writeTimeout, stalled)
        }
        try await outbound.write(.end(nil))
    }

    private static func request(_ head: HTTPRequestHead, body: [UInt8], peer: PeerCredentials?) -> APIRequest {
        // Keep empty pieces: `?=`, `?a`, `a=` and a target starting with `?` all parse (an
        // empty name is kept for the router to refuse, never indexed into).
        let parts = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        func decoded(_ text: Substring) -> String {
            let plain = text.replacingOccurrences(of: "+", with: " ")
            return plain.removingPercentEncoding ?? plain
        }
        var query: [String: String] = [:]
        if parts.count > 1 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                guard let key = kv.first else { continue }
                query[decoded(key)] = kv.dropFirst().first.map(decoded) ?? ""
            }
        }
        return APIRequest(
            method: head.method.rawValue, path: String(parts.first ?? "/"), query: query,
            headers: head.headers.map { ($0.name, $0.value) }, body: body, peer: peer)
    }

    /// Constant-time comparison of the bearer token.
    static func authorized(_ header: String?, token: String) -> Bool {
        guard let header, header.hasPrefix("Bearer ") else { return false }
        let given = Array(header.dropFirst(7).utf8)
        let expected = Array(token.utf8)
        guard given.count == expected.count else { return false }
        return zip(given, expected).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
    }

    /// `SO_PEERCRED` of a unix socket connection.
    private static func peerCredentials(_ channel: Channel) async -> PeerCredentials? {
        guard let provider = channel as? SocketOptionProvider else { return nil }
        // `struct ucred` needs _GNU_SOURCE, which Swift's Glibc module does not define; this
        // has its layout (pid_t, uid_t, gid_t). SO_PEERCRED is 17 on Linux.
        struct UCred { var pid: Int32 = 0; var uid: UInt32 = 0; var gid: UInt32 = 0 }
        let future: EventLoopFuture<UCred> = provider.unsafeGetSocketOption(level: .socket, name: .init(rawValue: 17))
        guard let cred = try? await future.get() else { return nil }
        return PeerCredentials(pid: cred.pid, uid: cred.uid, gid: cred.gid)
    }
}

/// The server's open connections, for graceful shutdown.
final class ConnectionRegistry: Sendable {
    private struct State {
        var next = 0
        var open: [Int: (channel: Channel, busy: Bool)] = [:]
        var shuttingDown = false
    }
    private let state = NIOLockedValueBox(State())

    func register(_ channel: Channel) -> Int {
        let (id, close) = state.withLockedValue { s -> (Int, Bool) in
            s.next += 1
            s.open[s.next] = (channel, false)
            return (s.next, s.shuttingDown)
        }
        if close { channel.close(promise: nil) }
        return id
    }

    func remove(_ id: Int) { state.withLockedValue { _ = $0.open.removeValue(forKey: id) } }

    func setBusy(_ id: Int, _ busy: Bool) {
        let close = state.withLockedValue { s -> Channel? in
            s.open[id]?.busy = busy
            return !busy && s.shuttingDown ? s.open[id]?.channel : nil
        }
        close?.close(promise: nil)
    }

    var isShuttingDown: Bool { state.withLockedValue { $0.shuttingDown } }

    /// Closes every idle connection now; busy ones close after their response.
    func shutDown() {
        let idle = state.withLockedValue { s -> [Channel] in
            s.shuttingDown = true
            return s.open.values.filter { !$0.busy }.map(\.channel)
        }
        for channel in idle { channel.close(promise: nil) }
    }
}

/// A streamed response body: `produce` writes it through the writer it is given, which waits
/// while the client is not reading, so that nothing is dropped and nothing piles up in memory.
public struct ResponseStream: Sendable {
    /// Writes the body; returning ends the response. Cancelled when the connection closes.
    public var produce: @Sendable (ResponseStreamWriter) async -> Void

    public init(_ produce: @escaping @Sendable (ResponseStreamWriter) async -> Void) {
        self.produce = produce
    }
}

/// Why a streamed response cannot take more bytes.
public enum ResponseStreamError: Error, Sendable, CustomStringConvertible {
    /// The client took nothing for this long; the bytes of that write were not sent.
    case stalled(Duration)
    /// The connection is closed (the client went away, or the server is shutting down).
    case closed

    public var description: String {
        switch self {
        case .stalled(let bound): "the client read nothing for \(bound)"
        case .closed: "the connection is closed"
        }
    }
}

/// Where a ``ResponseStream`` writes: each write waits until the connection takes the bytes
/// (NIO's outbound buffer is below its high-water mark), at most the server's write timeout.
public struct ResponseStreamWriter: Sendable {
    let outbound: NIOAsyncChannelOutboundWriter<HTTPPart<HTTPResponseHead, IOData>>
    let channel: Channel
    let writeTimeout: Duration
    let logger: Logger
    let isShuttingDown: @Sendable () -> Bool
    private let finished = NIOLockedValueBox(false)

    init(
        outbound: NIOAsyncChannelOutboundWriter<HTTPPart<HTTPResponseHead, IOData>>, channel: Channel, writeTimeout: Duration,
        logger: Logger, isShuttingDown: @escaping @Sendable () -> Bool
    ) {
        self.outbound = outbound
        self.channel = channel
        self.writeTimeout = writeTimeout
        self.logger = logger
        self.isShuttingDown = isShuttingDown
    }

    /// Whether `finish(with:)` ended the response.
    var isFinished: Bool { finished.withLockedValue { $0 } }

    private enum Outcome: Sendable { case written, timedOut, failed }

    /// Writes `bytes` as the next piece of the body, waiting while the client is not reading.
    /// - Throws: ``ResponseStreamError/stalled(_:)`` when the client took nothing within the
    ///   write timeout (the bytes were not sent, and nothing after them will be unless the
    ///   producer calls `finish(with:)`); ``ResponseStreamError/closed`` when the connection is
    ///   gone or the server is shutting down.
    public func write(_ bytes: [UInt8]) async throws {
        guard !isShuttingDown(), !isFinished, channel.isActive else { throw ResponseStreamError.closed }
        let part = HTTPPart<HTTPResponseHead, IOData>.body(.byteBuffer(ByteBuffer(bytes: bytes)))
        let (outbound, timeout) = (self.outbound, writeTimeout)
        let outcome = await withTaskGroup(of: Outcome.self) { group -> Outcome in
            group.addTask {
                do { try await outbound.write(part) } catch { return .failed }
                return .written
            }
            group.addTask {
                do { try await Task.sleep(for: timeout) } catch { return .failed }
                return .timedOut
            }
            let first = await group.next() ?? .failed
            group.cancelAll()
            guard first == .timedOut else { return first }
            // The timer fired: the write was cancelled (NIO then drops its bytes) unless it got
            // through in the meantime.
            return await group.next() == .written ? .written : .timedOut
        }
        switch outcome {
        case .written: return
        case .timedOut: throw channel.isActive ? ResponseStreamError.stalled(timeout) : .closed
        case .failed: throw ResponseStreamError.closed
        }
    }

    /// Ends the response with `bytes` (a notice such as "you read too slowly; resume from
    /// here") queued past the backpressure, since the client may not be reading, then closes the
    /// connection once they are sent or after the write timeout: a client that reads again
    /// within it gets the notice, one that does not sees the stream end after the last whole
    /// piece it was sent. Later writes throw `closed`.
    public func finish(with bytes: [UInt8]) async {
        finished.withLockedValue { $0 = true }
        logger.info("a streamed response ends early: its client read nothing within the write timeout", metadata: ["write-timeout": "\(writeTimeout)"])
        // These go after every piece already handed to the channel: writes on one channel keep
        // their order, and a write cancelled by `stalled` was never handed over.
        channel.write(HTTPPart<HTTPResponseHead, IOData>.body(.byteBuffer(ByteBuffer(bytes: bytes))), promise: nil)
        let sent = channel.eventLoop.makePromise(of: Void.self)
        channel.writeAndFlush(HTTPPart<HTTPResponseHead, IOData>.end(nil), promise: sent)
        let channel = channel
        let timer = channel.eventLoop.scheduleTask(in: timeAmount(writeTimeout)) { channel.close(promise: nil) }
        try? await sent.futureResult.get()
        timer.cancel()
        try? await channel.close()
    }
}

/// A connection's current deadline: when it passes, the connection is closed. Every phase sets
/// its own (head, body, idle, each write); the scheduled check re-arms itself when the deadline
/// moved later, so that moving it on every body chunk costs a lock, not a timer.
final class ConnectionDeadline: Sendable {
    private struct State {
        var deadline: NIODeadline?
        var reason = ""
        var scheduled: Scheduled<Void>?
        var scheduledFor: NIODeadline?
        var expired: String?
    }
    private let state = NIOLockedValueBox(State())
    private let channel: Channel

    init(channel: Channel) {
        self.channel = channel
    }

    /// Why the deadline closed the connection, if it did.
    var expired: String? { state.withLockedValue { $0.expired } }

    func set(after duration: Duration, _ reason: @autoclosure () -> String) {
        set(at: .now() + timeAmount(duration), reason())
    }

    func set(at deadline: NIODeadline, _ reason: String) {
        let stale = state.withLockedValue { s -> Scheduled<Void>? in
            s.deadline = deadline
            s.reason = reason
            if let at = s.scheduledFor, at <= deadline { return nil }
            let old = s.scheduled
            s.scheduledFor = deadline
            s.scheduled = channel.eventLoop.scheduleTask(deadline: deadline) { [weak self] in self?.check() }
            return old
        }
        stale?.cancel()
    }

    /// No deadline until the next `set`.
    func clear() {
        let stale = state.withLockedValue { s -> Scheduled<Void>? in
            s.deadline = nil
            s.scheduledFor = nil
            defer { s.scheduled = nil }
            return s.scheduled
        }
        stale?.cancel()
    }

    private func check() {
        let close = state.withLockedValue { s -> Bool in
            s.scheduled = nil
            s.scheduledFor = nil
            guard let deadline = s.deadline else { return false }
            if deadline > .now() {
                s.scheduledFor = deadline
                s.scheduled = channel.eventLoop.scheduleTask(deadline: deadline) { [weak self] in self?.check() }
                return false
            }
            s.expired = s.reason
            return true
        }
        if close { channel.close(promise: nil) }
    }
}

/// Counts one listener's open connections and refuses those beyond its cap. Refusals are
/// logged at most once a minute, with how many there were.
final class ConnectionGate: Sendable {
    struct Full: Error {}
    private struct State {
        var open = 0
        var refused = 0
        var lastWarning: NIODeadline?
    }
    private let state = NIOLockedValueBox(State())
    private let listener: String
    private let limit: Int
    private let logger: Logger

    init(listener: String, limit: Int, logger: Logger) {
        self.listener = listener
        self.limit = limit
        self.logger = logger
    }

    /// Whether one more connection may open; if so, `release` must follow when it closes.
    func admit() -> Bool {
        let (admitted, warn) = state.withLockedValue { s -> (Bool, Int?) in
            if s.open < limit {
                s.open += 1
                return (true, nil)
            }
            s.refused += 1
            let now = NIODeadline.now()
            if let last = s.lastWarning, now - last < .minutes(1) { return (false, nil) }
            s.lastWarning = now
            defer { s.refused = 0 }
            return (false, s.refused)
        }
        if let warn {
            logger.warning(
                "connection cap reached: closing new connections until some close",
                metadata: ["listener": "\(listener)", "max-connections": "\(limit)", "refused": "\(warn)"])
        }
        return admitted
    }

    func release() { state.withLockedValue { $0.open -= 1 } }
}

/// `duration` as NIO's `TimeAmount`, saturating.
func timeAmount(_ duration: Duration) -> TimeAmount {
    let (seconds, attoseconds) = duration.components
    let (nanos, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
    if overflow { return .nanoseconds(seconds < 0 ? .min : .max) }
    let (total, overflow2) = nanos.addingReportingOverflow(attoseconds / 1_000_000_000)
    return .nanoseconds(overflow2 ? .max : total)
}

/// The file an upload is spooled into. Writes go straight to the file (page cache), never to
/// memory, on the blocking pool's threads; the first failure (too large, disk full) is kept and
/// answered at the end.
final class SpoolFile: @unchecked Sendable {
    // Invariant: used by one connection's task at a time; `append` awaits its write.
    let path: String
    private var fd: Int32
    private let maxBytes: Int64
    private var written: Int64 = 0
    private(set) var failure: APIResponse?

    init(directory: String, maxBytes: Int64) throws {
        path = directory + "/upload-\(UInt64.random(in: 0...UInt64.max))"
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SpoolError(message: "\(path): \(String(cString: strerror(errno)))") }
        self.maxBytes = maxBytes
    }

    struct SpoolError: Error, CustomStringConvertible { let message: String; var description: String { message } }

    func append(_ chunk: ByteBuffer) async {
        guard failure == nil, fd >= 0 else { return }
        written += Int64(chunk.readableBytes)
        if written > maxBytes {
            failure = APIError.response(413, "too-large", "the upload is larger than \(maxBytes) bytes")
            return
        }
        let fd = fd
        let error = (try? await BlockingPool.shared.run { () -> Int32 in
            chunk.withUnsafeReadableBytes { buffer -> Int32 in
                var offset = 0
                while offset < buffer.count {
                    let n = write(fd, buffer.baseAddress! + offset, buffer.count - offset)
                    if n < 0 {
                        if errno == EINTR { continue }
                        return errno
                    }
                    offset += n
                }
                return 0
            }
        }) ?? EIO
        if error != 0 {
            failure = APIError.response(507, "storage", "cannot store the upload: \(String(cString: strerror(error))) (after \(written) bytes)")
        }
    }

    /// Closes the file and returns its path.
    func close() -> String {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
        return path
    }

    /// Closes and deletes the file.
    func remove() {
        _ = close()
        unlink(path)
    }
}

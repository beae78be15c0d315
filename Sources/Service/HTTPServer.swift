import Blocking
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

/// An HTTP response: a body in memory, or a stream of chunks (server-sent events).
public struct APIResponse: Sendable {
    public enum Body: Sendable {
        case bytes([UInt8])
        case stream(AsyncStream<[UInt8]>)
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
    /// TCP on `host:port`; every request must carry `Authorization: Bearer <token>`.
    case tcp(host: String, port: Int, token: String)
}

/// A small HTTP/1.1 server on SwiftNIO: unix sockets (also inherited from systemd) and TCP
/// with a bearer token. It reads each request whole (up to `maxBodyBytes`, else 413), calls
/// the handler, and writes the response, streaming it when the handler streams.
public final class HTTPServer: Service, Sendable {
    public typealias Handler = @Sendable (APIRequest) async -> APIResponse

    private let listeners: [Listener]
    private let maxBodyBytes: Int
    private let handler: Handler
    private let logger: Logger
    private let ready: NIOLockedValueBox<[CheckedContinuation<Void, Never>]?> = .init([])
    /// Open connections and whether each is between requests (idle) — so that a graceful
    /// shutdown can close idle keep-alive connections (and streams) at once while requests in
    /// flight finish.
    private let connections = ConnectionRegistry()

    private let spool: Spool?
    /// How much of a refused upload's body is read and dropped before the connection is closed
    /// anyway.
    static let maxDrainBytes = 64 << 20

    public init(listeners: [Listener], maxBodyBytes: Int = 8 << 20, spool: Spool? = nil, logger: Logger, handler: @escaping Handler) {
        self.listeners = listeners
        self.maxBodyBytes = maxBodyBytes
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
    public func waitUntilListening() async {
        await withCheckedContinuation { continuation in
            let pending = ready.withLockedValue { waiters -> Bool in
                guard waiters != nil else { return false }
                waiters!.append(continuation)
                return true
            }
            if !pending { continuation.resume() }
        }
    }

    public func run() async throws {
        if let spool {
            // Uploads a crash cut short are of no use to anyone.
            try? FileManager.default.removeItem(atPath: spool.directory)
            try FileManager.default.createDirectory(atPath: spool.directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPPart<HTTPResponseHead, IOData>>
        let group = MultiThreadedEventLoopGroup.singleton
        var bound: [(NIOAsyncChannel<Connection, Never>, String?)] = []
        for listener in listeners {
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            let initializer: @Sendable (Channel) -> EventLoopFuture<Connection> = { child in
                child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    return try Connection(wrappingChannelSynchronously: child)
                }
            }
            switch listener {
            case .unixSocket(let path, let mode):
                let server = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true, childChannelInitializer: initializer)
                chmod(path, mode)
                logger.info("listening", metadata: ["socket": "\(path)", "mode": "\(String(mode, radix: 8))"])
                bound.append((server, nil))
            case .inherited(let fd):
                let server = try await bootstrap.bind(fd, childChannelInitializer: initializer)
                logger.info("listening on the socket systemd passed", metadata: ["fd": "\(fd)"])
                bound.append((server, nil))
            case .tcp(let host, let port, let token):
                let server = try await bootstrap.bind(host: host, port: port, childChannelInitializer: initializer)
                logger.info("listening", metadata: ["tcp": "\(host):\(port)", "auth": "bearer token"])
                bound.append((server, token))
            }
        }
        ready.withLockedValue { waiters in
            waiters?.forEach { $0.resume() }
            waiters = nil
        }
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

    private func serve(_ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPPart<HTTPResponseHead, IOData>>, token: String?) async {
        let peer = await Self.peerCredentials(connection.channel)
        if let peer { logger.debug("connection", metadata: ["peer": "\(peer)"]) }
        let id = connections.register(connection.channel)
        defer { connections.remove(id) }
        do {
            try await connection.executeThenClose { inbound, outbound in
                var head: HTTPRequestHead?
                var body: [UInt8] = []
                var tooLarge = false
                var upload: SpoolFile?
                defer { upload?.remove() }
                // An upload refused before its body: what still comes is read and dropped.
                var refused = false
                var drained = 0
                for try await part in inbound {
                    switch part {
                    case .head(let h):
                        connections.setBusy(id, true)
                        head = h
                        body.removeAll(keepingCapacity: true)
                        tooLarge = false
                        guard let spool, spool.matches(h.method.rawValue, String(h.uri.split(separator: "?").first ?? "")) else { continue }
                        // A spooled upload: refuse it before its body comes, or open its file.
                        var refusal: APIResponse?
                        if let token, !Self.authorized(h.headers["authorization"].first, token: token) {
                            refusal = APIError.response(401, "unauthorized", "this listener needs `Authorization: Bearer <token>`")
                        } else if let answer = spool.preflight(Self.request(h, body: [], peer: peer)) {
                            refusal = answer
                        } else {
                            do {
                                upload = try SpoolFile(directory: spool.directory, maxBytes: spool.maxBytes)
                            } catch {
                                refusal = APIError.response(507, "storage", "cannot store the upload: \(error)")
                            }
                        }
                        if let refusal {
                            // Answer now. A client that waited for `100 Continue` sends nothing
                            // more; one that did not is drained before the close (a "lingering
                            // close"), since closing on unread bytes resets the connection and
                            // can destroy the answer before the client reads it.
                            try await write(refusal, keepAlive: false, version: h.version, connection: id, channel: connection.channel, to: outbound)
                            refused = true
                            connections.setBusy(id, false)
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
                        let response: APIResponse
                        if let token, !Self.authorized(h.headers["authorization"].first, token: token) {
                            response = APIError.response(401, "unauthorized", "this listener needs `Authorization: Bearer <token>`")
                        } else if let file = upload, let failure = file.failure {
                            response = failure
                        } else if tooLarge {
                            response = APIError.response(413, "too-large", "the request body is larger than \(maxBodyBytes) bytes")
                        } else {
                            var request = Self.request(h, body: body, peer: peer)
                            request.bodyFile = upload?.close()
                            response = await handler(request)
                        }
                        upload?.remove()
                        upload = nil
                        let keepAlive = h.isKeepAlive && !connections.isShuttingDown
                        try await write(response, keepAlive: keepAlive, version: h.version, connection: id, channel: connection.channel, to: outbound)
                        if !keepAlive { return }
                        connections.setBusy(id, false)
                        head = nil
                    }
                }
            }
        } catch {
            logger.debug("connection ended", metadata: ["error": "\(error)"])
        }
    }

    private func write(
        _ response: APIResponse, keepAlive: Bool, version: HTTPVersion, connection id: Int, channel: Channel,
        to outbound: NIOAsyncChannelOutboundWriter<HTTPPart<HTTPResponseHead, IOData>>
    ) async throws {
        var headers = HTTPHeaders(response.headers)
        if case .bytes(let bytes) = response.body { headers.replaceOrAdd(name: "content-length", value: String(bytes.count)) }
        headers.replaceOrAdd(name: "connection", value: keepAlive ? "keep-alive" : "close")
        try await outbound.write(.head(HTTPResponseHead(version: version, status: .init(statusCode: response.status), headers: headers)))
        switch response.body {
        case .bytes(let bytes):
            if !bytes.isEmpty { try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: bytes)))) }
        case .stream(let chunks):
            // A stream may last forever: a graceful shutdown closes it like an idle connection,
            // and a closed connection (the client went away, or that shutdown) ends it at once,
            // not at its next chunk (which may be a heartbeat 15 s away).
            connections.setBusy(id, false)
            let connections = connections
            let pump = Task {
                for await chunk in chunks {
                    if connections.isShuttingDown { break }
                    try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: chunk))))
                }
            }
            // Cancelling the iteration ends the stream (its producer is told through
            // `onTermination`); cancelling a finished pump does nothing.
            channel.closeFuture.whenComplete { _ in pump.cancel() }
            try await pump.value
            if !channel.isActive { return }
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

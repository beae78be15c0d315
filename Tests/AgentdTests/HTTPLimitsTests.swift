import Foundation
import Logging
import SessionLog
import Synchronization
import TestSupport
import Testing

@testable import Service

/// The HTTP server against hostile and slow clients: a real server on a temporary unix socket
/// and a loopback TCP port, real sockets on the client side.
@Suite("HTTP server limits")
struct HTTPLimitsTests {
    static let token = "test-token-0123456789abcdef"

    @Test("a flood of half-open TCP connections beyond the cap leaves the unix socket answering, and the header timeout closes them all")
    func halfOpenFlood() async throws {
        let limits = HTTPServer.Limits(headerTimeout: .seconds(1), maxTCPConnections: 8)
        try await TestServer.with(limits: limits) { server in
            var flood: [RawSocket] = []
            defer { flood.forEach { $0.close() } }
            for _ in 0..<320 {
                let socket = try RawSocket.tcp(port: server.tcpPort)
                // Half a request head, never finished.
                socket.sendIgnoringErrors("GET /v1/health HTTP/1.1\r\nHost: agentd\r\n")
                flood.append(socket)
            }
            let answer = try await RawSocket.unix(server.socket).exchange("GET /v1/health HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n")
            #expect(answer.hasPrefix("HTTP/1.1 200"), "\(answer.prefix(200))")
            // Over the cap: closed at once; within it: closed when the head is 1 s late.
            let closed = try await RawSocket.waitForCloses(flood, count: flood.count, within: .seconds(30))
            #expect(closed.count == flood.count, "\(flood.count - closed.count) half-open connections are still open")
        }
    }

    @Test("connections beyond a listener's cap are closed at once, those within it stay; a closed one frees its place")
    func connectionCap() async throws {
        // A header timeout far beyond the test: only the cap closes anything.
        let limits = HTTPServer.Limits(headerTimeout: .seconds(600), maxTCPConnections: 4)
        try await TestServer.with(limits: limits) { server in
            var held: [RawSocket] = []
            defer { held.forEach { $0.close() } }
            for _ in 0..<10 { held.append(try RawSocket.tcp(port: server.tcpPort)) }
            // Exactly the 6 beyond the cap get closed (which 6 depends on which event loop
            // accepted first).
            let closed = try await RawSocket.waitForCloses(held, count: 6, within: .seconds(30))
            #expect(closed.count == 6)
            let open = held.enumerated().filter { !closed.contains($0.offset) }.map(\.element)
            #expect(open.count == 4)
            #expect(open.allSatisfy { !$0.isClosedNow() }, "a connection within the cap was closed")
            // The unix socket has its own cap.
            let answer = try await RawSocket.unix(server.socket).exchange("GET /v1/health HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n")
            #expect(answer.hasPrefix("HTTP/1.1 200"), "\(answer.prefix(200))")
            // A connection that closes frees its place for a new one (once the server has seen
            // the close: until then a new one is refused at once and tried again).
            open[0].close()
            let request = "GET /v1/health HTTP/1.1\r\nHost: agentd\r\nAuthorization: Bearer \(Self.token)\r\nConnection: close\r\n\r\n"
            let end = ContinuousClock.now + .seconds(30)
            var again = ""
            while again.isEmpty, ContinuousClock.now < end {
                again = try await RawSocket.tcp(port: server.tcpPort).exchange(request)
            }
            #expect(again.hasPrefix("HTTP/1.1 200"), "\(again.prefix(200))")
        }
    }

    @Test("a body that stops coming and a keep-alive connection left idle are closed by their timeouts")
    func bodyAndIdleTimeouts() async throws {
        let limits = HTTPServer.Limits(bodyTimeout: .seconds(1), minBodyBytesPerSecond: 1024, idleTimeout: .seconds(1))
        try await TestServer.with(limits: limits) { server in
            // A body announced at 1 MB that sends 10 bytes and stops.
            let trickle = try RawSocket.unix(server.socket)
            defer { trickle.close() }
            trickle.sendIgnoringErrors("POST /v1/sessions HTTP/1.1\r\nHost: agentd\r\nContent-Length: 1000000\r\n\r\n0123456789")
            // A request answered on a keep-alive connection, then nothing.
            let idle = try RawSocket.unix(server.socket)
            defer { idle.close() }
            idle.sendIgnoringErrors("GET /v1/health HTTP/1.1\r\nHost: agentd\r\n\r\n")
            let answer = try await idle.readUntilClosed(within: .seconds(30))
            #expect(answer.hasPrefix("HTTP/1.1 200"), "\(answer.prefix(200))")
            #expect(answer.lowercased().contains("connection: keep-alive"))
            #expect(try await trickle.waitForClose(within: .seconds(30)), "the stalled body's connection is still open")
            #expect(server.handled == 1)
        }
    }

    @Test("a 100 MB body without the token gets 401 as soon as its head arrives; the body is never read and the handler never runs")
    func unauthorizedAtHead() async throws {
        let limits = HTTPServer.Limits(lingerTimeout: .seconds(1))
        try await TestServer.with(limits: limits) { server in
            for authorization in ["", "Authorization: Bearer wrong-token-0123456789ab\r\n"] {
                let socket = try RawSocket.tcp(port: server.tcpPort)
                defer { socket.close() }
                // The head only: a server that waits for the body before answering never answers.
                socket.sendIgnoringErrors(
                    "POST /v1/sessions HTTP/1.1\r\nHost: agentd\r\nContent-Type: application/json\r\n\(authorization)Content-Length: 104857600\r\n\r\n")
                let answer = try await socket.readUntilClosed(within: .seconds(30))
                #expect(answer.hasPrefix("HTTP/1.1 401"), "\(answer.prefix(200))")
                #expect(answer.contains("Authorization: Bearer <token>"))
                #expect(answer.lowercased().contains("connection: close"))
            }
            #expect(server.handled == 0)
            // With the token the same listener serves.
            let ok = try await RawSocket.tcp(port: server.tcpPort).exchange(
                "POST /v1/sessions HTTP/1.1\r\nHost: agentd\r\nAuthorization: Bearer \(Self.token)\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            #expect(ok.hasPrefix("HTTP/1.1 200"), "\(ok.prefix(200))")
            #expect(server.handled == 1)
        }
    }

    @Test("a live follow whose reader reads nothing while 3000 events are appended gets every one of them, in order")
    func slowReaderGetsEverything() async throws {
        try await TestServer.with(limits: HTTPServer.Limits(writeTimeout: .seconds(600))) { server in
            var reader = try await Self.followWhileStalled(server)
            var seqs: [UInt64] = [1]
            while seqs.last != 3001, let event = try await reader.next(within: .seconds(60)) {
                #expect(event.type != "gap", "\(event.data)")
                seqs.append(event.seq)
            }
            #expect(seqs.count == 3001 && Self.firstHole(seqs) == nil, "\(seqs.count) events received, first hole after seq \(Self.firstHole(seqs) ?? 0)")
        }
    }

    @Test("a live follow whose reader stays stalled past the write timeout ends with a gap block naming the last seq sent; ?after= resumes without a hole")
    func stalledReaderGetsGap() async throws {
        try await TestServer.with(limits: HTTPServer.Limits(writeTimeout: .seconds(3))) { server in
            var reader = try await Self.followWhileStalled(server)
            // The server gives up on this reader (it says so in its log) and keeps the notice for
            // it one more write timeout. What the reader then finds: events without a hole, then
            // the gap.
            try await server.waitForLog("streamed response ends early", within: .seconds(60))
            var seqs: [UInt64] = [1]
            var gap: [String: Any]?
            while let event = try await reader.next(within: .seconds(30)) {
                if event.type == "gap" {
                    gap = try JSONSerialization.jsonObject(with: Data(event.data.utf8)) as? [String: Any]
                    break
                }
                seqs.append(event.seq)
            }
            #expect(seqs.first == 1 && Self.firstHole(seqs) == nil, "first hole after seq \(Self.firstHole(seqs) ?? 0)")
            let found = try #require(gap, "no gap block after seq \(seqs.last ?? 0)")
            let last = try #require((found["last_seq"] as? NSNumber)?.uint64Value)
            #expect(last == UInt64(seqs.count))
            #expect(last < 3001)
            #expect(found["resume"] as? String == "/v1/sessions/\(server.session.rawValue)/events?follow=true&after=\(last)")
            #expect(try await reader.socket.waitForClose(within: .seconds(30)), "the stream did not end after the gap")
            // Resuming where the gap said gets the rest.
            var rest = try server.follow(after: last)
            var next = last + 1
            while next <= 3001, let event = try await rest.next(within: .seconds(30)) {
                #expect(event.seq == next, "expected seq \(next), got \(event.seq) (\(event.type))")
                if event.seq != next { break }
                next += 1
            }
            #expect(next == 3002)
        }
    }

    /// Opens a live follow from the start and reads its first event, then appends 3000 events
    /// of about 1 KiB (far more than the socket buffers hold) while reading nothing.
    static func followWhileStalled(_ server: TestServer) async throws -> SSEReader {
        var reader = try server.follow(after: 0)
        #expect(try await reader.next(within: .seconds(30))?.seq == 1, "the stream is not live")
        try await server.appendEvents(3000)
        return reader
    }

    static func firstHole(_ seqs: [UInt64]) -> UInt64? {
        zip(seqs, seqs.dropFirst()).first { $1 != $0 + 1 }?.0
    }
}

// MARK: - a server for the tests

/// An `HTTPServer` on a temporary unix socket and a loopback TCP port (with `HTTPLimitsTests.token`),
/// answering `GET /events?after=N` as a live follow of one session in a temporary journal and
/// anything else with 200 `{}`.
final class TestServer: Sendable {
    let socket: String
    let tcpPort: Int
    let session: SessionID
    let store: SessionStore
    let directory: String
    private let counter: Counter
    private let logs: LogRecorder

    final class Counter: Sendable {
        let value = Mutex(0)
    }

    private init(socket: String, tcpPort: Int, session: SessionID, store: SessionStore, directory: String, counter: Counter, logs: LogRecorder) {
        self.socket = socket
        self.tcpPort = tcpPort
        self.session = session
        self.store = store
        self.directory = directory
        self.counter = counter
        self.logs = logs
    }

    /// How many requests reached the handler.
    var handled: Int { counter.value.withLock { $0 } }

    static func with(limits: HTTPServer.Limits, _ body: (TestServer) async throws -> Void) async throws {
        let id = Components.testID()
        let directory = NSTemporaryDirectory() + "agentd-http-\(id)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try await SessionStore.open(directory: directory + "/journal")
        let session = try SessionID("http-\(id)")
        try await store.append(session: session, type: "test.start", payload: Array("{}".utf8))
        let counter = Counter()
        let logs = LogRecorder()
        let socket = "/tmp/agentd-http-\(id).sock"
        let server = HTTPServer(
            listeners: [.unixSocket(path: socket), .tcp(host: "127.0.0.1", port: 0, token: HTTPLimitsTests.token)], limits: limits,
            logger: Logger(label: "test.http") { _ in logs.handler() }
        ) { request in
            counter.value.withLock { $0 += 1 }
            if request.path == "/events" {
                let after = request.query["after"].flatMap { UInt64($0) } ?? 0
                return API.sse(store.follow(session: session, after: after))
            }
            return APIResponse(status: 200, headers: [("content-type", "application/json")], body: .bytes(Array("{}".utf8)))
        }
        let running = Task { try await server.run() }
        try await server.waitUntilListening()
        guard let port = server.boundTCPPorts.withLockedValue({ $0.first }) else {
            running.cancel()
            throw RawSocket.Failure(description: "the TCP listener did not bind")
        }
        let test = TestServer(socket: socket, tcpPort: port, session: session, store: store, directory: directory, counter: counter, logs: logs)
        do {
            try await body(test)
        } catch {
            running.cancel()
            _ = await running.result
            try? await store.close()
            throw error
        }
        running.cancel()
        _ = await running.result
        try await store.close()
    }

    /// Appends `count` events of about 1 KiB each, 100 at a time (group commits).
    func appendEvents(_ count: Int) async throws {
        let payload = Array("{\"filler\": \"\(String(repeating: "x", count: 1000))\"}".utf8)
        var done = 0
        while done < count {
            let batch = min(100, count - done)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<batch {
                    group.addTask { try await self.store.append(session: self.session, type: "test.filler", payload: payload) }
                }
                try await group.waitForAll()
            }
            done += batch
        }
    }

    /// A live follow of the session after `after`, on a new unix-socket connection.
    func follow(after: UInt64) throws -> SSEReader {
        let socket = try RawSocket.unix(self.socket)
        socket.sendIgnoringErrors("GET /events?after=\(after) HTTP/1.1\r\nHost: agentd\r\n\r\n")
        return SSEReader(socket)
    }

    /// Waits until the server logs a message containing `text`.
    func waitForLog(_ text: String, within bound: Duration) async throws {
        try await logs.wait(for: text, within: bound)
    }
}

/// Keeps the server's log messages and lets a test wait for one.
final class LogRecorder: Sendable {
    private struct State {
        var messages: [String] = []
        var waiters: [(String, CheckedContinuation<Bool, Never>)] = []
    }
    private let state = Mutex(State())

    func handler() -> LogHandler { Handler(recorder: self) }

    func record(_ message: String) {
        let ready = state.withLock { s -> [CheckedContinuation<Bool, Never>] in
            s.messages.append(message)
            let (match, rest) = (s.waiters.filter { message.contains($0.0) }, s.waiters.filter { !message.contains($0.0) })
            s.waiters = rest
            return match.map(\.1)
        }
        ready.forEach { $0.resume(returning: true) }
    }

    func wait(for text: String, within bound: Duration) async throws {
        let found = await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await withCheckedContinuation { continuation in
                    let seen = self.state.withLock { s -> Bool in
                        if s.messages.contains(where: { $0.contains(text) }) { return true }
                        s.waiters.append((text, continuation))
                        return false
                    }
                    if seen { continuation.resume(returning: true) }
                }
            }
            group.addTask {
                try? await Task.sleep(for: bound)
                return false
            }
            let first = await group.next() ?? false
            if !first {
                // Release the waiter so that the group can end.
                let pending = self.state.withLock { s -> [CheckedContinuation<Bool, Never>] in
                    defer { s.waiters.removeAll { $0.0 == text } }
                    return s.waiters.filter { $0.0 == text }.map(\.1)
                }
                pending.forEach { $0.resume(returning: false) }
            }
            group.cancelAll()
            return first
        }
        if !found { throw Missing(description: "the server did not log '\(text)' within \(bound)") }
    }

    struct Missing: Error, CustomStringConvertible { let description: String }

    struct Handler: LogHandler {
        let recorder: LogRecorder
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) { recorder.record("\(event.message)") }
    }
}

// MARK: - raw client sockets

/// A blocking client socket; every wait is bounded and runs off the cooperative threads.
final class RawSocket: Sendable {
    let fd: Int32
    private let closed = Mutex(false)

    private init(fd: Int32) { self.fd = fd }

    struct Failure: Error, CustomStringConvertible { let description: String }

    static func unix(_ path: String) throws -> RawSocket {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw Failure(description: "socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return try connected(AF_UNIX, address, path)
    }

    static func tcp(port: Int) throws -> RawSocket {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(clamping: port)).bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return try connected(AF_INET, address, "127.0.0.1:\(port)")
    }

    /// A stream socket of `family` connected to `address` (a `sockaddr_*`).
    private static func connected<Address>(_ family: Int32, _ address: Address, _ name: String) throws -> RawSocket {
        let fd = Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var address = address
        let r = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<Address>.size)) }
        }
        guard r == 0 else {
            Glibc.close(fd)
            throw Failure(description: "connect(\(name)): errno \(errno)")
        }
        return RawSocket(fd: fd)
    }

    /// Sends all of `text`; a connection the server already closed is not an error here.
    func sendIgnoringErrors(_ text: String) {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            offset += n
        }
    }

    /// Sends a request and reads the answer to the end (the request asks for `Connection: close`).
    func exchange(_ request: String) async throws -> String {
        defer { close() }
        sendIgnoringErrors(request)
        return try await readUntilClosed(within: .seconds(30))
    }

    /// Waits up to `bound` for readable bytes; returns them, empty at the end of the stream.
    /// - Throws: when nothing came within `bound`.
    func read(within bound: Duration) async throws -> [UInt8] {
        let fd = fd
        let milliseconds = Self.milliseconds(bound)
        return try await Self.offThread {
            var poll = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = Glibc.poll(&poll, 1, milliseconds)
            guard ready > 0 else { throw Failure(description: "nothing to read within \(bound)") }
            var buffer = [UInt8](repeating: 0, count: 65536)
            let n = buffer.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            // A reset is the end of the stream as well.
            return n > 0 ? Array(buffer[0..<n]) : []
        }
    }

    /// Everything until the server closes, within `bound` in all.
    func readUntilClosed(within bound: Duration) async throws -> String {
        let end = ContinuousClock.now + bound
        var bytes: [UInt8] = []
        while true {
            let chunk = try await read(within: max(.zero, end - .now))
            if chunk.isEmpty { return String(decoding: bytes, as: UTF8.self) }
            bytes += chunk
        }
    }

    /// Whether the server closed the connection within `bound` (bytes before the close are read
    /// and dropped).
    func waitForClose(within bound: Duration) async throws -> Bool {
        let end = ContinuousClock.now + bound
        while ContinuousClock.now < end {
            guard let chunk = try? await read(within: end - .now) else { return false }
            if chunk.isEmpty { return true }
        }
        return false
    }

    /// Whether the server has closed the connection, without waiting.
    func isClosedNow() -> Bool {
        var poll = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard Glibc.poll(&poll, 1, 0) > 0 else { return false }
        var byte: UInt8 = 0
        return Glibc.recv(fd, &byte, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) <= 0
    }

    /// Waits until `count` of `sockets` are closed by the server; returns their indices.
    static func waitForCloses(_ sockets: [RawSocket], count: Int, within bound: Duration) async throws -> Set<Int> {
        let end = ContinuousClock.now + bound
        var closed: Set<Int> = []
        while closed.count < count, ContinuousClock.now < end {
            // Only the ones still open: a closed one would make every poll return at once.
            let watched = sockets.indices.filter { !closed.contains($0) }
            let fds = watched.map { sockets[$0].fd }
            let milliseconds = Self.milliseconds(end - .now)
            let ready = try await offThread { () -> [Int] in
                var polls = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
                guard Glibc.poll(&polls, nfds_t(polls.count), milliseconds) > 0 else { return [] }
                return polls.indices.filter { polls[$0].revents != 0 }
            }
            for position in ready where sockets[watched[position]].isClosedNow() {
                closed.insert(watched[position])
            }
        }
        return closed
    }

    func close() {
        let first = closed.withLock { c -> Bool in
            defer { c = true }
            return !c
        }
        if first { Glibc.close(fd) }
    }

    deinit { close() }

    static func milliseconds(_ duration: Duration) -> Int32 {
        let (seconds, attoseconds) = duration.components
        return Int32(clamping: max(0, seconds) * 1000 + max(0, attoseconds) / 1_000_000_000_000_000)
    }

    /// Runs a blocking call on a thread of its own.
    static func offThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            let thread = Thread { continuation.resume(with: Result { try body() }) }
            thread.start()
        }
    }
}

/// Reads server-sent events from a raw socket (after the response head).
struct SSEReader {
    struct Event { var seq: UInt64; var type: String; var data: String }
    let socket: RawSocket
    private var buffer: [UInt8] = []
    private var headRead = false

    init(_ socket: RawSocket) { self.socket = socket }

    /// The next event block (comments skipped); nil when the stream ended.
    mutating func next(within bound: Duration) async throws -> Event? {
        let end = ContinuousClock.now + bound
        while true {
            if !headRead, let range = buffer.firstRange(of: Array("\r\n\r\n".utf8)) {
                let head = String(decoding: buffer[..<range.lowerBound], as: UTF8.self)
                guard head.hasPrefix("HTTP/1.1 200") else { throw RawSocket.Failure(description: "not a stream: \(head)") }
                buffer.removeSubrange(..<range.upperBound)
                headRead = true
            }
            if headRead, let block = takeBlock() {
                var event = Event(seq: 0, type: "message", data: "")
                for line in block.split(separator: "\n") {
                    if line.hasPrefix("id: ") { event.seq = UInt64(line.dropFirst(4)) ?? 0 }
                    if line.hasPrefix("event: ") { event.type = String(line.dropFirst(7)) }
                    if line.hasPrefix("data: ") { event.data = String(line.dropFirst(6)) }
                }
                if event.data.isEmpty { continue }  // a comment
                return event
            }
            let chunk = try await socket.read(within: max(.zero, end - .now))
            if chunk.isEmpty { return nil }
            buffer += chunk
        }
    }

    /// The next complete block of the chunked body, its chunk framing removed.
    private mutating func takeBlock() -> String? {
        // The body is chunked: strip complete chunks into `decoded` first.
        while let line = buffer.firstRange(of: Array("\r\n".utf8)) {
            guard let size = Int(String(decoding: buffer[..<line.lowerBound], as: UTF8.self), radix: 16) else { return nil }
            let start = line.upperBound, stop = start + size
            guard buffer.count >= stop + 2 else { break }
            decoded += buffer[start..<stop]
            buffer.removeSubrange(..<(stop + 2))
            if size == 0 { break }
        }
        guard let end = decoded.firstRange(of: Array("\n\n".utf8)) else { return nil }
        let block = String(decoding: decoded[..<end.lowerBound], as: UTF8.self)
        decoded.removeSubrange(..<end.upperBound)
        return block
    }
    private var decoded: [UInt8] = []
}

import CurlHTTP
import Foundation
import Glibc
import Synchronization
import Testing
import TestSupport

/// A unix-socket HTTP server on a thread of its own that answers `GET /now` at once and never
/// answers anything else: it holds those connections open until `stop()`.
final class StubServer: @unchecked Sendable {
    // Invariant: `listener` and `path` are set in init; `held` is behind its Mutex.
    let path: String
    private let listener: Int32
    private let held = Mutex<[Int32]>([])

    struct Failure: Error, CustomStringConvertible { let description: String }

    init() throws {
        path = "/tmp/agentd-stub-\(Components.testID()).sock"
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in raw.copyBytes(from: Array(path.utf8.prefix(raw.count - 1)) + [0]) }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(listener, 256) == 0 else {
            close(listener)
            throw Failure(description: "bind/listen \(path): \(String(cString: strerror(errno)))")
        }
        Thread.detachNewThread { [self] in serve() }
    }

    /// How many connections the server holds unanswered.
    var heldCount: Int { held.withLock { $0.count } }

    private func serve() {
        while true {
            let fd = accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR { continue }
                return  // stopped
            }
            var head: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while !String(decoding: head, as: UTF8.self).contains("\r\n\r\n") {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                head += buffer[0..<n]
            }
            if String(decoding: head, as: UTF8.self).hasPrefix("GET /now ") {
                let answer = Array("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".utf8)
                _ = answer.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
            } else {
                held.withLock { $0.append(fd) }
            }
        }
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        for fd in held.withLock({ $0 }) { close(fd) }
        unlink(path)
    }
}

/// The transport holds no thread per request in flight (issue 16: every request used to hold
/// one of 32 pool threads, so 32 slow answers stalled every other caller).
@Suite("CurlTransport under many slow requests")
struct TransportConcurrencyTests {
    /// A started stub server and a transport to it; the caller stops the server.
    static func stub() throws -> (StubServer, CurlTransport) {
        CurlTransport.globalInit()
        let server = try StubServer()
        return (server, CurlTransport(endpoint: .unixSocket(path: server.path)))
    }

    @Test("64 requests that the server never answers: another request is answered meanwhile, and cancelling them throws .cancelled")
    func slowRequestsHoldNoThread() async throws {
        let (server, transport) = try Self.stub()
        defer { server.stop() }
        try await withThrowingTaskGroup(of: HTTPClientError.Code?.self) { group in
            for _ in 0..<64 {
                group.addTask {
                    do {
                        _ = try await transport.send(HTTPRequest(method: "GET", target: "/hang", timeout: .seconds(60)))
                        return nil
                    } catch let error as HTTPClientError {
                        return error.code
                    }
                }
            }
            // Every slow request reached the server…
            let allSent = await eventually(.seconds(30)) { server.heldCount == 64 }
            #expect(allSent, "only \(server.heldCount) of 64 requests reached the server")
            // …and another one is answered while they all wait.
            let answer = try await transport.send(HTTPRequest(method: "GET", target: "/now"))
            #expect(answer.status == 200)
            #expect(answer.body == Array("ok".utf8))
            // Cancelled tasks end with .cancelled, without the server ever answering.
            group.cancelAll()
            var codes: [HTTPClientError.Code?] = []
            for try await code in group { codes.append(code) }
            #expect(codes.count == 64)
            #expect(codes.allSatisfy { $0 == .cancelled })
        }
    }

    @Test("a request the server never answers ends with .timeout after its timeout, naming the endpoint")
    func unansweredRequestTimesOut() async throws {
        let (server, transport) = try Self.stub()
        defer { server.stop() }
        let error = await #expect(throws: HTTPClientError.self) {
            _ = try await transport.send(HTTPRequest(method: "GET", target: "/hang", timeout: .milliseconds(300)))
        }
        #expect(error?.code == .timeout)
        #expect(error?.message.contains(server.path) == true)
    }
}

import Foundation
import Glibc

/// The baseline the engine client is measured against: HTTP/1.1 written by hand on a fresh
/// unix socket connection per request (`Connection: close`), read to EOF. No libcurl, no
/// thread hops, no JSON encoding — as close to "straight over the socket" as a program gets.
struct RawUnixHTTP {
    let socketPath: String

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// Sends one request and returns (status, body).
    func send(_ method: String, _ target: String, json: String? = nil) throws -> (Int, [UInt8]) {
        let fd = Self.streamSocket()
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var addr = Self.address(socketPath)
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard ok == 0 else { throw Failure(description: "connect \(socketPath): \(String(cString: strerror(errno)))") }
        var request = "\(method) \(target) HTTP/1.1\r\nHost: d\r\nConnection: close\r\n"
        if let json {
            request += "Content-Type: application/json\r\nContent-Length: \(json.utf8.count)\r\n\r\n\(json)"
        } else {
            request += "Content-Length: 0\r\n\r\n"
        }
        let out = Array(request.utf8)
        var sent = 0
        while sent < out.count {
            let n = out[sent...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { throw Failure(description: "write: \(String(cString: strerror(errno)))") }
            sent += n
        }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            response.append(contentsOf: buffer[0..<n])
        }
        guard let headerEnd = response.firstRange(of: [13, 10, 13, 10]) else { throw Failure(description: "no HTTP header in response") }
        let head = String(decoding: response[..<headerEnd.lowerBound], as: UTF8.self)
        let status = Int(head.split(separator: " ").dropFirst().first ?? "") ?? 0
        var body = Array(response[headerEnd.upperBound...])
        if head.lowercased().contains("transfer-encoding: chunked") { body = Self.dechunk(body) }
        return (status, body)
    }

    /// A new unix stream socket (close-on-exec), or -1.
    static func streamSocket() -> Int32 { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }

    /// Whether a unix stream socket at `path` accepts a connection now.
    static func canConnect(_ path: String) -> Bool {
        let fd = streamSocket()
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = address(path)
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
    }

    /// The address of the unix socket at `path`.
    static func address(_ path: String) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in raw.copyBytes(from: Array(path.utf8.prefix(raw.count - 1)) + [0]) }
        return addr
    }

    static func dechunk(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            guard let lineEnd = bytes[i...].firstRange(of: [13, 10]) else { break }
            let size = Int(String(decoding: bytes[i..<lineEnd.lowerBound], as: UTF8.self), radix: 16) ?? 0
            if size == 0 { break }
            let start = lineEnd.upperBound
            out.append(contentsOf: bytes[start..<min(start + size, bytes.count)])
            i = start + size + 2
        }
        return out
    }

    /// Creates and starts a container from the create body `create`; returns its id.
    func startContainer(_ create: String) throws -> String {
        let (status, created) = try send("POST", "/v1.41/containers/create", json: create)
        guard status == 201, let id = Self.field("Id", in: created) else {
            throw Failure(description: "raw create: HTTP \(status) \(String(decoding: created, as: UTF8.self))")
        }
        _ = try send("POST", "/v1.41/containers/\(id)/start")
        return id
    }

    func removeContainer(_ id: String) { _ = try? send("DELETE", "/v1.41/containers/\(id)?force=true&v=true") }

    /// One exec in the running container `id` with the exec body `body`, to its end: exec
    /// create, start (its output), and inspect when `inspect` (what a client needs for the
    /// exit code). Returns the seconds it took.
    func exec(in id: String, body: String, inspect: Bool = true) throws -> Double {
        let t0 = now()
        let (_, b) = try send("POST", "/v1.41/containers/\(id)/exec", json: body)
        guard let exec = Self.field("Id", in: b) else { throw Failure(description: "raw exec create failed: \(String(decoding: b, as: UTF8.self))") }
        _ = try send("POST", "/v1.41/exec/\(exec)/start", json: #"{"Detach":false,"Tty":false}"#)
        if inspect { _ = try send("GET", "/v1.41/exec/\(exec)/json") }
        return now() - t0
    }

    /// The JSON string field `key` of a small object body.
    static func field(_ key: String, in body: [UInt8]) -> String? {
        (try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])?[key] as? String
    }
}

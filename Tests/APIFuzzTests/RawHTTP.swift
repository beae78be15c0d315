import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// One HTTP exchange over a unix socket with bytes exactly as given (malformed ones too):
/// what the fuzzer sends and what came back.
enum RawHTTP {
    struct Answer {
        /// The status of the first status line; nil when none came.
        var status: Int?
        var headers: [String: String]
        var body: [UInt8]
        /// Why the answer is not a well-formed HTTP answer, when it is not.
        var problem: String?
    }

    /// Sends `request` on a new connection to `socket` and reads the answer: the whole body
    /// (by Content-Length, chunks, or until the server closes), or only the head of an event
    /// stream. Blocking, bounded by a receive timeout of `timeoutSeconds`.
    static func exchange(socket path: String, _ request: [UInt8], timeoutSeconds: Int = 20) -> Answer {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return Answer(status: nil, headers: [:], body: [], problem: "socket() failed: errno \(errno)") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            return Answer(status: nil, headers: [:], body: [], problem: "socket path too long")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in pathBytes.enumerated() { raw[i] = b }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { return Answer(status: nil, headers: [:], body: [], problem: "connect() failed: errno \(errno) — is the server down?") }
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var sent = 0
        while sent < request.count {
            // MSG_NOSIGNAL: a server that answers early and closes must not kill the test.
            let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }  // the server may answer (and close) before taking the whole body
            sent += n
        }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    return parse(received, problemIfIncomplete: "no complete answer within \(timeoutSeconds) s")
                }
                break  // ECONNRESET after an answer: parse what came
            }
            if n == 0 { break }
            received += buffer[0..<n]
            if let answer = complete(received) { return answer }
        }
        return parse(received, problemIfIncomplete: "the connection closed before a complete answer")
    }

    /// The answer when `bytes` hold a complete one (or the head of an event stream).
    private static func complete(_ bytes: [UInt8]) -> Answer? {
        guard let end = bytes.firstRange(of: Array("\r\n\r\n".utf8)) else { return nil }
        var answer = head(Array(bytes[..<end.lowerBound]))
        let body = Array(bytes[end.upperBound...])
        if answer.headers["content-type"]?.hasPrefix("text/event-stream") == true { return answer }
        if let length = answer.headers["content-length"].flatMap(Int.init) {
            guard body.count >= length else { return nil }
            answer.body = Array(body.prefix(length))
            return answer
        }
        if answer.headers["transfer-encoding"]?.lowercased().contains("chunked") == true {
            guard let decoded = dechunk(body) else { return nil }
            answer.body = decoded
            return answer
        }
        return nil  // read to the end
    }

    private static func parse(_ bytes: [UInt8], problemIfIncomplete: String) -> Answer {
        guard let end = bytes.firstRange(of: Array("\r\n\r\n".utf8)) else {
            return Answer(status: nil, headers: [:], body: [], problem: problemIfIncomplete + " (\(bytes.count) bytes: \(String(decoding: bytes.prefix(200), as: UTF8.self)))")
        }
        var answer = head(Array(bytes[..<end.lowerBound]))
        answer.body = Array(bytes[end.upperBound...])
        if let length = answer.headers["content-length"].flatMap(Int.init), answer.body.count < length {
            answer.problem = problemIfIncomplete + " (body \(answer.body.count) of \(length) bytes)"
        }
        return answer
    }

    private static func head(_ bytes: [UInt8]) -> Answer {
        let lines = String(decoding: bytes, as: UTF8.self).components(separatedBy: "\r\n")
        let statusLine = lines.first ?? ""
        let words = statusLine.split(separator: " ")
        var status: Int?
        if words.count >= 2, words[0].hasPrefix("HTTP/1."), words[1].count == 3 { status = Int(words[1]) }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return Answer(status: status, headers: headers, body: [], problem: status == nil ? "no status line: '\(statusLine.prefix(100))'" : nil)
    }

    /// A chunked body decoded, or nil until its last chunk has come.
    private static func dechunk(_ bytes: [UInt8]) -> [UInt8]? {
        var out: [UInt8] = []
        var i = 0
        while true {
            guard let lineEnd = bytes[i...].firstRange(of: Array("\r\n".utf8)) else { return nil }
            let sizeText = String(decoding: bytes[i..<lineEnd.lowerBound], as: UTF8.self).split(separator: ";").first ?? ""
            guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16) else { return nil }
            let start = lineEnd.upperBound
            if size == 0 { return out }
            guard bytes.count >= start + size + 2 else { return nil }
            out += bytes[start..<start + size]
            i = start + size + 2
        }
    }
}

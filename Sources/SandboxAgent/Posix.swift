#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSandboxAgent

/// Small POSIX helpers shared by the agent's parts.
enum Posix {
    /// "permission denied: /etc/x": the C library's text for `code`, lowercased, then the path.
    static func describe(_ code: Int32, _ path: String) -> String {
        "\(message(code)): \(path)"
    }

    static func message(_ code: Int32) -> String {
        guard let text = strerror(code) else { return "error \(code)" }
        var s = String(cString: text)
        if let first = s.first, first.isUppercase, s.dropFirst().first?.isLowercase ?? true {
            s = first.lowercased() + s.dropFirst()
        }
        return s
    }

    /// Monotonic time in nanoseconds.
    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Writes everything, retrying on EINTR; false when the descriptor fails.
    @discardableResult
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        transferAll(bytes) { write(fd, $0, $1) }
    }

    /// Sends everything on a socket without raising SIGPIPE; false when the peer is gone or the
    /// send timeout passed.
    @discardableResult
    static func sendAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        sendAll(fd, bytes, count: bytes.count)
    }

    /// Sends the first `count` bytes of `bytes`.
    static func sendAll(_ fd: Int32, _ bytes: [UInt8], count: Int) -> Bool {
        transferAll(bytes, count: count) { send(fd, $0, $1, csa_msg_nosignal()) }
    }

    private static func transferAll(_ bytes: [UInt8], count: Int? = nil, _ call: (UnsafeRawPointer, Int) -> Int) -> Bool {
        bytes.withUnsafeBytes { raw in
            let total = min(count ?? raw.count, raw.count)
            var offset = 0
            while offset < total {
                let n = call(raw.baseAddress! + offset, total - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    return false
                }
                offset += n
            }
            return true
        }
    }

    /// The address of a unix socket at `path`; nil when the path is too long for one.
    static func unixAddress(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        guard path.utf8.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in path.utf8.enumerated() { raw[i] = byte }
        }
        return address
    }

    /// Reads up to `max` bytes of a small file (cgroup and proc files); nil when it cannot be read.
    static func readSmallFile(_ path: String, max: Int = 64 << 10) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while out.count < max {
            let n = read(fd, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out.append(contentsOf: buffer[0..<n])
        }
        return String(decoding: out.prefix(max), as: UTF8.self)
    }

    static func setTimeout(_ fd: Int32, option: Int32, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, option, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Starts a detached thread running `body`.
    static func startThread(_ body: @escaping @Sendable () -> Void) -> Bool {
        let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        pthread_attr_setstacksize(&attr, 512 << 10)
        var thread = pthread_t()
        let rc = pthread_create(&thread, &attr, runThreadBody, box)
        if rc != 0 {
            Unmanaged<ThreadBody>.fromOpaque(box).release()
            return false
        }
        return true
    }
}

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

private func runThreadBody(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let box = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
    box.body()
    return nil
}

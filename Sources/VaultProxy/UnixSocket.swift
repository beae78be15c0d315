#if canImport(Glibc)
import Glibc
#endif

/// The unix-socket calls the control channel needs and neither Foundation nor NIO offers:
/// sending a line with a descriptor attached (`SCM_RIGHTS`), receiving lines with the
/// descriptors that came with them, the peer's credentials (`SO_PEERCRED`), and binding a
/// listening socket. Shared by the proxy and by agentd's supervisor.
public enum UnixSocket {
    /// The peer of a connected unix socket, as the kernel recorded it at `connect`.
    public struct PeerCredentials: Sendable, Equatable {
        public var pid: pid_t
        public var uid: uid_t
        public var gid: gid_t
    }

    /// The directory part of `path` (`/run/x/proxy.sock` → `/run/x`; `/proxy.sock` → `/`), as
    /// `NSString.deletingLastPathComponent` gives it, without Foundation.
    static func directory(of path: String) -> String {
        var trimmed = Substring(path)
        while trimmed.count > 1, trimmed.hasSuffix("/") { trimmed.removeLast() }
        guard let slash = trimmed.lastIndex(of: "/") else { return "" }
        if slash == trimmed.startIndex { return "/" }
        var parent = trimmed[..<slash]
        while parent.count > 1, parent.hasSuffix("/") { parent.removeLast() }
        return String(parent)
    }

    /// `sizeof(struct cmsghdr)` rounded up to the alignment of `size_t`, as `CMSG_ALIGN` does
    /// (the CMSG_* macros are not imported into Swift).
    private static let headerSpace = align(MemoryLayout<cmsghdr>.size)
    private static func align(_ n: Int) -> Int { (n + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1) }
    /// Room for this many descriptors in one receive (a sender attaches at most one a line).
    static let maxDescriptorsPerRead = 16

    /// Writes all of `bytes` to the stream socket `fd`; `descriptor`, if given, rides along
    /// with the first byte (SCM_RIGHTS: the receiver gets its own copy). No SIGPIPE.
    /// - Returns: false when the peer is gone or the socket failed.
    public static func send(_ fd: CInt, _ bytes: [UInt8], passing descriptor: CInt? = nil) -> Bool {
        var offset = 0
        if let descriptor {
            let space = headerSpace + align(MemoryLayout<CInt>.size)
            var control = [UInt8](repeating: 0, count: space)
            var sent = -1
            control.withUnsafeMutableBytes { raw in
                let header = raw.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
                header.pointee.cmsg_len = headerSpace + MemoryLayout<CInt>.size
                header.pointee.cmsg_level = SOL_SOCKET
                header.pointee.cmsg_type = CInt(SCM_RIGHTS)
                raw.storeBytes(of: descriptor, toByteOffset: headerSpace, as: CInt.self)
                bytes.withUnsafeBytes { data in
                    var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: data.baseAddress), iov_len: data.count)
                    withUnsafeMutablePointer(to: &iov) { iovPointer in
                        var message = msghdr()
                        message.msg_iov = iovPointer
                        message.msg_iovlen = 1
                        message.msg_control = raw.baseAddress
                        message.msg_controllen = space
                        repeat { sent = sendmsg(fd, &message, CInt(MSG_NOSIGNAL)) } while sent < 0 && errno == EINTR
                    }
                }
            }
            guard sent > 0 else { return false }
            offset = sent
        }
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, CInt(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }

    /// One `recvmsg` into `buffer`; descriptors that came with the bytes are appended to
    /// `descriptors` (close-on-exec). Falls back to `read` on a descriptor that is not a
    /// socket (a pipe). `truncated` is set when more descriptors came than there was room
    /// for (the kernel closed the rest).
    /// - Returns: bytes read, 0 at end of stream, -1 on error (`errno`).
    static func receive(
        _ fd: CInt, into buffer: UnsafeMutableRawBufferPointer, descriptors: inout [CInt], truncated: inout Bool
    ) -> Int {
        let space = headerSpace + align(maxDescriptorsPerRead * MemoryLayout<CInt>.size)
        var control = [UInt8](repeating: 0, count: space)
        var received = -1
        var controlLength = 0
        var flags: CInt = 0
        control.withUnsafeMutableBytes { raw in
            var iov = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
            withUnsafeMutablePointer(to: &iov) { iovPointer in
                var message = msghdr()
                message.msg_iov = iovPointer
                message.msg_iovlen = 1
                message.msg_control = raw.baseAddress
                message.msg_controllen = space
                repeat { received = recvmsg(fd, &message, CInt(MSG_CMSG_CLOEXEC)) } while received < 0 && errno == EINTR
                controlLength = Int(message.msg_controllen)
                flags = message.msg_flags
            }
        }
        if received < 0 && errno == ENOTSOCK {
            repeat { received = read(fd, buffer.baseAddress, buffer.count) } while received < 0 && errno == EINTR
            return received
        }
        guard received >= 0 else { return -1 }
        if flags & CInt(MSG_CTRUNC) != 0 { truncated = true }
        control.withUnsafeBytes { raw in
            var offset = 0
            while offset + headerSpace <= controlLength {
                let length = raw.load(fromByteOffset: offset, as: Int.self)
                let level = raw.load(fromByteOffset: offset + MemoryLayout<Int>.size, as: CInt.self)
                let type = raw.load(fromByteOffset: offset + MemoryLayout<Int>.size + MemoryLayout<CInt>.size, as: CInt.self)
                guard length >= headerSpace, offset + length <= controlLength else { break }
                if level == SOL_SOCKET && type == CInt(SCM_RIGHTS) {
                    let count = (length - headerSpace) / MemoryLayout<CInt>.size
                    for i in 0..<count {
                        descriptors.append(raw.loadUnaligned(fromByteOffset: offset + headerSpace + i * MemoryLayout<CInt>.size, as: CInt.self))
                    }
                }
                offset += align(length)
            }
        }
        return received
    }

    /// The process at the other end of the connected unix socket `fd` (`SO_PEERCRED`).
    public static func peerCredentials(_ fd: CInt) -> PeerCredentials? {
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
        var raw: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout.size(ofValue: raw))
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &raw, &length) == 0, length == MemoryLayout.size(ofValue: raw) else { return nil }
        return PeerCredentials(pid: raw.0, uid: raw.1, gid: raw.2)
    }

    /// A `sockaddr_un` for `path`.
    /// - Throws: when `path` does not fit (107 bytes).
    private static func address(_ path: String) throws(ProxyError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity, !bytes.contains(0) else {
            throw ProxyError("unix socket path must be 1–\(capacity - 1) bytes: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return address
    }

    private static func failure(_ what: String, _ path: String) -> ProxyError {
        ProxyError("\(what) \(path): \(String(cString: strerror(errno)))")
    }

    /// A new listening stream socket (close-on-exec) bound at `path` with permissions
    /// `mode`. A socket file already at `path` is replaced; anything else there is an error.
    /// - Throws: naming the path and the failed call.
    public static func listen(path: String, mode: mode_t, backlog: CInt = 128) throws(ProxyError) -> CInt {
        var address = try address(path)
        var info = stat()
        if lstat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFSOCK else {
                throw ProxyError("\(path) exists and is not a socket; not replacing it")
            }
            unlink(path)
        }
        let fd = socket(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure("cannot make a socket for", path) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let error = failure("cannot bind", path)
            close(fd)
            throw error
        }
        guard chmod(path, mode) == 0, Glibc.listen(fd, backlog) == 0 else {
            let error = failure("cannot listen on", path)
            close(fd)
            unlink(path)
            throw error
        }
        return fd
    }

    /// A stream socket (close-on-exec) connected to `path`.
    /// - Throws: naming the path and why (`ENOENT`, `ECONNREFUSED`, `EACCES`…).
    public static func connect(path: String) throws(ProxyError) -> CInt {
        var address = try address(path)
        let fd = socket(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure("cannot make a socket for", path) }
        var rc: CInt
        repeat {
            rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        } while rc < 0 && errno == EINTR
        guard rc == 0 else {
            let error = failure("cannot connect to", path)
            close(fd)
            throw error
        }
        return fd
    }

    /// Whether `fd` is a listening unix stream socket (what `addSandbox` may pass).
    static func isListeningUnixStream(_ fd: CInt) -> Bool {
        func option(_ name: CInt) -> CInt? {
            var value: CInt = 0
            var length = socklen_t(MemoryLayout<CInt>.size)
            return getsockopt(fd, SOL_SOCKET, name, &value, &length) == 0 ? value : nil
        }
        return option(SO_DOMAIN) == AF_UNIX && option(SO_TYPE) == CInt(SOCK_STREAM.rawValue) && option(SO_ACCEPTCONN) == 1
    }
}

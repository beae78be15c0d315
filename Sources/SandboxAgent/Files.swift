#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SandboxAgentProtocol
import Synchronization

/// File reads, writes and listings, as the agent's own user: the kernel's permissions decide.
enum Files {
    /// Listing entries are sent in frames of about this many payload bytes.
    static let listBatchBytes = 512 << 10
    private static let tempCounter = Atomic<UInt64>(0)

    static func read(path: String, limit: UInt64, connection: Connection) {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else {
            connection.send(.error(Posix.describe(errno, path)))
            return
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            connection.send(.error(Posix.describe(errno, path)))
            return
        }
        switch st.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR:
            connection.send(.error("is a directory: \(path)"))
            return
        default:
            connection.send(.error("not a regular file: \(path)"))
            return
        }
        let size = UInt64(st.st_size)
        guard size <= limit else {
            connection.send(.error(tooLarge(path, "is \(size) bytes", limit)))
            return
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        guard connection.send(.fileInfo(AgentFileInfo(size: size, mode: UInt32(st.st_mode & 0o7777)))) else { return }
        // Each chunk is read straight behind its frame's header, and sent from there.
        let header = AgentFrame.headerSize
        var frame = [UInt8](repeating: 0, count: header + AgentFrame.fileChunkSize)
        var total: UInt64 = 0
        while true {
            let n = frame.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + header, $0.count - header) }
            if n < 0 {
                if errno == EINTR { continue }
                connection.send(.error(Posix.describe(errno, path)))
                return
            }
            if n == 0 { break }
            total += UInt64(n)
            // A file that grows while it is read (a log, /proc) is cut off at the limit, not sent whole.
            guard total <= limit else {
                connection.send(.error(tooLarge(path, "grew past \(limit) bytes while being read", limit)))
                return
            }
            frame.replaceSubrange(0..<header, with: AgentFrame.header(type: AgentMessageType.fileChunk.rawValue, length: n))
            guard Posix.sendAll(connection.fd, frame, count: header + n) else { return }
        }
        connection.send(.fileEnd)
    }

    static func tooLarge(_ path: String, _ what: String, _ limit: UInt64) -> String {
        "file too large: \(path) \(what), the limit is \(limit) bytes"
    }

    /// Where a write goes: a temporary file renamed over the target, or the target itself.
    private struct Destination {
        let fd: Int32
        let temporary: String?
    }

    static func write(path: String, mode: UInt32?, umask: mode_t, connection: Connection) throws(ConnectionEnd) {
        guard !path.isEmpty, !path.utf8.contains(0) else { throw .violation("a file path cannot be empty or contain NUL bytes") }
        let destination: Destination
        let finalMode: mode_t
        switch open(path: path, mode: mode, umask: umask) {
        case .failure(let failure):
            connection.send(.error(failure.message))
            return
        case .success(let (d, m)):
            destination = d
            finalMode = m
        }
        var written: UInt64 = 0
        var failure: String?
        func abandon() {
            close(destination.fd)
            if let t = destination.temporary { unlink(t) }
        }
        receiving: while true {
            let message: AgentMessage
            do {
                message = try connection.receive()
            } catch {
                abandon()
                throw error
            }
            switch message {
            case .fileChunk(let bytes):
                if failure == nil {
                    if Posix.writeAll(destination.fd, bytes) {
                        written += UInt64(bytes.count)
                    } else {
                        failure = Posix.describe(errno, path)
                    }
                }
            case .fileEnd:
                break receiving
            default:
                abandon()
                throw .violation("unexpected \(message.type) frame while writing \(path)")
            }
        }
        if let failure {
            abandon()
            connection.send(.error(failure))
            return
        }
        if fchmod(destination.fd, finalMode) != 0 && destination.temporary != nil {
            let message = Posix.describe(errno, path)
            abandon()
            connection.send(.error(message))
            return
        }
        if close(destination.fd) != 0 {
            let message = Posix.describe(errno, path)
            if let t = destination.temporary { unlink(t) }
            connection.send(.error(message))
            return
        }
        if let temporary = destination.temporary, rename(temporary, path) != 0 {
            let code = errno
            // A bind-mount point (/etc/hosts) cannot be replaced: copy into it instead.
            let message = code == EBUSY || code == EXDEV ? copy(temporary, into: path) : Posix.describe(code, path)
            unlink(temporary)
            if let message {
                connection.send(.error(message))
                return
            }
        }
        connection.send(.writeDone(bytes: written))
    }

    /// Opens the destination of a write: creates missing parents, then a temporary file next to
    /// the target, or the target itself where a rename would not do (a symlink, a file owned by
    /// another user, a directory the user cannot write).
    private static func open(path: String, mode: UInt32?, umask: mode_t) -> Result<(Destination, mode_t), FileError> {
        var st = stat()
        var exists = false
        var inPlace = false
        if lstat(path, &st) == 0 {
            exists = true
            if st.st_mode & S_IFMT == S_IFLNK {
                inPlace = true
                if stat(path, &st) != 0 { exists = false }
            }
            if exists && st.st_mode & S_IFMT == S_IFDIR { return .failure(FileError("is a directory: \(path)")) }
            if exists && st.st_mode & S_IFMT != S_IFREG { inPlace = true }
            if exists && st.st_uid != geteuid() { inPlace = true }
        } else if let message = makeParents(of: path) {
            return .failure(FileError(message))
        }
        let finalMode: mode_t = mode.map { mode_t($0 & 0o7777) } ?? (exists ? st.st_mode & 0o7777 : 0o666 & ~umask)
        let slash = path.utf8.lastIndex(of: UInt8(ascii: "/"))
        let directory = slash.map { String(path[..<$0]) } ?? "."
        let base = slash.map { String(path[path.index(after: $0)...]) } ?? path
        if !inPlace {
            let n = tempCounter.add(1, ordering: .relaxed).newValue
            let temporary = (directory.isEmpty ? "" : directory) + "/.\(base).agentd-\(getpid())-\(n)"
            let fd = Glibc.open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd >= 0 { return .success((Destination(fd: fd, temporary: temporary), finalMode)) }
        }
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOCTTY, finalMode)
        guard fd >= 0 else { return .failure(FileError(Posix.describe(errno, path))) }
        if mode != nil { _ = fchmod(fd, finalMode) }
        return .success((Destination(fd: fd, temporary: nil), finalMode))
    }

    /// Creates the missing parent directories of `path`; an error message, or nil.
    private static func makeParents(of path: String) -> String? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).dropLast()
        var current = path.hasPrefix("/") ? "" : "."
        for part in parts {
            current += "/" + part
            if mkdir(current, 0o777) != 0 && errno != EEXIST {
                return Posix.describe(errno, current)
            }
        }
        return nil
    }

    /// Copies `source` into the existing `target` in place; an error message, or nil.
    private static func copy(_ source: String, into target: String) -> String? {
        let input = Glibc.open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { return Posix.describe(errno, target) }
        defer { close(input) }
        let output = Glibc.open(target, O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOCTTY)
        guard output >= 0 else { return Posix.describe(errno, target) }
        var buffer = [UInt8](repeating: 0, count: AgentFrame.fileChunkSize)
        while true {
            let n = Glibc.read(input, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            if n < 0 {
                close(output)
                return Posix.describe(errno, target)
            }
            if n == 0 { break }
            guard Posix.writeAll(output, Array(buffer[0..<n])) else {
                let message = Posix.describe(errno, target)
                close(output)
                return message
            }
        }
        return close(output) == 0 ? nil : Posix.describe(errno, target)
    }

    static func list(path: String, connection: Connection) {
        guard let dir = opendir(path) else {
            connection.send(.error(Posix.describe(errno, path)))
            return
        }
        defer { closedir(dir) }
        let dfd = dirfd(dir)
        var batch: [AgentFileEntry] = []
        var batchBytes = 0
        while true {
            errno = 0
            guard let entry = readdir(dir) else {
                if errno != 0 {
                    connection.send(.error(Posix.describe(errno, path)))
                    return
                }
                break
            }
            let name = withUnsafePointer(to: &entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            var st = stat()
            guard fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { continue }  // gone since readdir
            let type: AgentFileType
            switch st.st_mode & S_IFMT {
            case S_IFREG: type = .regular
            case S_IFDIR: type = .directory
            case S_IFLNK: type = .symlink
            case S_IFIFO: type = .fifo
            case S_IFSOCK: type = .socket
            case S_IFCHR: type = .characterDevice
            case S_IFBLK: type = .blockDevice
            default: type = .unknown
            }
            var target: String?
            if type == .symlink {
                var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
                let n = readlinkat(dfd, name, &buffer, Int(PATH_MAX))
                if n >= 0 { target = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) }
            }
            let e = AgentFileEntry(
                name: name, type: type, size: UInt64(max(st.st_size, 0)), mode: UInt32(st.st_mode & 0o7777),
                uid: st.st_uid, gid: st.st_gid, modificationTime: Int64(st.st_mtim.tv_sec), symlinkTarget: target)
            batch.append(e)
            batchBytes += AgentMessage.encodedSize(of: e)
            if batchBytes >= listBatchBytes {
                guard connection.send(.listEntries(batch)) else { return }
                batch.removeAll(keepingCapacity: true)
                batchBytes = 0
            }
        }
        if !batch.isEmpty { guard connection.send(.listEntries(batch)) else { return } }
        connection.send(.listEnd)
    }
}

/// A file operation the agent refuses; the message goes back to the host.
struct FileError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

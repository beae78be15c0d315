import Foundation

/// A read-only shared mapping of a segment file. Readers keep a reference while they decode,
/// so a remap (when a segment outgrows its mapping) never pulls memory out from under them.
final class Mapping: @unchecked Sendable {
    // Invariant for @unchecked Sendable: immutable after init; the memory is only read, and
    // only below the durable end of the segment, which no one rewrites.
    let base: UnsafeRawPointer
    let length: Int

    init(fd: Int32, length: Int, path: String) throws {
        let len = max(length, 4096)
        let p = mmap(nil, len, PROT_READ, MAP_SHARED, fd, 0)
        guard let p, p != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw SessionLogError.syscall("mmap", errno: errno, path: path, context: "mapping the segment for reading")
        }
        base = UnsafeRawPointer(p)
        self.length = len
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), length) }

    /// Drops the pages this process has touched (`madvise(MADV_DONTNEED)`): recovery reads a
    /// whole preallocated segment, and without this those pages would stay in agentd's RSS.
    /// The data stays in the page cache; a later read faults it back in.
    func dropResidentPages() {
        _ = madvise(UnsafeMutableRawPointer(mutating: base), length, MADV_DONTNEED)
    }
}

/// One segment file of the host-wide log, `seg-NNNNNNNNNN.log`.
final class SegmentFile: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `fd` is written only by the writer thread (or during
    // open/close when no writer runs); `mapping` is read and replaced only under the store's lock.
    let id: UInt32
    let path: String
    let name: String
    var fd: Int32
    var mapping: Mapping?

    init(id: UInt32, directory: String, fd: Int32) {
        self.id = id
        self.name = SegmentFile.name(id)
        self.path = directory + "/" + name
        self.fd = fd
    }

    static func name(_ id: UInt32) -> String { String(format: "seg-%010u.log", id) }

    static func parseName(_ name: String) -> UInt32? {
        guard name.hasPrefix("seg-"), name.hasSuffix(".log"), name.utf8.count == 18 else { return nil }
        return UInt32(name.dropFirst(4).dropLast(4))
    }

    /// A mapping that covers at least `end` bytes; call under the store's lock.
    func mapping(covering end: Int, segmentBytes: Int) throws -> Mapping {
        if let m = mapping, m.length >= end { return m }
        let size = Int(try Sys.fileSize(fd, path: path))
        let m = try Mapping(fd: fd, length: max(end, size, segmentBytes), path: path)
        mapping = m
        return m
    }

    func closeFile() {
        if fd >= 0 { _ = Glibc.close(fd) }
        fd = -1
    }
}

/// Thin wrappers that translate errno into `SessionLogError` at the call site.
enum Sys {
    static func open(_ path: String, _ flags: Int32, context: String) throws -> Int32 {
        // 0600 whatever the umask or the unit says: the journal is agentd's alone. A file made
        // by an older agentd with wider bits is narrowed when it is opened for writing.
        let fd = Glibc.open(path, flags | O_CLOEXEC, 0o600)
        if fd < 0 { throw SessionLogError.syscall("open", errno: errno, path: path, context: context) }
        if flags & (O_CREAT | O_WRONLY | O_RDWR) != 0 { _ = fchmod(fd, 0o600) }
        return fd
    }

    static func fileSize(_ fd: Int32, path: String) throws -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw SessionLogError.syscall("fstat", errno: errno, path: path, context: "reading the segment size") }
        return UInt64(st.st_size)
    }

    /// `pwrite` until every byte is written; EINTR is retried.
    static func pwriteAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64, path: String, context: String) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SessionLogError.syscall("pwrite", errno: errno, path: path, context: context, offset: offset + UInt64(done))
            }
            if n == 0 { throw SessionLogError.syscall("pwrite", errno: ENOSPC, path: path, context: context, offset: offset + UInt64(done)) }
            done += n
        }
    }

    static func fdatasync(_ fd: Int32, path: String, context: String) throws {
        while Glibc.fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw SessionLogError.syscall("fdatasync", errno: errno, path: path, context: context)
        }
    }

    static func fsync(_ fd: Int32, path: String, context: String) throws {
        while Glibc.fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw SessionLogError.syscall("fsync", errno: errno, path: path, context: context)
        }
    }

    /// fsync of a directory, so that a file created or renamed in it survives a crash.
    static func fsyncDirectory(_ path: String) throws {
        let fd = try open(path, O_RDONLY | O_DIRECTORY, context: "syncing the journal directory")
        defer { _ = Glibc.close(fd) }
        try fsync(fd, path: path, context: "syncing the journal directory")
    }

    /// Preallocates [offset, offset+length). Returns false when the file system cannot
    /// preallocate (the log then grows with each write); throws on ENOSPC and other errors.
    static func preallocate(_ fd: Int32, from offset: Int, length: Int, path: String) throws -> Bool {
        guard length > 0 else { return true }
        while true {
            let e = posix_fallocate(fd, off_t(offset), off_t(length))
            if e == 0 { break }
            if e == EINTR { continue }
            if e == EOPNOTSUPP || e == ENOSYS { return false }
            throw SessionLogError.syscall("fallocate", errno: e, path: path, context: "preallocating \(length) bytes of the segment")
        }
        return true
    }

    static func truncate(_ fd: Int32, to length: UInt64, path: String) throws {
        while ftruncate(fd, off_t(length)) != 0 {
            if errno == EINTR { continue }
            throw SessionLogError.syscall("ftruncate", errno: errno, path: path, context: "cutting the segment back to \(length) bytes")
        }
    }

    static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func wallNanos() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

import Foundation

/// The one error type of the SessionLog module.
///
/// `code` is stable and meant for programs; `message` is for people: it names the session,
/// the file, segment and byte offset, the syscall and errno where they matter, and says what
/// to do next.
public struct SessionLogError: Error, Sendable, CustomStringConvertible, Equatable {
    /// A stable, extensible error code.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's stable name.
        public let rawValue: String
        /// A code; modules above may define their own.
        public init(_ rawValue: String) { self.rawValue = rawValue }
        /// The code's name.
        public var description: String { rawValue }

        /// A session id is not a single safe path component.
        public static let invalidSessionID = Code("invalidSessionID")
        /// An argument (event type, secret, option) is not acceptable.
        public static let invalidArgument = Code("invalidArgument")
        /// An event or checkpoint is larger than the configured limit.
        public static let eventTooLarge = Code("eventTooLarge")
        /// The append carried a lease epoch older than the session's current one.
        public static let staleEpoch = Code("staleEpoch")
        /// The append carried a lease epoch that was never handed out.
        public static let unknownEpoch = Code("unknownEpoch")
        /// The journal's file system is full (ENOSPC, EDQUOT).
        public static let diskFull = Code("diskFull")
        /// A read, write or sync failed (EIO and others).
        public static let ioError = Code("ioError")
        /// The session's records are damaged; the session is refused until repaired.
        public static let damaged = Code("damaged")
        /// No such session, or no such record.
        public static let notFound = Code("notFound")
        /// The store was closed.
        public static let closed = Code("closed")
        /// Another process holds the journal directory.
        public static let locked = Code("locked")
        /// The outcome of that tool intent is already journaled (by another node that took the
        /// session over): a second one is refused.
        public static let alreadySettled = Code("alreadySettled")
    }

    /// What went wrong, for programs.
    public let code: Code
    /// What went wrong and what to do, for people.
    public let message: String
    /// The errno of the failed syscall, if any.
    public let errno: Int32?
    /// The segment file involved, if any.
    public let segment: String?
    /// The byte offset in `segment`, if any.
    public let offset: UInt64?

    /// An error with its code, message and, where they apply, errno and location.
    public init(_ code: Code, _ message: String, errno: Int32? = nil, segment: String? = nil, offset: UInt64? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
        self.segment = segment
        self.offset = offset
    }

    /// The human message.
    public var description: String { message }

    /// Builds the error for a failed syscall, translating errno at the call site.
    static func syscall(_ name: String, errno err: Int32, path: String, context: String, offset: UInt64? = nil) -> SessionLogError {
        let reason = String(cString: strerror(err))
        let symbol = errnoName(err)
        let segment = (path as NSString).lastPathComponent
        if err == ENOSPC || err == EDQUOT {
            return SessionLogError(
                .diskFull,
                "journal disk full at \(path) (\(symbol): \(reason)) in \(name) while \(context); acknowledged events are intact; free space and retry",
                errno: err, segment: segment, offset: offset)
        }
        return SessionLogError(
            .ioError,
            "journal I/O error at \(path)\(offset.map { " offset \($0)" } ?? "") (\(name): \(symbol), \(reason)) while \(context); acknowledged events are intact; check the disk (dmesg) and retry",
            errno: err, segment: segment, offset: offset)
    }

    /// The same error, re-addressed to one session (for the waiters of a failed batch).
    func forSession(_ session: SessionID, _ what: String) -> SessionLogError {
        SessionLogError(code, "\(what) to session \(session) failed: \(message)", errno: errno, segment: segment, offset: offset)
    }

    static func errnoName(_ e: Int32) -> String {
        switch e {
        case ENOSPC: return "ENOSPC"
        case EDQUOT: return "EDQUOT"
        case EIO: return "EIO"
        case EROFS: return "EROFS"
        case EACCES: return "EACCES"
        case EPERM: return "EPERM"
        case ENOENT: return "ENOENT"
        case EEXIST: return "EEXIST"
        case EINTR: return "EINTR"
        case EBADF: return "EBADF"
        case EINVAL: return "EINVAL"
        case EWOULDBLOCK: return "EWOULDBLOCK"
        case EOPNOTSUPP: return "EOPNOTSUPP"
        default: return "errno \(e)"
        }
    }
}

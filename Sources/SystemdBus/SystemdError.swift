import Foundation

/// The one error type of `SystemdBus`.
public struct SystemdError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is. Extensible: match on the static members.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// No manager could be reached at the address.
        public static let unreachable = Code("unreachable")
        /// The manager answered a call with a D-Bus error; `busError` has its name.
        public static let callFailed = Code("call-failed")
        /// A call or wait did not finish within its timeout.
        public static let timeout = Code("timeout")
        /// The connection is closed.
        public static let closed = Code("closed")
        /// A reply did not have the shape the systemd D-Bus API documents.
        public static let badReply = Code("bad-reply")
        /// The caller passed something that cannot be sent.
        public static let invalidArgument = Code("invalid-argument")
    }

    public let code: Code
    public let message: String
    /// The D-Bus error name (e.g. `org.freedesktop.systemd1.UnitExists`), for `.callFailed`.
    public let busError: String?
    /// The errno the C call returned, if any.
    public let errno: Int32?

    public init(_ code: Code, _ message: String, busError: String? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.busError = busError
        self.errno = errno
    }

    /// An error for a failed sd-bus C call, which returns `-errno`.
    static func syscall(_ call: String, _ result: Int32, _ context: String, code: Code = .callFailed) -> SystemdError {
        let e = -result
        return SystemdError(code, "\(context): \(call) failed: \(String(cString: strerror(e))) (errno \(e))", errno: e)
    }

    public var description: String { message }
}

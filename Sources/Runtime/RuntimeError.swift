import Hands
import SessionLog

/// The one error type of `Runtime`: what an API caller did wrong or what failed underneath.
/// Hands failures never become a `RuntimeError`: they are tool results (contract 1).
public struct RuntimeError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        public static let notFound = Code("not-found")
        public static let invalidArgument = Code("invalid-argument")
        /// A newer Brain holds the session (it called wake); this one must stop.
        public static let staleLease = Code("stale-lease")
        public static let tooLarge = Code("too-large")
        /// The journal could not take the event (disk full, I/O error, damage).
        public static let storage = Code("storage")
        public static let unavailable = Code("unavailable")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    /// Maps a journal error onto what the API caller can do about it.
    init(_ error: SessionLogError) {
        switch error.code {
        case .invalidSessionID, .invalidArgument, .unknownEpoch: self.init(.invalidArgument, error.message)
        case .eventTooLarge: self.init(.tooLarge, error.message)
        case .staleEpoch: self.init(.staleLease, error.message)
        case .notFound: self.init(.notFound, error.message)
        case .closed: self.init(.unavailable, error.message)
        default: self.init(.storage, error.message)
        }
    }
}

import Hands
import SessionLog

/// The one error type of `Runtime`: what an API caller did wrong or what failed underneath.
/// Hands failures never become a `RuntimeError`: they are tool results (contract 1).
///
/// The codes are a closed set, and each code has exactly one HTTP status (`httpStatus`), so
/// that the API, agentctl and a Brain agree on what a refusal means. The underlying error (a
/// journal error, a Hands error) is kept as `cause` for logs; `message` already says what was
/// wrong and what to do.
public struct RuntimeError: Error, Sendable, CustomStringConvertible {
    /// What kind of refusal or failure this is.
    public enum Code: String, Sendable, CaseIterable, CustomStringConvertible {
        /// No such session, task or policy.
        case notFound = "not-found"
        /// The request is malformed: a bad id, tool, input or parameter.
        case invalidArgument = "invalid-argument"
        /// The caller's lease epoch is missing (the session was woken) or older than the
        /// current one: a newer Brain holds the session.
        case staleLease = "stale-lease"
        /// The lease epoch is newer than any `wake` handed out.
        case unknownEpoch = "unknown-epoch"
        /// The session was deleted: it refuses every change; reads keep working.
        case sessionDeleted = "session-deleted"
        /// The request (or what it would journal) is larger than the session's policy allows.
        case tooLarge = "too-large"
        /// An idempotency key was reused with a different tool or input.
        case idempotencyConflict = "idempotency-conflict"
        /// The session's journal is damaged (the message names segment and offset).
        case damaged = "damaged"
        /// The journal's disk is full.
        case diskFull = "disk-full"
        /// The journal could not take or read an event (I/O error).
        case storage = "storage"
        /// Something agentd depends on is not there (engine, journal closing, policy unloaded).
        case unavailable = "unavailable"
        /// A bug: agentd could not do what it should have been able to.
        case `internal` = "internal"
        /// In a fleet: another node serves this session's calls; the cause is a
        /// `SessionElsewhere` naming it (the API answers 307 with its address).
        case elsewhere = "wrong-node"

        public var description: String { rawValue }

        /// The HTTP status the API answers with: the one place codes map to statuses.
        public var httpStatus: Int {
            switch self {
            // An epoch never handed out is a bad argument, not a lost race.
            case .invalidArgument, .unknownEpoch: 400
            case .notFound: 404
            case .staleLease: 409
            case .sessionDeleted: 410
            case .tooLarge: 413
            case .idempotencyConflict: 422
            case .unavailable: 503
            case .elsewhere: 307
            case .diskFull: 507
            case .damaged, .storage, .internal: 500
            }
        }
    }

    public let code: Code
    public let message: String
    /// The error underneath, when there was one (never shown to API callers as is).
    public let cause: (any Error & Sendable)?

    /// - Parameters:
    ///   - code: what kind of error.
    ///   - message: what was wrong and what to do (never a secret value).
    ///   - cause: the underlying error, kept for logs.
    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String { message }

    /// Maps a journal error onto what the API caller can do about it, keeping it as the cause.
    init(_ error: SessionLogError) {
        let code: Code =
            switch error.code {
            case .invalidSessionID, .invalidArgument: .invalidArgument
            case .unknownEpoch: .unknownEpoch
            case .eventTooLarge: .tooLarge
            case .staleEpoch: .staleLease
            case .notFound: .notFound
            case .closed: .unavailable
            case .damaged: .damaged
            case .diskFull: .diskFull
            default: .storage
            }
        self.init(code, error.message, cause: error)
    }
}

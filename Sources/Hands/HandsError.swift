/// The one error type of `Hands`. Its `kind` tells whether the sandbox survived.
public struct HandsError: Error, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// The engine or manager could not be reached; the sandbox's fate is unknown.
        case unreachable
        /// The sandbox is gone or stopped (killed, crashed, removed from outside).
        case sandboxGone = "sandbox-gone"
        /// The sandbox's memory limit was hit and its processes were killed.
        case outOfMemory = "out-of-memory"
        /// A command ran past its timeout; the sandbox is discarded.
        case timeout
        /// The sandbox still runs but can no longer run commands: its memory is used up (a
        /// full memory-backed `/tmp` counts), or the runtime cannot start a process in it
        /// (pids or zombies exhausted). The sandbox is discarded.
        case unusable = "sandbox-unusable"
        /// Provisioning failed (missing image, refused configuration).
        case provisioning
        /// The request itself was wrong (bad path, not a file, file too large); the sandbox is fine.
        case invalidRequest = "invalid-request"
        /// No sandbox was made: the session's or the host's sandbox limit is reached.
        case limitReached = "limit-reached"
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    /// True when the sandbox must not be used again.
    public var discardsSandbox: Bool {
        switch kind {
        case .unreachable, .sandboxGone, .outOfMemory, .timeout, .unusable: true
        case .provisioning, .invalidRequest, .limitReached: false
        }
    }

    public var description: String { message }
}

@_exported import SandboxAgentProtocol

/// A command for the sandbox agent.
public struct AgentExecRequest: Sendable, Equatable {
    /// The program and its arguments; a shell command is `["sh", "-c", command]` (see `shell`).
    public var argv: [String]
    /// The working directory; nil leaves the agent's own (`/` for PID 1).
    public var cwd: String?
    /// The command's whole environment: nothing is inherited from the agent.
    public var environment: [String: String]
    /// Bytes for the command's stdin; nil (or empty) gives it an empty stdin.
    public var stdin: [UInt8]?
    /// After this long the agent kills the command's whole process group.
    public var timeout: Duration
    /// Bytes of stdout and stderr (together) delivered and kept at most; the rest is counted as cut.
    public var outputLimit: Int

    public init(
        argv: [String], cwd: String? = nil, environment: [String: String] = [:], stdin: [UInt8]? = nil, timeout: Duration,
        outputLimit: Int
    ) {
        self.argv = argv
        self.cwd = cwd
        self.environment = environment
        self.stdin = stdin
        self.timeout = timeout
        self.outputLimit = outputLimit
    }

    /// A shell command, run as `sh -c command`.
    public static func shell(
        _ command: String, cwd: String? = nil, environment: [String: String] = [:], stdin: [UInt8]? = nil, timeout: Duration,
        outputLimit: Int
    ) -> AgentExecRequest {
        AgentExecRequest(
            argv: ["sh", "-c", command], cwd: cwd, environment: environment, stdin: stdin, timeout: timeout,
            outputLimit: outputLimit)
    }
}

/// How a command ended, with the output kept (at most the request's output limit, in total).
public struct AgentExecResult: Sendable, Equatable {
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    /// The exit status, or 128 + the signal number when a signal ended the command.
    public var exitCode: Int
    /// The signal that ended the command, nil when it exited.
    public var signal: Int?
    /// The command ran past its timeout and its process group was killed.
    public var timedOut: Bool
    /// Bytes of output over the limit, read and dropped.
    public var cutBytes: Int
    /// How long the command ran, as the agent measured it.
    public var duration: Duration

    public init(
        stdout: [UInt8], stderr: [UInt8], exitCode: Int, signal: Int?, timedOut: Bool, cutBytes: Int,
        duration: Duration = .zero
    ) {
        self.stdout = stdout
        self.stderr = stderr
        self.exitCode = exitCode
        self.signal = signal
        self.timedOut = timedOut
        self.cutBytes = cutBytes
        self.duration = duration
    }

    /// A line saying how much output was cut, nil when nothing was.
    public var cutNote: String? {
        cutBytes > 0 ? "[output truncated: \(cutBytes) more bytes were cut]" : nil
    }
}

/// Why a call to the sandbox agent failed.
public struct SandboxAgentError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// The socket is missing, or nothing accepts connections on it.
        case unreachable
        /// No complete answer within the call's time.
        case timeout
        /// The agent sent an oversized, malformed or unexpected frame, or speaks another version.
        case protocolViolation
        /// The agent refused the request (a file error, a bad argument); `message` is the agent's.
        case failed
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

/// The type byte of each frame. Requests go from the host to the agent (0x1_–0x3_), replies
/// from the agent to the host (0x4_–0x7_); hello and error go both ways.
public enum AgentMessageType: UInt8, Sendable, CaseIterable {
    case hello = 0x01
    case error = 0x02
    // Host → agent.
    case execRequest = 0x10
    case stdinChunk = 0x11
    case stdinEnd = 0x12
    case readFileRequest = 0x20
    case writeFileRequest = 0x21
    case listRequest = 0x22
    case limitsRequest = 0x30
    case healthRequest = 0x31
    // Both ways: file contents (agent → host for reads, host → agent for writes).
    case fileChunk = 0x23
    case fileEnd = 0x24
    // Agent → host.
    case stdoutChunk = 0x41
    case stderrChunk = 0x42
    case execResult = 0x43
    case fileInfo = 0x50
    case writeDone = 0x51
    case listEntries = 0x52
    case listEnd = 0x53
    case limits = 0x60
    case health = 0x61
}

/// Which output stream a chunk belongs to.
public enum AgentStream: Sendable, Equatable {
    case stdout, stderr
}

/// The first frame each side sends.
public struct AgentHello: Sendable, Equatable {
    public var version: UInt32
    /// Free text naming the software, e.g. "agentd-sandbox-agent 1".
    public var software: String
    public init(version: UInt32 = AgentFrame.protocolVersion, software: String) {
        self.version = version
        self.software = software
    }
}

/// Runs `argv` (a shell command is argv `["sh", "-c", command]`).
public struct AgentExecRequestMessage: Sendable, Equatable {
    public var argv: [String]
    public var cwd: String?
    /// The complete environment of the command, exactly as given.
    public var environment: [String: String]
    /// When true, stdin frames follow the request, ended by stdinEnd; otherwise stdin is empty.
    public var streamsStdin: Bool
    /// 0 means no timeout.
    public var timeoutMilliseconds: UInt64
    /// Bytes of stdout and stderr (together) forwarded at most; the rest is counted as cut.
    public var outputLimit: UInt64
    public init(
        argv: [String], cwd: String? = nil, environment: [String: String] = [:], streamsStdin: Bool = false,
        timeoutMilliseconds: UInt64 = 0, outputLimit: UInt64 = UInt64(AgentFrame.maximumPayload)
    ) {
        self.argv = argv
        self.cwd = cwd
        self.environment = environment
        self.streamsStdin = streamsStdin
        self.timeoutMilliseconds = timeoutMilliseconds
        self.outputLimit = outputLimit
    }
}

/// How a command ended.
public struct AgentExecResultMessage: Sendable, Equatable {
    /// The exit status, or 128 + the signal number when a signal ended the command.
    public var exitCode: Int32
    /// The signal that ended the command, 0 when it exited.
    public var signal: Int32
    public var timedOut: Bool
    /// Bytes of output not forwarded because of the output limit.
    public var cutBytes: UInt64
    public var durationMicroseconds: UInt64
    public init(exitCode: Int32, signal: Int32 = 0, timedOut: Bool = false, cutBytes: UInt64 = 0, durationMicroseconds: UInt64 = 0) {
        self.exitCode = exitCode
        self.signal = signal
        self.timedOut = timedOut
        self.cutBytes = cutBytes
        self.durationMicroseconds = durationMicroseconds
    }
}

/// The kind of a directory entry.
public enum AgentFileType: UInt8, Sendable, Equatable {
    case regular = 0, directory = 1, symlink = 2, fifo = 3, socket = 4, characterDevice = 5, blockDevice = 6, unknown = 7
}

/// One entry of a directory listing, as the agent's `lstat` sees it.
public struct AgentFileEntry: Sendable, Equatable {
    public var name: String
    public var type: AgentFileType
    public var size: UInt64
    /// Permission bits (and setuid, setgid, sticky), without the file type.
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    /// Modification time, seconds since the epoch.
    public var modificationTime: Int64
    public var symlinkTarget: String?
    public init(
        name: String, type: AgentFileType, size: UInt64, mode: UInt32, uid: UInt32, gid: UInt32, modificationTime: Int64,
        symlinkTarget: String? = nil
    ) {
        self.name = name
        self.type = type
        self.size = size
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.modificationTime = modificationTime
        self.symlinkTarget = symlinkTarget
    }
}

/// Sent before the contents of a file being read.
public struct AgentFileInfo: Sendable, Equatable {
    public var size: UInt64
    public var mode: UInt32
    public init(size: UInt64, mode: UInt32) {
        self.size = size
        self.mode = mode
    }
}

/// Memory and OOM figures from the sandbox's own cgroup; nil where the cgroup does not say.
public struct AgentLimits: Sendable, Equatable {
    /// 1 or 2; 0 when no memory cgroup was found.
    public var cgroupVersion: UInt8
    public var oomKills: UInt64?
    public var memoryCurrent: UInt64?
    /// nil when unlimited or unknown.
    public var memoryMax: UInt64?
    public var pidsCurrent: UInt64?
    public var pidsMax: UInt64?
    public init(
        cgroupVersion: UInt8, oomKills: UInt64? = nil, memoryCurrent: UInt64? = nil, memoryMax: UInt64? = nil,
        pidsCurrent: UInt64? = nil, pidsMax: UInt64? = nil
    ) {
        self.cgroupVersion = cgroupVersion
        self.oomKills = oomKills
        self.memoryCurrent = memoryCurrent
        self.memoryMax = memoryMax
        self.pidsCurrent = pidsCurrent
        self.pidsMax = pidsMax
    }
}

/// The agent's state.
public struct AgentHealth: Sendable, Equatable {
    public var protocolVersion: UInt32
    public var software: String
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    public var uptimeMilliseconds: UInt64
    /// Children reaped that were not the agent's own commands (orphans adopted as subreaper).
    public var zombiesReaped: UInt64
    public var runningCommands: UInt32
    public init(
        protocolVersion: UInt32 = AgentFrame.protocolVersion, software: String, pid: Int32, uid: UInt32, gid: UInt32,
        uptimeMilliseconds: UInt64, zombiesReaped: UInt64, runningCommands: UInt32
    ) {
        self.protocolVersion = protocolVersion
        self.software = software
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.uptimeMilliseconds = uptimeMilliseconds
        self.zombiesReaped = zombiesReaped
        self.runningCommands = runningCommands
    }
}

/// Every message of the protocol.
public enum AgentMessage: Sendable, Equatable {
    case hello(AgentHello)
    case error(String)
    case execRequest(AgentExecRequestMessage)
    case stdinChunk([UInt8])
    case stdinEnd
    case readFileRequest(path: String, limit: UInt64)
    /// `mode` nil: an existing file keeps its mode, a new one gets 0666 (less the umask).
    case writeFileRequest(path: String, mode: UInt32?)
    case listRequest(path: String)
    case limitsRequest
    case healthRequest
    case fileChunk([UInt8])
    case fileEnd
    case output(AgentStream, [UInt8])
    case execResult(AgentExecResultMessage)
    case fileInfo(AgentFileInfo)
    case writeDone(bytes: UInt64)
    case listEntries([AgentFileEntry])
    case listEnd
    case limits(AgentLimits)
    case health(AgentHealth)

    public var type: AgentMessageType {
        switch self {
        case .hello: .hello
        case .error: .error
        case .execRequest: .execRequest
        case .stdinChunk: .stdinChunk
        case .stdinEnd: .stdinEnd
        case .readFileRequest: .readFileRequest
        case .writeFileRequest: .writeFileRequest
        case .listRequest: .listRequest
        case .limitsRequest: .limitsRequest
        case .healthRequest: .healthRequest
        case .fileChunk: .fileChunk
        case .fileEnd: .fileEnd
        case .output(.stdout, _): .stdoutChunk
        case .output(.stderr, _): .stderrChunk
        case .execResult: .execResult
        case .fileInfo: .fileInfo
        case .writeDone: .writeDone
        case .listEntries: .listEntries
        case .listEnd: .listEnd
        case .limits: .limits
        case .health: .health
        }
    }

    /// The payload of this message.
    public func payload() -> [UInt8] {
        var w = FieldWriter()
        switch self {
        case .hello(let h):
            w.u32(h.version)
            w.string(h.software)
        case .error(let message):
            w.string(message)
        case .execRequest(let r):
            w.strings(r.argv)
            w.optionalString(r.cwd)
            let env = r.environment.sorted { $0.key < $1.key }
            w.u32(UInt32(env.count))
            for (k, v) in env {
                w.string(k)
                w.string(v)
            }
            w.bool(r.streamsStdin)
            w.u64(r.timeoutMilliseconds)
            w.u64(r.outputLimit)
        case .stdinChunk(let b), .fileChunk(let b), .output(_, let b):
            return b
        case .stdinEnd, .limitsRequest, .healthRequest, .fileEnd, .listEnd:
            break
        case .readFileRequest(let path, let limit):
            w.string(path)
            w.u64(limit)
        case .writeFileRequest(let path, let mode):
            w.string(path)
            w.optionalU32(mode)
        case .listRequest(let path):
            w.string(path)
        case .execResult(let r):
            w.i32(r.exitCode)
            w.i32(r.signal)
            w.bool(r.timedOut)
            w.u64(r.cutBytes)
            w.u64(r.durationMicroseconds)
        case .fileInfo(let i):
            w.u64(i.size)
            w.u32(i.mode)
        case .writeDone(let n):
            w.u64(n)
        case .listEntries(let entries):
            w.u32(UInt32(entries.count))
            for e in entries { Self.write(e, to: &w) }
        case .limits(let l):
            w.u8(l.cgroupVersion)
            w.optionalU64(l.oomKills)
            w.optionalU64(l.memoryCurrent)
            w.optionalU64(l.memoryMax)
            w.optionalU64(l.pidsCurrent)
            w.optionalU64(l.pidsMax)
        case .health(let h):
            w.u32(h.protocolVersion)
            w.string(h.software)
            w.i32(h.pid)
            w.u32(h.uid)
            w.u32(h.gid)
            w.u64(h.uptimeMilliseconds)
            w.u64(h.zombiesReaped)
            w.u32(h.runningCommands)
        }
        return w.bytes
    }

    /// The complete frame of this message.
    public func frame() -> [UInt8] { AgentFrame.encode(type: type.rawValue, payload: payload()) }

    /// The encoded size of an entry in a listEntries payload, for batching entries into frames.
    public static func encodedSize(of entry: AgentFileEntry) -> Int {
        var w = FieldWriter()
        write(entry, to: &w)
        return w.bytes.count
    }

    private static func write(_ e: AgentFileEntry, to w: inout FieldWriter) {
        w.string(e.name)
        w.u8(e.type.rawValue)
        w.u64(e.size)
        w.u32(e.mode)
        w.u32(e.uid)
        w.u32(e.gid)
        w.i64(e.modificationTime)
        w.optionalString(e.symlinkTarget)
    }

    /// Decodes a frame; a malformed payload or trailing bytes throw.
    public static func decode(_ frame: RawFrame) throws(AgentProtocolError) -> AgentMessage {
        guard let type = AgentMessageType(rawValue: frame.type) else {
            throw AgentProtocolError("unknown frame type 0x\(String(frame.type, radix: 16))")
        }
        var r = FieldReader(frame.payload, what: "\(type)")
        let message: AgentMessage
        switch type {
        case .hello:
            message = .hello(AgentHello(version: try r.u32(), software: try r.string()))
        case .error:
            message = .error(try r.string())
        case .execRequest:
            let argv = try r.strings()
            let cwd = try r.optionalString()
            let n = try r.count(minimumSize: 8)
            var env: [String: String] = [:]
            for _ in 0..<n {
                let k = try r.string()
                env[k] = try r.string()
            }
            message = .execRequest(
                AgentExecRequestMessage(
                    argv: argv, cwd: cwd, environment: env, streamsStdin: try r.bool(), timeoutMilliseconds: try r.u64(),
                    outputLimit: try r.u64()))
        case .stdinChunk: return .stdinChunk(frame.payload)
        case .fileChunk: return .fileChunk(frame.payload)
        case .stdoutChunk: return .output(.stdout, frame.payload)
        case .stderrChunk: return .output(.stderr, frame.payload)
        case .stdinEnd: message = .stdinEnd
        case .limitsRequest: message = .limitsRequest
        case .healthRequest: message = .healthRequest
        case .fileEnd: message = .fileEnd
        case .listEnd: message = .listEnd
        case .readFileRequest:
            message = .readFileRequest(path: try r.string(), limit: try r.u64())
        case .writeFileRequest:
            message = .writeFileRequest(path: try r.string(), mode: try r.optionalU32())
        case .listRequest:
            message = .listRequest(path: try r.string())
        case .execResult:
            message = .execResult(
                AgentExecResultMessage(
                    exitCode: try r.i32(), signal: try r.i32(), timedOut: try r.bool(), cutBytes: try r.u64(),
                    durationMicroseconds: try r.u64()))
        case .fileInfo:
            message = .fileInfo(AgentFileInfo(size: try r.u64(), mode: try r.u32()))
        case .writeDone:
            message = .writeDone(bytes: try r.u64())
        case .listEntries:
            let n = try r.count(minimumSize: 34)
            var entries: [AgentFileEntry] = []
            entries.reserveCapacity(n)
            for _ in 0..<n {
                let name = try r.string()
                guard let type = AgentFileType(rawValue: try r.u8()) else {
                    throw AgentProtocolError("unknown file type in listEntries frame")
                }
                entries.append(
                    AgentFileEntry(
                        name: name, type: type, size: try r.u64(), mode: try r.u32(), uid: try r.u32(), gid: try r.u32(),
                        modificationTime: try r.i64(), symlinkTarget: try r.optionalString()))
            }
            message = .listEntries(entries)
        case .limits:
            message = .limits(
                AgentLimits(
                    cgroupVersion: try r.u8(), oomKills: try r.optionalU64(), memoryCurrent: try r.optionalU64(),
                    memoryMax: try r.optionalU64(), pidsCurrent: try r.optionalU64(), pidsMax: try r.optionalU64()))
        case .health:
            message = .health(
                AgentHealth(
                    protocolVersion: try r.u32(), software: try r.string(), pid: try r.i32(), uid: try r.u32(),
                    gid: try r.u32(), uptimeMilliseconds: try r.u64(), zombiesReaped: try r.u64(),
                    runningCommands: try r.u32()))
        }
        try r.finish()
        return message
    }
}

extension AgentHello {
    /// Checks the peer's hello: a different protocol version is refused with both versions named.
    public func checkCompatible(peer: String) throws(AgentProtocolError) {
        guard version == AgentFrame.protocolVersion else {
            throw AgentProtocolError(
                "protocol version mismatch: \(peer) (\(software)) speaks version \(version), this side speaks version \(AgentFrame.protocolVersion)"
            )
        }
    }
}

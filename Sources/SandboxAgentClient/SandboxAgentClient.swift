import NIOCore
import NIOPosix
import Synchronization

/// agentd's side of the sandbox agent protocol: one connection per call over the agent's unix
/// socket, on a shared NIO event loop group. Whatever the agent sends, a call holds at most a
/// few frames (1 MiB each) plus what the caller asked to keep, and ends by its deadline.
public struct SandboxAgentClient: Sendable {
    public let socketPath: String
    /// How long connecting may take.
    public var connectTimeout: Duration
    let group: any EventLoopGroup

    public init(
        socketPath: String, connectTimeout: Duration = .seconds(2),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.socketPath = socketPath
        self.connectTimeout = connectTimeout
        self.group = group
    }

    public func health(timeout: Duration = .seconds(5)) async throws -> AgentHealth {
        try await single(.healthRequest, timeout: timeout) { if case .health(let h) = $0 { h } else { nil } }
    }

    public func limits(timeout: Duration = .seconds(5)) async throws -> AgentLimits {
        try await single(.limitsRequest, timeout: timeout) { if case .limits(let l) = $0 { l } else { nil } }
    }

    /// A request answered by one message, which `answer` extracts (nil: the wrong message).
    private func single<T: Sendable>(
        _ request: AgentMessage, timeout: Duration, _ answer: @Sendable (AgentMessage) -> T?
    ) async throws -> T {
        try await withConnection(timeout: timeout, request: request) { inbound, _, _ in
            try await Self.expectHello(&inbound)
            let message = try await Self.next(&inbound, expecting: "the answer to \(request.type)")
            guard let value = answer(message) else {
                throw ConnectionFailure.violation("unexpected \(message.type) frame in answer to \(request.type)")
            }
            return value
        }
    }

    /// Runs a command. Streams output to `output` as it arrives (at most `outputLimit` bytes in
    /// total are delivered/kept). The call ends by the command's timeout plus a grace period.
    /// With `keepOutput` false the result's stdout and stderr stay empty: the output goes to
    /// `output` only, so a caller that consumes it as it comes holds none of it.
    public func exec(
        _ request: AgentExecRequest, keepOutput: Bool = true, output: (@Sendable (AgentStream, [UInt8]) -> Void)?
    ) async throws -> AgentExecResult {
        let stdin = request.stdin ?? []
        let message = AgentExecRequestMessage(
            argv: request.argv, cwd: request.cwd, environment: request.environment, streamsStdin: !stdin.isEmpty,
            timeoutMilliseconds: UInt64((Self.nanoseconds(request.timeout) + 999_999) / 1_000_000),
            outputLimit: UInt64(max(request.outputLimit, 0)))
        let limit = max(request.outputLimit, 0)
        return try await withConnection(timeout: request.timeout + Self.execGrace, request: .execRequest(message)) {
            inbound, outbound, _ in
            // stdin is written beside the reading: a command that writes before it reads must not
            // wait on a host that writes before it reads.
            let writer = stdin.isEmpty ? nil : Task {
                var offset = 0
                while offset < stdin.count {
                    let end = min(offset + AgentFrame.fileChunkSize, stdin.count)
                    try await outbound.write(Self.buffer(.stdinChunk(Array(stdin[offset..<end]))))
                    offset = end
                }
                try await outbound.write(Self.buffer(.stdinEnd))
            }
            defer { writer?.cancel() }
            try await Self.expectHello(&inbound)
            var stdout: [UInt8] = []
            var stderr: [UInt8] = []
            var kept = 0
            var cutHere = 0
            while true {
                switch try await Self.next(&inbound, expecting: "the command's result") {
                case .output(let stream, let bytes):
                    let allowed = min(bytes.count, limit - kept)
                    cutHere += bytes.count - allowed
                    guard allowed > 0 else { continue }
                    let part = allowed == bytes.count ? bytes : Array(bytes[0..<allowed])
                    kept += allowed
                    if keepOutput { if stream == .stdout { stdout += part } else { stderr += part } }
                    output?(stream, part)
                case .execResult(let r):
                    return AgentExecResult(
                        stdout: stdout, stderr: stderr, exitCode: Int(r.exitCode), signal: r.signal == 0 ? nil : Int(r.signal),
                        timedOut: r.timedOut, cutBytes: Int(clamping: r.cutBytes) + cutHere,
                        duration: .microseconds(Int64(clamping: r.durationMicroseconds)))
                case let other:
                    throw ConnectionFailure.violation("unexpected \(other.type) frame during a command")
                }
            }
        }
    }

    /// Reads a whole file of at most `limit` bytes.
    public func readFile(_ path: String, limit: Int, timeout: Duration) async throws -> [UInt8] {
        let contents = Locked<[UInt8]>([])
        try await readFile(path, limit: limit, timeout: timeout) { chunk in
            contents.update { $0 += chunk }
        }
        return contents.get()
    }

    /// Reads a file of at most `limit` bytes, handing it to `chunk` piece by piece (never whole).
    public func readFile(
        _ path: String, limit: Int, timeout: Duration, chunk: @Sendable ([UInt8]) async throws -> Void
    ) async throws {
        try await withConnection(timeout: timeout, request: .readFileRequest(path: path, limit: UInt64(max(limit, 0)))) {
            inbound, _, _ in
            try await Self.expectHello(&inbound)
            guard case .fileInfo(let info) = try await Self.next(&inbound, expecting: "the file") else {
                throw ConnectionFailure.violation("expected fileInfo first when reading \(path)")
            }
            guard info.size <= UInt64(max(limit, 0)) else {
                throw ConnectionFailure.violation("announced \(info.size) bytes for \(path), over the limit of \(limit)")
            }
            var total = 0
            while true {
                switch try await Self.next(&inbound, expecting: "the end of \(path)") {
                case .fileChunk(let bytes):
                    total += bytes.count
                    guard total <= limit else {
                        throw ConnectionFailure.violation("sent more than the limit of \(limit) bytes for \(path)")
                    }
                    do {
                        try await chunk(bytes)
                    } catch {
                        throw PassThrough(error: error)
                    }
                case .fileEnd:
                    return
                case let other:
                    throw ConnectionFailure.violation("unexpected \(other.type) frame while reading \(path)")
                }
            }
        }
    }

    /// Writes a whole file (created with its parent directories, or replaced).
    public func writeFile(_ path: String, contents: [UInt8], mode: UInt32? = nil, timeout: Duration) async throws {
        try await writeFile(path, chunks: OneChunk(bytes: contents), mode: mode, timeout: timeout)
    }

    /// Writes a file from a sequence of chunks, never holding it whole. If the sequence throws,
    /// the agent discards what it received and the target is untouched.
    public func writeFile<S: AsyncSequence & Sendable>(
        _ path: String, chunks: S, mode: UInt32?, timeout: Duration
    ) async throws where S.Element == [UInt8] {
        let sourceError = Locked<(any Error)?>(nil)
        try await withConnection(timeout: timeout, request: .writeFileRequest(path: path, mode: mode)) { inbound, outbound, channel in
            let writer = Task {
                do {
                    for try await piece in chunks {
                        var offset = 0
                        while offset < piece.count {
                            let end = min(offset + AgentFrame.fileChunkSize, piece.count)
                            try await outbound.write(Self.buffer(.fileChunk(Array(piece[offset..<end]))))
                            offset = end
                        }
                    }
                } catch {
                    // The caller's sequence failed (or the agent went away): close without fileEnd,
                    // so the agent drops the partial file.
                    if !(error is IOError || error is ChannelError) { sourceError.set(error) }
                    channel.close(promise: nil)
                    return
                }
                try? await outbound.write(Self.buffer(.fileEnd))
            }
            defer { writer.cancel() }
            do {
                try await Self.expectHello(&inbound)
                switch try await Self.next(&inbound, expecting: "the end of writing \(path)") {
                case .writeDone: return
                case let other: throw ConnectionFailure.violation("unexpected \(other.type) frame while writing \(path)")
                }
            } catch {
                if let source = sourceError.get() { throw PassThrough(error: source) }
                throw error
            }
        }
    }

    /// Lists a directory (not recursively), sorted by name; more than `maximumEntries` entries
    /// is an error rather than an unbounded answer.
    public func list(_ path: String, timeout: Duration, maximumEntries: Int = 100_000) async throws -> [AgentFileEntry] {
        try await withConnection(timeout: timeout, request: .listRequest(path: path)) { inbound, _, _ in
            try await Self.expectHello(&inbound)
            var entries: [AgentFileEntry] = []
            while true {
                switch try await Self.next(&inbound, expecting: "the end of the listing of \(path)") {
                case .listEntries(let batch):
                    entries += batch
                    guard entries.count <= maximumEntries else {
                        throw SandboxAgentError(.failed, "\(path) has more than \(maximumEntries) entries")
                    }
                case .listEnd:
                    return entries.sorted { $0.name < $1.name }
                case let other:
                    throw ConnectionFailure.violation("unexpected \(other.type) frame while listing \(path)")
                }
            }
        }
    }
}

/// An async sequence of one chunk, for writing a whole buffer through the streamed path.
struct OneChunk: AsyncSequence, Sendable {
    let bytes: [UInt8]
    struct AsyncIterator: AsyncIteratorProtocol {
        var bytes: [UInt8]?
        mutating func next() async -> [UInt8]? {
            defer { bytes = nil }
            return bytes
        }
    }
    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(bytes: bytes) }
}

/// A value shared with a child task.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func get() -> Value { mutex.withLock { $0 } }
    func set(_ value: Value) { mutex.withLock { $0 = value } }
    func update(_ body: (inout Value) -> Void) { mutex.withLock { body(&$0) } }
}

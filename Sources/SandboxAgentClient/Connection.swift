import NIOCore
import NIOPosix
import Synchronization

/// Decodes the agent's frames with the protocol's bounds; a violation fails the connection.
final class AgentFrameHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = AgentMessage

    private var decoder = FrameDecoder()
    private var failed = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        let buffer = unwrapInboundIn(data)
        decoder.feed(buffer.readableBytesView)
        do {
            while let message = try decoder.nextMessage() {
                context.fireChannelRead(wrapInboundOut(message))
            }
        } catch {
            failed = true
            context.fireErrorCaught(ConnectionFailure.violation(error.message))
            context.close(promise: nil)
        }
    }
}

/// An error of the caller's own (its chunk sequence or callback threw), passed through unchanged.
struct PassThrough: Error {
    let error: any Error
}

/// Failures raised inside the pipeline, mapped to `SandboxAgentError` by the caller.
enum ConnectionFailure: Error {
    case violation(String)
    case deadline
}

extension SandboxAgentClient {
    /// How long after the deadline a call gives up, over and above its own timeout.
    static let execGrace: Duration = .seconds(5)

    func fail(_ error: any Error, timeout: Duration) -> SandboxAgentError {
        switch error {
        case let e as SandboxAgentError: return e
        case ConnectionFailure.violation(let message):
            return SandboxAgentError(.protocolViolation, "sandbox agent at \(socketPath) broke the protocol: \(message)")
        case ConnectionFailure.deadline:
            return SandboxAgentError(.timeout, "sandbox agent at \(socketPath) did not answer within \(timeout)")
        default:
            return SandboxAgentError(.protocolViolation, "sandbox agent at \(socketPath) closed the connection: \(error)")
        }
    }

    /// Connects, sends the hello and `request` together, and runs `body` with the connection
    /// (which reads the agent's hello first); the whole exchange is bounded by `timeout`
    /// (connecting by `connectTimeout` too).
    func withConnection<Result: Sendable>(
        timeout: Duration, request: AgentMessage, _ body: (inout NIOAsyncChannelInboundStream<AgentMessage>.AsyncIterator, NIOAsyncChannelOutboundWriter<ByteBuffer>, Channel) async throws -> Result
    ) async throws -> Result {
        let channel: NIOAsyncChannel<AgentMessage, ByteBuffer>
        do {
            channel = try await ClientBootstrap(group: group)
                .connectTimeout(.nanoseconds(Self.nanoseconds(connectTimeout)))
                // Reads of up to a whole file chunk's frame (NIO's default stops at 64 KiB): bulk
                // data then takes one read and one decode per frame, not four or more.
                .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: Self.readSize))
                .connect(unixDomainSocketPath: socketPath) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(AgentFrameHandler())
                        return try NIOAsyncChannel<AgentMessage, ByteBuffer>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(backPressureStrategy: .init(lowWatermark: 2, highWatermark: 8)))
                    }
                }
        } catch {
            throw SandboxAgentError(.unreachable, "sandbox agent at \(socketPath) is unreachable: \(Self.describeConnect(error))")
        }
        let raw = channel.channel
        let deadline = raw.eventLoop.scheduleTask(in: .nanoseconds(Self.nanoseconds(timeout))) {
            raw.pipeline.fireErrorCaught(ConnectionFailure.deadline)
            raw.close(promise: nil)
        }
        defer { deadline.cancel() }
        do {
            return try await channel.executeThenClose { inbound, outbound in
                var iterator = inbound.makeAsyncIterator()
                do {
                    try await outbound.write(ByteBuffer(bytes: AgentMessage.hello(AgentHello(software: "agentd")).frame() + request.frame()))
                } catch {
                    // The channel failed before the request was out: the reason (a violation, the
                    // deadline) is in the inbound stream.
                    while try await iterator.next() != nil {}
                    throw error
                }
                let result = try await body(&iterator, outbound, raw)
                return result
            }
        } catch {
            if error is CancellationError { throw error }
            if let own = error as? PassThrough { throw own.error }
            throw fail(error, timeout: timeout)
        }
    }

    /// Reads the agent's hello; call first in every body.
    static func expectHello(_ iterator: inout NIOAsyncChannelInboundStream<AgentMessage>.AsyncIterator) async throws {
        switch try await iterator.next() {
        case .hello(let hello):
            do {
                try hello.checkCompatible(peer: "the agent")
            } catch {
                throw ConnectionFailure.violation(error.message)
            }
        case .error(let message):
            throw ConnectionFailure.violation(message)
        case .some(let other):
            throw ConnectionFailure.violation("expected hello, got \(other.type)")
        case nil:
            try Task.checkCancellation()
            throw ConnectionFailure.violation("the connection closed before the agent's hello")
        }
    }

    /// The next message; an error frame throws `.failed` with the agent's message, the end of
    /// the stream throws a violation.
    static func next(
        _ iterator: inout NIOAsyncChannelInboundStream<AgentMessage>.AsyncIterator, expecting what: String
    ) async throws -> AgentMessage {
        switch try await iterator.next() {
        case .error(let message):
            throw SandboxAgentError(.failed, message)
        case .some(let message):
            return message
        case nil:
            try Task.checkCancellation()
            throw ConnectionFailure.violation("the connection closed before \(what)")
        }
    }

    /// The most one socket read takes: a file chunk's frame.
    static let readSize = AgentFrame.headerSize + AgentFrame.fileChunkSize

    static func buffer(_ message: AgentMessage) -> ByteBuffer {
        ByteBuffer(bytes: message.frame())
    }

    static func nanoseconds(_ d: Duration) -> Int64 {
        let (seconds, attoseconds) = d.components
        let (product, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow || seconds < 0 { return seconds < 0 ? 0 : .max }
        return product.addingReportingOverflow(attoseconds / 1_000_000_000).overflow ? .max : product + attoseconds / 1_000_000_000
    }

    static func describeConnect(_ error: any Error) -> String {
        if let io = error as? IOError {
            switch io.errnoCode {
            case ENOENT: return "no socket there (no such file or directory)"
            case ECONNREFUSED: return "connection refused (no agent listening)"
            case EACCES: return "permission denied"
            default: return "\(io)"
            }
        }
        if let ce = error as? ChannelError, case .connectTimeout = ce { return "connect timed out" }
        return "\(error)"
    }
}

#if canImport(Glibc)
import Glibc
#endif

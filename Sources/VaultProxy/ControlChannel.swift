import Logging
import NIOCore
import NIOPosix
import SessionLog

/// Splits the control channel into lines (one JSON message each), at most `maxLine` bytes.
struct LineDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer
    let maxLine: Int

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let newline = buffer.readableBytesView.firstIndex(of: 0x0A) else {
            if buffer.readableBytes > maxLine { throw ProxyError("control message longer than \(maxLine) bytes") }
            return .needMoreData
        }
        let length = newline - buffer.readerIndex
        guard length <= maxLine else { throw ProxyError("control message longer than \(maxLine) bytes") }
        let line = buffer.readSlice(length: length)!
        buffer.moveReaderIndex(forwardBy: 1)
        context.fireChannelRead(wrapInboundOut(line))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

/// Runs a proxy commanded over a private channel (an inherited socketpair or pipe pair):
/// newline-delimited JSON `ControlMessage`s in, `ready`/`ok`/`error`/`egress` out. Returns
/// when agentd closes its end: the proxy has no purpose without it.
public enum ControlChannel {
    public static let maxMessageBytes = 4 << 20

    /// - Parameters:
    ///   - input: the descriptor to read messages from (e.g. 3, or 0 for stdin).
    ///   - output: the descriptor to write answers and events to (the same as `input` for a socket).
    public static func run(
        input: CInt, output: CInt, group: any EventLoopGroup, configuration: ProxyConfiguration, logger: Logger
    ) async throws {
        let bootstrap = NIOPipeBootstrap(group: group)
        let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        let initializer: @Sendable (any Channel) -> EventLoopFuture<NIOAsyncChannel<ByteBuffer, ByteBuffer>> = { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineDecoder(maxLine: maxMessageBytes)))
                return try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
            }
        }
        if input == output {
            channel = try await bootstrap.takingOwnershipOfDescriptor(inputOutput: input, channelInitializer: initializer)
        } else {
            channel = try await bootstrap.takingOwnershipOfDescriptors(input: input, output: output, channelInitializer: initializer)
        }
        // One writer: answers and events in the order they happen; bounded so a stalled
        // agentd cannot grow the proxy without limit (the oldest unsent events are dropped).
        let (outgoing, sink) = AsyncStream.makeStream(of: ControlMessage.self, bufferingPolicy: .bufferingNewest(65_536))
        let proxy = VaultProxy(group: group, configuration: configuration, logger: logger) { event in
            sink.yield(.egress(event))
        }
        try await channel.executeThenClose { inbound, outbound in
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask {
                    for await message in outgoing {
                        try await outbound.write(ByteBuffer(bytes: message.line()))
                    }
                }
                sink.yield(.ready)
                for try await line in inbound {
                    let answer = await handle(Array(buffer: line), proxy: proxy, logger: logger)
                    sink.yield(answer)
                }
                logger.info("control channel closed; stopping")
                await proxy.shutdown()
                sink.finish()
                try await tasks.waitForAll()
            }
        }
    }

    /// Carries out one message; the answer names its `id`.
    static func handle(_ line: [UInt8], proxy: VaultProxy, logger: Logger) async -> ControlMessage {
        let message: ControlMessage
        do {
            message = try ControlMessage.parse(line)
        } catch {
            logger.warning("control: \(error)")
            return .error(id: nil, message: error.message)
        }
        logger.debug("control: \(message)")
        switch message {
        case .credentials(let id, let values):
            do {
                let secrets = try values.keys.sorted().map { name in try Secret(name: name, value: values[name]!) }
                proxy.setCredentials(secrets)
                return .ok(id: id)
            } catch {
                return .error(id: id, message: "\(error)")
            }
        case .addSandbox(let id, let spec):
            do {
                try await proxy.addSandbox(spec)
                return .ok(id: id)
            } catch {
                logger.warning("control: addSandbox \(spec.sandbox): \(error)")
                return .error(id: id, message: "\(error)")
            }
        case .removeSandbox(let id, let sandbox):
            do {
                try await proxy.removeSandbox(sandbox)
                return .ok(id: id)
            } catch {
                return .error(id: id, message: "\(error)")
            }
        case .setIntent(let id, let sandbox, let task, let seq):
            do {
                try proxy.setIntent(sandbox: sandbox, task: task, seq: seq)
                return .ok(id: id)
            } catch {
                return .error(id: id, message: "\(error)")
            }
        case .ready, .ok, .error, .egress:
            return .error(id: nil, message: "message type '\(message)' goes from the proxy to agentd, not the other way")
        }
    }
}

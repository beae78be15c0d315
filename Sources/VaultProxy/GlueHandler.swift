import NIOCore
import NIOPosix

/// Joins two channels byte for byte (a CONNECT tunnel). Reads on one side happen only while
/// the other side is writable, so a fast sender never fills the proxy's memory. When both
/// sides are closed, `finished` gets the bytes that went up (sandbox → remote) and down.
final class GlueHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private let isLocal: Bool
    private let counters: Counters

    final class Counters {
        var up: Int64 = 0
        var down: Int64 = 0
        var closed = 0
        let finished: (Int64, Int64) -> Void
        init(finished: @escaping (Int64, Int64) -> Void) { self.finished = finished }
    }

    private init(isLocal: Bool, counters: Counters) {
        self.isLocal = isLocal
        self.counters = counters
    }

    /// The handler for the sandbox's channel and the one for the remote channel.
    static func pair(finished: @escaping (Int64, Int64) -> Void) -> (GlueHandler, GlueHandler) {
        let counters = Counters(finished: finished)
        let local = GlueHandler(isLocal: true, counters: counters)
        let remote = GlueHandler(isLocal: false, counters: counters)
        local.partner = remote
        remote.partner = local
        return (local, remote)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    private func partnerWrite(_ buffer: ByteBuffer) { context?.write(wrapOutboundOut(buffer), promise: nil) }
    private func partnerFlush() { context?.flush() }
    private func partnerWriteEOF() { context?.close(mode: .output, promise: nil) }
    private func partnerCloseFull() { context?.close(promise: nil) }
    private var partnerWritable: Bool { context?.channel.isWritable ?? false }

    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if isLocal { counters.up += Int64(buffer.readableBytes) } else { counters.down += Int64(buffer.readableBytes) }
        partner?.partnerWrite(buffer)
    }

    func channelReadComplete(context: ChannelHandlerContext) { partner?.partnerFlush() }

    func channelInactive(context: ChannelHandlerContext) {
        counters.closed += 1
        if counters.closed == 2 { counters.finished(counters.up, counters.down) }
        partner?.partnerCloseFull()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            partner?.partnerWriteEOF()
        } else if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
    }

    func read(context: ChannelHandlerContext) {
        if partner?.partnerWritable ?? false {
            context.read()
        } else {
            pendingRead = true
        }
    }
}

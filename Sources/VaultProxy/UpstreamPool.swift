import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// One sandbox's idle upstream connections, kept alive for its next route request so that a
/// small request does not pay a TLS handshake each time.
///
/// Each sandbox has its own pool (a connection is never shared between sandboxes); within it a
/// connection is reused only for the same `Key` — host, port, trusted CAs and SNI — and only on
/// the event loop it lives on (the client's and the upstream's handlers call each other
/// directly). At most `maxIdlePerKey` wait per key, each for at most `idleTimeout`; one the
/// upstream closes, or that receives anything, while it waits is closed and dropped.
final class UpstreamPool: Sendable {
    /// What makes two routes' connections interchangeable.
    /// Made once per route (`ResolvedRoute.poolKey`); its hash is computed then, not on each
    /// lookup (`trust` can be a whole PEM text).
    struct Key: Hashable, Sendable {
        let host: String
        let port: Int
        /// The CAs the upstream's certificate is checked against (`RouteRule.trustKey`).
        let trust: String
        /// The TLS server name sent (nil for an IP-literal upstream).
        let serverName: String?
        private let precomputed: Int

        init(host: String, port: Int, trust: String, serverName: String?) {
            (self.host, self.port, self.trust, self.serverName) = (host, port, trust, serverName)
            var hasher = Hasher()
            hasher.combine(host)
            hasher.combine(port)
            hasher.combine(trust)
            hasher.combine(serverName)
            precomputed = hasher.finalize()
        }

        func hash(into hasher: inout Hasher) { hasher.combine(precomputed) }

        static func == (a: Key, b: Key) -> Bool {
            a.precomputed == b.precomputed && a.port == b.port && a.host == b.host && a.serverName == b.serverName && a.trust == b.trust
        }
    }

    private struct State {
        var idle: [Key: [any Channel]] = [:]
        var closed = false
    }

    private let state = NIOLockedValueBox(State())
    let maxIdlePerKey: Int
    let idleTimeout: TimeAmount

    init(maxIdlePerKey: Int, idleTimeout: TimeAmount) {
        self.maxIdlePerKey = maxIdlePerKey
        self.idleTimeout = idleTimeout
    }

    /// An open idle connection for `key` on `eventLoop` (the caller's), now carrying `owner`'s
    /// request; nil when there is none. The most recently parked is taken first.
    func take(_ key: Key, on eventLoop: any EventLoop, for owner: ClientHandler) -> (any Channel)? {
        eventLoop.preconditionInEventLoop()
        while true {
            let candidate = state.withLockedValue { s -> (any Channel)? in
                guard var list = s.idle[key], let index = list.lastIndex(where: { $0.eventLoop === eventLoop }) else { return nil }
                let channel = list.remove(at: index)
                s.idle[key] = list.isEmpty ? nil : list
                return channel
            }
            guard let channel = candidate else { return nil }
            if let handler = try? channel.pipeline.syncOperations.handler(type: UpstreamHandler.self), handler.unpark(owner: owner) {
                return channel
            }
            channel.close(promise: nil)
        }
    }

    /// Keeps `channel` (a connection whose last response ended cleanly, on its event loop)
    /// for the next request with `key`, or closes it when the pool is full or closed.
    func park(_ channel: any Channel, key: Key) {
        channel.eventLoop.preconditionInEventLoop()
        guard channel.isActive, let handler = try? channel.pipeline.syncOperations.handler(type: UpstreamHandler.self) else {
            channel.close(promise: nil)
            return
        }
        let kept = state.withLockedValue { s -> Bool in
            guard !s.closed, (s.idle[key]?.count ?? 0) < maxIdlePerKey else { return false }
            s.idle[key, default: []].append(channel)
            return true
        }
        guard kept else {
            channel.close(promise: nil)
            return
        }
        handler.park(in: self, key: key)
    }

    /// Forgets `channel` (it closed, failed or timed out while idle).
    func remove(_ channel: any Channel, key: Key) {
        state.withLockedValue { s in
            guard var list = s.idle[key] else { return }
            list.removeAll { $0 === channel }
            s.idle[key] = list.isEmpty ? nil : list
        }
    }

    /// Closes every idle connection and keeps none from now on (the sandbox is gone).
    func closeAll() {
        let all = state.withLockedValue { s -> [any Channel] in
            s.closed = true
            defer { s.idle = [:] }
            return s.idle.values.flatMap { $0 }
        }
        for channel in all { channel.close(promise: nil) }
    }

    /// How many connections wait in the pool now.
    var idleCount: Int { state.withLockedValue { $0.idle.values.reduce(0) { $0 + $1.count } } }
}

extension RouteRule {
    /// The CAs a route trusts, as a key: its PEM text, its CA file, or the system's (empty).
    var trustKey: String { ca.map { "pem:" + $0 } ?? "file:" + (caFile ?? "") }
}

/// The last handler of an upstream connection. While it carries a request it forwards response
/// parts and flow-control signals to the client's handler (`owner`); while it waits in the pool
/// it watches for the upstream closing (a read stays issued) and closes the connection on
/// anything else: bytes nobody asked for, an error, the pool's idle timeout.
final class UpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    private var owner: ClientHandler?
    private var context: ChannelHandlerContext?
    private var parked: (pool: UpstreamPool, key: UpstreamPool.Key, timeout: Scheduled<Void>)?

    init(owner: ClientHandler) { self.owner = owner }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        owner = nil
    }

    /// Lets the connection wait in `pool` (see `UpstreamPool.park`).
    func park(in pool: UpstreamPool, key: UpstreamPool.Key) {
        guard let context else { return }
        owner = nil
        let channel = context.channel
        parked = (pool, key, context.eventLoop.scheduleTask(in: pool.idleTimeout) { channel.close(promise: nil) })
        context.read()
    }

    /// Hands a waiting connection to `owner`; false when it can no longer be used.
    func unpark(owner: ClientHandler) -> Bool {
        guard let waiting = parked, let context, context.channel.isActive else { return false }
        waiting.timeout.cancel()
        parked = nil
        self.owner = owner
        return true
    }

    private func leavePool(_ context: ChannelHandlerContext) {
        guard let waiting = parked else { return }
        parked = nil
        waiting.timeout.cancel()
        waiting.pool.remove(context.channel, key: waiting.key)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let owner {
            owner.upstreamPart(unwrapInboundIn(data), from: context.channel)
        } else {
            // A response to no request: this connection's framing cannot be trusted any more.
            leavePool(context)
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if let owner {
            owner.upstreamReadComplete(from: context.channel)
        } else if parked != nil {
            // TLS records that carry no data (a session ticket): keep watching.
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        owner?.upstreamWritabilityChanged(context.channel.isWritable, from: context.channel)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        leavePool(context)
        owner?.upstreamFailed("upstream failed: \(error)", from: context.channel)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        leavePool(context)
        owner?.upstreamFailed("the upstream closed the connection before its response was complete", from: context.channel)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) }
    }
}

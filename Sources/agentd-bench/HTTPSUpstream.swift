import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// The upstream of the proxy figures: HTTPS/1.1 on 127.0.0.1 (swift-nio-ssl on one event loop
/// thread of its own), keep-alive when the client asks for it, with a certificate from a CA
/// made for this run. Two resources: `GET /small` (100 bytes) and `GET /big` (`bigBytes`
/// pseudo-random bytes — incompressible, like a tarball or a wheel — streamed 256 KiB at a
/// time, only while the connection is writable). Anything else is 404.
final class HTTPSUpstream: Sendable {
    static let smallBytes = 100

    let port: Int
    private let channel: any Channel
    private let group: MultiThreadedEventLoopGroup

    private init(port: Int, channel: any Channel, group: MultiThreadedEventLoopGroup) {
        self.port = port
        self.channel = channel
        self.group = group
    }

    static func start(certificate: String, key: String, bigBytes: Int) async throws -> HTTPSUpstream {
        let chain = try NIOSSLCertificate.fromPEMFile(certificate)
        let privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
        let tls = try NIOSSLContext(
            configuration: .makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey)))
        var generator = SystemRandomNumberGenerator()
        var random = ByteBuffer()
        random.reserveCapacity(256 << 10)
        for _ in 0..<(256 << 10) / 8 { random.writeInteger(generator.next() as UInt64) }
        let piece = random
        let small = ByteBuffer(repeating: UInt8(ascii: "s"), count: smallBytes)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            let channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let ops = channel.pipeline.syncOperations
                        try ops.addHandler(NIOSSLServerHandler(context: tls))
                        try ops.configureHTTPServerPipeline(withErrorHandling: true)
                        try ops.addHandler(FixtureHandler(small: small, piece: piece, bigBytes: bigBytes))
                    }
                }
                .bind(host: "127.0.0.1", port: 0)
                .get()
            return HTTPSUpstream(port: channel.localAddress?.port ?? 0, channel: channel, group: group)
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
    }

    func stop() async {
        try? await channel.close()
        try? await group.shutdownGracefully()
    }
}

/// Answers one request at a time (the pipeline handler queues pipelined ones).
private final class FixtureHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let small: ByteBuffer
    private let piece: ByteBuffer
    private let bigBytes: Int
    private var head: HTTPRequestHead?
    /// Bytes of `/big` still to write.
    private var remaining = 0

    init(small: ByteBuffer, piece: ByteBuffer, bigBytes: Int) {
        self.small = small
        self.piece = piece
        self.bigBytes = bigBytes
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/octet-stream")
            if !h.isKeepAlive { headers.add(name: "Connection", value: "close") }
            switch h.uri {
            case "/small":
                headers.add(name: "Content-Length", value: String(small.readableBytes))
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .ok, headers: headers))), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(small))), promise: nil)
                end(context)
            case "/big":
                headers.add(name: "Content-Length", value: String(bigBytes))
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .ok, headers: headers))), promise: nil)
                remaining = bigBytes
                pump(context)
            default:
                headers.add(name: "Content-Length", value: "0")
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .notFound, headers: headers))), promise: nil)
                end(context)
            }
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if remaining > 0, context.channel.isWritable { pump(context) }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Clients that close without a TLS close_notify end here too.
        context.close(promise: nil)
    }

    /// Writes `/big` while the connection is writable. A flush may call back into this (the
    /// channel became writable again), so the response ends where the last piece is written.
    private func pump(_ context: ChannelHandlerContext) {
        while remaining > 0, context.channel.isWritable {
            let n = min(remaining, piece.readableBytes)
            context.write(wrapOutboundOut(.body(.byteBuffer(piece.getSlice(at: piece.readerIndex, length: n)!))), promise: nil)
            remaining -= n
            if remaining == 0 { end(context) } else { context.flush() }
        }
    }

    private func end(_ context: ChannelHandlerContext) {
        let close = !(head?.isKeepAlive ?? false)
        head = nil
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if close { channel.close(promise: nil) } }
    }
}

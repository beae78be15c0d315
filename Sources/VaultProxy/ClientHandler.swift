import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// One sandbox connection: parses requests, refuses what the policy does not allow, forwards
/// route requests to their upstream (streaming both ways with backpressure: reads on one side
/// are issued only while the other side is writable) and turns CONNECT into a tunnel.
///
/// Both the client channel and its upstream channel run on the same event loop, so the two
/// handlers call each other directly.
final class ClientHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// `inspecting`: reading a push's command list before deciding; `draining`: discarding a
    /// refused push's body before its report goes back.
    enum State { case idle, refused, inspecting, draining, connecting, forwarding, awaitingResponse, tunnelling, closed }

    /// A push on a git route, from its head until it is forwarded or refused.
    struct PushInspection {
        let route: ResolvedRoute
        let git: ResolvedGitRoute
        let head: HTTPRequestHead
        var reader: GitCommandListReader
        /// The report-status for a refused push, once decided.
        var report: [UInt8] = []
        var drained: Int64 = 0
        var deadline: Scheduled<Void>?
    }

    /// One request and its decision, turned into an event when it ends. A class: the handler
    /// updates it for every part of a response, which must not copy its event's strings each time.
    final class Exchange {
        var event: EgressEvent
        let started: NIODeadline
        let isHead: Bool
        let keepAlive: Bool
        let version: HTTPVersion
        var scrubber: StreamScrubber?
        var responseStarted = false
        var responseEnded = false
        var requestEnded = false
        var closeAfter = false

        init(event: EgressEvent, started: NIODeadline, isHead: Bool, keepAlive: Bool, version: HTTPVersion, scrubber: StreamScrubber? = nil) {
            (self.event, self.started, self.isHead, self.keepAlive, self.version, self.scrubber) = (event, started, isHead, keepAlive, version, scrubber)
        }
    }

    private let listener: ListenerContext
    private let decoder: ByteToMessageHandler<HTTPRequestDecoder>
    private let encoder: HTTPResponseEncoder
    private var context: ChannelHandlerContext?
    private var state = State.idle
    private var exchange: Exchange?
    private var upstream: (any Channel)?
    private var pendingBody: [ByteBuffer] = []
    private var clientReadPending = false
    private var upstreamReadPending = false
    private var expectContinue = false
    private var push: PushInspection?
    /// The route request on `upstream` (kept to retry it, and to pool its connection).
    private var upstreamTarget: (route: ResolvedRoute, head: HTTPRequestHead, key: UpstreamPool.Key)?
    /// Whether `upstream` came from the pool (and so may have died while idle).
    private var upstreamReused = false
    /// Whether the response's framing and headers let its connection serve another request.
    private var upstreamReusable = false

    init(context: ListenerContext, decoder: ByteToMessageHandler<HTTPRequestDecoder>, encoder: HTTPResponseEncoder) {
        self.listener = context
        self.decoder = decoder
        self.encoder = encoder
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelActive(context: ChannelHandlerContext) {
        context.read()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        push?.deadline?.cancel()
        push = nil
        if state != .tunnelling {
            upstream?.close(promise: nil)
            if let e = exchange, !e.responseEnded {
                if e.event.status == 0 { e.event.status = 499 }
                finishExchange()
            }
            state = .closed
        }
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is HTTPParserError, state == .idle || state == .connecting || state == .inspecting,
            exchange == nil || exchange?.responseStarted == false
        {
            push = nil
            pendingBody = []
            upstream?.close(promise: nil)
            upstream = nil
            exchange = nil
            refuse(status: 400, method: "-", host: "-", rule: "malformed request (\(error))")
            return
        }
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            guard state == .idle else {
                // A pipelined request, or bytes after a refusal: this connection is done.
                if state != .refused { context.close(promise: nil) }
                return
            }
            handleHead(head)
        case .body(let buffer):
            exchange?.event.bytesUp += Int64(buffer.readableBytes)
            switch state {
            case .connecting: pendingBody.append(buffer)
            case .forwarding: upstream?.write(HTTPClientRequestPart.body(.byteBuffer(buffer)), promise: nil)
            case .inspecting:
                pendingBody.append(buffer)
                inspect(buffer)
            case .draining:
                push?.drained += Int64(buffer.readableBytes)
                if let drained = push?.drained, drained > listener.proxy.configuration.gitRefusedPushDrainLimit { answerRefusedPush() }
            default: break
            }
        case .end:
            exchange?.requestEnded = true
            switch state {
            case .forwarding:
                upstream?.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                state = .awaitingResponse
                upstream?.read()
            case .inspecting: refusePush(status: 400, rule: "the push's body ended before its command list's flush-pkt (0000)")
            case .draining: answerRefusedPush()
            default: break
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        switch state {
        case .idle, .inspecting, .draining:
            context.read()
        case .forwarding:
            upstream?.flush()
            if upstream?.isWritable ?? false { context.read() } else { clientReadPending = true }
        default: break
        }
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, upstreamReadPending {
            upstreamReadPending = false
            upstream?.read()
        }
        context.fireChannelWritabilityChanged()
    }

    // MARK: - Requests

    private func handleHead(_ head: HTTPRequestHead) {
        let method = head.method.rawValue
        if let problem = ClientHandler.framingProblem(head, maxHeaderBytes: listener.proxy.configuration.maxHeaderBytes) {
            refuse(status: 400, method: method, host: "-", rule: problem)
            return
        }
        if head.method == .CONNECT {
            handleConnect(head)
        } else {
            handleRoute(head)
        }
    }

    /// Why a request head cannot be forwarded safely (smuggling framings, oversized), or nil.
    static func framingProblem(_ head: HTTPRequestHead, maxHeaderBytes: Int) -> String? {
        var size = head.uri.utf8.count + 16
        for (name, value) in head.headers { size += name.utf8.count + value.utf8.count + 4 }
        if size > maxHeaderBytes { return "request head larger than \(maxHeaderBytes) bytes" }
        if head.uri.utf8.contains(where: { $0 < 0x21 || $0 == 0x7F }) { return "control characters or spaces in the request target" }
        for (_, value) in head.headers where value.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) {
            return "CR, LF or NUL in a header value"
        }
        let lengths = head.headers["content-length"]
        let encodings = head.headers["transfer-encoding"]
        if lengths.count > 1 || lengths.contains(where: { $0.contains(",") }) { return "more than one Content-Length" }
        if !encodings.isEmpty && !lengths.isEmpty { return "Transfer-Encoding together with Content-Length" }
        if encodings.count > 1 || encodings.contains(where: { $0.lowercased() != "chunked" }) {
            return "Transfer-Encoding other than a single 'chunked'"
        }
        if let length = lengths.first, !length.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) || length.isEmpty { return "Content-Length is not a number" }
        return nil
    }

    /// Refuses the request: a text body naming the policy and rule, an event, then close.
    private func refuse(status: Int, method: String, host: String, rule: String, route: String? = nil, path: String? = nil) {
        var event = listener.event(allowed: false, method: method, host: host, rule: rule, status: status)
        event.route = route
        event.path = path
        let body: String
        switch status {
        case 403: body = listener.refusal(host, rule)
        case 400, 415: body = "request refused by the vault-proxy (policy \(listener.spec.policy)): \(rule)\n"
        default: body = "\(rule)\n"
        }
        exchange = Exchange(event: event, started: .now(), isHead: false, keepAlive: false, version: .http1_1)
        exchange?.responseStarted = true
        state = .refused
        respond(status: status, body: body)
        exchange?.responseEnded = true
        finishExchange()
    }

    /// Answers with `body` and closes the connection.
    private func respond(status: Int, body: String) {
        respond(status: status, body: ByteBuffer(string: body), contentType: "text/plain; charset=utf-8")
    }

    private func respond(status: Int, body: ByteBuffer, contentType: String) {
        guard let context else { return }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Cache-Control", value: "no-cache")
        headers.add(name: "Connection", value: "close")
        let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status), headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }

    private func finishExchange() {
        guard let e = exchange else { return }
        exchange = nil
        e.event.durationMs = Int64((NIODeadline.now() - e.started).nanoseconds / 1_000_000)
        listener.proxy.emit(e.event)
    }

    // MARK: - Routes

    private func handleRoute(_ head: HTTPRequestHead) {
        let method = head.method.rawValue
        var target = Substring(head.uri)
        if target.lowercased().hasPrefix("http://") {
            let afterScheme = target.dropFirst(7)
            let authority = afterScheme.prefix { $0 != "/" && $0 != "?" }
            var hostOnly = authority
            if let colon = authority.lastIndex(of: ":"), !authority.hasSuffix("]") { hostOnly = authority[..<colon] }
            guard ["127.0.0.1", "localhost", "[::1]"].contains(hostOnly.lowercased()) else {
                refuse(
                    status: 403, method: method, host: String(authority).lowercased(),
                    rule: "plain HTTP egress is refused; use a route (http://127.0.0.1:3128/<route>/…) or HTTPS to an allowed host")
                return
            }
            target = afterScheme.dropFirst(authority.count)
            if target.isEmpty { target = "/" }
        }
        guard target.hasPrefix("/") else {
            refuse(status: 400, method: method, host: "-", rule: "malformed request target")
            return
        }
        let afterSlash = target.dropFirst()
        let name = String(afterSlash.prefix { $0 != "/" && $0 != "?" })
        let rest = String(afterSlash.dropFirst(name.count))
        let pathOnly = String(rest.prefix { $0 != "?" })
        let shownPath = pathOnly + (rest.contains("?") ? "?[REDACTED]" : "")
        guard let route = listener.routes[name] else {
            let known = listener.routes.keys.sorted()
            refuse(
                status: 403, method: method, host: "route \(name)",
                rule: "no route '\(name)' (routes: \(known.isEmpty ? "none" : known.joined(separator: ", "))); other hosts only through HTTPS CONNECT",
                path: shownPath)
            return
        }
        let upstreamHost = "\(route.host.contains(":") ? "[\(route.host)]" : route.host):\(route.port)"
        guard let segments = ClientHandler.decodedSegments(pathOnly) else {
            refuse(status: 400, method: method, host: upstreamHost, rule: "malformed percent-encoding in the route path", route: name)
            return
        }
        if segments.contains(where: { $0 == ".." || $0 == "." }) {
            refuse(
                status: 403, method: method, host: upstreamHost, rule: "route paths must not contain '.' or '..' segments (plain or percent-encoded)",
                route: name, path: shownPath)
            return
        }
        var gitEndpoint: GitEndpoint?
        if let git = route.git {
            let query = rest.firstIndex(of: "?").map { rest[rest.index(after: $0)...] }
            gitEndpoint = git.endpoint(method: method, path: pathOnly, query: query)
            guard gitEndpoint != nil else {
                refuse(status: 403, method: method, host: upstreamHost, rule: git.onlyRule(route: name), route: name, path: shownPath)
                return
            }
            let encodings = ClientHandler.tokens(head.headers["content-encoding"]).filter { $0 != "identity" }
            if gitEndpoint == .receivePack, !encodings.isEmpty {
                refuse(
                    status: 415, method: method, host: upstreamHost,
                    rule: "route \(name): a push's body must not be compressed (Content-Encoding \(encodings.joined(separator: ", "))): the vault-proxy reads its commands",
                    route: name, path: shownPath)
                return
            }
        }
        var headerValue: String?
        if let credentialName = route.rule.credential {
            guard let secret = listener.proxy.secret(named: credentialName) else {
                refuse(
                    status: 502, method: method, host: upstreamHost,
                    rule: "route \(name): credential '\(credentialName)' is not available to the vault-proxy", route: name, path: shownPath)
                return
            }
            guard !secret.value.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) else {
                refuse(
                    status: 502, method: method, host: upstreamHost,
                    rule: "route \(name): credential '\(credentialName)' contains CR, LF or NUL and cannot go in a header", route: name)
                return
            }
            headerValue = route.headerParts.joined(separator: String(decoding: secret.value, as: UTF8.self))
        }

        // The upstream request: hop-by-hop headers, the route's header, Proxy-Authorization,
        // Host, Accept-Encoding and Expect are the proxy's; everything else passes.
        let connectionTokens = Set(ClientHandler.tokens(head.headers["connection"]))
        let routeHeader = route.headerName.lowercased()
        var headers = HTTPHeaders()
        for (headerName, value) in head.headers {
            let lower = headerName.lowercased()
            if ClientHandler.proxyOwnedRequestHeaders.contains(lower) || connectionTokens.contains(lower) || lower == routeHeader { continue }
            headers.add(name: headerName, value: value)
        }
        headers.add(name: "Host", value: route.hostHeader)
        headers.add(name: "Accept-Encoding", value: "identity")
        if let headerValue { headers.add(name: route.headerName, value: headerValue) }
        expectContinue = head.headers["expect"].contains { $0.lowercased() == "100-continue" }

        let upstreamPath = route.prefix + (rest.isEmpty || rest.hasPrefix("?") ? "/" + rest : rest)
        var upstreamHead = HTTPRequestHead(version: .http1_1, method: head.method, uri: upstreamPath)
        upstreamHead.headers = headers

        var event = listener.event(allowed: true, method: method, host: upstreamHost, rule: "route \(name)", status: 0)
        event.route = name
        event.path = shownPath
        event.credential = route.rule.credential
        exchange = Exchange(
            event: event, started: .now(), isHead: head.method == .HEAD, keepAlive: head.isKeepAlive, version: head.version,
            scrubber: StreamScrubber(listener.proxy.patterns))
        if gitEndpoint == .receivePack, let git = route.git {
            inspectPush(route: route, git: git, head: upstreamHead)
            return
        }
        state = .connecting
        connectRoute(route, head: upstreamHead)
    }

    // MARK: - Pushes on a git route

    /// Reads the push's command list before anything goes upstream (see `inspect`).
    private func inspectPush(route: ResolvedRoute, git: ResolvedGitRoute, head: HTTPRequestHead) {
        state = .inspecting
        push = PushInspection(route: route, git: git, head: head, reader: GitCommandListReader(limit: listener.proxy.configuration.gitCommandListLimit))
        if expectContinue, let context {
            expectContinue = false
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .continue))), promise: nil)
        }
    }

    /// Feeds a body part to the command list reader: a complete list the policy allows is
    /// forwarded (the buffered parts first, then the rest streams); one it refuses is drained
    /// and answered with a report-status; a malformed one gets 400.
    private func inspect(_ buffer: ByteBuffer) {
        guard var inspection = push else { return }
        let outcome = inspection.reader.feed(buffer.readableBytesView)
        push = inspection
        switch outcome {
        case .needMore: return
        case .malformed(let problem): refusePush(status: 400, rule: "malformed git push: \(problem)")
        case .complete(let commands, let capabilities):
            let verdicts = inspection.git.verdicts(commands)
            let refused = verdicts.filter { $0.refusal != nil }
            guard !refused.isEmpty else {
                push = nil
                if !commands.isEmpty { exchange?.event.rule += "; git.push " + ClientHandler.listed(commands.map(\.ref)) }
                state = .connecting
                connectRoute(inspection.route, head: inspection.head)
                return
            }
            guard let context else { return }
            pendingBody = []
            let policy = listener.spec.policy
            if capabilities.contains("report-status") || capabilities.contains("report-status-v2") {
                inspection.report = GitReceivePackReport.refusal(verdicts, policy: policy, capabilities: capabilities)
            }
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            inspection.deadline = context.eventLoop.scheduleTask(in: listener.proxy.configuration.gitRefusedPushDrainTimeout) {
                bound.value.answerRefusedPush()
            }
            push = inspection
            exchange?.event.type = "egress.denied"
            exchange?.event.credential = nil
            exchange?.event.rule = "git.push: " + ClientHandler.listed(refused.compactMap(\.refusal))
            state = .draining
        }
    }

    /// The first few of `items`, joined, and how many more there are.
    static func listed(_ items: [String], first: Int = 5) -> String {
        items.prefix(first).joined(separator: "; ") + (items.count > first ? " (and \(items.count - first) more)" : "")
    }

    /// Sends a refused push's report-status (200, as git's receive-pack does: git prints each
    /// ref's reason) once its body has been drained, or its time or size bound is reached;
    /// then closes. A client that asked for no report-status gets 403 with the reasons.
    private func answerRefusedPush() {
        guard state == .draining, let inspection = push, let e = exchange else { return }
        inspection.deadline?.cancel()
        push = nil
        state = .refused
        e.responseStarted = true
        e.responseEnded = true
        if inspection.report.isEmpty {
            e.event.status = 403
            respond(status: 403, body: listener.refusal(e.event.host, e.event.rule))
        } else {
            e.event.status = 200
            respond(status: 200, body: ByteBuffer(bytes: inspection.report), contentType: "application/x-git-receive-pack-result")
        }
        finishExchange()
    }

    /// Refuses a push being inspected (malformed command list) with `status`.
    private func refusePush(status: Int, rule: String) {
        guard let e = exchange else { return }
        push = nil
        pendingBody = []
        exchange = nil
        refuse(status: status, method: e.event.method, host: e.event.host, rule: rule, route: e.event.route, path: e.event.path)
    }

    /// The comma-separated tokens of header values, trimmed and lowercased.
    static func tokens(_ values: [String]) -> [String] {
        var result: [String] = []
        for value in values {
            for token in value.split(separator: ",") { result.append(String(token).trimmingCharacters(in: " \t").lowercased()) }
        }
        return result
    }

    static let proxyOwnedRequestHeaders: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te", "trailer", "upgrade",
        "host", "accept-encoding", "expect",
    ]

    /// The path's segments, percent-decoded, split at `/` and `\` (also when encoded); nil for
    /// a malformed escape.
    static func decodedSegments(_ path: String) -> [String]? {
        var bytes: [UInt8] = []
        var it = Array(path.utf8)[...]
        while let b = it.popFirst() {
            if b == 0x25 {
                guard it.count >= 2, let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) else { return nil }
                it = it.dropFirst(2)
                bytes.append(v)
            } else {
                bytes.append(b)
            }
        }
        return bytes.split(omittingEmptySubsequences: false) { $0 == 0x2F || $0 == 0x5C }.map { String(decoding: $0, as: UTF8.self) }
    }

    /// Sends the request on an idle connection from the sandbox's pool, or dials a new one
    /// (always when `pooled` is false: the retry after a pooled connection turned out dead).
    private func connectRoute(_ route: ResolvedRoute, head: HTTPRequestHead, pooled: Bool = true) {
        guard let context else { return }
        let key = route.poolKey
        upstreamTarget = (route, head, key)
        if pooled, let channel = listener.pool.take(key, on: context.eventLoop, for: self) {
            routeConnected(channel, head: head, reused: true)
            return
        }
        let tls: NIOSSLContext
        do {
            tls = try listener.proxy.tlsContext(for: route.rule)
        } catch {
            upstreamFailed("route \(route.rule.name): TLS setup failed: \(error)")
            return
        }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let idle = listener.proxy.configuration.idleTimeout
        let serverName = key.serverName
        ClientBootstrap(group: context.eventLoop)
            .connectTimeout(listener.proxy.configuration.connectTimeout)
            .channelOption(.autoRead, value: false)
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 65_536, maximum: 256 << 10))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        try NIOSSLClientHandler(context: tls, serverHostname: serverName),
                        IdleStateHandler(allTimeout: idle),
                        HTTPRequestEncoder(),
                        ByteToMessageHandler(HTTPResponseDecoder(leftOverBytesStrategy: .dropBytes)),
                        UpstreamHandler(owner: bound.value),
                    ])
                }
            }
            .connect(host: route.host, port: route.port)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel): self.routeConnected(channel, head: head, reused: false)
                case .failure(let error): self.upstreamFailed("route \(route.rule.name): cannot reach \(route.host):\(route.port): \(error)")
                }
            }
    }

    private func routeConnected(_ channel: any Channel, head: HTTPRequestHead, reused: Bool) {
        guard state == .connecting, let context else {
            channel.close(promise: nil)
            return
        }
        upstream = channel
        upstreamReused = reused
        upstreamReusable = false
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        for part in pendingBody { channel.write(HTTPClientRequestPart.body(.byteBuffer(part)), promise: nil) }
        pendingBody = []
        // A write can fail at once (a pooled connection the upstream has closed), and the
        // failure is handled before the flush returns: then `upstream` is no longer `channel`.
        if exchange?.requestEnded == true {
            state = .awaitingResponse
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            guard upstream === channel else { return }
            channel.read()
        } else {
            state = .forwarding
            channel.flush()
            guard upstream === channel else { return }
            if expectContinue {
                context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .continue))), promise: nil)
            }
            context.read()
            // Early responses (a 401 before the body is sent) are read too.
            channel.read()
        }
    }

    // MARK: - Upstream events (called by UpstreamHandler on the same event loop)

    func upstreamPart(_ part: HTTPClientResponsePart, from channel: any Channel) {
        guard let context, channel === upstream, let e = exchange, state == .forwarding || state == .awaitingResponse else { return }
        switch part {
        case .head(var head):
            let bodyless = e.isHead || head.status.code < 200 || head.status == .noContent || head.status == .notModified
            let encodings = ClientHandler.tokens(head.headers["content-encoding"])
            if !bodyless, encodings.contains(where: { $0 != "identity" }) {
                upstream?.close(promise: nil)
                upstream = nil
                e.event.rule += "; response refused: Content-Encoding \(encodings.joined(separator: ", ")) cannot be scrubbed"
                upstreamFailed("route \(e.event.route ?? "-"): upstream answered with Content-Encoding \(encodings.joined(separator: ", ")) although identity was requested; the vault-proxy does not pass bodies it cannot scrub")
                return
            }
            let patterns = listener.proxy.patterns
            let connectionTokens = Set(ClientHandler.tokens(head.headers["connection"]))
            var headers = HTTPHeaders()
            for (name, value) in head.headers {
                let lower = name.lowercased()
                if ClientHandler.hopByHopResponseHeaders.contains(lower) || connectionTokens.contains(lower) { continue }
                if lower == "content-length" && !bodyless { continue }
                headers.add(name: name, value: StreamScrubber.scrub(value, with: patterns))
            }
            let framed = bodyless || head.headers["content-length"].count == 1 || ClientHandler.tokens(head.headers["transfer-encoding"]).last == "chunked"
            upstreamReusable = head.version == .http1_1 && head.status.code >= 200 && framed && !connectionTokens.contains("close")
            if !(e.keepAlive && e.version == .http1_1) || !e.requestEnded {
                headers.add(name: "Connection", value: "close")
                e.closeAfter = true
            }
            head.headers = headers
            head.version = e.version
            e.event.status = Int(head.status.code)
            e.responseStarted = true
            context.write(wrapOutboundOut(.head(head)), promise: nil)
        case .body(let buffer):
            e.event.bytesDown += Int64(buffer.readableBytes)
            let clean = e.scrubber?.feed(buffer, allocator: context.channel.allocator) ?? buffer
            if clean.readableBytes > 0 { context.write(wrapOutboundOut(.body(.byteBuffer(clean))), promise: nil) }
        case .end:
            if var tail = e.scrubber?.finish(allocator: context.channel.allocator), tail.readableBytes > 0 {
                context.write(wrapOutboundOut(.body(.byteBuffer(tail))), promise: nil)
                tail.clear()
            }
            e.responseEnded = true
            let closeAfter = e.closeAfter
            let channel = context.channel
            if closeAfter {
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
            } else {
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
            finishExchange()
            // The connection serves the sandbox's next request only if this exchange ended
            // cleanly: the whole request sent, the whole response framed and received.
            if let channel = upstream, let key = upstreamTarget?.key, upstreamReusable, state == .awaitingResponse {
                listener.pool.park(channel, key: key)
            } else {
                upstream?.close(promise: nil)
            }
            upstream = nil
            upstreamTarget = nil
            upstreamReadPending = false
            clientReadPending = false
            state = closeAfter ? .refused : .idle
            if !closeAfter { context.read() }
        }
    }

    /// Whether a request may be sent again on a fresh connection: a GET or HEAD without a body.
    static func safeToRetry(_ head: HTTPRequestHead) -> Bool {
        (head.method == .GET || head.method == .HEAD) && head.headers["transfer-encoding"].isEmpty
            && head.headers["content-length"].allSatisfy { $0 == "0" }
    }

    static let hopByHopResponseHeaders: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade",
        "transfer-encoding",
    ]

    func upstreamReadComplete(from channel: any Channel) {
        guard let context, channel === upstream, state == .forwarding || state == .awaitingResponse else { return }
        context.flush()
        if context.channel.isWritable { upstream?.read() } else { upstreamReadPending = true }
    }

    func upstreamWritabilityChanged(_ writable: Bool, from channel: any Channel) {
        if writable, channel === upstream, clientReadPending, state == .forwarding {
            clientReadPending = false
            context?.read()
        }
    }

    /// The upstream failed or closed: 502 before the response started, else the client is cut off.
    func upstreamFailed(_ message: String, from channel: (any Channel)? = nil) {
        if let channel, channel !== upstream { return }
        guard let context, state == .connecting || state == .forwarding || state == .awaitingResponse else { return }
        upstream?.close(promise: nil)
        upstream = nil
        if channel != nil, upstreamReused, let target = upstreamTarget, exchange?.responseStarted == false, ClientHandler.safeToRetry(target.head) {
            // A pooled connection the upstream had closed while it waited: the request may
            // not have reached it, and a GET or HEAD without a body can go again.
            upstreamReused = false
            upstreamReadPending = false
            clientReadPending = false
            state = .connecting
            connectRoute(target.route, head: target.head, pooled: false)
            return
        }
        if let e = exchange, !e.responseStarted {
            e.event.status = 502
            e.responseStarted = true
            e.responseEnded = true
            state = .refused
            respond(status: 502, body: "vault-proxy: \(message)\n")
            finishExchange()
        } else {
            state = .closed
            context.close(promise: nil)
        }
    }

    // MARK: - CONNECT

    private func handleConnect(_ head: HTTPRequestHead) {
        switch listener.checkConnect(head.uri) {
        case .refused(let status, let host, let rule):
            refuse(status: status, method: "CONNECT", host: host, rule: rule)
        case .allowed(let host, let port, let rule):
            guard let context else { return }
            let shown = "\(host):\(port)"
            let event = listener.event(allowed: true, method: "CONNECT", host: shown, rule: rule, status: 0)
            exchange = Exchange(event: event, started: .now(), isHead: false, keepAlive: false, version: head.version)
            state = .connecting
            switch host {
            case .address(let address):
                // A literal the policy lists: the policy's author chose this address.
                dialTunnel([address], port: port, shown: shown, rule: rule)
            case .name(let name):
                if let trusted = listener.proxy.configuration.trustedOverrides[name] {
                    dialTunnel(trusted, port: port, shown: shown, rule: rule)
                    return
                }
                let resolver = listener.proxy.configuration.resolver
                context.eventLoop.makeFutureWithTask { try await resolver.resolve(name) }
                    .assumeIsolated()
                    .whenComplete { result in
                        switch result {
                        case .failure(let error):
                            self.connectRefused(status: 502, host: shown, rule: "\(error)")
                        case .success(let addresses):
                            if addresses.isEmpty {
                                self.connectRefused(status: 502, host: shown, rule: "\(name) has no addresses")
                            } else if let bad = addresses.first(where: { $0.refusal != nil }) {
                                self.connectRefused(status: 403, host: shown, rule: "\(name) resolves to \(bad), \(bad.refusal!)")
                            } else {
                                self.dialTunnel(addresses, port: port, shown: shown, rule: rule)
                            }
                        }
                    }
            }
        }
    }

    private func connectRefused(status: Int, host: String, rule: String) {
        guard state == .connecting else { return }
        exchange = nil
        refuse(status: status, method: "CONNECT", host: host, rule: rule)
    }

    /// Dials the checked addresses in order (no second lookup), then answers 200 and glues.
    private func dialTunnel(_ addresses: [IPAddress], port: Int, shown: String, rule: String) {
        guard let context, state == .connecting, let first = addresses.first else { return }
        let address: SocketAddress
        do {
            address = try SocketAddress(ipAddress: first.description, port: port)
        } catch {
            connectRefused(status: 502, host: shown, rule: "cannot dial \(first): \(error)")
            return
        }
        let idle = listener.proxy.configuration.idleTimeout
        ClientBootstrap(group: context.eventLoop)
            .connectTimeout(listener.proxy.configuration.connectTimeout)
            .channelOption(.autoRead, value: false)
            // Reads of up to 256 KiB (NIO's default stops at 64 KiB): a quarter of the reads,
            // writes and wake-ups per byte tunnelled (`make bench`: the CONNECT download).
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 65_536, maximum: 256 << 10))
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(IdleStateHandler(allTimeout: idle)) }
            }
            .connect(to: address)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel): self.tunnelConnected(channel)
                case .failure(let error):
                    if addresses.count > 1 {
                        self.dialTunnel(Array(addresses.dropFirst()), port: port, shown: shown, rule: rule)
                    } else {
                        self.connectRefused(status: 502, host: shown, rule: "cannot connect to \(shown) (\(first)): \(error)")
                    }
                }
            }
    }

    private func tunnelConnected(_ remote: any Channel) {
        guard let context, state == .connecting, let e = exchange else {
            remote.close(promise: nil)
            return
        }
        state = .tunnelling
        e.event.status = 200
        exchange = nil
        let started = e.started
        let emit = listener.proxy.emit
        let event = e.event
        let (local, far) = GlueHandler.pair { up, down in
            var finished = event
            finished.bytesUp = up
            finished.bytesDown = down
            finished.durationMs = Int64((NIODeadline.now() - started).nanoseconds / 1_000_000)
            emit(finished)
        }
        do {
            // The 200 goes out as raw bytes once the HTTP encoder is gone: nothing may frame
            // the tunnel. Then the glue takes over, and the decoder leaves, handing on any
            // bytes the client sent early (its TLS ClientHello).
            let ops = context.pipeline.syncOperations
            ops.removeHandler(encoder, promise: nil)
            let version = e.version == .http1_0 ? "HTTP/1.0" : "HTTP/1.1"
            context.writeAndFlush(NIOAny(ByteBuffer(string: "\(version) 200 Connection established\r\n\r\n")), promise: nil)
            try ops.addHandler(local)
            try remote.pipeline.syncOperations.addHandler(far)
            ops.removeHandler(decoder, promise: nil)
            ops.removeHandler(context: context, promise: nil)
            context.channel.setOption(.autoRead, value: true).whenComplete { _ in }
            remote.setOption(.autoRead, value: true).whenComplete { _ in }
        } catch {
            remote.close(promise: nil)
            context.close(promise: nil)
        }
    }
}

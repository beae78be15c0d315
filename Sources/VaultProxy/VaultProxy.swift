import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Secrets

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// State every listener shares: credentials, their scrub patterns, TLS contexts, the event sink.
final class ProxyCore: Sendable {
    let group: any EventLoopGroup
    let configuration: ProxyConfiguration
    let logger: Logger
    let emit: @Sendable (EgressEvent) -> Void
    private let secrets = NIOLockedValueBox<[String: Secret]>([:])
    private let scrub = NIOLockedValueBox(ScrubPatterns([]))
    private let tlsContexts = NIOLockedValueBox<[String: NIOSSLContext]>([:])

    init(group: any EventLoopGroup, configuration: ProxyConfiguration, logger: Logger, emit: @escaping @Sendable (EgressEvent) -> Void) {
        self.group = group
        self.configuration = configuration
        self.logger = logger
        self.emit = emit
    }

    func setSecrets(_ new: [Secret]) {
        let all = secrets.withLockedValue { current in
            for s in new { current[s.name] = s }
            return Array(current.values)
        }
        scrub.withLockedValue { $0 = ScrubPatterns(all) }
    }

    func secret(named name: String) -> Secret? { secrets.withLockedValue { $0[name] } }
    var patterns: ScrubPatterns { scrub.withLockedValue { $0 } }

    /// The client TLS context for a route: system trust roots, or only the CAs of its `ca`
    /// (PEM text) or `caFile`.
    func tlsContext(for rule: RouteRule) throws -> NIOSSLContext {
        let key = rule.trustKey
        if let cached = tlsContexts.withLockedValue({ $0[key] }) { return cached }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        tls.certificateVerification = .fullVerification
        if let ca = rule.ca {
            let certificates = try NIOSSLCertificate.fromPEMBytes(Array(ca.utf8))
            guard !certificates.isEmpty else { throw ProxyError("route \(rule.name): ca holds no PEM certificate") }
            tls.trustRoots = .certificates(certificates)
        } else if let caFile = rule.caFile {
            tls.trustRoots = .file(caFile)
        }
        let context = try NIOSSLContext(configuration: tls)
        tlsContexts.withLockedValue { $0[key] = context }
        return context
    }
}

/// The vault-proxy: one unix-socket listener per sandbox, routes that add a credential the
/// sandbox never sees, CONNECT to allowlisted public hosts, scrubbed responses, and an event
/// per decision. See the module README.
public final class VaultProxy: Sendable {
    private let core: ProxyCore
    private struct Entry {
        let context: ListenerContext
        let channel: any Channel
        /// Whether the proxy bound the socket file (and so removes it).
        let ownsSocketFile: Bool
    }
    private let listeners = NIOLockedValueBox<[String: Entry]>([:])

    /// - Parameters:
    ///   - events: called for every egress decision (on an event loop; must not block).
    public init(
        group: any EventLoopGroup, configuration: ProxyConfiguration = ProxyConfiguration(),
        logger: Logger = Logger(label: "vault-proxy"), events: @escaping @Sendable (EgressEvent) -> Void
    ) {
        core = ProxyCore(group: group, configuration: configuration, logger: logger, emit: events)
    }

    /// Adds or replaces credential values (merged by name). Responses are scrubbed of every
    /// credential known, whichever route they came through.
    public func setCredentials(_ secrets: [Secret]) {
        core.setSecrets(secrets)
        core.logger.info("credentials known: \(secrets.map(\.name).sorted())")
    }

    /// Starts `spec`'s listener: on `listener`, a listening unix stream socket agentd bound
    /// (the proxy takes it over and closes it when the sandbox goes; the socket file is
    /// agentd's), or else on a socket the proxy binds at `spec.socketPath` itself (its
    /// directory is created 0700 when missing; the socket is 0666 and removed with the sandbox).
    /// Fails when the sandbox exists, a rule is invalid or the socket cannot be used.
    public func addSandbox(_ spec: SandboxSpec, listener: CInt? = nil) async throws {
        var descriptor = listener
        defer { if let descriptor { close(descriptor) } }
        guard listeners.withLockedValue({ $0[spec.sandbox] == nil }) else {
            throw ProxyError("sandbox \(spec.sandbox) already has a listener; remove it first")
        }
        let context = try ListenerContext(spec: spec, proxy: core)
        // A route's CA text is checked now, not at its first request.
        for rule in spec.routes where rule.ca != nil { _ = try core.tlsContext(for: rule) }
        if let fd = descriptor {
            guard UnixSocket.isListeningUnixStream(fd) else {
                throw ProxyError("sandbox \(spec.sandbox): the descriptor that came with addSandbox is not a listening unix stream socket")
            }
        } else {
            guard spec.socketPath.hasPrefix("/"), spec.socketPath.utf8.count < 100 else {
                throw ProxyError("socketPath must be an absolute path shorter than 100 bytes")
            }
            let directory = UnixSocket.directory(of: spec.socketPath)
            try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            // Who may connect is decided by the directory's permissions (agentd's per-sandbox
            // directory); the socket itself is open to the sandbox user.
            descriptor = try UnixSocket.listen(path: spec.socketPath, mode: 0o666, backlog: 128)
        }
        let ownsSocketFile = listener == nil
        let configuration = core.configuration
        let bootstrap = ServerBootstrap(group: core.group)
            .serverChannelOption(.backlog, value: 128)
            .childChannelOption(.autoRead, value: false)
            // A unix socket queues only its send buffer (208 KiB by default): with 2 MiB a
            // download reaches the sandbox in fewer, larger writes and wake-ups (`make bench`).
            .childChannelOption(.socketOption(.so_sndbuf), value: 2 << 20)
            .childChannelInitializer { channel in
                let admitted = context.connections.withLockedValue { open in
                    guard open.count < configuration.maxConnectionsPerListener else { return false }
                    open[ObjectIdentifier(channel)] = channel
                    return true
                }
                guard admitted else {
                    context.proxy.logger.warning("sandbox \(spec.sandbox): connection limit \(configuration.maxConnectionsPerListener) reached; closing a new connection")
                    return channel.close()
                }
                channel.closeFuture.whenComplete { _ in _ = context.connections.withLockedValue { $0.removeValue(forKey: ObjectIdentifier(channel)) } }
                return channel.eventLoop.makeCompletedFuture {
                    let decoder = ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes))
                    let encoder = HTTPResponseEncoder()
                    try channel.pipeline.syncOperations.addHandlers([
                        IdleStateHandler(allTimeout: configuration.idleTimeout),
                        decoder,
                        encoder,
                        ClientHandler(context: context, decoder: decoder, encoder: encoder),
                    ])
                }
            }
        // The channel owns the descriptor from here on (and closes it, also on failure).
        let fd = descriptor!
        descriptor = nil
        let channel: any Channel
        do {
            channel = try await bootstrap.withBoundSocket(fd).get()
        } catch {
            if ownsSocketFile { unlink(spec.socketPath) }
            throw ProxyError("sandbox \(spec.sandbox): cannot serve its listening socket: \(error)")
        }
        let raced = listeners.withLockedValue { current -> Bool in
            guard current[spec.sandbox] == nil else { return true }
            current[spec.sandbox] = Entry(context: context, channel: channel, ownsSocketFile: ownsSocketFile)
            return false
        }
        if raced {
            try? await channel.close()
            throw ProxyError("sandbox \(spec.sandbox) already has a listener; remove it first")
        }
        core.logger.info("sandbox \(spec.sandbox): listening on \(spec.socketPath)\(ownsSocketFile ? "" : " (agentd's socket)") (policy \(spec.policy), routes \(spec.routes.map(\.name)), \(spec.network.allowHosts.count) allowed hosts)")
    }

    /// Stops `sandbox`'s listener and removes its socket (if the proxy bound it); open
    /// connections, and its idle upstream connections, are closed.
    public func removeSandbox(_ sandbox: String) async throws {
        guard let entry = listeners.withLockedValue({ $0.removeValue(forKey: sandbox) }) else {
            throw ProxyError("no sandbox \(sandbox)")
        }
        try? await entry.channel.close()
        for connection in entry.context.connections.withLockedValue({ Array($0.values) }) { connection.close(promise: nil) }
        entry.context.pool.closeAll()
        if entry.ownsSocketFile { unlink(entry.context.spec.socketPath) }
        core.logger.info("sandbox \(sandbox): listener removed")
    }

    /// The task and the `tool.intent` seq the next decisions of `sandbox` are attributed to.
    public func setIntent(sandbox: String, task: String?, seq: Int64?) throws {
        guard let context = listeners.withLockedValue({ $0[sandbox]?.context }) else { throw ProxyError("no sandbox \(sandbox)") }
        context.intent.withLockedValue { $0 = (task ?? $0.task, seq) }
    }

    /// How many connections `sandbox`'s listener holds open now (0 without a listener).
    public func openConnections(sandbox: String) -> Int {
        listeners.withLockedValue { $0[sandbox]?.context }?.connections.withLockedValue { $0.count } ?? 0
    }

    /// How many idle upstream connections `sandbox`'s routes keep for reuse now.
    public func idleUpstreamConnections(sandbox: String) -> Int {
        listeners.withLockedValue { $0[sandbox]?.context }?.pool.idleCount ?? 0
    }

    /// The sandboxes with listeners.
    public var sandboxes: [String] { listeners.withLockedValue { Array($0.keys).sorted() } }

    /// Closes every listener.
    public func shutdown() async {
        let all = listeners.withLockedValue { current in
            defer { current = [:] }
            return Array(current.values)
        }
        for entry in all {
            try? await entry.channel.close()
            entry.context.pool.closeAll()
            if entry.ownsSocketFile { unlink(entry.context.spec.socketPath) }
        }
    }
}

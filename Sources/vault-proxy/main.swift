import ArgumentParser
import Logging
import NIOPosix
import VaultProxy

/// vault-proxy: the egress proxy agentd starts for its sandboxes. Wiring only: the logic is
/// in the VaultProxy module (see its README for the control channel's messages).
@main
struct VaultProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vault-proxy",
        abstract: "Egress proxy for agentd sandboxes: routes with credentials the sandbox never holds, allowlisted CONNECT.",
        discussion: """
            Commands arrive on the control channel as newline-delimited JSON (credentials, addSandbox, \
            removeSandbox, setIntent); answers and egress events go back on it. Credentials never come \
            through arguments or the environment. The channel is an inherited descriptor (--control-fd) or \
            a connection to agentd's control socket (--control-socket, when agentd runs the proxy as a \
            systemd unit). Exit status \(unreachableStatus): the control socket could not be reached \
            (agentd is gone; systemd does not restart the unit for it).
            """)

    /// The exit status when `--control-socket` cannot be connected to.
    static let unreachableStatus: Int32 = 3

    @Option(name: .customLong("control-fd"), help: "Descriptor of the control channel (a socket); 0 reads stdin and writes stdout.")
    var controlFD: Int32 = 0

    @Option(name: .customLong("control-socket"), help: "Connect to agentd's control socket at this path instead of using --control-fd.")
    var controlSocket: String?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Option(name: .customLong("idle-timeout"), help: "Seconds without traffic before a connection is closed.")
    var idleTimeout: Int64 = 300

    @Option(name: .customLong("max-connections"), help: "Open connections per sandbox listener.")
    var maxConnections: Int = 128

    @Option(
        name: .customLong("trust-resolve"),
        help: "TEST ONLY: NAME=IP makes CONNECT to NAME dial IP without the address check (repeatable).")
    var trustResolve: [String] = []

    func run() async throws {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var configuration = ProxyConfiguration()
        configuration.idleTimeout = .seconds(idleTimeout)
        configuration.maxConnectionsPerListener = maxConnections
        for entry in trustResolve {
            let parts = entry.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let name = HostName.canonical(parts[0]), let address = IPAddress(literal: parts[1]) else {
                throw ValidationError("--trust-resolve wants NAME=IP, got '\(entry)'")
            }
            configuration.trustedOverrides[name, default: []].append(address)
        }
        let logger = Logger(label: "vault-proxy")
        var input = controlFD
        var output = controlFD == 0 ? 1 : controlFD
        if let controlSocket {
            guard controlFD == 0 else { throw ValidationError("give --control-fd or --control-socket, not both") }
            do {
                input = try UnixSocket.connect(path: controlSocket)
            } catch {
                logger.error("\(error)")
                throw ExitCode(Self.unreachableStatus)
            }
            output = input
        }
        try await ControlChannel.run(
            input: input, output: output, group: MultiThreadedEventLoopGroup.singleton, configuration: configuration, logger: logger)
    }
}

import ArgumentParser
import EgressProxy
import EngineAPI
import Fleet
import Foundation
import Hands
import Logging
import Policy
import PostgresStore
import Runtime
import Service
import ServiceLifecycle
import SessionLog
import SystemdBus
import Vault
import VaultProxy

/// `agentd serve` (the default subcommand): the host service. Wires the Session journal, the
/// Hands, the policies and the API together; all logic lives in the modules.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the host service: sessions, on-demand sandboxes (Hands), policies, and the API for Brains (the default).",
        discussion: """
            agentd keeps every session in an append-only journal under --state-dir, provisions a sandbox per task \
            on the first tool call (through the container engine's Docker API), and serves an HTTP/JSON API on a \
            unix socket. Policies are YAML files in --policies; SIGHUP or a file change reloads them.

            Environment: AGENTD_ENGINE (container engine address, e.g. unix:///run/podman/podman.sock), \
            AGENTD_TOKEN (bearer token for --listen-tcp).
            """)

    @Option(help: "Directory for the journal and agentd's own state (systemd: $STATE_DIRECTORY).")
    var stateDir: String = ProcessInfo.processInfo.environment["STATE_DIRECTORY"] ?? "/var/lib/agentd"

    @Option(help: "Path of the API's unix socket (mode 0660). Ignored when systemd passes a socket.")
    var socket: String = "/run/agentd/agentd.sock"

    @Option(help: "Directory of policy files (*.yaml).")
    var policies: String = "/etc/agentd/policies"

    @Option(help: "Container engine address (unix:///path or tcp://host:port); default $AGENTD_ENGINE or unix:///run/podman/podman.sock.")
    var engine: String?

    @Option(help: "systemd manager for unit Hands: `system`, or unix:path=…/systemd/private; default $AGENTD_SYSTEMD, or the system bus when booted with systemd. Without one, policies with `driver: unit` are refused.")
    var systemd: String?

    @Option(help: "Also listen on TCP at HOST:PORT; requests must carry `Authorization: Bearer $AGENTD_TOKEN`.")
    var listenTCP: String?

    @Option(help: "Most sandboxes this agentd runs at once, live and warm (pooled) alike; 0 for no limit. A call that needs one more gets an error result.")
    var maxSandboxes: Int = 64

    @Option(help: "Most memory the sandboxes' limits may add up to, live and warm alike: a share of the host's RAM (75%), a size (16GiB), or 0 for no limit.")
    var sandboxMemory: String = "75%"

    @Option(help: "Host uids (each also the gid) given to sandboxes, one of its own per sandbox: FIRST-LAST, within 65536-4294967294 and used by nothing else on the host.")
    var sandboxUids: String = "\(SandboxUIDs.defaultRange.lowerBound)-\(SandboxUIDs.defaultRange.upperBound)"

    @Option(help: "The sandbox agent's static executable, every sandbox's PID 1; default agentd-sandbox-agent next to agentd's own executable.")
    var sandboxAgent: String?

    @Option(help: "The vault-proxy executable, through which sandboxes of `network.mode: proxy` policies reach out with credentials they never hold; default vault-proxy next to agentd's own executable.")
    var vaultProxy: String?

    @Option(help: "The uid the vault-proxy runs as when it is a systemd unit (its own, outside --sandbox-uids and used by nothing else).")
    var vaultProxyUid: UInt32 = ProxySupervisor.SystemdUnit.defaultUID

    @Option(help: "Where agentd listens for the vault-proxy unit's control connection; default <dir>/<instance>.sock with <dir> $AGENTD_VAULT_PROXY_DIR or /run/agentd-vault-proxy (made 0755; not under /tmp or a home: the unit's are private).")
    var vaultProxyControl: String?

    @Option(help: "Free space (MiB) kept for the journal on the state directory's disk: a workspace is refused when it would leave less.")
    var workspaceReserveMib: Int = WorkspaceImages.defaultReserveBytes >> 20

    @OptionGroup(title: "Session store")
    var store: StoreOptions

    @Option(help: "With --store postgres: this node's name in the fleet (1-63 of a-z 0-9 -); default the host's name. Each node of a fleet needs its own name and state directory.")
    var node: String?

    @Option(help: "With --store postgres: the address other nodes send clients to for the sessions this node serves: unix:///PATH or http://HOST:PORT; default unix:// and the --socket path.")
    var advertise: String?

    @Option(help: "With --store postgres: how often this node writes its heartbeat to the store (e.g. 2s, 500ms).")
    var heartbeatInterval = "2s"

    @Option(help: "With --store postgres: how long a heartbeat keeps this node live (at least three intervals); once it runs out, other nodes take its sessions over.")
    var nodeLease = "10s"

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    @Option(help: "Delete sessions idle longer than this (e.g. 30d, 12h, 90m); default off. The journal keeps their events and records the deletion.")
    var retention: String?

    func run() async throws {
        CurlTransport.globalInit()
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "agentd")
        let environment = ProcessInfo.processInfo.environment
        ProcessLimits.raiseOpenFiles(logger: logger)

        let retentionPeriod: Duration?
        do { retentionPeriod = try retention.map(RetentionService.parsePeriod) } catch { throw ValidationError("--retention: \(error)") }
        // State directory (private to agentd, whatever the umask) and this installation's
        // instance id (labels its sandboxes).
        try FileManager.default.createDirectory(atPath: stateDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let instance = try Self.instanceID(stateDir: stateDir)

        // Policies, and the credential values they name (only to keep them off the disk).
        let policyStore = PolicyStore(directory: policies, logger: Logger(label: "agentd.policy"))
        let set = await policyStore.current
        for d in set.diagnostics { logger.error("\(d.description)") }
        guard !set.names.isEmpty else {
            throw ValidationError("no valid policy in \(policies); fix the errors above or pass --policies DIR (the repository ships policies/)")
        }

        // The journal. Its event ceiling covers the largest limit any policy may set; each
        // session's own policy limit is enforced by the runtime.
        let store = try await self.store.open(stateDir: stateDir, environment: environment)
        // In a fleet (the store is PostgreSQL): this node's heartbeats, and which node serves
        // which session, kept in the store.
        let fleet = try await joinFleet(store: store, instance: instance, logger: logger)
        // Heartbeats start now, not with the API: restoring sandboxes may take longer than the
        // lease, and the node must be live when its API first answers.
        let heartbeats = fleet.map { fleet in Task { await fleet.run() } }
        // Credentials of the policies in force go to the redactor now and after every reload.
        let registrar = CredentialRegistrar(
            resolver: CredentialResolver(environment: environment), redactor: store.redactor, logger: Logger(label: "agentd.vault"))
        await registrar.sync(policyStore)

        // Hands on the container engine.
        let engineAddress = engine ?? environment[EngineEndpoint.environmentVariable] ?? "unix:///run/podman/podman.sock"
        var client = EngineClient(endpoint: try EngineEndpoint(parsing: engineAddress))
        do {
            client = try await client.negotiated()
        } catch {
            logger.warning("the container engine does not answer yet; tool calls will return errors until it does", metadata: ["error": "\(error)"])
        }
        // Workspaces (a filesystem per sandbox, owned by a uid of the sandbox's own), shared by
        // both drivers so that one range serves them.
        guard (0...(1 << 30)).contains(workspaceReserveMib) else {
            throw ValidationError("--workspace-reserve-mib takes 0 to \(1 << 30), not \(workspaceReserveMib)")
        }
        let uids: SandboxUIDs
        do { uids = try SandboxUIDs(range: SandboxUIDs.parseRange(sandboxUids)) } catch { throw ValidationError("--sandbox-uids: \(error)") }
        let workspaces = try WorkspaceImages(directory: stateDir + "/hands/workspaces", uids: uids, reserveBytes: workspaceReserveMib << 20)
        // The sandbox agent: its executable and each sandbox's socket directory.
        let agent: AgentHands
        do { agent = try AgentHands(executable: sandboxAgent, directory: stateDir + "/hands/agents") } catch { throw ValidationError("\(error)") }
        do { try agent.checkExecutable() } catch {
            logger.warning("no sandbox agent: every tool call will return an error until it is there", metadata: ["error": "\(error)"])
        }
        let containers = ContainerDriver(engine: client, instance: instance, workspaces: workspaces, agent: agent)
        // Hands as systemd transient units, when a manager is there.
        var drivers: [any HandsDriver] = [containers]
        let systemdAddress = try systemd.map { try SystemdAddress(parsing: $0) } ?? (try? SystemdAddress.fromEnvironment(environment))
        var manager: SystemdManager?
        if let systemdAddress {
            do {
                let m = try await SystemdManager.connect(systemdAddress)
                drivers.append(try UnitDriver(manager: m, instance: instance, stateDirectory: stateDir + "/hands", agent: agent, workspaces: workspaces))
                manager = m
            } catch {
                logger.warning("no systemd manager: policies with `driver: unit` will be refused", metadata: ["error": "\(error)"])
            }
        }
        let recorder = HandsEventForwarder()
        // The vault-proxy: every proxy-mode sandbox's only way out. Credentials reach it over
        // its private channel only.
        let credentials = ProxyCredentials(resolver: CredentialResolver(environment: environment))
        credentials.update(set)
        let proxyPath = vaultProxy ?? (URL(fileURLWithPath: AgentHands.defaultExecutable()).deletingLastPathComponent().appendingPathComponent("vault-proxy").path)
        guard !uids.range.contains(Int(vaultProxyUid)) else {
            throw ValidationError("--vault-proxy-uid \(vaultProxyUid) lies inside --sandbox-uids \(sandboxUids); the proxy needs a uid no sandbox gets")
        }
        // A hardened transient unit when there is a manager, else (or when it cannot start) a
        // supervised child.
        let makeSupervisor = { (unit: ProxySupervisor.SystemdUnit?) in
            ProxySupervisor(
                executable: proxyPath, unit: unit, credentials: { credentials.all }, onEgress: { event in Task { await recorder.forward(event) } },
                onChange: { change in logger.info("vault-proxy", metadata: ["change": "\(change)"]) }, logger: Logger(label: "agentd.egress"))
        }
        var unit: ProxySupervisor.SystemdUnit?
        if let manager {
            let control = vaultProxyControl ?? "\(environment["AGENTD_VAULT_PROXY_DIR"] ?? "/run/agentd-vault-proxy")/\(instance).sock"
            try? FileManager.default.createDirectory(
                atPath: (control as NSString).deletingLastPathComponent, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            unit = ProxySupervisor.SystemdUnit(manager: manager, instance: instance, controlSocket: control, uid: vaultProxyUid)
        }
        let supervisor = await ProxySupervisor.startPreferringUnit(unit, make: makeSupervisor, logger: logger)
        let network = SandboxNetwork(
            supervisor: supervisor, agent: agent, policy: { await policyStore.policy(named: $0) }, workspaces: workspaces, credentials: credentials)
        guard maxSandboxes >= 0 else { throw ValidationError("--max-sandboxes takes a number of sandboxes, or 0 for no limit; not \(maxSandboxes)") }
        let budget: (bytes: Int?, source: String)
        do {
            budget = try HostLimits.memoryBudget(sandboxMemory, hostMemory: HostLimits.hostMemoryBytes(), parseSize: PolicyUnits.size)
        } catch let error as HandsError {
            throw ValidationError("--sandbox-memory: \(error.message)")
        }
        let limits = HostLimits(maxSandboxes: maxSandboxes == 0 ? nil : maxSandboxes, memoryBytes: budget.bytes, memorySource: budget.source)
        let hands = HandsManager(
            driver: DriverRouter(drivers), instance: instance, limits: limits, attachments: network, logger: Logger(label: "agentd.hands"),
            onEvent: { await recorder.forward($0) })
        let runtime = Runtime(
            store: store, hands: hands, policies: policyStore, images: containers,
            refreshSecrets: { await registrar.sync(policyStore) }, fleet: fleet, logger: Logger(label: "agentd.runtime"))
        await recorder.attach(runtime)
        // Live restore: the sandboxes of tasks still live in the journal are taken over (with
        // their workspaces), the rest removed; then what no sandbox uses is unmounted.
        do {
            let restored = try await runtime.restoreHands()
            await workspaces.sweep()
            agent.sweep(keeping: Set(restored.adopted.compactMap(\.agent)))
            logger.info(
                "sandboxes left by a previous run restored", metadata: ["adopted": "\(restored.adopted.count)", "removed": "\(restored.removed.count)"])
        } catch {
            logger.warning("restoring sandboxes at start failed; the housekeeping loop retries", metadata: ["error": "\(error)"])
        }
        // Pools start after the restore: their first sandboxes are not orphans to remove.
        await runtime.applyPoolTargets()
        let api = API(runtime: runtime, metrics: Metrics(), logger: Logger(label: "agentd.api"))

        // Socket activation: systemd passes the listening socket (units/agentd.socket).
        let inherited = try SocketActivation.listenFDs()
        var listeners: [Listener] = inherited.isEmpty ? [.unixSocket(path: socket)] : inherited.map { .inherited(fd: $0) }
        if let tcp = listenTCP {
            guard let token = environment["AGENTD_TOKEN"], token.count >= 16 else {
                throw ValidationError("--listen-tcp needs a bearer token of at least 16 characters in AGENTD_TOKEN")
            }
            let parts = tcp.split(separator: ":")
            guard parts.count == 2, let port = Int(parts[1]) else { throw ValidationError("--listen-tcp takes HOST:PORT, not '\(tcp)'") }
            listeners.append(.tcp(host: String(parts[0]), port: port, token: token))
        }
        if inherited.isEmpty {
            try FileManager.default.createDirectory(atPath: (socket as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        }
        let server = HTTPServer(
            listeners: listeners, spool: API.uploadSpool(directory: stateDir + "/uploads"), logger: Logger(label: "agentd.http")
        ) { await api.handle($0) }

        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
            .init(service: server),
            .init(service: HandsMaintenance(hands: hands, logger: logger)),
            .init(
                service: PolicyReloader(store: policyStore, logger: logger) {
                    await registrar.sync(policyStore)
                    await runtime.applyPoolTargets()
                }),
            .init(service: SystemdReadiness(server: server, status: "serving \(set.names.count) policies", logger: logger)),
            .init(service: StartupTrimService(server: server, logger: logger)),
        ]
        if let retentionPeriod { services.append(.init(service: RetentionService(runtime: runtime, idle: retentionPeriod, logger: logger))) }
        let group = ServiceGroup(
            configuration: .init(
                services: services,
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        logger.info("agentd started", metadata: ["state-dir": "\(stateDir)", "instance": "\(instance)", "engine": "\(client.endpoint)"])
        // Clean-up runs however the group ends, a service's error included: sandboxes are
        // released and the journal's index is written.
        let failure: (any Error)?
        do {
            try await group.run()
            failure = nil
        } catch {
            logger.error("a service failed; stopping", metadata: ["error": "\(error)"])
            failure = error
        }
        logger.info("stopping: releasing sandboxes and closing the journal")
        await hands.shutdown()
        heartbeats?.cancel()
        await heartbeats?.value
        await fleet?.leave()
        await supervisor?.stopAndWait()
        manager?.close()
        do {
            try await store.close()
        } catch {
            logger.error("closing the journal failed", metadata: ["error": "\(error)"])
            if failure == nil { throw error }
        }
        if let failure { throw failure }
    }

    /// The instance id kept in the state directory: sandboxes are labelled with it, so that a
    /// restarted agentd finds (and removes) what its predecessor left.
    /// With the PostgreSQL store: this node's membership in the fleet, after its first
    /// heartbeat (a name held by another live node is refused here). Nil with the file store.
    func joinFleet(store: any SessionJournal, instance: String, logger: Logger) async throws -> FleetNode? {
        guard let journal = store as? PostgresJournal else {
            if node != nil || advertise != nil {
                throw ValidationError("--node and --advertise take effect with --store postgres only: a fleet's nodes share their sessions through PostgreSQL")
            }
            return nil
        }
        let interval: Duration, lease: Duration
        do { interval = try FleetNode.parseDuration(heartbeatInterval) } catch { throw ValidationError("--heartbeat-interval \(error)") }
        do { lease = try FleetNode.parseDuration(nodeLease) } catch { throw ValidationError("--node-lease \(error)") }
        let name = node ?? FleetNode.defaultName()
        let address = advertise ?? "unix://" + URL(fileURLWithPath: socket).standardizedFileURL.path
        guard address.hasPrefix("unix:///") || address.hasPrefix("http://") || address.hasPrefix("https://") else {
            throw ValidationError("--advertise takes unix:///PATH or http://HOST:PORT, not '\(address)'")
        }
        let fleet: FleetNode
        do {
            fleet = try FleetNode(
                registration: NodeRegistration(name: name, address: address, instance: instance, interval: interval, lease: lease),
                registry: PostgresFleetRegistry(journal: journal), logger: Logger(label: "agentd.fleet"))
            try await fleet.beat()
        } catch let error as FleetError {
            try? await store.close()
            throw ValidationError(error.code == .invalidArgument ? "--node/--node-lease: \(error.message)" : error.message)
        }
        let live = await fleet.nodes.filter(\.live).count
        logger.info("joined the fleet", metadata: ["node": "\(name)", "address": "\(address)", "live-nodes": "\(live)"])
        return fleet
    }

    static func instanceID(stateDir: String) throws -> String {
        let path = stateDir + "/instance"
        if let text = try? String(contentsOfFile: path, encoding: .utf8) {
            let id = text.trimmingCharacters(in: .whitespacesAndNewlines)
            if !id.isEmpty { return id }
        }
        let id = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        try id.write(toFile: path, atomically: true, encoding: .utf8)
        return id
    }
}

/// Forwards Hands events to the runtime once it exists (the runtime needs the Hands first).
actor HandsEventForwarder {
    private var runtime: Runtime?
    func attach(_ runtime: Runtime) { self.runtime = runtime }
    func forward(_ event: HandsEvent) async { await runtime?.record(event) }
    /// Journals one of the vault-proxy's decisions in the sandbox's session.
    func forward(_ event: EgressEvent) async {
        await runtime?.recordEgress(
            session: event.session, allowed: event.type == EventType.egressAllowed,
            EgressDecision(
                task: event.task, intent_seq: event.toolIntentSeq.flatMap { UInt64(exactly: $0) }, sandbox: event.sandbox, method: event.method,
                host: event.host, route: event.route, path: event.path, credential: event.credential, rule: event.rule, status: event.status,
                bytes_up: event.bytesUp, bytes_down: event.bytesDown, duration_ms: event.durationMs))
    }
}

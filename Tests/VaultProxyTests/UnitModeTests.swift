import EgressProxy
import Foundation
import Logging
import NIOConcurrencyHelpers
import SystemdBus
import Testing
import TestSupport

@testable import VaultProxy

/// The supervisor with a real systemd manager ($AGENTD_SYSTEMD): the proxy runs as a hardened
/// transient unit of its own uid, connects to agentd's control socket and is checked before it
/// gets anything; no credential is in the unit's properties, its environment or its command
/// line; killed with -9 it fails closed and systemd restarts it; an impostor gets nothing.
@Suite(.serialized) struct UnitModeTests {
    /// A directory for the control socket that the proxy's uid can reach and its unit sees
    /// (not /tmp: the unit's /tmp is private).
    final class ControlDirectory: @unchecked Sendable {
        let path: String
        init() throws {
            let base = Components.envDirectory ?? "/run"
            path = base + "/vp-" + Components.testID()
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            chmod(path, 0o755)
        }
        deinit { try? FileManager.default.removeItem(atPath: path) }
    }

    static func unit(_ manager: SystemdManager, _ control: ControlDirectory, restartDelay: Duration = .seconds(1)) -> ProxySupervisor.SystemdUnit {
        ProxySupervisor.SystemdUnit(
            manager: manager, instance: "test-" + Components.testID(), controlSocket: control.path + "/control.sock", restartDelay: restartDelay)
    }

    /// Every property of the unit as the manager reports it (what `systemctl show` prints).
    static func allProperties(_ manager: SystemdManager, _ unit: String) async throws -> [String: BusValue] {
        let path = SystemdManager.unitPath(unit)
        var all: [String: BusValue] = [:]
        for interface in ["org.freedesktop.systemd1.Unit", "org.freedesktop.systemd1.Service"] {
            all.merge(try await manager.properties(path: path, interface: interface)) { a, _ in a }
        }
        return all
    }

    static func isEmptyArray(_ value: BusValue?) -> Bool {
        switch value {
        case .array(_, let items)?: items.isEmpty
        case .variant(let inner)?: isEmptyArray(inner)
        default: false
        }
    }

    @Test func hardenedUnitServesFailsClosedAndRefusesImpostors() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let binary = try SupervisorTests.binary
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let dir = try TempDir()
        let control = try ControlDirectory()
        let unit = Self.unit(manager, control)
        let events = EventCollector()
        let lines = NIOLockedValueBox<[String]>([])
        let logger = Logger(label: "agentd.egress") { _ in CapturingLogHandler(lines: lines) }
        let (changes, changeSink) = AsyncStream.makeStream(of: ProxySupervisor.Change.self)
        let canary = ProxyFixture.canary
        let supervisor = ProxySupervisor(
            executable: binary, unit: unit, credentials: { ["canary": canary] }, onEgress: { events.receive($0) },
            onChange: { changeSink.yield($0) }, logger: logger)
        try await supervisor.start()
        do {
            let spec = SandboxSpec(
                sandbox: "sb-1", session: "sess-1", task: "task-1", policy: "coding-agent", socketPath: dir.path + "/sb-1/proxy.sock",
                network: NetworkRules(allowHosts: ["allowed.example"]),
                routes: [RouteRule(name: "echo", upstream: "https://127.0.0.1:\(upstream.port)", credential: "canary", caFile: upstream.ca.caFile)])
            try await supervisor.addSandbox(spec)
            let first = try routeGet(spec.socketPath)
            #expect(first.hasPrefix("HTTP/1.1 200") && first.contains("[REDACTED:canary]"), "\(first.prefix(300))")
            _ = await events.first { $0.type == "egress.allowed" && $0.sandbox == "sb-1" }

            // The unit: hardened, its own uid, and no credential anywhere systemd shows.
            let status = try await manager.unitProperties(unit.name)
            #expect(status.activeState == "active")
            let pid = supervisor.pid
            #expect(pid > 0 && status.mainPID == UInt32(pid), "the peer agentd accepted is the unit's main process")
            let properties = try await Self.allProperties(manager, unit.name)
            let shown = properties.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: "\n")
            for form in canaryForms() { #expect(!shown.contains(form), "a unit property holds the credential") }
            #expect(properties["User"]?.stringValue == String(ProxySupervisor.SystemdUnit.defaultUID))
            #expect(properties["ProtectSystem"]?.stringValue == "strict")
            #expect(properties["ProtectHome"]?.stringValue == "tmpfs")
            #expect(properties["NoNewPrivileges"]?.boolValue == true)
            #expect(properties["PrivateTmp"]?.boolValue == true && properties["PrivateDevices"]?.boolValue == true)
            #expect(properties["CapabilityBoundingSet"]?.uint64Value == 0)
            #expect(properties["MemoryMax"]?.uint64Value == 256 << 20)
            #expect(properties["Restart"]?.stringValue == "always")
            #expect(Self.isEmptyArray(properties["ReadWritePaths"]), "no writable path: \(String(describing: properties["ReadWritePaths"]))")
            let environ = try String(decoding: Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/environ")), as: UTF8.self)
            let cmdline = try String(decoding: Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline")), as: UTF8.self)
            for form in canaryForms() {
                #expect(!environ.contains(form), "the proxy's environment holds the credential")
                #expect(!cmdline.contains(form), "the proxy's command line holds the credential")
            }
            #expect(cmdline.contains("--control-socket"))
            let procStatus = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
            let uidLine = procStatus.split(separator: "\n").first { $0.hasPrefix("Uid:") }.map(String.init) ?? ""
            #expect(uidLine.split(whereSeparator: \.isWhitespace).dropFirst().allSatisfy { $0 == "\(unit.uid)" }, "\(uidLine)")

            // Impostors on the control socket: root outside the unit, and the proxy's own uid
            // outside the unit. Each is closed at once and gets no byte (curl fails: an empty
            // reply, a reset or broken pipe, or a failed connect when the close beat its check);
            // agentd's log says it refused both.
            for prefix in [[String](), ["setpriv", "--reuid=\(unit.uid)", "--regid=\(unit.uid)", "--clear-groups"]] {
                let r = try run(prefix + ["/usr/bin/curl", "-sS", "--max-time", "10", "--unix-socket", unit.controlSocket, "http://control/"])
                #expect(r.status != 0 && r.out.isEmpty, "impostor \(prefix): curl \(r.status), \(r.out.count) bytes, \(r.err)")
            }
            let refusals = { lines.withLockedValue { $0 }.filter { $0.contains("refused a connection to the proxy's control socket") } }
            let bothLogged = await eventually(.seconds(30)) { refusals().count == 2 }
            #expect(bothLogged, "\(refusals())")
            let undisturbed = try routeGet(spec.socketPath)
            #expect(supervisor.pid == pid && undisturbed.hasPrefix("HTTP/1.1 200"), "the proxy is undisturbed")

            // Killed: the request fails at once; while it is down the socket is gone; systemd
            // restarts it and the next request works.
            let generation = supervisor.generation
            kill(pid, SIGKILL)
            try expectFailsAtOnce(spec.socketPath)
            for await change in changes {
                if case .exited = change { break }
            }
            #expect(throws: ProxyError.self, "nothing listens while the proxy is down") { try routeGet(spec.socketPath) }
            await supervisor.waitForGeneration(atLeast: generation + 1)
            #expect(supervisor.pid != pid && supervisor.pid > 0)
            let again = try routeGet(spec.socketPath)
            #expect(again.hasPrefix("HTTP/1.1 200") && again.contains("[REDACTED:canary]"), "\(again.prefix(300))")
            #expect(try await manager.unitProperties(unit.name).restarts >= 1, "systemd restarted it")

            let logged = lines.withLockedValue { $0 }.joined(separator: "\n")
            for form in canaryForms() { #expect(!logged.contains(form), "no credential in agentd's log") }
        } catch {
            await supervisor.stopAndWait()
            throw error
        }
        await supervisor.stopAndWait()
        let after = try await manager.unitProperties(unit.name)
        #expect(after.activeState != "active", "the unit outlived stop: \(after.activeState)")
        #expect(!FileManager.default.fileExists(atPath: unit.controlSocket))
    }

    @Test func unitThatNeverConnectsFailsStartAndIsStopped() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let control = try ControlDirectory()
        let script = try silentProxy(in: control.path)
        let unit = Self.unit(manager, control)
        let supervisor = ProxySupervisor(
            executable: script.path, unit: unit, startTimeout: .seconds(2), credentials: { ["canary": ProxyFixture.canary] }, onEgress: { _ in })
        let began = ContinuousClock.now
        let error = await #expect(throws: (any Error).self) { try await supervisor.start() }
        #expect(ContinuousClock.now - began < .seconds(20))
        let message = "\(error.map { "\($0)" } ?? "")"
        #expect(message.contains("did not answer its startup messages within 2") && message.contains(unit.name), "\(message)")
        let after = try await manager.unitProperties(unit.name)
        #expect(after.activeState != "active", "the unit outlived the failed start: \(after.activeState)")
    }

    @Test func unitWhoseStartFailsIsNotLeftRestarting() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let control = try ControlDirectory()
        let broken = control.path + "/broken-proxy"
        try "#!/nonexistent/interpreter\n".write(toFile: broken, atomically: true, encoding: .utf8)
        chmod(broken, 0o755)
        let unit = Self.unit(manager, control)
        let supervisor = ProxySupervisor(executable: broken, unit: unit, credentials: { [:] }, onEgress: { _ in })
        let error = await #expect(throws: (any Error).self) { try await supervisor.start() }
        #expect("\(error.map { "\($0)" } ?? "")".contains("exit status 203"), "\(error.map { "\($0)" } ?? "")")
        let after = try await manager.unitProperties(unit.name)
        #expect(after.loadState != "loaded" || after.activeState == "inactive", "\(after.activeState)/\(after.subState)")
        #expect(!FileManager.default.fileExists(atPath: unit.controlSocket))
    }

    @Test func controlSocketTheProxyCannotReachIsRefusedBeforeStarting() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let unit = ProxySupervisor.SystemdUnit(manager: manager, instance: "test-" + Components.testID(), controlSocket: "/tmp/vp-\(Components.testID()).sock")
        let supervisor = ProxySupervisor(executable: try SupervisorTests.binary, unit: unit, credentials: { [:] }, onEgress: { _ in })
        let error = await #expect(throws: (any Error).self) { try await supervisor.start() }
        #expect("\(error.map { "\($0)" } ?? "")".contains("PrivateTmp"))
        #expect(try await manager.unitProperties(unit.name).loadState != "loaded")
    }
}

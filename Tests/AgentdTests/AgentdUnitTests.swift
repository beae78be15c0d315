import AgentdClient
import AgentdTestSupport
import EngineAPI
import Foundation
import SystemdBus
import Testing
import TestSupport

/// agentd itself under the real systemd manager: Type=notify readiness, the watchdog, and
/// socket activation (as `units/agentd.service` and `units/agentd.socket` run it).
@Suite("agentd as a systemd unit")
struct AgentdUnitTests {
    struct Setup {
        let directory: String
        let socket: String
        let binary: String
        var arguments: [String] { [binary, "--state-dir", directory + "/state", "--socket", socket, "--policies", AgentdProcess.policiesDirectory] }
        var environment: UnitProperty {
            .strings("Environment", ["AGENTD_ENGINE=\(ProcessInfo.processInfo.environment["AGENTD_ENGINE"] ?? "")"])
        }
        /// agentd's stdout and stderr go to a file (no journald here).
        var output: [UnitProperty] { [.string("StandardOutputFileToAppend", directory + "/agentd.log"), .string("StandardErrorFileToAppend", directory + "/agentd.log")] }
        var log: String { (try? String(contentsOfFile: directory + "/agentd.log", encoding: .utf8)) ?? "" }
        var client: AgentdClient {
            CurlTransport.globalInit()
            return AgentdClient(socket: socket)
        }

        init() throws {
            directory = "/tmp/agentd-unit-\(Components.testID())"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            socket = directory + "/agentd.sock"
            binary = Components.buildProductsDirectory.appendingPathComponent("agentd").path
            guard FileManager.default.isExecutableFile(atPath: binary) else {
                throw Components.Missing(description: "agentd is not built at \(binary)")
            }
        }
    }

    /// Runs `body`, then stops the units and resets their failure state, whatever happens.
    func withUnits(_ manager: SystemdManager, _ units: [String], _ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch {
            for u in units { _ = try? await manager.stopUnitAndWait(u); try? await manager.resetFailedUnit(u) }
            throw error
        }
        for u in units { _ = try? await manager.stopUnitAndWait(u); try? await manager.resetFailedUnit(u) }
    }

    @Test("agentd reaches active only after READY=1, and its API answers by then; SIGTERM stops it cleanly")
    func readiness() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let setup = try Setup()
        let unit = "agentd-test-agentd-\(Components.testID()).service"
        try await withUnits(manager, [unit]) {
            let job = try await manager.startTransientUnit(
                unit, properties: [.execStart(setup.arguments), .string("Type", "notify"), setup.environment] + setup.output, timeout: .seconds(60))
            // For Type=notify the start job completes only once READY=1 arrived.
            #expect(job == "done")
            let status = try await manager.unitProperties(unit)
            #expect(status.activeState == "active", "\(status); log: \(setup.log)")
            // READY is sent after the socket is listening: the API answers right away.
            #expect(try await setup.client.get("/v1/health", timeout: .seconds(5))["status"] as? String == "ok")
            _ = try await manager.stopUnitAndWait(unit)
            let after = try await manager.unitProperties(unit)
            #expect(after.result == "success" || after.loadState == "not-found", "\(after)")
        }
    }

    @Test("a stalled agentd (SIGSTOP) misses its watchdog and is restarted by systemd")
    func watchdog() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let setup = try Setup()
        let unit = "agentd-test-agentd-wd-\(Components.testID()).service"
        try await withUnits(manager, [unit]) {
            let job = try await manager.startTransientUnit(
                unit,
                properties: [
                    .execStart(setup.arguments), .string("Type", "notify"), setup.environment, setup.output[0], setup.output[1],
                    .duration("WatchdogUSec", .seconds(2)), .string("Restart", "on-watchdog"), .duration("RestartUSec", .milliseconds(200)),
                    UnitProperty("WatchdogSignal", .int32(SIGKILL)),
                ], timeout: .seconds(60))
            #expect(job == "done")
            let first = try await manager.unitProperties(unit).mainPID
            #expect(first > 0)
            // Still alive and answering after several watchdog intervals: it pings.
            try await Task.sleep(for: .seconds(3))
            #expect(try await manager.unitProperties(unit).restarts == 0)
            kill(Int32(first), SIGSTOP)
            let restarted = try await eventually(.seconds(20)) {
                let s = try await manager.unitProperties(unit)
                return s.restarts >= 1 && s.mainPID != first && s.mainPID > 0 && s.activeState == "active"
            }
            #expect(restarted)
            #expect(try await setup.client.get("/v1/health", timeout: .seconds(5))["status"] as? String == "ok")
        }
    }

    @Test("socket activation: the first client connection starts agentd on the socket systemd holds")
    func socketActivation() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let setup = try Setup()
        let stem = "agentd-test-agentd-sock-\(Components.testID())"
        try await withUnits(manager, [stem + ".socket", stem + ".service"]) {
            let job = try await manager.startTransientUnit(
                stem + ".socket", properties: [.listen([("Stream", setup.socket)]), UnitProperty("SocketMode", .uint32(0o660))],
                auxiliary: [(stem + ".service", [.execStart(setup.arguments), .string("Type", "notify"), setup.environment] + setup.output)])
            #expect(job == "done")
            #expect(try await manager.unitProperties(stem + ".service").activeState == "inactive")
            // The socket exists before agentd runs, with the mode the unit gave it.
            var st = stat()
            #expect(stat(setup.socket, &st) == 0 && st.st_mode & 0o777 == 0o660)
            let health: AgentdClient.Reply
            do {
                health = try await setup.client.get("/v1/health", timeout: .seconds(30))
            } catch {
                Issue.record("no answer through the activated socket: \(error); log: \(setup.log)")
                return
            }
            #expect(health["status"] as? String == "ok")
            #expect(try await eventually { try await manager.unitProperties(stem + ".service").activeState == "active" })
            let log = try await manager.unitProperties(stem + ".service")
            #expect(log.mainPID > 0)
        }
    }
}

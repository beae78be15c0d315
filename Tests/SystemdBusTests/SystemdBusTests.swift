import Foundation
import SystemdBus
import Testing
import TestSupport

/// Integration tests against the real systemd manager `make env` started (or PID 1).
@Suite("systemd over sd-bus against the real manager")
struct SystemdBusTests {
    private func unitName() -> String { "agentd-test-\(Components.testID()).service" }

    @Test("the manager answers with its version")
    func version() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let version = try await manager.version()
        #expect(!version.isEmpty)
    }

    @Test("a transient service runs a command; its result and exit status are read back")
    func successfulUnit() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let name = unitName()
        let marker = "/tmp/\(name).ran"
        defer { try? FileManager.default.removeItem(atPath: marker) }
        let outcome = try await manager.runTransientService(
            name, properties: [.execStart(["/bin/sh", "-c", "echo ran > \(marker)"]), .string("Description", "agentd test")])
        #expect(outcome.result == "success")
        #expect(outcome.exitStatus == 0)
        #expect(outcome.activeState != "failed")
        #expect(FileManager.default.fileExists(atPath: marker))
    }

    @Test("a failing command reports its non-zero status")
    func failingUnit() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let outcome = try await manager.runTransientService(unitName(), properties: [.execStart(["/bin/sh", "-c", "exit 3"])])
        #expect(outcome.result == "exit-code")
        #expect(outcome.exitStatus == 3)
        #expect(outcome.activeState == "failed")
    }

    @Test("a unit killed by a signal says so")
    func killedUnit() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let outcome = try await manager.runTransientService(unitName(), properties: [.execStart(["/bin/sh", "-c", "kill -9 $$"])])
        #expect(outcome.result == "signal")
        #expect(outcome.exitStatus == nil)
        #expect(outcome.execMainStatus == 9)
    }

    @Test("a finished unit does not linger in the manager")
    func unitCollected() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let name = unitName()
        _ = try await manager.runTransientService(name, properties: [.execStart(["/bin/sh", "-c", "exit 1"])])
        // Unref is sent after the outcome is read; give the manager a moment to collect.
        var gone = false
        for _ in 0..<50 where !gone {
            do {
                _ = try await manager.connection.call(
                    BusCall(path: "/org/freedesktop/systemd1", interface: "org.freedesktop.systemd1.Manager", member: "GetUnit", arguments: [.string(name)]))
                try await Task.sleep(for: .milliseconds(50))
            } catch let error as SystemdError {
                #expect(error.busError == "org.freedesktop.systemd1.NoSuchUnit")
                gone = true
            }
        }
        #expect(gone)
    }

    @Test("an unknown property is refused with systemd's own message")
    func badProperty() async throws {
        let manager = try await Components.systemd()
        defer { manager.close() }
        let error = await #expect(throws: SystemdError.self) {
            try await manager.startTransientUnit(self.unitName(), properties: [.execStart(["/bin/true"]), .string("NoSuchSetting", "x")])
        }
        #expect(error?.code == .callFailed)
        #expect(error?.message.contains("NoSuchSetting") == true)
    }

    @Test("a missing manager names the address and says to run make env")
    func missingManager() async throws {
        let path = "/tmp/agentd-no-systemd-\(Components.testID())"
        let error = await #expect(throws: SystemdError.self) {
            _ = try await SystemdManager.connect(.address("unix:path=\(path)"))
        }
        #expect(error?.code == .unreachable)
        #expect(error?.message.contains(path) == true)
        #expect(error?.message.contains("make env") == true)
    }
}

import Foundation
import SystemdBus
import Testing
import TestSupport

/// The notify-probe executable built with the tests.
enum Probe {
    static var path: String {
        get throws {
            let path = Components.buildProductsDirectory.appendingPathComponent("notify-probe").path
            guard FileManager.default.isExecutableFile(atPath: path) else {
                throw Failure("notify-probe is not built at \(path); build with --build-tests")
            }
            return path
        }
    }

    /// A fresh directory for one probe's log.
    static func directory() throws -> String {
        let dir = "/tmp/agentd-probe-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// The probe's log lines ("start PID", "ready PID").
    static func log(_ dir: String) -> [String] {
        ((try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }
}

/// Runs `argv` to completion; returns its exit status and combined output.
func runTool(_ argv: [String]) async throws -> (status: Int32, output: String) {
    let out = "/tmp/agentd-tool-\(Components.testID()).out"
    defer { unlink(out) }
    let child = try ChildProcess.spawn(argv, environment: ProcessInfo.processInfo.environment, output: out)
    let status = await Task.detached { child.wait() }.value
    let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
    // Exit status from the wait status (WEXITSTATUS), or 128 + signal.
    let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return (code, text)
}


struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Stops and forgets `units` (reverse order), whatever state they are in.
func cleanUp(_ manager: SystemdManager, _ units: [String]) async {
    for unit in units.reversed() {
        _ = try? await manager.stopUnitAndWait(unit, timeout: .seconds(10))
        try? await manager.resetFailedUnit(unit)
    }
}

/// Runs `body`, then stops and forgets `units` whatever happens (awaited, so that nothing
/// outlives the test process).
func withUnits<T>(_ manager: SystemdManager, _ units: [String], _ body: () async throws -> T) async throws -> T {
    do {
        let result = try await body()
        await cleanUp(manager, units)
        return result
    } catch {
        await cleanUp(manager, units)
        throw error
    }
}

import Foundation
import SystemdBus

/// systemd figures: `systemd-run --wait --pipe true` (the baseline), then the same transient
/// service run through `SystemdManager`.
enum SystemdBench {
    static let iterations = 20

    static func run(_ report: Reporter) async throws {
        let address = try SystemdAddress.fromEnvironment()
        var baseline: [Double] = []
        for _ in 0..<iterations { baseline.append(try systemdRun(address)) }
        baseline.sort()
        report.figure("raw.systemd_run.p50", percentile(baseline, 50) * 1000, "ms")

        let manager = try await SystemdManager.connect(address)
        defer { manager.close() }
        var ours: [Double] = []
        for i in 0..<iterations {
            let t0 = now()
            _ = try await manager.runTransientService("agentd-bench-\(getpid())-\(i).service", properties: [.execStart(["/bin/true"])])
            ours.append(now() - t0)
        }
        ours.sort()
        report.figure("systemdbus.transient_run.p50", percentile(ours, 50) * 1000, "ms")
        report.ratio("systemdbus.transient_run.vs_systemd_run", "systemdbus.transient_run.p50", over: "raw.systemd_run.p50", goal: "informational")
    }

    /// One `systemd-run --wait --pipe [-p …] COMMAND…` against the same manager (`--user` with
    /// its runtime directory when it is a user manager's private socket); its stdout must be
    /// `expectedOutput`.
    static func systemdRun(
        _ address: SystemdAddress, properties: [String] = [], command: [String] = ["true"], expectedOutput: String = ""
    ) throws -> Double {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/systemd-run")
        var environment = ProcessInfo.processInfo.environment
        let arguments = ["--quiet", "--wait", "--pipe"] + properties.flatMap { ["-p", $0] } + command
        if case .address(let text) = address, let range = text.range(of: "/systemd/private") {
            // The user manager's runtime directory is the part before /systemd/private.
            environment["XDG_RUNTIME_DIR"] = String(text[text.index(text.startIndex, offsetBy: "unix:path=".count)..<range.lowerBound])
            process.arguments = ["--user"] + arguments
        } else {
            process.arguments = arguments
        }
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        let output = Pipe()
        process.standardOutput = output
        let t0 = now()
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0, data == Data(expectedOutput.utf8) else {
            throw RawUnixHTTP.Failure(description: "systemd-run exited with \(process.terminationStatus), output \(String(decoding: data, as: UTF8.self))")
        }
        return now() - t0
    }
}

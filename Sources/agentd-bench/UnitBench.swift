import Foundation
import Hands
import SystemdBus

/// Unit-driver figures: `systemd-run --user --wait --pipe sh -c 'echo hi'` (the baseline: a
/// transient service whose output comes back through passed descriptors), then the same
/// command through `UnitDriver.run` in a provisioned sandbox (isolation properties, output
/// pipes, outcome read back), in one run against the same manager.
enum UnitBench {
    static let iterations = 20

    static func run(_ report: Reporter) async throws {
        let address = try SystemdAddress.fromEnvironment()
        var baseline: [Double] = []
        for _ in 0..<iterations { baseline.append(try systemdRunPipe(address)) }
        baseline.sort()
        report.figure("raw.systemd_run_pipe.echo.p50", percentile(baseline, 50) * 1000, "ms")
        // The same with the sandbox's isolation, to tell systemd's namespace set-up from ours.
        var isolated: [Double] = []
        for _ in 0..<iterations { isolated.append(try systemdRunPipe(address, properties: isolation)) }
        isolated.sort()
        report.figure("raw.systemd_run_pipe_isolated.echo.p50", percentile(isolated, 50) * 1000, "ms")

        let manager = try await SystemdManager.connect(address)
        defer { manager.close() }
        let instance = "bench\(getpid())"
        let state = NSTemporaryDirectory() + "agentd-unitbench-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: state) }
        let driver = try UnitDriver(manager: manager, instance: instance, stateDirectory: state)
        let sandbox = try await driver.provision(SandboxSpec(), labels: [SandboxLabel.session: "bench", SandboxLabel.task: "t1"])
        var ours: [Double] = []
        do {
            for _ in 0..<iterations {
                let t0 = now()
                let out = try await driver.run(["sh", "-c", "echo hi"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
                ours.append(now() - t0)
                guard out.stdout == Array("hi\n".utf8) else {
                    throw RawUnixHTTP.Failure(description: "unit driver returned \(String(decoding: out.stdout + out.stderr, as: UTF8.self))")
                }
            }
        } catch {
            try? await driver.destroy(sandbox)
            throw error
        }
        try await driver.destroy(sandbox)
        _ = try? await manager.stopUnitAndWait("agentd-\(instance).slice")
        ours.sort()
        report.figure("unitdriver.execute.p50", percentile(ours, 50) * 1000, "ms")
        report.ratio("unitdriver.execute.vs_systemd_run_pipe", "unitdriver.execute.p50", over: "raw.systemd_run_pipe.echo.p50", goal: "informational")
        report.ratio(
            "unitdriver.execute.vs_systemd_run_pipe_isolated", "unitdriver.execute.p50", over: "raw.systemd_run_pipe_isolated.echo.p50",
            goal: "≤ 1.5 x")
    }

    /// The unit driver's isolation as `systemd-run -p` options (host root, no image).
    static let isolation = [
        "User=65534", "Group=65534", "ProtectSystem=strict", "ProtectHome=tmpfs", "PrivateNetwork=yes", "PrivateTmp=yes",
        "PrivateDevices=yes", "NoNewPrivileges=yes", "SystemCallFilter=@system-service", "RuntimeMaxSec=30",
    ]

    /// One `systemd-run --wait --pipe [-p …] sh -c 'echo hi'` against the same manager.
    static func systemdRunPipe(_ address: SystemdAddress, properties: [String] = []) throws -> Double {
        try SystemdBench.systemdRun(address, properties: properties, command: ["sh", "-c", "echo hi"], expectedOutput: "hi\n")
    }
}

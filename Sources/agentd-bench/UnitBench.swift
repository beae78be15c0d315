import Foundation
import Hands
import SystemdBus

/// Unit-driver figures: `systemd-run --user --wait --pipe sh -c 'echo hi'` (the baseline: a
/// transient service whose output comes back through passed descriptors), the same with the
/// sandbox's isolation, then the same command through `UnitDriver.run` in a provisioned
/// sandbox (through its long-lived agent service), in one run against the same manager; and
/// how long provisioning a sandbox takes (slice, agent service, agent answering).
enum UnitBench {
    static let iterations = 20
    /// Commands through the agent are cheap: more of them for a steadier p50.
    static let driverIterations = 200

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
        var provisioning: [Double] = []
        let t0 = now()
        let sandbox = try await driver.provision(SandboxSpec(), labels: [SandboxLabel.session: "bench", SandboxLabel.task: "t1"])
        provisioning.append(now() - t0)
        var ours: [Double] = []
        do {
            for _ in 0..<driverIterations {
                let t0 = now()
                let out = try await driver.run(["sh", "-c", "echo hi"], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
                ours.append(now() - t0)
                guard out.stdout == Array("hi\n".utf8) else {
                    throw RawUnixHTTP.Failure(description: "unit driver returned \(String(decoding: out.stdout + out.stderr, as: UTF8.self))")
                }
            }
            // Provisioning: a few more sandboxes, each destroyed before the next.
            for i in 2...5 {
                let t0 = now()
                let extra = try await driver.provision(SandboxSpec(), labels: [SandboxLabel.session: "bench", SandboxLabel.task: "t\(i)"])
                provisioning.append(now() - t0)
                try await driver.destroy(extra)
            }
        } catch {
            try? await driver.destroy(sandbox)
            _ = try? await manager.stopUnitAndWait("agentd-\(instance).slice")
            throw error
        }
        try await driver.destroy(sandbox)
        _ = try? await manager.stopUnitAndWait("agentd-\(instance).slice")
        ours.sort()
        provisioning.sort()
        report.figure("unitdriver.execute.p50", percentile(ours, 50) * 1000, "ms")
        report.figure("unitdriver.execute.p99", percentile(ours, 99) * 1000, "ms")
        report.figure("unitdriver.provision.p50", percentile(provisioning, 50) * 1000, "ms")
        report.ratio("unitdriver.execute.vs_systemd_run_pipe", "unitdriver.execute.p50", over: "raw.systemd_run_pipe.echo.p50", goal: "informational")
        report.ratio(
            "unitdriver.execute.vs_systemd_run_pipe_isolated", "unitdriver.execute.p50", over: "raw.systemd_run_pipe_isolated.echo.p50",
            goal: "≤ 0.10 x")
    }

    /// The unit driver's isolation as `systemd-run -p` options (host root, no image), with the
    /// command's timeout as `RuntimeMaxSec`, the way a unit per command would run it.
    static let isolation = [
        "User=65534", "Group=65534", "ProtectSystem=strict", "ProtectHome=tmpfs", "PrivateNetwork=yes", "PrivateTmp=yes",
        "PrivateDevices=yes", "PrivateIPC=yes", "ProtectProc=invisible", "ProcSubset=pid", "TemporaryFileSystem=/run:ro",
        "NoNewPrivileges=yes", "SystemCallFilter=@system-service", "RuntimeMaxSec=30",
    ]

    /// One `systemd-run --wait --pipe [-p …] sh -c 'echo hi'` against the same manager.
    static func systemdRunPipe(_ address: SystemdAddress, properties: [String] = []) throws -> Double {
        try SystemdBench.systemdRun(address, properties: properties, command: ["sh", "-c", "echo hi"], expectedOutput: "hi\n")
    }
}

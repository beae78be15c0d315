import AgentdClient
import EngineAPI
import Foundation
import TestSupport

/// The real agentd binary, started for one test with its own state directory and socket, and
/// killed or stopped the way an operator (or a crash) would. The end-to-end and console suites
/// share it.
public final class AgentdProcess: @unchecked Sendable {
    // Invariant: used by one test at a time; `child` changes only in start/kill/stop.
    /// The test's own directory: the state directory, the socket and the log are in it.
    public let base: String
    public let stateDir: String
    public let socket: String
    public let logPath: String
    public let policies: String
    private var child: ChildProcess?

    /// The running agentd's pid.
    public var pid: pid_t? { child?.pid }

    /// - Parameter prefix: names the test's directory, `/tmp/<prefix>-<test id>`.
    public init(policies: String = AgentdProcess.policiesDirectory, prefix: String = "agentd-e2e") throws {
        self.policies = policies
        base = "/tmp/\(prefix)-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        stateDir = base + "/state"
        socket = base + "/agentd.sock"
        logPath = base + "/agentd.log"
    }

    /// The repository's root directory.
    public static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// The repository's shipped policies.
    public static var policiesDirectory: String { repository.appendingPathComponent("policies").path }

    public var client: AgentdClient {
        CurlTransport.globalInit()
        return AgentdClient(socket: socket)
    }

    /// The instance id agentd labels its sandboxes with (kept in the state directory).
    public var instance: String {
        ((try? String(contentsOfFile: stateDir + "/instance", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Starts agentd with `extraArguments` and `extraEnvironment` added to the test's own;
    /// returns once its API answers on the unix socket.
    public func start(extraArguments: [String] = [], extraEnvironment: [String: String] = [:]) async throws {
        let binary = Components.buildProductsDirectory.appendingPathComponent("agentd").path
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw Components.Missing(description: "agentd is not built at \(binary); `swift build` builds it (make test does)")
        }
        _ = try await Components.engine()
        child = try ChildProcess.spawn(
            [binary, "--state-dir", stateDir, "--socket", socket, "--policies", policies] + extraArguments,
            environment: ProcessInfo.processInfo.environment.merging(extraEnvironment) { $1 }, output: logPath)
        // Start-up includes recovery and reconcile, which after a kill -9 removes every sandbox
        // the dead agentd left: on a loaded 2-core machine that can take many seconds.
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if (try? await client.get("/v1/health", timeout: .seconds(1))) != nil { return }
            if let status = child?.exitStatusIfExited() {
                child = nil
                throw Components.Missing(description: "agentd exited (wait status \(status)) before its API answered; its log: \(log)")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw Components.Missing(description: "agentd did not answer on \(socket) within 60 s; its log: \(log)")
    }

    /// SIGKILL, as a crash.
    public func kill9() {
        guard let c = child else { return }
        c.signal(SIGKILL)
        c.wait()
        child = nil
    }

    /// SIGTERM and wait: a graceful stop.
    @discardableResult
    public func stop() -> Int32 {
        guard let c = child else { return 0 }
        c.signal(SIGTERM)
        let status = c.wait()
        child = nil
        return status
    }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    deinit { kill9() }
}

/// Runs `body` with a started agentd, stopping it and removing whatever sandboxes its instance
/// left afterwards, whatever happens.
public func withAgentd<T>(
    policies: String = AgentdProcess.policiesDirectory, arguments: [String] = [], environment: [String: String] = [:],
    _ body: (AgentdProcess) async throws -> T
) async throws -> T {
    let agentd = try AgentdProcess(policies: policies)
    do {
        try await agentd.start(extraArguments: arguments, extraEnvironment: environment)
        let result = try await body(agentd)
        await agentd.stopAndRemoveSandboxes()
        return result
    } catch {
        await agentd.stopAndRemoveSandboxes()
        throw error
    }
}

extension AgentdProcess {
    /// Stops agentd and removes whatever containers its instance left.
    public func stopAndRemoveSandboxes() async {
        stop()
        guard let engine = try? await Components.engine(), !instance.isEmpty else { return }
        for c in (try? await engine.listContainers(labels: ["agentd.instance": instance])) ?? [] {
            _ = try? await engine.removeContainer(c.Id)
        }
    }
}

/// Containers of `instance` (optionally of one session) that the engine lists.
public func sandboxes(_ instance: String, session: String? = nil) async throws -> Int {
    var labels = ["agentd.instance": instance]
    if let session { labels["agentd.session"] = session }
    return try await Components.engine().listContainers(labels: labels).count
}

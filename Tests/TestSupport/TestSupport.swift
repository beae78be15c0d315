import EngineAPI
import Foundation
import SystemdBus

/// Access to the real components the integration tests use, as `make env` started them.
///
/// A missing component is a failure with a message saying what to run — never a skip: the
/// tests that need the engine or systemd exist to prove agentd works against them.
public enum Components {
    public struct Missing: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// The engine client for `$AGENTD_ENGINE`, after checking that the engine answers.
    public static func engine() async throws -> EngineClient {
        let client: EngineClient
        do {
            client = try EngineClient.fromEnvironment()
        } catch {
            throw Missing(description: "the container engine is required: \(error) (make test runs `make env` first)")
        }
        do {
            _ = try await client.ping()
        } catch {
            throw Missing(description: "the container engine is required and did not answer: \(error)")
        }
        return client
    }

    /// A connection to the systemd manager at `$AGENTD_SYSTEMD` (or the system bus).
    public static func systemd() async throws -> SystemdManager {
        do {
            return try await SystemdManager.connect(try SystemdAddress.fromEnvironment())
        } catch {
            throw Missing(description: "a systemd manager is required: \(error) (make test runs `make env` first)")
        }
    }

    /// The image every sandbox test uses; `make env` imports it.
    public static let baseImage = "agentd-base:latest"

    /// Where `make env` keeps its state (the base image's rootfs tarball among it).
    public static var envDirectory: String? { ProcessInfo.processInfo.environment["AGENTD_ENV_DIR"] }

    /// A fresh random id for labels and unit names of one test.
    public static func testID() -> String {
        String(UInt64.random(in: 0...UInt64.max), radix: 36)
    }

    /// The directory holding this build's executables (next to the test bundle).
    public static var buildProductsDirectory: URL {
        URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
            .deletingLastPathComponent()
    }
}

/// A container made for one test, removed afterwards whatever happens in between
/// (the pattern of apple/container's `ContainerFixture.with {}`).
public enum ContainerFixture {
    /// The label every test container carries, with the test's own random id as its value.
    public static let labelKey = "agentd.test"

    /// Creates and starts a container of `image` running `sleep`, passes its id to `body`, and
    /// removes it when `body` returns or throws.
    public static func with<T>(
        _ engine: EngineClient, id: String = Components.testID(), image: String = Components.baseImage,
        _ body: (String) async throws -> T
    ) async throws -> T {
        var spec = ContainerSpec(image: image, command: ["sleep", "600"], labels: [labelKey: id])
        var host = HostConfig()
        host.NetworkMode = "none"
        host.Ulimits = HostConfig.Ulimit.withinHostLimits()
        spec.HostConfig = host
        let container = try await engine.createContainer(spec)
        do {
            try await engine.startContainer(container)
            let result = try await body(container)
            try await engine.removeContainer(container)
            return result
        } catch {
            _ = try? await engine.removeContainer(container)
            throw error
        }
    }
}

/// A child process started with posix_spawn and reaped with waitpid — no Foundation
/// `Process`, whose `waitUntilExit` needs a run loop that async tests do not run.
public struct ChildProcess: Sendable {
    public let pid: pid_t

    /// Starts `argv` with `environment`, stdout and stderr to `/dev/null` unless `output` is a path.
    public static func spawn(_ argv: [String], environment: [String: String], output: String = "/dev/null") throws -> ChildProcess {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // The child starts with no signal blocked and default dispositions: the spawning thread
        // may be one of the concurrency pool's, which block most signals, and a child that
        // inherited that mask would never see the SIGTERM that stops it.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (cArgs + cEnv).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attributes, cArgs, cEnv)
        guard rc == 0 else { throw Components.Missing(description: "cannot start \(argv[0]): \(String(cString: strerror(rc)))") }
        return ChildProcess(pid: pid)
    }

    /// Sends `signal`.
    public func signal(_ signal: Int32) { kill(pid, signal) }

    /// The child's wait status if it has exited (it is reaped then), nil while it runs.
    public func exitStatusIfExited() -> Int32? {
        var status: Int32 = 0
        var reaped: pid_t
        repeat { reaped = waitpid(pid, &status, WNOHANG) } while reaped < 0 && errno == EINTR
        return reaped == pid ? status : nil
    }

    /// Sends SIGTERM and waits for the child to exit; after `grace` it sends SIGKILL. Returns
    /// the wait status.
    @discardableResult
    public func terminate(grace: Duration = .seconds(10)) -> Int32 {
        if let status = exitStatusIfExited() { return status }
        signal(SIGTERM)
        let deadline = ContinuousClock.now + grace
        while ContinuousClock.now < deadline {
            if let status = exitStatusIfExited() { return status }
            usleep(10_000)
        }
        signal(SIGKILL)
        return wait()
    }

    /// Waits for the child to exit and returns its wait status.
    @discardableResult
    public func wait() -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status
    }
}

/// A second Podman API service over the same storage as `make env`'s, on a socket of its own,
/// that a test may stop and start again (to inject "engine down" without disturbing the
/// other tests, which use the shared service).
public final class PrivateEngine: @unchecked Sendable {
    // Invariant: used by one test at a time; `child` is replaced only in start/stop.
    public let socketPath: String
    private var child: ChildProcess?

    public init() throws {
        guard Components.envDirectory != nil else { throw Components.Missing(description: "AGENTD_ENV_DIR is not set; run make env") }
        socketPath = "/tmp/agentd-test-engine-\(Components.testID()).sock"
    }

    public var endpoint: EngineEndpoint { .unixSocket(path: socketPath) }

    /// Starts the service and waits until it answers.
    public func start() async throws {
        let env = Components.envDirectory!
        var environment = ProcessInfo.processInfo.environment
        environment["CONTAINERS_CONF"] = "\(env)/podman/containers.conf"
        child = try ChildProcess.spawn(
            [
                "/usr/bin/podman", "--root", "\(env)/podman/root", "--runroot", "\(env)/podman/runroot", "--tmpdir", "\(env)/podman/tmp",
                "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                "system", "service", "--time=0", "unix://\(socketPath)",
            ], environment: environment)
        let client = EngineClient(endpoint: endpoint)
        for _ in 0..<100 {
            if (try? await client.ping()) == "OK" { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw Components.Missing(description: "a private podman service did not start at \(socketPath)")
    }

    /// Kills the service (SIGKILL, as a crash would).
    public func stop() {
        guard let c = child else { return }
        c.signal(SIGKILL)
        c.wait()
        child = nil
        unlink(socketPath)
    }

    deinit { stop() }
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes (then checks it once
/// more): for state that another process changes on its own time.
public func eventually(_ timeout: Duration = .seconds(20), _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(100))
    }
    return try await condition()
}

/// A small deterministic generator (SplitMix64) so that fuzz failures reproduce from their
/// seed, the same on every machine.
public struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

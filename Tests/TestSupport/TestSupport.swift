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

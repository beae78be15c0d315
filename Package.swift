// swift-tools-version:6.2
import Foundation
import PackageDescription

/// In CI (`CI=true`) every warning in our own targets is an error; locally they stay warnings
/// so that work in progress builds.
let strict: [SwiftSetting] =
    ProcessInfo.processInfo.environment["CI"] == "true" ? [.treatAllWarnings(as: .error)] : []

let package = Package(
    name: "agentd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "agentd", targets: ["agentd"]),
        .executable(name: "agentctl", targets: ["agentctl"]),
        .executable(name: "agentd-bench", targets: ["agentd-bench"]),
        .executable(name: "agentd-sandbox-agent", targets: ["agentd-sandbox-agent"]),
        .executable(name: "vault-proxy", targets: ["vault-proxy"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/modelcontextprotocol/swift-sdk", exact: "0.12.1"),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
    ],
    targets: [
        // C libraries, each behind one system library target with typed shims for variadic calls.
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl", providers: [.apt(["libcurl4-openssl-dev"])]),
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3", providers: [.apt(["libsqlite3-dev"])]),

        // Leaf modules.
        .target(name: "Blocking", swiftSettings: strict),
        .target(name: "JSONValues", swiftSettings: strict),
        // The sandbox agent's wire protocol, shared by the agent and agentd (no Foundation).
        .target(name: "SandboxAgentProtocol", exclude: ["README.md"], swiftSettings: strict),
        // GNU calls the Swift Glibc module does not import (accept4, pipe2, prctl, …), for the agent.
        .target(name: "CSandboxAgent"),
        // agentd's client of the sandbox agent: bounded frames, deadlines, on a shared NIO event loop group.
        .target(
            name: "SandboxAgentClient",
            dependencies: [
                "SandboxAgentProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            exclude: ["README.md"],
            swiftSettings: strict),
        // The sandbox agent's logic (Foundation-free, so the agent links statically).
        .target(name: "SandboxAgent", dependencies: ["SandboxAgentProtocol", "CSandboxAgent"], exclude: ["README.md"], swiftSettings: strict),
        // Every request and response body of the API, shared by the server and its clients.
        .target(name: "AgentdAPI", dependencies: ["JSONValues"], swiftSettings: strict),
        .target(name: "CurlHTTP", dependencies: ["CCurl", "Blocking"], swiftSettings: strict),
        .target(
            name: "EngineAPI",
            dependencies: ["CurlHTTP", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "SystemdBus",
            dependencies: ["CSystemd", "Blocking", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // A named secret and the redactor of its raw and JSON-encoded forms (no Foundation: the
        // vault-proxy links it without Foundation's memory).
        .target(name: "Secrets", exclude: ["README.md"], swiftSettings: strict),
        .target(
            name: "SessionLog",
            dependencies: [
                "Blocking", "Secrets",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: strict),
        // Nodes of a fleet: heartbeats with a lease, and which node serves which session.
        .target(name: "Fleet", dependencies: [.product(name: "Logging", package: "swift-log")], exclude: ["README.md"], swiftSettings: strict),
        // The Session journal on PostgreSQL (`SessionJournal` through postgres-nio), for a fleet.
        .target(
            name: "PostgresStore",
            dependencies: [
                "Fleet",
                "SessionLog",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: strict),
        .target(
            name: "Policy",
            dependencies: [
                .product(name: "Yams", package: "Yams"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: strict),

        .target(
            name: "Hands",
            dependencies: ["EngineAPI", "SystemdBus", "Blocking", "JSONValues", "SandboxAgentClient", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),

        .target(
            name: "Runtime",
            dependencies: [
                "Fleet",
                "SessionLog", "Hands", "Policy", "JSONValues",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        // The web console: pages served from the binary at /ui/ (Assets/ embedded by SwiftPM),
        // and the login cookie that lets a browser in on the TCP listener.
        .target(
            name: "Console",
            dependencies: [.product(name: "Crypto", package: "swift-crypto")],
            exclude: ["README.md"],
            resources: [
                .embedInCode("Assets/index.html"), .embedInCode("Assets/login.html"), .embedInCode("Assets/console.js"),
                .embedInCode("Assets/console.css"),
            ],
            swiftSettings: strict),
        .target(
            name: "Service",
            dependencies: [
                "Fleet",
                "AgentdAPI", "Runtime", "Hands", "Policy", "SessionLog", "Console", "SystemdBus", "Blocking", "JSONValues",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["openapi.yaml"],
            swiftSettings: strict),

        .target(name: "Vault", dependencies: ["Policy", "SessionLog", .product(name: "Logging", package: "swift-log")], swiftSettings: strict),
        // fork → private mount namespace → setresuid → exec, for git run as a sandbox's uid.
        .target(name: "CGitWorkspace"),
        // The host-side git initialization of a workspace: fetch and checkout as the sandbox's
        // uid, the credential only in that git's environment, origin left at the route.
        .target(name: "GitWorkspace", dependencies: ["CGitWorkspace", "Policy"], exclude: ["README.md"], swiftSettings: strict),
        // The egress proxy: per-sandbox listeners, routes with injected credentials, CONNECT to
        // allowlisted hosts, response scrubbing, egress events over a private control channel.
        .target(
            name: "VaultProxy",
            dependencies: [
                "Secrets",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: strict),
        // agentd's side of the egress proxy: supervises vault-proxy and drives its control channel.
        .target(
            name: "EgressProxy",
            dependencies: ["VaultProxy", "Vault", "Policy", "Hands", "GitWorkspace", "SystemdBus", .product(name: "Logging", package: "swift-log")],
            exclude: ["README.md"],
            swiftSettings: strict),
        .target(name: "AgentdClient", dependencies: ["AgentdAPI", "CurlHTTP", "JSONValues"], swiftSettings: strict),
        .target(
            name: "Brain",
            dependencies: ["AgentdClient", "CurlHTTP", "JSONValues", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "AgentdMCP",
            dependencies: [
                "AgentdClient",
                .product(name: "MCP", package: "swift-sdk"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        // Executables: wiring only.
        .executableTarget(
            name: "agentd",
            dependencies: [
                "EngineAPI", "SystemdBus", "SessionLog", "PostgresStore", "Fleet", "Policy", "Hands", "Runtime", "Service", "Vault", "EgressProxy",
                "VaultProxy", .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "agentctl",
            dependencies: [
                "AgentdAPI", "AgentdClient", "AgentdMCP", "Brain", "CurlHTTP", "JSONValues", "Policy",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "agentd-bench",
            dependencies: [
                "AgentdClient", "Runtime", "Policy", "EngineAPI", "SystemdBus", "SessionLog", "PostgresStore", "CSQLite", "CCurl", "Hands", "SandboxAgentClient",
                "EgressProxy", "VaultProxy",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "vault-proxy",
            dependencies: [
                "VaultProxy",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // A tiny Type=notify / socket-activated service for the SystemdBus service tests.
        // The sandbox agent: a static executable, PID 1 in every sandbox.
        .executableTarget(
            name: "agentd-sandbox-agent", dependencies: ["SandboxAgent"], swiftSettings: strict,
            linkerSettings: [.unsafeFlags(["-static-executable"])]),
        .executableTarget(name: "notify-probe", dependencies: ["SystemdBus"], swiftSettings: strict),
        .executableTarget(
            name: "journal-torture",
            dependencies: ["SessionLog"],
            swiftSettings: strict),

        // Tests.
        .target(name: "TestSupport", dependencies: ["EngineAPI", "SystemdBus"], path: "Tests/TestSupport", swiftSettings: strict),
        // The real agentd as a child process, for the end-to-end and console suites.
        .target(
            name: "AgentdTestSupport", dependencies: ["AgentdClient", "EngineAPI", "TestSupport"], path: "Tests/AgentdTestSupport",
            swiftSettings: strict),
        .testTarget(
            name: "EngineAPITests",
            dependencies: ["EngineAPI", "CurlHTTP", "TestSupport", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: strict),
        .testTarget(name: "SystemdBusTests", dependencies: ["SystemdBus", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "SessionLogTests", dependencies: ["SessionLog", "TestSupport"], swiftSettings: strict),
        // One conformance suite over both SessionJournal implementations (file and PostgreSQL).
        .testTarget(
            name: "JournalConformanceTests",
            dependencies: [
                "SessionLog", "PostgresStore", "TestSupport",
                .product(name: "PostgresNIO", package: "postgres-nio"), .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .testTarget(name: "HandsTests", dependencies: ["Hands", "EngineAPI", "SystemdBus", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "SystemdIntegrationTests", dependencies: ["SystemdBus", "TestSupport", "notify-probe"], swiftSettings: strict),
        .testTarget(
            name: "AgentdTests",
            dependencies: [
                "AgentdAPI", "AgentdClient", "Brain", "EngineAPI", "SystemdBus", "Service", "SessionLog", "TestSupport", "JSONValues",
                "PostgresStore", "CurlHTTP", "AgentdTestSupport",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // The seeded fuzzer over the HTTP parser and router (no engine or systemd needed).
        .testTarget(
            name: "APIFuzzTests",
            dependencies: [
                "AgentdAPI", "Service", "Runtime", "Hands", "Policy", "SessionLog", "JSONValues", "TestSupport",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // The protocol, the agent binary (run as a host process on a temp socket) and the client,
        // including a hostile fake agent. The agent is not a dependency: an executable's
        // -static-executable flag would reach the test bundle's link; `swift build --build-tests`
        // builds it with every other product.
        .testTarget(
            name: "SandboxAgentTests", dependencies: ["SandboxAgentProtocol", "SandboxAgentClient", "TestSupport"],
            swiftSettings: strict),
        .testTarget(
            name: "VaultProxyTests",
            dependencies: [
                "VaultProxy", "EgressProxy", "Policy", "SessionLog", "SystemdBus", "TestSupport", "vault-proxy",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // The web console in headless Chromium (DevTools protocol over a pipe) against a real agentd.
        .testTarget(
            name: "ConsoleTests",
            dependencies: ["AgentdAPI", "AgentdClient", "AgentdTestSupport", "Console", "EngineAPI", "JSONValues", "SessionLog", "TestSupport"],
            swiftSettings: strict),
        .testTarget(name: "PolicyTests", dependencies: ["Policy", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "TestServerTests", dependencies: ["TestSupport"], swiftSettings: strict),
        .testTarget(name: "GitWorkspaceTests", dependencies: ["GitWorkspace", "Policy", "TestSupport"], swiftSettings: strict),
        // Streaming execute through the real server and client, over a driver that streams.
        .testTarget(
            name: "StreamingTests",
            dependencies: [
                "AgentdAPI", "AgentdClient", "Service", "Runtime", "Hands", "Policy", "SessionLog",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "RuntimeTests",
            dependencies: [
                "Runtime", "Hands", "SessionLog", "PostgresStore", "Fleet", "Policy", "Vault", "JSONValues", "TestSupport",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
    ]
)

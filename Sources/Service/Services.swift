import Hands
import Logging
import Policy
import ServiceLifecycle
import UnixSignals

/// Periodic housekeeping of the Hands: release idle sandboxes; reconcile orphans.
public struct HandsMaintenance: Service {
    let hands: HandsManager
    let idleCheck: Duration
    let reconcileEvery: Duration
    let logger: Logger

    public init(hands: HandsManager, idleCheck: Duration = .seconds(5), reconcileEvery: Duration = .seconds(60), logger: Logger) {
        self.hands = hands
        self.idleCheck = idleCheck
        self.reconcileEvery = reconcileEvery
        self.logger = logger
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            var sinceReconcile = Duration.zero
            while !Task.isCancelled {
                try? await Task.sleep(for: idleCheck)
                if Task.isCancelled { return }
                await hands.releaseIdle()
                sinceReconcile += idleCheck
                if sinceReconcile >= reconcileEvery {
                    sinceReconcile = .zero
                    await hands.resumeRefills()
                    do { try await hands.reconcile() } catch { logger.info("reconcile skipped", metadata: ["error": "\(error)"]) }
                }
            }
        }
    }
}

/// Reloads policies when their files change and on SIGHUP; a bad edit is refused (logged,
/// shown by `GET /v1/policies`) and the last good policy stays in force.
/// `onChange` runs after every applied change, whatever path reloaded it.
public struct PolicyReloader: Service {
    let store: PolicyStore
    let logger: Logger
    let onChange: @Sendable () async -> Void

    public init(store: PolicyStore, logger: Logger, onChange: @escaping @Sendable () async -> Void = {}) {
        self.store = store
        self.logger = logger
        self.onChange = onChange
    }

    public func run() async throws {
        let changes = await store.changes()
        await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { group in
                group.addTask { await store.watch(interval: .seconds(1)) }
                group.addTask { for await _ in changes { await onChange() } }
                group.addTask {
                    for await _ in await UnixSignalsSequence(trapping: .sighup) {
                        logger.info("SIGHUP: reloading policies")
                        await store.reload()
                    }
                }
            }
        }
    }
}

/// Tells systemd (when agentd runs under it) that the API is up (`READY=1` with a status
/// line), keeps the watchdog fed at half of `WatchdogSec`, and says `STOPPING=1` on shutdown.
/// Without systemd it does nothing.
public struct SystemdReadiness: Service {
    let notifier: ServiceNotifier
    let server: HTTPServer
    let status: String
    let logger: Logger

    public init(notifier: ServiceNotifier = ServiceNotifier(), server: HTTPServer, status: String, logger: Logger) {
        self.notifier = notifier
        self.server = server
        self.status = status
        self.logger = logger
    }

    public func run() async throws {
        // A service may only end with the group: without systemd, just wait for shutdown.
        guard notifier.isEnabled else { return try await gracefulShutdown() }
        try await server.waitUntilListening()
        _ = try? notifier.ready(status: status)
        logger.info("told systemd we are ready")
        await cancelWhenGracefulShutdown { await notifier.runWatchdog() }
        // Without WatchdogSec the loop returns at once; a service may only end with the group.
        try? await gracefulShutdown()
        _ = try? notifier.stopping()
    }
}

import SystemdBus


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
        try await cancelWhenGracefulShutdown {
            var sinceReconcile = Duration.zero
            while !Task.isCancelled {
                try? await Task.sleep(for: idleCheck)
                if Task.isCancelled { return }
                await hands.releaseIdle()
                sinceReconcile += idleCheck
                if sinceReconcile >= reconcileEvery {
                    sinceReconcile = .zero
                    do { try await hands.reconcile() } catch { logger.info("reconcile skipped", metadata: ["error": "\(error)"]) }
                }
            }
        }
    }
}

/// Reloads policies when their files change and on SIGHUP; a bad edit is refused (logged,
/// shown by `GET /v1/policies`) and the last good policy stays in force.
public struct PolicyReloader: Service {
    let store: PolicyStore
    let logger: Logger

    public init(store: PolicyStore, logger: Logger) {
        self.store = store
        self.logger = logger
    }

    public func run() async throws {
        try await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { group in
                group.addTask { await store.watch(interval: .seconds(1)) }
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

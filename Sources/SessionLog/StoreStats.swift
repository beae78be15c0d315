import Foundation
import Synchronization

/// Latency and error counters of a Session store since it was opened: what `/metrics` shows
/// as `agentd_store_append_seconds`, `agentd_store_read_seconds` (Prometheus histograms) and
/// `agentd_store_errors_total`.
public struct StoreStats: Sendable, Equatable {
    /// The histogram bounds, in seconds: from 100 µs (a local commit) to 10 s (a store that
    /// hangs).
    public static let latencyBounds: [Double] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10]

    /// The store's kind, as a metrics label: `file` or `postgres`.
    public var store: String
    /// Every write (append, checkpoint, wake), successful or not, from the call to its answer.
    public var appendSeconds = Distribution(bounds: latencyBounds)
    /// Every read statement (a replay or follow chunk, one event, a snapshot's row).
    public var readSeconds = Distribution(bounds: latencyBounds)
    /// Writes that failed with an error of the store itself (`.ioError`: the server or the
    /// disk), not refusals such as a stale epoch or an oversized event.
    public var appendErrors: UInt64 = 0
    /// Reads that failed with an error of the store itself.
    public var readErrors: UInt64 = 0

    /// All errors of the store itself.
    public var errors: UInt64 { appendErrors + readErrors }

    /// Counters at zero for a store of `kind`.
    public init(store: String) { self.store = store }
}

/// Where a store records its `StoreStats`; safe to use from any thread.
public final class StoreStatsRecorder: Sendable {
    private let state: Mutex<StoreStats>

    /// A recorder for a store of `kind` (`file`, `postgres`).
    public init(store kind: String) { state = Mutex(StoreStats(store: kind)) }

    /// The counters now.
    public var snapshot: StoreStats { state.withLock { $0 } }

    /// Counts one write that took `seconds`; `failed` when the store itself failed.
    public func write(seconds: Double, failed: Bool) {
        state.withLock {
            $0.appendSeconds.observe(seconds)
            if failed { $0.appendErrors += 1 }
        }
    }

    /// Counts one read that took `seconds`; `failed` when the store itself failed.
    public func read(seconds: Double, failed: Bool) {
        state.withLock {
            $0.readSeconds.observe(seconds)
            if failed { $0.readErrors += 1 }
        }
    }

    /// Runs a write and counts it: its time, and an error when it throws `.ioError`.
    public func timeWrite<T>(_ body: () async throws -> T) async throws -> T {
        let start = ContinuousClock.now
        do {
            let value = try await body()
            write(seconds: Self.seconds(since: start), failed: false)
            return value
        } catch {
            write(seconds: Self.seconds(since: start), failed: Self.isStoreFailure(error))
            throw error
        }
    }

    /// Runs a read and counts it like `timeWrite`.
    public func timeRead<T>(_ body: () async throws -> T) async throws -> T {
        let start = ContinuousClock.now
        do {
            let value = try await body()
            read(seconds: Self.seconds(since: start), failed: false)
            return value
        } catch {
            read(seconds: Self.seconds(since: start), failed: Self.isStoreFailure(error))
            throw error
        }
    }

    static func seconds(since start: ContinuousClock.Instant) -> Double {
        let d = ContinuousClock.now - start
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    /// Whether an error is the store's own failure (I/O, a full disk, damage) rather than a
    /// refusal of the request.
    static func isStoreFailure(_ error: any Error) -> Bool {
        guard let e = error as? SessionLogError else { return true }
        return [.ioError, .diskFull, .damaged].contains(e.code)
    }
}

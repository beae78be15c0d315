import Fleet
import Foundation
import Runtime
import SessionLog
import Synchronization

/// Prometheus metrics, rendered in the text exposition format at `GET /metrics`.
public final class Metrics: Sendable {
    private static let latencyBounds: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    private struct State {
        var execute = Distribution(bounds: latencyBounds)
        var executeErrors: UInt64 = 0
        var requests = Distribution(bounds: latencyBounds)
        var requestsByStatus: [Int: UInt64] = [:]
    }
    private let state = Mutex(State())

    public init() {}

    func observeExecute(seconds: Double, isError: Bool) {
        state.withLock {
            $0.execute.observe(seconds)
            if isError { $0.executeErrors += 1 }
        }
    }

    func observeRequest(seconds: Double, status: Int) {
        state.withLock {
            $0.requests.observe(seconds)
            $0.requestsByStatus[status, default: 0] += 1
        }
    }

    func exposition(_ runtime: Runtime) async -> String {
        let s = state.withLock { $0 }
        // Group-commit figures exist for the file journal only.
        let stats = (runtime.store as? SessionStore)?.statistics ?? SessionStoreStatistics()
        var out = ""
        func gauge(_ name: String, _ help: String, _ value: Double) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) gauge\n\(name) \(value)\n"
        }
        func counter(_ name: String, _ help: String, _ value: UInt64) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) counter\n\(name) \(value)\n"
        }
        func histogram(_ name: String, _ help: String, _ h: Distribution) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
            for (i, b) in h.bounds.enumerated() { out += "\(name)_bucket{le=\"\(b)\"} \(h.cumulativeCounts[i])\n" }
            out += "\(name)_bucket{le=\"+Inf\"} \(h.count)\n\(name)_sum \(h.sum)\n\(name)_count \(h.count)\n"
        }
        gauge("agentd_sessions", "Sessions in the journal.", Double((try? await runtime.store.sessions().count) ?? 0))
        gauge("agentd_sandboxes_live", "Sandboxes held by tasks.", Double(await runtime.hands.liveCount))
        gauge("agentd_sandboxes_pooled", "Warm sandboxes waiting in the pool.", Double(await runtime.hands.pooledCount))
        histogram("agentd_execute_seconds", "Latency of execute calls, journaling included.", s.execute)
        counter("agentd_execute_errors_total", "Execute calls whose result was an error string.", s.executeErrors)
        histogram("agentd_api_request_seconds", "Latency of API requests.", s.requests)
        counter("agentd_journal_records_total", "Records made durable in the journal.", stats.records)
        counter("agentd_journal_syncs_total", "Group commits (one fdatasync each); records/syncs is the mean batch size.", stats.syncs)
        counter("agentd_journal_bytes_total", "Bytes written to the journal.", stats.bytesWritten)
        histogram("agentd_journal_sync_seconds", "Time of each group commit: its write and its fdatasync.", stats.syncSeconds)
        histogram("agentd_journal_batch_records", "Records per group commit (one fdatasync).", stats.batchSizes)
        gauge(
            "agentd_journal_batch_size_mean", "Mean records per fdatasync since start.",
            stats.syncs == 0 ? 0 : Double(stats.records) / Double(stats.syncs))
        out += "# HELP agentd_api_requests_total API requests by status.\n# TYPE agentd_api_requests_total counter\n"
        for (status, n) in s.requestsByStatus.sorted(by: { $0.key < $1.key }) { out += "agentd_api_requests_total{status=\"\(status)\"} \(n)\n" }
        out += Self.storeExposition(runtime.store.storeStats)
        if let fleet = runtime.fleet {
            out += await Self.fleetExposition(fleet)
        }
        return out
    }

    /// The fleet's gauges: heartbeats this node failed to write in a row, and for every node
    /// the store knows, how many heartbeats it missed (alert on a live node's rising above 0,
    /// and on this node's own) and whether it is live.
    static func fleetExposition(_ fleet: FleetNode) async -> String {
        let nodes = await fleet.currentNodes()
        var out = "# HELP agentd_fleet_heartbeat_failures Heartbeats this node failed to write in a row (it serves no calls once its lease runs out).\n"
        out += "# TYPE agentd_fleet_heartbeat_failures gauge\nagentd_fleet_heartbeat_failures \(await fleet.missedHeartbeats)\n"
        out += "# HELP agentd_fleet_missed_heartbeats Heartbeats each node of the fleet missed, by the store's clock, as of this node's last heartbeat.\n"
        out += "# TYPE agentd_fleet_missed_heartbeats gauge\n"
        for node in nodes { out += "agentd_fleet_missed_heartbeats{node=\"\(node.name)\"} \(node.missedHeartbeats)\n" }
        out += "# HELP agentd_fleet_node_live 1 for a node whose lease holds, 0 for one whose lease ran out.\n# TYPE agentd_fleet_node_live gauge\n"
        for node in nodes { out += "agentd_fleet_node_live{node=\"\(node.name)\"} \(node.live ? 1 : 0)\n" }
        return out
    }
}

extension Metrics {
    /// The Session store's figures (`SessionJournal.storeStats`) in the exposition format:
    /// `agentd_store_append_seconds` and `agentd_store_read_seconds` (histograms) and
    /// `agentd_store_errors_total{op="append"|"read"}`, each labelled `store="file"|"postgres"`.
    /// Empty for a store that keeps no statistics.
    static func storeExposition(_ stats: StoreStats?) -> String {
        guard let stats else { return "" }
        let label = "store=\"\(stats.store)\""
        var out = ""
        func histogram(_ name: String, _ help: String, _ h: Distribution) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
            for (i, b) in h.bounds.enumerated() { out += "\(name)_bucket{\(label),le=\"\(b)\"} \(h.cumulativeCounts[i])\n" }
            out += "\(name)_bucket{\(label),le=\"+Inf\"} \(h.count)\n\(name)_sum{\(label)} \(h.sum)\n\(name)_count{\(label)} \(h.count)\n"
        }
        histogram("agentd_store_append_seconds", "Latency of Session store writes (append, checkpoint, wake), failures included.", stats.appendSeconds)
        if stats.readSeconds.count > 0 {
            histogram("agentd_store_read_seconds", "Latency of Session store read statements (replay and follow chunks, session rows).", stats.readSeconds)
        }
        out += "# HELP agentd_store_errors_total Session store operations that failed in the store itself (I/O, server unreachable, damage), not refusals.\n"
        out += "# TYPE agentd_store_errors_total counter\n"
        out += "agentd_store_errors_total{\(label),op=\"append\"} \(stats.appendErrors)\n"
        out += "agentd_store_errors_total{\(label),op=\"read\"} \(stats.readErrors)\n"
        return out
    }
}

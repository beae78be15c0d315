import Foundation
import Synchronization

/// A `FleetRegistry` in memory, for tests of the fleet logic without a database. Its clock is
/// `ContinuousClock`; `expire(_:)` ends a node's lease at once (a node killed with -9).
public final class MemoryFleetRegistry: FleetRegistry {
    private struct Node {
        var registration: NodeRegistration
        var beat: ContinuousClock.Instant
        var wall: Date
    }

    private let state = Mutex<(nodes: [String: Node], owners: [String: String])>(([:], [:]))

    public init() {}

    public func heartbeat(_ node: NodeRegistration) async throws {
        try state.withLock { s in
            if let old = s.nodes[node.name], old.registration.instance != node.instance, Self.info(old).live {
                throw FleetError(.nameTaken, "node name '\(node.name)' is held by a live node (instance \(old.registration.instance))")
            }
            s.nodes[node.name] = Node(registration: node, beat: .now, wall: Date())
        }
    }

    public func nodes() async throws -> [NodeInfo] {
        state.withLock { s in s.nodes.values.map(Self.info).sorted { $0.name < $1.name } }
    }

    public func claim(session: String, node: String) async throws -> ClaimOutcome {
        state.withLock { s in
            guard let current = s.owners[session], current != node else {
                s.owners[session] = node
                return .claimed(takenFrom: nil)
            }
            if let owner = s.nodes[current].map(Self.info), owner.live { return .elsewhere(owner) }
            s.owners[session] = node
            return .claimed(takenFrom: current)
        }
    }

    public func owner(session: String) async throws -> NodeInfo? {
        state.withLock { s in s.owners[session].flatMap { s.nodes[$0] }.map(Self.info) }
    }

    public func leave(_ node: String) async throws { expire(node) }

    /// Ends `node`'s lease now, as if it had stopped beating long ago.
    public func expire(_ node: String) {
        state.withLock { s in
            guard var n = s.nodes[node] else { return }
            n.beat = .now - n.registration.lease - .seconds(1)
            s.nodes[node] = n
        }
    }

    private static func info(_ node: Node) -> NodeInfo {
        let since = ContinuousClock.now - node.beat
        return NodeInfo(
            name: node.registration.name, address: node.registration.address, instance: node.registration.instance, heartbeatAt: node.wall,
            leaseSeconds: node.registration.lease.seconds, sinceHeartbeat: since.seconds, intervalSeconds: node.registration.interval.seconds)
    }
}

extension Duration {
    /// The duration in seconds (for the package's modules: Service uses it too).
    package var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

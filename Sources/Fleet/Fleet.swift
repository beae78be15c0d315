import Foundation

/// One agentd node as the fleet's store records it.
///
/// Nodes see each other only through the store: each writes a heartbeat every interval that
/// extends its lease; a node whose lease ran out (by the store's clock, so that the nodes'
/// clocks need not agree) is dead, and the sessions it served may be claimed by another.
public struct NodeInfo: Sendable, Equatable, Codable {
    /// The node's name (`agentd serve --node`), unique in the fleet.
    public var name: String
    /// Where clients reach its API: `unix:///path/agentd.sock` or `http://host:port`.
    public var address: String
    /// The node's installation id (its sandboxes' instance label).
    public var instance: String
    /// When its last heartbeat was written, by the store's clock.
    public var heartbeatAt: Date
    /// How long a heartbeat keeps it live.
    public var leaseSeconds: Double
    /// Seconds since its last heartbeat, by the store's clock, when this was read.
    public var sinceHeartbeat: Double
    /// Its heartbeat interval: `sinceHeartbeat / intervalSeconds` is how many it missed.
    public var intervalSeconds: Double

    /// True when its lease had not run out when this was read.
    public var live: Bool { sinceHeartbeat < leaseSeconds }

    /// Whole heartbeats missed since the last one that arrived (0 for a node on time).
    public var missedHeartbeats: Int {
        guard intervalSeconds > 0 else { return 0 }
        return max(0, Int((sinceHeartbeat / intervalSeconds).rounded(.down)) - 1)
    }

    public init(
        name: String, address: String, instance: String, heartbeatAt: Date, leaseSeconds: Double, sinceHeartbeat: Double, intervalSeconds: Double
    ) {
        (self.name, self.address, self.instance, self.heartbeatAt) = (name, address, instance, heartbeatAt)
        (self.leaseSeconds, self.sinceHeartbeat, self.intervalSeconds) = (leaseSeconds, sinceHeartbeat, intervalSeconds)
    }
}

/// What a node tells the store about itself on each heartbeat.
public struct NodeRegistration: Sendable, Equatable {
    public var name: String
    public var address: String
    public var instance: String
    public var interval: Duration
    public var lease: Duration

    public init(name: String, address: String, instance: String, interval: Duration, lease: Duration) {
        (self.name, self.address, self.instance, self.interval, self.lease) = (name, address, instance, interval, lease)
    }
}

/// The answer to a claim of a session by a node.
public enum ClaimOutcome: Sendable, Equatable {
    /// The node serves the session now. `takenFrom` names the dead node it was taken from,
    /// when it was one (nil when the session had no owner, or was this node's already).
    case claimed(takenFrom: String?)
    /// A live node serves it.
    case elsewhere(NodeInfo)
}

/// The store side of the fleet: heartbeats, the list of nodes and who serves which session.
/// `PostgresFleetRegistry` keeps it in PostgreSQL next to the journal; `MemoryFleetRegistry`
/// in memory, for tests.
public protocol FleetRegistry: Sendable {
    /// Writes `node`'s heartbeat, extending its lease by `node.lease` from now (the store's
    /// clock). A node of that name that is live under another instance refuses it.
    /// - Throws: `FleetError.nameTaken`, or the store's error.
    func heartbeat(_ node: NodeRegistration) async throws

    /// Every node that ever beat, live or not, sorted by name.
    func nodes() async throws -> [NodeInfo]

    /// Makes `node` the session's owner when it has none, or when its owner's lease ran out;
    /// otherwise names the live owner.
    func claim(session: String, node: String) async throws -> ClaimOutcome

    /// The session's owner, when it has one (live or not).
    func owner(session: String) async throws -> NodeInfo?

    /// Marks `node` as stopped (its lease ends now), so that its sessions can be claimed at
    /// once, without waiting for the lease to run out.
    func leave(_ node: String) async throws
}

/// A call that only the session's owning node may serve reached another one.
public struct SessionElsewhere: Error, Sendable, CustomStringConvertible {
    public var session: String
    /// The live node that serves the session.
    public var owner: NodeInfo

    public init(session: String, owner: NodeInfo) {
        (self.session, self.owner) = (session, owner)
    }

    /// Seconds after which the owner's lease runs out unless it beats again: how long a
    /// client keeps retrying when the owner does not answer.
    public var retryAfterSeconds: Int { max(1, Int((owner.leaseSeconds - owner.sinceHeartbeat).rounded(.up)) + 1) }

    public var description: String {
        "session \(session) is served by node \(owner.name) at \(owner.address); send the call there (agentctl and the Brain follow this redirect themselves)"
    }
}

/// What can go wrong in the fleet, each with what to do.
public struct FleetError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// Another live node runs under this node's name.
        case nameTaken = "name-taken"
        /// This node could not renew its lease in time: it serves no session's calls until it
        /// can, since another node may have taken them over.
        case leaseLost = "lease-lost"
        /// A bad node name or address.
        case invalidArgument = "invalid-argument"
        /// The store did not answer.
        case store = "store"
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        (self.code, self.message) = (code, message)
    }

    public var description: String { message }

    /// Checks a node name: 1–63 of `a-z 0-9 -`, starting with a letter or digit.
    public static func validate(name: String) throws {
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789-")
        guard (1...63).contains(name.count), name.allSatisfy(allowed.contains), name.first != "-" else {
            throw FleetError(.invalidArgument, "node name '\(name)' is not usable: use 1–63 of a-z, 0-9 and '-', not starting with '-'")
        }
    }
}

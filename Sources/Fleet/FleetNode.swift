import Foundation
import Logging

/// This agentd's membership in a fleet: it beats in the store every interval, knows the other
/// nodes from there, and decides which node serves a session's calls.
///
/// Each session's calls (execute, task end, delete) are served by one node, its owner,
/// recorded in the store; so are the Hands of its tasks. Reads, wake and checkpoint are
/// served by every node. A node claims a session on its first call when the session has no
/// owner or its owner's lease ran out; otherwise the call is redirected to the owner.
///
/// Self-fencing: a node serves calls only while its own lease is valid by its own clock
/// (`lease - interval` after the last heartbeat it *sent* that the store took). Another node
/// can take a session over only once the store's clock says that lease ran out, which is at
/// least one interval later; so two nodes never both believe they serve one session, however
/// the store is slow or unreachable.
public actor FleetNode {
    /// Where a session's calls are served.
    public enum Placement: Sendable, Equatable {
        /// Here. `claimed` when this call made this node the owner in the store (its cached
        /// view of the session may be stale); `takenFrom` names the dead node it took the
        /// session from, when it did.
        case local(claimed: Bool, takenFrom: String?)
        /// By another, live node.
        case elsewhere(NodeInfo)
    }

    public nonisolated let registration: NodeRegistration
    public nonisolated let registry: any FleetRegistry
    private let logger: Logger
    /// Until when this node may serve calls (its lease by its own clock).
    private var validUntil: ContinuousClock.Instant?
    /// Sessions this node claimed while its lease stayed valid: no store round trip for them.
    private var owned: Set<String> = []
    /// Sessions this node took over from a dead node, with that node's name.
    private var takenFrom: [String: String] = [:]
    /// The nodes as the last heartbeat read them.
    private var known: [NodeInfo] = []
    private var failures = 0
    private var lastError: String?
    private var lastSuccess: ContinuousClock.Instant?

    /// - Parameters:
    ///   - registration: this node's name, address, instance, heartbeat interval and lease
    ///     (at least three intervals).
    ///   - registry: the store side.
    public init(registration: NodeRegistration, registry: any FleetRegistry, logger: Logger = Logger(label: "agentd.fleet")) throws {
        try FleetError.validate(name: registration.name)
        guard registration.interval > .zero, registration.lease >= registration.interval * 3 else {
            throw FleetError(
                .invalidArgument,
                "a node's lease (\(registration.lease)) must be at least three heartbeat intervals (\(registration.interval)), so that one late heartbeat does not end it")
        }
        self.registration = registration
        self.registry = registry
        self.logger = logger
    }

    public nonisolated var name: String { registration.name }

    /// Writes one heartbeat and reads the nodes back.
    /// - Throws: `FleetError.nameTaken` when a live node of another instance holds the name,
    ///   or the store's error.
    public func beat() async throws {
        let sent = ContinuousClock.now
        do {
            try await registry.heartbeat(registration)
            validUntil = sent + registration.lease - registration.interval
            lastSuccess = .now
            if failures > 0 { logger.notice("heartbeats reach the store again", metadata: ["missed": "\(failures)"]) }
            failures = 0
            lastError = nil
        } catch {
            failures += 1
            lastError = "\(error)"
            if !leaseValid { owned.removeAll() }
            throw error
        }
        if let nodes = try? await registry.nodes() { known = nodes }
    }

    /// Beats every interval until the task is cancelled.
    public func run() async {
        while !Task.isCancelled {
            do { try await Task.sleep(for: registration.interval) } catch { break }
            do {
                try await beat()
            } catch {
                logger.warning(
                    "heartbeat failed", metadata: ["node": "\(name)", "missed": "\(failures)", "lease-valid": "\(leaseValid)", "error": "\(error)"])
            }
        }
    }

    /// Marks this node stopped in the store, so that its sessions can be claimed at once
    /// rather than once its lease runs out; it serves no more calls.
    public func leave() async {
        validUntil = nil
        owned.removeAll()
        do { try await registry.leave(name) } catch { logger.warning("could not mark this node stopped in the store", metadata: ["error": "\(error)"]) }
    }

    /// True while this node may serve calls.
    public var leaseValid: Bool { validUntil.map { ContinuousClock.now < $0 } ?? false }

    /// Heartbeats in a row that did not reach the store (0 when the last one did).
    public var missedHeartbeats: Int { failures }

    /// The nodes as the last successful heartbeat read them (this one included).
    public var nodes: [NodeInfo] { known }

    /// The nodes as the store has them now (this one included), for health and metrics: a
    /// heartbeat's reading can be an interval old, and a node that died since would still show
    /// live. Falls back to the last heartbeat's reading when the store does not answer.
    public func currentNodes() async -> [NodeInfo] {
        if let nodes = try? await registry.nodes() { known = nodes }
        return known
    }

    /// Where the calls of `session` are served; with `claim`, this node becomes its owner when
    /// it has none or its owner is dead.
    /// - Throws: `FleetError.leaseLost` while this node's lease is not valid; the store's error.
    public func placement(of session: String, claim: Bool = true) async throws -> Placement {
        guard leaseValid else {
            owned.removeAll()
            let since = lastSuccess.map { " for \(Int((ContinuousClock.now - $0).components.seconds)) s" } ?? ""
            throw FleetError(
                .leaseLost,
                "node \(name) could not renew its lease in the store\(since) (\(lastError ?? "no heartbeat yet")), so it serves no calls until it can: another node may have taken its sessions over; retry, or send the call to another node")
        }
        if owned.contains(session) { return .local(claimed: false, takenFrom: nil) }
        guard claim else {
            if let owner = try await registry.owner(session: session), owner.name != name, owner.live { return .elsewhere(owner) }
            return .local(claimed: false, takenFrom: nil)
        }
        switch try await registry.claim(session: session, node: name) {
        case .claimed(let from):
            // A claim that reached the store after the lease lapsed is not trusted.
            guard leaseValid else { return try await placement(of: session, claim: claim) }
            owned.insert(session)
            if let from {
                takenFrom[session] = from
                logger.notice("took a session over from a dead node", metadata: ["session.id": "\(session)", "from": "\(from)"]) }
            return .local(claimed: true, takenFrom: from)
        case .elsewhere(let owner):
            return .elsewhere(owner)
        }
    }

    /// Throws `FleetError.leaseLost` unless this node's lease is valid: checked again right
    /// before a call's intent is journaled, so that a node whose lease lapsed while it
    /// prepared the call does not start it.
    public func checkLease() throws {
        guard leaseValid else {
            owned.removeAll()
            throw FleetError(.leaseLost, "node \(name) lost its lease in the store before the call started, so it did not run it; retry, or send the call to another node")
        }
    }

    /// The dead node this node took `session` over from, when it did: whoever rebuilds the
    /// session's state here first (maybe another call than the one that claimed it) says
    /// that node stopped.
    public func previousOwner(of session: String) -> String? { takenFrom[session] }

    /// Forgets that this node serves `session` (it was deleted, or found served elsewhere).
    public func forget(_ session: String) {
        owned.remove(session)
        takenFrom[session] = nil
    }
}

extension FleetNode {
    /// Parses a heartbeat interval or lease: a positive whole number of `ms` or `s` (`500ms`,
    /// `2s`), at most an hour.
    public static func parseDuration(_ text: String) throws -> Duration {
        let (digits, factor): (Substring, Int64) =
            text.hasSuffix("ms") ? (text.dropLast(2), 1) : text.hasSuffix("s") ? (text.dropLast(1), 1000) : ("", 0)
        guard factor > 0, let n = Int64(digits), n > 0, n * factor <= 3_600_000 else {
            throw FleetError(.invalidArgument, "takes a positive whole number of ms or s, at most an hour (e.g. 500ms, 2s), not '\(text)'")
        }
        return .milliseconds(n * factor)
    }

    /// The default node name: the host's name, lowercased, with what a node name cannot hold
    /// replaced by `-`.
    public static func defaultName() -> String {
        let host = ProcessInfo.processInfo.hostName.lowercased().split(separator: ".").first.map(String.init) ?? "node"
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789-")
        let cleaned = String(host.map { allowed.contains($0) ? $0 : "-" }.prefix(63))
        return cleaned.isEmpty || cleaned.first == "-" ? "node" : cleaned
    }
}

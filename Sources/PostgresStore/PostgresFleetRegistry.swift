import Fleet
import Foundation
import Logging
import PostgresNIO
import SessionLog

/// The fleet's registry in PostgreSQL, next to the journal (tables `nodes` and
/// `session_owners` of the journal's schema, migration 2).
///
/// Liveness is judged by the database's clock alone (`heartbeat_at + lease > now()`), so the
/// nodes' clocks need not agree. A claim is one statement: it inserts the owner row, or takes
/// it over only when the owner's lease ran out, under the row's lock; two nodes claiming one
/// session at once get one owner.
public struct PostgresFleetRegistry: FleetRegistry {
    let client: PostgresClient
    let schema: String
    let url: PostgresURL
    let logger: Logger

    /// The registry in `journal`'s database and schema, on its connection pool.
    public init(journal: PostgresJournal) {
        client = journal.client
        schema = journal.schema
        url = journal.url
        logger = Logger(label: "agentd.fleet.pg")
    }

    private static let columns = "name, address, instance, heartbeat_at, lease_ms, interval_ms, EXTRACT(EPOCH FROM (clock_timestamp() - heartbeat_at))::float8"

    public func heartbeat(_ node: NodeRegistration) async throws {
        let (interval, lease) = (Self.ms(node.interval), Self.ms(node.lease))
        let rows = try await run("heartbeat of node \(node.name)") {
            try await client.query(
                """
                INSERT INTO \(unescaped: schema).nodes AS n (name, address, instance, heartbeat_at, interval_ms, lease_ms)
                VALUES (\(node.name), \(node.address), \(node.instance), clock_timestamp(), \(interval), \(lease))
                ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, instance = EXCLUDED.instance, heartbeat_at = clock_timestamp(),
                    interval_ms = EXCLUDED.interval_ms, lease_ms = EXCLUDED.lease_ms,
                    started_at = CASE WHEN n.instance = EXCLUDED.instance THEN n.started_at ELSE clock_timestamp() END
                 WHERE n.instance = EXCLUDED.instance OR n.heartbeat_at + n.lease_ms * interval '1 millisecond' <= clock_timestamp()
                RETURNING name
                """, logger: logger
            ).collect()
        }
        guard rows.isEmpty else { return }
        let holder = try await nodes().first { $0.name == node.name }
        throw FleetError(
            .nameTaken,
            "node name '\(node.name)' is held by a live node at \(holder?.address ?? "?") (instance \(holder?.instance ?? "?"), last heartbeat \(String(format: "%.1f", holder?.sinceHeartbeat ?? 0)) s ago): give this agentd another --node, or stop that one")
    }

    public func nodes() async throws -> [NodeInfo] {
        let rows = try await run("reading the fleet's nodes") {
            try await client.query("SELECT \(unescaped: Self.columns) FROM \(unescaped: schema).nodes ORDER BY name", logger: logger).collect()
        }
        return try rows.map(Self.node)
    }

    public func claim(session: String, node: String) async throws -> ClaimOutcome {
        // One transaction: the owner row is read under its lock, then inserted or taken over
        // (only from a node whose lease ran out, by the database's clock).
        let (previous, now) = try await run("claiming session \(session) for node \(node)") {
            try await client.withTransaction(logger: logger) { conn -> (String?, String?) in
                var previous: String?
                for try await owner in try await conn.query(
                    "SELECT node FROM \(unescaped: schema).session_owners WHERE session_id = \(session) FOR UPDATE", logger: logger
                ).decode(String.self) {
                    previous = owner
                }
                var now: String?
                for try await owner in try await conn.query(
                    """
                    INSERT INTO \(unescaped: schema).session_owners AS o (session_id, node) VALUES (\(session), \(node))
                    ON CONFLICT (session_id) DO UPDATE
                        SET node = EXCLUDED.node,
                            since = CASE WHEN o.node = EXCLUDED.node THEN o.since ELSE now() END,
                            takeovers = o.takeovers + CASE WHEN o.node = EXCLUDED.node THEN 0 ELSE 1 END
                      WHERE o.node = EXCLUDED.node
                         OR NOT EXISTS (SELECT 1 FROM \(unescaped: schema).nodes n
                                         WHERE n.name = o.node AND n.heartbeat_at + n.lease_ms * interval '1 millisecond' > clock_timestamp())
                    RETURNING node
                    """, logger: logger
                ).decode(String.self) {
                    now = owner
                }
                return (previous, now)
            }
        }
        if now == node { return .claimed(takenFrom: previous.flatMap { $0 == node ? nil : $0 }) }
        if let owner = try await owner(session: session), owner.name != node { return .elsewhere(owner) }
        // The owner changed between the two statements (it stopped): try once more.
        return try await claim(session: session, node: node)
    }

    public func owner(session: String) async throws -> NodeInfo? {
        let rows = try await run("reading the owner of session \(session)") {
            try await client.query(
                """
                SELECT \(unescaped: Self.columns) FROM \(unescaped: schema).nodes
                 WHERE name = (SELECT node FROM \(unescaped: schema).session_owners WHERE session_id = \(session))
                """, logger: logger
            ).collect()
        }
        return try rows.first.map(Self.node)
    }

    public func leave(_ node: String) async throws {
        _ = try await run("marking node \(node) stopped") {
            try await client.query(
                "UPDATE \(unescaped: schema).nodes SET heartbeat_at = clock_timestamp() - lease_ms * interval '1 millisecond' WHERE name = \(node)",
                logger: logger
            ).collect()
        }
    }

    private static func node(_ row: PostgresRow) throws -> NodeInfo {
        let (name, address, instance, at, lease, interval, since) = try row.decode((String, String, String, Date, Int64, Int64, Double).self)
        return NodeInfo(
            name: name, address: address, instance: instance, heartbeatAt: at, leaseSeconds: Double(lease) / 1000, sinceHeartbeat: since,
            intervalSeconds: Double(interval) / 1000)
    }

    private static func ms(_ d: Duration) -> Int64 { d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000 }

    /// Runs a query; PostgreSQL's errors become a `FleetError` naming the server (never the
    /// password) and what was being done.
    private func run<T>(_ what: String, _ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as FleetError {
            throw error
        } catch {
            let detail = PostgresJournal.describe(error).detail
            throw FleetError(.store, "\(what) failed at PostgreSQL \(url) (schema \(schema)): \(detail)")
        }
    }
}

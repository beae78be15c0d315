import Foundation
import Logging
import PostgresNIO
import SessionLog

/// The store's schema, as versioned migrations applied in order at open. A migration is never
/// edited once released; a change is a new version. `schema_migrations` records which ran.
enum Migrations {
    /// `(version, description, statements)`; `{S}` stands for the store's schema name.
    static let all: [(version: Int, description: String, statements: [String])] = [
        (1, "sessions and events", [
            """
            CREATE TABLE {S}.sessions (
                session_id     text PRIMARY KEY,
                last_seq       bigint NOT NULL DEFAULT 0,
                head_hash      bytea  NOT NULL,
                lease_epoch    bigint NOT NULL DEFAULT 0,
                checkpoint_seq bigint NOT NULL DEFAULT 0
            )
            """,
            """
            CREATE TABLE {S}.events (
                session_id text   NOT NULL,
                seq        bigint NOT NULL,
                epoch      bigint NOT NULL,
                ts_nanos   bigint NOT NULL,
                type       text   NOT NULL,
                payload    bytea  NOT NULL,
                prev_hash  bytea  NOT NULL,
                hash       bytea  NOT NULL,
                PRIMARY KEY (session_id, seq)
            )
            """,
        ]),
        (2, "fleet: nodes and session owners", [
            """
            CREATE TABLE {S}.nodes (
                name         text PRIMARY KEY,
                address      text NOT NULL,
                instance     text NOT NULL,
                heartbeat_at timestamptz NOT NULL,
                interval_ms  bigint NOT NULL,
                lease_ms     bigint NOT NULL,
                started_at   timestamptz NOT NULL DEFAULT now()
            )
            """,
            """
            CREATE TABLE {S}.session_owners (
                session_id text PRIMARY KEY,
                node       text NOT NULL,
                since      timestamptz NOT NULL DEFAULT now(),
                takeovers  bigint NOT NULL DEFAULT 0
            )
            """,
        ]),
        // A node that lost a session to another while a call ran there must not journal that
        // call's result after the new owner journaled it *outcome unknown*: the database keeps
        // one settling event per intent (`settles`: the intent's seq).
        (3, "at most one event settles each tool intent", [
            "ALTER TABLE {S}.events ADD COLUMN settles bigint",
            "CREATE UNIQUE INDEX events_settles ON {S}.events (session_id, settles) WHERE settles IS NOT NULL",
        ]),
    ]

    /// Creates the schema and applies every migration not yet recorded, in one transaction
    /// serialised across nodes by an advisory lock (two nodes starting together apply each
    /// migration once).
    static func apply(_ client: PostgresClient, schema: String, logger: Logger) async throws {
        try await client.withTransaction(logger: logger) { conn in
            try await conn.query("SELECT pg_advisory_xact_lock(hashtext(\(schema)))", logger: logger)
            try await conn.query("CREATE SCHEMA IF NOT EXISTS \(unescaped: schema)", logger: logger)
            try await conn.query(
                "CREATE TABLE IF NOT EXISTS \(unescaped: schema).schema_migrations (version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                logger: logger)
            var applied = Set<Int>()
            for try await version in try await conn.query("SELECT version FROM \(unescaped: schema).schema_migrations", logger: logger).decode(Int.self) {
                applied.insert(version)
            }
            for migration in all where !applied.contains(migration.version) {
                for statement in migration.statements {
                    try await conn.query(PostgresQuery(unsafeSQL: statement.replacingOccurrences(of: "{S}", with: schema)), logger: logger)
                }
                try await conn.query(
                    "INSERT INTO \(unescaped: schema).schema_migrations (version, description) VALUES (\(migration.version), \(migration.description))",
                    logger: logger)
                logger.info("applied journal schema migration", metadata: ["version": "\(migration.version)", "schema": "\(schema)"])
            }
        }
    }
}

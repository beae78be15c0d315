import ArgumentParser
import Logging
import PostgresStore
import Runtime
import SessionLog

/// `--store`, `--store-url-file` and `--store-schema`: where sessions are kept, for every
/// subcommand that opens the Session store.
struct StoreOptions: ParsableArguments {
    @Option(
        name: .customLong("store"),
        help: "Where sessions are kept: `file` (the journal under --state-dir, the default) or `postgres` (a PostgreSQL database, URL from --store-url-file).")
    var kind = "file"

    @Option(help: "With --store postgres: a file holding postgres://USER:PASSWORD@HOST:PORT/DATABASE, optionally with ?sslmode=verify-full&sslrootcert=CAFILE (libpq's sslmode values; the default, prefer, does not check the server's certificate) — the URL never goes on the command line; default $CREDENTIALS_DIRECTORY/postgres-url (systemd's LoadCredential=postgres-url:PATH).")
    var storeUrlFile: String?

    @Option(help: "With --store postgres: the database schema of agentd's tables (1-40 of [a-z0-9_]); migrations are applied at start.")
    var storeSchema = "agentd"

    /// The options every store is opened with: its event ceiling covers the largest limit any
    /// policy may set; each session's own policy limit is enforced by the runtime.
    static let journalOptions = SessionStoreOptions(maxEventBytes: Runtime.journalEventCeiling)

    /// The Session store `--store` names: the file journal under `stateDir`, or PostgreSQL
    /// with the URL read from a file (so its password is in no argv and no log).
    func open(stateDir: String, environment: [String: String]) async throws -> any SessionJournal {
        switch kind {
        case "file":
            return try await Self.openFile(stateDir: stateDir)
        case "postgres":
            return try await openPostgres(environment: environment)
        default:
            throw ValidationError("--store takes `file` or `postgres`, not '\(kind)'")
        }
    }

    /// The file journal under `stateDir`.
    static func openFile(stateDir: String) async throws -> SessionStore {
        try await SessionStore.open(
            directory: stateDir + "/journal", options: journalOptions, redactor: Redactor(), logger: Logger(label: "agentd.journal"))
    }

    /// The PostgreSQL store, its URL from `--store-url-file` or the systemd credential.
    func openPostgres(environment: [String: String]) async throws -> PostgresJournal {
        guard let file = storeUrlFile ?? environment["CREDENTIALS_DIRECTORY"].map({ $0 + "/postgres-url" }) else {
            throw ValidationError(
                "--store postgres needs the URL in a file: pass --store-url-file PATH (a file holding postgres://USER:PASSWORD@HOST:PORT/DATABASE), or run under systemd with LoadCredential=postgres-url:PATH")
        }
        return try await PostgresJournal.open(
            urlFile: file, schema: storeSchema, options: Self.journalOptions, redactor: Redactor(), logger: Logger(label: "agentd.pgstore"))
    }
}

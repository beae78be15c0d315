import Foundation
import NIOCore
import Synchronization
import PostgresNIO
import SessionLog

/// What the journal does when the server goes away under it (a restart, a failover, a cut
/// network): the pool reconnects by itself; an append whose commit outcome is unknown is
/// looked up; a follow reads again once the server answers.
extension PostgresJournal {
    /// Whether `error` means the connection was lost or could not be made (rather than the
    /// server refusing a statement): the driver's connection errors, SQLSTATE class 08
    /// (connection exception) and 57P01–57P03 (the server shutting down or starting up), and
    /// the pool failing to connect.
    static func isConnectionLoss(_ error: any Error) -> Bool {
        if let t = error as? PostgresTransactionError, let inner = t.closureError ?? t.beginError ?? t.commitError { return isConnectionLoss(inner) }
        if let p = error as? PSQLError {
            // clientClosedConnection: the driver closed a connection the server had dropped
            // (the pool's side of a restart); the caller checks the journal is not closed.
            if [.serverClosedConnection, .clientClosedConnection, .connectionError, .uncleanShutdown].contains(p.code) { return true }
            if p.code == .server, let state = p.serverInfo?[.sqlState] { return state.hasPrefix("08") || state.hasPrefix("57P") }
            return false
        }
        if error is StatementTimeout { return true }
        return "\(type(of: error))" == "ConnectionPoolError" && "\(error)".contains("CircuitBreaker")
    }

    /// How long one statement may go unanswered before its caller is told so: an append or a
    /// read takes milliseconds, and after a server restart postgres-nio 1.33.2's pool was seen
    /// to leave a request waiting forever (README, "Statements that never answer").
    static let statementSeconds: Double = 15

    /// Runs `body`, or throws `StatementTimeout` once `seconds` have passed without its answer.
    /// The race is unstructured on purpose: a stuck statement does not answer cancellation, and
    /// a task group would wait for it. The stuck statement is left to finish (or not) on its
    /// own; the caller treats its outcome as unknown.
    func bounded<T: Sendable>(_ what: String, seconds: Double = PostgresJournal.statementSeconds, _ body: @escaping @Sendable () async throws -> T)
        async throws -> T
    {
        let once = OnceFlag()
        return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let work = Task {
                do {
                    let value = try await body()
                    if once.claim() { continuation.resume(returning: value) }
                } catch {
                    if once.claim() { continuation.resume(throwing: error) }
                }
            }
            Task {
                try? await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
                if once.claim() {
                    work.cancel()
                    continuation.resume(throwing: StatementTimeout(what: what, seconds: seconds))
                }
            }
        }
    }

    /// Runs an idempotent read, again when its connection was lost (up to 4 more times, 100 to
    /// 800 ms apart): after a restart the pool may hand out a connection whose closing it has
    /// not noticed yet, and a read has nothing to lose by trying once more.
    func reading<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        var attempt = 0
        while true {
            do {
                return try await bounded("a read", body)
            } catch where Self.isConnectionLoss(error) && attempt < 4 && !isClosed {
                attempt += 1
                try await Task.sleep(for: .milliseconds(50 << attempt))
            }
        }
    }

    /// The stored hash of `seq` of `session` (nil when there is no such row), asked on a
    /// connection of its own, not the pool's: right after a restart a pooled request was seen
    /// to wait forever. Tries again (100 ms apart) until `seconds` have passed.
    func lookUpHash(_ session: SessionID, seq: UInt64, seconds: Double) async throws -> [UInt8]? {
        let deadline = ContinuousClock.now + .seconds(seconds)
        var configuration = PostgresConnection.Configuration(
            host: url.host, port: url.port, username: url.user, password: url.password, database: url.database, tls: try url.connectionTLS())
        configuration.options.connectTimeout = .seconds(3)
        while true {
            do {
                let connection = try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger)
                defer { Task { try? await connection.close() } }
                let rows = try await connection.query(
                    "SELECT hash FROM \(unescaped: schema).events WHERE session_id = \(session.rawValue) AND seq = \(Int64(seq))", logger: logger)
                for try await h in rows.decode(ByteBuffer.self) { return Array(h.readableBytesView) }
                return nil
            } catch {
                if ContinuousClock.now >= deadline || isClosed { throw error }
                try await Task.sleep(for: .milliseconds(100))
            }
        }
    }

    /// After an append's connection was lost: whether the event `seq` with `hash` is in the
    /// database (the commit happened before the connection went). Asks on a connection of its
    /// own (`lookUpHash`), for about 15 s at most.
    /// - Returns: true when it committed; false when it did not — then the error thrown to the
    ///   caller is the original one, saying nothing was stored.
    /// - Throws: `.ioError` when the database cannot say (still unreachable): the outcome is
    ///   unknown and the message tells the caller to read the session before retrying.
    func resolveUnknownOutcome(_ session: SessionID, seq: UInt64, hash: [UInt8], what: String, error: any Error) async throws -> Bool {
        let detail = (error as? StatementTimeout)?.description ?? Self.describe(error).detail
        if "\(type(of: error))" == "ConnectionPoolError" {
            // No connection was ever made: the statement was not sent.
            throw translate(error, "\(what) to session \(session)")
        }
        let stored: [UInt8]?
        do {
            stored = try await lookUpHash(session, seq: seq, seconds: 15)
        } catch let asking {
            logger.warning("journal append outcome unknown", metadata: ["session.id": "\(session)", "seq": "\(seq)"])
            throw SessionLogError(
                .ioError,
                "\(what) to session \(session) at PostgreSQL \(url) (schema \(schema)): the connection was lost while the statement was being committed (\(detail)) and the database could not be asked afterwards (\(Self.describe(asking).detail)); the event may or may not be stored as seq \(seq) — read the session (its last seq and events) once the server is back before retrying"
            )
        }
        if stored == hash {
            logger.info("journal append committed before its connection was lost", metadata: ["session.id": "\(session)", "seq": "\(seq)"])
            return true
        }
        throw SessionLogError(
            .ioError,
            "\(what) to session \(session) failed at PostgreSQL \(url) (schema \(schema)): the connection was lost or did not answer (\(detail)); the database was asked afterwards and the event was not stored — retry")
    }
}

/// A statement that got no answer within `PostgresJournal.statementSeconds`: treated like a
/// lost connection (its outcome is unknown).
struct StatementTimeout: Error, CustomStringConvertible {
    let what: String
    let seconds: Double
    var description: String { "no answer to \(what) within \(Int(seconds)) s" }
}

/// Set once, by whichever of two racers gets there first.
final class OnceFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func claim() -> Bool { flag.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged }
}

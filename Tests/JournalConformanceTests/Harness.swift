import Foundation
import PostgresNIO
import Testing

@testable import PostgresStore
@testable import SessionLog

/// The two `SessionJournal` implementations every conformance test runs over.
enum Backend: String, CaseIterable, CustomStringConvertible, Sendable {
    case file
    case postgres
    var description: String { rawValue }
}

/// A journal under test with what only a test may do to it: damage a record behind the store's
/// back, look for bytes in its storage, and clean up.
struct Harness {
    let journal: any SessionJournal
    /// Changes one byte of the stored payload of `seq`, outside the store's API.
    let damage: @Sendable (SessionID, UInt64) async throws -> Void
    /// Whether `bytes` occur anywhere in what the store stored.
    let stores: @Sendable ([UInt8]) async throws -> Bool
    /// The PostgreSQL journal, when the backend is PostgreSQL.
    let postgres: PostgresJournal?
}

struct MissingPostgres: Error, CustomStringConvertible {
    var description: String {
        "AGENTD_POSTGRES_URL_FILE is not set: run scripts/env-up and source .agentd-env/env (CI=true makes this a failure, never a skip)"
    }
}

/// Runs `body` over a fresh journal of `backend`: a new directory, or a new PostgreSQL schema
/// dropped afterwards. Without PostgreSQL (no `AGENTD_POSTGRES_URL_FILE`) the PostgreSQL case
/// fails under `CI=true` and is skipped (with a note) otherwise.
func withJournal(_ backend: Backend, redactor: Redactor = Redactor(), _ body: (Harness) async throws -> Void) async throws {
    switch backend {
    case .file:
        let dir = NSTemporaryDirectory() + "agentd-conformance-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try await SessionStore.open(directory: dir, options: SessionStoreOptions(segmentBytes: 1 << 20), redactor: redactor)
        let harness = Harness(
            journal: store,
            damage: { session, seq in
                let loc = store.lock.withLock { store.table[session]!.locs[Int(seq - 1)] }
                let path = dir + "/" + SegmentFile.name(loc.segment)
                let fd = open(path, O_RDWR)
                precondition(fd >= 0)
                var b: UInt8 = 0
                let last = off_t(loc.offset + UInt64(loc.length) - 1)
                precondition(pread(fd, &b, 1, last) == 1)
                b ^= 0x01
                precondition(pwrite(fd, &b, 1, last) == 1)
                close(fd)
            },
            stores: { needle in
                var all: [UInt8] = []
                for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
                    if let d = FileManager.default.contents(atPath: dir + "/" + name) { all.append(contentsOf: d) }
                }
                return !Redactor.replace(needle, with: [], in: all).elementsEqual(all)
            },
            postgres: nil)
        do {
            try await body(harness)
        } catch {
            try? await store.close()
            throw error
        }
        try await store.close()
    case .postgres:
        guard let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"] else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { throw MissingPostgres() }
            print("note: \(MissingPostgres()); the PostgreSQL case is skipped")
            return
        }
        let schema = "conf_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(16)
        let store = try await PostgresJournal.open(urlFile: file, schema: String(schema), redactor: redactor)
        let harness = Harness(
            journal: store,
            damage: { session, seq in
                try await store.client.query(
                    "UPDATE \(unescaped: store.schema).events SET payload = payload || '\\x00'::bytea WHERE session_id = \(session.rawValue) AND seq = \(Int64(seq))")
            },
            stores: { needle in
                let rows = try await store.client.query(
                    """
                    SELECT count(*) FROM \(unescaped: store.schema).events
                     WHERE position(\(ByteBuffer(bytes: needle)) IN payload) > 0 OR position(convert_to(\(String(decoding: needle, as: UTF8.self)), 'UTF8') IN convert_to(type, 'UTF8')) > 0
                    """)
                for try await n in rows.decode(Int64.self) { return n > 0 }
                return false
            },
            postgres: store)
        var failure: (any Error)?
        do { try await body(harness) } catch { failure = error }
        if store.isClosed {
            // The test closed it: drop the schema through a second handle.
            let again = try await PostgresJournal.open(urlFile: file, schema: store.schema)
            _ = try? await again.client.query("DROP SCHEMA \(unescaped: store.schema) CASCADE")
            try await again.close()
        } else {
            _ = try? await store.client.query("DROP SCHEMA \(unescaped: store.schema) CASCADE")
            try await store.close()
        }
        if let failure { throw failure }
    }
}

func sid(_ s: String) -> SessionID { try! SessionID(s) }

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Every event of a session through the protocol's replay.
func allEvents(_ journal: any SessionJournal, _ session: SessionID, after: UInt64 = 0) async throws -> [Event] {
    var out: [Event] = []
    for try await e in journal.events(session: session, after: after) { out.append(e) }
    return out
}

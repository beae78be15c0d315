import Foundation
import PostgresNIO
import TestSupport
import Testing

@testable import PostgresStore
@testable import SessionLog

/// `agentd migrate-journal`, the real binary: a file journal on disk copied into the
/// environment's real PostgreSQL, then checked through `PostgresJournal`.
@Suite("agentd migrate-journal")
struct MigrateJournalTests {
    struct Run {
        let status: Int32
        let output: String
    }

    /// Runs `agentd migrate-journal ARGS` and returns its exit status and output.
    static func migrate(_ arguments: [String]) throws -> Run {
        let binary = Components.buildProductsDirectory.appendingPathComponent("agentd").path
        let result = try TestCommand.run([binary, "migrate-journal"] + arguments)
        return Run(status: result.status, output: result.output)
    }

    static func events(_ journal: any SessionJournal, _ id: SessionID) async throws -> [Event] {
        var out: [Event] = []
        for try await e in journal.events(session: id) { out.append(e) }
        return out
    }

    /// One line of the output: the one naming `session` (the first word says what happened).
    static func line(_ run: Run, _ session: String) -> String {
        run.output.split(separator: "\n").first { $0.contains(" \(session): ") }.map(String.init) ?? ""
    }

    @Test("migrate-journal copies every session verbatim (same events, same chain head, lease epoch and checkpoint; fencing holds), resumes a part-copied one, skips what is there on a re-run, reports a damaged file session with its seq and refuses a conflicting PostgreSQL session — never printing the password")
    func migratesAJournal() async throws {
        let urlFile = try PostgresStoreTests.urlFile()
        let url = try PostgresURL.read(file: urlFile)
        let schema = "mig_" + String((0..<10).map { _ in "abcdefghijklmnopqrstuvwxyz".randomElement()! })
        let base = "/tmp/agentd-migrate-\(Components.testID())"
        let state = base + "/state"
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let common = ["--state-dir", state, "--store", "postgres", "--store-url-file", urlFile, "--store-schema", schema]
        let (alpha, bulk, partial, broken, clash) = try (SessionID("alpha"), SessionID("bulk"), SessionID("partial"), SessionID("broken"), SessionID("clash"))

        // The host's file journal: leases, checkpoints, plain events, one session damaged.
        let file = try await SessionStore.open(directory: state + "/journal", options: SessionStoreOptions(segmentBytes: 4 << 20))
        let first = try await file.wake(session: alpha)
        for i in 0..<20 { try await file.append(session: alpha, type: "tool.intent", payload: Array("{\"i\":\(i)}".utf8), epoch: first.epoch) }
        try await file.checkpoint(session: alpha, state: Array("{\"brain\":\"state one\"}".utf8), epoch: first.epoch)
        for i in 0..<5 { try await file.append(session: alpha, type: "tool.result", payload: Array("{\"r\":\(i)}".utf8), epoch: first.epoch) }
        let second = try await file.wake(session: alpha)
        try await file.checkpoint(session: alpha, state: Array("{\"brain\":\"state two\"}".utf8), epoch: second.epoch)
        for i in 0..<3 { try await file.append(session: alpha, type: "tool.intent", payload: Array("{\"after\":\(i)}".utf8), epoch: second.epoch) }
        try await file.append(session: alpha, type: "note", payload: Array("{}".utf8))
        let bulkCount = 20_000
        let filler = String(repeating: "x", count: 180)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<32 {
                group.addTask {
                    for i in stride(from: w, to: bulkCount, by: 32) {
                        try await file.append(session: bulk, type: "tool.output", payload: Array("{\"n\":\(i),\"f\":\"\(filler)\"}".utf8))
                    }
                }
            }
            try await group.waitForAll()
        }
        for i in 0..<30 { try await file.append(session: partial, type: "e", payload: Array("{\"p\":\(i)}".utf8)) }
        for i in 0..<10 { try await file.append(session: broken, type: "e", payload: Array("{\"b\":\(i)}".utf8)) }
        for i in 0..<5 { try await file.append(session: clash, type: "e", payload: Array("{\"file\":\(i)}".utf8)) }
        var expected: [SessionID: (events: [Event], verify: VerifyReport)] = [:]
        for id in [alpha, bulk, partial] { expected[id] = (try await Self.events(file, id), try await file.verify(session: id)) }
        let alphaSnapshot = try await file.getSession(alpha)
        let brokenLoc = file.lock.withLock { file.table[broken]!.locs[3] }
        try await file.close()
        // Seq 4 of `broken` rots on disk: one payload byte flipped.
        let segment = state + "/journal/" + SegmentFile.name(brokenLoc.segment)
        let fd = open(segment, O_RDWR)
        #expect(fd >= 0)
        var byte: UInt8 = 0
        let at = off_t(brokenLoc.offset + UInt64(brokenLoc.length) - 1)
        #expect(pread(fd, &byte, 1, at) == 1)
        byte ^= 0x01
        #expect(pwrite(fd, &byte, 1, at) == 1)
        close(fd)

        let pg = try await PostgresJournal.open(urlFile: urlFile, schema: schema)
        do {
            // In PostgreSQL already: `clash` with other events; the first 12 events of
            // `partial` (an import cut off part-way).
            for i in 0..<3 { try await pg.append(session: clash, type: "e", payload: Array("{\"pg\":\(i)}".utf8)) }
            let clashBefore = try await Self.events(pg, clash)
            let prefix = Array(expected[partial]!.events.prefix(12))
            let pre = try await pg.importSession(partial, events: AsyncStream { c in prefix.forEach { c.yield($0) }; c.finish() })
            #expect(pre.outcome == .copied && pre.lastSeq == 12)

            // agentd running on the state dir (here: this process holding the journal): refused.
            let holder = try await SessionStore.open(directory: state + "/journal")
            let locked = try Self.migrate(common)
            try await holder.close()
            #expect(locked.status != 0)
            #expect(locked.output.lowercased().contains("lock"), "\(locked.output)")

            // A dry run says what it would do and writes nothing.
            let dry = try Self.migrate(common + ["--dry-run"])
            #expect(dry.status == 1, "\(dry.output)")
            #expect(Self.line(dry, "alpha").hasPrefix("to copy"), "\(dry.output)")
            #expect(Self.line(dry, "partial").hasPrefix("to resume"), "\(dry.output)")
            #expect(try await pg.lastSeq(session: alpha) == 0)
            #expect(try await pg.lastSeq(session: partial) == 12)

            let run = try Self.migrate(common)
            print(run.output)
            #expect(run.status == 1, "damaged and conflicting sessions make the exit status non-zero: \(run.output)")
            #expect(Self.line(run, "alpha").hasPrefix("copied"), "\(run.output)")
            #expect(Self.line(run, "bulk").hasPrefix("copied"), "\(run.output)")
            #expect(Self.line(run, "partial").hasPrefix("resumed"), "\(run.output)")
            #expect(Self.line(run, "partial").contains("seq 13–30"), "\(run.output)")
            #expect(Self.line(run, "broken").hasPrefix("damaged"), "\(run.output)")
            #expect(Self.line(run, "broken").contains("seq 4"), "\(run.output)")
            #expect(Self.line(run, "clash").hasPrefix("conflict"), "\(run.output)")
            #expect(run.output.contains("5 sessions: 2 copied, 1 resumed, 0 already in PostgreSQL, 2 failed"), "\(run.output)")
            let password = try #require(url.password)
            for r in [locked, dry, run] { #expect(!r.output.contains(password), "the password must never be printed") }

            // Same events, same chain head, same epoch and checkpoint.
            for (id, want) in expected {
                #expect(try await Self.events(pg, id) == want.events, "\(id)")
                let report = try await pg.verify(session: id)
                #expect(report.isIntact, "\(report)")
                #expect(report.lastHash == want.verify.lastHash, "\(id)")
                #expect(report.verifiedRecords == want.verify.verifiedRecords)
            }
            let snapshot = try await pg.getSession(alpha)
            #expect(snapshot.checkpoint == alphaSnapshot.checkpoint)
            #expect(snapshot.events == alphaSnapshot.events)
            #expect(snapshot.leaseEpoch == second.epoch && snapshot.lastSeq == alphaSnapshot.lastSeq)
            // Nothing of the damaged session; the conflicting one untouched.
            #expect(try await pg.lastSeq(session: broken) == 0)
            #expect(try await Self.events(pg, clash) == clashBefore)

            // A re-run copies nothing.
            let again = try Self.migrate(common)
            #expect(again.status == 1)
            for id in ["alpha", "bulk", "partial"] { #expect(Self.line(again, id).hasPrefix("present"), "\(again.output)") }
            let some = try Self.migrate(common + ["--session", "alpha", "--session", "bulk"])
            #expect(some.status == 0, "\(some.output)")
            #expect(some.output.contains("2 sessions: 0 copied, 0 resumed, 2 already in PostgreSQL, 0 failed"), "\(some.output)")

            // Fencing carried over: the old Brain's epoch is refused, the current one appends.
            await #expect(throws: SessionLogError.self) { try await pg.append(session: alpha, type: "late", payload: Array("{}".utf8), epoch: first.epoch) }
            do {
                try await pg.append(session: alpha, type: "late", payload: Array("{}".utf8), epoch: first.epoch)
            } catch let e as SessionLogError {
                #expect(e.code == .staleEpoch)
            }
            let next = try await pg.append(session: alpha, type: "tool.intent", payload: Array("{}".utf8), epoch: second.epoch)
            #expect(next == alphaSnapshot.lastSeq + 1)
            #expect(try await pg.verify(session: alpha).isIntact)
        } catch {
            _ = try? await pg.client.query("DROP SCHEMA \(unescaped: schema) CASCADE")
            try? await pg.close()
            throw error
        }
        _ = try? await pg.client.query("DROP SCHEMA \(unescaped: schema) CASCADE")
        try await pg.close()
    }
}

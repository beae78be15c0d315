import ArgumentParser
import Foundation
import PostgresStore
import SessionLog

/// `agentd migrate-journal`: copies a host's file journal into PostgreSQL, verbatim.
struct MigrateJournal: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate-journal",
        abstract: "Copy the sessions of a host's file journal (--state-dir) into PostgreSQL (--store postgres), verbatim.",
        discussion: """
            Every event keeps its seq, lease epoch, timestamp, type and payload, so each session's SHA-256 chain \
            has the same hashes in PostgreSQL; lease epochs and checkpoints carry over (fencing and getSession \
            behave as before). Each session is verified in the file journal first (a damaged one is reported with \
            its broken seq and not copied) and in PostgreSQL afterwards (same last hash). Running it again skips \
            sessions already copied, resumes one cut off part-way, and refuses (never overwrites) a session \
            PostgreSQL holds with other events. agentd must not be running on --state-dir: the journal's lock is \
            taken. Exit status 1 when any session was not copied.
            """)

    @Option(help: "The state directory of the host whose journal (DIR/journal) is copied.")
    var stateDir: String

    @OptionGroup var store: StoreOptions

    @Option(name: .customLong("session"), help: "Copy only this session (repeatable); default every session.")
    var sessions: [String] = []

    @Flag(help: "Verify and compare only: report what would be copied, write nothing.")
    var dryRun = false

    func validate() throws {
        guard store.kind == "postgres" else {
            throw ValidationError("migrate-journal copies into PostgreSQL: pass --store postgres (and --store-url-file PATH)")
        }
    }

    func run() async throws {
        let journalDir = stateDir + "/journal"
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: journalDir, isDirectory: &isDir), isDir.boolValue else {
            throw ValidationError("there is no file journal at \(journalDir): pass the --state-dir of the host to migrate")
        }
        let wanted = try sessions.map { try SessionID($0) }
        let source = try await StoreOptions.openFile(stateDir: stateDir)  // takes the journal's lock
        let target: PostgresJournal
        do {
            target = try await store.openPostgres(environment: ProcessInfo.processInfo.environment)
        } catch {
            try? await source.close()
            throw error
        }
        let report = await Migration(source: source, sourceDirectory: journalDir, target: target, dryRun: dryRun).run(wanted.isEmpty ? source.sessions() : wanted) { print($0) }
        try? await target.close()
        try? await source.close()
        print(report.summary)
        if report.failed > 0 { throw ExitCode(1) }
    }
}

/// One run of the migration: each session verified, imported and verified again.
struct Migration {
    let source: SessionStore
    /// Where `source` is (for messages).
    let sourceDirectory: String
    let target: PostgresJournal
    let dryRun: Bool

    struct Report {
        var copied = 0, resumed = 0, present = 0, failed = 0
        var events: UInt64 = 0
        var seconds = 0.0
        var dryRun = false

        var summary: String {
            let total = copied + resumed + present + failed
            let rate = seconds > 0 ? Int(Double(events) / seconds) : 0
            let verb = dryRun ? "would copy" : "copied"
            return "migrate-journal\(dryRun ? " (dry run)" : ""): \(total) sessions: \(copied) \(dryRun ? "to copy" : "copied"), \(resumed) \(dryRun ? "to resume" : "resumed"), \(present) already in PostgreSQL, \(failed) failed; \(verb) \(events) events in \(String(format: "%.2f", seconds)) s (\(rate) events/s)"
        }
    }

    func run(_ sessions: [SessionID], line: (String) -> Void) async -> Report {
        var report = Report(dryRun: dryRun)
        let start = ContinuousClock.now
        for id in sessions {
            do {
                let r = try await migrate(id)
                report.events += r.copied
                switch r.outcome {
                case .copied: report.copied += 1
                case .resumed: report.resumed += 1
                case .present: report.present += 1
                }
                line(Self.line(r, dryRun: dryRun))
            } catch let e as SessionLogError {
                report.failed += 1
                line("\(Self.failureWord(e)) \(id): \(e.message)")
            } catch {
                report.failed += 1
                line("failed   \(id): \(error)")
            }
        }
        let d = ContinuousClock.now - start
        report.seconds = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        return report
    }

    static func failureWord(_ e: SessionLogError) -> String {
        switch e.code {
        case .damaged: "damaged "
        case .importConflict: "conflict"
        default: "failed  "
        }
    }

    static func line(_ r: PostgresJournal.ImportResult, dryRun: Bool) -> String {
        let head = "seq \(r.lastSeq), epoch \(r.leaseEpoch), head \(r.lastHash.prefix(16))…"
        switch r.outcome {
        case .copied: return "\(dryRun ? "to copy " : "copied  ") \(r.session): \(r.copied) events (\(head))"
        case .resumed: return "\(dryRun ? "to resume" : "resumed ") \(r.session): seq \(r.existing + 1)–\(r.lastSeq) (seq 1–\(r.existing) were in PostgreSQL; \(head))"
        case .present: return "present  \(r.session): already in PostgreSQL (\(head))"
        }
    }

    /// Verifies the file session, imports it, and checks PostgreSQL's chain ends where the
    /// file's does, with the same lease epoch.
    func migrate(_ id: SessionID) async throws -> PostgresJournal.ImportResult {
        let before: VerifyReport
        do {
            before = try await source.verify(session: id)
        } catch let e as SessionLogError where e.code == .notFound {
            throw SessionLogError(.notFound, "no such session in the file journal at \(sourceDirectory)")
        }
        if let broken = before.firstBroken {
            throw SessionLogError(
                .damaged,
                "the file journal's chain is broken at seq \(broken.seq) (\(broken.segment) offset \(broken.offset): \(broken.reason)); \(before.verifiedRecords) records verified before it — not copied")
        }
        let result = try await target.importSession(id, events: source.events(session: id), dryRun: dryRun)
        guard result.lastHash == before.lastHash else {
            throw SessionLogError(
                .damaged, "the events read from the file journal hash to \(result.lastHash), its verify to \(before.lastHash) — the journal changed while it was read; run again")
        }
        if dryRun { return result }
        let after = try await target.verify(session: id)
        guard after.isIntact, after.lastHash == before.lastHash, after.verifiedRecords == before.verifiedRecords else {
            throw SessionLogError(.ioError, "after the copy, PostgreSQL's verify disagrees with the file journal's: \(after) (file: \(before))")
        }
        let (fileEpoch, pgEpoch) = (source.leaseEpoch(session: id), try await target.leaseEpoch(session: id))
        guard fileEpoch == pgEpoch else {
            throw SessionLogError(.ioError, "after the copy, the lease epoch is \(pgEpoch) in PostgreSQL and \(fileEpoch) in the file journal")
        }
        return result
    }
}

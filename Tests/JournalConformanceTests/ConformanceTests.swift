import Foundation
import PostgresNIO
import Testing

@testable import PostgresStore
@testable import SessionLog

/// One suite over both `SessionJournal` implementations: what the Runtime relies on must hold
/// on the file journal and on PostgreSQL alike.
@Suite("SessionJournal conformance")
struct ConformanceTests {
    @Test(arguments: Backend.allCases)
    func appendsReplayInOrder(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let a = sid("alpha"), b = sid("beta")
            for i in 1...40 {
                let sa = try await j.append(session: a, type: "tool.intent", payload: bytes("{\"i\":\(i)}"), epoch: nil)
                let sb = try await j.append(session: b, type: "tool.result", payload: bytes("{\"j\":\(i)}"), epoch: nil)
                #expect(sa == UInt64(i) && sb == UInt64(i))
            }
            let events = try await allEvents(j, a)
            #expect(events.map(\.seq) == Array(1...40))
            #expect(events.map(\.payloadText) == (1...40).map { "{\"i\":\($0)}" })
            #expect(events.allSatisfy { $0.type == "tool.intent" && $0.session == a })
            #expect(try await allEvents(j, b, after: 35).map(\.payloadText) == (36...40).map { "{\"j\":\($0)}" })
            #expect(try await j.event(session: a, seq: 7)?.payloadText == "{\"i\":7}")
            #expect(try await j.event(session: a, seq: 41) == nil)
            #expect(try await j.lastSeq(session: a) == 40)
            #expect(try await j.lastSeq(session: sid("nobody")) == 0)
            #expect(try await j.sessions() == [a, b])
            let reserved = await #expect(throws: SessionLogError.self) { try await j.append(session: a, type: "agentd.lease", payload: [], epoch: nil) }
            #expect(reserved?.code == .invalidArgument)
        }
    }

    @Test(arguments: Backend.allCases)
    func staleAndUnknownEpochsAreRefused(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let s = sid("fenced")
            let first = try await j.wake(session: s)
            #expect(first.epoch == 1 && first.seq == 1)
            try await j.append(session: s, type: "step", payload: bytes("{}"), epoch: 1)
            let second = try await j.wake(session: s)
            #expect(second.epoch == 2 && second.seq == 3)
            let stale = await #expect(throws: SessionLogError.self) { try await j.append(session: s, type: "step", payload: bytes("{}"), epoch: 1) }
            #expect(stale?.code == .staleEpoch)
            #expect(stale?.message.contains("epoch 1 is stale") == true)
            let unknown = await #expect(throws: SessionLogError.self) { try await j.checkpoint(session: s, state: bytes("{}"), epoch: 9) }
            #expect(unknown?.code == .unknownEpoch)
            #expect(try await j.leaseEpoch(session: s) == 2)
            #expect(try await j.lastSeq(session: s) == 3)
            try await j.append(session: s, type: "step", payload: bytes("{}"), epoch: 2)
            #expect(try await allEvents(j, s).map(\.type) == [leaseEventType, "step", leaseEventType, "step"])
            #expect(try await allEvents(j, s).map(\.epoch) == [1, 1, 2, 2])
        }
    }

    /// The fencing lives in the database: another node's wake, done directly in SQL, is
    /// honoured by the next append without any state cached in this process.
    @Test func postgresRefusesAStaleEpochSetByAnotherNode() async throws {
        try await withJournal(.postgres) { h in
            guard let pg = h.postgres else { return }
            let s = sid("other-node")
            let lease = try await pg.wake(session: s)
            try await pg.client.query("UPDATE \(unescaped: pg.schema).sessions SET lease_epoch = lease_epoch + 1 WHERE session_id = \(s.rawValue)")
            let stale = await #expect(throws: SessionLogError.self) { try await pg.append(session: s, type: "step", payload: bytes("{}"), epoch: lease.epoch) }
            #expect(stale?.code == .staleEpoch)
            #expect(try await pg.lastSeq(session: s) == 1)
        }
    }

    @Test func postgresKeepsOneSettlingEventPerIntent() async throws {
        try await withJournal(.postgres) { h in
            guard let pg = h.postgres else { return }
            let s = sid("settle")
            let intent = try await pg.append(session: s, type: "tool.intent", payload: bytes("{}"), epoch: nil)
            let other = try await pg.append(session: s, type: "tool.intent", payload: bytes("{}"), epoch: nil)
            let first = try await pg.append(session: s, type: "tool.interrupted", payload: bytes("{}"), epoch: nil, settling: intent)
            // A second settling event for the same intent (another node's late result): refused,
            // nothing written, the chain goes on.
            let refused = await #expect(throws: SessionLogError.self) {
                try await pg.append(session: s, type: "tool.result", payload: bytes("{}"), epoch: nil, settling: intent)
            }
            #expect(refused?.code == .alreadySettled, "\(String(describing: refused))")
            #expect(try await pg.lastSeq(session: s) == first)
            // Another intent, and plain appends, are not held up.
            let second = try await pg.append(session: s, type: "tool.result", payload: bytes("{}"), epoch: nil, settling: other)
            #expect(second == first + 1)
            #expect(try await pg.append(session: s, type: "step", payload: bytes("{}"), epoch: nil) == second + 1)
            #expect(try await pg.verify(session: s).isIntact)
        }
    }

    @Test(arguments: Backend.allCases)
    func verifyNamesTheDamagedSeq(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let s = sid("chain")
            _ = try await j.wake(session: s)
            for i in 2...10 { try await j.append(session: s, type: "step", payload: bytes("{\"n\":\(i)}"), epoch: 1) }
            let intact = try await j.verify(session: s)
            #expect(intact.isIntact && intact.verifiedRecords == 10)
            try await h.damage(s, 6)
            let report = try await j.verify(session: s)
            #expect(!report.isIntact)
            #expect(report.firstBroken?.seq == 6)
            #expect(report.verifiedRecords == 5)
            let missing = await #expect(throws: SessionLogError.self) { try await j.verify(session: sid("never")) }
            #expect(missing?.code == .notFound)
        }
    }

    @Test(arguments: Backend.allCases)
    func followDeliversHistoryThenLiveAppends(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let s = sid("live")
            try await j.append(session: s, type: "old", payload: bytes("1"), epoch: nil)
            try await j.append(session: s, type: "old", payload: bytes("2"), epoch: nil)
            let (progress, tell) = AsyncStream.makeStream(of: Int.self)
            let follower = Task {
                var seen: [Event] = []
                for try await e in j.follow(session: s, after: 0) {
                    seen.append(e)
                    tell.yield(seen.count)
                    if seen.count == 5 { break }
                }
                return seen
            }
            var iterator = progress.makeAsyncIterator()
            // Live appends only once the history has been delivered.
            while let n = await iterator.next(), n < 2 {}
            for i in 3...5 { try await j.append(session: s, type: "new", payload: bytes("\(i)"), epoch: nil) }
            let seen = try await follower.value
            #expect(seen.map(\.seq) == [1, 2, 3, 4, 5])
            #expect(seen.map(\.payloadText) == ["1", "2", "3", "4", "5"])
        }
    }

    @Test(arguments: Backend.allCases)
    func followEndsWhenCancelled(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let s = sid("quiet")
            try await j.append(session: s, type: "one", payload: bytes("1"), epoch: nil)
            let (progress, tell) = AsyncStream.makeStream(of: Int.self)
            let follower = Task {
                var count = 0
                for try await _ in j.follow(session: s, after: 0) {
                    count += 1
                    tell.yield(count)
                }
                return count
            }
            var iterator = progress.makeAsyncIterator()
            _ = await iterator.next()
            follower.cancel()
            #expect(try await follower.value == 1)
        }
    }

    @Test(arguments: Backend.allCases)
    func checkpointsStartTheSnapshot(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let s = sid("resumable")
            let lease = try await j.wake(session: s)
            for i in 1...3 { try await j.append(session: s, type: "step", payload: bytes("\(i)"), epoch: lease.epoch) }
            let cp = try await j.checkpoint(session: s, state: bytes("{\"brain\":1}"), epoch: lease.epoch)
            #expect(cp == 5)
            for i in 4...5 { try await j.append(session: s, type: "step", payload: bytes("\(i)"), epoch: lease.epoch) }
            let snap = try await j.getSession(s)
            #expect(snap.checkpoint?.seq == 5)
            #expect(snap.checkpoint?.state == bytes("{\"brain\":1}"))
            #expect(snap.events.map(\.seq) == [6, 7])
            #expect(snap.leaseEpoch == 1 && snap.lastSeq == 7)
        }
    }

    @Test(arguments: Backend.allCases)
    func snapshotOfAnUnknownSessionIsNotFound(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            try await j.append(session: sid("someone"), type: "x", payload: [], epoch: nil)
            let missing = await #expect(throws: SessionLogError.self) { try await j.getSession(sid("nobody")) }
            #expect(missing?.code == .notFound)
            let snap = try await j.getSession(sid("someone"))
            #expect(snap.checkpoint == nil && snap.events.count == 1)
        }
    }

    @Test(arguments: Backend.allCases)
    func sixtyFourWritersOnOneSessionLoseAndDuplicateNothing(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let s = sid("crowded")
            let perWriter = 10
            try await withThrowingTaskGroup(of: [UInt64].self) { group in
                for w in 0..<64 {
                    group.addTask {
                        var seqs: [UInt64] = []
                        for i in 0..<perWriter { seqs.append(try await j.append(session: s, type: "w", payload: bytes("\(w)-\(i)"), epoch: nil)) }
                        return seqs
                    }
                }
                var acknowledged: [UInt64] = []
                for try await seqs in group { acknowledged += seqs }
                #expect(acknowledged.sorted() == Array(1...UInt64(64 * perWriter)))
            }
            let events = try await allEvents(j, s)
            #expect(events.map(\.seq) == Array(1...UInt64(64 * perWriter)))
            let expected = Set((0..<64).flatMap { w in (0..<perWriter).map { "\(w)-\($0)" } })
            #expect(Set(events.map(\.payloadText)) == expected && events.count == expected.count)
            // Each writer's events are in its own order.
            for w in 0..<64 {
                let mine = events.filter { $0.payloadText.hasPrefix("\(w)-") }.map(\.payloadText)
                #expect(mine == (0..<perWriter).map { "\(w)-\($0)" })
            }
            #expect(try await j.verify(session: s).isIntact)
        }
    }

    @Test(arguments: Backend.allCases)
    func sixtyFourWritersOnSixtyFourSessionsLoseAndDuplicateNothing(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let perWriter = 10
            let ids = (0..<64).map { sid("s\($0)") }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for id in ids {
                    group.addTask {
                        for i in 0..<perWriter { try await j.append(session: id, type: "w", payload: bytes("\(i)"), epoch: nil) }
                    }
                }
                try await group.waitForAll()
            }
            #expect(try await j.sessions() == ids.sorted())
            for id in ids {
                let events = try await allEvents(j, id)
                #expect(events.map(\.seq) == Array(1...UInt64(perWriter)))
                #expect(events.map(\.payloadText) == (0..<perWriter).map { "\($0)" })
            }
            #expect(try await j.verify(session: ids[17]).isIntact)
        }
    }

    @Test(arguments: Backend.allCases)
    func secretsAreRedactedBeforeTheyAreStored(_ backend: Backend) async throws {
        let token = "ghp_ConformanceSecret0123456789"
        let redactor = Redactor([try Secret(name: "github", value: token)])
        try await withJournal(backend, redactor: redactor) { h in
            let j = h.journal
            let s = sid("secretive")
            try await j.append(session: s, type: "tool.result", payload: bytes("{\"out\":\"token=\(token)\"}"), epoch: nil)
            try await j.checkpoint(session: s, state: bytes("{\"env\":\"\(token)\"}"), epoch: nil)
            let events = try await allEvents(j, s)
            #expect(events.map(\.payloadText) == ["{\"out\":\"token=[REDACTED:github]\"}", "{\"env\":\"[REDACTED:github]\"}"])
            if backend == .file { try await j.close() }  // flush the index too before looking at the bytes
            #expect(try await h.stores(bytes(token)) == false)
            #expect(try await h.stores(bytes("[REDACTED:github]")) == true)
        }
    }

    @Test(arguments: Backend.allCases)
    func aClosedJournalRefusesCalls(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            try await j.append(session: sid("a"), type: "x", payload: [], epoch: nil)
            try await j.close()
            let closed = await #expect(throws: SessionLogError.self) { try await j.append(session: sid("a"), type: "x", payload: [], epoch: nil) }
            #expect(closed?.code == .closed)
        }
    }
}

@Suite("PostgresStore specifics")
struct PostgresSpecificTests {
    @Test func urlParsingNeverShowsThePassword() throws {
        let url = try PostgresURL(parsing: "postgres://agentd:s3cr%40t@127.0.0.1:5433/agentd\n")
        #expect(url.host == "127.0.0.1" && url.port == 5433 && url.user == "agentd" && url.database == "agentd")
        #expect(url.password == "s3cr@t")
        #expect("\(url)" == "postgres://agentd@127.0.0.1:5433/agentd")
        let bad = #expect(throws: SessionLogError.self) { try PostgresURL(parsing: "mysql://agentd:hunter2@h/db") }
        #expect(bad?.message.contains("hunter2") == false)
    }

    @Test func anUnreachableServerIsAClearErrorWithoutThePassword() async throws {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let url = try PostgresURL(parsing: "postgres://agentd:Unreachable99@127.0.0.1:1/agentd")
        let error = await #expect(throws: SessionLogError.self) { try await PostgresJournal.open(url: url, schema: "never_created") }
        #expect(error?.code == .ioError)
        #expect(error?.message.contains("127.0.0.1:1") == true, "\(error?.message ?? "")")
        #expect(error?.message.contains("Unreachable99") == false)
    }

    @Test func aWrongPasswordIsAClearErrorWithoutThePassword() async throws {
        guard let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"] else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { throw MissingPostgres() }
            return
        }
        let good = try PostgresURL.read(file: file)
        let wrong = try PostgresURL(parsing: "postgres://\(good.user):WrongPassword42@\(good.host):\(good.port)/\(good.database)")
        let error = await #expect(throws: SessionLogError.self) { try await PostgresJournal.open(url: wrong, schema: "never_created") }
        #expect(error?.code == .ioError)
        #expect(error?.message.contains("WrongPassword42") == false)
        #expect(error?.message.contains("\(good.host):\(good.port)") == true)
        #expect(error?.message.contains("password authentication failed") == true, "\(error?.message ?? "")")
    }

    /// Two nodes (two journals on one schema) appending to one session at once: the database
    /// orders them, nothing is lost or duplicated, the chain holds; a follower on one node sees
    /// the other node's appends through NOTIFY.
    @Test func twoNodesShareASessionWithoutLossOrDuplicates() async throws {
        try await withJournal(.postgres) { h in
            guard let a = h.postgres else { return }
            let b = try await PostgresJournal.open(urlFile: ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"]!, schema: a.schema)
            let s = sid("shared")
            let perWriter = 10
            let (progress, tell) = AsyncStream.makeStream(of: Int.self)
            let follower = Task {
                var seen: [UInt64] = []
                for try await e in b.follow(session: s, after: 0) {
                    seen.append(e.seq)
                    tell.yield(seen.count)
                    if seen.count == 1 + 2 * 8 * perWriter { break }
                }
                return seen
            }
            try await a.append(session: s, type: "first", payload: [], epoch: nil)
            var iterator = progress.makeAsyncIterator()
            _ = await iterator.next()  // b's follower is live
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (node, journal) in [a, b].enumerated() {
                    for w in 0..<8 {
                        group.addTask {
                            for i in 0..<perWriter { try await journal.append(session: s, type: "w", payload: bytes("\(node)-\(w)-\(i)"), epoch: nil) }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let events = try await allEvents(a, s)
            #expect(events.map(\.seq) == Array(1...UInt64(1 + 2 * 8 * perWriter)))
            #expect(Set(events.dropFirst().map(\.payloadText)).count == 2 * 8 * perWriter)
            #expect(try await b.verify(session: s).isIntact)
            #expect(try await follower.value == Array(1...UInt64(1 + 2 * 8 * perWriter)))
            // A wake on b fences a's Brain, though a's cache still holds the old epoch.
            let first = try await a.wake(session: s)
            let second = try await b.wake(session: s)
            let stale = await #expect(throws: SessionLogError.self) { try await a.append(session: s, type: "late", payload: [], epoch: first.epoch) }
            #expect(stale?.code == .staleEpoch)
            try await a.append(session: s, type: "current", payload: [], epoch: second.epoch)
            try await b.close()
        }
    }

    /// A node that dies between a commit and its NOTIFY (here: one that never notifies): a
    /// follower on another node still sees its events, at its next periodic re-read.
    @Test func aFollowerSeesEventsWhoseNotifyNeverCame() async throws {
        try await withJournal(.postgres) { h in
            guard let a = h.postgres else { return }
            let b = try await PostgresJournal.open(
                urlFile: ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"]!, schema: a.schema, followRecheck: .milliseconds(200))
            let s = sid("silent-writer")
            try await a.append(session: s, type: "first", payload: [], epoch: nil)
            let (progress, tell) = AsyncStream.makeStream(of: UInt64.self)
            let follower = Task {
                var seen: [UInt64] = []
                for try await e in b.follow(session: s, after: 0) {
                    seen.append(e.seq)
                    tell.yield(e.seq)
                    if seen.count == 4 { break }
                }
                return seen
            }
            var iterator = progress.makeAsyncIterator()
            #expect(await iterator.next() == 1)
            // Parked on the notifier: from here only a notification or a re-read wakes it.
            try await waitUntil("b's follower waits for a notification") { b.notifier.isWaiting(session: s) }
            a.announcer.silence()
            for i in 2...4 { try await a.append(session: s, type: "unannounced", payload: bytes("\(i)"), epoch: nil) }
            let watchdog = Task {
                try await Task.sleep(for: .seconds(30))
                follower.cancel()
            }
            #expect(try await follower.value == [1, 2, 3, 4])
            watchdog.cancel()
            try await b.close()
        }
    }

    @Test func migrationsAreRecordedAndAppliedOnce() async throws {
        try await withJournal(.postgres) { h in
            guard let pg = h.postgres else { return }
            // A second node opening the same schema applies nothing again.
            let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"]!
            let again = try await PostgresJournal.open(urlFile: file, schema: pg.schema)
            try await again.close()
            var versions: [Int] = []
            for try await v in try await pg.client.query("SELECT version FROM \(unescaped: pg.schema).schema_migrations ORDER BY version").decode(Int.self) {
                versions.append(v)
            }
            #expect(versions == Migrations.all.map(\.version))
        }
    }
}

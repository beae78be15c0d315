import Foundation
import Testing

@testable import SessionLog

@Suite("SessionLog basics")
struct JournalBasicsTests {
    @Test func crc32cMatchesTheCastagnoliCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
    }

    @Test func sessionIDsAreSinglePathComponents() throws {
        for good in ["a", "session-1", "A.b_c-9", String(repeating: "x", count: 128)] {
            #expect(throws: Never.self) { try SessionID(good) }
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../etc", "a b", "é", "a\0b", String(repeating: "x", count: 129)] {
            let error = #expect(throws: SessionLogError.self) { try SessionID(bad) }
            #expect(error?.code == .invalidSessionID)
        }
    }

    @Test func appendsReplayInOrderAcrossReopen() async throws {
        try await withTempDirectory { dir in
            let a = sid("alpha"), b = sid("beta")
            var store = try await SessionStore.open(directory: dir)
            for i in 1...50 {
                let sa = try await store.append(session: a, type: "tool.intent", payload: json("{\"i\":\(i)}"))
                let sb = try await store.append(session: b, type: "tool.result", payload: json("{\"j\":\(i)}"))
                #expect(sa == UInt64(i) && sb == UInt64(i))
            }
            let before = try await allEvents(store, a)
            #expect(before.map(\.seq) == Array(1...50))
            #expect(before[9].payloadText == "{\"i\":10}" && before[9].type == "tool.intent")
            let tail = try await allEvents(store, b, after: 45)
            #expect(tail.map(\.seq) == [46, 47, 48, 49, 50])
            #expect(store.sessions() == [a, b])
            try await store.close()

            store = try await SessionStore.open(directory: dir)
            #expect(store.recovery.usedIndex)
            #expect(try await allEvents(store, a) == before)
            #expect(try await store.append(session: a, type: "x", payload: json("{}")) == 51)
            let report = try await store.verify(session: a)
            #expect(report.isIntact && report.verifiedRecords == 51, "\(report)")
            try await store.close()
            await #expect(throws: SessionLogError.self) { try await store.append(session: a, type: "x", payload: []) }
        }
    }

    @Test func secondOpenOfTheSameDirectoryIsRefused() async throws {
        try await withTempDirectory { dir in
            let store = try await SessionStore.open(directory: dir)
            let error = await #expect(throws: SessionLogError.self) { try await SessionStore.open(directory: dir) }
            #expect(error?.code == .locked)
            try await store.close()
            let again = try await SessionStore.open(directory: dir)
            try await again.close()
            // A path that cannot be a directory is a clear SessionLogError, not a Foundation one.
            let notADir = await #expect(throws: SessionLogError.self) { try await SessionStore.open(directory: dir + "/LOCK/journal") }
            #expect(notADir?.code == .ioError && notADir?.message.contains("LOCK/journal") == true)
        }
    }

    @Test func followDeliversEventsAsTheyBecomeDurable() async throws {
        try await withTempDirectory { dir in
            let store = try await SessionStore.open(directory: dir)
            let s = sid("live")
            try await store.append(session: s, type: "first", payload: json("1"))
            let follower = Task {
                var seen: [UInt64] = []
                for try await e in store.follow(session: s) {
                    seen.append(e.seq)
                    if seen.count == 5 { break }
                }
                return seen
            }
            for i in 2...5 {
                try await Task.sleep(for: .milliseconds(20))
                try await store.append(session: s, type: "next", payload: json("\(i)"))
            }
            #expect(try await follower.value == [1, 2, 3, 4, 5])
            // A parked follower ends when its task is cancelled.
            let cancelled = Task { () -> Int in
                var n = 0
                for try await _ in store.follow(session: s, after: 5) { n += 1 }
                return n
            }
            try await Task.sleep(for: .milliseconds(50))
            cancelled.cancel()
            #expect(try await cancelled.value == 0)
            // A follower parked on a session ends when the store closes.
            let parked = Task { () -> Int in
                var n = 0
                for try await _ in store.follow(session: s, after: 5) { n += 1 }
                return n
            }
            try await Task.sleep(for: .milliseconds(50))
            try await store.close()
            #expect(try await parked.value == 0)
        }
    }

    @Test func checkpointLetsGetSessionSkipTheHistory() async throws {
        try await withTempDirectory { dir in
            let store = try await SessionStore.open(directory: dir)
            let s = sid("brain")
            let lease = try await store.wake(session: s)
            for i in 1...10 { try await store.append(session: s, type: "step", payload: json("\(i)"), epoch: lease.epoch) }
            let cp = try await store.checkpoint(session: s, state: json("{\"summary\":\"ten steps\"}"), epoch: lease.epoch)
            for i in 11...13 { try await store.append(session: s, type: "step", payload: json("\(i)"), epoch: lease.epoch) }
            let snap = try await store.getSession(s)
            #expect(snap.checkpoint?.seq == cp && cp == 12)
            #expect(snap.checkpoint?.state == json("{\"summary\":\"ten steps\"}"))
            #expect(snap.events.map(\.payloadText) == ["11", "12", "13"])
            #expect(snap.leaseEpoch == 1 && snap.lastSeq == 15)
            try await store.close()
            // Survives a reopen without the index too.
            try FileManager.default.removeItem(atPath: dir + "/index.bin")
            let again = try await SessionStore.open(directory: dir)
            #expect(!again.recovery.usedIndex)
            let snap2 = try await again.getSession(s)
            #expect(snap2.checkpoint == snap.checkpoint && snap2.events == snap.events && snap2.leaseEpoch == 1)
            let missing = await #expect(throws: SessionLogError.self) { try await again.getSession(sid("nobody")) }
            #expect(missing?.code == .notFound)
            try await again.close()
        }
    }

    @Test func getSessionDoesNotReadHistoryBeforeTheCheckpoint() async throws {
        try await withTempDirectory { dir in
            var store = try await SessionStore.open(directory: dir)
            let s = sid("resume")
            for i in 1...100 { try await store.append(session: s, type: "step", payload: json("{\"i\":\(i)}")) }
            try await store.checkpoint(session: s, state: json("{\"upTo\":100}"))
            try await store.append(session: s, type: "step", payload: json("{\"i\":101}"))
            let early = locations(store)[s]![4]  // seq 5
            try await store.close()
            // Damage an early record behind the index's back: only a full replay reaches it.
            flipBit(path: dir + "/" + SegmentFile.name(early.segment), offset: early.offset + UInt64(early.length) - 3, bit: 2)
            store = try await SessionStore.open(directory: dir)
            let snap = try await store.getSession(s)
            #expect(snap.checkpoint?.seq == 101 && snap.events.map(\.seq) == [102])
            let full = await #expect(throws: SessionLogError.self) { try await allEvents(store, s) }
            #expect(full?.code == .damaged && full?.offset == early.offset, "\(String(describing: full))")
            try await store.close()
        }
    }

    @Test func staleEpochAppendIsRefusedAfterWake() async throws {
        try await withTempDirectory { dir in
            var store = try await SessionStore.open(directory: dir)
            let s = sid("fenced")
            let first = try await store.wake(session: s)
            #expect(first.epoch == 1)
            try await store.append(session: s, type: "step", payload: json("1"), epoch: first.epoch)
            let second = try await store.wake(session: s)
            #expect(second.epoch == 2)
            let stale = await #expect(throws: SessionLogError.self) {
                try await store.append(session: s, type: "step", payload: json("late"), epoch: first.epoch)
            }
            #expect(stale?.code == .staleEpoch)
            #expect(stale?.message.contains("lease epoch 1 is stale; a newer Brain holds epoch 2") == true, "\(String(describing: stale))")
            let bogus = await #expect(throws: SessionLogError.self) {
                try await store.append(session: s, type: "step", payload: json("x"), epoch: 7)
            }
            #expect(bogus?.code == .unknownEpoch)
            try await store.append(session: s, type: "step", payload: json("2"), epoch: second.epoch)
            #expect(try await allEvents(store, s).filter { $0.type == "step" }.map(\.payloadText) == ["1", "2"])
            try await store.close()

            // The fence is durable: after a restart (without the index) the old epoch stays refused.
            try FileManager.default.removeItem(atPath: dir + "/index.bin")
            store = try await SessionStore.open(directory: dir)
            #expect(store.leaseEpoch(session: s) == 2)
            await #expect(throws: SessionLogError.self) { try await store.append(session: s, type: "step", payload: [], epoch: 1) }
            #expect(try await store.wake(session: s).epoch == 3)
            try await store.close()
        }
    }

    @Test func badInputIsRefusedWithClearErrors() async throws {
        try await withTempDirectory { dir in
            let store = try await SessionStore.open(directory: dir, options: SessionStoreOptions(maxEventBytes: 1000))
            let s = sid("limits")
            let big = await #expect(throws: SessionLogError.self) {
                try await store.append(session: s, type: "big", payload: [UInt8](repeating: 0x61, count: 1001))
            }
            #expect(big?.code == .eventTooLarge)
            #expect(big?.message.contains("1001 bytes; the limit is 1000") == true)
            let reserved = await #expect(throws: SessionLogError.self) { try await store.append(session: s, type: "agentd.lease", payload: []) }
            #expect(reserved?.code == .invalidArgument)
            await #expect(throws: SessionLogError.self) { try await store.append(session: s, type: "", payload: []) }
            // Nothing refused reached the log.
            #expect(store.lastSeq(session: s) == 0)
            try await store.append(session: s, type: "ok", payload: [UInt8](repeating: 0x61, count: 1000))
            #expect(store.lastSeq(session: s) == 1)
            try await store.close()
        }
    }

    @Test func redactedSecretsNeverReachTheDisk() async throws {
        try await withTempDirectory { dir in
            let token = "ghp_SuperSecretToken1234567890"
            let key = "sk-ant-api03-verysecret"
            let redactor = Redactor([try Secret(name: "github", value: token)])
            let store = try await SessionStore.open(directory: dir, options: SessionStoreOptions(segmentBytes: 64 << 10), redactor: redactor)
            redactor.add(try Secret(name: "anthropic", value: key))
            #expect("\(try Secret(name: "x", value: token))".contains(token) == false)
            let s = sid("secretive")
            try await store.append(session: s, type: "tool.result", payload: json("{\"out\":\"token=\(token) and \(key)\(token)\"}"))
            try await store.checkpoint(session: s, state: json("{\"env\":\"\(key)\"}"))
            let events = try await allEvents(store, s)
            #expect(events[0].payloadText == "{\"out\":\"token=[REDACTED:github] and [REDACTED:anthropic][REDACTED:github]\"}")
            #expect(events[1].payloadText == "{\"env\":\"[REDACTED:anthropic]\"}")
            try await store.close()
            let disk = allBytes(under: dir)
            #expect(!contains(disk, Array(token.utf8)) && !contains(disk, Array(key.utf8)))
            #expect(contains(disk, Array("[REDACTED:github]".utf8)))
        }
    }

    @Test func deletedOrCorruptIndexIsRebuiltWithIdenticalResults() async throws {
        try await withTempDirectory { dir in
            let options = SessionStoreOptions(segmentBytes: 64 << 10)
            var store = try await SessionStore.open(directory: dir, options: options)
            let ids = (0..<5).map { sid("s\($0)") }
            for i in 0..<1000 {
                try await store.append(session: ids[i % 5], type: "e", payload: json("{\"i\":\(i),\"pad\":\"\(String(repeating: "p", count: i % 300))\"}"))
            }
            try await store.checkpoint(session: ids[0], state: json("{}"))
            var expected: [SessionID: [Event]] = [:]
            for s in ids { expected[s] = try await allEvents(store, s) }
            try await store.close()
            let segments = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix("seg-") }
            #expect(segments.count > 2, "the log rolled over several segments")

            for damage in ["delete", "corrupt", "truncate"] {
                let index = dir + "/index.bin"
                switch damage {
                case "delete": try FileManager.default.removeItem(atPath: index)
                case "corrupt": flipBit(path: index, offset: 40, bit: 3)
                default: truncate(index, 30)
                }
                store = try await SessionStore.open(directory: dir, options: options)
                #expect(!store.recovery.usedIndex, "\(damage): index must not be trusted")
                #expect(store.recovery.indexProblem != nil)
                for s in ids { #expect(try await allEvents(store, s) == expected[s], "\(damage): \(s)") }
                #expect(try await store.getSession(ids[0]).checkpoint?.seq == 201)
                try await store.close()
            }
            store = try await SessionStore.open(directory: dir, options: options)
            #expect(store.recovery.usedIndex)
            try await store.close()

            // A whole segment file gone is damage, located by name; the sessions it held are refused.
            try FileManager.default.removeItem(atPath: dir + "/" + SegmentFile.name(2))
            store = try await SessionStore.open(directory: dir, options: options)
            #expect(store.recovery.damage.contains { $0.segment == SegmentFile.name(2) && $0.reason.contains("missing") }, "\(store.recovery)")
            #expect(!store.recovery.damagedSessions.isEmpty)
            for s in store.recovery.damagedSessions {
                await #expect(throws: SessionLogError.self) { try await allEvents(store, s) }
            }
            try await store.close()
        }
    }

    @Test func verifyReportsTheFirstBrokenLink() async throws {
        try await withTempDirectory { dir in
            var store = try await SessionStore.open(directory: dir)
            let s = sid("chain"), other = sid("bystander")
            for i in 1...20 {
                try await store.append(session: s, type: "e", payload: json("{\"i\":\(i)}"))
                try await store.append(session: other, type: "e", payload: json("{\"i\":\(i)}"))
            }
            #expect(try await store.verify(session: s).isIntact)
            let loc = locations(store)[s]![9]  // seq 10
            try await store.close()
            // Rewrite seq 10's payload and fix both checksums: only the hash chain can tell.
            let path = dir + "/" + SegmentFile.name(loc.segment)
            let fd = open(path, O_RDWR)
            var record = [UInt8](repeating: 0, count: Int(loc.length))
            _ = record.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(loc.offset)) }
            record[record.count - 2] ^= 0x01  // a digit of the payload
            let sidLen = Int(record[18])
            let body = CRC32C.checksum(Array(record[16...]))
            let identity = CRC32C.checksum(Array(record[16..<(88 + sidLen)]))
            withUnsafeBytes(of: body.littleEndian) { for i in 0..<4 { record[8 + i] = $0[i] } }
            withUnsafeBytes(of: identity.littleEndian) { for i in 0..<4 { record[12 + i] = $0[i] } }
            _ = record.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(loc.offset)) }
            close(fd)

            store = try await SessionStore.open(directory: dir)
            let report = try await store.verify(session: s)
            #expect(report.firstBroken?.seq == 11, "\(report)")
            #expect(report.verifiedRecords == 10)
            #expect(report.firstBroken?.segment == SegmentFile.name(loc.segment))
            #expect(try await store.verify(session: other).isIntact)
            try await store.close()

            // Without the index, recovery walks the chain itself and refuses the session.
            try FileManager.default.removeItem(atPath: dir + "/index.bin")
            store = try await SessionStore.open(directory: dir)
            #expect(store.recovery.damagedSessions == [s])
            let refused = await #expect(throws: SessionLogError.self) { try await allEvents(store, s) }
            #expect(refused?.code == .damaged)
            #expect(refused?.message.contains("hash chain is broken") == true, "\(String(describing: refused))")
            await #expect(throws: SessionLogError.self) { try await store.append(session: s, type: "e", payload: []) }
            #expect(try await allEvents(store, other).count == 20)
            try await store.close()
        }
    }

    @Test func manyLongReplaysAtOnceAllComplete() async throws {
        try await withTempDirectory { dir in
            let store = try await SessionStore.open(directory: dir)
            let s = sid("long")
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<16 {
                    group.addTask { for n in 0..<320 { try await store.append(session: s, type: "e", payload: json("{\"w\":\(w),\"n\":\(n)}")) } }
                }
                try await group.waitForAll()
            }
            // More concurrent replays than the blocking pool has threads, each reading chunks
            // big enough to be decoded by two threads at once.
            let counts = try await withThrowingTaskGroup(of: Bool.self) { group in
                for _ in 0..<40 {
                    group.addTask { try await allEvents(store, s).map(\.seq) == Array(1...5120) }
                }
                var ok: [Bool] = []
                for try await r in group { ok.append(r) }
                return ok
            }
            #expect(counts.count == 40 && counts.allSatisfy { $0 })
            try await store.close()
        }
    }

    @Test func manyConcurrentWritersShareGroupCommits() async throws {
        try await withTempDirectory { dir in
            let store = try await SessionStore.open(directory: dir)
            let ids = (0..<16).map { sid("w\($0)") }
            let acked = try await withThrowingTaskGroup(of: [(SessionID, UInt64)].self) { group in
                for w in 0..<64 {
                    group.addTask {
                        var mine: [(SessionID, UInt64)] = []
                        for n in 0..<25 {
                            let s = ids[w % 16]
                            mine.append((s, try await store.append(session: s, type: "w", payload: json("{\"w\":\(w),\"n\":\(n)}"))))
                        }
                        return mine
                    }
                }
                var all: [(SessionID, UInt64)] = []
                for try await part in group { all += part }
                return all
            }
            #expect(acked.count == 64 * 25)
            for s in ids {
                let seqs = acked.filter { $0.0 == s }.map(\.1).sorted()
                #expect(seqs == Array(1...100))
                #expect(try await store.verify(session: s).isIntact)
            }
            try await store.close()
        }
    }
}

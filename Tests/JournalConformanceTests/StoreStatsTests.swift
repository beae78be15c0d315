import Foundation
import Testing

@testable import PostgresStore
@testable import SessionLog

/// `storeStats`: what `/metrics` shows of the Session store.
@Suite("Store statistics")
struct StoreStatsTests {
    @Test("storeStats counts every write with its latency, and a refusal (stale epoch) is not a store error", arguments: Backend.allCases)
    func countsWrites(_ backend: Backend) async throws {
        try await withJournal(backend) { h in
            let j = h.journal
            let before = try #require(j.storeStats)
            #expect(before.store == backend.rawValue)
            let s = sid("stats")
            let lease = try await j.wake(session: s)
            for i in 0..<10 { try await j.append(session: s, type: "e", payload: bytes("{\"i\":\(i)}"), epoch: lease.epoch) }
            try await j.checkpoint(session: s, state: bytes("{}"), epoch: lease.epoch)
            _ = try await j.wake(session: s)
            await #expect(throws: SessionLogError.self) { try await j.append(session: s, type: "e", payload: [], epoch: lease.epoch) }
            _ = try await allEvents(j, s)
            let after = try #require(j.storeStats)
            #expect(after.appendSeconds.count - before.appendSeconds.count == 14)
            #expect(after.appendSeconds.sum > before.appendSeconds.sum)
            #expect(after.appendErrors == before.appendErrors)
            #expect(after.appendSeconds.cumulativeCounts.last! <= after.appendSeconds.count)
            if backend == .postgres { #expect(after.readSeconds.count > before.readSeconds.count) }
        }
    }
}

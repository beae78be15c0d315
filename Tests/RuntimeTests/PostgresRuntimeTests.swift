import Foundation
import Hands
import Policy
import PostgresNIO
import PostgresStore
import SessionLog
import Testing

@testable import Runtime

/// The Runtime over the PostgreSQL store through the `SessionJournal` seam: what the file
/// journal's tests show, on a real PostgreSQL, and a second node answering from the store.
@Suite("Runtime over PostgreSQL")
struct PostgresRuntimeTests {
    @Test("execute, replay by key, wake fencing the old Brain, and a second node answering the key from the store")
    func runtimeOverPostgres() async throws {
        guard let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"] else {
            if ProcessInfo.processInfo.environment["CI"] == "true" {
                throw RuntimeTestFailure("AGENTD_POSTGRES_URL_FILE is not set: run scripts/env-up and source .agentd-env/env")
            }
            return
        }
        let directory = NSTemporaryDirectory() + "agentd-runtime-pg-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try policyYAML("default").write(toFile: directory + "/default.yaml", atomically: true, encoding: .utf8)
        let policies = PolicyStore(directory: directory)
        let schema = "rt_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(16)
        let options = SessionStoreOptions(maxEventBytes: Runtime.journalEventCeiling)
        let nodeA = try await PostgresJournal.open(urlFile: file, schema: String(schema), options: options)
        let nodeB = try await PostgresJournal.open(urlFile: file, schema: String(schema), options: options)
        let (driverA, driverB) = (FakeDriver(), FakeDriver())
        let runtimeA = Runtime(store: nodeA, hands: HandsManager(driver: driverA, instance: "pg-a"), policies: policies)
        let runtimeB = Runtime(store: nodeB, hands: HandsManager(driver: driverB, instance: "pg-b"), policies: policies)
        var failure: (any Error)?
        do {
            let id = try await runtimeA.createSession(policy: nil).id
            let first = try await runtimeA.execute(session: id, tool: "bash", input: bash("echo one"), idempotencyKey: "k1")
            let again = try await runtimeA.execute(session: id, tool: "bash", input: bash("echo one"), idempotencyKey: "k1")
            #expect(!first.replayed && again.replayed && again.result == first.result)
            #expect(driverA.runs("echo one") == 1)

            let lease = try await runtimeB.wake(id)
            #expect(lease.epoch == 1)
            // The Brain on node A that has no lease is refused, whatever node A remembers.
            #expect(await runtimeErrorCode { _ = try await runtimeA.execute(session: id, tool: "bash", input: bash("echo two")) } == .staleLease)
            // Node B answers node A's key from the store: the tool does not run again.
            let fromB = try await runtimeB.execute(session: id, tool: "bash", input: bash("echo one"), epoch: lease.epoch, idempotencyKey: "k1")
            #expect(fromB.replayed && fromB.result == first.result && driverB.runs("echo one") == 0)
            let second = try await runtimeB.execute(session: id, tool: "bash", input: bash("echo two"), epoch: lease.epoch, idempotencyKey: "k2")
            #expect(!second.replayed && driverB.runs("echo two") == 1)

            let listed = try await runtimeA.listSessions().map(\.id)
            #expect(listed == [id])
            let summary = try await runtimeB.summary(id)
            let stored = try await nodeA.lastSeq(session: SessionID(id))
            #expect(summary.lease_epoch == 1 && summary.last_seq == stored)
            #expect(try await runtimeA.verify(id).isIntact)
        } catch {
            failure = error
        }
        driverA.release()
        driverB.release()
        _ = try? await nodeA.client.query("DROP SCHEMA \(unescaped: String(schema)) CASCADE")
        try await nodeB.close()
        try await nodeA.close()
        if let failure { throw failure }
    }
}

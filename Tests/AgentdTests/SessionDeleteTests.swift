import AgentdClient
import Foundation
import Testing
import TestSupport

/// Deleting a session through the real agentd, agentctl and the real engine: its sandboxes go,
/// its journal stays (append-only, readable, verifiable) and it refuses changes.
@Suite("agentd session delete", .serialized)
struct SessionDeleteTests {
    @Test("agentctl session delete removes the session's sandboxes; events and verify keep working; changes are refused with 410")
    func deleteRemovesSandboxesAndRefusesChanges() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try await c.createSession().id
            let first = try await c.execute(session: id, tool: "bash", input: Data(#"{"command": "echo hi > note; cat note"}"#.utf8))
            #expect(first.output == "hi\n")
            let engine = try await Components.engine()
            let before = try await engine.listContainers(labels: ["agentd.session": id])
            #expect(before.count == 1, "the task's sandbox is there before the delete")

            let run = try await runAgentctl(["session", "delete", id], socket: agentd.socket)
            #expect(run.status == 0, "\(run.stderr)")
            #expect(run.stdout.contains("session \(id) deleted"), "\(run.stdout)")

            #expect(try await engine.listContainers(labels: ["agentd.session": id]).isEmpty, "no sandbox of the session is left")
            let shown = try await c.session(id)
            #expect(shown.deleted)
            #expect(shown.liveTasks.isEmpty)

            // Changes are refused with a clear error; reads keep working.
            await #expect {
                _ = try await c.execute(session: id, tool: "bash", input: Data(#"{"command": "true"}"#.utf8))
            } throws: { error in
                (error as? AgentdClientError)?.status == 410
            }
            let wake = try await runAgentctl(["wake", id], socket: agentd.socket)
            #expect(wake.status == 1)
            #expect(wake.stderr.contains("deleted"), "\(wake.stderr)")
            let events = try await c.events(id)
            #expect(events.last?.type == "session.deleted")
            #expect(events.contains { $0.type == "tool.result" }, "the session's history is kept")
            #expect(try await c.verify(id).intact)

            // Deleting again is not an error: the same event answers.
            let again = try await c.deleteSession(id)
            #expect(again.deletedSeq == events.last?.seq)
        }
    }

    @Test("a session woken by a Brain is deleted only with its current epoch when one is given")
    func deleteChecksAGivenEpoch() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try await c.createSession().id
            let epoch = try await c.wake(id).epoch
            _ = try await c.wake(id)
            await #expect {
                _ = try await c.deleteSession(id, epoch: epoch)
            } throws: { error in
                (error as? AgentdClientError)?.status == 409
            }
            #expect(try await c.session(id).deleted == false, "a refused delete leaves the session as it was")
            let run = try await runAgentctl(["session", "delete", id, "--epoch", "\(epoch + 1)", "--json"], socket: agentd.socket)
            #expect(run.status == 0, "\(run.stderr)")
            #expect(run.stdout.contains("\"deleted_seq\""), "\(run.stdout)")
            #expect(try await c.session(id).deleted)
        }
    }
}

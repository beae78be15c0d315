import AgentdClient
import AgentdTestSupport
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

    @Test("deleting a session with workspace: session removes its workspace image and mount")
    func deleteRemovesTheSessionWorkspace() async throws {
        // The shipped default with `workspace: session` (the shipped coding-agent, which has
        // one too, needs a GitHub token for its repository).
        let policies = NSTemporaryDirectory() + "agentd-session-ws-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: policies, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: policies) }
        let shipped = try String(contentsOfFile: AgentdProcess.policiesDirectory + "/default.yaml", encoding: .utf8)
        try shipped.replacingOccurrences(of: "workspace: task", with: "workspace: session").replacingOccurrences(of: "name: default", with: "name: session-workspace")
            .write(toFile: policies + "/session-workspace.yaml", atomically: true, encoding: .utf8)
        try await withAgentd(policies: policies) { agentd in
            let c = agentd.client
            let id = try await c.createSession(policy: "session-workspace").id
            let wrote = try await c.execute(session: id, tool: "write_file", input: Data(#"{"path": "kept.txt", "content": "kept"}"#.utf8))
            #expect(!wrote.isError, "\(wrote.output)")
            _ = try await c.endTask(id)
            let again = try await c.execute(session: id, tool: "read_file", input: Data(#"{"path": "kept.txt"}"#.utf8))
            #expect(again.output == "kept", "a session workspace outlives its task")
            // Workspace files are named after the session with its `-` escaped: match the
            // random part of its id, in the images and the mount points alike.
            let directory = agentd.stateDir + "/hands/workspaces"
            let unique = String(id.dropFirst(2))
            let images = { (FileManager.default.subpaths(atPath: directory) ?? []).filter { $0.contains(unique) } }
            #expect(!images().isEmpty, "the session's workspace lives in \(directory)")

            _ = try await c.deleteSession(id)
            #expect(images().isEmpty, "the workspace image is removed with the session: \(images())")
            let mounts = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
            #expect(!mounts.contains(unique), "no mount of the deleted session is left")
        }
    }
}

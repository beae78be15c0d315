import Foundation
import Hands
import Runtime
import SessionLog
import Synchronization
import Testing

/// What `SandboxAttachments` sees (the vault-proxy listener and git workspace seam), in order.
final class RecordingAttachments: SandboxAttachments {
    enum Call: Equatable {
        case attach(String, adopted: Bool)
        case intent(String, UInt64?)
        case detach(String)
    }
    private let state = Mutex<(calls: [Call], failures: Int)>(([], 0))
    /// The next `n` attaches fail.
    func failNext(_ n: Int) { state.withLock { $0.failures = n } }
    var calls: [Call] { state.withLock { $0.calls } }

    func attach(_ sandbox: SandboxHandle, for key: TaskKey, adopted: Bool) async throws {
        let fail = state.withLock { s -> Bool in
            s.calls.append(.attach(sandbox.id, adopted: adopted))
            guard s.failures > 0 else { return false }
            s.failures -= 1
            return true
        }
        if fail { throw HandsError(.provisioning, "the vault-proxy could not give the sandbox its listener: test refusal") }
    }
    func setIntent(_ sandbox: SandboxHandle, for key: TaskKey, seq: UInt64?) async { state.withLock { $0.calls.append(.intent(sandbox.id, seq)) } }
    func detach(_ sandbox: SandboxHandle) async { state.withLock { $0.calls.append(.detach(sandbox.id)) } }
}

@Suite("sandbox attachments and egress events")
struct AttachmentTests {
    @Test("a task's sandbox is attached before its first command, each call names its tool.intent seq, and it is detached before it goes")
    func attachIntentDetach() async throws {
        let attachments = RecordingAttachments()
        try await withRuntime(attachments: attachments) { f in
            let session = try await f.runtime.createSession(policy: nil).id
            let first = try await f.runtime.execute(session: session, tool: "bash", input: bash("echo one"))
            let second = try await f.runtime.execute(session: session, tool: "bash", input: bash("echo two"))
            #expect(try await f.runtime.endTask(session, task: "main", epoch: nil))
            let id = "fake-1"
            #expect(
                attachments.calls == [
                    .attach(id, adopted: false), .intent(id, first.intent_seq), .intent(id, second.intent_seq), .detach(id),
                ])
            #expect(f.driver.destroyed == 1)
        }
    }

    @Test("a sandbox whose attach fails is destroyed and the call gets the error; the next call gets a fresh, attached sandbox")
    func attachFailureFailsTheProvisioning() async throws {
        let attachments = RecordingAttachments()
        attachments.failNext(1)
        try await withRuntime(attachments: attachments) { f in
            let session = try await f.runtime.createSession(policy: nil).id
            let failed = try await f.runtime.execute(session: session, tool: "bash", input: bash("echo one"))
            #expect(failed.result.isError)
            #expect(failed.result.output.contains("could not provision a sandbox for task main: the vault-proxy could not give the sandbox its listener"), "\(failed.result.output)")
            #expect(f.driver.destroyed == 1, "the sandbox without its listener was removed")
            #expect(f.driver.runs("echo one") == 0, "nothing ran in it")
            let next = try await f.runtime.execute(session: session, tool: "bash", input: bash("echo two"))
            #expect(!next.result.isError, "\(next.result.output)")
            #expect(attachments.calls.first == .attach("fake-1", adopted: false))
            #expect(attachments.calls.contains(.detach("fake-1")))
            #expect(attachments.calls.contains(.attach("fake-2", adopted: false)))
        }
    }

    @Test("egress decisions are journaled in their session, redacted; nothing for an unknown or deleted session")
    func egressEventsAreJournaled() async throws {
        try await withRuntime(policies: ["default": policyYAML("default", credentials: ["token": "env:AGENTD_TEST_EGRESS_TOKEN"])],
            environment: ["AGENTD_TEST_EGRESS_TOKEN": "tok-123456789"]) { f in
            let session = try await f.runtime.createSession(policy: nil).id
            let decision = EgressDecision(
                task: "main", intent_seq: 3, sandbox: "a1", method: "GET", host: "api.example:443", route: "api", path: "/v1/tok-123456789?[REDACTED]",
                credential: "token", rule: "route api", status: 200, bytes_up: 10, bytes_down: 20, duration_ms: 5)
            await f.runtime.recordEgress(session: session, allowed: true, decision)
            var denied = decision
            denied.rule = "not in network.allowHosts"
            denied.status = 403
            await f.runtime.recordEgress(session: session, allowed: false, denied)
            await f.runtime.recordEgress(session: "s-unknown", allowed: true, decision)
            let events = try await f.events(session).filter { $0.type.hasPrefix("egress.") }
            #expect(events.map(\.type) == ["egress.allowed", "egress.denied"])
            let payload = try #require(try JSONSerialization.jsonObject(with: Data(events[0].payload)) as? [String: Any])
            #expect(payload["intent_seq"] as? Int == 3)
            #expect(payload["credential"] as? String == "token")
            #expect(payload["path"] as? String == "/v1/[REDACTED:token]?[REDACTED]", "\(payload)")
            #expect(!contains(f.journalBytes(), Array("tok-123456789".utf8)))
            try await f.runtime.deleteSession(session, epoch: nil)
            let before = try await f.events(session).count
            await f.runtime.recordEgress(session: session, allowed: true, decision)
            #expect(try await f.events(session).count == before, "a deleted session's last event stays its deletion")
        }
    }
}

import Foundation
import Hands
import SessionLog
import Testing

@testable import Runtime

/// Live restore through the fake driver: what a restarted agentd keeps and removes.
@Suite("Runtime: live restore after a restart")
struct RestoreTests {
    @Test("a restart adopts the sandbox of a live task and reuses it; removes those of ended tasks, deleted and unknown sessions, silent ones and pooled ones")
    func restoreAdoptsLiveTasksOnly() async throws {
        try await withRuntime { f in
            let a = try await f.runtime.createSession(policy: nil).id
            _ = try await f.runtime.execute(session: a, task: "live", tool: "write_file", input: Array(#"{"path":"app/x","content":"kept"}"#.utf8))
            _ = try await f.runtime.execute(session: a, task: "quiet", tool: "bash", input: bash("echo hi"))
            _ = try await f.runtime.execute(session: a, task: "ended", tool: "bash", input: bash("echo hi"))
            _ = try await f.runtime.endTask(a, task: "ended", epoch: nil)
            let liveID = try #require(await f.hands.sandbox(of: TaskKey(session: a, task: "live"))?.id)
            let quietID = try #require(await f.hands.sandbox(of: TaskKey(session: a, task: "quiet"))?.id)
            let b = try await f.runtime.createSession(policy: nil).id
            _ = try await f.runtime.execute(session: b, tool: "bash", input: bash("echo hi"))
            try await f.runtime.deleteSession(b, epoch: nil)
            let deletedLast = f.store.lastSeq(session: try SessionID(b))
            // What the killed agentd left besides: a sandbox whose removal it never got to, a
            // deleted session's, an unknown session's, a pooled one; one that no longer answers.
            f.driver.plant("left-ended", labels: [SandboxLabel.session: a, SandboxLabel.task: "ended"])
            f.driver.plant("left-deleted", labels: [SandboxLabel.session: b, SandboxLabel.task: "main"])
            f.driver.plant("left-unknown", labels: [SandboxLabel.session: "s-nobody", SandboxLabel.task: "main"])
            f.driver.plant("left-pool", labels: [SandboxLabel.pool: "warm"])
            f.driver.plant(quietID, labels: [SandboxLabel.session: a, SandboxLabel.task: "quiet"], silent: true)
            // A call that was running when agentd died: its intent, no result.
            let call = try ToolCall.decode(name: "bash", input: bash("sleep 30"))
            let intent = ToolIntent(
                task: "live", tool: "bash", input: call.canonicalInput, idempotency_key: "long", request_sha256: Runtime.sha256(call.canonicalEncoding))
            _ = try await f.store.append(session: try SessionID(a), type: EventType.toolIntent, payload: JSONCoding.encode(intent))

            // The restart: new Hands and Runtime over the same journal and sandboxes.
            let recorder = Recorder()
            let restartedHands = HandsManager(driver: f.driver, instance: "runtime-test", onEvent: { await recorder.record($0) })
            let runtime = Runtime(store: f.store, hands: restartedHands, policies: f.policies)
            await recorder.attach(runtime)
            let provisionedBefore = f.driver.existing
            let restored = try await runtime.restoreHands()

            #expect(restored.adopted.map(\.id) == [liveID])
            #expect(Set(restored.removed) == ["left-ended", "left-deleted", "left-unknown", "left-pool", quietID])
            #expect(f.driver.existing == [liveID], "only the live task's sandbox is left")
            #expect(await restartedHands.liveTasks(session: a) == ["live"])
            #expect(provisionedBefore.contains(liveID))

            // The next call of the task runs in the adopted sandbox: nothing is provisioned.
            let read = try await runtime.execute(session: a, task: "live", tool: "read_file", input: Array(#"{"path":"app/x"}"#.utf8))
            #expect(read.result.output == "kept")
            #expect(await restartedHands.sandbox(of: TaskKey(session: a, task: "live"))?.id == liveID)
            #expect(f.driver.existing == [liveID])
            // The call cut by the crash is outcome unknown and never run, adopted sandbox or not.
            let retry = try await runtime.execute(session: a, task: "live", tool: "bash", input: bash("sleep 30"), idempotencyKey: "long")
            #expect(retry.replayed && retry.result.output.contains("may or may not have run"))
            #expect(f.driver.runs("sleep 30") == 0)

            // The timeline says what happened to each task's sandbox.
            let events = try await f.events(a)
            let adopted = events.filter { $0.type == EventType.handsAdopted }
            #expect(adopted.count == 1 && String(decoding: adopted[0].payload, as: UTF8.self).contains(liveID))
            let released = events.filter { $0.type == EventType.handsReleased }.map { String(decoding: $0.payload, as: UTF8.self) }
            #expect(released.contains { $0.contains(quietID) && $0.contains("did not answer") }, "\(released)")
            #expect(released.contains { $0.contains("left-ended") && $0.contains("no longer live") }, "\(released)")
            // A deleted session's deletion stays its last event.
            #expect(f.store.lastSeq(session: try SessionID(b)) == deletedLast)

            // The periodic reconcile leaves the adopted sandbox alone; ending the task removes it.
            #expect(try await restartedHands.reconcile() == [])
            #expect(f.driver.existing == [liveID])
            #expect(try await runtime.endTask(a, task: "live", epoch: nil))
            #expect(f.driver.existing.isEmpty)
        }
    }

    @Test("a restart whose listing fails keeps the live tasks' sandboxes: the next reconcile restores instead of removing them")
    func failedRestoreIsRetriedByReconcile() async throws {
        try await withRuntime { f in
            let a = try await f.runtime.createSession(policy: nil).id
            _ = try await f.runtime.execute(session: a, tool: "bash", input: bash("echo hi"))
            let liveID = try #require(await f.hands.sandbox(of: TaskKey(session: a, task: "main"))?.id)
            f.driver.failListing(true)
            let hands = HandsManager(driver: f.driver, instance: "runtime-test")
            let runtime = Runtime(store: f.store, hands: hands, policies: f.policies)
            await #expect(throws: HandsError.self) { try await runtime.restoreHands() }
            f.driver.failListing(false)
            #expect(try await hands.reconcile() == [])
            #expect(await hands.sandbox(of: TaskKey(session: a, task: "main"))?.id == liveID)
            #expect(f.driver.existing == [liveID])
        }
    }
}

/// Journals the restarted Hands' events through the runtime, as agentd's forwarder does.
actor Recorder {
    private var runtime: Runtime?
    func attach(_ runtime: Runtime) { self.runtime = runtime }
    func record(_ event: HandsEvent) async { await runtime?.record(event) }
}

import Foundation
import Hands
import JSONValues
import Policy
import SessionLog
import Testing

@testable import Runtime

/// Polls `condition` until it holds, for at most `timeout`: for state another task changes.
func waitFor(_ what: String, timeout: Duration = .seconds(10), _ condition: () async -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while !(await condition()) {
        guard ContinuousClock.now < deadline else { throw RuntimeTestFailure("timed out waiting for \(what)") }
        try await Task.sleep(for: .milliseconds(2))
    }
}

struct RuntimeTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

@Suite("Runtime: exactly once, fencing, limits, secrets, deletion")
struct RuntimeTests {
    // MARK: exactly once

    @Test("two concurrent executes with one idempotency key: the tool runs once, the second caller gets the first's result, replayed")
    func concurrentSameKeyRunsOnce() async throws {
        try await withRuntime { f in
            let id = try await f.runtime.createSession(policy: nil).id
            let first = Task { try await f.runtime.execute(session: id, tool: "bash", input: bash("hold 1"), idempotencyKey: "k1") }
            await f.driver.waitUntilHolding()
            let second = Task { try await f.runtime.execute(session: id, tool: "bash", input: bash("hold 1"), idempotencyKey: "k1") }
            try await waitFor("the second caller to wait") { await f.runtime.waitingCallers(session: id, key: "k1") == 1 }
            f.driver.release()
            let a = try await first.value
            let b = try await second.value
            #expect(f.driver.runs("hold 1") == 1, "the tool ran once")
            #expect(!a.replayed && b.replayed)
            #expect(a.intent_seq == b.intent_seq && a.result_seq == b.result_seq)
            #expect(a.result == b.result && a.result.output == "hold 1")
            let intents = try await f.events(id).filter { $0.type == EventType.toolIntent }
            #expect(intents.count == 1)
        }
    }

    @Test("a key reused with a different tool or input is refused as a conflict (422); the same call replays")
    func keyReuseWithDifferentCallConflicts() async throws {
        try await withRuntime { f in
            let id = try await f.runtime.createSession(policy: nil).id
            let first = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo a"), idempotencyKey: "k")
            let otherInput = await runtimeErrorCode {
                _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo b"), idempotencyKey: "k")
            }
            #expect(otherInput == .idempotencyConflict)
            #expect(RuntimeError.Code.idempotencyConflict.httpStatus == 422)
            let otherTool = await runtimeErrorCode {
                _ = try await f.runtime.execute(session: id, tool: "list_files", input: Array("{}".utf8), idempotencyKey: "k")
            }
            #expect(otherTool == .idempotencyConflict)
            // The same call, spelled differently (key order, spacing): the canonical form matches.
            let again = try await f.runtime.execute(
                session: id, tool: "bash", input: Array(#"{ "command" : "echo a" }"#.utf8), idempotencyKey: "k")
            #expect(again.replayed && again.result_seq == first.result_seq)
            #expect(f.driver.runs("echo a") == 1 && f.driver.runs("echo b") == 0)
            // After a restart (state rebuilt from the journal) the conflict is still seen.
            let restarted = f.restartedRuntime()
            let afterRestart = await runtimeErrorCode {
                _ = try await restarted.execute(session: id, tool: "bash", input: bash("echo b"), idempotencyKey: "k")
            }
            #expect(afterRestart == .idempotencyConflict)
        }
    }

    @Test("an intent with no result (agentd died mid-call) is answered as a journaled outcome-unknown result, never re-run, across restarts")
    func interruptedCallIsOutcomeUnknown() async throws {
        try await withRuntime { f in
            let id = try await f.runtime.createSession(policy: nil).id
            let session = try SessionID(id)
            // What a killed agentd leaves: an intent, no result.
            let call = try ToolCall.decode(name: "bash", input: bash("touch once"))
            let intent = ToolIntent(
                task: "main", tool: "bash", input: call.canonicalInput, idempotency_key: "cut", request_sha256: Runtime.sha256(call.canonicalEncoding))
            let intentSeq = try await f.store.append(session: session, type: EventType.toolIntent, payload: JSONCoding.encode(intent))

            let restarted = f.restartedRuntime()
            let retry = try await restarted.execute(session: id, tool: "bash", input: bash("touch once"), idempotencyKey: "cut")
            #expect(retry.replayed && retry.result.isError && retry.intent_seq == intentSeq)
            #expect(retry.result.output.contains("may or may not have run") && retry.result.output.contains("not run again"))
            #expect(f.driver.runs("touch once") == 0, "never re-run")

            let again = try await f.restartedRuntime().execute(session: id, tool: "bash", input: bash("touch once"), idempotencyKey: "cut")
            #expect(again.result_seq == retry.result_seq && again.replayed)
            let interrupted = try await f.events(id).filter { $0.type == EventType.toolInterrupted }
            #expect(interrupted.count == 1, "journaled once")
            #expect(interrupted.first?.seq == retry.result_seq)
            #expect(f.driver.totalRuns == 0)
        }
    }

    // MARK: fencing

    @Test("after wake, execute, checkpoint and task end without the epoch are refused (409, saying to pass it); an epoch never handed out too (400)")
    func fencingAfterWake() async throws {
        try await withRuntime { f in
            let id = try await f.runtime.createSession(policy: nil).id
            _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo before wake"))
            let lease = try await f.runtime.wake(id)
            #expect(lease.epoch == 1)
            do {
                _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo no epoch"))
                Issue.record("an execute without the epoch ran after wake")
            } catch let e as RuntimeError {
                #expect(e.code == .staleLease && e.code.httpStatus == 409)
                #expect(e.message.contains("epoch") && e.message.contains("--epoch"), "\(e.message)")
            }
            #expect(await runtimeErrorCode { _ = try await f.runtime.checkpoint(id, state: Array("{}".utf8), epoch: nil) } == .staleLease)
            #expect(await runtimeErrorCode { _ = try await f.runtime.endTask(id, task: "main", epoch: nil) } == .staleLease)
            let future = await runtimeErrorCode { _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo future"), epoch: 2) }
            #expect(future == .unknownEpoch && RuntimeError.Code.unknownEpoch.httpStatus == 400)
            #expect(await runtimeErrorCode { _ = try await f.runtime.checkpoint(id, state: Array("{}".utf8), epoch: .max) } == .unknownEpoch)
            #expect(f.driver.runs("echo no epoch") == 0 && f.driver.runs("echo future") == 0)
            let ok = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo with epoch"), epoch: 1)
            #expect(ok.result.output == "echo with epoch")
            _ = try await f.runtime.checkpoint(id, state: Array("{}".utf8), epoch: 1)
            _ = try await f.runtime.endTask(id, task: "main", epoch: 1)
        }
    }

    // MARK: results never lost

    @Test("a result larger than the session's event limit once encoded is cut with a note and stored, never refused; the key replays it")
    func largeResultIsCutAndStored() async throws {
        let policies = ["small": policyYAML("small", outputLimit: "1MiB", maxEventSize: "64KiB")]
        try await withRuntime(policies: policies) { f in
            let id = try await f.runtime.createSession(policy: "small").id
            // 40,000 quotes: 80,000 bytes JSON-encoded, over the 64 KiB limit though under the output limit.
            let outcome = try await f.runtime.execute(session: id, tool: "bash", input: bash("big 40000"), idempotencyKey: "big")
            #expect(!outcome.replayed)
            #expect(outcome.result.output.contains("[result cut:") && outcome.result.output.contains("65536"), "\(outcome.result.output.suffix(200))")
            let stored = try #require(try await f.events(id).first { $0.seq == outcome.result_seq })
            #expect(stored.type == EventType.toolResult)
            #expect(stored.payload.count <= 64 << 10)
            #expect(JSONCoding.decode(ToolResultEvent.self, stored.payload)?.output == outcome.result.output, "the Brain got what was stored")
            let replay = try await f.runtime.execute(session: id, tool: "bash", input: bash("big 40000"), idempotencyKey: "big")
            #expect(replay.replayed && replay.result == outcome.result)
            #expect(f.driver.runs("big 40000") == 1)
        }
    }

    @Test("each session's own policy sets its event limit: a 3 MiB result under a 4 MiB policy is stored whole next to a 1 MiB default")
    func eventLimitFollowsTheSessionsPolicy() async throws {
        let policies = ["large": policyYAML("large", outputLimit: "4MiB", maxEventSize: "4MiB")]
        try await withRuntime(policies: policies) { f in
            let large = try await f.runtime.createSession(policy: "large").id
            let whole = try await f.runtime.execute(session: large, tool: "bash", input: bash("x 3145728"))
            #expect(whole.result.output.utf8.count == 3 << 20 && !whole.result.output.contains("[result cut"))
            let small = try await f.runtime.createSession(policy: nil).id
            let cut = try await f.runtime.execute(session: small, tool: "bash", input: bash("x 3145728"))
            // Cut twice: to the output limit, then (the envelope on top of 1 MiB) to the event
            // limit; the output limit's note still closes the result.
            #expect(cut.result.output.contains("[result cut"))
            #expect(cut.result.output.hasSuffix("\n[output cut: 2097152 more bytes beyond the limit of 1 MiB]"), "\(cut.result.output.suffix(200))")
            #expect(cut.result.output.utf8.count < 1 << 20)
        }
    }

    @Test("the journal's event ceiling covers the largest session.maxEventSize a policy may set (64 MiB; more is refused)")
    func journalCeilingCoversEveryPolicy() async throws {
        let directory = NSTemporaryDirectory() + "agentd-ceiling-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try policyYAML("default", outputLimit: "64MiB", maxEventSize: "64MiB").write(toFile: directory + "/default.yaml", atomically: true, encoding: .utf8)
        let largest = try #require(await PolicyStore(directory: directory).policy(named: "default"))
        #expect(largest.session.maxEventBytes == 64 << 20)
        #expect(Runtime.journalEventCeiling >= largest.session.maxEventBytes)
        try policyYAML("default", maxEventSize: "65MiB").write(toFile: directory + "/default.yaml", atomically: true, encoding: .utf8)
        #expect(await PolicyStore(directory: directory).policy(named: "default") == nil, "a larger limit is refused by the policy checker")
    }

    @Test("an input too large for the intent event is refused before anything runs or is journaled (400 naming the limit)")
    func tooLargeInputRefusedBeforeRunning() async throws {
        let policies = ["small": policyYAML("small", maxEventSize: "16KiB")]
        try await withRuntime(policies: policies) { f in
            let id = try await f.runtime.createSession(policy: "small").id
            let content = String(repeating: "y", count: 20_000)
            let input = Array((try JSONSerialization.data(withJSONObject: ["path": "a.txt", "content": content])))
            do {
                _ = try await f.runtime.execute(session: id, tool: "write_file", input: input, idempotencyKey: "w")
                Issue.record("a 20 kB write ran under a 16 KiB event limit")
            } catch let e as RuntimeError {
                #expect(e.code == .invalidArgument && e.code.httpStatus == 400)
                #expect(e.message.contains("16384") && e.message.contains("session.maxEventSize"), "\(e.message)")
            }
            #expect(f.driver.writes == 0)
            let types = try await f.events(id).map(\.type)
            #expect(!types.contains(EventType.toolIntent) && !types.contains(EventType.taskStarted))
        }
    }

    // MARK: secrets

    @Test("a credential added by a policy reload, containing \" \\ and a newline, never reaches the journal's segments raw or escaped")
    func reloadedAndEscapedSecretsAreRedacted() async throws {
        try await withRuntime { f in
            let secret = "hunter\"2\\x/y\nz-\(UUID().uuidString.prefix(6))"
            let secretFile = f.directory + "/token"
            try secret.write(toFile: secretFile, atomically: true, encoding: .utf8)
            let id = try await f.runtime.createSession(policy: nil).id
            // The credential arrives with a reload, after the journal was opened.
            try f.writePolicy("default", policyYAML("default", credentials: ["api_token": "file:\(secretFile)"]))
            _ = await f.policies.reload()
            let outcome = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo \(secret)"))
            #expect(outcome.result.output.contains("[REDACTED:api_token]"))
            _ = try await f.runtime.checkpoint(id, state: Array(try JSONSerialization.data(withJSONObject: ["note": "the token is \(secret)"])), epoch: nil)
            try await f.store.close()
            let disk = f.journalBytes()
            let raw = Array(secret.utf8)
            let escaped = Array(try JSONEncoder().encode(secret).dropFirst().dropLast())
            // Booleans first: a failed expectation would print the whole (64 MiB) segment.
            let rawFound = contains(disk, raw), escapedFound = contains(disk, escaped)
            let redactedFound = contains(disk, Array("[REDACTED:api_token]".utf8))
            #expect(!rawFound, "the raw secret is on the disk")
            #expect(!escapedFound, "the JSON-escaped secret is on the disk")
            #expect(redactedFound)
        }
    }

    @Test("the store redacts a secret that a caller's JSON encoder escaped (no pre-redaction)")
    func storeMatchesEncodedForms() async throws {
        let directory = NSTemporaryDirectory() + "agentd-redact-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let secret = "a\"b\\c\u{1}d/e"
        let store = try await SessionStore.open(directory: directory, redactor: Redactor([try Secret(name: "s", value: secret)]))
        let session = try SessionID("s-redact")
        for payload in [try JSONEncoder().encode(["v": secret]), try JSONSerialization.data(withJSONObject: ["v": secret])] {
            try await store.append(session: session, type: "t", payload: payload)
        }
        // A JSON document carried inside a JSON string: escaped twice.
        let inner = String(decoding: try JSONEncoder().encode(["v": secret]), as: UTF8.self)
        try await store.append(session: session, type: "t", payload: try JSONEncoder().encode(["doc": inner]))
        try await store.close()
        var disk: [UInt8] = []
        for name in try FileManager.default.contentsOfDirectory(atPath: directory) {
            disk += FileManager.default.contents(atPath: directory + "/" + name).map(Array.init) ?? []
        }
        for form in [Array(secret.utf8), Array("a\\\"b".utf8), Array("b\\\\c".utf8), Array("c\\u0001d".utf8)] {
            let found = contains(disk, form)
            #expect(!found, "\(String(decoding: form, as: UTF8.self)) is on the disk")
        }
    }

    // MARK: bounded memory, listing

    @Test("the session cache stays bounded; an evicted session's key still replays without running again")
    func cacheIsBoundedAndEvictedKeysReplay() async throws {
        try await withRuntime(maxCachedSessions: 2) { f in
            var ids: [String] = []
            for i in 0..<6 {
                let id = try await f.runtime.createSession(policy: nil).id
                _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo \(i)"), idempotencyKey: "k")
                ids.append(id)
                #expect(await f.runtime.cachedSessionCount <= 2)
            }
            let replay = try await f.runtime.execute(session: ids[0], tool: "bash", input: bash("echo 0"), idempotencyKey: "k")
            #expect(replay.replayed && replay.result.output == "echo 0")
            #expect(f.driver.runs("echo 0") == 1)
            #expect(await f.runtime.cachedSessionCount <= 2)
        }
    }

    @Test("listSessions reports a damaged session with its damage instead of dropping it")
    func listReportsDamagedSessions() async throws {
        let directory = NSTemporaryDirectory() + "agentd-list-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let journal = directory + "/journal"
        let marker = "damage-me-\(UUID().uuidString.prefix(8))"
        do {
            try await withRuntimeOver(journal: journal) { runtime, _ in
                let a = try await runtime.createSession(policy: nil, id: "s-damaged")
                _ = try await runtime.execute(session: a.id, tool: "bash", input: bash("echo \(marker)"))
                _ = try await runtime.createSession(policy: nil, id: "s-healthy")
                _ = try await runtime.execute(session: "s-healthy", tool: "bash", input: bash("echo fine"))
            }
        }
        // Flip a bit inside the marker (a record of s-damaged with valid records after it).
        let segment = try #require(try FileManager.default.contentsOfDirectory(atPath: journal).filter { $0.hasPrefix("seg-") }.sorted().first)
        let path = journal + "/" + segment
        var bytes = try #require(FileManager.default.contents(atPath: path).map(Array.init))
        let found = firstIndex(of: Array(marker.utf8), in: bytes)  // not inside #require: it would print the segment
        let at = try #require(found)
        bytes[at] ^= 0x01
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        // Without the index the whole log is scanned at open, which finds the damage.
        try? FileManager.default.removeItem(atPath: journal + "/index.bin")
        try await withRuntimeOver(journal: journal) { runtime, _ in
            let listed = try await runtime.listSessions()
            let damaged = try #require(listed.first { $0.id == "s-damaged" }, "the damaged session is listed")
            #expect(damaged.damage?.contains(segment) == true, "\(damaged.damage ?? "no damage")")
            let healthy = try #require(listed.first { $0.id == "s-healthy" })
            #expect(healthy.damage == nil && healthy.policy == "default" && !healthy.deleted)
        }
    }

    // MARK: deletion, retention

    @Test("a deleted session releases its sandboxes, journals session.deleted, refuses changes (410) and stays readable")
    func deleteSession() async throws {
        try await withRuntime { f in
            let id = try await f.runtime.createSession(policy: nil).id
            _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo live"))
            #expect(await f.hands.liveTasks(session: id) == ["main"])
            let seq = try await f.runtime.deleteSession(id, epoch: nil)
            #expect(await f.hands.liveTasks(session: id).isEmpty && f.driver.destroyed == 1)
            #expect(f.driver.removedSessions == [id], "the session's workspace data is removed with it")
            #expect(try await f.runtime.deleteSession(id, epoch: nil) == seq, "deleting again does nothing")
            for code in [
                await runtimeErrorCode { _ = try await f.runtime.execute(session: id, tool: "bash", input: bash("echo after")) },
                await runtimeErrorCode { _ = try await f.runtime.wake(id) },
                await runtimeErrorCode { _ = try await f.runtime.checkpoint(id, state: Array("{}".utf8), epoch: nil) },
            ] {
                #expect(code == .sessionDeleted)
            }
            #expect(RuntimeError.Code.sessionDeleted.httpStatus == 410)
            #expect(f.driver.runs("echo after") == 0)
            let events = try await f.events(id)
            #expect(events.last?.type == EventType.sessionDeleted && events.last?.seq == seq)
            #expect(try await f.runtime.verify(id).isIntact)
            // After a restart (nothing cached) it is still deleted, and listed as such.
            let restarted = f.restartedRuntime()
            #expect(try await restarted.listSessions().first { $0.id == id }?.deleted == true)
            #expect(await runtimeErrorCode { _ = try await restarted.wake(id) } == .sessionDeleted)
        }
    }

    @Test("retention deletes sessions idle longer than the setting and leaves recent ones")
    func retentionDeletesIdleSessions() async throws {
        try await withRuntime { f in
            let old = try await f.runtime.createSession(policy: nil).id
            let deleted = await f.runtime.deleteIdleSessions(idleLongerThan: .seconds(3600), now: Date().addingTimeInterval(7200))
            #expect(deleted == [old])
            let recent = try await f.runtime.createSession(policy: nil).id
            #expect(await f.runtime.deleteIdleSessions(idleLongerThan: .seconds(3600)).isEmpty)
            let oldDeleted = try await f.runtime.summary(old).deleted
            let recentDeleted = try await f.runtime.summary(recent).deleted
            #expect(oldDeleted && !recentDeleted)
        }
    }

    // MARK: error model, typed calls, permissions

    @Test("RuntimeError keeps the journal error as its cause and every code has one HTTP status")
    func errorModel() async throws {
        let journal = SessionLogError(.diskFull, "no room")
        let e = RuntimeError(journal)
        #expect(e.code == .diskFull && e.code.httpStatus == 507)
        #expect((e.cause as? SessionLogError) == journal)
        // Every refusal is a 4xx or 5xx, but the fleet's redirect to the owning node.
        let statuses = RuntimeError.Code.allCases.filter { $0 != .elsewhere }.map(\.httpStatus)
        #expect(statuses.allSatisfy { (400...599).contains($0) })
        #expect(RuntimeError.Code.elsewhere.httpStatus == 307)
        #expect(RuntimeError(SessionLogError(.damaged, "x")).code == .damaged)
    }

    @Test("a tool call decodes from a JSONValue the same as from bytes, and its canonical encoding decodes back to it")
    func typedToolCall() throws {
        let text = #"{"cwd": "src", "command": "ls", "timeout_s": 2.5}"#
        let fromBytes = try ToolCall.decode(name: "bash", input: Array(text.utf8))
        let fromValue = try ToolCall.decode(name: "bash", input: try JSONValue(data: Data(text.utf8)))
        #expect(fromBytes == fromValue)
        #expect(try ToolCall.decode(name: "bash", input: fromValue.canonicalInput) == fromValue)
        let binary = ToolCall.writeFile(path: "b.bin", contents: [0xFF, 0x00, 0x10])
        #expect(try ToolCall.decode(name: "write_file", input: binary.canonicalInput) == binary)
        #expect(throws: HandsError.self) { try ToolCall.decode(name: "bash", input: JSONValue.string("ls")) }
        #expect(throws: HandsError.self) { try ToolCall.decode(name: "bash", input: JSONValue.null) }
    }

    @Test("the journal directory is 0700 and its files 0600, whatever the umask, also for a directory made wider before")
    func journalPermissions() async throws {
        let directory = NSTemporaryDirectory() + "agentd-perm-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        let previous = umask(0)
        defer { umask(previous) }
        let store = try await SessionStore.open(directory: directory)
        try await store.append(session: try SessionID("s-perm"), type: "t", payload: Array("{}".utf8))
        try await store.close()
        func mode(_ path: String) throws -> Int {
            ((try FileManager.default.attributesOfItem(atPath: path))[.posixPermissions] as? NSNumber)?.intValue ?? -1
        }
        #expect(try mode(directory) == 0o700)
        let files = try FileManager.default.contentsOfDirectory(atPath: directory)
        #expect(files.count >= 2)
        for name in files { #expect(try mode(directory + "/" + name) == 0o600, "\(name)") }
    }
}

/// A Runtime over the journal at `journal` with the default policy and a fake driver, closed
/// after `body`.
func withRuntimeOver(journal: String, _ body: (Runtime, SessionStore) async throws -> Void) async throws {
    let policyDirectory = (journal as NSString).deletingLastPathComponent + "/policies"
    try FileManager.default.createDirectory(atPath: policyDirectory, withIntermediateDirectories: true)
    try policyYAML("default").write(toFile: policyDirectory + "/default.yaml", atomically: true, encoding: .utf8)
    let store = try await SessionStore.open(directory: journal, options: SessionStoreOptions(maxEventBytes: Runtime.journalEventCeiling))
    let runtime = Runtime(store: store, hands: HandsManager(driver: FakeDriver(), instance: "runtime-test"), policies: PolicyStore(directory: policyDirectory))
    do {
        try await body(runtime, store)
        try await store.close()
    } catch {
        try? await store.close()
        throw error
    }
}

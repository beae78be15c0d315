import Foundation
import Hands
import JSONValues
import Logging
import Policy
import SessionLog

/// A session as the API shows it.
public struct SessionSummary: Sendable, Codable, Equatable {
    public var id: String
    public var policy: String
    public var last_seq: UInt64
    public var lease_epoch: UInt64
    /// Tasks that currently hold a sandbox.
    public var live_tasks: [String]
}

/// What `execute` returns: the tool's string result and where it was journaled.
public struct ExecuteOutcome: Sendable, Codable, Equatable {
    public var result: ToolResult
    public var intent_seq: UInt64
    public var result_seq: UInt64
    /// True when an earlier call with the same idempotency key had already completed and its
    /// result was returned without running the tool again.
    public var replayed: Bool
}

/// Wires Session, Hands and Policy together and implements the contracts: `execute` (journal
/// the intent, run on the task's Hands, journal the result), `wake`, `getSession`,
/// checkpoints and task ends.
///
/// Everything it knows about a session beyond what is in flight is derived from the journal
/// (rebuilt lazily after a restart), so that agentd itself keeps no state that matters.
public actor Runtime {
    public nonisolated let store: SessionStore
    public nonisolated let hands: HandsManager
    public nonisolated let policies: PolicyStore
    private let logger: Logger

    private struct TaskState {
        var policy: Policy
        var spec: SandboxSpec
    }

    private struct SessionState {
        var policyName: String
        var tasks: [String: TaskState] = [:]
        /// Completed calls by idempotency key.
        var completed: [String: (ToolResult, UInt64, UInt64)] = [:]
    }

    private var sessions: [SessionID: SessionState] = [:]
    private var loading: [SessionID: Task<SessionState, any Error>] = [:]

    /// Where images are imported (the container engine), when there is one.
    public nonisolated let images: (any ImageImporting)?

    public init(
        store: SessionStore, hands: HandsManager, policies: PolicyStore, images: (any ImageImporting)? = nil,
        logger: Logger = Logger(label: "agentd.runtime")
    ) {
        self.store = store
        self.hands = hands
        self.policies = policies
        self.images = images
        self.logger = logger
    }

    // MARK: - images

    /// Imports the root filesystem tarball at `tarball` as image `name` (`repository[:tag]`).
    public nonisolated func importImage(tarball: String, name: String) async throws -> ImageInfo {
        guard let images else { throw RuntimeError(.unavailable, "no container engine is configured: set AGENTD_ENGINE or pass --engine") }
        do {
            let info = try await images.importImage(tarball: tarball, name: name)
            logger.info("image imported", metadata: ["image": "\(info.name)", "id": "\(info.id.prefix(19))", "bytes": "\(info.sizeBytes)"])
            return info
        } catch let error as HandsError {
            throw RuntimeError(error.kind == .invalidRequest ? .invalidArgument : .unavailable, error.message)
        }
    }

    // MARK: - sessions

    /// Creates a session under policy `name` (the default policy when nil). No sandbox is made:
    /// Hands come with the first execute of a task.
    public func createSession(policy name: String?, id: String? = nil) async throws -> SessionSummary {
        let policyName = name ?? Policy.defaultName
        guard let policy = await policies.policy(named: policyName) else {
            let known = await policies.current.names.joined(separator: ", ")
            throw RuntimeError(.notFound, "no policy named '\(policyName)' (known: \(known.isEmpty ? "none" : known))")
        }
        let session = try sessionID(id ?? Self.newSessionID())
        if store.lastSeq(session: session) > 0 {
            throw RuntimeError(.invalidArgument, "session \(session) already exists")
        }
        _ = try await append(session, EventType.sessionCreated, JSONCoding.encode(SessionCreated(policy: policy.name, policy_sha256: policy.sha256)))
        sessions[session] = SessionState(policyName: policy.name)
        logger.info("session created", metadata: ["session.id": "\(session)", "policy": "\(policy.name)"])
        return try await summary(session.rawValue)
    }

    /// Every session in the journal.
    public func listSessions() async throws -> [SessionSummary] {
        var result: [SessionSummary] = []
        for session in store.sessions() {
            if let s = try? await summary(session.rawValue) { result.append(s) }
        }
        return result
    }

    public func summary(_ id: String) async throws -> SessionSummary {
        let session = try sessionID(id)
        let state = try await state(of: session)
        let live = await hands.liveTasks(session: session.rawValue)
        return SessionSummary(
            id: session.rawValue, policy: state.policyName, last_seq: store.lastSeq(session: session),
            lease_epoch: store.leaseEpoch(session: session), live_tasks: live.sorted())
    }

    // MARK: - execute

    /// Runs tool `tool` with JSON `input` for `task` of session `id`, on that task's Hands.
    ///
    /// The intent is journaled before the tool runs and the result after; a Hands failure is a
    /// result (an error string), never a throw. With an `idempotencyKey` seen before, the
    /// earlier result comes back and the tool does not run again.
    /// - Throws: `RuntimeError` for an unknown session, a stale lease epoch, an unknown tool or
    ///   input that does not fit the tool, or a journal failure.
    public func execute(
        session id: String, task: String = "main", tool: String, input: [UInt8], epoch: UInt64? = nil, idempotencyKey: String? = nil
    ) async throws -> ExecuteOutcome {
        let session = try sessionID(id)
        try Self.validateName(task, what: "task")
        if let key = idempotencyKey, key.isEmpty || key.utf8.count > 200 {
            throw RuntimeError(.invalidArgument, "idempotency key must be 1 to 200 bytes")
        }
        let inputValue: JSONValue
        do {
            inputValue = try JSONValue(data: Data(input.isEmpty ? Array("{}".utf8) : input))
        } catch {
            throw RuntimeError(.invalidArgument, "input must be a JSON object: \(error.localizedDescription)")
        }
        guard case .object = inputValue else { throw RuntimeError(.invalidArgument, "input must be a JSON object") }
        // A call that cannot run (unknown tool, input not matching the tool) is refused before
        // anything is journaled: nothing is stored half-way.
        do {
            _ = try ToolCall.decode(name: tool, input: input)
        } catch let error as HandsError {
            throw RuntimeError(.invalidArgument, error.message)
        }
        var state = try await state(of: session)
        if let epoch, epoch < store.leaseEpoch(session: session) {
            throw RuntimeError(
                .staleLease,
                "execute in session \(session) refused: lease epoch \(epoch) is stale; a newer Brain holds epoch \(store.leaseEpoch(session: session)) (it called wake) — stop this Brain")
        }
        if let key = idempotencyKey, let (result, intentSeq, resultSeq) = state.completed[key] {
            return ExecuteOutcome(result: result, intent_seq: intentSeq, result_seq: resultSeq, replayed: true)
        }
        let taskState = try await taskState(session, task: task, state: &state, epoch: epoch)
        let intentSeq = try await append(
            session, EventType.toolIntent, JSONCoding.encode(ToolIntent(task: task, tool: tool, input: inputValue, idempotency_key: idempotencyKey)),
            epoch: epoch)
        let started = ContinuousClock.now
        let result = await hands.execute(TaskKey(session: session.rawValue, task: task), spec: taskState.spec, tool: tool, input: input)
        let elapsed = ContinuousClock.now - started
        let ms = Int(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000)
        let payload = ToolResultEvent(
            task: task, tool: tool, intent_seq: intentSeq, output: result.output, is_error: result.isError, exit_code: result.exitCode,
            duration_ms: ms, idempotency_key: idempotencyKey)
        // The result is journaled without the epoch: a Brain that lost its lease while the
        // tool ran still gets the truth recorded; the intent was fenced.
        let resultSeq = try await append(session, EventType.toolResult, JSONCoding.encode(payload))
        if let key = idempotencyKey { sessions[session]?.completed[key] = (result, intentSeq, resultSeq) }
        return ExecuteOutcome(result: result, intent_seq: intentSeq, result_seq: resultSeq, replayed: false)
    }

    /// The task's policy snapshot, journaling `task.started` on its first call.
    private func taskState(_ session: SessionID, task: String, state: inout SessionState, epoch: UInt64?) async throws -> TaskState {
        if let existing = sessions[session]?.tasks[task] { return existing }
        guard let policy = await policies.policy(named: state.policyName) else {
            throw RuntimeError(.unavailable, "the session's policy '\(state.policyName)' is no longer loaded")
        }
        let taskState = TaskState(policy: policy, spec: Self.sandboxSpec(policy))
        _ = try await append(
            session, EventType.taskStarted,
            JSONCoding.encode(TaskStarted(task: task, policy: policy.name, policy_sha256: policy.sha256, driver: policy.hands.driver.rawValue)),
            epoch: epoch)
        sessions[session]?.tasks[task] = taskState
        return taskState
    }

    // MARK: - wake, checkpoint, task end, reads

    /// Hands out a lease with a fencing epoch one higher than any before (journaled).
    public func wake(_ id: String) async throws -> Lease {
        let session = try sessionID(id)
        _ = try await state(of: session)
        do { return try await store.wake(session: session) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// Stores a Brain's state; `getSession` returns it with the events after it.
    public func checkpoint(_ id: String, state: [UInt8], epoch: UInt64?) async throws -> UInt64 {
        let session = try sessionID(id)
        _ = try await self.state(of: session)
        do { return try await store.checkpoint(session: session, state: state, epoch: epoch) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// Ends `task`: its sandbox is released and `task.ended` journaled.
    /// - Returns: whether the task had a sandbox.
    public func endTask(_ id: String, task: String, epoch: UInt64?) async throws -> Bool {
        let session = try sessionID(id)
        try Self.validateName(task, what: "task")
        _ = try await state(of: session)
        _ = try await append(session, EventType.taskEnded, JSONCoding.encode(TaskEnded(task: task)), epoch: epoch)
        sessions[session]?.tasks[task] = nil
        return await hands.endTask(TaskKey(session: session.rawValue, task: task))
    }

    /// The last checkpoint and the events after it.
    public func getSession(_ id: String) async throws -> SessionSnapshot {
        let session = try sessionID(id)
        do { return try await store.getSession(session) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    public func verify(_ id: String) async throws -> VerifyReport {
        let session = try sessionID(id)
        do { return try await store.verify(session: session) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// Events after `after`; with `follow`, also every later one as it is appended.
    public func events(_ id: String, after: UInt64, follow: Bool) throws -> EventSequence {
        let session = try sessionID(id)
        guard store.lastSeq(session: session) > 0 else { throw RuntimeError(.notFound, "no session \(session)") }
        return follow ? store.follow(session: session, after: after) : store.events(session: session, after: after)
    }

    // MARK: - Hands events

    /// Journals what happened to a task's Hands (provisioned, released, failed).
    public func record(_ event: HandsEvent) async {
        let (key, type, payload): (TaskKey, String, HandsEventPayload)
        switch event {
        case .provisioned(let k, let sandbox, let fromPool, let ms):
            (key, type, payload) = (k, EventType.handsProvisioned, HandsEventPayload(task: k.task, sandbox: sandbox, from_pool: fromPool, milliseconds: ms))
        case .released(let k, let sandbox, let reason):
            (key, type, payload) = (k, EventType.handsReleased, HandsEventPayload(task: k.task, sandbox: sandbox, reason: reason))
        case .failed(let k, let sandbox, let kind, let message):
            (key, type, payload) = (k, EventType.handsFailed, HandsEventPayload(task: k.task, sandbox: sandbox, kind: kind, message: message))
        }
        guard let session = try? SessionID(key.session) else { return }
        do {
            _ = try await append(session, type, JSONCoding.encode(payload))
        } catch {
            logger.warning("could not journal a hands event", metadata: ["session.id": "\(session)", "error": "\(error)"])
        }
    }

    // MARK: - state

    /// The session's derived state, rebuilt from its journal on first use after a start.
    /// Intents without a result (agentd died while the tool ran) are journaled as interrupted.
    private func state(of session: SessionID) async throws -> SessionState {
        if let s = sessions[session] { return s }
        if let pending = loading[session] { return try await pending.value }
        let task = Task { [store] () async throws -> SessionState in
            var state: SessionState?
            var open: [UInt64: String] = [:]
            var intents: [UInt64: ToolIntent] = [:]
            do {
                for try await event in store.events(session: session, after: 0) {
                    switch event.type {
                    case EventType.sessionCreated:
                        if let p = JSONCoding.decode(SessionCreated.self, event.payload) { state = SessionState(policyName: p.policy) }
                    case EventType.toolIntent:
                        if let p = JSONCoding.decode(ToolIntent.self, event.payload) {
                            open[event.seq] = p.task
                            intents[event.seq] = p
                        }
                    case EventType.toolResult:
                        if let p = JSONCoding.decode(ToolResultEvent.self, event.payload) {
                            open[p.intent_seq] = nil
                            if let key = p.idempotency_key {
                                state?.completed[key] = (ToolResult(output: p.output, isError: p.is_error, exitCode: p.exit_code), p.intent_seq, event.seq)
                            }
                        }
                    case EventType.toolInterrupted:
                        if let p = JSONCoding.decode(ToolInterrupted.self, event.payload) { open[p.intent_seq] = nil }
                    default:
                        break
                    }
                }
            } catch let e as SessionLogError {
                throw RuntimeError(e)
            }
            guard let state else { throw RuntimeError(.notFound, "no session \(session)") }
            for (seq, task) in open.sorted(by: { $0.key < $1.key }) {
                _ = try? await store.append(
                    session: session, type: EventType.toolInterrupted,
                    payload: JSONCoding.encode(ToolInterrupted(task: task, intent_seq: seq, reason: "agentd stopped before the tool's result was journaled")))
            }
            return state
        }
        loading[session] = task
        defer { loading[session] = nil }
        let state = try await task.value
        if sessions[session] == nil { sessions[session] = state }
        return sessions[session]!
    }

    @discardableResult
    private func append(_ session: SessionID, _ type: String, _ payload: [UInt8], epoch: UInt64? = nil) async throws -> UInt64 {
        do {
            return try await store.append(session: session, type: type, payload: payload, epoch: epoch)
        } catch let e as SessionLogError {
            throw RuntimeError(e)
        }
    }

    private func sessionID(_ text: String) throws -> SessionID {
        do { return try SessionID(text) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    static func validateName(_ name: String, what: String) throws {
        let ok = !name.isEmpty && name.utf8.count <= 64
            && name.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x2D || $0 == 0x5F }
        guard ok else { throw RuntimeError(.invalidArgument, "\(what) '\(name)' is not valid: use 1 to 64 of A-Z a-z 0-9 - _") }
    }

    /// `s-` and 16 random base-36 characters.
    static func newSessionID() -> String {
        let alphabet = Array("0123456789abcdefghijklmnopqrstuvwxyz")
        return "s-" + String((0..<16).map { _ in alphabet[Int.random(in: 0..<alphabet.count)] })
    }

    // MARK: - warm pools

    /// Sets the warm pools to what the policies in force ask (`pool.size` of container
    /// policies); pools no longer asked for are emptied. Called at start and after every
    /// policy change.
    public func applyPoolTargets() async {
        let set = await policies.current
        var targets: [SandboxSpec: Int] = [:]
        for name in set.names {
            guard let p = set.policy(named: name), p.pool.size > 0, p.hands.driver == .container else { continue }
            targets[Self.sandboxSpec(p)] = p.pool.size
        }
        await hands.setPoolTargets(targets)
    }

    /// Every policy's warm pool, by policy name (target 0: no pool).
    public func pools() async -> [(policy: String, status: HandsManager.PoolStatus)] {
        let set = await policies.current
        var out: [(policy: String, status: HandsManager.PoolStatus)] = []
        for name in set.names {
            guard let p = set.policy(named: name) else { continue }
            out.append((name, await hands.poolStatus(Self.sandboxSpec(p))))
        }
        return out
    }

    /// A policy's hands section as the drivers take it.
    public static func sandboxSpec(_ policy: Policy) -> SandboxSpec {
        var spec = SandboxSpec()
        let h = policy.hands
        spec.driver = h.driver.rawValue
        spec.image = h.image
        spec.user = h.user
        spec.memoryBytes = h.memoryBytes
        spec.cpus = h.cpus
        spec.pids = h.pids
        if let n = h.ulimits.nofile { spec.nofile = n }
        if let n = h.ulimits.nproc { spec.nproc = n }
        spec.commandTimeout = h.commandTimeout
        spec.idleTimeout = h.idleTimeout
        spec.outputLimitBytes = h.outputLimitBytes
        spec.diskBytes = h.diskBytes
        spec.workspace = h.workspace == .session ? .session : .task
        spec.policyName = policy.name
        return spec
    }
}

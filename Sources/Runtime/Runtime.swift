import Crypto
import Fleet
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
    /// True once the session was deleted (it refuses changes; reads keep working).
    public var deleted: Bool
    /// Why the session cannot be read, when its journal is damaged (segment and offset).
    public var damage: String?
}

/// What `execute` returns: the tool's string result and where it was journaled.
public struct ExecuteOutcome: Sendable, Codable, Equatable {
    public var result: ToolResult
    public var intent_seq: UInt64
    public var result_seq: UInt64
    /// True when an earlier call with the same idempotency key had already completed (or was
    /// running and has now completed) and its result was returned without running the tool
    /// again.
    public var replayed: Bool
}

/// Wires Session, Hands and Policy together and implements the contracts: `execute` (journal
/// the intent, run on the task's Hands, journal the result), `wake`, `getSession`,
/// checkpoints, task ends and session deletion.
///
/// Everything it knows about a session beyond what is in flight is derived from the journal
/// (rebuilt lazily after a restart or an eviction), so that agentd itself keeps no state that
/// matters, and the cache of sessions is bounded (`maxCachedSessions`).
///
/// Exactly once: a call with an idempotency key runs at most once per session. A second call
/// with the key while the first runs waits for its result; a call whose result was never
/// journaled (agentd was killed) is answered with a journaled *outcome unknown* result; a key
/// reused for a different call is refused.
public actor Runtime {
    /// The Session journal: the embedded file journal or PostgreSQL, behind one protocol.
    public nonisolated let store: any SessionJournal
    public nonisolated let hands: HandsManager
    public nonisolated let policies: PolicyStore
    /// At most this many sessions' derived state is kept in memory; idle ones beyond it are
    /// dropped and rebuilt from the journal when used again.
    public nonisolated let maxCachedSessions: Int
    private let logger: Logger
    private let refreshSecrets: @Sendable () async -> Void

    /// The largest event the journal takes, whatever the policy: at least the largest
    /// `session.maxEventSize` a policy may set (64 MiB), plus room for the redactor's
    /// replacements. Each session's own, smaller limit is enforced here, in `Runtime`.
    public static let journalEventCeiling = (64 << 20) + (1 << 20)

    private struct TaskState {
        var policy: Policy
        var spec: SandboxSpec
    }

    /// A completed call by idempotency key: where its result is journaled (the result itself
    /// is read back from the journal on a replay, so that the map stays small).
    private struct Completed {
        var requestHash: String?
        var intentSeq: UInt64
        var resultSeq: UInt64
    }

    private struct SessionState {
        var policyName: String
        var tasks: [String: TaskState] = [:]
        var completed: [String: Completed] = [:]
        /// Tasks started and not ended, with the name of the policy each started under (from
        /// the journal: what a restart re-adopts sandboxes for).
        var openTasks: [String: String] = [:]
        /// Set by `deleteSession` as it starts; `deletedSeq` once journaled.
        var deleting = false
        var deletedSeq: UInt64?
        /// Calls running now; a session with calls in flight is never evicted.
        var inFlight = 0
        var lastUsed = ContinuousClock.now

        init(policyName: String) { self.policyName = policyName }
    }

    private struct RunningKey: Hashable {
        var session: SessionID
        var key: String
    }

    private var sessions: [SessionID: SessionState] = [:]
    private var loading: [SessionID: Task<SessionState, any Error>] = [:]
    /// Calls with an idempotency key that are running now: a second caller waits for them.
    private var running: [RunningKey: (requestHash: String, task: Task<ExecuteOutcome, any Error>)] = [:]
    /// How many callers wait for each running key (for tests and metrics).
    private var waiting: [RunningKey: Int] = [:]
    /// `deleteSession` waiting for a session's calls in flight to finish.
    private var drainWaiters: [SessionID: [CheckedContinuation<Void, Never>]] = [:]

    /// Where images are imported (the container engine), when there is one.
    public nonisolated let images: (any ImageImporting)?

    /// The Session store's kind: `file` (the embedded journal) or `postgres`.
    public nonisolated var storeKind: String { store is SessionStore ? "file" : "postgres" }

    /// This node's membership in a fleet (`--store postgres` with `--node`): which node serves
    /// which session's calls. Nil on a single host, where this node serves every session.
    public nonisolated let fleet: FleetNode?

    /// Sessions this node took over from a dead node, with the tasks that held Hands there:
    /// each such task's next result says it runs on fresh Hands here.
    private var takenOver: [SessionID: (from: String, tasks: Set<String>)] = [:]

    /// - Parameters:
    ///   - store: the journal.
    ///   - hands: the sandboxes.
    ///   - policies: the policies in force.
    ///   - images: the image importer, when there is a container engine.
    ///   - maxCachedSessions: how many sessions' state to keep in memory (at least 1).
    ///   - refreshSecrets: called before anything a caller sent is journaled, so that the
    ///     redactor knows the credentials of the policies in force (see `CredentialRegistrar`).
    ///   - fleet: this node's fleet membership, when agentd runs as one node of several.
    ///   - logger: for what the runtime does.
    public init(
        store: any SessionJournal, hands: HandsManager, policies: PolicyStore, images: (any ImageImporting)? = nil,
        maxCachedSessions: Int = 1024, refreshSecrets: @escaping @Sendable () async -> Void = {}, fleet: FleetNode? = nil,
        logger: Logger = Logger(label: "agentd.runtime")
    ) {
        self.fleet = fleet
        self.store = store
        self.hands = hands
        self.policies = policies
        self.images = images
        self.maxCachedSessions = max(1, maxCachedSessions)
        self.refreshSecrets = refreshSecrets
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
            throw RuntimeError(error.kind == .invalidRequest ? .invalidArgument : .unavailable, error.message, cause: error)
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
        if try await lastSeq(session) > 0 {
            throw RuntimeError(.invalidArgument, "session \(session) already exists")
        }
        await refreshSecrets()
        _ = try await append(session, EventType.sessionCreated, JSONCoding.encode(SessionCreated(policy: policy.name, policy_sha256: policy.sha256)))
        remember(session, SessionState(policyName: policy.name))
        logger.info("session created", metadata: ["session.id": "\(session)", "policy": "\(policy.name)"])
        return try await summary(session.rawValue)
    }

    /// Every session in the journal, damaged ones included (with their damage).
    ///
    /// A session's state is not rebuilt for this: the policy comes from its first event and
    /// the deletion from its last (a deleted session's last event is `session.deleted`), so a
    /// listing reads two records per session whatever their length.
    public func listSessions() async throws -> [SessionSummary] {
        var result: [SessionSummary] = []
        for session in try await allSessions() {
            let live = await hands.liveTasks(session: session.rawValue).sorted()
            let (last, epoch) = (try await lastSeq(session), try await leaseEpoch(session))
            var summary = SessionSummary(
                id: session.rawValue, policy: "", last_seq: last, lease_epoch: epoch,
                live_tasks: live, deleted: false, damage: nil)
            if let cached = sessions[session] {
                summary.policy = cached.policyName
                summary.deleted = cached.deletedSeq != nil
            } else {
                do {
                    if let first = try await store.event(session: session, seq: 1) {
                        summary.policy = JSONCoding.decode(SessionCreated.self, first.payload)?.policy ?? ""
                    }
                    summary.deleted = try await store.event(session: session, seq: summary.last_seq)?.type == EventType.sessionDeleted
                } catch let e as SessionLogError {
                    summary.damage = e.message
                }
            }
            result.append(summary)
        }
        return result
    }

    /// The session as the API shows it (rebuilding its state from the journal if needed).
    public func summary(_ id: String) async throws -> SessionSummary {
        let session = try sessionID(id)
        let state = try await state(of: session)
        let live = await hands.liveTasks(session: session.rawValue)
        let (last, epoch) = (try await lastSeq(session), try await leaseEpoch(session))
        return SessionSummary(
            id: session.rawValue, policy: state.policyName, last_seq: last,
            lease_epoch: epoch, live_tasks: live.sorted(), deleted: state.deletedSeq != nil, damage: nil)
    }

    /// How many sessions' state is in memory now (at most `maxCachedSessions` plus those
    /// with calls in flight).
    public var cachedSessionCount: Int { sessions.count }

    /// How many callers are waiting for the running call with idempotency key `key`.
    func waitingCallers(session: String, key: String) -> Int {
        guard let session = try? SessionID(session) else { return 0 }
        return waiting[RunningKey(session: session, key: key)] ?? 0
    }

    // MARK: - execute

    /// Runs tool `tool` with JSON `input` (as `execute(session:task:call:…)` after decoding it).
    /// - Throws: `RuntimeError(.invalidArgument)` for an unknown tool or an input that does
    ///   not fit the tool, and as the typed `execute`.
    public func execute(
        session id: String, task: String = "main", tool: String, input: [UInt8], epoch: UInt64? = nil, idempotencyKey: String? = nil,
        progress: ExecuteProgressHandler? = nil
    ) async throws -> ExecuteOutcome {
        let call: ToolCall
        do {
            call = try ToolCall.decode(name: tool, input: input)
        } catch let error as HandsError {
            throw RuntimeError(.invalidArgument, error.message, cause: error)
        }
        return try await execute(session: id, task: task, call: call, epoch: epoch, idempotencyKey: idempotencyKey, progress: progress)
    }

    /// Runs `call` for `task` of session `id`, on that task's Hands.
    ///
    /// The intent is journaled before the tool runs and the result after; a Hands failure is a
    /// result (an error string), never a throw. A result too large for the session's event
    /// limit is cut (with a note) so that it is always stored, and the caller gets exactly what
    /// was stored. With an `idempotencyKey`, the call runs at most once: a later call with
    /// the key gets the journaled result (`replayed`), a concurrent one waits for it.
    /// - Parameters:
    ///   - id: the session.
    ///   - task: the task whose sandbox runs the call (1–64 of `A-Z a-z 0-9 - _`).
    ///   - call: the decoded tool call.
    ///   - epoch: the caller's lease epoch; required once the session was woken.
    ///   - idempotencyKey: 1–200 bytes naming this call within the session.
    ///   - progress: when given, told when the call is accepted, then a `bash` command's
    ///     output as it is produced (see `ExecuteProgress`); a replay reports no output. The
    ///     journal keeps only the result, as without it.
    /// - Throws: `RuntimeError`: `.notFound`, `.staleLease`/`.unknownEpoch` (fencing),
    ///   `.sessionDeleted`, `.idempotencyConflict` (the key names another call),
    ///   `.invalidArgument` (also when the input does not fit the intent event: nothing ran),
    ///   or a journal failure.
    public func execute(
        session id: String, task: String = "main", call: ToolCall, epoch: UInt64? = nil, idempotencyKey: String? = nil,
        progress: ExecuteProgressHandler? = nil
    ) async throws -> ExecuteOutcome {
        let session = try sessionID(id)
        try Self.validateName(task, what: "task")
        if let key = idempotencyKey, key.isEmpty || key.utf8.count > 200 {
            throw RuntimeError(.invalidArgument, "idempotency key must be 1 to 200 bytes")
        }
        try await place(session, claim: true)
        try Self.refuseIfDeleted(try await state(of: session), session, "execute")
        try await checkLease(session, epoch, "execute")
        // Read again after the last suspension (a cache hit does not suspend): a call with this
        // key may have completed while the lease was read from the store, and from here to
        // registering this call as running nothing may suspend, or the call could run twice.
        let state = try await state(of: session)
        let requestHash = Self.sha256(call.canonicalEncoding)
        guard let key = idempotencyKey else {
            return try await perform(session, task: task, call: call, epoch: epoch, key: nil, requestHash: requestHash, progress: progress)
        }
        if let done = state.completed[key] {
            try Self.checkSameCall(done.requestHash, requestHash, key: key, session: session)
            progress?(.accepted)
            return try await replay(session, done)
        }
        let runningKey = RunningKey(session: session, key: key)
        if let first = running[runningKey] {
            try Self.checkSameCall(first.requestHash, requestHash, key: key, session: session)
            progress?(.accepted)
            waiting[runningKey, default: 0] += 1
            defer {
                if let n = waiting[runningKey], n > 1 { waiting[runningKey] = n - 1 } else { waiting[runningKey] = nil }
            }
            var outcome = try await first.task.value
            outcome.replayed = true
            return outcome
        }
        // Registered before the first suspension: a second caller with the key finds it.
        let work = Task { try await self.perform(session, task: task, call: call, epoch: epoch, key: key, requestHash: requestHash, progress: progress) }
        running[runningKey] = (requestHash, work)
        return try await work.value
    }

    /// Journals the intent, runs the call and journals its result (see `execute`).
    private func perform(
        _ session: SessionID, task: String, call: ToolCall, epoch: UInt64?, key: String?, requestHash: String, progress: ExecuteProgressHandler?
    ) async throws -> ExecuteOutcome {
        defer {
            if let key { running[RunningKey(session: session, key: key)] = nil }
        }
        // Loaded (it may have been evicted since `execute` looked) and counted in flight in one
        // step, so that it is not evicted, and not rebuilt, while this call runs.
        let loaded = try await state(of: session)
        if sessions[session] == nil { remember(session, loaded) }
        sessions[session]?.inFlight += 1
        defer { finishCall(session) }
        // A deletion may have started since `execute` looked.
        try Self.refuseIfDeleted(loaded, session, "execute")
        await refreshSecrets()
        let (taskState, isNew) = try await taskState(session, task: task)
        let limit = taskState.policy.session.maxEventBytes
        let intent = ToolIntent(
            task: task, tool: call.name, input: redacted(call.canonicalInput), idempotency_key: key, request_sha256: requestHash)
        let intentPayload = JSONCoding.encode(intent)
        // A bad request (400), like any input that cannot run: nothing ran, nothing is stored.
        guard intentPayload.count <= limit else {
            throw RuntimeError(
                .invalidArgument,
                "\(call.name) refused before it ran: its input is \(intentPayload.count) bytes once journaled, and policy '\(taskState.policy.name)' allows events of at most \(limit) bytes (session.maxEventSize); send less per call (for example, write a file in parts)")
        }
        if isNew {
            _ = try await append(
                session, EventType.taskStarted,
                JSONCoding.encode(
                    TaskStarted(task: task, policy: taskState.policy.name, policy_sha256: taskState.policy.sha256, driver: taskState.policy.hands.driver.rawValue)),
                epoch: epoch)
            sessions[session]?.tasks[task] = taskState
            sessions[session]?.openTasks[task] = taskState.policy.name
        }
        if let fleet {
            do { try await fleet.checkLease() } catch let error as FleetError { throw RuntimeError(.unavailable, error.message, cause: error) }
        }
        let intentSeq = try await append(session, EventType.toolIntent, intentPayload, epoch: epoch)
        progress?(.accepted)
        let relay = progress.map { OutputRelay(limit: taskState.spec.outputLimitBytes, redactor: store.redactor, handler: $0) }
        let started = ContinuousClock.now
        var raw = await hands.execute(TaskKey(session: session.rawValue, task: task), spec: taskState.spec, call: call, output: relay?.sink, intentSeq: intentSeq)
        if let notice = takeoverNotice(session, task: task) { raw = ToolResult(output: notice + raw.output, isError: raw.isError, exitCode: raw.exitCode) }
        relay?.finish()
        let elapsed = ContinuousClock.now - started
        let ms = Int(elapsed.components.seconds) * 1000 + Int(elapsed.components.attoseconds / 1_000_000_000_000_000)
        let (payload, stored) = fittedResult(
            raw, limit: limit,
            event: { ToolResultEvent(task: task, tool: call.name, intent_seq: intentSeq, output: $0, is_error: raw.isError, exit_code: raw.exitCode, duration_ms: ms, idempotency_key: key) })
        // The result is journaled without the epoch: a Brain that lost its lease while the
        // tool ran still gets the truth recorded; the intent was fenced.
        let resultSeq: UInt64
        do {
            resultSeq = try await store.append(session: session, type: EventType.toolResult, payload: payload, epoch: nil, settling: intentSeq)
        } catch let e as SessionLogError where e.code == .alreadySettled {
            // In a fleet: this node lost the session while the call ran, and the node that
            // took it over journaled the call *outcome unknown*. That is its answer, here too.
            return try await settledElsewhere(session, intentSeq: intentSeq, key: key, requestHash: requestHash)
        } catch let e as SessionLogError {
            throw RuntimeError(e)
        }
        if let key { sessions[session]?.completed[key] = Completed(requestHash: requestHash, intentSeq: intentSeq, resultSeq: resultSeq) }
        return ExecuteOutcome(result: stored, intent_seq: intentSeq, result_seq: resultSeq, replayed: false)
    }

    /// The journaled outcome of the intent at `intentSeq`, which another writer settled.
    private func settledElsewhere(_ session: SessionID, intentSeq: UInt64, key: String?, requestHash: String) async throws -> ExecuteOutcome {
        do {
            for try await event in store.events(session: session, after: intentSeq)
            where event.type == EventType.toolResult || event.type == EventType.toolInterrupted {
                let settles =
                    JSONCoding.decode(ToolResultEvent.self, event.payload)?.intent_seq ?? JSONCoding.decode(ToolInterrupted.self, event.payload)?.intent_seq
                guard settles == intentSeq else { continue }
                let done = Completed(requestHash: requestHash, intentSeq: intentSeq, resultSeq: event.seq)
                if let key { sessions[session]?.completed[key] = done }
                return try await replay(session, done)
            }
        } catch let e as SessionLogError {
            throw RuntimeError(e)
        }
        throw RuntimeError(.internal, "the outcome of intent #\(intentSeq) of session \(session) is journaled, the store says, but it was not found; run `agentctl verify \(session)`")
    }

    /// The result event's payload, with the output redacted and, when the encoded event would
    /// exceed `limit`, cut with a note saying how much was cut; and the result as stored.
    private func fittedResult(_ raw: ToolResult, limit: Int, event: (String) -> ToolResultEvent) -> ([UInt8], ToolResult) {
        var output = store.redactor.redact(raw.output)
        var payload = JSONCoding.encode(event(output))
        if payload.count > limit {
            // The tool's closing notes (how much the output limit cut, a timeout, the exit
            // code) stay at the end: the cut takes the output before them.
            let body = store.redactor.redact(raw.body)
            let notes = raw.closingNotes
            let overhead = payload.count - JSONCoding.encodedLength(body)
            let full = body.utf8.count
            var budget = limit - overhead - 200
            while true {
                let kept = JSONCoding.prefix(of: body, encodedBytes: max(0, budget))
                let cut = full - kept.utf8.count
                let note = "\n[result cut: \(cut) more bytes beyond the session's event limit of \(limit) bytes (session.maxEventSize)]"
                let candidate = kept + note + notes
                payload = JSONCoding.encode(event(candidate))
                if payload.count <= limit || budget <= 0 {
                    output = candidate
                    break
                }
                budget -= payload.count - limit
            }
        }
        return (payload, ToolResult(output: output, isError: raw.isError, exitCode: raw.exitCode))
    }

    /// The journaled result of a completed key.
    private func replay(_ session: SessionID, _ done: Completed) async throws -> ExecuteOutcome {
        let event: Event?
        do { event = try await store.event(session: session, seq: done.resultSeq) } catch let e as SessionLogError { throw RuntimeError(e) }
        guard let event else {
            throw RuntimeError(.internal, "the result #\(done.resultSeq) of session \(session) is not in the journal; run `agentctl verify \(session)`")
        }
        let result: ToolResult
        if let r = JSONCoding.decode(ToolResultEvent.self, event.payload) {
            result = ToolResult(output: r.output, isError: r.is_error, exitCode: r.exit_code)
        } else if let i = JSONCoding.decode(ToolInterrupted.self, event.payload) {
            result = .error(i.output ?? Self.outcomeUnknown(stopped: "agentd"))
        } else {
            throw RuntimeError(.internal, "the result #\(done.resultSeq) of session \(session) cannot be read back; run `agentctl verify \(session)`")
        }
        return ExecuteOutcome(result: result, intent_seq: done.intentSeq, result_seq: done.resultSeq, replayed: true)
    }

    /// What a retry of a call cut short by a crash gets, journaled once.
    static func outcomeUnknown(stopped: String) -> String {
        "outcome unknown: \(stopped) stopped while this call was running, so it may or may not have run (in part or in full); it was not run again. Check the sandbox's state before deciding what to do, and use a new idempotency key to run it again."
    }

    private static func checkSameCall(_ stored: String?, _ requested: String, key: String, session: SessionID) throws {
        guard let stored, stored != requested else { return }
        throw RuntimeError(
            .idempotencyConflict,
            "idempotency key '\(key)' of session \(session) was already used for a different tool or input; use a new key for a new call")
    }

    /// The task's policy snapshot (a new task takes the session's policy as it is now).
    private func taskState(_ session: SessionID, task: String) async throws -> (TaskState, isNew: Bool) {
        if let existing = sessions[session]?.tasks[task] { return (existing, false) }
        let name = sessions[session]?.policyName ?? Policy.defaultName
        guard let policy = await policies.policy(named: name) else {
            throw RuntimeError(.unavailable, "the session's policy '\(name)' is no longer loaded; restore it in the policy directory")
        }
        if let existing = sessions[session]?.tasks[task] { return (existing, false) }
        return (TaskState(policy: policy, spec: Self.sandboxSpec(policy)), true)
    }

    private func finishCall(_ session: SessionID) {
        sessions[session]?.inFlight -= 1
        sessions[session]?.lastUsed = .now
        if sessions[session]?.inFlight ?? 0 <= 0, let waiters = drainWaiters.removeValue(forKey: session) {
            for w in waiters { w.resume() }
        }
        evictIfNeeded()
    }

    /// The value with every string (and key) redacted, before it is encoded.
    private func redacted(_ value: JSONValue) -> JSONValue {
        switch value {
        case .string(let s): .string(store.redactor.redact(s))
        case .array(let a): .array(a.map(redacted))
        case .object(let o): .object(Dictionary(o.map { (store.redactor.redact($0.key), redacted($0.value)) }, uniquingKeysWith: { a, _ in a }))
        default: value
        }
    }

    // MARK: - wake, checkpoint, task end, delete, reads

    /// Hands out a lease with a fencing epoch one higher than any before (journaled).
    /// - Throws: `RuntimeError` (`.sessionDeleted` for a deleted session).
    public func wake(_ id: String) async throws -> Lease {
        let session = try sessionID(id)
        try Self.refuseIfDeleted(try await state(of: session), session, "wake")
        do { return try await store.wake(session: session) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// Stores a Brain's state; `getSession` returns it with the events after it.
    /// - Throws: `RuntimeError`: fencing as `execute`, `.sessionDeleted`, `.tooLarge`.
    public func checkpoint(_ id: String, state: [UInt8], epoch: UInt64?) async throws -> UInt64 {
        let session = try sessionID(id)
        try Self.refuseIfDeleted(try await self.state(of: session), session, "checkpoint")
        try await checkLease(session, epoch, "checkpoint")
        await refreshSecrets()
        do { return try await store.checkpoint(session: session, state: state, epoch: epoch) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// Ends `task`: its sandbox is released and `task.ended` journaled.
    /// - Returns: whether the task had a sandbox.
    /// - Throws: `RuntimeError`: fencing as `execute`, `.sessionDeleted`.
    public func endTask(_ id: String, task: String, epoch: UInt64?) async throws -> Bool {
        let session = try sessionID(id)
        try Self.validateName(task, what: "task")
        try await place(session, claim: false)
        try Self.refuseIfDeleted(try await state(of: session), session, "task end")
        try await checkLease(session, epoch, "task end")
        _ = try await append(session, EventType.taskEnded, JSONCoding.encode(TaskEnded(task: task)), epoch: epoch)
        sessions[session]?.tasks[task] = nil
        sessions[session]?.openTasks[task] = nil
        return await hands.endTask(TaskKey(session: session.rawValue, task: task))
    }

    /// Deletes session `id`: releases all of its sandboxes, waits for its calls in flight, and
    /// journals `session.deleted` (the journal stays append-only: its events stay readable and
    /// verifiable). From then on the session refuses execute, wake, checkpoint and task end.
    /// Deleting a deleted session does nothing.
    /// - Parameters:
    ///   - id: the session.
    ///   - epoch: a Brain's lease epoch, checked like `execute`'s; nil for an operator (or
    ///     retention), who holds no lease.
    ///   - reason: journaled with the deletion.
    /// - Returns: the seq of the `session.deleted` event.
    /// - Throws: `RuntimeError` (`.notFound`, fencing, journal failures).
    @discardableResult
    public func deleteSession(_ id: String, epoch: UInt64?, reason: String = "deleted by request") async throws -> UInt64 {
        let session = try sessionID(id)
        try await place(session, claim: false)
        let state = try await state(of: session)
        if let seq = state.deletedSeq { return seq }
        if let epoch { try await checkLease(session, epoch, "delete") }
        sessions[session]?.deleting = true
        do {
            await hands.endSession(session.rawValue)
            if sessions[session]?.inFlight ?? 0 > 0 {
                await withCheckedContinuation { drainWaiters[session, default: []].append($0) }
            }
            // Every sandbox again (a call that was in flight may have provisioned one after the
            // first pass), then what the session kept between tasks (`workspace: session`).
            // Only then is the deletion journaled: a failure here leaves the session as it was,
            // and deleting again retries.
            do {
                try await hands.removeSessionData(session: session.rawValue)
            } catch {
                throw RuntimeError(
                    .unavailable, "could not remove the workspace of session \(session): \((error as? HandsError)?.message ?? "\(error)"); delete it again",
                    cause: error)
            }
            if let seq = sessions[session]?.deletedSeq { return seq }
            let seq = try await append(session, EventType.sessionDeleted, JSONCoding.encode(SessionDeleted(reason: reason)))
            sessions[session]?.deletedSeq = seq
            sessions[session]?.tasks = [:]
            sessions[session]?.openTasks = [:]
            logger.info("session deleted", metadata: ["session.id": "\(session)", "reason": "\(reason)"])
            return seq
        } catch {
            sessions[session]?.deleting = false
            throw error
        }
    }

    /// Deletes every session whose last event is older than `idle` and that has no sandbox
    /// (the retention setting; called from the housekeeping loop).
    /// - Returns: the ids deleted.
    @discardableResult
    public func deleteIdleSessions(idleLongerThan idle: Duration, now: Date = Date()) async -> [String] {
        let cutoff = now.addingTimeInterval(-(Double(idle.components.seconds) + Double(idle.components.attoseconds) / 1e18))
        var deleted: [String] = []
        for session in (try? await allSessions()) ?? [] {
            if let cached = sessions[session], cached.deletedSeq != nil || cached.inFlight > 0 { continue }
            let lastNumber = (try? await lastSeq(session)) ?? 0
            guard let last = try? await store.event(session: session, seq: lastNumber),
                last.type != EventType.sessionDeleted, last.timestamp < cutoff,
                await hands.liveTasks(session: session.rawValue).isEmpty
            else { continue }
            do {
                try await deleteSession(session.rawValue, epoch: nil, reason: "retention: idle since \(ISO8601DateFormatter().string(from: last.timestamp))")
                deleted.append(session.rawValue)
            } catch {
                logger.warning("retention could not delete a session", metadata: ["session.id": "\(session)", "error": "\(error)"])
            }
        }
        return deleted
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
    public func events(_ id: String, after: UInt64, follow: Bool) async throws -> EventSequence {
        let session = try sessionID(id)
        guard try await lastSeq(session) > 0 else { throw RuntimeError(.notFound, "no session \(session)") }
        return follow ? store.follow(session: session, after: after) : store.events(session: session, after: after)
    }

    // MARK: - Hands events

    /// Journals what happened to a task's Hands (provisioned, released, failed); nothing for
    /// a session that does not exist or was deleted (its deletion stays its last event).
    public func record(_ event: HandsEvent) async {
        let (key, type, payload): (TaskKey, String, HandsEventPayload)
        switch event {
        case .provisioned(let k, let sandbox, let fromPool, let ms):
            (key, type, payload) = (k, EventType.handsProvisioned, HandsEventPayload(task: k.task, sandbox: sandbox, from_pool: fromPool, milliseconds: ms))
        case .released(let k, let sandbox, let reason):
            (key, type, payload) = (k, EventType.handsReleased, HandsEventPayload(task: k.task, sandbox: sandbox, reason: reason))
        case .failed(let k, let sandbox, let kind, let message):
            (key, type, payload) = (k, EventType.handsFailed, HandsEventPayload(task: k.task, sandbox: sandbox, kind: kind, message: message))
        case .adopted(let k, let sandbox):
            (key, type, payload) = (
                k, EventType.handsAdopted,
                HandsEventPayload(task: k.task, sandbox: sandbox, reason: "agentd restarted; the task's sandbox and its workspace were kept")
            )
        }
        guard let session = try? SessionID(key.session), let state = try? await state(of: session), state.deletedSeq == nil else { return }
        do {
            _ = try await append(session, type, JSONCoding.encode(payload))
        } catch {
            logger.warning("could not journal a hands event", metadata: ["session.id": "\(session)", "error": "\(error)"])
        }
    }

    /// Journals one of the vault-proxy's decisions (`egress.allowed` / `egress.denied`) in
    /// its session, redacted like everything else; nothing for a session that does not exist
    /// or was deleted.
    public func recordEgress(session id: String, allowed: Bool, _ decision: EgressDecision) async {
        guard let session = try? SessionID(id), (try? await lastSeq(session)) ?? 0 > 0,
            let state = try? await state(of: session), state.deletedSeq == nil
        else { return }
        var d = decision
        d.path = d.path.map { store.redactor.redact($0) }
        d.rule = store.redactor.redact(d.rule)
        do {
            _ = try await append(session, allowed ? EventType.egressAllowed : EventType.egressDenied, JSONCoding.encode(d))
        } catch {
            logger.warning("could not journal an egress decision", metadata: ["session.id": "\(session)", "error": "\(error)"])
        }
    }

    // MARK: - restart

    /// After a start of agentd: takes over the sandboxes its predecessor left for tasks still
    /// live in the journal and removes the others (`HandsManager.restore`). A session's state
    /// is rebuilt on the way, so a call that was running when agentd died gets its journaled
    /// *outcome unknown* result now; it is never run again.
    @discardableResult
    public func restoreHands() async throws -> HandsManager.Restored {
        try await hands.restore(liveTask: { [weak self] key in await self?.liveTaskSpec(key) })
    }

    /// The spec the sandbox of `key` is served with when the task is live: its session exists
    /// and is not deleted, and the task started and did not end. The spec is that of the
    /// policy the task started under, as loaded now; nil when that policy is gone.
    func liveTaskSpec(_ key: TaskKey) async -> SandboxSpec? {
        if let fleet {
            // In a fleet, only the sessions the store says this node serves.
            guard let owner = try? await fleet.registry.owner(session: key.session), owner.name == fleet.name else { return nil }
        }
        guard let session = try? SessionID(key.session), (try? await lastSeq(session)) ?? 0 > 0,
            let state = try? await state(of: session), state.deletedSeq == nil, !state.deleting,
            let policyName = state.openTasks[key.task]
        else { return nil }
        if let running = state.tasks[key.task] { return running.spec }
        return await policies.policy(named: policyName).map(Self.sandboxSpec)
    }

    // MARK: - fleet

    /// In a fleet, checks that this node serves the calls of `session` (with `claim`, taking
    /// it when it has no owner or its owner died) and otherwise throws a redirect to the owner.
    /// A takeover is journaled (`session.moved`), and what this node knew of the session is
    /// rebuilt from the store: the dead node's calls in flight get *outcome unknown*, and the
    /// next result of each of its tasks says the task runs on fresh Hands here.
    private func place(_ session: SessionID, claim: Bool) async throws {
        guard let fleet else { return }
        let placement: FleetNode.Placement
        do {
            placement = try await fleet.placement(of: session.rawValue, claim: claim)
        } catch let error as FleetError {
            throw RuntimeError(.unavailable, error.message, cause: error)
        }
        switch placement {
        case .elsewhere(let owner):
            // What this node cached or ran for it is stale: another node serves it now.
            if let cached = sessions[session], cached.inFlight == 0 { sessions[session] = nil }
            if !(await hands.liveTasks(session: session.rawValue)).isEmpty { await hands.endSession(session.rawValue) }
            let redirect = SessionElsewhere(session: session.rawValue, owner: owner)
            throw RuntimeError(.elsewhere, redirect.description, cause: redirect)
        case .local(let claimed, let from):
            if claimed, let cached = sessions[session], cached.inFlight == 0 { sessions[session] = nil }
            guard let from else { return }
            takenOver[session] = (from, [])
            _ = try await append(session, EventType.sessionMoved, JSONCoding.encode(SessionMoved(from: from, to: fleet.name)))
            let rebuilt = try await state(of: session)
            takenOver[session] = rebuilt.openTasks.isEmpty ? nil : (from, Set(rebuilt.openTasks.keys))
            logger.notice("took over a session from a dead node", metadata: ["session.id": "\(session)", "from": "\(from)", "tasks": "\(rebuilt.openTasks.count)"])
        }
    }

    /// Who stopped, for the *outcome unknown* results of calls a rebuild finds without a
    /// result; nil when this node must not settle them (another node serves the session).
    private func settlingNode(_ session: SessionID) async -> String? {
        guard let fleet else { return "agentd" }
        if let from = await fleet.previousOwner(of: session.rawValue) { return "node \(from)" }
        guard case .local? = try? await fleet.placement(of: session.rawValue, claim: false) else { return nil }
        // Served here, or by no live node: the owner (this node before a restart, or a dead one).
        guard let owner = try? await fleet.registry.owner(session: session.rawValue) else { return nil }
        return owner.name == fleet.name ? "agentd" : nil
    }

    /// The line a task's first result after a takeover starts with; once per task.
    private func takeoverNotice(_ session: SessionID, task: String) -> String? {
        guard let taken = takenOver[session], taken.tasks.contains(task) else { return nil }
        takenOver[session]?.tasks.remove(task)
        if takenOver[session]?.tasks.isEmpty == true { takenOver[session] = nil }
        return "[agentd: this call ran on fresh Hands on node \(fleet?.name ?? "?"): node \(taken.from), which held this task's sandbox, stopped answering heartbeats, and its files are gone]\n"
    }

    // MARK: - state

    /// The session's derived state, rebuilt from its journal on first use after a start or an
    /// eviction. An intent without a result (agentd died while the tool ran) gets a journaled
    /// *outcome unknown* result (`tool.interrupted`), once: its key maps to it from then on.
    private func state(of session: SessionID) async throws -> SessionState {
        if sessions[session] != nil {
            sessions[session]?.lastUsed = .now
            if let s = sessions[session] { return s }
        }
        if let pending = loading[session] {
            let state = try await pending.value
            // Cached by whichever waiter resumes first: a call counts itself in flight on the
            // cached state right after this returns, and a state that is not cached yet would
            // not count it — the cache could then be dropped and rebuilt while the call runs,
            // and the rebuild would settle its intent *outcome unknown*.
            if let s = sessions[session] { return s }
            remember(session, state)
            return state
        }
        // Registered before anything suspends, so that concurrent callers share one rebuild.
        let task = Task { [store] () async throws -> SessionState in
            let stopped = await self.settlingNode(session)
            // A settling append refused because another writer settled the intent since it was
            // read (the call's own node journaled its result): read the journal again.
            for _ in 0..<4 {
                do { return try await Self.rebuild(session, store: store, settle: stopped) } catch is SettledMeanwhile {}
            }
            throw RuntimeError(.unavailable, "session \(session) could not be loaded: its calls kept being settled by another node while it was read; retry")
        }
        loading[session] = task
        defer { loading[session] = nil }
        let state = try await task.value
        if let s = sessions[session] { return s }
        remember(session, state)
        return state
    }

    /// Rebuilds a session's state from its journal. With `settle` (who stopped: "agentd", or
    /// "node NAME"), every intent without a result gets a journaled *outcome unknown* result;
    /// without it (another, live node serves the session's calls, and may be running them),
    /// none does.
    private static func rebuild(_ session: SessionID, store: any SessionJournal, settle: String?) async throws -> SessionState {
        var state: SessionState?
        var open: [UInt64: ToolIntent] = [:]
        var hashes: [UInt64: String] = [:]
        func complete(_ key: String?, intentSeq: UInt64, resultSeq: UInt64) {
            guard let key else { return }
            state?.completed[key] = Completed(requestHash: hashes[intentSeq], intentSeq: intentSeq, resultSeq: resultSeq)
        }
        do {
            for try await event in store.events(session: session, after: 0) {
                switch event.type {
                case EventType.sessionCreated:
                    if let p = JSONCoding.decode(SessionCreated.self, event.payload) { state = SessionState(policyName: p.policy) }
                case EventType.toolIntent:
                    if let p = JSONCoding.decode(ToolIntent.self, event.payload) {
                        open[event.seq] = p
                        if p.idempotency_key != nil, let h = p.request_sha256 { hashes[event.seq] = h }
                    }
                case EventType.toolResult:
                    if let p = JSONCoding.decode(ToolResultEvent.self, event.payload) {
                        let key = p.idempotency_key ?? open[p.intent_seq]?.idempotency_key
                        open[p.intent_seq] = nil
                        complete(key, intentSeq: p.intent_seq, resultSeq: event.seq)
                    }
                case EventType.toolInterrupted:
                    if let p = JSONCoding.decode(ToolInterrupted.self, event.payload) {
                        let key = p.idempotency_key ?? open[p.intent_seq]?.idempotency_key
                        open[p.intent_seq] = nil
                        complete(key, intentSeq: p.intent_seq, resultSeq: event.seq)
                    }
                case EventType.taskStarted:
                    if let p = JSONCoding.decode(TaskStarted.self, event.payload) { state?.openTasks[p.task] = p.policy }
                case EventType.taskEnded:
                    if let p = JSONCoding.decode(TaskEnded.self, event.payload) { state?.openTasks[p.task] = nil }
                case EventType.sessionDeleted:
                    state?.deletedSeq = event.seq
                    state?.openTasks = [:]
                default:
                    break
                }
            }
        } catch let e as SessionLogError {
            throw RuntimeError(e)
        }
        guard state != nil else { throw RuntimeError(.notFound, "no session \(session)") }
        for (seq, intent) in open.sorted(by: { $0.key < $1.key }) where settle != nil {
            let stopped = settle ?? "agentd"
            let payload = ToolInterrupted(
                task: intent.task, intent_seq: seq, reason: "\(stopped) stopped before the tool's result was journaled", tool: intent.tool,
                idempotency_key: intent.idempotency_key, output: outcomeUnknown(stopped: stopped))
            let resultSeq: UInt64
            do {
                resultSeq = try await store.append(
                    session: session, type: EventType.toolInterrupted, payload: JSONCoding.encode(payload), epoch: nil, settling: seq)
            } catch let e as SessionLogError where e.code == .alreadySettled {
                throw SettledMeanwhile()
            } catch let e as SessionLogError {
                throw RuntimeError(e)
            }
            complete(intent.idempotency_key, intentSeq: seq, resultSeq: resultSeq)
        }
        guard let state else { throw RuntimeError(.notFound, "no session \(session)") }
        return state
    }

    /// A rebuild's settling append was refused: the intent got its outcome after it was read.
    private struct SettledMeanwhile: Error {}

    /// Caches `state`, evicting the least recently used idle sessions beyond the cap.
    private func remember(_ session: SessionID, _ state: SessionState) {
        sessions[session] = state
        evictIfNeeded()
    }

    private func evictIfNeeded() {
        guard sessions.count > maxCachedSessions else { return }
        // Never a session with calls in flight or a deletion under way: their state is live.
        let idle = sessions.filter { $0.value.inFlight == 0 && !($0.value.deleting && $0.value.deletedSeq == nil) }
            .sorted { $0.value.lastUsed < $1.value.lastUsed }
        for (session, _) in idle.prefix(sessions.count - maxCachedSessions) { sessions[session] = nil }
    }

    /// Refuses a change to a deleted session.
    private static func refuseIfDeleted(_ state: SessionState, _ session: SessionID, _ what: String) throws {
        guard state.deletedSeq != nil || state.deleting else { return }
        throw RuntimeError(.sessionDeleted, "\(what) in session \(session) refused: the session was deleted; its events can still be read, but it takes no new calls — create a new session")
    }

    /// Fencing: once the session was woken, a change must carry the current epoch.
    private func checkLease(_ session: SessionID, _ epoch: UInt64?, _ what: String) async throws {
        let current = try await leaseEpoch(session)
        switch epoch {
        case nil where current > 0:
            throw RuntimeError(
                .staleLease,
                "\(what) in session \(session) refused: the session was woken (lease epoch \(current)), so every change must carry the epoch that wake returned — pass it (agentctl: --epoch N; API: \"epoch\")")
        case let e? where e < current:
            throw RuntimeError(
                .staleLease,
                "\(what) in session \(session) refused: lease epoch \(e) is stale; a newer Brain holds epoch \(current) (it called wake) — stop this Brain")
        case let e? where e > current:
            throw RuntimeError(
                .unknownEpoch,
                "\(what) in session \(session) refused: lease epoch \(e) was never handed out (the current epoch is \(current)); call wake to get a lease")
        default:
            return
        }
    }

    /// The session's last seq; the store's errors as `RuntimeError`.
    private func lastSeq(_ session: SessionID) async throws -> UInt64 {
        do { return try await store.lastSeq(session: session) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// The session's lease epoch; the store's errors as `RuntimeError`.
    private func leaseEpoch(_ session: SessionID) async throws -> UInt64 {
        do { return try await store.leaseEpoch(session: session) } catch let e as SessionLogError { throw RuntimeError(e) }
    }

    /// Every session in the store; the store's errors as `RuntimeError`.
    private func allSessions() async throws -> [SessionID] {
        do { return try await store.sessions() } catch let e as SessionLogError { throw RuntimeError(e) }
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

    static func sha256(_ bytes: [UInt8]) -> String {
        SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
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
        // A file read is a result: it must fit the output limit and the session's events.
        spec.fileLimitBytes = min(h.outputLimitBytes, policy.session.maxEventBytes)
        spec.diskBytes = h.diskBytes
        spec.workspace = h.workspace == .session ? .session : .task
        spec.policyName = policy.name
        spec.maxSandboxesPerSession = policy.session.maxSandboxes
        spec.egressProxy = policy.network.mode == .proxy
        return spec
    }
}

import Foundation
import Logging

/// Something that happened to a task's Hands, for the journal and metrics.
public enum HandsEvent: Sendable, Equatable {
    case provisioned(TaskKey, sandbox: String, fromPool: Bool, milliseconds: Int)
    case released(TaskKey, sandbox: String, reason: String)
    case failed(TaskKey, sandbox: String, kind: String, message: String)
    /// A sandbox a previous run of agentd left for a task still live was taken over, with
    /// its workspace (see `HandsManager.restore`).
    case adopted(TaskKey, sandbox: String)
}

/// Tells whether a task is live (its session exists and is not deleted, the task started and
/// did not end) and, if so, the spec its sandbox is served with now; nil otherwise.
public typealias LiveTaskResolver = @Sendable (TaskKey) async -> SandboxSpec?

/// Owns every task's sandbox: provisions on demand (or from a warm pool), runs tool calls,
/// turns every failure into a string, releases sandboxes when a task ends or idles out, and
/// removes orphans of this instance (reconcile). After a restart of agentd, `restore` takes
/// over the sandboxes of tasks still live and removes the rest.
///
/// Contract: `execute` never throws. A failure that leaves the sandbox unusable (engine
/// unreachable, sandbox killed or out of memory, timeout backstop) discards it, and the next
/// call provisions fresh Hands.
public actor HandsManager {
    private struct Live {
        var sandbox: SandboxHandle
        var lastUsed: ContinuousClock.Instant
        var inFlight: Int
    }

    public nonisolated let driver: any HandsDriver
    public nonisolated let instance: String
    private let logger: Logger
    private let onEvent: @Sendable (HandsEvent) async -> Void
    private var live: [TaskKey: Live] = [:]
    private var provisioning: [TaskKey: Task<SandboxHandle, any Error>] = [:]
    private var pool: [SandboxSpec: [SandboxHandle]] = [:]
    private var poolTargets: [SandboxSpec: Int] = [:]
    private var refills: [SandboxSpec: Task<Void, Never>] = [:]
    private var poolErrors: [SandboxSpec: String] = [:]
    /// The host's sandbox limits (agentd's `--max-sandboxes`, `--sandbox-memory`).
    public let limits: HostLimits
    /// The memory limit of each sandbox being provisioned for a task (counted against
    /// `limits` before it exists).
    private var pendingMemory: [TaskKey: Int] = [:]
    /// Set by `restore` until it has gone through the listing once: every `reconcile` until
    /// then restores instead (the engine may not answer at start).
    private var pendingRestore: LiveTaskResolver?
    /// The vault-proxy listener and git workspace of each task's sandbox, when agentd has them.
    public nonisolated let attachments: (any SandboxAttachments)?

    /// - Parameters:
    ///   - limits: how many sandboxes, and how much of their memory, the host takes; live and
    ///     warm sandboxes count alike.
    ///   - attachments: attached to every sandbox that serves a task (see `SandboxAttachments`).
    public init(
        driver: any HandsDriver, instance: String, limits: HostLimits = HostLimits(), attachments: (any SandboxAttachments)? = nil,
        logger: Logger = Logger(label: "agentd.hands"), onEvent: @escaping @Sendable (HandsEvent) async -> Void = { _ in }
    ) {
        self.driver = driver
        self.instance = instance
        self.limits = limits
        self.attachments = attachments
        self.logger = logger
        self.onEvent = onEvent
    }

    // MARK: - execute

    /// Runs tool `name` with JSON `input` in the sandbox of `key` (decodes, then as
    /// `execute(_:spec:call:)`); an input that does not decode is an error result.
    public func execute(_ key: TaskKey, spec: SandboxSpec, tool name: String, input: [UInt8]) async -> ToolResult {
        do {
            return await execute(key, spec: spec, call: try ToolCall.decode(name: name, input: input))
        } catch {
            return .error("\(error)")
        }
    }

    /// Runs the decoded `call` in the sandbox of `key`, provisioning it on first use.
    /// `output`, when given, sees a `bash` command's output as it is produced (as the driver
    /// gives it: neither cut nor redacted; the caller does both).
    /// `intentSeq`: the journal's `tool.intent` seq of the call, named to the sandbox's
    /// attachments (the vault-proxy journals each egress decision with it).
    public func execute(_ key: TaskKey, spec: SandboxSpec, call: ToolCall, output: OutputSink? = nil, intentSeq: UInt64? = nil) async -> ToolResult {
        let sandbox: SandboxHandle
        do {
            sandbox = try await sandboxFor(key, spec: spec)
        } catch let error as HandsError where error.kind == .limitReached {
            return .error(error.message)
        } catch {
            let message = (error as? HandsError)?.message ?? "\(error)"
            return .error("could not provision a sandbox for task \(key.task): \(message); the next call will try again")
        }
        live[key]?.inFlight += 1
        if let attachments, let intentSeq { await attachments.setIntent(sandbox, for: key, seq: intentSeq) }
        defer {
            live[key]?.inFlight -= 1
            live[key]?.lastUsed = .now
        }
        do {
            return try await ToolRunner.run(call, on: sandbox, driver: driver, output: output)
        } catch let error as HandsError {
            guard error.discardsSandbox else { return .error(error.message) }
            await discard(key, sandbox: sandbox, error: error)
            return .error("\(error.message); a fresh sandbox will be provisioned on the next call")
        } catch {
            return .error("\(error)")
        }
    }

    /// The sandbox of `key`, provisioned now if it has none (once, however many calls wait).
    private func sandboxFor(_ key: TaskKey, spec: SandboxSpec) async throws -> SandboxHandle {
        if let existing = live[key] { return existing.sandbox }
        if let pending = provisioning[key] { return try await pending.value }
        // Checked and reserved before the first suspension: concurrent calls see each other.
        let (pooled, evicted) = try admit(key, spec: spec)
        let started = ContinuousClock.now
        let task = Task { [driver, attachments] () async throws -> SandboxHandle in
            for victim in evicted { try? await driver.destroy(victim) }
            var sandbox: SandboxHandle?
            if let pooled {
                do {
                    try await driver.assign(pooled, to: key)
                    var assigned = pooled
                    assigned.labels[SandboxLabel.session] = key.session
                    assigned.labels[SandboxLabel.task] = key.task
                    sandbox = assigned
                } catch {
                    try? await driver.destroy(pooled)
                }
            }
            let made: SandboxHandle
            if let sandbox {
                made = sandbox
            } else {
                made = try await driver.provision(spec, labels: [SandboxLabel.session: key.session, SandboxLabel.task: key.task])
            }
            guard let attachments else { return made }
            do {
                try await attachments.attach(made, for: key, adopted: false)
            } catch {
                await attachments.detach(made)
                try? await driver.destroy(made)
                throw error
            }
            return made
        }
        provisioning[key] = task
        pendingMemory[key] = spec.memoryBytes
        defer {
            provisioning[key] = nil
            pendingMemory[key] = nil
        }
        let sandbox = try await task.value
        live[key] = Live(sandbox: sandbox, lastUsed: .now, inFlight: 0)
        let ms = Int((ContinuousClock.now - started).components.seconds * 1000 + (ContinuousClock.now - started).components.attoseconds / 1_000_000_000_000_000)
        let fromPool = sandbox.labels[SandboxLabel.pool] != nil
        logger.info("provisioned sandbox", metadata: ["task": "\(key)", "sandbox": "\(sandbox.id.prefix(12))", "pool": "\(fromPool)"])
        await onEvent(.provisioned(key, sandbox: sandbox.id, fromPool: fromPool, milliseconds: ms))
        scheduleRefill(spec)
        return sandbox
    }

    /// Checks the session's and the host's sandbox limits for a new sandbox of `spec` for
    /// `key`, and takes a warm one of `spec` if the pool has one (it is counted already).
    /// Tasks come before warm sandboxes: at the host's limit, pooled sandboxes of other specs
    /// are given up to make room.
    /// - Returns: the warm sandbox taken, if any, and the pooled sandboxes given up (the
    ///   caller destroys them).
    /// - Throws: `HandsError.limitReached` naming the limit and what to do.
    private func admit(_ key: TaskKey, spec: SandboxSpec) throws -> (pooled: SandboxHandle?, evicted: [SandboxHandle]) {
        if let max = spec.maxSandboxesPerSession {
            let held = Set(live.keys.filter { $0.session == key.session } + provisioning.keys.filter { $0.session == key.session }).count
            if held >= max {
                throw HandsError(
                    .limitReached,
                    "session \(key.session) already holds \(held) sandbox\(held == 1 ? "" : "es"), the most its policy '\(spec.policyName)' allows (session.maxSandboxes: \(max)); end a task you no longer need (agentctl task end \(key.session) TASK) and call again")
            }
        }
        if let pooled = takePooled(spec) { return (pooled, []) }
        var evicted: [SandboxHandle] = []
        while let refusal = hostRefusal(adding: spec) {
            guard let other = pool.first(where: { !$0.value.isEmpty })?.key, var list = pool[other], !list.isEmpty else { throw refusal }
            evicted.append(list.removeLast())
            pool[other] = list
        }
        return (nil, evicted)
    }

    /// Why one more sandbox of `spec` would exceed the host's limits, or nil when it fits.
    /// - Parameter countedAlready: 1 when the caller is a refill, which counts itself as a
    ///   sandbox in flight.
    private func hostRefusal(adding spec: SandboxSpec, countedAlready: Int = 0) -> HandsError? {
        let pooled = pool.values.flatMap { $0 }
        if let max = limits.maxSandboxes {
            // A running refill is about to add one more.
            let count = live.count + provisioning.count + pooled.count + refills.count - countedAlready
            if count >= max {
                return HandsError(
                    .limitReached,
                    "this host already runs \(count) sandboxes, the most agentd allows (--max-sandboxes \(max)); end a task you no longer need, or try again when others have ended")
            }
        }
        if let budget = limits.memoryBytes {
            let held = live.values.reduce(0) { $0 + $1.sandbox.spec.memoryBytes } + pendingMemory.values.reduce(0, +)
                + pooled.reduce(0) { $0 + $1.spec.memoryBytes }
            if held + spec.memoryBytes > budget {
                return HandsError(
                    .limitReached,
                    "a sandbox of policy '\(spec.policyName)' needs \(formatBytes(spec.memoryBytes)) of memory, but the host's sandboxes already hold \(formatBytes(held)) of agentd's budget of \(limits.memorySource.isEmpty ? formatBytes(budget) : limits.memorySource) (--sandbox-memory); end a task you no longer need, or try again when others have ended")
            }
        }
        return nil
    }

    private func discard(_ key: TaskKey, sandbox: SandboxHandle, error: HandsError) async {
        if live[key]?.sandbox.id == sandbox.id { live[key] = nil }
        logger.warning("discarding sandbox", metadata: ["task": "\(key)", "sandbox": "\(sandbox.id.prefix(12))", "reason": "\(error.kind.rawValue)"])
        await onEvent(.failed(key, sandbox: sandbox.id, kind: error.kind.rawValue, message: error.message))
        await attachments?.detach(sandbox)
        try? await driver.destroy(sandbox)
    }

    // MARK: - task end, idle, reconcile

    /// Releases the sandbox of `key`, if it has one.
    /// - Returns: whether there was one.
    @discardableResult
    public func endTask(_ key: TaskKey, reason: String = "task ended") async -> Bool {
        if let pending = provisioning[key] { _ = try? await pending.value }
        guard let entry = live.removeValue(forKey: key) else { return false }
        await attachments?.detach(entry.sandbox)
        do {
            try await driver.destroy(entry.sandbox)
        } catch {
            logger.warning("could not remove sandbox; reconcile will", metadata: ["sandbox": "\(entry.sandbox.id.prefix(12))", "error": "\(error)"])
        }
        await onEvent(.released(key, sandbox: entry.sandbox.id, reason: reason))
        return true
    }

    /// Releases every sandbox of `session`.
    public func endSession(_ session: String) async {
        for key in live.keys where key.session == session { await endTask(key, reason: "session ended") }
    }

    /// Releases every sandbox of `session` and removes what it kept between tasks (its
    /// `workspace: session` data): the session is being deleted.
    /// - Throws: `HandsError` when the data cannot be removed.
    public func removeSessionData(session: String) async throws {
        await endSession(session)
        try await driver.removeSessionData(session: session)
    }

    /// Releases sandboxes idle longer than their spec's idle timeout.
    /// - Returns: how many were released.
    @discardableResult
    public func releaseIdle(now: ContinuousClock.Instant = .now) async -> Int {
        let idle = live.filter { $0.value.inFlight == 0 && now - $0.value.lastUsed >= $0.value.sandbox.spec.idleTimeout }.map(\.key)
        for key in idle { await endTask(key, reason: "idle") }
        return idle.count
    }

    /// Removes every sandbox labelled with this instance that no live task or pool holds —
    /// what a crash of agentd left behind. Until a `restore` has completed, it restores.
    /// - Returns: the ids removed.
    @discardableResult
    public func reconcile() async throws -> [String] {
        try await reconcile(liveTask: pendingRestore).removed
    }

    /// What `restore` did.
    public struct Restored: Sendable, Equatable {
        /// The sandboxes taken over, now live for their tasks.
        public var adopted: [SandboxHandle]
        /// The ids of the sandboxes removed.
        public var removed: [String]
    }

    /// After a restart of agentd (or a kill -9): takes over every sandbox of this instance
    /// that serves a task `liveTask` calls live and that still answers (`HandsDriver.adopt`),
    /// so that the task's next call runs in it, with its workspace; journals `adopted` for
    /// each. Removes the others: sandboxes of ended tasks or of unknown or deleted sessions,
    /// sandboxes that do not answer, and pooled sandboxes (no pool is accounted for yet).
    ///
    /// An adopted sandbox is served with the spec `liveTask` gives — the policy as it is now:
    /// agentd's own limits (command timeout, output and file limits, idle timeout) follow it,
    /// while what the sandbox was made with (image, memory, pids, disk) stays until the task
    /// ends. A sandbox whose policy moved to the other driver is not adopted.
    ///
    /// When the listing fails (the engine does not answer yet), every later `reconcile`
    /// restores with `liveTask` until one succeeds, so that no live task's sandbox is taken
    /// for an orphan.
    @discardableResult
    public func restore(liveTask: @escaping LiveTaskResolver) async throws -> Restored {
        pendingRestore = liveTask
        return try await reconcile(liveTask: liveTask)
    }

    private func reconcile(liveTask: LiveTaskResolver?) async throws -> Restored {
        let known = Set(live.values.map(\.sandbox.id) + pool.values.flatMap { $0.map(\.id) })
        var done = Restored(adopted: [], removed: [])
        // Adoptions first, removals after: a removed sandbox may share its session's workspace
        // with an adopted one, which must be taken back before the other lets it go.
        var doomed: [(id: String, key: TaskKey?, reason: String)] = []
        for (id, labels) in try await driver.list(instance: instance) where !known.contains(id) {
            let key = labels[SandboxLabel.session].flatMap { session in labels[SandboxLabel.task].map { TaskKey(session: session, task: $0) } }
            // A sandbox being provisioned, pooled or handed from the pool right now is not known
            // yet; leave those kinds alone while anything is in flight (the next round sees them).
            let inFlight = !provisioning.isEmpty || !refills.isEmpty
            if inFlight && (key != nil || labels[SandboxLabel.pool] != nil) { continue }
            guard let liveTask, let key else {
                doomed.append((id, key, "orphaned by a previous run of agentd; reconciled"))
                continue
            }
            guard let spec = await liveTask(key) else {
                doomed.append((id, key, "its task is no longer live (ended, or its session was deleted or is unknown); removed after agentd restarted"))
                continue
            }
            let replaced = "the task was given a new sandbox while agentd restarted"
            // A call may have provisioned the task a sandbox while this one waited.
            guard live[key] == nil, provisioning[key] == nil else {
                doomed.append((id, key, replaced))
                continue
            }
            guard let handle = await driver.adopt(id: id, labels: labels, spec: spec) else {
                doomed.append((id, key, "it did not answer after agentd restarted; the task's next call provisions a fresh one"))
                continue
            }
            guard live[key] == nil, provisioning[key] == nil else {
                try? await driver.destroy(handle)
                done.removed.append(id)
                await onEvent(.released(key, sandbox: id, reason: replaced))
                continue
            }
            if let attachments {
                do {
                    try await attachments.attach(handle, for: key, adopted: true)
                } catch {
                    await attachments.detach(handle)
                    doomed.append((id, key, "its network could not be restored after agentd restarted (\((error as? HandsError)?.message ?? "\(error)")); the task's next call provisions a fresh one"))
                    continue
                }
            }
            live[key] = Live(sandbox: handle, lastUsed: .now, inFlight: 0)
            done.adopted.append(handle)
            logger.info("adopted the sandbox of a live task", metadata: ["task": "\(key)", "sandbox": "\(id.prefix(12))"])
            await onEvent(.adopted(key, sandbox: id))
        }
        for (id, key, reason) in doomed {
            try? await driver.destroy(id: id)
            done.removed.append(id)
            if let key { await onEvent(.released(key, sandbox: id, reason: reason)) }
        }
        if liveTask != nil { pendingRestore = nil }
        if !done.removed.isEmpty { logger.info("reconcile removed orphaned sandboxes", metadata: ["count": "\(done.removed.count)"]) }
        return done
    }

    /// Releases everything: live sandboxes and the pool (shutdown).
    public func shutdown() async {
        for key in Array(live.keys) { await endTask(key, reason: "agentd stopping") }
        poolTargets.removeAll()
        for (_, sandboxes) in pool { for s in sandboxes { try? await driver.destroy(s) } }
        pool.removeAll()
    }

    // MARK: - warm pool

    /// Keeps `size` started sandboxes of `spec` ready; taking one starts a refill.
    public func setPoolSize(_ size: Int, for spec: SandboxSpec) {
        poolTargets[spec] = max(0, size)
        scheduleRefill(spec)
    }

    /// Sets every pool's target at once (after a policy change): pools of specs not named, or
    /// above their new target, give their surplus sandboxes back to the engine.
    public func setPoolTargets(_ targets: [SandboxSpec: Int]) async {
        poolTargets = targets.filter { $0.value > 0 }
        for spec in Array(pool.keys) {
            let keep = poolTargets[spec] ?? 0
            guard let list = pool[spec], list.count > keep else { continue }
            pool[spec] = Array(list.prefix(keep))
            for s in list.dropFirst(keep) { try? await driver.destroy(s) }
        }
        for spec in poolTargets.keys {
            poolErrors[spec] = nil
            scheduleRefill(spec)
        }
    }

    /// Starts again every refill that stopped short of its target (after an engine error):
    /// called by the housekeeping loop.
    public func resumeRefills() {
        for spec in poolTargets.keys { scheduleRefill(spec) }
    }

    /// Fills every pool to its target now and waits until done.
    public func fillPools() async {
        for spec in poolTargets.keys { scheduleRefill(spec) }
        for task in refills.values { await task.value }
    }

    /// How one warm pool stands.
    public struct PoolStatus: Sendable, Equatable {
        public var target: Int
        public var ready: Int
        /// A refill is running now.
        public var warming: Bool
        /// Why the last refill stopped short, if it did; the housekeeping loop retries.
        public var lastError: String?
    }

    /// The status of the pool of `spec` (target 0 when it has none).
    public func poolStatus(_ spec: SandboxSpec) -> PoolStatus {
        PoolStatus(target: poolTargets[spec] ?? 0, ready: pool[spec]?.count ?? 0, warming: refills[spec] != nil, lastError: poolErrors[spec])
    }

    public var pooledCount: Int { pool.values.reduce(0) { $0 + $1.count } }
    public var liveCount: Int { live.count }

    /// One sandbox serving a task now (see `liveSandboxes`).
    public struct LiveSandbox: Sendable, Equatable {
        public var key: TaskKey
        public var sandbox: SandboxHandle
        /// Tool calls running in it now.
        public var inFlight: Int
        /// Time since its last tool call ended (zero while one runs).
        public var idle: Duration
    }

    /// Every sandbox serving a task now, by session then task.
    public func liveSandboxes() -> [LiveSandbox] {
        let now = ContinuousClock.now
        return live.map { key, entry in
            LiveSandbox(key: key, sandbox: entry.sandbox, inFlight: entry.inFlight, idle: entry.inFlight > 0 ? .zero : now - entry.lastUsed)
        }.sorted { ($0.key.session, $0.key.task) < ($1.key.session, $1.key.task) }
    }
    public func sandbox(of key: TaskKey) -> SandboxHandle? { live[key]?.sandbox }
    /// The tasks of `session` that hold a sandbox now.
    public func liveTasks(session: String) -> [String] { live.keys.filter { $0.session == session }.map(\.task) }

    private func takePooled(_ spec: SandboxSpec) -> SandboxHandle? {
        guard var list = pool[spec], !list.isEmpty, spec.workspace == .task else { return nil }
        let s = list.removeFirst()
        pool[spec] = list
        return s
    }

    private func scheduleRefill(_ spec: SandboxSpec) {
        guard spec.workspace == .task, (poolTargets[spec] ?? 0) > (pool[spec]?.count ?? 0), refills[spec] == nil else { return }
        refills[spec] = Task { await self.refill(spec) }
    }

    private func refill(_ spec: SandboxSpec) async {
        defer { refills[spec] = nil }
        while (pool[spec]?.count ?? 0) < (poolTargets[spec] ?? 0) {
            // This refill counts as one sandbox in flight; the check is for the next one.
            if let refusal = hostRefusal(adding: spec, countedAlready: 1) {
                poolErrors[spec] = refusal.message
                logger.warning("warm pool refill stopped at the host's sandbox limit", metadata: ["policy": "\(spec.policyName)"])
                return
            }
            do {
                let s = try await driver.provision(spec, labels: [SandboxLabel.pool: "warm"])
                // The target may have dropped while this one started (a policy edit).
                guard (pool[spec]?.count ?? 0) < (poolTargets[spec] ?? 0) else {
                    try? await driver.destroy(s)
                    return
                }
                pool[spec, default: []].append(s)
                poolErrors[spec] = nil
            } catch {
                let message = (error as? HandsError)?.message ?? "\(error)"
                poolErrors[spec] = message
                logger.warning("warm pool refill failed; retrying from the housekeeping loop", metadata: ["error": "\(message)"])
                return
            }
        }
    }
}

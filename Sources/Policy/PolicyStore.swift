import Crypto
import Foundation
import Logging

/// Holds the last good `PolicySet` of a directory and replaces it only with a valid one.
///
/// `reload()` re-reads the directory; a set with any diagnostic is refused, logged, and kept
/// in `lastFailure` (for the API), while the last good set stays in force. Policies are
/// values: a task that took one with `policy(named:)` keeps that snapshot however many
/// reloads follow, and journals its `sha256`.
///
/// Reading a policy directory is a handful of small-file reads, done on the calling task.
public actor PolicyStore {
    /// The outcome of one `reload()`.
    public enum ReloadOutcome: Sendable, Hashable {
        /// A new set is in force.
        case applied(generation: Int)
        /// The directory's policies are identical to those in force.
        case unchanged
        /// The set had errors and was refused; the previous set stays in force.
        case refused([PolicyDiagnostic])
    }

    /// The errors of the most recent refused reload.
    public struct Failure: Sendable, Hashable {
        public var date: Date
        public var diagnostics: [PolicyDiagnostic]
    }

    public nonisolated let directory: String
    /// The last good set (empty until a valid one was loaded).
    public private(set) var current: PolicySet
    /// Incremented each time a new set is applied; 0 before any.
    public private(set) var generation = 0
    private var subscribers: [Int: AsyncStream<Int>.Continuation] = [:]
    private var nextSubscriber = 0
    /// The most recent refusal, cleared by the next successful or unchanged reload.
    public private(set) var lastFailure: Failure?
    private let logger: Logger
    /// The directory's file snapshot as of the last reload attempt (what `watch` compares to).
    private var loadedSnapshot: String

    /// Creates a store for `directory` and loads it once (see `lastFailure` for problems).
    public init(directory: String, logger: Logger = Logger(label: "agentd.policy")) {
        self.directory = directory
        self.logger = logger
        self.current = PolicySet(directory: directory)
        self.loadedSnapshot = Self.snapshot(of: directory)
        let set = PolicySet.load(directory: directory)
        if set.isValid {
            current = set
            generation = 1
        } else {
            lastFailure = Failure(date: Date(), diagnostics: set.diagnostics)
            for diagnostic in set.diagnostics {
                logger.error("policy refused", metadata: ["policy.error": "\(diagnostic)"])
            }
        }
    }

    /// The errors of the most recent refused reload, if it has not been followed by a good one.
    public var lastErrors: [PolicyDiagnostic] { lastFailure?.diagnostics ?? [] }

    /// The policy called `name` in the set in force: an immutable snapshot.
    public func policy(named name: String) -> Policy? { current.policy(named: name) }

    /// Re-reads the directory and applies it if, and only if, it is entirely valid.
    @discardableResult
    public func reload() -> ReloadOutcome {
        // Snapshot first: an edit racing with the load then shows up as a change on the next poll.
        loadedSnapshot = Self.snapshot(of: directory)
        let set = PolicySet.load(directory: directory)
        guard set.isValid else {
            lastFailure = Failure(date: Date(), diagnostics: set.diagnostics)
            logger.error(
                "policy reload refused; keeping the last good policies",
                metadata: ["policy.directory": "\(directory)", "policy.errors": "\(set.diagnostics.count)"])
            for diagnostic in set.diagnostics {
                logger.error("policy error", metadata: ["policy.error": "\(diagnostic)"])
            }
            return .refused(set.diagnostics)
        }
        lastFailure = nil
        if generation > 0, set.fingerprint == current.fingerprint { return .unchanged }
        current = set
        generation += 1
        for subscriber in subscribers.values { subscriber.yield(generation) }
        logger.info(
            "policies loaded",
            metadata: ["policy.directory": "\(directory)", "policy.names": "\(set.names.joined(separator: ","))", "policy.generation": "\(generation)"])
        return .applied(generation: generation)
    }

    /// The generations of the policy sets applied from now on, by whichever path (file watch,
    /// SIGHUP, the API): for parts of agentd that follow the policies (warm pools). A slow
    /// reader sees the newest generation only.
    public func changes() -> AsyncStream<Int> {
        let (stream, continuation) = AsyncStream<Int>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let id = nextSubscriber
        nextSubscriber += 1
        subscribers[id] = continuation
        continuation.onTermination = { _ in Task { await self.unsubscribe(id) } }
        return stream
    }

    private func unsubscribe(_ id: Int) { subscribers[id] = nil }

    /// Polls the directory every `interval` and reloads when a policy file was added, removed
    /// or changed (names, sizes and content hashes) since the last reload. Returns when the
    /// calling task is cancelled.
    ///
    /// SIGHUP is the daemon's to handle: its signal handler calls `reload()`.
    public func watch(interval: Duration = .seconds(1)) async {
        while !Task.isCancelled {
            do { try await Task.sleep(for: interval) } catch { return }
            if Self.snapshot(of: directory) != loadedSnapshot {
                reload()
            }
        }
    }

    /// A string that changes whenever a policy file of `directory` is added, removed or edited.
    static func snapshot(of directory: String) -> String {
        guard case .success(let files) = PolicySet.policyFiles(in: directory) else { return "unreadable" }
        return files.map { file in
            let data = FileManager.default.contents(atPath: file) ?? Data()
            return "\(file)\u{0}\(data.count)\u{0}\(PolicyLoader.sha256Hex(data))"
        }.joined(separator: "\n")
    }
}

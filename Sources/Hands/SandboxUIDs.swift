import Synchronization

/// Hands out a host uid (the gid is the same number) to each workspace, from a configured
/// range, so that no two live sandboxes share one.
///
/// Why: with one uid for every sandbox, a process in one sandbox could read and write another
/// tenant's workspace through `/proc/<pid>/root/…` and signal its processes: the kernel sees
/// the same user. A uid of its own makes the other sandbox's files and processes someone
/// else's. A uid belongs to a *workspace* (its filesystem's root owner): a task's, or a
/// session's shared one, whose tasks already share every file; the tasks of one session with
/// `workspace: session` that run at the same time therefore run as one uid. A uid goes back to
/// the range when the last sandbox using the workspace is destroyed.
public final class SandboxUIDs: Sendable {
    /// The uids handed out; agentd's `--sandbox-uids`.
    public let range: ClosedRange<Int>
    private let state = Mutex(State())

    private struct State {
        /// Workspace name → uid.
        var byName: [String: Int] = [:]
        var used: Set<Int> = []
    }

    /// The default range, `600000-699999`: above the 16-bit ids of ordinary users and of
    /// systemd's dynamic users (61184–65519), below the ranges container engines give to
    /// user namespaces by default (`/etc/subuid` usually starts at 100000 per user, 65536 wide,
    /// so only hosts with more than seven such users reach it).
    public static let defaultRange = 600_000...699_999

    /// The allocator every driver uses unless it is given another one, so that drivers of one
    /// process (and tests running side by side) never hand out the same uid twice.
    public static let shared = SandboxUIDs(unchecked: defaultRange)

    /// - Throws: `HandsError.invalidRequest` when `range` holds root, the 16-bit ids of
    ///   ordinary users and system accounts (below 65536), or ids above 2³²−2.
    public init(range: ClosedRange<Int>) throws {
        guard range.lowerBound >= 65_536, range.upperBound <= 4_294_967_294 else {
            throw HandsError(
                .invalidRequest,
                "sandbox uid range \(range.lowerBound)-\(range.upperBound) must lie within 65536-4294967294: lower ids belong to the host's own users and system accounts")
        }
        self.range = range
    }

    private init(unchecked range: ClosedRange<Int>) { self.range = range }

    /// Parses `FIRST-LAST` (e.g. `600000-699999`).
    /// - Throws: `HandsError.invalidRequest` saying what the form is.
    public static func parseRange(_ text: String) throws -> ClosedRange<Int> {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let low = Int(parts[0]), let high = Int(parts[1]), low <= high else {
            throw HandsError(.invalidRequest, "'\(text)' is not a uid range; use FIRST-LAST, e.g. 600000-699999")
        }
        return low...high
    }

    /// The uid of workspace `name`: the one it already has, or a free one picked at random (so
    /// that a uid is not reused at once after its sandbox went).
    /// - Throws: `HandsError.provisioning` when every uid of the range is in use.
    public func acquire(_ name: String) throws -> Int {
        try state.withLock { state in
            if let uid = state.byName[name] { return uid }
            // Linear probing from a random start, at most once round the range (uids reserved
            // by survivors may lie outside it, so the count of used ones does not tell).
            var uid = Int.random(in: range)
            for _ in 0..<range.count {
                if !state.used.contains(uid) {
                    state.used.insert(uid)
                    state.byName[name] = uid
                    return uid
                }
                uid = uid == range.upperBound ? range.lowerBound : uid + 1
            }
            throw HandsError(
                .provisioning,
                "all \(range.count) sandbox uids (\(range.lowerBound)-\(range.upperBound)) are in use; end idle tasks or widen agentd's --sandbox-uids")
        }
    }

    /// Records that workspace `name` holds `uid` (a sandbox that survived a restart of agentd,
    /// found by listing), so that it is not handed out again while that sandbox lives.
    public func reserve(_ uid: Int, for name: String) {
        state.withLock { state in
            guard state.byName[name] == nil else { return }
            state.byName[name] = uid
            state.used.insert(uid)
        }
    }

    /// Gives the uid of workspace `name` back to the range.
    public func release(_ name: String) {
        state.withLock { state in
            if let uid = state.byName.removeValue(forKey: name) { state.used.remove(uid) }
        }
    }

    /// The uid workspace `name` holds now, if any.
    public func uid(of name: String) -> Int? { state.withLock { $0.byName[name] } }

    /// How many uids are handed out now.
    public var inUse: Int { state.withLock { $0.used.count } }
}

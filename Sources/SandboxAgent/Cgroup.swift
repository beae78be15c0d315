#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SandboxAgentProtocol

/// Memory, OOM and pids figures of the agent's own cgroup (v2, or v1's memory and pids controllers).
enum Cgroup {
    static func limits(root: String = "/sys/fs/cgroup", selfCgroup: String = "/proc/self/cgroup") -> AgentLimits {
        let lines = (Posix.readSmallFile(selfCgroup) ?? "").split(separator: "\n")
        // v2: "0::/path"; with a cgroup namespace the path is "/" and the root is our own cgroup.
        if let unified = lines.first(where: { $0.hasPrefix("0::") }), access(root + "/cgroup.controllers", F_OK) == 0 {
            let relative = String(unified.dropFirst(3))
            var dir = root + (relative == "/" ? "" : relative)
            if access(dir + "/memory.current", F_OK) != 0 && access(dir + "/pids.current", F_OK) != 0 { dir = root }
            return AgentLimits(
                cgroupVersion: 2, oomKills: field("oom_kill", in: dir + "/memory.events"), memoryCurrent: number(dir + "/memory.current"),
                memoryMax: number(dir + "/memory.max"), pidsCurrent: number(dir + "/pids.current"), pidsMax: number(dir + "/pids.max"))
        }
        func v1(_ controller: String) -> String? {
            for line in lines {
                let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
                guard parts.count == 3, parts[1].split(separator: ",").contains(Substring(controller)) else { continue }
                let relative = String(parts[2])
                let dir = root + "/" + controller + (relative == "/" ? "" : relative)
                return access(dir, F_OK) == 0 ? dir : root + "/" + controller
            }
            return nil
        }
        let memory = v1("memory")
        let pids = v1("pids")
        guard memory != nil || pids != nil else { return AgentLimits(cgroupVersion: 0) }
        // v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
        let limit = memory.flatMap { number($0 + "/memory.limit_in_bytes") }.flatMap { $0 >= 1 << 62 ? nil : $0 }
        return AgentLimits(
            cgroupVersion: 1, oomKills: memory.flatMap { field("oom_kill", in: $0 + "/memory.oom_control") },
            memoryCurrent: memory.flatMap { number($0 + "/memory.usage_in_bytes") }, memoryMax: limit,
            pidsCurrent: pids.flatMap { number($0 + "/pids.current") }, pidsMax: pids.flatMap { number($0 + "/pids.max") })
    }

    /// A file holding one number; nil for "max" or when absent.
    static func number(_ path: String) -> UInt64? {
        guard let text = Posix.readSmallFile(path) else { return nil }
        return UInt64(text.split(whereSeparator: { $0 == "\n" || $0 == " " }).first ?? "")
    }

    /// The value of `key` in a "key value" lines file.
    static func field(_ key: String, in path: String) -> UInt64? {
        guard let text = Posix.readSmallFile(path) else { return nil }
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2 && parts[0] == key { return UInt64(parts[1]) }
        }
        return nil
    }
}

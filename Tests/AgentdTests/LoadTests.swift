import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// A bounded, self-stopping load: 1000 sessions, then 100 concurrent executes on a warm pool.
@Suite("agentd under load")
struct LoadTests {
    /// The shipped default policy with a warm pool of `size`.
    static func policiesWithPool(_ size: Int) throws -> String {
        let directory = "/tmp/agentd-load-policies-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let text = try String(contentsOfFile: AgentdProcess.policiesDirectory + "/default.yaml", encoding: .utf8)
            .replacingOccurrences(of: "pool:\n  size: 0", with: "pool:\n  size: \(size)")
        try text.write(toFile: directory + "/default.yaml", atomically: true, encoding: .utf8)
        return directory
    }

    static func rssKiB(_ pid: pid_t) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }

    static func openFDs(_ pid: pid_t) -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    }

    /// agentd's open descriptors by kind (`socket`, `pipe`, `anon_inode:[eventfd]`, or a
    /// file's directory): says what grew when the count did.
    static func fdKinds(_ pid: pid_t) -> [String: Int] {
        var kinds: [String: Int] = [:]
        for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? [] {
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) ?? "?"
            let kind = target.hasPrefix("/") ? (target as NSString).deletingLastPathComponent : String(target.prefix { $0 != ":" })
            kinds[kind, default: 0] += 1
        }
        return kinds
    }

    @Test("1000 sessions and 100 concurrent executes on a warm pool: no error, no leaked sandbox, descriptor or memory")
    func load() async throws {
        let poolSize = 4
        let policies = try Self.policiesWithPool(poolSize)
        defer { try? FileManager.default.removeItem(atPath: policies) }
        try await withAgentd(policies: policies) { agentd in
            let c = agentd.client
            let pid = try #require(agentd.pid)
            func pooled() async throws -> Int {
                ((try await c.get("/v1/health")["sandboxes"] as? [String: Any])?["pooled"] as? NSNumber)?.intValue ?? -1
            }
            // The pool fills in the background after start.
            for _ in 0..<200 where try await pooled() < poolSize { try await Task.sleep(for: .milliseconds(100)) }
            #expect(try await pooled() == poolSize)

            // 1000 sessions, 50 at a time.
            var ids: [String] = []
            for batch in 0..<20 {
                let created = try await withThrowingTaskGroup(of: String.self) { group in
                    for _ in 0..<50 { group.addTask { try #require(try await c.post("/v1/sessions", [:])["id"] as? String) } }
                    return try await group.reduce(into: [String]()) { $0.append($1) }
                }
                ids += created
                _ = batch
            }
            #expect(Set(ids).count == 1000)
            #expect((try await c.get("/v1/sessions")["sessions"] as? [Any])?.count == 1000)

            // Two identical rounds of 100 concurrent executes (10 tasks in 10 sessions, 10 calls
            // each, all at once), each ending every task. The first round warms the bounded caches
            // (libcurl handles to the engine, keep-alive connections); the second must leave
            // descriptors and memory where the first left them.
            let sessions = ids
            var after: [(fds: Int, rss: Int, kinds: [String: Int])] = []
            for round in 0..<2 {
                let outputs = try await withThrowingTaskGroup(of: (String, String).self) { group in
                    for s in 0..<10 {
                        for i in 0..<10 {
                            group.addTask {
                                let reply = try await c.post("/v1/sessions/\(sessions[s])/execute", ["tool": "bash", "input": ["command": "echo \(s)-\(i)"]])
                                let result = reply["result"] as? [String: Any] ?? [:]
                                #expect((result["is_error"] as? Bool) == false, "\(result)")
                                return ("\(s)-\(i)\n", result["output"] as? String ?? "")
                            }
                        }
                    }
                    return try await group.reduce(into: [(String, String)]()) { $0.append($1) }
                }
                #expect(outputs.count == 100)
                for (expected, got) in outputs { #expect(expected == got) }
                let during = try await sandboxes(agentd.instance)
                #expect(during >= 10 && during <= 10 + poolSize, "10 task sandboxes (and what is left of the pool): \(during)")

                // End every task: the sandboxes go, the pool refills to its size, nothing else stays.
                for s in 0..<10 { _ = try await c.post("/v1/sessions/\(sessions[s])/tasks/main/end", [:]) }
                for _ in 0..<200 where try await pooled() < poolSize { try await Task.sleep(for: .milliseconds(100)) }
                #expect(try await sandboxes(agentd.instance) == poolSize, "round \(round)")
                let health = try await c.get("/v1/health")
                #expect(((health["sandboxes"] as? [String: Any])?["live"] as? NSNumber)?.intValue == 0)
                try await Task.sleep(for: .seconds(1))
                after.append((Self.openFDs(pid), Self.rssKiB(pid), Self.fdKinds(pid)))
            }
            // A leak per call or per task would add 100 or 10 a round; a few keep-alive
            // connections caught while opening or closing are not one.
            #expect(
                after[1].fds <= after[0].fds + 5,
                "descriptors after round 1: \(after[0].fds) \(after[0].kinds), after round 2: \(after[1].fds) \(after[1].kinds)")
            #expect(after[1].rss <= after[0].rss + 10 * 1024, "RSS after round 1: \(after[0].rss) KiB, after round 2: \(after[1].rss) KiB")
        }
    }
}

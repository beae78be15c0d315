import AgentdClient
import Foundation
import Policy
import Runtime
import SessionLog
import Hands
import EngineAPI

/// agentd as a process: idle memory, the cost of idle sessions, execute throughput under load,
/// and what the API adds over calling the modules in-process.
enum AgentdBench {
    static func run(_ report: Reporter) async throws {
        let binary = try siblingExecutable("agentd")
        let base = NSTemporaryDirectory() + "agentd-bench-\(getpid())"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let socket = base + "/agentd.sock"
        // The shipped policies, and `small` for the live-sandboxes figure: 100 workspaces of the
        // default 1 GiB would be refused by the disk reserve on a small disk.
        let policies = base + "/policies"
        try FileManager.default.createDirectory(atPath: policies, withIntermediateDirectories: true)
        for file in try FileManager.default.contentsOfDirectory(atPath: "policies") where file.hasSuffix(".yaml") {
            try FileManager.default.copyItem(atPath: "policies/" + file, toPath: policies + "/" + file)
        }
        let small = try String(contentsOfFile: "policies/default.yaml", encoding: .utf8)
            .replacingOccurrences(of: "name: default", with: "name: small").replacingOccurrences(of: "disk: 1GiB", with: "disk: 32MiB")
            .replacingOccurrences(of: "memory: 512MiB", with: "memory: 64MiB")
        try small.write(toFile: policies + "/small.yaml", atomically: true, encoding: .utf8)
        // No host limits: the RSS figure holds 100 live sandboxes of the default policy.
        let pid = try spawn(
            [binary, "--state-dir", base + "/state", "--socket", socket, "--policies", policies, "--log-level", "warning", "--max-sandboxes", "0",
             "--sandbox-memory", "0"], log: base + "/agentd.log")
        defer {
            kill(pid, SIGTERM)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        let client = AgentdClient(socket: socket)
        for _ in 0..<200 {
            if (try? await client.get("/v1/health", timeout: .seconds(1))) != nil { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        try await Task.sleep(for: .seconds(1))
        let idle = rssKiB(pid)
        report.figure("agentd.idle_rss", Double(idle) / 1024, "MiB")
        let idleAnon = rssKiB(pid, field: "RssAnon:")
        report.figure("agentd.idle_rss_anon", Double(idleAnon) / 1024, "MiB")

        // 1000 idle sessions.
        var ids: [String] = []
        for _ in 0..<20 {
            ids += try await withThrowingTaskGroup(of: String.self) { group in
                for _ in 0..<50 { group.addTask { (try await client.post("/v1/sessions", [:])["id"] as? String) ?? "" } }
                return try await group.reduce(into: [String]()) { $0.append($1) }
            }
        }
        try await Task.sleep(for: .seconds(1))
        let withSessions = rssKiB(pid)
        report.figure("agentd.rss_1000_sessions", Double(withSessions) / 1024, "MiB")
        report.figure("agentd.cost_1000_idle_sessions", Double(withSessions - idle) / 1024, "MiB")
        report.figure("agentd.cost_1000_idle_sessions_anon", Double(rssKiB(pid, field: "RssAnon:") - idleAnon) / 1024, "MiB")

        // Execute throughput: 10 tasks, 10 concurrent callers, 200 calls.
        let sessions = Array(ids.prefix(10))
        let t0 = now()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for s in 0..<10 {
                group.addTask {
                    for i in 0..<20 {
                        _ = try await client.post("/v1/sessions/\(sessions[s])/execute", ["tool": "bash", "input": ["command": "echo \(i)"]])
                    }
                }
            }
            try await group.waitForAll()
        }
        report.figure("agentd.execute_throughput", 200 / (now() - t0), "calls/s")
        for s in sessions { _ = try? await client.post("/v1/sessions/\(s)/tasks/main/end", [:]) }

        try await contention(client, quiet: ids[100], busy: ids[101], report)
        try await warmExecute(client, session: ids[102], report)
        try await warmThroughput(client, sessions: Array(ids[200..<232]), report)
        try await liveSandboxes(client, pid: pid, count: 100, report)

        // API overhead: a durable checkpoint over the socket vs the same call on an in-process
        // Runtime over its own journal (same disk).
        var overApi: [Double] = []
        for _ in 0..<300 {
            let t = now()
            _ = try await client.post("/v1/sessions/\(ids[500])/checkpoint", ["state": ["n": 1]])
            overApi.append(now() - t)
        }
        let store = try await SessionStore.open(directory: base + "/inprocess")
        let engine = try EngineClient.fromEnvironment()
        let runtime = Runtime(
            store: store, hands: HandsManager(
                driver: ContainerDriver(
                    engine: engine, instance: "benchip", workspaces: try WorkspaceImages(directory: base + "/workspaces"),
                    agent: try AgentHands(directory: base + "/agents")),
                instance: "benchip"),
            policies: PolicyStore(directory: "policies"))
        let session = try await runtime.createSession(policy: nil).id
        var inProcess: [Double] = []
        for _ in 0..<300 {
            let t = now()
            _ = try await runtime.checkpoint(session, state: Array(#"{"n":1}"#.utf8), epoch: nil)
            inProcess.append(now() - t)
        }
        try await store.close()
        overApi.sort()
        inProcess.sort()
        report.figure("inprocess.checkpoint.p50", percentile(inProcess, 50) * 1e6, "us")
        report.figure("inprocess.checkpoint.p99", percentile(inProcess, 99) * 1e6, "us")
        report.figure("api.checkpoint.p50", percentile(overApi, 50) * 1e6, "us")
        report.figure("api.checkpoint.p99", percentile(overApi, 99) * 1e6, "us")
        report.figure("api.overhead.p50", (percentile(overApi, 50) - percentile(inProcess, 50)) * 1e6, "us")
        report.figure("api.overhead.p99", (percentile(overApi, 99) - percentile(inProcess, 99)) * 1e6, "us")
    }

    /// One tenant's long commands against another tenant's latency: the p50 of an `echo`
    /// execute in one session, idle and then with 64 long commands in flight in another
    /// session (more than the 32 threads every exec used to hold), and their ratio.
    static func contention(_ client: AgentdClient, quiet: String, busy: String, _ report: Reporter) async throws {
        func bash(_ session: String, _ command: String) async throws -> String { try await AgentdBench.bash(client, session, command) }
        func echoP50() async throws -> Double {
            var samples: [Double] = []
            for i in 0..<30 {
                let t = now()
                _ = try await bash(quiet, "echo \(i)")
                samples.append(now() - t)
            }
            return percentile(samples.sorted(), 50)
        }
        // Both sandboxes exist before anything is measured.
        _ = try await bash(quiet, "true")
        _ = try await bash(busy, "true")
        report.figure("agentd.echo_idle.p50", try await echoP50() * 1e3, "ms")
        let long = 64
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<long {
                group.addTask { _ = try? await bash(busy, "touch started.\(i) && exec sleep 110") }
            }
            // Measure only once every long command runs (each leaves a marker first).
            var started = 0
            for _ in 0..<600 where started < long {
                started = Int(try await bash(busy, "ls started.* | wc -l").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            }
            report.figure("agentd.echo_64_long.p50", try await echoP50() * 1e3, "ms")
            // Ending the task stops the long commands.
            _ = try? await client.post("/v1/sessions/\(busy)/tasks/main/end", [:])
            try await group.waitForAll()
        }
        _ = try? await client.post("/v1/sessions/\(quiet)/tasks/main/end", [:])
        report.ratio("agentd.echo_64_long.ratio", "agentd.echo_64_long.p50", over: "agentd.echo_idle.p50", goal: "<= 2x")
    }

    /// The text output of one `bash` execute of `session`.
    static func bash(_ client: AgentdClient, _ session: String, _ command: String) async throws -> String {
        let reply = try await client.post("/v1/sessions/\(session)/execute", ["tool": "bash", "input": ["command": command]])
        return ((reply["result"] as? [String: Any])?["output"] as? String) ?? ""
    }

    /// A warm `echo` execute through agentd's API (journal intent and result included) against
    /// a bare exec of the same command on a running container, written straight to the
    /// engine's socket (exec create, start, inspect): p50 and p99, interleaved.
    static func warmExecute(_ client: AgentdClient, session: String, _ report: Reporter) async throws {
        let engine = try EngineClient.fromEnvironment()
        guard case .unixSocket(let path) = engine.endpoint else { return }
        let raw = RawUnixHTTP(socketPath: path)
        let create = #"{"Image":"agentd-base:latest","Cmd":["sleep","600"],"Labels":{"agentd.bench":"bare-exec"},"HostConfig":{"NetworkMode":"none"}}"#
        let running = try raw.startContainer(create)
        defer { raw.removeContainer(running) }
        let exec = #"{"AttachStdout":true,"AttachStderr":true,"Cmd":["sh","-c","echo hi"]}"#
        guard try await bash(client, session, "echo hi") == "hi\n" else { throw RawUnixHTTP.Failure(description: "warm execute failed") }
        let (bare, api) = try await pairedSamples(rounds: 200) { _ in
            let b0 = try raw.exec(in: running, body: exec)
            let (a, _) = try await timed { try await bash(client, session, "echo hi") }
            return (b0, a)
        }
        report.figure("raw.engine.exec_running.echo.p50", percentile(bare, 50) * 1000, "ms")
        report.figure("raw.engine.exec_running.echo.p99", percentile(bare, 99) * 1000, "ms")
        report.figure("agentd.execute_warm.p50", percentile(api, 50) * 1000, "ms")
        report.figure("agentd.execute_warm.p99", percentile(api, 99) * 1000, "ms")
        report.ratio("agentd.execute_warm.p50.vs_bare_exec", "agentd.execute_warm.p50", over: "raw.engine.exec_running.echo.p50", goal: "<= 0.10")
        report.ratio("agentd.execute_warm.p99.vs_bare_exec", "agentd.execute_warm.p99", over: "raw.engine.exec_running.echo.p99", goal: "<= 0.10")
        _ = try? await client.post("/v1/sessions/\(session)/tasks/main/end", [:])
    }

    /// 32 callers, each on a warm sandbox of its own session, 40 `echo` executes each.
    static func warmThroughput(_ client: AgentdClient, sessions: [String], _ report: Reporter) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for s in sessions { group.addTask { _ = try await bash(client, s, "true") } }
            try await group.waitForAll()
        }
        let calls = 40
        let t0 = now()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for s in sessions {
                group.addTask {
                    for i in 0..<calls { _ = try await bash(client, s, "echo \(i)") }
                }
            }
            try await group.waitForAll()
        }
        report.figure("agentd.execute_throughput_32_warm", Double(sessions.count * calls) / (now() - t0), "calls/s")
        for s in sessions { _ = try? await client.post("/v1/sessions/\(s)/tasks/main/end", [:]) }
    }

    /// agentd's resident memory with `count` live sandboxes, one per session of the `small`
    /// policy (8 provisioned at a time).
    static func liveSandboxes(_ client: AgentdClient, pid: pid_t, count: Int, _ report: Reporter) async throws {
        var sessions: [String] = []
        for _ in 0..<count { sessions.append((try await client.post("/v1/sessions", ["policy": "small"])["id"] as? String) ?? "") }
        let before = rssKiB(pid)
        var live = 0
        for batch in stride(from: 0, to: sessions.count, by: 8) {
            live += try await withThrowingTaskGroup(of: Int.self) { group in
                for s in sessions[batch..<min(batch + 8, sessions.count)] {
                    group.addTask { try await bash(client, s, "echo up") == "up\n" ? 1 : 0 }
                }
                return try await group.reduce(0, +)
            }
        }
        let after = rssKiB(pid)
        report.figure("agentd.live_sandboxes", Double(live), "sandboxes")
        report.figure("agentd.rss_live_sandboxes", Double(after) / 1024, "MiB")
        report.figure("agentd.cost_per_live_sandbox", Double(after - before) / Double(max(live, 1)), "KiB")
        if live < count {
            let sample = try await bash(client, sessions[count - 1], "echo up")
            FileHandle.standardError.write(Data("# agentd.live_sandboxes: only \(live) of \(count) came up; the last said: \(sample.prefix(300))\n".utf8))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for s in sessions { group.addTask { _ = try? await client.post("/v1/sessions/\(s)/tasks/main/end", [:]) } }
            try await group.waitForAll()
        }
    }

    /// A figure of `/proc/PID/status` in KiB: `VmRSS:` (all resident pages) by default,
    /// `RssAnon:` for the process's private memory alone.
    static func rssKiB(_ pid: pid_t, field: String = "VmRSS:") -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix(field) } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }

    static func spawn(_ argv: [String], log: String) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let args = argv.map { strdup($0) } + [nil]
        let env = ProcessInfo.processInfo.environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (args + env).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, nil, args, env)
        guard rc == 0 else { throw RawUnixHTTP.Failure(description: "cannot start \(argv[0]): \(String(cString: strerror(rc)))") }
        return pid
    }
}

import EngineAPI
import Foundation
import Hands
import Policy
import Runtime
import SessionLog
import Synchronization

/// Hands figures: agentd's sandbox life cycle and warm-pool execute against the same work done
/// straight over the engine socket, and a session's time to first event with on-demand Hands
/// against provisioning eagerly at session start.
enum HandsBench {
    static let iterations = 15

    static func run(_ report: Reporter) async throws {
        let engine = try EngineClient.fromEnvironment()
        guard case .unixSocket(let path) = engine.endpoint else { return }
        let raw = RawUnixHTTP(socketPath: path)
        let instance = "bench" + String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let workspaces = try WorkspaceImages(directory: NSTemporaryDirectory() + "agentd-bench-workspaces-" + instance)
        let agent = try AgentHands(directory: NSTemporaryDirectory() + "agentd-bench-agents-" + instance)
        let driver = ContainerDriver(engine: engine, instance: instance, workspaces: workspaces, agent: agent)
        let hands = HandsManager(driver: driver, instance: instance)
        let spec = SandboxSpec()
        let input = Array(#"{"command": "true"}"#.utf8)

        // 1. Life cycle: provision on demand + execute + end task, vs the same requests (the
        // same hardened create body, the same exec argv) written straight to the socket.
        let same = driver.containerSpec(spec, labels: [SandboxLabel.session: "bench-raw", SandboxLabel.task: "raw"])
        let create = String(decoding: try JSONEncoder().encode(same), as: UTF8.self)
        let execArgv = ["sh", "-c", "true"]
        let execBody = String(decoding: try JSONSerialization.data(withJSONObject: ["AttachStdout": true, "AttachStderr": true, "Cmd": execArgv, "WorkingDir": "/workspace"]), as: UTF8.self)
        let (rawCycles, handsCycles) = try await pairedSamples(rounds: iterations) { i in
            let r = try EngineBench.rawCycle(raw, create: create, exec: execBody)
            let key = TaskKey(session: "bench", task: "c\(i)")
            let (h, result) = await timed {
                let result = await hands.execute(key, spec: spec, tool: "bash", input: input)
                await hands.endTask(key)
                return result
            }
            guard !result.isError else { throw RawUnixHTTP.Failure(description: "hands execute failed: \(result.output)") }
            return (r, h)
        }
        report.figure("raw.engine.lifecycle2.p50", percentile(rawCycles, 50) * 1000, "ms")
        report.figure("hands.lifecycle.p50", percentile(handsCycles, 50) * 1000, "ms")
        report.ratio("hands.lifecycle.vs_raw", "hands.lifecycle.p50", over: "raw.engine.lifecycle2.p50", goal: "<= 1.10")

        // 2. Execute on warm-pool Hands vs a bare exec on an already running container.
        await hands.setPoolSize(1, for: spec)
        await hands.fillPools()
        let running = try raw.startContainer(create)
        let (bare, warm) = try await pairedSamples(rounds: iterations * 2) { _ in
            let b0 = try raw.exec(in: running, body: execBody)
            let (w, _) = await timed { await hands.execute(TaskKey(session: "bench", task: "warm"), spec: spec, tool: "bash", input: input) }
            return (b0, w)
        }
        raw.removeContainer(running)
        report.figure("raw.engine.exec_running.p50", percentile(bare, 50) * 1000, "ms")
        report.figure("hands.execute_warm.p50", percentile(warm, 50) * 1000, "ms")
        report.ratio("hands.execute_warm.vs_bare_exec", "hands.execute_warm.p50", over: "raw.engine.exec_running.p50", goal: "<= 0.10")
        await hands.shutdown()

        try await provisioning(driver, raw: raw, create: create, report)
        try await firstByte(driver, raw: raw, create: create, report)

        // 3. A session's first event: on demand (agentd) vs provisioning eagerly at session start.
        let directory = NSTemporaryDirectory() + "agentd-bench-journal-\(instance)"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try await SessionStore.open(directory: directory)
        let policies = PolicyStore(directory: "policies")
        let runtimeHands = HandsManager(driver: ContainerDriver(engine: engine, instance: instance, workspaces: workspaces, agent: agent), instance: instance)
        let runtime = Runtime(store: store, hands: runtimeHands, policies: policies)
        var onDemand: [Double] = []
        var eager: [Double] = []
        for i in 0..<iterations {
            let t0 = now()
            _ = try await runtime.createSession(policy: nil)
            onDemand.append(now() - t0)
            let t1 = now()
            let session = try await runtime.createSession(policy: nil)
            // Eager: the session is not usable until its sandbox is there.
            let key = TaskKey(session: session.id, task: "main")
            let sandbox = try await runtimeHands.driver.provision(spec, labels: [SandboxLabel.session: session.id, SandboxLabel.task: key.task])
            eager.append(now() - t1)
            try? await runtimeHands.driver.destroy(sandbox)
            _ = i
        }
        try await store.close()
        onDemand.sort()
        eager.sort()
        report.figure("session.first_event.eager.p50", percentile(eager, 50) * 1000, "ms")
        report.figure("session.first_event.on_demand.p50", percentile(onDemand, 50) * 1000, "ms")
        report.ratio("session.first_event.on_demand.vs_eager", "session.first_event.on_demand.p50", over: "session.first_event.eager.p50", goal: "<= 0.05")
    }

    /// A sandbox ready for commands: agentd's provision (workspace, create, start, the agent
    /// answering) against a plain create + start of the same hardened container with `sleep`
    /// as PID 1, written straight to the socket.
    static func provisioning(_ driver: ContainerDriver, raw: RawUnixHTTP, create: String, _ report: Reporter) async throws {
        let (plain, ready) = try await pairedSamples(rounds: iterations) { i in
            let (p, id) = try await timed { try raw.startContainer(create) }
            raw.removeContainer(id)
            let (r, sandbox) = try await timed {
                try await driver.provision(SandboxSpec(), labels: [SandboxLabel.session: "bench", SandboxLabel.task: "p\(i)"])
            }
            try await driver.destroy(sandbox)
            return (p, r)
        }
        report.figure("raw.engine.create_start.p50", percentile(plain, 50) * 1000, "ms")
        report.figure("hands.provision_ready.p50", percentile(ready, 50) * 1000, "ms")
        report.ratio("hands.provision_ready.vs_create_start", "hands.provision_ready.p50", over: "raw.engine.create_start.p50", goal: "report (it includes making and mounting the workspace's filesystem)")
    }

    /// Time to the first output byte of a command that prints a line, then works for 300 ms:
    /// streamed through the agent, against a bare engine exec, whose output comes at its end.
    static func firstByte(_ driver: ContainerDriver, raw: RawUnixHTTP, create: String, _ report: Reporter) async throws {
        let command = ["sh", "-c", "echo first; sleep 0.3; echo last"]
        let sandbox = try await driver.provision(SandboxSpec(), labels: [SandboxLabel.session: "bench", SandboxLabel.task: "first-byte"])
        let running = try raw.startContainer(create)
        let body = String(
            decoding: try JSONSerialization.data(withJSONObject: ["AttachStdout": true, "AttachStderr": true, "Cmd": command]), as: UTF8.self)
        let (bare, streamed) = try await pairedSamples(rounds: iterations) { _ in
            // The engine's exec answers with the output at the command's end.
            let b0 = try raw.exec(in: running, body: body, inspect: false)
            let first = FirstChunk()
            let t1 = now()
            _ = try await driver.run(command, in: sandbox, workingDirectory: nil, timeout: .seconds(30), output: { _, _ in first.mark() })
            return (b0, first.at.map { $0 - t1 })
        }
        raw.removeContainer(running)
        try await driver.destroy(sandbox)
        report.figure("raw.engine.exec.first_byte.p50", percentile(bare, 50) * 1000, "ms")
        report.figure("hands.stream.first_byte.p50", percentile(streamed, 50) * 1000, "ms")
        report.ratio("hands.stream.first_byte.vs_bare_exec", "hands.stream.first_byte.p50", over: "raw.engine.exec.first_byte.p50", goal: "< 0.1")
    }
}

/// When a streamed command's first chunk arrived.
private final class FirstChunk: Sendable {
    private let time = Mutex<Double?>(nil)
    func mark() { time.withLock { if $0 == nil { $0 = now() } } }
    var at: Double? { time.withLock { $0 } }
}

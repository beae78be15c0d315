import AgentdAPI
import AgentdClient
import Foundation
import Hands
import Logging
import Policy
import Runtime
import Service
import ServiceLifecycle
import SessionLog
import Synchronization

/// A Hands driver whose `bash` commands stream output in pieces, so that a test decides what
/// comes when. The command is pieces separated by `|`: `HOLD` waits until the test calls
/// `release()` (the command is then still running), `!text` goes to stderr, `BIG n k` writes
/// `n` pieces of `k` bytes of `x`, anything else goes to stdout; `\n` in a piece is a newline.
/// The final `CommandOutput` holds everything written, as a real driver's does.
final class StreamingDriver: HandsDriver {
    private struct State {
        var holding = false
        var released = false
        var holdWaiters: [CheckedContinuation<Void, Never>] = []
        var held: [CheckedContinuation<Void, Never>] = []
        var finished = 0
        var finishWaiters: [(Int, CheckedContinuation<Void, Never>)] = []
    }
    private let state = Mutex(State())
    private let counter = Atomic<Int>(0)

    var kind: String { "container" }

    /// Whether a command is waiting at a `HOLD` now.
    var isHolding: Bool { state.withLock { $0.holding } }

    /// Returns once a command waits at a `HOLD`.
    func waitUntilHolding() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.holding { return true }
                s.holdWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Lets held commands (and later ones) go on.
    func release() {
        let held = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.released = true
            s.holding = false
            defer { s.held = [] }
            return s.held
        }
        for c in held { c.resume() }
    }

    /// Returns once `count` commands have finished writing.
    func waitUntilFinished(_ count: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.finished >= count { return true }
                s.finishWaiters.append((count, c))
                return false
            }
            if now { c.resume() }
        }
    }

    func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        var stdout: [UInt8] = []
        var stderr: [UInt8] = []
        for piece in (argv.last ?? "").split(separator: "|", omittingEmptySubsequences: true).map(String.init) {
            if piece == "HOLD" {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>]? in
                        if s.released { return nil }
                        s.holding = true
                        s.held.append(c)
                        defer { s.holdWaiters = [] }
                        return s.holdWaiters
                    }
                    guard let waiters else { return c.resume() }
                    for w in waiters { w.resume() }
                }
                continue
            }
            let words = piece.split(separator: " ")
            if words.count == 3, words[0] == "BIG", let n = Int(words[1]), let k = Int(words[2]) {
                let chunk = [UInt8](repeating: 0x78, count: k)
                for _ in 0..<n {
                    stdout += chunk
                    output?(Hands.OutputStream.stdout, chunk)
                }
                continue
            }
            let text = Array(piece.replacingOccurrences(of: "\\n", with: "\n").utf8)
            if piece.hasPrefix("!") {
                let bytes = Array(text.dropFirst())
                stderr += bytes
                output?(Hands.OutputStream.stderr, bytes)
            } else {
                stdout += text
                output?(Hands.OutputStream.stdout, text)
            }
        }
        let ready = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.finished += 1
            let (due, rest) = (s.finishWaiters.filter { $0.0 <= s.finished }, s.finishWaiters.filter { $0.0 > s.finished })
            s.finishWaiters = rest
            return due.map(\.1)
        }
        for c in ready { c.resume() }
        return CommandOutput(stdout: stdout, stderr: stderr, exitCode: stderr.isEmpty ? 0 : 3)
    }

    func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        SandboxHandle(id: "stream-\(counter.add(1, ordering: .relaxed).newValue)", spec: spec, labels: labels)
    }
    func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {}
    func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {}
    func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] { [] }
    func destroy(_ sandbox: SandboxHandle) async throws {}
    func list(instance: String) async throws -> [(id: String, labels: [String: String])] { [] }
    func destroy(id: String) async throws {}
    func removeSessionData(session: String) async throws {}
    func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? { nil }
}

/// A real `HTTPServer` serving the real `API` on a temporary unix socket, over a `Runtime`
/// with a real journal and a `StreamingDriver`; `client` talks to it.
struct StreamingServer {
    let client: AgentdClient
    let driver: StreamingDriver
    let store: SessionStore

    /// The secret the journal's redactor knows in every test.
    static let secret = "sk-live-0123456789abcdef"

    static func with(outputLimit: String = "1MiB", _ body: (StreamingServer) async throws -> Void) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("agentd-stream-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory + "/policies", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try """
            apiVersion: agentd/v1
            kind: Policy
            metadata:
              name: default
            hands:
              driver: container
              outputLimit: \(outputLimit)
            session:
              maxEventSize: 2MiB

            """.write(toFile: directory + "/policies/default.yaml", atomically: true, encoding: .utf8)
        var logger = Logger(label: "agentd.stream-test")
        logger.logLevel = .critical
        let policies = PolicyStore(directory: directory + "/policies", logger: logger)
        let store = try await SessionStore.open(
            directory: directory + "/journal", options: SessionStoreOptions(maxEventBytes: Runtime.journalEventCeiling), logger: logger)
        store.redactor.add(try Secret(name: "api-token", value: secret))
        let driver = StreamingDriver()
        let hands = HandsManager(driver: driver, instance: "stream-test", logger: logger)
        let runtime = Runtime(store: store, hands: hands, policies: policies, logger: logger)
        let api = API(runtime: runtime, metrics: Metrics(), logger: logger)
        let socket = directory + "/agentd.sock"
        let server = HTTPServer(listeners: [.unixSocket(path: socket)], logger: logger) { await api.handle($0) }
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: logger))
        let running = Task { try await group.run() }
        try await server.waitUntilListening()
        let result: Result<Void, any Error>
        do {
            try await body(StreamingServer(client: AgentdClient(socket: socket), driver: driver, store: store))
            result = .success(())
        } catch {
            result = .failure(error)
        }
        driver.release()
        await group.triggerGracefulShutdown()
        _ = await running.result
        await hands.shutdown()
        try await store.close()
        try result.get()
    }
}

/// What a streaming execute delivered, in order, as the client saw it.
final class Updates: Sendable {
    private let state = Mutex<[AgentdClient.ExecuteUpdate]>([])
    let stream: AsyncStream<AgentdClient.ExecuteUpdate>
    private let continuation: AsyncStream<AgentdClient.ExecuteUpdate>.Continuation

    init() { (stream, continuation) = AsyncStream.makeStream() }

    func take(_ update: AgentdClient.ExecuteUpdate) {
        state.withLock { $0.append(update) }
        continuation.yield(update)
    }

    var all: [AgentdClient.ExecuteUpdate] { state.withLock { $0 } }

    /// The output of `stream` (`stdout`/`stderr`) as one text.
    func text(_ stream: String) -> String {
        String(decoding: all.flatMap { u -> [UInt8] in
            if case .output(let s, let bytes) = u, s == stream { return bytes }
            return []
        }, as: UTF8.self)
    }
}

import AgentdAPI
import Foundation
import Hands
import JSONValues
import Logging
import Policy
import Runtime
import Service
import ServiceLifecycle
import SessionLog
import Testing

/// A seeded fuzzer over agentd's HTTP parser and router: thousands of mutated and random
/// requests against a real `HTTPServer` on a temporary unix socket, serving the real `API`
/// over a `Runtime` with a real journal in a temporary directory (and Hands that answer without
/// a sandbox). Every request must get a well-formed HTTP answer, never a 5xx, and the server
/// must stay up.
///
/// `AGENTD_FUZZ_SEED` replays a run; `AGENTD_FUZZ_ITERATIONS` sets how many requests (500 by
/// default, a few seconds; `scripts/test` runs more). The seed is printed first, so that even
/// a run the server crashes names it.
@Suite("API fuzzing: no request crashes the server or gets a 5xx")
struct APIFuzzTests {
    @Test("random and mutated requests all get a well-formed 2xx–4xx answer, and the server stays up")
    func fuzz() async throws {
        let environment = ProcessInfo.processInfo.environment
        let seed = environment["AGENTD_FUZZ_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64.max)
        let iterations = environment["AGENTD_FUZZ_ITERATIONS"].flatMap { Int($0) } ?? 500
        print("API fuzzing: seed \(seed), \(iterations) requests (replay with AGENTD_FUZZ_SEED=\(seed))")
        try await FuzzServer.with { server in
            // A few real sessions, so that mutated requests also reach the handlers behind the
            // session lookup (execute, checkpoint, wake, task end).
            var sessions: [String] = []
            for policy in ["default", "coding-agent", "default"] {
                let answer = RawHTTP.exchange(socket: server.socket, FuzzRequest.raw("POST", "/v1/sessions", body: Array(#"{"policy": "\#(policy)"}"#.utf8)))
                try #require(answer.status == 201, "creating a session: \(answer.status.map(String.init) ?? answer.problem ?? "?")")
                let info = try APIBody.decodeResponse(SessionInfo.self, from: answer.body)
                sessions.append(info.id)
            }
            let failure = await Self.run(socket: server.socket, seed: seed, iterations: iterations, sessions: sessions)
            #expect(failure == nil, "\(failure ?? "") — replay with AGENTD_FUZZ_SEED=\(seed)")
            let health = RawHTTP.exchange(socket: server.socket, FuzzRequest.raw("GET", "/v1/health"))
            #expect(health.status == 200, "after \(iterations) requests (seed \(seed)) the server does not answer: \(health.problem ?? "")")
        }
    }

    /// Runs the requests on a thread of its own (the exchanges block), returning the first
    /// failure as text, or nil.
    static func run(socket: String, seed: UInt64, iterations: Int, sessions: [String]) async -> String? {
        await withCheckedContinuation { continuation in
            let thread = Thread {
                var generator = FuzzRequest.Generator(seed: seed, sessions: sessions)
                var statuses: [Int: Int] = [:]
                for i in 0..<iterations {
                    let request = generator.next()
                    let answer = RawHTTP.exchange(socket: socket, request.bytes)
                    if let problem = check(answer) {
                        continuation.resume(returning: "request \(i) of seed \(seed) (\(request.kind)): \(problem)\nrequest: \(request.preview)")
                        return
                    }
                    statuses[answer.status ?? 0, default: 0] += 1
                }
                // What the run reached, so that a generator that only ever makes 400s shows.
                print("API fuzzing: answers by status: " + statuses.sorted { $0.key < $1.key }.map { "\($0.key)×\($0.value)" }.joined(separator: " "))
                continuation.resume(returning: nil)
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
    }

    /// Why `answer` is not acceptable, or nil.
    static func check(_ answer: RawHTTP.Answer) -> String? {
        if let problem = answer.problem { return problem }
        guard let status = answer.status else { return "no status" }
        if status >= 500 { return "HTTP \(status): \(String(decoding: answer.body.prefix(500), as: UTF8.self))" }
        guard answer.headers["content-type"]?.hasPrefix("application/json") == true else { return nil }
        if status >= 400 {
            guard let error = try? APIBody.decodeResponse(ErrorResponse.self, from: answer.body), !error.error.message.isEmpty else {
                return "HTTP \(status) without an error body: \(String(decoding: answer.body.prefix(300), as: UTF8.self))"
            }
            return nil
        }
        guard (try? JSONValue(data: Data(answer.body))) != nil else {
            return "HTTP \(status) with a body that is not JSON: \(String(decoding: answer.body.prefix(300), as: UTF8.self))"
        }
        return nil
    }
}

/// The real API on a real `HTTPServer` over a `Runtime` with a journal in a temporary
/// directory and `FakeHands`; removed afterwards.
struct FuzzServer {
    let socket: String

    static func with(_ body: (FuzzServer) async throws -> Void) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("agentd-fuzz-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var logger = Logger(label: "agentd.fuzz")
        logger.logLevel = .critical
        let policies = PolicyStore(directory: Self.policiesDirectory, logger: logger)
        let store = try await SessionStore.open(directory: directory + "/journal", logger: logger)
        let hands = HandsManager(driver: FakeHands(), instance: "fuzz", logger: logger)
        let runtime = Runtime(store: store, hands: hands, policies: policies, logger: logger)
        let api = API(runtime: runtime, metrics: Metrics(), logger: logger)
        let socket = directory + "/agentd.sock"
        let server = HTTPServer(
            listeners: [.unixSocket(path: socket)], spool: API.uploadSpool(directory: directory + "/uploads"), logger: logger
        ) { await api.handle($0) }
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: logger))
        let running = Task { try await group.run() }
        try await server.waitUntilListening()
        do {
            try await body(FuzzServer(socket: socket))
        } catch {
            await group.triggerGracefulShutdown()
            _ = await running.result
            await hands.shutdown()
            try await store.close()
            throw error
        }
        await group.triggerGracefulShutdown()
        _ = await running.result
        await hands.shutdown()
        try await store.close()
    }

    /// The repository's shipped policies.
    static var policiesDirectory: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("policies").path
    }
}

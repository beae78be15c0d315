import AgentdAPI
import AgentdClient
import CurlHTTP
import JSONValues
import Foundation
import Logging
import NIOConcurrencyHelpers
import Service
import ServiceLifecycle
import Testing
import TestSupport

/// agentctl against a stub agentd on a real unix socket (agentd's own `HTTPServer` with a
/// scripted handler): what it sends and what it tells the user when agentd refuses a call.
@Suite("agentctl: lease epochs")
struct AgentctlFencingTests {
    /// Serves `handler` on a temporary unix socket for the duration of `body`, recording
    /// every request.
    static func withStub(
        _ handler: @escaping @Sendable (APIRequest) -> APIResponse, _ body: (String, NIOLockedValueBox<[APIRequest]>) async throws -> Void
    ) async throws {
        let directory = NSTemporaryDirectory() + "agentctl-stub-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/agentd.sock"
        let seen = NIOLockedValueBox<[APIRequest]>([])
        var logger = Logger(label: "agentctl.stub")
        logger.logLevel = .critical
        let server = HTTPServer(listeners: [.unixSocket(path: socket)], logger: logger) { request in
            seen.withLockedValue { $0.append(request) }
            return handler(request)
        }
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: logger))
        let running = Task { try await group.run() }
        try await server.waitUntilListening()
        defer { running.cancel() }
        do {
            try await body(socket, seen)
        } catch {
            await group.triggerGracefulShutdown()
            _ = await running.result
            throw error
        }
        await group.triggerGracefulShutdown()
        _ = await running.result
    }

    static func json(_ status: Int, _ value: some Encodable) -> APIResponse {
        APIResponse(status: status, headers: [("content-type", "application/json")], body: .bytes(APIBody.encode(value)))
    }

    /// A stub that refuses every call as woken-without-epoch, and answers the session and
    /// policy look-ups `exec` makes.
    static func refusing(_ request: APIRequest) -> APIResponse {
        if request.method == "GET", request.path.hasPrefix("/v1/sessions/") {
            return json(200, SessionInfo(id: "s-1", policy: "default", lastSeq: 3, leaseEpoch: 2, liveTasks: []))
        }
        if request.method == "GET", request.path == "/v1/policies" {
            return json(200, PolicyList(policies: [], generation: 1, errors: []))
        }
        return json(409, ErrorResponse(code: "stale-lease", message: "session s-1 was woken (lease epoch 2): a call without its epoch is refused"))
    }

    @Test("a call refused because the session was woken and no epoch was given says to pass --epoch N or AGENTD_EPOCH")
    func epochHint() async throws {
        try await Self.withStub(Self.refusing) { socket, _ in
            for arguments in [["exec", "s-1", "bash", #"{"command": "true"}"#], ["checkpoint", "s-1", "{}"], ["task", "end", "s-1"]] {
                let run = try await runAgentctl(arguments, socket: socket)
                #expect(run.status == 1, "\(arguments): \(run.stderr)")
                #expect(run.stderr.contains("--epoch N") && run.stderr.contains("AGENTD_EPOCH"), "\(arguments): \(run.stderr)")
            }
            // With an epoch given, the refusal is agentd's own (a stale epoch: stop this Brain).
            let given = try await runAgentctl(["exec", "--epoch", "1", "s-1", "bash", #"{"command": "true"}"#], socket: socket)
            #expect(given.status == 1 && !given.stderr.contains("AGENTD_EPOCH"), "\(given.stderr)")
        }
    }

    @Test("AGENTD_EPOCH is sent as the epoch when --epoch is not given; a bad one is refused before anything is sent")
    func epochFromEnvironment() async throws {
        try await Self.withStub(Self.refusing) { socket, seen in
            _ = try await runAgentctl(["checkpoint", "s-1", #"{"step": 1}"#], socket: socket, environment: ["AGENTD_EPOCH": "7"])
            let sent = try #require(seen.withLockedValue { $0.last { $0.path.hasSuffix("/checkpoint") } })
            let body = try APIBody.decode(CheckpointRequest.self, from: sent.body)
            #expect(body.epoch == 7)
            let before = seen.withLockedValue { $0.count }
            let bad = try await runAgentctl(["checkpoint", "s-1", "{}"], socket: socket, environment: ["AGENTD_EPOCH": "seven"])
            #expect(bad.status != 0 && bad.stderr.contains("AGENTD_EPOCH"), "\(bad.stderr)")
            #expect(seen.withLockedValue { $0.count } == before)
        }
    }

    @Test("agentctl exec waits as long as the command may run: its timeout_s, else its policy's command timeout, plus a minute")
    func answerTimeoutFollowsTheCommand() async throws {
        let policies = PolicyList(
            policies: [
                .init(name: "long", sha256: "", file: "", driver: "container", commandTimeoutSeconds: 1800, brain: .init(retries: 0, backoffSeconds: 0))
            ], generation: 1, errors: [])
        try await Self.withStub({ request in
            if request.path == "/v1/policies" { return Self.json(200, policies) }
            return Self.json(200, SessionInfo(id: "s-1", policy: "long", lastSeq: 1, leaseEpoch: 0, liveTasks: []))
        }) { socket, _ in
            CurlTransport.globalInit()
            let client = AgentdClient(socket: socket)
            // The old fixed 300 s gave up on a 30-minute command that was still running.
            #expect(await client.answerTimeout(forInput: .object(["command": .string("make")]), session: "s-1") == .seconds(1860))
            #expect(await client.answerTimeout(forInput: .object(["command": .string("true"), "timeout_s": .number(5)]), session: "s-1") == .seconds(65))
        }
        // Without agentd's policies: agentd's largest default.
        CurlTransport.globalInit()
        let unreachable = AgentdClient(socket: "/nonexistent/agentd.sock")
        #expect(await unreachable.answerTimeout(forInput: .object([:]), session: "s-1") == .seconds(300))
    }
}

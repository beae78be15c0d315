import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import TestSupport

/// A fake of the Anthropic Messages API: a real HTTP/1.1 server on 127.0.0.1 (SwiftNIO) that
/// checks each request the way the published API does (path, headers, body shape), records it,
/// and answers with the next scripted reply. Unlike the real API it never generates anything:
/// the test decides every turn.
final class FakeMessagesAPI: Sendable {
    /// One request as the server received it.
    struct Request: Sendable {
        let method: String
        let path: String
        /// Header names lowercased.
        let headers: [String: String]
        let body: Data
        /// When the request had been read whole.
        let received: ContinuousClock.Instant

        /// The body as JSON.
        var json: [String: Any] { (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] ?? [:] }
        /// The body's `messages`.
        var messages: [[String: Any]] { json["messages"] as? [[String: Any]] ?? [] }
    }

    /// An answer of the script: a status and a JSON body, held back until `gate` opens if any.
    struct Reply: Sendable {
        let status: Int
        let body: Data
        var gate: Gate?
        /// Header fields added to the answer, e.g. `retry-after`.
        var headers: [(String, String)] = []

        /// A `200` assistant message with these content blocks.
        static func turn(_ content: [[String: Any]], stopReason: String) -> Reply {
            let message: [String: Any] = [
                "id": "msg_\(Components.testID())", "type": "message", "role": "assistant", "model": "claude-test",
                "content": content, "stop_reason": stopReason, "stop_sequence": NSNull(),
                "usage": ["input_tokens": 100, "output_tokens": 20],
            ]
            return Reply(status: 200, body: try! JSONSerialization.data(withJSONObject: message))
        }

        /// The API's error object.
        static func error(_ status: Int, _ type: String, _ message: String) -> Reply {
            let error: [String: Any] = ["type": "error", "error": ["type": type, "message": message]]
            return Reply(status: status, body: try! JSONSerialization.data(withJSONObject: error))
        }

        /// This reply with header field `name: value` added.
        func with(header name: String, _ value: String) -> Reply {
            var reply = self
            reply.headers.append((name, value))
            return reply
        }

        /// This reply, sent only once `gate` opens.
        func held(by gate: Gate) -> Reply {
            var reply = self
            reply.gate = gate
            return reply
        }
    }

    /// Holds replies back until the test opens it.
    final class Gate: Sendable {
        private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

        func open() {
            state.withLock { s in
                s.open = true
                defer { s.waiters = [] }
                return s.waiters
            }.forEach { $0.resume() }
        }

        func wait() async {
            await withCheckedContinuation { continuation in
                let now = state.withLock { s in
                    if s.open { return true }
                    s.waiters.append(continuation)
                    return false
                }
                if now { continuation.resume() }
            }
        }
    }

    private struct State {
        let key: String
        var script: [Reply]
        var requests: [Request] = []
        /// Requests the real API would have refused, and why.
        var violations: [String] = []
        var gates: [Gate] = []
        var waiters: [(count: Int, id: Int, continuation: CheckedContinuation<Bool, Never>)] = []
        var nextWaiter = 0
    }

    /// The server's state, shared with the connection handlers (a `Mutex` cannot be passed).
    private final class Shared: Sendable {
        let state: Mutex<State>
        init(_ state: State) { self.state = Mutex(state) }
    }

    private let shared: Shared
    private let server: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>
    private let serving: Task<Void, Never>

    /// The base URL to give the Brain (`--model-url`).
    let url: String

    /// Starts the server on a free loopback port; it answers requests with `script`, in order.
    init(key: String, script: [Reply]) async throws {
        shared = Shared(State(key: key, script: script, gates: script.compactMap(\.gate)))
        server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: "127.0.0.1", port: 0) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    return try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(wrappingChannelSynchronously: channel)
                }
            }
        url = "http://127.0.0.1:\(server.channel.localAddress?.port ?? 0)"
        let server = server
        let shared = shared
        serving = Task {
            try? await server.executeThenClose { connections in
                await withDiscardingTaskGroup { group in
                    do {
                        for try await connection in connections {
                            group.addTask { await Self.serve(connection, shared) }
                        }
                    } catch {}
                }
            }
        }
    }

    /// Runs `body` with a server answering with `script`, closing it afterwards whatever happens.
    static func with<T>(key: String, script: [Reply], _ body: (FakeMessagesAPI) async throws -> T) async throws -> T {
        let api = try await FakeMessagesAPI(key: key, script: script)
        do {
            let result = try await body(api)
            await api.close()
            return result
        } catch {
            await api.close()
            throw error
        }
    }

    var requests: [Request] { shared.state.withLock { $0.requests } }
    var violations: [String] { shared.state.withLock { $0.violations } }

    /// Waits until `count` requests have arrived; false after `timeout`.
    func awaitRequests(_ count: Int, timeout: Duration = .seconds(60)) async -> Bool {
        let id = shared.state.withLock { s in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        let timer = Task { [shared] in
            try? await Task.sleep(for: timeout)
            let expired = shared.state.withLock { s -> CheckedContinuation<Bool, Never>? in
                guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: i).continuation
            }
            expired?.resume(returning: false)
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { continuation in
            let now = shared.state.withLock { s in
                if s.requests.count >= count { return true }
                s.waiters.append((count, id, continuation))
                return false
            }
            if now { continuation.resume(returning: true) }
        }
    }

    /// Opens every gate (releasing held replies) and closes the server.
    func close() async {
        shared.state.withLock { $0.gates }.forEach { $0.open() }
        try? await server.channel.close()
        await serving.value
    }

    // MARK: - serving

    private static func serve(_ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, _ shared: Shared) async {
        try? await connection.executeThenClose { inbound, outbound in
            var head: HTTPRequestHead?
            var body = ByteBuffer()
            for try await part in inbound {
                switch part {
                case .head(let h):
                    head = h
                    body.clear()
                case .body(var chunk):
                    body.writeBuffer(&chunk)
                case .end:
                    guard let head else { return }
                    let request = Request(
                        method: head.method.rawValue, path: head.uri,
                        headers: Dictionary(head.headers.map { ($0.name.lowercased(), $0.value) }, uniquingKeysWith: { $1 }),
                        body: Data(body.readableBytesView), received: .now)
                    let reply = answer(request, shared)
                    if let gate = reply.gate { await gate.wait() }
                    var headers = HTTPHeaders([("content-type", "application/json"), ("content-length", "\(reply.body.count)")])
                    headers.add(name: "request-id", value: "req_\(Components.testID())")
                    for (name, value) in reply.headers { headers.add(name: name, value: value) }
                    try await outbound.write(.head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: reply.status), headers: headers)))
                    try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: reply.body))))
                    try await outbound.write(.end(nil))
                }
            }
        }
    }

    /// Records `request` and picks its reply: the API's own refusal when the request is not
    /// one the real API takes, else the script's next reply.
    private static func answer(_ request: Request, _ shared: Shared) -> Reply {
        let key = shared.state.withLock { $0.key }
        let refusal: Reply?
        if request.method != "POST" || request.path != "/v1/messages" {
            refusal = .error(404, "not_found_error", "Not found: \(request.method) \(request.path)")
        } else if request.headers["x-api-key"] != key {
            refusal = .error(401, "authentication_error", "invalid x-api-key")
        } else if let problem = problem(in: request) {
            refusal = .error(400, "invalid_request_error", problem)
        } else {
            refusal = nil
        }
        let (reply, waiters) = shared.state.withLock { s in
            s.requests.append(request)
            if let refusal, refusal.status == 400 { s.violations.append(String(decoding: refusal.body, as: UTF8.self)) }
            let reply = refusal ?? (s.script.isEmpty ? .error(500, "api_error", "the test's script has no reply left") : s.script.removeFirst())
            let ready = s.waiters.filter { $0.count <= s.requests.count }
            s.waiters.removeAll { $0.count <= s.requests.count }
            return (reply, ready)
        }
        waiters.forEach { $0.continuation.resume(returning: true) }
        return reply
    }

    /// What the real API would refuse in this request, if anything: the headers, the body's
    /// fields, roles that do not alternate starting with the user, and tool results that answer
    /// no `tool_use` of the assistant turn before them.
    private static func problem(in request: Request) -> String? {
        guard request.headers["anthropic-version"] == "2023-06-01" else { return "anthropic-version: header is required" }
        guard request.headers["content-type"]?.hasPrefix("application/json") == true else { return "content-type must be application/json" }
        let body = request.json
        guard body["model"] is String else { return "model: Field required" }
        guard (body["max_tokens"] as? NSNumber).map({ $0.intValue > 0 }) == true else { return "max_tokens: Field required" }
        if let system = body["system"], !(system is String) { return "system: Input should be a valid string" }
        for tool in body["tools"] as? [[String: Any]] ?? [] {
            guard tool["name"] is String, tool["description"] is String, (tool["input_schema"] as? [String: Any])?["type"] as? String == "object" else {
                return "tools: each tool needs name, description and an input_schema of type object"
            }
        }
        let messages = request.messages
        guard !messages.isEmpty else { return "messages: at least one message is required" }
        var toolUses: Set<String> = []
        for (i, message) in messages.enumerated() {
            let expected = i % 2 == 0 ? "user" : "assistant"
            guard message["role"] as? String == expected else { return "messages.\(i).role: roles must alternate, starting with user" }
            guard let content = message["content"] as? [[String: Any]], !content.isEmpty else { return "messages.\(i).content: non-empty list required" }
            for block in content {
                switch block["type"] as? String {
                case "text": guard block["text"] is String else { return "messages.\(i): text block without text" }
                case "tool_use":
                    guard expected == "assistant", let id = block["id"] as? String, block["name"] is String, block["input"] is [String: Any] else {
                        return "messages.\(i): malformed tool_use"
                    }
                    toolUses.insert(id)
                case "tool_result":
                    guard expected == "user", let id = block["tool_use_id"] as? String, toolUses.contains(id) else {
                        return "messages.\(i): tool_result blocks must answer a tool_use of the previous assistant turn"
                    }
                default: return "messages.\(i): unknown content block type \(block["type"] ?? "none")"
                }
            }
            if expected == "user" { toolUses = [] }
        }
        return nil
    }
}

import AgentdAPI
import CurlHTTP
import Foundation
import Synchronization
import JSONValues

/// A client of agentd's HTTP/JSON API, over its unix socket (or TCP with a bearer token).
/// Used by `agentctl`, the demo and the end-to-end tests.
public struct AgentdClient: Sendable {
    public let endpoint: HTTPEndpoint
    private let transport: CurlTransport
    private let token: String?

    /// The default socket: `$AGENTD_SOCKET`, else `/run/agentd/agentd.sock`.
    public static var defaultSocket: String {
        ProcessInfo.processInfo.environment["AGENTD_SOCKET"] ?? "/run/agentd/agentd.sock"
    }

    public init(socket: String) {
        endpoint = .unixSocket(path: socket)
        transport = CurlTransport(endpoint: endpoint)
        token = nil
    }

    public init(url: String, token: String?) {
        endpoint = .url(url)
        transport = CurlTransport(endpoint: endpoint)
        self.token = token
    }

    /// An answer as untyped JSON, for callers not yet on the AgentdAPI types (the typed calls
    /// below decode into those types instead).
    public struct Reply: @unchecked Sendable {
        // Invariant: `json` is built from JSONSerialization output and never mutated.
        public let status: Int
        public let json: [String: Any]
        /// The body as text (for answers that are not JSON).
        public let text: String
        /// The body as sent.
        public let body: [UInt8]
        public subscript(key: String) -> Any? { json[key] }

        init(status: Int, body: [UInt8]) {
            self.status = status
            self.body = body
            json = (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] ?? [:]
            text = String(decoding: body, as: UTF8.self)
        }
    }

    public func get(_ path: String, timeout: Duration = .seconds(30)) async throws -> Reply {
        try await call("GET", path, body: nil, timeout: timeout)
    }

    public func post(_ path: String, _ body: [String: Any] = [:], timeout: Duration = .seconds(300)) async throws -> Reply {
        try await call("POST", path, body: try JSONSerialization.data(withJSONObject: body), timeout: timeout)
    }

    /// Sends a request; a non-2xx answer throws with agentd's own error message.
    public func call(_ method: String, _ path: String, body: Data?, timeout: Duration = .seconds(30)) async throws -> Reply {
        let request = HTTPRequest(
            method: method, target: path, body: body.map { .bytes(Array($0), contentType: "application/json") } ?? .none, timeout: timeout)
        return try await send(request, path: path)
    }

    /// `GET path`, decoded as `Response`.
    /// - Throws: `AgentdClientError` for a refusal (with agentd's message), an unreachable
    ///   agentd, or an answer that is not a `Response`.
    public func get<Response: Decodable>(_ path: String, as type: Response.Type, timeout: Duration = .seconds(30)) async throws -> Response {
        try decode(type, try await send(HTTPRequest(method: "GET", target: path, timeout: timeout), path: path), path: path)
    }

    /// `POST path` with a typed body, decoded as `Response`.
    /// - Throws: `AgentdClientError` as `get(_:as:timeout:)`.
    public func post<Body: APIRequestBody, Response: Decodable>(
        _ path: String, _ body: Body, as type: Response.Type, method: String = "POST", timeout: Duration = .seconds(300)
    ) async throws -> Response {
        let request = HTTPRequest(method: method, target: path, body: .bytes(APIBody.encode(body), contentType: "application/json"), timeout: timeout)
        return try decode(type, try await send(request, path: path), path: path)
    }

    private func decode<Response: Decodable>(_ type: Response.Type, _ reply: Reply, path: String) throws -> Response {
        do {
            return try APIBody.decodeResponse(type, from: reply.body)
        } catch {
            throw AgentdClientError(
                status: reply.status, code: "bad-answer",
                message: "agentd's answer to \(path) is not what this agentctl expects (\(error)); are agentd and agentctl the same version?")
        }
    }

    private func send(_ request: HTTPRequest, path: String) async throws -> Reply {
        let response = try await exchange(request)
        guard (200..<300).contains(response.status) else { throw Self.refusal(response.status, response.body) }
        return Reply(status: response.status, body: response.body)
    }

    /// Sends `request` with the bearer token (when there is one), whatever the answer's status.
    ///
    /// In a fleet, a call that another node serves is answered 307 with that node's address
    /// (`agentd-node-address`): the request is sent there instead, transparently. When that
    /// node does not answer (it may have died), the request goes back to this node every
    /// second until the dead node's lease runs out (`Retry-After`) and a live node takes the
    /// session over.
    /// - Parameter restart: called before the request is sent again (a streaming caller drops
    ///   what it parsed of the redirect's body).
    /// - Throws: `AgentdClientError` when no HTTP answer came.
    private func exchange(_ request: HTTPRequest, restart: (@Sendable () -> Void)? = nil) async throws -> HTTPResponse {
        var target = self
        var deadline: ContinuousClock.Instant?
        for _ in 0..<120 {
            let response: HTTPResponse
            do {
                response = try await target.exchangeOnce(request)
            } catch let error as AgentdClientError where error.code == "unreachable" && target.endpoint != endpoint {
                // The owner named by the redirect does not answer: ask this node again once a
                // second until its lease has run out.
                guard let deadline, ContinuousClock.now < deadline else { throw error }
                try await Task.sleep(for: .seconds(1))
                restart?()
                target = self
                continue
            }
            guard response.status == 307, let address = response.header("agentd-node-address"), let next = redirected(to: address) else {
                return response
            }
            if let seconds = response.header("retry-after").flatMap(Int.init), deadline == nil {
                deadline = .now + .seconds(min(max(seconds, 1), 600))
            }
            restart?()
            target = next
        }
        throw AgentdClientError(
            status: 307, code: "redirect-loop", message: "agentd's nodes kept redirecting \(request.target) to each other; check `agentctl health` on each node")
    }

    /// The client for the node at `address` (`unix:///path` or `http(s)://host:port`), with
    /// this client's token; nil for an address it cannot use.
    private func redirected(to address: String) -> AgentdClient? {
        if address.hasPrefix("unix://") { return AgentdClient(socket: String(address.dropFirst("unix://".count))) }
        if address.hasPrefix("http://") || address.hasPrefix("https://") { return AgentdClient(url: address, token: token) }
        return nil
    }

    private func exchangeOnce(_ request: HTTPRequest) async throws -> HTTPResponse {
        var request = request
        if let token { request.headers.append(("Authorization", "Bearer \(token)")) }
        do {
            return try await transport.send(request)
        } catch let error as HTTPClientError {
            throw AgentdClientError.transport(error, endpoint: endpoint)
        }
    }

    /// agentd's refusal `body` (an `ErrorResponse`) as an error, with its own code and message.
    static func refusal(_ status: Int, _ body: [UInt8]) -> AgentdClientError {
        let error = try? APIBody.decodeResponse(ErrorResponse.self, from: body)
        return AgentdClientError(
            status: status, code: error?.error.code ?? "http", message: error?.error.message ?? String(decoding: body.prefix(500), as: UTF8.self))
    }

    /// The body of `GET path` as text (`/metrics`).
    public func text(_ path: String, timeout: Duration = .seconds(30)) async throws -> String {
        let reply = try await send(HTTPRequest(method: "GET", target: path, timeout: timeout), path: path)
        return reply.text
    }

    /// Uploads the file at `file` as the body of `POST path` (streamed from the disk, never
    /// held in memory), calling `progress(sent, total)` as it goes.
    public func upload(
        _ path: String, file: String, contentType: String, timeout: Duration = .seconds(3 * 3600),
        progress: (@Sendable (Int64, Int64) -> Void)? = nil
    ) async throws -> Reply {
        var request = HTTPRequest(method: "POST", target: path, body: .file(path: file, contentType: contentType), timeout: timeout)
        request.onUploadProgress = progress
        return try await send(request, path: path)
    }

    /// Streams the tarball at `file` to agentd, which imports it as image `name`
    /// (`POST /v1/images?name=…`), calling `progress(sent, total)` as it goes.
    /// - Throws: `AgentdClientError` (a bad name 400, no room 507, the engine refusing it).
    public func importImage(file: String, name: String, progress: (@Sendable (Int64, Int64) -> Void)? = nil) async throws -> ImageResponse {
        let path = "/v1/images?name=\(name.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? name)"
        let reply = try await upload(path, file: file, contentType: "application/x-tar", progress: progress)
        return try decode(ImageResponse.self, reply, path: path)
    }

    /// Follows server-sent events at `path`, calling `onEvent(type, data)` for each, until the
    /// server ends the stream or the task is cancelled.
    public func follow(_ path: String, onEvent: @escaping @Sendable (String, String) -> Void) async throws {
        let parser = SSEParser(onEvent: onEvent)
        var request = HTTPRequest(method: "GET", target: path, timeout: .seconds(365 * 86400))
        request.headers.append(("Accept", "text/event-stream"))
        if let token { request.headers.append(("Authorization", "Bearer \(token)")) }
        request.onData = { parser.feed($0) }
        do {
            let response = try await transport.send(request)
            if !(200..<300).contains(response.status) {
                throw AgentdClientError(status: response.status, code: "http", message: "following \(path) failed with HTTP \(response.status)")
            }
        } catch let error as HTTPClientError {
            throw AgentdClientError.transport(error, endpoint: endpoint)
        }
    }
}

/// What went wrong talking to agentd, with what to do.
public struct AgentdClientError: Error, Sendable, CustomStringConvertible {
    public let status: Int
    public let code: String
    public let message: String

    public var description: String { message }

    static func transport(_ error: HTTPClientError, endpoint: HTTPEndpoint) -> AgentdClientError {
        switch error.code {
        case .unreachable:
            return AgentdClientError(
                status: 0, code: "unreachable",
                message: "cannot reach agentd: \(error.message) — is agentd running? Start it with `agentd --socket PATH …` and pass the same --socket (or set AGENTD_SOCKET)")
        default:
            return AgentdClientError(status: 0, code: error.code.rawValue, message: "talking to agentd at \(endpoint): \(error.message)")
        }
    }
}

/// Splits a server-sent event stream into events (fed from libcurl's thread).
final class SSEParser: @unchecked Sendable {
    // Invariant: `feed` is called from one thread at a time (libcurl's write callback).
    private var buffer: [UInt8] = []
    private let onEvent: @Sendable (String, String) -> Void

    init(onEvent: @escaping @Sendable (String, String) -> Void) { self.onEvent = onEvent }

    /// How far `buffer` was searched for a block's end (so that a large block arriving in
    /// many pieces is not searched from its start for each).
    private var searched = 0

    /// Drops what was fed so far (the body of an answer that was not the stream: a redirect).
    /// Called between two exchanges, never during one.
    func reset() {
        buffer = []
        searched = 0
    }

    func feed(_ bytes: [UInt8]) {
        buffer += bytes
        while let end = blockEnd() {
            let block = String(decoding: buffer[..<end], as: UTF8.self)
            buffer.removeSubrange(..<(end + 2))
            searched = 0
            var type = "message"
            var data: [String] = []
            for line in block.split(separator: "\n", omittingEmptySubsequences: false) {
                if line.hasPrefix("event: ") { type = String(line.dropFirst(7)) }
                else if line.hasPrefix("data: ") { data.append(String(line.dropFirst(6))) }
            }
            if !data.isEmpty { onEvent(type, data.joined(separator: "\n")) }
        }
    }

    /// Where the first blank line (`\n\n`) of `buffer` begins, searching only what was not
    /// searched before.
    private func blockEnd() -> Int? {
        let found = buffer.withUnsafeBufferPointer { b -> Int? in
            var i = max(0, searched - 1)
            while i + 1 < b.count {
                if b[i] == 10 && b[i + 1] == 10 { return i }
                i += 1
            }
            return nil
        }
        if found == nil { searched = buffer.count }
        return found
    }
}

/// A tool that every session's Hands serve, as `GET /v1/tools` lists it.
public struct ToolDescription: Sendable {
    public let name: String
    public let description: String
    /// The input's JSON Schema, as JSON text.
    public let inputSchema: Data
}

/// A tool call's result. A tool's own failure (a failing command, a missing file, a dead
/// sandbox) is a result with `isError`, not a thrown error.
public struct ExecuteResult: Sendable {
    public let output: String
    public let isError: Bool
    /// The command's exit code, for `bash`.
    public let exitCode: Int?
    /// agentd's whole answer, typed (with the journal sequence numbers and `replayed`).
    public let response: ExecuteResponse
    /// agentd's whole answer as untyped JSON (for callers not yet on `response`).
    public let reply: AgentdClient.Reply
}

extension AgentdClient {
    /// `/v1/sessions/ID`, with the id percent-encoded.
    public static func sessionPath(_ session: String) -> String {
        "/v1/sessions/\(pathComponent(session))"
    }

    /// `text` percent-encoded for one path segment of an API route (a session id, a task).
    public static func pathComponent(_ text: String) -> String {
        var allowed = CharacterSet.urlPathAllowed
        allowed.remove(charactersIn: "/?#%")
        return text.addingPercentEncoding(withAllowedCharacters: allowed) ?? text
    }

    /// The tools sessions serve, with their input schemas (`GET /v1/tools`; makes no sandbox).
    public func tools() async throws -> [ToolDescription] {
        try await get("/v1/tools", as: ToolList.self).tools.map { tool in
            ToolDescription(name: tool.name, description: tool.description, inputSchema: tool.inputSchema.data)
        }
    }

    /// execute(name, input): agentd journals the intent, runs `tool` on the task's sandbox
    /// (provisioned on demand) and journals the result.
    /// - Parameters:
    ///   - input: the tool's input, a JSON object.
    ///   - task: the task within the session; each task has its own sandbox.
    ///   - epoch: the lease epoch from `wake`; agentd refuses a stale one.
    ///   - idempotencyKey: a retried call with the same key gets the first call's result.
    ///   - timeout: how long to wait for agentd's answer; give it more than the command's own
    ///     timeout, since the answer comes when the command ends.
    /// - Throws: `AgentdClientError` when `input` is not a JSON object, when agentd refuses
    ///   the call (unknown session 404, bad input 400, stale epoch 409, too large 413) or
    ///   cannot be reached.
    public func execute(
        session: String, tool: String, input: Data, task: String = "main", epoch: UInt64? = nil, idempotencyKey: String? = nil,
        timeout: Duration = .seconds(300)
    ) async throws -> ExecuteResult {
        let body = try executeRequest(tool: tool, input: input, task: task, epoch: epoch, idempotencyKey: idempotencyKey)
        let path = Self.sessionPath(session) + "/execute"
        let request = HTTPRequest(method: "POST", target: path, body: .bytes(APIBody.encode(body), contentType: "application/json"), timeout: timeout)
        let reply = try await send(request, path: path)
        let response = try decode(ExecuteResponse.self, reply, path: path)
        return ExecuteResult(
            output: response.result.output, isError: response.result.isError, exitCode: response.result.exitCode, response: response, reply: reply)
    }

    /// What a streaming execute reports while its command runs.
    public enum ExecuteUpdate: Sendable, Equatable {
        /// A piece of the command's output (`stdout` or `stderr`), as it was produced.
        case output(stream: String, bytes: [UInt8])
        /// agentd left out `bytes` of output here because this client read too slowly (the
        /// result still has them).
        case dropped(bytes: Int, message: String)
    }

    /// `execute` with the command's output streamed (`POST …/execute?stream=true`):
    /// `onUpdate` sees each piece of output as agentd receives it, on the transport's thread
    /// (keep it quick), before the call returns the result — the same result as `execute`'s.
    /// A replay of a completed idempotency key streams nothing but the result.
    /// - Throws: `AgentdClientError` as `execute`: a refusal before the call ran is agentd's
    ///   plain error; a failure after it was accepted (`event: error`) carries the same code
    ///   and message.
    public func executeStreaming(
        session: String, tool: String, input: Data, task: String = "main", epoch: UInt64? = nil, idempotencyKey: String? = nil,
        timeout: Duration = .seconds(300), onUpdate: @escaping @Sendable (ExecuteUpdate) -> Void
    ) async throws -> ExecuteResult {
        let body = try executeRequest(tool: tool, input: input, task: task, epoch: epoch, idempotencyKey: idempotencyKey)
        let path = Self.sessionPath(session) + "/execute?stream=true"
        var request = HTTPRequest(method: "POST", target: path, body: .bytes(APIBody.encode(body), contentType: "application/json"), timeout: timeout)
        request.headers.append(("Accept", "text/event-stream"))
        let end = Mutex<(result: [UInt8]?, error: ErrorResponse?)>((nil, nil))
        // A refusal is a plain JSON body, not events: its first bytes are kept to read it.
        let raw = Mutex<[UInt8]>([])
        let parser = SSEParser { name, data in
            switch name {
            case ExecuteStreamEvent.output:
                if let event = try? APIBody.decodeResponse(ExecuteOutputEvent.self, from: Array(data.utf8)) {
                    onUpdate(.output(stream: event.stream, bytes: event.bytes))
                }
            case ExecuteStreamEvent.dropped:
                if let event = try? APIBody.decodeResponse(ExecuteDroppedEvent.self, from: Array(data.utf8)) {
                    onUpdate(.dropped(bytes: event.bytes, message: event.message))
                }
            case ExecuteStreamEvent.result:
                end.withLock { $0.result = Array(data.utf8) }
            case ExecuteStreamEvent.error:
                end.withLock { $0.error = try? APIBody.decodeResponse(ErrorResponse.self, from: Array(data.utf8)) }
            default:
                break
            }
        }
        request.onData = { bytes in
            raw.withLock { kept in if kept.count < 64 << 10 { kept += bytes.prefix((64 << 10) - kept.count) } }
            parser.feed(bytes)
        }
        let response = try await exchange(request, restart: { raw.withLock { $0 = [] }; parser.reset() })
        guard (200..<300).contains(response.status) else { throw Self.refusal(response.status, raw.withLock { $0 }) }
        let (resultBytes, failure) = end.withLock { ($0.result, $0.error) }
        if let failure {
            throw AgentdClientError(status: response.status, code: failure.error.code, message: failure.error.message)
        }
        guard let resultBytes else {
            throw AgentdClientError(
                status: response.status, code: "incomplete",
                message: "agentd's stream for \(path) ended without a result; the call may have run: read the session's events, or repeat it with the same idempotency key")
        }
        let reply = Reply(status: response.status, body: resultBytes)
        let result = try decode(ExecuteResponse.self, reply, path: path)
        return ExecuteResult(output: result.result.output, isError: result.result.isError, exitCode: result.result.exitCode, response: result, reply: reply)
    }

    /// The body of an execute, checked as agentd will check it.
    private func executeRequest(tool: String, input: Data, task: String, epoch: UInt64?, idempotencyKey: String?) throws -> ExecuteRequest {
        let value: JSONValue
        do {
            value = try JSONValue(data: input)
        } catch {
            throw AgentdClientError(
                status: 0, code: "invalid-argument", message: #"the input of \#(tool) is not valid JSON; give a JSON object, e.g. {"command": "ls"}"#)
        }
        do {
            return try ExecuteRequest(tool: tool, input: value, task: task, epoch: epoch, idempotencyKey: idempotencyKey)
        } catch let error as APIRequestError {
            throw AgentdClientError(status: 0, code: "invalid-argument", message: error.message)
        }
    }

    /// How long to wait for agentd's answer to an execute with `input` in `session`: as long
    /// as the command may run — the input's `timeout_s`, else the session policy's command
    /// timeout (`GET /v1/policies`), else 240 s — plus a minute for provisioning and
    /// journaling. A fixed wait would give up on long commands that are still running, or wait
    /// minutes for a short one whose answer was lost.
    public func answerTimeout(forInput input: JSONValue, session: String) async -> Duration {
        let margin: Duration = .seconds(60)
        if case .number(let seconds)? = input["timeout_s"], seconds > 0, seconds <= 86400 { return .milliseconds(Int64(seconds * 1000)) + margin }
        if let policy = try? await self.session(session).policy,
            let seconds = try? await policies().policies.first(where: { $0.name == policy })?.commandTimeoutSeconds,
            seconds > 0, seconds <= 86400
        {
            return .milliseconds(Int64(seconds * 1000)) + margin
        }
        return .seconds(240) + margin
    }

    /// Creates a session (no sandbox yet).
    /// - Parameters:
    ///   - policy: the policy's name; agentd's `default` when nil.
    ///   - id: the session's id; generated when nil.
    /// - Throws: `AgentdClientError` (an unknown policy, a taken or invalid id).
    public func createSession(policy: String? = nil, id: String? = nil) async throws -> SessionInfo {
        try await post("/v1/sessions", CreateSessionRequest(policy: policy, id: id), as: SessionInfo.self, timeout: .seconds(30))
    }

    /// Every session.
    public func sessions() async throws -> [SessionInfo] { try await get("/v1/sessions", as: SessionList.self).sessions }

    /// One session.
    /// - Throws: `AgentdClientError` with status 404 for an unknown session.
    public func session(_ id: String) async throws -> SessionInfo { try await get(Self.sessionPath(id), as: SessionInfo.self) }

    /// The session's events after sequence number `after`.
    public func events(_ id: String, after: UInt64 = 0) async throws -> [EventInfo] {
        try await get(Self.sessionPath(id) + "/events?after=\(after)", as: EventList.self, timeout: .seconds(300)).events
    }

    /// Follows a session's events after `after` as they are appended (server-sent events),
    /// calling `onEvent` with each (and its JSON text), until agentd ends the stream.
    ///
    /// A reader that fell behind gets an `event: gap` from agentd naming the last seq it was
    /// sent; the follow then goes on from there with a new request, so no event is missed.
    public func followEvents(_ id: String, after: UInt64 = 0, onEvent: @escaping @Sendable (EventInfo, String) -> Void) async throws {
        let position = Mutex<(after: UInt64, gap: Bool)>((after, false))
        while true {
            let from = position.withLock { state -> UInt64 in
                state.gap = false
                return state.after
            }
            try await follow(Self.sessionPath(id) + "/events?after=\(from)&follow=true") { name, data in
                if name == "gap", let gap = try? APIBody.decodeResponse(StreamGap.self, from: Array(data.utf8)) {
                    position.withLock { $0 = (max($0.after, gap.lastSeq), true) }
                    return
                }
                guard let event = try? APIBody.decodeResponse(EventInfo.self, from: Array(data.utf8)) else { return }
                position.withLock { $0.after = max($0.after, event.seq) }
                onEvent(event, data)
            }
            guard position.withLock({ $0.gap }), !Task.isCancelled else { return }
        }
    }

    /// Takes the session over: a lease with a new fencing epoch.
    public func wake(_ id: String) async throws -> WakeResponse {
        try await post(Self.sessionPath(id) + "/wake", EmptyRequest(), as: WakeResponse.self, timeout: .seconds(60))
    }

    /// Stores a Brain's state.
    /// - Throws: `AgentdClientError` (409 for a stale epoch, 413 for a state too large).
    public func checkpoint(_ id: String, state: JSONValue, epoch: UInt64? = nil) async throws -> CheckpointResponse {
        try await post(Self.sessionPath(id) + "/checkpoint", CheckpointRequest(state: state, epoch: epoch), as: CheckpointResponse.self, timeout: .seconds(60))
    }

    /// The last checkpoint and the events after it (getSession).
    public func snapshot(_ id: String) async throws -> SnapshotResponse {
        try await get(Self.sessionPath(id) + "/snapshot", as: SnapshotResponse.self, timeout: .seconds(300))
    }

    /// Walks the session's hash chain.
    public func verify(_ id: String) async throws -> VerifyResponse {
        try await get(Self.sessionPath(id) + "/verify", as: VerifyResponse.self, timeout: .seconds(300))
    }

    /// Ends a task; its sandbox is removed.
    public func endTask(_ id: String, task: String = "main", epoch: UInt64? = nil) async throws -> TaskEndResponse {
        try await post(
            Self.sessionPath(id) + "/tasks/\(Self.pathComponent(task))/end", TaskEndRequest(epoch: epoch), as: TaskEndResponse.self, timeout: .seconds(120))
    }

    /// Deletes a session: its sandboxes and workspaces are removed and `session.deleted` is
    /// journaled; its events stay readable. Deleting a deleted session answers the same seq.
    /// - Throws: `AgentdClientError` (404 for an unknown session, 409 for a stale epoch).
    public func deleteSession(_ id: String, epoch: UInt64? = nil) async throws -> DeleteSessionResponse {
        try await post(Self.sessionPath(id), DeleteSessionRequest(epoch: epoch), as: DeleteSessionResponse.self, method: "DELETE", timeout: .seconds(300))
    }

    /// Whether agentd is up, with its sessions, sandboxes and policy errors.
    public func health(timeout: Duration = .seconds(30)) async throws -> HealthResponse { try await get("/v1/health", as: HealthResponse.self, timeout: timeout) }

    /// The loaded policies, with the last refused edit's errors.
    public func policies() async throws -> PolicyList { try await get("/v1/policies", as: PolicyList.self) }

    /// Each policy's warm pool.
    public func pools() async throws -> [PoolList.Pool] { try await get("/v1/pools", as: PoolList.self).pools }

    /// `GET /v1/sandboxes`: the sandboxes serving tasks now.
    public func sandboxes() async throws -> [SandboxList.Sandbox] { try await get("/v1/sandboxes", as: SandboxList.self).sandboxes }
}

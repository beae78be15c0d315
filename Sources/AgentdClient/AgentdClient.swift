import CurlHTTP
import Foundation

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

    /// A JSON answer: the decoded object and the HTTP status.
    public struct Reply: @unchecked Sendable {
        // Invariant: `json` is built from JSONSerialization output and never mutated.
        public let status: Int
        public let json: [String: Any]
        /// The body as text (for answers that are not JSON).
        public let text: String
        public subscript(key: String) -> Any? { json[key] }
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

    private func send(_ request: HTTPRequest, path: String) async throws -> Reply {
        var request = request
        if let token { request.headers.append(("Authorization", "Bearer \(token)")) }
        let response: HTTPResponse
        do {
            response = try await transport.send(request)
        } catch let error as HTTPClientError {
            throw AgentdClientError.transport(error, endpoint: endpoint)
        }
        let object = (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any] ?? [:]
        guard (200..<300).contains(response.status) else {
            let error = object["error"] as? [String: Any]
            throw AgentdClientError(
                status: response.status, code: error?["code"] as? String ?? "http",
                message: error?["message"] as? String ?? String(decoding: response.body.prefix(500), as: UTF8.self))
        }
        return Reply(status: response.status, json: object, text: String(decoding: response.body, as: UTF8.self))
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

    func feed(_ bytes: [UInt8]) {
        buffer += bytes
        while let end = buffer.firstRange(of: [10, 10]) {
            let block = String(decoding: buffer[..<end.lowerBound], as: UTF8.self)
            buffer.removeSubrange(..<end.upperBound)
            var type = "message"
            var data: [String] = []
            for line in block.split(separator: "\n", omittingEmptySubsequences: false) {
                if line.hasPrefix("event: ") { type = String(line.dropFirst(7)) }
                else if line.hasPrefix("data: ") { data.append(String(line.dropFirst(6))) }
            }
            if !data.isEmpty { onEvent(type, data.joined(separator: "\n")) }
        }
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
    /// agentd's whole answer (with the journal sequence numbers and `replayed`).
    public let reply: AgentdClient.Reply
}

extension AgentdClient {
    /// `/v1/sessions/ID`, with the id percent-encoded.
    public static func sessionPath(_ session: String) -> String {
        "/v1/sessions/\(pathComponent(session))"
    }

    /// `text` percent-encoded for one path segment of an API route (a session id, a task).
    public static func pathComponent(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? text
    }

    /// The tools sessions serve, with their input schemas (`GET /v1/tools`; makes no sandbox).
    public func tools() async throws -> [ToolDescription] {
        let reply = try await get("/v1/tools")
        return try ((reply["tools"] as? [[String: Any]]) ?? []).map { tool in
            ToolDescription(
                name: tool["name"] as? String ?? "", description: tool["description"] as? String ?? "",
                inputSchema: try JSONSerialization.data(withJSONObject: tool["input_schema"] ?? [:], options: [.sortedKeys]))
        }
    }

    /// execute(name, input): agentd journals the intent, runs `tool` on the task's sandbox
    /// (provisioned on demand) and journals the result.
    /// - Parameters:
    ///   - input: the tool's input, a JSON object.
    ///   - task: the task within the session; each task has its own sandbox.
    ///   - epoch: the lease epoch from `wake`; agentd refuses a stale one.
    ///   - idempotencyKey: a retried call with the same key gets the first call's result.
    /// - Throws: `AgentdClientError` when agentd refuses the call (unknown session 404, bad
    ///   input 400, stale epoch 409, too large 413) or cannot be reached.
    public func execute(
        session: String, tool: String, input: Data, task: String = "main", epoch: UInt64? = nil, idempotencyKey: String? = nil
    ) async throws -> ExecuteResult {
        guard let object = (try? JSONSerialization.jsonObject(with: input)) as? [String: Any] else {
            throw AgentdClientError(
                status: 0, code: "invalid-argument", message: #"the input of \#(tool) must be a JSON object, e.g. {"command": "ls"}"#)
        }
        var body: [String: Any] = ["tool": tool, "input": object, "task": task]
        if let epoch { body["epoch"] = epoch }
        if let idempotencyKey { body["idempotency_key"] = idempotencyKey }
        let reply = try await post(Self.sessionPath(session) + "/execute", body)
        let result = reply["result"] as? [String: Any] ?? [:]
        return ExecuteResult(
            output: result["output"] as? String ?? "", isError: (result["is_error"] as? Bool) == true,
            exitCode: (result["exit_code"] as? NSNumber)?.intValue, reply: reply)
    }
}

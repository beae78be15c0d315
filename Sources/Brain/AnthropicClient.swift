import AgentdClient
import CurlHTTP
import Foundation
import JSONValues
import Logging

/// How often, and how patiently, a failed model call is tried again: the session policy's
/// `brain.retries` and `brain.backoff`.
public struct RetryPolicy: Sendable, Hashable {
    /// Retries after the first attempt.
    public var retries: Int
    /// The wait before the first retry; it doubles on each further one.
    public var backoff: Duration

    public init(retries: Int, backoff: Duration) {
        self.retries = max(0, retries)
        self.backoff = backoff
    }

    /// The wait before retry number `retry` (1-based).
    func delay(before retry: Int) -> Duration { backoff * (1 << min(retry - 1, 16)) }
}

/// The Anthropic Messages API (`POST {base}/v1/messages`) over libcurl.
///
/// Errors: the API's error object (`{"type": "error", "error": {"type", "message"}}`) becomes a
/// `BrainError` saying what to do; rate limits (429), overload (529), server errors (5xx) and
/// transport failures are retried with exponential backoff, the rest fail at once. A
/// `retry-after` header (seconds) lengthens the wait to what the API asks, up to five minutes.
public struct AnthropicClient: Model {
    /// The API's default address.
    public static let defaultBaseURL = "https://api.anthropic.com"
    /// The model used when neither `--model` nor `$ANTHROPIC_MODEL` names one.
    public static let defaultModel = "claude-sonnet-4-5"
    /// The API version this client speaks (the `anthropic-version` header).
    public static let apiVersion = "2023-06-01"

    public let baseURL: String
    public let model: String
    public let maxTokens: Int
    private let key: APIKey
    private let retry: RetryPolicy
    private let transport: any HTTPTransport
    private let logger: Logger

    /// - Parameters:
    ///   - baseURL: where the API is, e.g. `https://api.anthropic.com`.
    ///   - maxTokens: the `max_tokens` of each request.
    public init(
        key: APIKey, baseURL: String = defaultBaseURL, model: String = defaultModel, maxTokens: Int = 8192, retry: RetryPolicy,
        logger: Logger
    ) {
        self.key = key
        self.baseURL = baseURL
        self.model = model
        self.maxTokens = maxTokens
        self.retry = retry
        self.logger = logger
        transport = CurlTransport(endpoint: .url(baseURL))
    }

    public func respond(system: String, messages: [Message], tools: [ToolDescription]) async throws -> ModelTurn {
        let body = try requestBody(system: system, messages: messages, tools: tools)
        var attempt = 0
        while true {
            attempt += 1
            let failure: BrainError
            var asked: Duration?
            do {
                return try await send(body)
            } catch let error as Retryable {
                failure = error.error
                asked = error.retryAfter
            }
            guard attempt <= retry.retries else {
                throw BrainError(
                    .modelAPI, "\(failure.message) — gave up after \(attempt) attempts (policy brain.retries: \(retry.retries))",
                    cause: failure)
            }
            let delay = max(retry.delay(before: attempt), min(asked ?? .zero, Self.longestRetryAfter))
            logger.info("\(failure.message); retry \(attempt) of \(retry.retries) in \(delay)")
            try await Task.sleep(for: delay)
        }
    }

    /// A failure worth trying again, with the wait the API asked for (`retry-after`).
    private struct Retryable: Error {
        let error: BrainError
        var retryAfter: Duration? = nil
    }

    /// The longest `retry-after` honoured: beyond it the policy's backoff decides.
    static let longestRetryAfter: Duration = .seconds(300)

    /// `retry-after` in its delay-seconds form (the HTTP-date form is left to the backoff).
    static func retryAfter(_ value: String?) -> Duration? {
        guard let value, let seconds = Double(value.trimmingCharacters(in: .whitespaces)), seconds >= 0, seconds.isFinite else { return nil }
        return .milliseconds(Int(seconds * 1000))
    }

    private func requestBody(system: String, messages: [Message], tools: [ToolDescription]) throws -> [UInt8] {
        let toolList = try tools.map { tool in
            JSONValue.object([
                "name": .string(tool.name), "description": .string(tool.description), "input_schema": try JSONValue(data: tool.inputSchema),
            ])
        }
        var body: [String: JSONValue] = [
            "model": .string(model), "max_tokens": .number(Double(maxTokens)),
            "messages": .array(messages.map { .object(["role": .string($0.role.rawValue), "content": .array($0.content.map(\.json))]) }),
            "tools": .array(toolList),
        ]
        if !system.isEmpty { body["system"] = .string(system) }
        return Array(JSONValue.object(body).data)
    }

    /// One attempt.
    /// - Throws: `Retryable` for failures worth another attempt, `BrainError` for the rest.
    private func send(_ body: [UInt8]) async throws -> ModelTurn {
        var request = HTTPRequest(method: "POST", target: "/v1/messages", body: .bytes(body, contentType: "application/json"), timeout: .seconds(600))
        request.headers = [("x-api-key", key.secret), ("anthropic-version", Self.apiVersion)]
        let response: HTTPResponse
        do {
            response = try await transport.send(request)
        } catch let error as HTTPClientError where error.code != .cancelled && error.code != .invalidArgument {
            throw Retryable(error: BrainError(.modelAPI, "calling the model API failed: \(key.redact(error.message))", cause: error))
        }
        let answer = try? JSONValue(data: Data(response.body))
        guard response.status == 200 else {
            let error = failure(status: response.status, answer: answer, raw: response.body)
            if var retryable = error as? Retryable {
                retryable.retryAfter = Self.retryAfter(response.header("retry-after"))
                throw retryable
            }
            throw error
        }
        struct Response: Decodable {
            var type: String
            var role: String
            var content: [ContentBlock]
            var stopReason: String?
            enum CodingKeys: String, CodingKey { case type, role, content, stopReason = "stop_reason" }
        }
        guard let decoded = try? JSONDecoder().decode(Response.self, from: Data(response.body)), decoded.type == "message",
            decoded.role == "assistant"
        else {
            throw BrainError(
                .badModelAnswer,
                "the model API at \(baseURL) answered 200 but not with an assistant message: \(key.redact(String(decoding: response.body.prefix(300), as: UTF8.self)))"
            )
        }
        return ModelTurn(content: decoded.content, stopReason: decoded.stopReason)
    }

    /// The error for a non-200 answer, wrapped in `Retryable` when another attempt may succeed.
    private func failure(status: Int, answer: JSONValue?, raw: [UInt8]) -> any Error {
        let type = answer?["error"]?["type"]?.stringValue ?? "http_\(status)"
        let message = key.redact(answer?["error"]?["message"]?.stringValue ?? String(decoding: raw.prefix(300), as: UTF8.self))
        let what = "the model API answered \(status) \(type): \(message)"
        switch status {
        case 401:
            return BrainError(.authentication, "\(what) — check ANTHROPIC_API_KEY: the model API does not accept it")
        case 403:
            return BrainError(.authentication, "\(what) — the key in ANTHROPIC_API_KEY may not use this (model \(model))")
        case 404:
            return BrainError(.modelAPI, "\(what) — check --model / ANTHROPIC_MODEL (\(model)) and --model-url / ANTHROPIC_BASE_URL (\(baseURL))")
        case 429, 529, 500...599:
            return Retryable(error: BrainError(.modelAPI, what))
        default:
            return BrainError(.modelAPI, what)
        }
    }
}

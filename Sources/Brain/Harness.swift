import AgentdClient
import Foundation
import JSONValues
import Logging
import Synchronization

/// The harness loop of a Brain: asks the model, runs the tool calls it asks for through
/// agentd's `execute`, sends the results back, until the model gives its answer.
///
/// Durability: the conversation is checkpointed into the session after every model turn and
/// after every round of tool results, under the Brain's lease epoch. Each tool call carries its
/// `tool_use` id as the idempotency key, so a Brain that resumes a conversation whose last turn
/// asked for tools sends the same calls again and agentd answers those that already finished
/// from its journal instead of running them twice. A stale epoch (another Brain woke the
/// session) stops the loop with `BrainError.staleLease`.
public struct Harness: Sendable {
    /// The system prompt sent with every model request.
    public static let systemPrompt = """
        You are an agent working in a sandboxed Linux workspace through tools. Use them to do the \
        user's task: run commands with bash, read and write files with read_file and write_file. \
        The sandbox has no network unless its policy allows it. When the task is done, answer with \
        a short summary of what you did and found.
        """

    public let client: AgentdClient
    public let session: String
    public let epoch: UInt64
    private let model: any Model
    private let tools: [ToolDescription]
    private let logger: Logger
    private let outputLine: (@Sendable (String) -> Void)?

    /// - Parameters:
    ///   - epoch: the lease from `wake`; every call to agentd carries it.
    ///   - tools: what the model may call (`AgentdClient.tools()`).
    ///   - outputLine: when given, tool calls stream their output (`executeStreaming`) and
    ///     each line of it is handed here as it comes (a progress display); the model still
    ///     gets the whole result.
    public init(
        client: AgentdClient, session: String, epoch: UInt64, model: any Model, tools: [ToolDescription], logger: Logger,
        outputLine: (@Sendable (String) -> Void)? = nil
    ) {
        self.client = client
        self.session = session
        self.epoch = epoch
        self.model = model
        self.tools = tools
        self.logger = logger
        self.outputLine = outputLine
    }

    /// What a finished run gives.
    public struct Outcome: Sendable {
        /// The text of the model's last turn.
        public var answer: String
        /// Model turns taken by this run (0 when the conversation had already finished).
        public var turns: Int
    }

    /// Continues `conversation` until the model answers, taking at most `maxTurns` model turns.
    /// - Throws: `BrainError` (`.turnLimit` when the turns run out; the conversation stays in the
    ///   session, ready to be resumed).
    public func run(_ conversation: Conversation, maxTurns: Int) async throws -> Outcome {
        var conversation = conversation
        var turns = 0
        while true {
            switch conversation.stage {
            case .finished(let answer):
                return Outcome(answer: answer, turns: turns)
            case .awaitingTools:
                let calls = conversation.messages.last?.toolUses ?? []
                var results: [ContentBlock] = []
                for call in calls { results.append(try await execute(call)) }
                conversation.messages.append(Message(role: .user, content: results))
                try await checkpoint(conversation)
            case .awaitingModel:
                guard turns < maxTurns else {
                    throw BrainError(.turnLimit, "no answer after \(maxTurns) model turns (--max-turns \(maxTurns))")
                }
                turns += 1
                logger.info("model: turn \(turns)")
                let turn = try await model.respond(system: Self.systemPrompt, messages: conversation.messages, tools: tools)
                if turn.stopReason == "max_tokens" {
                    logger.warning("model: the turn was cut at max_tokens")
                }
                conversation.messages.append(Message(role: .assistant, content: turn.content))
                try await checkpoint(conversation)
            }
        }
    }

    /// Runs one tool call; the Hands' failures (and input agentd refuses) become an error result
    /// for the model, a refused lease or an unreachable agentd stops the Brain.
    private func execute(_ call: (id: String, name: String, input: JSONValue)) async throws -> ContentBlock {
        let result: (output: String, isError: Bool)
        do {
            let executed: ExecuteResult
            if let outputLine {
                let lines = LineSplitter(outputLine)
                executed = try await client.executeStreaming(
                    session: session, tool: call.name, input: call.input.data, epoch: epoch, idempotencyKey: call.id, onUpdate: lines.take)
                lines.finish()
            } else {
                executed = try await client.execute(session: session, tool: call.name, input: call.input.data, epoch: epoch, idempotencyKey: call.id)
            }
            result = (executed.output, executed.isError)
            let replayed = (executed.reply["replayed"] as? Bool) == true
            logger.info("\(call.name) \(Self.short(call.input)) → \(result.isError ? "error" : "ok")\(replayed ? " (already done; agentd's journal answered)" : "")")
        } catch let error as AgentdClientError where error.status == 400 || error.code == "invalid-argument" {
            // Input that does not fit the tool: the model's mistake, for the model to fix.
            result = (error.message, true)
            logger.info("\(call.name) \(Self.short(call.input)) → refused: \(error.message)")
        } catch let error as AgentdClientError {
            throw BrainError.agentd(error, session: session)
        }
        // The API wants a non-empty result; say that there was none.
        return .toolResult(toolUseID: call.id, content: result.output.isEmpty ? "(no output)" : result.output, isError: result.isError)
    }

    private func checkpoint(_ conversation: Conversation) async throws {
        do {
            try await client.checkpoint(session: session, conversation, epoch: epoch)
        } catch let error as AgentdClientError {
            throw BrainError.agentd(error, session: session)
        }
    }

    /// A tool input on one line, cut to fit a progress line.
    static func short(_ input: JSONValue) -> String {
        let text = String(decoding: input.data, as: UTF8.self).replacingOccurrences(of: "\n", with: "\\n")
        return text.count <= 80 ? text : text.prefix(79) + "…"
    }
}

/// Cuts streamed output into lines (stdout and stderr alike) and hands each whole one on;
/// a line longer than 4 KiB is handed on in pieces of that size.
final class LineSplitter: Sendable {
    private let partial = Mutex<[UInt8]>([])
    private let emit: @Sendable (String) -> Void

    init(_ emit: @escaping @Sendable (String) -> Void) { self.emit = emit }

    func take(_ update: AgentdClient.ExecuteUpdate) {
        guard case .output(_, let bytes) = update else { return }
        let lines = partial.withLock { buffer -> [[UInt8]] in
            var out: [[UInt8]] = []
            for b in bytes {
                if b == 10 {
                    out.append(buffer)
                    buffer = []
                } else {
                    buffer.append(b)
                    if buffer.count >= 4096 {
                        out.append(buffer)
                        buffer = []
                    }
                }
            }
            return out
        }
        for line in lines { emit(String(decoding: line, as: UTF8.self)) }
    }

    /// Hands on the last line, when it had no newline.
    func finish() {
        let rest = partial.withLock { b -> [UInt8] in
            defer { b = [] }
            return b
        }
        if !rest.isEmpty { emit(String(decoding: rest, as: UTF8.self)) }
    }
}

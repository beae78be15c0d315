import AgentdClient
import Foundation
import JSONValues
import Logging

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

    /// - Parameters:
    ///   - epoch: the lease from `wake`; every call to agentd carries it.
    ///   - tools: what the model may call (`AgentdClient.tools()`).
    public init(client: AgentdClient, session: String, epoch: UInt64, model: any Model, tools: [ToolDescription], logger: Logger) {
        self.client = client
        self.session = session
        self.epoch = epoch
        self.model = model
        self.tools = tools
        self.logger = logger
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
            let executed = try await client.execute(session: session, tool: call.name, input: call.input.data, epoch: epoch, idempotencyKey: call.id)
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

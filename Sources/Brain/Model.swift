import AgentdClient
import Foundation

/// One assistant turn: the content blocks of a Messages API response and why the model stopped.
public struct ModelTurn: Sendable, Hashable {
    public var content: [ContentBlock]
    /// `end_turn`, `tool_use`, `max_tokens`, `stop_sequence`, … (nil if the answer had none).
    public var stopReason: String?

    public init(content: [ContentBlock], stopReason: String?) {
        self.content = content
        self.stopReason = stopReason
    }
}

/// The model half of a Brain: given the conversation and the tools, the next assistant turn.
public protocol Model: Sendable {
    /// - Throws: `BrainError` when no turn can be had (after the model's own retries).
    func respond(system: String, messages: [Message], tools: [ToolDescription]) async throws -> ModelTurn
}

/// A model that plays back assistant turns from a file — for offline demos and tests.
///
/// The file is a JSON array of Messages API response-like objects, each with `content` blocks
/// (and optionally `stop_reason`). The turn played is the one after those already in the
/// conversation, so a resumed Brain continues the script where the dead one stopped.
public struct ScriptedModel: Model {
    private let turns: [ModelTurn]
    private let path: String

    /// Reads the script at `path`.
    /// - Throws: `BrainError.badScript` when it cannot be read or is not an array of turns.
    public init(path: String) throws {
        self.path = path
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw BrainError(.badScript, "cannot read the script \(path): \(error.localizedDescription)")
        }
        struct Turn: Decodable {
            var content: [ContentBlock]
            var stopReason: String?
            enum CodingKeys: String, CodingKey { case content, stopReason = "stop_reason" }
        }
        do {
            turns = try JSONDecoder().decode([Turn].self, from: data).map { ModelTurn(content: $0.content, stopReason: $0.stopReason) }
        } catch {
            throw BrainError(
                .badScript,
                #"the script \#(path) must be a JSON array of assistant turns like {"content": [{"type": "text", "text": "…"}]}: \#(error)"#)
        }
    }

    public func respond(system: String, messages: [Message], tools: [ToolDescription]) async throws -> ModelTurn {
        let played = messages.count { $0.role == .assistant }
        guard played < turns.count else {
            throw BrainError(.badModelAnswer, "the script \(path) has \(turns.count) turns and all were played; the conversation wants another")
        }
        return turns[played]
    }
}

import Foundation
import JSONValues

/// One content block of a Messages API message.
public enum ContentBlock: Sendable, Hashable, Codable {
    case text(String)
    /// The model asks for a tool call; `id` is also the call's idempotency key in agentd.
    case toolUse(id: String, name: String, input: JSONValue)
    case toolResult(toolUseID: String, content: String, isError: Bool)
    /// A block of a type the harness does not act on (`thinking`, …), kept verbatim so that it
    /// goes back to the model unchanged.
    case other(JSONValue)

    public init(from decoder: any Decoder) throws {
        self = Self.block(try JSONValue(from: decoder))
    }

    /// The block `value` is; a block of another type, or one missing a field, stays `.other`.
    private static func block(_ value: JSONValue) -> ContentBlock {
        switch value["type"]?.stringValue {
        case "text":
            if let text = value["text"]?.stringValue { return .text(text) }
        case "tool_use":
            if let id = value["id"]?.stringValue, let name = value["name"]?.stringValue {
                return .toolUse(id: id, name: name, input: value["input"] ?? .object([:]))
            }
        case "tool_result":
            if let id = value["tool_use_id"]?.stringValue, let content = value["content"]?.stringValue {
                return .toolResult(toolUseID: id, content: content, isError: value["is_error"] == .bool(true))
            }
        default:
            break
        }
        return .other(value)
    }

    public func encode(to encoder: any Encoder) throws {
        try json.encode(to: encoder)
    }

    /// The block in the API's JSON shape.
    public var json: JSONValue {
        switch self {
        case .text(let text):
            .object(["type": .string("text"), "text": .string(text)])
        case .toolUse(let id, let name, let input):
            .object(["type": .string("tool_use"), "id": .string(id), "name": .string(name), "input": input])
        case .toolResult(let id, let content, let isError):
            .object(["type": .string("tool_result"), "tool_use_id": .string(id), "content": .string(content), "is_error": .bool(isError)])
        case .other(let value):
            value
        }
    }
}

/// A Messages API message: a role and its content blocks.
public struct Message: Sendable, Hashable, Codable {
    public enum Role: String, Sendable, Hashable, Codable {
        case user, assistant
    }

    public var role: Role
    public var content: [ContentBlock]

    public init(role: Role, content: [ContentBlock]) {
        self.role = role
        self.content = content
    }

    /// The `tool_use` blocks, in order.
    public var toolUses: [(id: String, name: String, input: JSONValue)] {
        content.compactMap { if case .toolUse(let id, let name, let input) = $0 { (id, name, input) } else { nil } }
    }

    /// The text blocks, joined.
    public var text: String {
        content.compactMap { if case .text(let text) = $0 { text } else { nil } }.joined(separator: "\n")
    }
}

/// The Brain's whole state: the Messages API message list. It is what the harness stores in
/// the session as its checkpoint, so that another Brain process can continue it.
public struct Conversation: Sendable, Hashable, Codable {
    /// Names the checkpoint's format, so that a checkpoint some other harness wrote into the
    /// session is recognised as not ours instead of misread.
    public static let format = "agentctl-run/1"

    public var format: String
    public var messages: [Message]

    /// A new conversation: the user's prompt.
    public init(prompt: String) {
        format = Self.format
        messages = [Message(role: .user, content: [.text(prompt)])]
    }

    /// Where the conversation stands, which decides the harness's next step.
    public enum Stage: Sendable, Equatable {
        /// The model's turn: the last message is the user's.
        case awaitingModel
        /// The last assistant turn asked for tool calls whose results are not in yet.
        case awaitingTools
        /// The last assistant turn asked for nothing more: it is the answer.
        case finished(answer: String)
    }

    public var stage: Stage {
        guard let last = messages.last, last.role == .assistant else { return .awaitingModel }
        return last.toolUses.isEmpty ? .finished(answer: last.text) : .awaitingTools
    }
}

import AgentdClient
import Foundation
import JSONValues
import Logging

/// A session as one Brain holds it: its lease epoch, the conversation to continue and the
/// retry policy of the session's policy.
///
/// Opening one always calls `wake`: from then on agentd refuses the calls of any Brain that
/// drove the session before (its epoch is stale).
public struct BrainSession: Sendable {
    public let id: String
    public let policy: String
    public let epoch: UInt64
    public let conversation: Conversation
    /// `brain.retries` / `brain.backoff` of the session's policy, as `GET /v1/policies` reports it.
    public let retry: RetryPolicy

    /// Retries when agentd does not report the session's policy (it was unloaded since the
    /// session was created): the defaults of the policy format's `brain:` section.
    static let fallbackRetry = RetryPolicy(retries: 3, backoff: .seconds(1))

    /// Creates a session with `policy` (agentd's default when nil), takes its lease and stores
    /// the conversation `prompt` starts as the first checkpoint.
    /// - Throws: `BrainError` when agentd refuses (unknown policy) or cannot be reached.
    public static func start(client: AgentdClient, policy: String?, prompt: String, logger: Logger) async throws -> BrainSession {
        try await agentdCall(session: "(new)") {
            let reply = try await client.post("/v1/sessions", policy.map { ["policy": $0] } ?? [:])
            guard let id = reply["id"] as? String else {
                throw BrainError(.agentd, "agentd created a session but gave no id: \(reply.text.prefix(200))")
            }
            return try await open(client: client, id: id, logger: logger) { _ in Conversation(prompt: prompt) }
        }
    }

    /// Takes session `id` over and loads its conversation from the last checkpoint. With a
    /// `prompt`, a finished conversation gets it as the user's next message (a follow-up), and a
    /// session without a conversation starts one.
    /// - Throws: `BrainError` for an unknown session, a checkpoint that is not a conversation of
    ///   this harness, a prompt for an unfinished conversation, or no conversation and no prompt.
    public static func resume(client: AgentdClient, id: String, prompt: String?, logger: Logger) async throws -> BrainSession {
        try await agentdCall(session: id) {
            try await open(client: client, id: id, logger: logger) { stored in
                switch (stored, prompt) {
                case (nil, nil):
                    throw BrainError(.badCheckpoint, "session \(id) has no conversation to resume; give a PROMPT to start one in it")
                case (nil, let prompt?):
                    return Conversation(prompt: prompt)
                case (let stored?, nil):
                    return stored
                case (var stored?, let prompt?):
                    guard case .finished = stored.stage else {
                        throw BrainError(
                            .badCheckpoint, "session \(id)'s conversation is not finished; resume it without a PROMPT first (agentctl run --session \(id))")
                    }
                    stored.messages.append(Message(role: .user, content: [.text(prompt)]))
                    return stored
                }
            }
        }
    }

    /// Wakes `id`, reads its checkpoint and policy, and checkpoints the conversation that
    /// `conversation(stored)` decides on when it differs from the stored one.
    private static func open(
        client: AgentdClient, id: String, logger: Logger, conversation decide: (Conversation?) throws -> Conversation
    ) async throws -> BrainSession {
        let path = AgentdClient.sessionPath(id)
        let epoch = try await client.post(path + "/wake")["epoch"] as? NSNumber
        guard let epoch = epoch?.uint64Value else { throw BrainError(.agentd, "agentd woke session \(id) but gave no epoch") }
        let stored = try storedConversation(try await client.get(path + "/snapshot"), session: id)
        let conversation = try decide(stored)
        if conversation != stored { try await client.checkpoint(session: id, conversation, epoch: epoch) }
        let policy = try await client.get(path)["policy"] as? String ?? "default"
        return BrainSession(
            id: id, policy: policy, epoch: epoch, conversation: conversation,
            retry: try await retryPolicy(client: client, policy: policy, logger: logger))
    }

    /// The conversation in a snapshot's checkpoint, nil when there is no checkpoint.
    private static func storedConversation(_ snapshot: AgentdClient.Reply, session: String) throws -> Conversation? {
        guard let checkpoint = snapshot["checkpoint"] as? [String: Any], let state = checkpoint["state"] else { return nil }
        let conversation = try? JSONDecoder().decode(Conversation.self, from: JSONValue(foundationObject: state).data)
        guard let conversation, conversation.format == Conversation.format else {
            throw BrainError(
                .badCheckpoint,
                "session \(session)'s last checkpoint was not written by agentctl run (no \"format\": \"\(Conversation.format)\" conversation); another harness drives this session")
        }
        return conversation
    }

    private static func retryPolicy(client: AgentdClient, policy: String, logger: Logger) async throws -> RetryPolicy {
        let listed = (try await client.get("/v1/policies")["policies"] as? [[String: Any]]) ?? []
        guard let brain = listed.first(where: { $0["name"] as? String == policy })?["brain"] as? [String: Any],
            let retries = (brain["retries"] as? NSNumber)?.intValue, let backoff = (brain["backoff_s"] as? NSNumber)?.doubleValue
        else {
            logger.warning("policy \(policy) is not loaded in agentd; model calls are retried \(fallbackRetry.retries) times from \(fallbackRetry.backoff)")
            return fallbackRetry
        }
        return RetryPolicy(retries: retries, backoff: .seconds(backoff))
    }

    /// Runs `body`, turning agentd's refusals into `BrainError`s.
    private static func agentdCall<T>(session: String, _ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as AgentdClientError {
            throw BrainError.agentd(error, session: session)
        }
    }
}

extension AgentdClient {
    /// Stores `conversation` as the session's checkpoint under `epoch`.
    /// - Throws: `AgentdClientError` (409 when the epoch is stale).
    func checkpoint(session: String, _ conversation: Conversation, epoch: UInt64) async throws {
        let state = try JSONValue(data: JSONValue.encoder.encode(conversation))
        _ = try await post(AgentdClient.sessionPath(session) + "/checkpoint", ["state": state.foundationObject, "epoch": epoch])
    }
}

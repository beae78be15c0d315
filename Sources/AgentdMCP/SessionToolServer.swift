import AgentdClient
import Foundation
import Logging
import MCP

/// Serves one agentd session's tools to an MCP client (a harness) over stdio.
///
/// The server is a Brain as far as agentd is concerned: it holds the session's lease (it calls
/// `wake`, or uses an epoch it is given) and turns every `tools/call` into one
/// `execute(name, input)` on a task of the session — journaled by agentd, run on the task's
/// sandbox, which agentd provisions on the first call. Listing tools makes no sandbox.
///
/// Errors: a failing tool, and agentd refusing a call (a stale lease after another Brain woke
/// the session, an unknown session, bad input), come back as tool results with `isError` and
/// agentd's message, as contract 1 wants; an unknown tool name is a JSON-RPC invalid-params
/// error naming the tools. Only JSON-RPC goes to stdout; the logger should write to stderr.
public struct SessionToolServer: Sendable {
    public let client: AgentdClient
    public let session: String
    public let task: String
    let logger: Logger

    public init(client: AgentdClient, session: String, task: String = "main", logger: Logger) {
        self.client = client
        self.session = session
        self.task = task
        self.logger = logger
    }

    /// Takes the session's lease: `wake` for a new epoch, or, given `epoch`, checks that it is
    /// the session's current one.
    /// - Returns: the epoch every call will carry.
    /// - Throws: `AgentdMCPError` when the session is unknown, `epoch` is not its lease, or agentd
    ///   cannot be reached.
    public func lease(epoch: UInt64? = nil) async throws -> UInt64 {
        let path = AgentdClient.sessionPath(session)
        do {
            guard let epoch else {
                let reply = try await client.post(path + "/wake")
                guard let epoch = (reply["epoch"] as? NSNumber)?.uint64Value else {
                    throw AgentdMCPError("agentd's wake of session \(session) answered without an epoch")
                }
                return epoch
            }
            let current = (try await client.get(path)["lease_epoch"] as? NSNumber)?.uint64Value ?? 0
            guard current == epoch else {
                throw AgentdMCPError(
                    "epoch \(epoch) is not session \(session)'s lease (it is at \(current)); leave out --epoch to take the session over")
            }
            return epoch
        } catch let error as AgentdClientError {
            throw AgentdMCPError("cannot serve session \(session): \(error.message)")
        }
    }

    /// Speaks MCP on stdin/stdout until stdin ends, then answers the calls still in flight
    /// and returns.
    /// - Parameter epoch: the lease epoch from `lease(epoch:)`.
    /// - Throws: `AgentdMCPError` when stdin or stdout cannot be set up.
    public func serve(epoch: UInt64) async throws {
        let transport = AnsweringTransport(base: StdioTransport(logger: logger), logger: logger)
        let server = Server(
            name: "agentd", version: "1", title: "agentd session \(session)",
            instructions: """
                Tools run in agentd session \(session), task \(task), in a sandbox made on first use \
                (relative paths are under /workspace). Every call is journaled.
                """,
            capabilities: .init(tools: .init(listChanged: false)))
        let catalog = Catalog(client: client)
        await server.withMethodHandler(ListTools.self) { _ in
            do {
                return ListTools.Result(tools: try await catalog.tools())
            } catch let error as AgentdClientError {
                throw MCPError.internalError("cannot list agentd's tools: \(error.message)")
            }
        }
        await server.withMethodHandler(CallTool.self) { call in
            try await self.call(call, epoch: epoch, catalog: catalog, server: server)
        }
        do {
            try await server.start(transport: transport)
        } catch {
            throw AgentdMCPError("cannot serve MCP on stdin/stdout: \(error)")
        }
        logger.info("serving agentd session over MCP", metadata: ["session.id": "\(session)", "session.epoch": "\(epoch)", "task": "\(task)"])
        await server.waitUntilCompleted()
        logger.info("stdin ended; answering the calls in flight", metadata: ["session.id": "\(session)"])
        await transport.answered()
        await server.stop()
    }

    /// One `tools/call` as one `execute`. When the call's `_meta` carries a `progressToken`,
    /// the command's output is streamed and each piece is sent as it comes as a
    /// `notifications/progress` with that token: `progress` is the bytes of output so far
    /// (no `total`: it is not known), `message` the piece as text.
    private func call(_ call: CallTool.Parameters, epoch: UInt64, catalog: Catalog, server: Server) async throws -> CallTool.Result {
        do {
            let names = try await catalog.tools().map(\.name)
            guard names.contains(call.name) else {
                throw MCPError.invalidParams("unknown tool '\(call.name)'; the tools are \(names.joined(separator: ", "))")
            }
            let input = try JSONEncoder().encode(call.arguments ?? [:])
            // Unique per call: a call is never retried from here, and a key keeps a retry by
            // agentd's client (after a lost answer) from running the tool twice.
            let key = "mcp-\(UUID().uuidString)"
            let result: ExecuteResult
            if let token = call._meta?.progressToken {
                // The client's thread hands pieces over; one task sends them in order. At most
                // 256 pieces wait: a client slower than that misses the oldest (the result has
                // everything).
                let (pieces, feed) = AsyncStream.makeStream(of: [UInt8].self, bufferingPolicy: .bufferingNewest(256))
                let sender = Task {
                    var sent = 0
                    for await piece in pieces {
                        sent += piece.count
                        let progress = ProgressNotification.Parameters(
                            progressToken: token, progress: Double(sent), message: String(decoding: piece, as: UTF8.self))
                        try? await server.notify(ProgressNotification.message(progress))
                    }
                }
                defer { sender.cancel() }
                do {
                    result = try await client.executeStreaming(
                        session: session, tool: call.name, input: input, task: task, epoch: epoch, idempotencyKey: key,
                        onUpdate: { update in
                            if case .output(_, let bytes) = update { feed.yield(bytes) }
                        })
                    feed.finish()
                    await sender.value
                } catch {
                    feed.finish()
                    throw error
                }
            } else {
                result = try await client.execute(session: session, tool: call.name, input: input, task: task, epoch: epoch, idempotencyKey: key)
            }
            logger.info(
                "tool call", metadata: ["session.id": "\(session)", "tool": "\(call.name)", "is_error": "\(result.isError)"])
            return CallTool.Result(content: [.text(text: result.output, annotations: nil, _meta: nil)], isError: result.isError)
        } catch let error as AgentdClientError {
            logger.warning("tool call not run", metadata: ["session.id": "\(session)", "tool": "\(call.name)", "error": "\(error.message)"])
            let text = error.status > 0 ? "agentd refused \(call.name) (HTTP \(error.status) \(error.code)): \(error.message)" : "\(call.name) failed: \(error.message)"
            return CallTool.Result(content: [.text(text: text, annotations: nil, _meta: nil)], isError: true)
        }
    }
}

/// agentd's tool catalog, fetched on first use and kept once fetched.
private actor Catalog {
    let client: AgentdClient
    private var cached: [Tool]?

    init(client: AgentdClient) { self.client = client }

    /// - Throws: `AgentdClientError` when agentd cannot be asked.
    func tools() async throws -> [Tool] {
        if let cached { return cached }
        let tools = try await client.tools().map { tool in
            Tool(name: tool.name, description: tool.description, inputSchema: try JSONDecoder().decode(Value.self, from: tool.inputSchema))
        }
        cached = tools
        return tools
    }
}

/// Why a session cannot be served; `description` says what to do.
public struct AgentdMCPError: Error, Sendable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

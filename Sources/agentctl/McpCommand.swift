import AgentdClient
import AgentdMCP
import ArgumentParser
import CurlHTTP
import Foundation
import Logging

/// `agentctl mcp ID`: a session's tools as an MCP server on stdio.
struct Mcp: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a session's tools over MCP (stdio), so that any MCP-capable harness can use agentd's Hands.",
        discussion: """
            Takes the session's lease (wake; or --epoch N to use a lease already taken), then answers \
            tools/list (bash, read_file, write_file, list_files, with JSON Schemas; no sandbox is made for \
            listing) and runs every tools/call as one execute on the task's sandbox, journaled in the \
            session. A failing tool or a refused call (another Brain woke the session) is a result with \
            isError. stdout carries only JSON-RPC; logs go to stderr. At the end of stdin the calls in \
            flight are answered, then it exits 0. An unknown session exits 1 before serving.

            Register it in a harness's MCP configuration, for example:

              {
                "mcpServers": {
                  "agentd": {
                    "command": "agentctl",
                    "args": ["mcp", "SESSION_ID", "--socket", "/run/agentd/agentd.sock"]
                  }
                }
              }

            Create the session first: `agentctl session create` prints its id.
            """)

    @Argument(help: "Session id.") var id: String
    @Option(help: "Lease epoch from an earlier `wake`; without it the server takes the session over with a new one.")
    var epoch: UInt64?
    @Option(help: "Task within the session whose sandbox runs the tools.") var task: String = "main"
    @Option(help: "agentd's API socket.") var socket: String = AgentdClient.defaultSocket

    func run() async throws {
        CurlTransport.globalInit()
        // A harness that goes away closes our stdout: a failed write, not a signal, must say so.
        signal(SIGPIPE, SIG_IGN)
        var logger = Logger(label: "agentctl.mcp") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .info
        let server = SessionToolServer(client: AgentdClient(socket: socket), session: id, task: task, logger: logger)
        do {
            try await server.serve(epoch: try await server.lease(epoch: epoch))
        } catch let error as AgentdMCPError {
            FileHandle.standardError.write(Data("agentctl mcp: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}

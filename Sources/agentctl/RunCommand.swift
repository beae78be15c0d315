import AgentdClient
import ArgumentParser
import Brain
import CurlHTTP
import Foundation
import Logging

/// `agentctl run`: a Brain — the model and its harness loop — driving a session.
struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a Brain: the model and its harness loop, using a session's tools until the model answers.",
        discussion: """
            Creates a session (with --policy) unless --session names one, takes its lease (wake), and \
            loops: ask the model (Anthropic Messages API) with the session's tools; run each tool call \
            it asks for through agentd (journaled, with the tool_use id as idempotency key); send the \
            results back; until the model ends its turn. Progress (one line per tool call) goes to \
            stderr, the answer to stdout.

            The conversation is checkpointed into the session after every model turn and every round \
            of tool results. `agentctl run --session ID` continues it from another process after a \
            crash: calls that already ran are answered from agentd's journal, not run again; a \
            finished conversation prints its answer without asking the model again; with a PROMPT \
            it asks a follow-up. Model calls that fail with 429, 529, 5xx or a transport error are \
            retried as the session policy's brain.retries and brain.backoff say.

            The API key comes from $ANTHROPIC_API_KEY and goes only to the model API: never to \
            agentd, the journal, logs or messages. --scripted FILE plays back assistant turns from a \
            JSON array instead (no key, no network), e.g. \
            [{"content": [{"type": "tool_use", "id": "t1", "name": "bash", "input": {"command": "uname -a"}}]}, \
            {"content": [{"type": "text", "text": "done"}]}].

            Examples:
              export ANTHROPIC_API_KEY=…
              agentctl run --policy coding-agent "Count the lines of /etc/passwd"
              agentctl run --session SESSION_ID      # resume it after a crash
            """)

    @Argument(help: "The task for the model (for --session: a follow-up question; omit it to resume).")
    var prompt: String?
    @Option(help: "Continue this session's conversation instead of creating a session.") var session: String?
    @Option(help: "Policy of the new session (default: agentd's default).") var policy: String?
    @Option(help: "Model name (default: $ANTHROPIC_MODEL, else \(AnthropicClient.defaultModel)).") var model: String?
    @Option(help: "Messages API base URL (default: $ANTHROPIC_BASE_URL, else \(AnthropicClient.defaultBaseURL)).") var modelURL: String?
    @Option(help: "Play back assistant turns from this JSON file instead of calling a model.") var scripted: String?
    @Option(help: "Model turns this run may take before it stops without an answer.") var maxTurns: Int = 50
    @OptionGroup var options: ClientOptions

    func validate() throws {
        if prompt == nil && session == nil { throw ValidationError("give a PROMPT, or --session ID to resume a session") }
        if policy != nil && session != nil { throw ValidationError("--policy is for a new session; --session ID keeps its own policy") }
        if maxTurns < 1 { throw ValidationError("--max-turns must be at least 1") }
    }

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        let logger = Logger(label: "agentctl.run") { _ in ProgressLogHandler() }
        let client = options.client
        var opened: BrainSession?
        do {
            // The model is settled before anything is asked of agentd: no session for a run that cannot start.
            let makeModel: (RetryPolicy) -> any Model
            if let scripted {
                let script = try ScriptedModel(path: scripted)
                makeModel = { _ in script }
            } else if let key = APIKey.fromEnvironment(environment) {
                let baseURL = modelURL ?? environment["ANTHROPIC_BASE_URL"] ?? AnthropicClient.defaultBaseURL
                let name = model ?? environment["ANTHROPIC_MODEL"] ?? AnthropicClient.defaultModel
                makeModel = { AnthropicClient(key: key, baseURL: baseURL, model: name, retry: $0, logger: logger) }
            } else {
                throw agentctlFailure("set ANTHROPIC_API_KEY to your Anthropic API key (or give --scripted FILE to play back a script)")
            }
            let brainSession =
                if let session {
                    try await BrainSession.resume(client: client, id: session, prompt: prompt, logger: logger)
                } else {
                    try await BrainSession.start(client: client, policy: policy, prompt: prompt ?? "", logger: logger)
                }
            opened = brainSession
            logger.info("session \(brainSession.id) (policy \(brainSession.policy), lease epoch \(brainSession.epoch))")
            let harness = Harness(
                client: client, session: brainSession.id, epoch: brainSession.epoch, model: makeModel(brainSession.retry),
                tools: try await client.tools(), logger: logger, outputLine: ProgressLogHandler.showOutputLine)
            let outcome = try await harness.run(brainSession.conversation, maxTurns: maxTurns)
            if options.json {
                printJSON(RunSummary(session: brainSession.id, epoch: brainSession.epoch, turns: outcome.turns, answer: outcome.answer))
            } else {
                print(outcome.answer)
            }
        } catch let error as BrainError {
            var message = error.message
            if let opened, error.isResumable { message += "\nthe conversation is kept: continue it with `agentctl run --session \(opened.id)`" }
            throw agentctlFailure(message)
        } catch let error as AgentdClientError {
            throw agentctlFailure(error.message)
        }
    }
}

/// `agentctl run --json`: where the conversation is kept and how it ended.
struct RunSummary: Encodable {
    var session: String
    var epoch: UInt64
    var turns: Int
    var answer: String
}

/// Prints a Brain's progress on stderr as plain lines (`run: …`), warnings marked as such.
struct ProgressLogHandler: LogHandler {
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let prefix = event.level >= .warning ? "run: \(event.level): " : "run: "
        // On a terminal, the line replaces the command's latest output line (see below).
        FileHandle.standardError.write(Data(((Self.onTerminal ? "\r\u{1B}[K" : "") + prefix + event.message.description + "\n").utf8))
    }

    static let onTerminal = isatty(STDERR_FILENO) == 1

    /// A tool call's output line as it comes: on a terminal, one progress line showing the
    /// latest output line (overwritten by the next, and by the call's own line when it ends);
    /// elsewhere (a log), each line as `run:   │ …`. Lines are cut at 160 characters.
    @Sendable static func showOutputLine(_ line: String) {
        let clean = String(line.unicodeScalars.filter { $0.value >= 0x20 && $0.value != 0x7F || $0 == "\t" }.map(Character.init).prefix(160))
        if onTerminal {
            FileHandle.standardError.write(Data("\r\u{1B}[Krun:   │ \(clean)".utf8))
        } else {
            FileHandle.standardError.write(Data("run:   │ \(clean)\n".utf8))
        }
    }
}

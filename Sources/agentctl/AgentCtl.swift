import AgentdAPI
import AgentdClient
import ArgumentParser
import CurlHTTP
import Foundation
import Synchronization
import JSONValues

@main
struct AgentCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agentctl",
        abstract: "Control agentd: sessions, tool calls, leases, verification, policies, images, pools, sandboxes, MCP.",
        discussion: """
            Talks to agentd over its unix socket (--socket, or $AGENTD_SOCKET, default /run/agentd/agentd.sock). \
            Every command takes --json for machine-readable output; --socket and --json may also come before \
            the command (agentctl --json session list). Errors go to stderr with what to do, exit status 1. \
            Shell completion: `agentctl --generate-completion-script bash|zsh|fish`.

            A session from start to end:
              id=$(agentctl session create)            # no sandbox yet
              agentctl exec $id bash '{"command": "uname -a"}'
              agentctl session events $id --follow      # live timeline
              agentctl task end $id                     # the sandbox goes
            """,
        subcommands: [
            SessionCommand.self, Exec.self, Wake.self, Checkpoint.self, Verify.self, TaskCommand.self, Health.self, PolicyCommand.self,
            ImageCommand.self, PoolCommand.self, SandboxesCommand.self, Mcp.self, Run.self,
        ])

    /// `agentctl [--socket PATH] [--json] COMMAND …`: the options every command takes may
    /// also come before the command; they are moved behind it for the parser.
    static func main() async {
        await main(hoistingGlobalOptions(Array(CommandLine.arguments.dropFirst())))
    }

    /// Moves `--socket PATH`, `--socket=PATH` and `--json` given before the first command word
    /// to the end of the arguments (before a `--`, which ends the options).
    static func hoistingGlobalOptions(_ arguments: [String]) -> [String] {
        var global: [String] = []
        var i = 0
        while i < arguments.count {
            let a = arguments[i]
            if a == "--json" || a.hasPrefix("--socket=") {
                global.append(a)
                i += 1
            } else if a == "--socket", i + 1 < arguments.count {
                global += [a, arguments[i + 1]]
                i += 2
            } else {
                break
            }
        }
        guard !global.isEmpty, i < arguments.count else { return arguments }
        var rest = Array(arguments[i...])
        let end = rest.firstIndex(of: "--") ?? rest.count
        rest.insert(contentsOf: global, at: end)
        return rest
    }
}

/// Options every command that talks to agentd takes.
struct ClientOptions: ParsableArguments {
    @Option(help: "agentd's API socket.")
    var socket: String = AgentdClient.defaultSocket

    @Flag(help: "Print the API's JSON answer instead of text.")
    var json = false

    var client: AgentdClient {
        CurlTransport.globalInit()
        return AgentdClient(socket: socket)
    }
}

/// Runs `body`, turning agentd's errors into a message on stderr and exit status 1.
func guarded(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as AgentdClientError {
        throw agentctlFailure(error.message)
    }
}

/// Prints `message` on stderr as agentctl's error and returns exit status 1 to throw.
func agentctlFailure(_ message: String) -> ExitCode {
    FileHandle.standardError.write(Data("agentctl: \(message)\n".utf8))
    return .failure
}

/// Prints an API answer as indented JSON with sorted keys (`--json`).
func printJSON(_ value: some Encodable) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
    print(String(decoding: data, as: UTF8.self))
}

/// The lease epoch to send: `--epoch`, else `$AGENTD_EPOCH`.
/// - Throws: `ValidationError` when `$AGENTD_EPOCH` is not an integer.
func leaseEpoch(_ option: UInt64?) throws -> UInt64? {
    if let option { return option }
    guard let text = ProcessInfo.processInfo.environment["AGENTD_EPOCH"], !text.isEmpty else { return nil }
    guard let epoch = UInt64(text) else {
        throw ValidationError("AGENTD_EPOCH='\(text)' is not a lease epoch: set it to the number `agentctl wake ID` printed")
    }
    return epoch
}

/// Runs `body` like `guarded`, adding how to pass the epoch when agentd refuses a call
/// because the session was woken and this call carried none (409).
func fenced(_ id: String, epoch: UInt64?, _ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as AgentdClientError where error.status == 409 && epoch == nil {
        throw agentctlFailure(
            "\(error.message) — this call carried no lease epoch: pass the one `agentctl wake \(id)` printed with --epoch N "
                + "(or set AGENTD_EPOCH=N); `agentctl session show \(id)` shows the current one")
    } catch let error as AgentdClientError {
        throw agentctlFailure(error.message)
    }
}

struct SessionCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "session", abstract: "Create, list, inspect and delete sessions.",
        subcommands: [Create.self, List.self, Show.self, Events.self, Delete.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a session (no sandbox yet: Hands come with the first tool call).")
        @OptionGroup var options: ClientOptions
        @Option(help: "Policy name (default: default).") var policy: String?
        @Option(help: "Session id (default: generated).") var id: String?

        func run() async throws {
            try await guarded {
                let session = try await options.client.createSession(policy: policy, id: id)
                if options.json { printJSON(session) } else { print(session.id) }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List sessions.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            try await guarded {
                let sessions = try await options.client.sessions()
                if options.json { return printJSON(SessionList(sessions: sessions)) }
                print("ID".padding(toLength: 24, withPad: " ", startingAt: 0) + "POLICY".padding(toLength: 16, withPad: " ", startingAt: 0) + "EVENTS  EPOCH  LIVE TASKS")
                for r in sessions {
                    let id = r.id.padding(toLength: 24, withPad: " ", startingAt: 0)
                    let policy = r.policy.padding(toLength: 16, withPad: " ", startingAt: 0)
                    let events = "\(r.lastSeq)".padding(toLength: 8, withPad: " ", startingAt: 0)
                    let epoch = "\(r.leaseEpoch)".padding(toLength: 7, withPad: " ", startingAt: 0)
                    let live = r.liveTasks.joined(separator: ",")
                    print(id + policy + events + epoch + (live.isEmpty ? "-" : live))
                }
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one session.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "Session id.") var id: String

        func run() async throws {
            try await guarded {
                let session = try await options.client.session(id)
                if options.json { return printJSON(session) }
                print("session     \(session.id)")
                print("policy      \(session.policy)")
                print("events      \(session.lastSeq)")
                print("lease epoch \(session.leaseEpoch)")
                print("live tasks  \(session.liveTasks.isEmpty ? "none" : session.liveTasks.joined(separator: ", "))")
                if session.deleted { print("deleted     yes (events stay readable; changes are refused)") }
                if let damage = session.damage { print("DAMAGED     \(damage)") }
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a session: its sandboxes, workspaces and slices are removed.",
            discussion: """
                The journal stays append-only: `session.deleted` is recorded and the session's events and \
                verify keep working, while execute, wake, checkpoint and task end are refused (410). \
                `agentd --retention DURATION` deletes idle sessions the same way.
                """)
        @OptionGroup var options: ClientOptions
        @Argument(help: "Session id.") var id: String
        @Option(help: "Lease epoch; when given it must be the current one (default: $AGENTD_EPOCH).") var epoch: UInt64?

        func run() async throws {
            let epoch = try leaseEpoch(epoch)
            try await guarded {
                let deleted = try await options.client.deleteSession(id, epoch: epoch)
                if options.json { return printJSON(deleted) }
                print("session \(deleted.session) deleted (event \(deleted.deletedSeq))")
            }
        }
    }

    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a session's events as a timeline; --follow keeps printing new ones.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "Session id.") var id: String
        @Option(help: "Only events after this sequence number.") var after: UInt64 = 0
        @Flag(help: "Keep following new events live (server-sent events).") var follow = false

        func run() async throws {
            try await guarded {
                if follow {
                    let json = options.json
                    try await options.client.followEvents(id, after: after) { event, data in
                        print(json ? data : Timeline.line(event))
                        fflush(nil)
                    }
                    return
                }
                let events = try await options.client.events(id, after: after)
                if options.json { return printJSON(EventList(events: events)) }
                for event in events { print(Timeline.line(event)) }
            }
        }
    }
}

struct Exec: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a tool in a session's task sandbox; prints the tool's result (exit status 1 when it is an error).",
        discussion: """
            Tools: bash {"command": …, "timeout_s"?, "cwd"?}, read_file {"path": …, "encoding"?}, \
            write_file {"path": …, "content": …, "encoding"?}, list_files {"path"?}.
            Example: agentctl exec $ID bash '{"command": "ls -la"}'
            agentctl waits for the answer as long as the command may run (its timeout_s, else the \
            session policy's command timeout) plus a minute for provisioning.
            """)
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String
    @Argument(help: "Tool name.") var tool: String
    @Argument(help: "Tool input as a JSON object.") var input: String = "{}"
    @Option(help: "Task within the session (each task has its own sandbox).") var task: String = "main"
    @Option(help: "Lease epoch from `wake` (default: $AGENTD_EPOCH); a stale one is refused.") var epoch: UInt64?
    @Option(help: "Idempotency key: a retried call with the same key returns the first result.") var idempotencyKey: String?

    func run() async throws {
        guard let value = try? JSONValue(data: Data(input.utf8)), case .object = value else {
            throw ValidationError(#"INPUT must be a JSON object, e.g. '{"command": "ls"}'"#)
        }
        let epoch = try leaseEpoch(epoch)
        var failed = false
        try await fenced(id, epoch: epoch) {
            let client = options.client
            let timeout = await client.answerTimeout(forInput: value, session: id)
            if options.json {
                let result = try await client.execute(
                    session: id, tool: tool, input: Data(input.utf8), task: task, epoch: epoch, idempotencyKey: idempotencyKey, timeout: timeout)
                failed = result.isError
                return printJSON(result.response)
            }
            // The output as it comes: stdout to stdout, stderr to stderr.
            let printer = StreamPrinter()
            let result = try await client.executeStreaming(
                session: id, tool: tool, input: Data(input.utf8), task: task, epoch: epoch, idempotencyKey: idempotencyKey, timeout: timeout,
                onUpdate: printer.show)
            failed = result.isError
            print(printer.rest(of: result.output), terminator: "")
        }
        if failed { throw ExitCode.failure }
    }

}

struct Wake: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a session over: get a lease with a new fencing epoch (older epochs are refused from now on).",
        discussion: "Pass the printed epoch to later calls with --epoch N, or export AGENTD_EPOCH=N.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String

    func run() async throws {
        try await guarded {
            let lease = try await options.client.wake(id)
            if options.json { printJSON(lease) } else { print(lease.epoch) }
        }
    }
}

struct Checkpoint: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Store a Brain's state; `getSession` replays from the last checkpoint.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String
    @Argument(help: "State as JSON (any value but null).") var state: String
    @Option(help: "Lease epoch (default: $AGENTD_EPOCH).") var epoch: UInt64?

    func run() async throws {
        guard let parsed = try? JSONValue(data: Data(state.utf8)) else {
            throw ValidationError(#"STATE must be JSON, e.g. '{"step": 3}' or '"hello"'"#)
        }
        let epoch = try leaseEpoch(epoch)
        try await fenced(id, epoch: epoch) {
            let stored = try await options.client.checkpoint(id, state: parsed, epoch: epoch)
            if options.json { printJSON(stored) } else { print(stored.seq) }
        }
    }
}

struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Walk a session's hash chain; exit status 1 when a link is broken.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String

    func run() async throws {
        var intact = true
        try await guarded {
            let report = try await options.client.verify(id)
            intact = report.intact
            if options.json { return printJSON(report) }
            if let b = report.firstBroken {
                print("BROKEN at seq \(b.seq) (\(b.segment) offset \(b.offset)): \(b.reason)")
            } else {
                print("intact: \(report.verifiedRecords) records, chain head \(report.lastHash.prefix(16))…")
            }
        }
        if !intact { throw ExitCode.failure }
    }
}

struct TaskCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "task", abstract: "End a task (its sandbox is released).", subcommands: [End.self])

    struct End: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "End a task of a session.")
        @OptionGroup var options: ClientOptions
        @Argument(help: "Session id.") var id: String
        @Argument(help: "Task name.") var task: String = "main"
        @Option(help: "Lease epoch (default: $AGENTD_EPOCH).") var epoch: UInt64?

        func run() async throws {
            let epoch = try leaseEpoch(epoch)
            try await fenced(id, epoch: epoch) {
                let ended = try await options.client.endTask(id, task: task, epoch: epoch)
                if options.json { return printJSON(ended) }
                print(ended.releasedSandbox ? "task \(task) ended; its sandbox was removed" : "task \(task) ended (it had no sandbox)")
            }
        }
    }
}

struct Health: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show whether agentd is up, with its sessions, sandboxes, policy errors, Session store, and (in a fleet) the nodes.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        try await guarded {
            let health = try await options.client.health()
            if options.json { return printJSON(health) }
            print("status     \(health.status)")
            print("sessions   \(health.sessions)")
            print("sandboxes  \(health.sandboxes.live) live, \(health.sandboxes.pooled) pooled")
            print("policies   \(health.policies.loaded.joined(separator: ", "))")
            for e in health.policies.errors { print("  error: \(e)") }
            if let store = health.store {
                let state = store.ok ? "ok" : "NOT ANSWERING: \(store.error ?? "?")"
                print("store      \(store.kind), \(state) (\(String(format: "%.1f", store.latencyMs)) ms)")
            }
            if let nodes = health.nodes {
                print("nodes      \(nodes.filter(\.live).count) live of \(nodes.count)")
                for n in nodes {
                    let beat = String(format: "%.1f", n.sinceHeartbeatSeconds)
                    let missed = n.missedHeartbeats > 0 ? ", \(n.missedHeartbeats) heartbeats missed" : ""
                    print("  \(n.this ? "*" : " ") \(n.name)  \(n.live ? "live" : "DEAD")  last heartbeat \(beat) s ago\(missed)  \(n.address)")
                }
            }
        }
    }
}

/// Prints a streaming execute's output as it comes, and then what of the result it did not
/// show yet.
final class StreamPrinter: Sendable {
    /// Whether any output was shown, and whether stdout's last byte was a newline.
    private let state = Mutex((streamed: false, atLineStart: true))

    func show(_ update: AgentdClient.ExecuteUpdate) {
        switch update {
        case .output(let stream, let bytes):
            state.withLock {
                $0.streamed = true
                if stream != "stderr", let last = bytes.last { $0.atLineStart = last == 10 }
            }
            (stream == "stderr" ? FileHandle.standardError : FileHandle.standardOutput).write(Data(bytes))
        case .dropped(_, let message):
            FileHandle.standardError.write(Data("[agentctl: \(message)]\n".utf8))
        }
    }

    /// What to print once the result is in: the whole output when nothing was streamed (a
    /// replay, a tool other than bash, a failure), else only the notes the result ends with
    /// (`[exit code 2]`, `[output cut: …]`, `[command timed out …]`).
    func rest(of output: String) -> String {
        let (streamed, atLineStart) = state.withLock { ($0.streamed, $0.atLineStart) }
        guard streamed else { return output.isEmpty || output.hasSuffix("\n") ? output : output + "\n" }
        let lines = output.split(separator: "\n", omittingEmptySubsequences: false)
        let notes = lines.reversed().prefix { $0.hasPrefix("[") && $0.hasSuffix("]") && !$0.hasPrefix("[stderr]") }.reversed()
        return notes.isEmpty ? "" : (atLineStart ? "" : "\n") + notes.joined(separator: "\n") + "\n"
    }
}

import AgentdClient
import ArgumentParser
import CurlHTTP
import Foundation

@main
struct AgentCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agentctl",
        abstract: "Control agentd: sessions, tool calls, leases, verification, policies, images, pools, MCP.",
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
            ImageCommand.self, PoolCommand.self, Mcp.self, Run.self,
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

func printJSONObject(_ object: Any) {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? Data()
    print(String(decoding: data, as: UTF8.self))
}


struct SessionCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "session", abstract: "Create, list and inspect sessions.", subcommands: [Create.self, List.self, Show.self, Events.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a session (no sandbox yet: Hands come with the first tool call).")
        @OptionGroup var options: ClientOptions
        @Option(help: "Policy name (default: default).") var policy: String?
        @Option(help: "Session id (default: generated).") var id: String?

        func run() async throws {
            try await guarded {
                var body: [String: Any] = [:]
                if let policy { body["policy"] = policy }
                if let id { body["id"] = id }
                let reply = try await options.client.post("/v1/sessions", body)
                if options.json { printJSONObject(reply.json) } else { print(reply["id"] as? String ?? "") }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List sessions.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            try await guarded {
                let reply = try await options.client.get("/v1/sessions")
                if options.json { return printJSONObject(reply.json) }
                let rows = (reply["sessions"] as? [[String: Any]]) ?? []
                print("ID".padding(toLength: 24, withPad: " ", startingAt: 0) + "POLICY".padding(toLength: 16, withPad: " ", startingAt: 0) + "EVENTS  EPOCH  LIVE TASKS")
                for r in rows {
                    let id = (r["id"] as? String ?? "").padding(toLength: 24, withPad: " ", startingAt: 0)
                    let policy = (r["policy"] as? String ?? "").padding(toLength: 16, withPad: " ", startingAt: 0)
                    let events = "\(r["last_seq"] ?? 0)".padding(toLength: 8, withPad: " ", startingAt: 0)
                    let epoch = "\(r["lease_epoch"] ?? 0)".padding(toLength: 7, withPad: " ", startingAt: 0)
                    let live = ((r["live_tasks"] as? [String]) ?? []).joined(separator: ",")
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
                let reply = try await options.client.get("\(AgentdClient.sessionPath(id))")
                if options.json { return printJSONObject(reply.json) }
                print("session     \(reply["id"] ?? id)")
                print("policy      \(reply["policy"] ?? "")")
                print("events      \(reply["last_seq"] ?? 0)")
                print("lease epoch \(reply["lease_epoch"] ?? 0)")
                let live = (reply["live_tasks"] as? [String]) ?? []
                print("live tasks  \(live.isEmpty ? "none" : live.joined(separator: ", "))")
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
                let path = "\(AgentdClient.sessionPath(id))/events?after=\(after)"
                if follow {
                    let json = options.json
                    try await options.client.follow(path + "&follow=true") { _, data in
                        guard let event = (try? JSONSerialization.jsonObject(with: Data(data.utf8))) as? [String: Any] else { return }
                        print(json ? data : Timeline.line(event))
                        fflush(nil)
                    }
                    return
                }
                let reply = try await options.client.get(path)
                if options.json { return printJSONObject(reply.json) }
                for event in (reply["events"] as? [[String: Any]]) ?? [] { print(Timeline.line(event)) }
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
            """)
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String
    @Argument(help: "Tool name.") var tool: String
    @Argument(help: "Tool input as a JSON object.") var input: String = "{}"
    @Option(help: "Task within the session (each task has its own sandbox).") var task: String = "main"
    @Option(help: "Lease epoch from `wake`; a stale one is refused.") var epoch: UInt64?
    @Option(help: "Idempotency key: a retried call with the same key returns the first result.") var idempotencyKey: String?

    func run() async throws {
        var failed = false
        try await guarded {
            let result = try await options.client.execute(
                session: id, tool: tool, input: Data(input.utf8), task: task, epoch: epoch, idempotencyKey: idempotencyKey)
            failed = result.isError
            if options.json { return printJSONObject(result.reply.json) }
            print(result.output, terminator: result.output.hasSuffix("\n") ? "" : "\n")
        }
        if failed { throw ExitCode.failure }
    }
}

struct Wake: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Take a session over: get a lease with a new fencing epoch (older epochs are refused from now on).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String

    func run() async throws {
        try await guarded {
            let reply = try await options.client.post("\(AgentdClient.sessionPath(id))/wake")
            if options.json { printJSONObject(reply.json) } else { print(reply["epoch"] ?? 0) }
        }
    }
}

struct Checkpoint: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Store a Brain's state; `getSession` replays from the last checkpoint.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Session id.") var id: String
    @Argument(help: "State as JSON.") var state: String
    @Option(help: "Lease epoch.") var epoch: UInt64?

    func run() async throws {
        guard let parsed = try? JSONSerialization.jsonObject(with: Data(state.utf8), options: [.fragmentsAllowed]) else {
            throw ValidationError("STATE must be JSON")
        }
        try await guarded {
            var body: [String: Any] = ["state": parsed]
            if let epoch { body["epoch"] = epoch }
            let reply = try await options.client.post("\(AgentdClient.sessionPath(id))/checkpoint", body)
            if options.json { printJSONObject(reply.json) } else { print(reply["seq"] ?? 0) }
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
            let reply = try await options.client.get("\(AgentdClient.sessionPath(id))/verify")
            intact = (reply["intact"] as? Bool) == true
            if options.json { return printJSONObject(reply.json) }
            if intact {
                print("intact: \(reply["verified_records"] ?? 0) records, chain head \(String((reply["last_hash"] as? String ?? "").prefix(16)))…")
            } else {
                let b = reply["first_broken"] as? [String: Any] ?? [:]
                print("BROKEN at seq \(b["seq"] ?? "?") (\(b["segment"] ?? "?") offset \(b["offset"] ?? "?")): \(b["reason"] ?? "")")
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
        @Option(help: "Lease epoch.") var epoch: UInt64?

        func run() async throws {
            try await guarded {
                var body: [String: Any] = [:]
                if let epoch { body["epoch"] = epoch }
                let reply = try await options.client.post("\(AgentdClient.sessionPath(id))/tasks/\(AgentdClient.pathComponent(task))/end", body)
                if options.json { printJSONObject(reply.json) } else {
                    print((reply["released_sandbox"] as? Bool) == true ? "task \(task) ended; its sandbox was removed" : "task \(task) ended (it had no sandbox)")
                }
            }
        }
    }
}

struct Health: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show whether agentd is up, with its sessions, sandboxes and policy errors.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        try await guarded {
            let reply = try await options.client.get("/v1/health")
            if options.json { return printJSONObject(reply.json) }
            let sandboxes = reply["sandboxes"] as? [String: Any] ?? [:]
            let policies = reply["policies"] as? [String: Any] ?? [:]
            print("status     \(reply["status"] ?? "?")")
            print("sessions   \(reply["sessions"] ?? 0)")
            print("sandboxes  \(sandboxes["live"] ?? 0) live, \(sandboxes["pooled"] ?? 0) pooled")
            print("policies   \(((policies["loaded"] as? [String]) ?? []).joined(separator: ", "))")
            for e in (policies["errors"] as? [String]) ?? [] { print("  error: \(e)") }
        }
    }
}

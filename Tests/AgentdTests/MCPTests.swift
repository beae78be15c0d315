import AgentdClient
import AgentdTestSupport
import Foundation
import Synchronization
import Testing
import TestSupport

/// `agentctl mcp` as a harness runs it: a child process speaking newline-delimited JSON-RPC
/// on its stdin and stdout, against a real agentd with real Podman sandboxes.
@Suite("agentctl mcp serves a session's tools")
struct MCPTests {
    @Test("a harness lists the tools without a sandbox, calls them, sees failures as results; the journal has every call; a stale lease is a result; EOF exits 0")
    func harness() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            let mcp = try MCPProcess.start(session: id, socket: agentd.socket)
            defer { mcp.kill() }

            let initialized = try await mcp.initialize()
            #expect((initialized["serverInfo"] as? [String: Any])?["name"] as? String == "agentd")
            #expect((initialized["capabilities"] as? [String: Any])?["tools"] != nil)

            let tools = try #require(try await mcp.result(of: "tools/list")["tools"] as? [[String: Any]])
            #expect(Set(tools.compactMap { $0["name"] as? String }) == ["bash", "read_file", "write_file", "list_files"])
            let bash = try #require(tools.first { $0["name"] as? String == "bash" })
            let schema = try #require(bash["inputSchema"] as? [String: Any])
            #expect(schema["type"] as? String == "object")
            #expect(schema["required"] as? [String] == ["command"])
            #expect(Set(((schema["properties"] as? [String: Any]) ?? [:]).keys) == ["command", "timeout_s", "cwd"])
            #expect(schema["additionalProperties"] as? Bool == false)
            #expect(try await sandboxes(agentd.instance, session: id) == 0, "listing tools made no sandbox")

            let write = try await mcp.call("write_file", ["path": "app/hi.sh", "content": "echo hi from $1\n"])
            #expect(write == ToolOutcome(text: "wrote 16 bytes to app/hi.sh", isError: false))
            #expect(try await sandboxes(agentd.instance, session: id) == 1, "the first call provisioned the task's sandbox")
            #expect(try await mcp.call("bash", ["command": "sh app/hi.sh mcp"]) == ToolOutcome(text: "hi from mcp\n", isError: false))
            #expect(try await mcp.call("read_file", ["path": "app/hi.sh"]) == ToolOutcome(text: "echo hi from $1\n", isError: false))

            let failing = try await mcp.call("bash", ["command": "cat /no/such/file"])
            #expect(failing.isError)
            #expect(failing.text.contains("No such file") && failing.text.contains("[exit code 1]"), "\(failing.text)")

            let badInput = try await mcp.call("bash", ["cmd": "ls"])
            #expect(badInput.isError)
            #expect(badInput.text.contains("missing field 'command'"), "\(badInput.text)")

            let unknown = try await mcp.response(to: "tools/call", ["name": "rm_rf", "arguments": [:]])
            let error = try #require(unknown["error"] as? [String: Any], "an unknown tool is a JSON-RPC error")
            #expect((error["code"] as? NSNumber)?.intValue == -32602)
            #expect((error["message"] as? String)?.contains("bash, read_file, write_file, list_files") == true, "\(error)")

            // The journal has each call that ran (the bad input was refused before it).
            let events = (try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]]) ?? []
            let intents = events.filter { $0["type"] as? String == "tool.intent" }.compactMap { $0["payload"] as? [String: Any] }
            let results = events.filter { $0["type"] as? String == "tool.result" }.compactMap { $0["payload"] as? [String: Any] }
            #expect(intents.compactMap { $0["tool"] as? String } == ["write_file", "bash", "read_file", "bash"])
            #expect(results.compactMap { $0["output"] as? String }.dropFirst().first == "hi from mcp\n")
            let keys = intents.compactMap { $0["idempotency_key"] as? String }
            #expect(keys.count == 4 && Set(keys).count == 4, "each call has an idempotency key of its own: \(keys)")

            // Another Brain takes the session over: this server's next call is refused, as a result.
            let epoch = try #require((try await c.post("/v1/sessions/\(id)/wake")["epoch"] as? NSNumber)?.uint64Value)
            let stale = try await mcp.call("bash", ["command": "echo late"])
            #expect(stale.isError)
            #expect(stale.text.contains("stale"), "\(stale.text)")

            mcp.closeInput()
            #expect(try await mcp.exitStatus() == 0)

            // The new lease holder, given --epoch: a call in flight when stdin ends is still answered.
            let next = try MCPProcess.start(session: id, socket: agentd.socket, arguments: ["--epoch", "\(epoch)"])
            defer { next.kill() }
            _ = try await next.initialize()
            try next.send(["jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": ["name": "bash", "arguments": ["command": "sleep 1; echo finished"]]])
            next.closeInput()
            let answer = try await next.message(id: 9)
            #expect(ToolOutcome(answer["result"]) == ToolOutcome(text: "finished\n", isError: false))
            #expect(try await next.exitStatus() == 0)
            #expect(next.stdoutExtra.isEmpty, "nothing but JSON-RPC on stdout")
        }
    }

    @Test("a tools/call with a progressToken gets the command's output as notifications/progress before its result")
    func progressNotifications() async throws {
        try await withAgentd { agentd in
            let id = try #require(try await agentd.client.post("/v1/sessions", [:])["id"] as? String)
            let mcp = try MCPProcess.start(session: id, socket: agentd.socket)
            defer { mcp.kill() }
            _ = try await mcp.initialize()
            try mcp.send([
                "jsonrpc": "2.0", "id": 5, "method": "tools/call",
                "params": ["name": "bash", "arguments": ["command": "for i in 1 2 3; do echo line$i; sleep 0.1; done"], "_meta": ["progressToken": "p-1"]],
            ])
            let (notifications, response) = try await mcp.messages(until: 5)
            #expect(ToolOutcome(response["result"]) == ToolOutcome(text: "line1\nline2\nline3\n", isError: false))
            let progress = notifications.filter { $0["method"] as? String == "notifications/progress" }.compactMap { $0["params"] as? [String: Any] }
            #expect(!progress.isEmpty, "progress came before the result: \(notifications)")
            #expect(progress.allSatisfy { $0["progressToken"] as? String == "p-1" })
            #expect(progress.compactMap { $0["message"] as? String }.joined() == "line1\nline2\nline3\n", "\(progress)")
            let values = progress.compactMap { ($0["progress"] as? NSNumber)?.doubleValue }
            #expect(values == values.sorted() && values.last == 18, "progress counts the bytes so far: \(values)")
            // Without a token: no notifications.
            try mcp.send(["jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": ["name": "bash", "arguments": ["command": "echo quiet"]]])
            let (none, quiet) = try await mcp.messages(until: 6)
            #expect(ToolOutcome(quiet["result"]) == ToolOutcome(text: "quiet\n", isError: false))
            #expect(none.isEmpty, "\(none)")
        }
    }

    @Test("an unknown session, or an --epoch that is not the session's lease, exits 1 with the reason on stderr and nothing on stdout")
    func refusedAtStart() async throws {
        try await withAgentd { agentd in
            let unknown = try MCPProcess.start(session: "no-such-session", socket: agentd.socket)
            defer { unknown.kill() }
            #expect(try await unknown.exitStatus() == 1)
            #expect(unknown.stderr.contains("no session no-such-session"), "\(unknown.stderr)")
            #expect(unknown.stdout.isEmpty)

            let id = try #require(try await agentd.client.post("/v1/sessions", [:])["id"] as? String)
            let wrongEpoch = try MCPProcess.start(session: id, socket: agentd.socket, arguments: ["--epoch", "7"])
            defer { wrongEpoch.kill() }
            #expect(try await wrongEpoch.exitStatus() == 1)
            #expect(wrongEpoch.stderr.contains("epoch 7 is not session \(id)'s lease"), "\(wrongEpoch.stderr)")
            #expect(wrongEpoch.stdout.isEmpty)
        }
    }
}

/// A `tools/call` result as a harness sees it: the text and whether it is an error.
struct ToolOutcome: Equatable, CustomStringConvertible {
    let text: String
    let isError: Bool

    init(text: String, isError: Bool) {
        self.text = text
        self.isError = isError
    }

    init?(_ result: Any?) {
        guard let result = result as? [String: Any], let content = result["content"] as? [[String: Any]] else { return nil }
        text = content.compactMap { $0["text"] as? String }.joined()
        isError = result["isError"] as? Bool ?? false
    }

    var description: String { "\(isError ? "error" : "ok"): \(text.debugDescription)" }
}

/// `agentctl mcp` started with pipes on stdin, stdout and stderr; killed (and reaped) by
/// `kill()` if it has not exited, so that a failing test leaves no process behind.
final class MCPProcess: @unchecked Sendable {
    // Invariant: used by one test; `input` and `reaped` change only on that test's task.
    let pid: pid_t
    private var input: Int32
    private var reaped: Int32?
    private let output: PipeReader
    private let errors: PipeReader
    private var nextID = 100
    /// How long any one wait may take before the test fails instead of hanging.
    static let timeout: Duration = .seconds(120)

    private init(pid: pid_t, input: Int32, output: Int32, errors: Int32) {
        self.pid = pid
        self.input = input
        self.output = PipeReader(fd: output)
        self.errors = PipeReader(fd: errors)
    }

    static func start(session: String, socket: String, arguments: [String] = []) throws -> MCPProcess {
        let binary = try agentctlBinary()
        // Close-on-exec everywhere, so that no other child (agentd) holds a pipe open.
        var fds: [[Int32]] = []
        for _ in 0..<3 {
            var pair: [Int32] = [-1, -1]
            guard pipe(&pair) == 0 else { throw Components.Missing(description: "pipe: \(String(cString: strerror(errno)))") }
            pair.forEach { _ = fcntl($0, F_SETFD, FD_CLOEXEC) }
            fds.append(pair)
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[0][0], 0)
        posix_spawn_file_actions_adddup2(&actions, fds[1][1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[2][1], 2)
        let argv = [binary, "mcp", session, "--socket", socket] + arguments
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = ProcessInfo.processInfo.environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (cArgs + cEnv).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, binary, &actions, nil, cArgs, cEnv)
        // The child's ends are the child's now.
        close(fds[0][0])
        close(fds[1][1])
        close(fds[2][1])
        guard rc == 0 else {
            [fds[0][1], fds[1][0], fds[2][0]].forEach { close($0) }
            throw Components.Missing(description: "cannot start \(binary): \(String(cString: strerror(rc)))")
        }
        return MCPProcess(pid: pid, input: fds[0][1], output: fds[1][0], errors: fds[2][0])
    }

    /// Writes one JSON-RPC message as a line on the child's stdin.
    func send(_ message: [String: Any]) throws {
        var bytes = Array(try JSONSerialization.data(withJSONObject: message))
        bytes.append(10)
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { write(input, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Components.Missing(description: "writing to agentctl mcp's stdin: \(String(cString: strerror(errno))); stderr: \(stderr)") }
            offset += n
        }
    }

    /// The next message on stdout with `id`, skipping notifications.
    func message(id: Int) async throws -> [String: Any] {
        while true {
            guard let line = await output.nextLine(timeout: Self.timeout) else {
                throw Components.Missing(description: "agentctl mcp gave no answer to request \(id) within \(Self.timeout); stderr: \(stderr)")
            }
            let object = try #require(
                try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "stdout carries only JSON-RPC, not \(line.debugDescription)")
            #expect(object["jsonrpc"] as? String == "2.0")
            if (object["id"] as? NSNumber)?.intValue == id { return object }
        }
    }

    /// The messages on stdout up to the one with `id`: the notifications before it, and it.
    func messages(until id: Int) async throws -> (notifications: [[String: Any]], response: [String: Any]) {
        var notifications: [[String: Any]] = []
        while true {
            guard let line = await output.nextLine(timeout: Self.timeout) else {
                throw Components.Missing(description: "agentctl mcp gave no answer to request \(id) within \(Self.timeout); stderr: \(stderr)")
            }
            let object = try #require(
                try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "stdout carries only JSON-RPC, not \(line.debugDescription)")
            if (object["id"] as? NSNumber)?.intValue == id { return (notifications, object) }
            if object["id"] == nil { notifications.append(object) }
        }
    }

    /// Sends a request and returns the whole response (`result` or `error`).
    func response(to method: String, _ params: [String: Any] = [:]) async throws -> [String: Any] {
        nextID += 1
        try send(["jsonrpc": "2.0", "id": nextID, "method": method, "params": params])
        return try await message(id: nextID)
    }

    /// Sends a request and returns its result; a JSON-RPC error fails the test.
    func result(of method: String, _ params: [String: Any] = [:]) async throws -> [String: Any] {
        let response = try await response(to: method, params)
        return try #require(response["result"] as? [String: Any], "\(method) answered \(response)")
    }

    func call(_ tool: String, _ arguments: [String: Any]) async throws -> ToolOutcome {
        try #require(ToolOutcome(try await result(of: "tools/call", ["name": tool, "arguments": arguments])))
    }

    /// The MCP handshake: `initialize`, then `notifications/initialized`.
    func initialize() async throws -> [String: Any] {
        let result = try await result(
            of: "initialize", ["protocolVersion": "2025-06-18", "capabilities": [:], "clientInfo": ["name": "agentd-tests", "version": "1"]])
        try send(["jsonrpc": "2.0", "method": "notifications/initialized"])
        return result
    }

    /// Closes the child's stdin (end of input).
    func closeInput() {
        if input >= 0 { close(input) }
        input = -1
    }

    /// Waits until the child has closed its stdout and exited; its exit status.
    func exitStatus() async throws -> Int32 {
        guard await output.awaitEnd(timeout: Self.timeout), await errors.awaitEnd(timeout: Self.timeout) else {
            throw Components.Missing(description: "agentctl mcp did not exit within \(Self.timeout); stderr: \(stderr)")
        }
        // Its pipes are closed: it is exiting; reap it without blocking for long.
        var status: Int32 = 0
        for _ in 0..<1000 {
            if waitpid(pid, &status, WNOHANG) == pid {
                reaped = status
                break
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        guard let reaped else { throw Components.Missing(description: "agentctl mcp closed its output but did not exit") }
        return (reaped & 0x7f) == 0 ? (reaped >> 8) & 0xff : -(reaped & 0x7f)
    }

    var stdout: String { output.text }
    /// stdout not yet consumed as messages.
    var stdoutExtra: String { output.unread }
    var stderr: String { errors.text }

    func kill() {
        closeInput()
        guard reaped == nil else { return }
        Glibc.kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = status
    }

    deinit { kill() }
}

/// Reads a pipe on a thread of its own until end of file, keeping everything it read and
/// handing out lines to one awaiting reader at a time.
final class PipeReader: Sendable {
    private struct State {
        var all: [UInt8] = []
        /// Offset in `all` of the first byte not yet handed out as a line.
        var consumed = 0
        var ended = false
        var waiter: (id: Int, continuation: CheckedContinuation<Void, Never>)?
        var waiters = 0
    }
    private let state = Mutex(State())

    init(fd: Int32) {
        let thread = Thread { [self] in
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                let waiter = state.withLock { s in
                    if n > 0 { s.all += buffer[..<n] } else { s.ended = true }
                    defer { s.waiter = nil }
                    return s.waiter?.continuation
                }
                waiter?.resume()
                if n <= 0 { break }
            }
            close(fd)
        }
        thread.start()
    }

    var text: String { String(decoding: state.withLock { $0.all }, as: UTF8.self) }
    var unread: String { String(decoding: state.withLock { $0.all[$0.consumed...] }, as: UTF8.self) }

    /// The next whole line, or nil at end of file or after `timeout`.
    func nextLine(timeout: Duration) async -> String? {
        let deadline = ContinuousClock.now + timeout
        while true {
            let (line, ended, seen): (String?, Bool, Int) = state.withLock { s in
                guard let newline = s.all[s.consumed...].firstIndex(of: 10) else { return (nil, s.ended, s.all.count) }
                defer { s.consumed = newline + 1 }
                return (String(decoding: s.all[s.consumed..<newline], as: UTF8.self), false, s.all.count)
            }
            if let line { return line }
            if ended || ContinuousClock.now >= deadline { return nil }
            await awaitData(beyond: seen, until: deadline)
        }
    }

    /// Waits for end of file; false after `timeout`.
    func awaitEnd(timeout: Duration) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while true {
            let (ended, seen) = state.withLock { ($0.ended, $0.all.count) }
            if ended { return true }
            if ContinuousClock.now >= deadline { return false }
            await awaitData(beyond: seen, until: deadline)
        }
    }

    /// Returns once more than `seen` bytes were read or the end came, or at `deadline`.
    private func awaitData(beyond seen: Int, until deadline: ContinuousClock.Instant) async {
        let id = state.withLock { s in
            s.waiters += 1
            return s.waiters
        }
        let timer = Task { [self] in
            try? await Task.sleep(until: deadline)
            state.withLock { s in
                defer { if s.waiter?.id == id { s.waiter = nil } }
                return s.waiter?.id == id ? s.waiter?.continuation : nil
            }?.resume()
        }
        defer { timer.cancel() }
        await withCheckedContinuation { continuation in
            // Checked under the lock that the reading thread takes: nothing slips in between.
            let resumeNow = state.withLock { s in
                if s.ended || s.all.count > seen || ContinuousClock.now >= deadline { return true }
                s.waiter = (id, continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }
}

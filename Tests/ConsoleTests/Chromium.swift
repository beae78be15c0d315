import Foundation
import TestSupport

/// Headless Chromium from Debian, driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: the browser reads commands on fd 3 and writes answers and events
/// on fd 4, each message JSON ended by a NUL byte). One page, one flattened session.
final class Chromium: @unchecked Sendable {
    // Invariant: `state` is only touched under `lock`; the reader thread and the test's tasks
    // meet there.
    private struct State {
        var nextID = 1
        var waiting: [Int: CheckedContinuation<Data, any Error>] = [:]
        /// Every event so far, by method, for `waitForEvent`.
        var events: [String] = []
        var eventWaiters: [(method: String, after: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var closed: String?
    }
    private let lock = NSLock()
    private var state = State()
    private let pid: pid_t
    private let toBrowser: Int32
    private let fromBrowser: Int32
    private let profile: String
    private var session = ""

    /// Where Debian installs it (`scripts/env-up` does).
    static let binary = "/usr/bin/chromium"

    struct Failure: Error, CustomStringConvertible { let description: String }

    /// Starts the browser with a fresh profile and opens one blank page 1280×900.
    /// - Throws: when chromium is not installed (a failure, never a skip: `scripts/env-up`
    ///   installs it) or does not answer.
    static func launch() async throws -> Chromium {
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw Failure(description: "\(binary) is not installed; scripts/env-up installs Debian's chromium package")
        }
        let browser = try Chromium()
        try await browser.openPage()
        return browser
    }

    private init() throws {
        profile = "/tmp/agentd-chromium-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: profile, withIntermediateDirectories: true)
        var commands: [Int32] = [0, 0], answers: [Int32] = [0, 0]
        guard pipe(&commands) == 0, pipe(&answers) == 0 else {
            throw Failure(description: "pipe: \(String(cString: strerror(errno)))")
        }
        // Our ends stay ours: no other child the test process starts inherits them.
        for fd in commands + answers { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, profile + "/chromium.log", O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_adddup2(&actions, commands[0], 3)
        posix_spawn_file_actions_adddup2(&actions, answers[1], 4)
        let argv = [
            Self.binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--user-data-dir=\(profile)", "--window-size=1280,900", "about:blank",
        ]
        let cArgs = argv.map { strdup($0) } + [nil]
        let environment = ProcessInfo.processInfo.environment.merging(["HOME": profile]) { $1 }
        let cEnv = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (cArgs + cEnv).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
        Glibc.close(commands[0])
        Glibc.close(answers[1])
        guard rc == 0 else { throw Failure(description: "cannot start chromium: \(String(cString: strerror(rc)))") }
        self.pid = pid
        toBrowser = commands[1]
        fromBrowser = answers[0]
        let thread = Thread { [self] in readLoop() }
        thread.start()
    }

    /// The browser's log (stderr), for failure messages.
    var log: String { (try? String(contentsOfFile: profile + "/chromium.log", encoding: .utf8)) ?? "" }

    private func openPage() async throws {
        let created = try await send("Target.createTarget", ["url": "about:blank"], inSession: false)
        guard let target = created["targetId"] as? String else { throw Failure(description: "no target: \(created)") }
        let attached = try await send("Target.attachToTarget", ["targetId": target, "flatten": true], inSession: false)
        guard let id = attached["sessionId"] as? String else { throw Failure(description: "no session: \(attached)") }
        session = id
        _ = try await send("Page.enable")
        _ = try await send("Runtime.enable")
        _ = try await send("Emulation.setDeviceMetricsOverride", ["width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false])
    }

    /// Sends one command and returns its `result`.
    @discardableResult
    func send(_ method: String, _ params: [String: Any] = [:], inSession: Bool = true) async throws -> [String: Any] {
        var message: [String: Any] = ["method": method, "params": params]
        if inSession { message["sessionId"] = session }
        let data: Data = try await withCheckedThrowingContinuation { continuation in
            let failure = lock.withLock { () -> String? in
                if let closed = state.closed { return closed }
                let id = state.nextID
                state.nextID += 1
                message["id"] = id
                state.waiting[id] = continuation
                return nil
            }
            if let failure { return continuation.resume(throwing: Failure(description: failure)) }
            var bytes = [UInt8]((try? JSONSerialization.data(withJSONObject: message)) ?? Data())
            bytes.append(0)
            bytes.withUnsafeBytes { buffer in
                var offset = 0
                while offset < buffer.count {
                    let n = write(toBrowser, buffer.baseAddress! + offset, buffer.count - offset)
                    if n <= 0 { if errno == EINTR { continue }; break }
                    offset += n
                }
            }
        }
        let object = (try JSONSerialization.jsonObject(with: data)) as? [String: Any] ?? [:]
        if let error = object["error"] as? [String: Any] {
            throw Failure(description: "\(method): \(error["message"] ?? error)")
        }
        return object["result"] as? [String: Any] ?? [:]
    }

    private func readLoop() {
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = read(fromBrowser, &chunk, chunk.count)
            if n < 0, errno == EINTR { continue }
            if n <= 0 { break }
            buffer.append(contentsOf: chunk[0..<n])
            while let end = buffer.firstIndex(of: 0) {
                dispatch(Data(buffer[0..<end]))
                buffer.removeSubrange(0...end)
            }
        }
        Glibc.close(fromBrowser)
        let (waiting, eventWaiters) = lock.withLock {
            state.closed = "chromium closed the DevTools pipe"
            defer { state.waiting = [:]; state.eventWaiters = [] }
            return (state.waiting, state.eventWaiters)
        }
        for c in waiting.values { c.resume(throwing: Failure(description: "chromium closed the DevTools pipe")) }
        for w in eventWaiters { w.continuation.resume() }
    }

    private func dispatch(_ data: Data) {
        guard let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else { return }
        if let id = object["id"] as? Int {
            let continuation = lock.withLock { state.waiting.removeValue(forKey: id) }
            continuation?.resume(returning: data)
        } else if let method = object["method"] as? String {
            let ready = lock.withLock { () -> [CheckedContinuation<Void, Never>] in
                state.events.append(method)
                let count = state.events.count
                let due = state.eventWaiters.filter { $0.method == method && count > $0.after }
                state.eventWaiters.removeAll { $0.method == method && count > $0.after }
                return due.map(\.continuation)
            }
            for c in ready { c.resume() }
        }
    }

    /// How many events arrived so far (a mark for `waitForEvent(_:after:)`).
    var eventMark: Int { lock.withLock { state.events.count } }

    /// Returns once an event `method` arrived after `mark`.
    func waitForEvent(_ method: String, after mark: Int, timeout: Duration = .seconds(30)) async throws {
        let arrived: Bool = await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let now = self.lock.withLock { () -> Bool in
                        if self.state.closed != nil || self.state.events[mark...].contains(method) { return true }
                        self.state.eventWaiters.append((method, mark, c))
                        return false
                    }
                    if now { c.resume() }
                }
                return true
            }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return false
            }
            let first = await group.next() ?? false
            if !first {
                // Release the waiter so the group can end.
                let stale = lock.withLock { () -> [CheckedContinuation<Void, Never>] in
                    let due = state.eventWaiters.filter { $0.method == method && $0.after == mark }.map(\.continuation)
                    state.eventWaiters.removeAll { $0.method == method && $0.after == mark }
                    return due
                }
                stale.forEach { $0.resume() }
            }
            group.cancelAll()
            return first
        }
        guard arrived else { throw Failure(description: "no \(method) within \(timeout)") }
    }

    /// Loads `url` and returns once its load event fired; a change of the fragment only (the
    /// console's own routing) returns at once, the page's `hashchange` does the rest.
    func navigate(_ url: String) async throws {
        let mark = eventMark
        let result = try await send("Page.navigate", ["url": url])
        if let error = result["errorText"] as? String { throw Failure(description: "\(url): \(error)") }
        guard result["loaderId"] != nil else { return }
        try await waitForEvent("Page.loadEventFired", after: mark)
    }

    /// Runs `action` (which makes the page navigate, e.g. a form submit) and returns once the
    /// next page loaded.
    func loading(_ action: () async throws -> Void) async throws {
        let mark = eventMark
        try await action()
        try await waitForEvent("Page.loadEventFired", after: mark)
    }

    /// Evaluates `expression` (awaited if it is a promise) in the page and decodes its value,
    /// carried as JSON.
    func evaluate<T: Decodable>(_ expression: String, as type: T.Type = T.self) async throws -> T {
        let wrapped = "(async () => JSON.stringify(await (\(expression))))()"
        let result = try await send("Runtime.evaluate", ["expression": wrapped, "awaitPromise": true, "returnByValue": true])
        if let exception = result["exceptionDetails"] as? [String: Any] {
            let text = (exception["exception"] as? [String: Any])?["description"] ?? exception["text"] ?? exception
            throw Failure(description: "the page threw evaluating \(expression): \(text)")
        }
        guard let json = (result["result"] as? [String: Any])?["value"] as? String else {
            throw Failure(description: "\(expression) gave no value: \(result)")
        }
        return try JSONDecoder().decode(T.self, from: Data(json.utf8))
    }

    /// Returns once `condition` (a JavaScript expression) is true in the page: checked now and
    /// on every change of the document (a MutationObserver), never on a timer. Throws after
    /// `timeout` with `describe` (an expression) evaluated, to say what the page showed.
    func waitFor(_ condition: String, timeout: Duration = .seconds(30), describe: String = "document.body.innerText.slice(0, 2000)") async throws {
        let ms = Int(timeout.components.seconds * 1000)
        let script = """
            new Promise(resolve => {
              const test = () => { try { return !!(\(condition)); } catch (e) { return false; } };
              if (test()) return resolve(true);
              const observer = new MutationObserver(() => { if (test()) { observer.disconnect(); resolve(true); } });
              observer.observe(document, { subtree: true, childList: true, attributes: true, characterData: true });
              setTimeout(() => { observer.disconnect(); resolve(test()); }, \(ms));
            })
            """
        guard try await evaluate(script, as: Bool.self) else {
            let shown = (try? await evaluate(describe, as: String.self)) ?? "?"
            throw Failure(description: "the page never showed \(condition) within \(timeout); it showed: \(shown)")
        }
    }

    /// A PNG of the viewport, written to `path`.
    func screenshot(_ path: String) async throws {
        let shot = try await send("Page.captureScreenshot", ["format": "png"])
        guard let base64 = shot["data"] as? String, let png = Data(base64Encoded: base64) else { throw Failure(description: "no screenshot data") }
        try png.write(to: URL(fileURLWithPath: path))
    }

    /// Closes the browser and removes its profile.
    func close() {
        // Closing its command pipe ends a headless chromium; SIGKILL if it lingers.
        Glibc.close(toBrowser)
        kill(pid, SIGTERM)
        var status: Int32 = 0
        let deadline = ContinuousClock.now + .seconds(5)
        while waitpid(pid, &status, WNOHANG) == 0 {
            if ContinuousClock.now > deadline {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                break
            }
            usleep(20_000)
        }
        try? FileManager.default.removeItem(atPath: profile)
    }
}

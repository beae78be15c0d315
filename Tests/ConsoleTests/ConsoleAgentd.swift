import AgentdClient
import EngineAPI
import Foundation
import Testing
import TestSupport

/// The real agentd for one console test: its own state directory and unix socket, and a TCP
/// listener on a free loopback port with a fresh token (the browser's way in).
final class ConsoleAgentd: @unchecked Sendable {
    // Invariant: used by one test at a time; `child` changes only in start/stop.
    let base: String
    let stateDir: String
    let socket: String
    let policies: String
    let token = "console-test-\(UUID().uuidString)"
    private(set) var port = 0
    private var child: ChildProcess?

    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static var shippedPolicies: String { repository.appendingPathComponent("policies").path }

    init(policies: String = ConsoleAgentd.shippedPolicies) throws {
        base = "/tmp/agentd-console-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        stateDir = base + "/state"
        socket = base + "/agentd.sock"
        self.policies = policies
    }

    /// The API over the unix socket (no token), for driving sessions.
    var client: AgentdClient {
        CurlTransport.globalInit()
        return AgentdClient(socket: socket)
    }

    func url(_ path: String) -> String { "http://127.0.0.1:\(port)\(path)" }

    var log: String { (try? String(contentsOfFile: base + "/agentd.log", encoding: .utf8)) ?? "" }

    /// Starts agentd (again, on the same state and port after `stop`); returns once it answers.
    func start() async throws {
        let binary = Components.buildProductsDirectory.appendingPathComponent("agentd").path
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw Chromium.Failure(description: "agentd is not built at \(binary); `swift build --product agentd` builds it")
        }
        _ = try await Components.engine()
        if port == 0 { port = try Self.freePort() }
        child = try ChildProcess.spawn(
            [binary, "--state-dir", stateDir, "--socket", socket, "--policies", policies, "--listen-tcp", "127.0.0.1:\(port)"],
            environment: ProcessInfo.processInfo.environment.merging(["AGENTD_TOKEN": token]) { $1 }, output: base + "/agentd.log")
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if (try? await client.get("/v1/health", timeout: .seconds(1))) != nil { return }
            if let status = child?.exitStatusIfExited() {
                child = nil
                throw Chromium.Failure(description: "agentd exited (wait status \(status)) before its API answered; its log: \(log)")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw Chromium.Failure(description: "agentd did not answer on \(socket) within 60 s; its log: \(log)")
    }

    /// SIGTERM and wait.
    func stop() {
        child?.terminate()
        child = nil
    }

    /// Logs the browser in through the login form (as a person would), returning once the
    /// page the form leads to has loaded.
    func logIn(_ browser: Chromium, token: String) async throws {
        try await browser.navigate(url("/ui/login"))
        let literal = String(decoding: try JSONEncoder().encode(token), as: UTF8.self)
        try await browser.loading {
            _ = try await browser.evaluate(
                "(document.getElementById('token').value = \(literal), setTimeout(() => document.querySelector('form').submit(), 0), true)", as: Bool.self)
        }
    }

    /// With AGENTD_CONSOLE_SCREENSHOTS set (a directory, relative to the repository), a PNG of
    /// the page as `name` there.
    func screenshot(_ browser: Chromium, _ name: String) async throws {
        guard let directory = ProcessInfo.processInfo.environment["AGENTD_CONSOLE_SCREENSHOTS"], !directory.isEmpty else { return }
        let target = directory.hasPrefix("/") ? directory : Self.repository.appendingPathComponent(directory).path
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        // Let the page finish painting what it just received (fonts, the flash of a new event).
        _ = try await browser.evaluate("new Promise(r => requestAnimationFrame(() => setTimeout(() => r(true), 1300)))", as: Bool.self)
        try await browser.screenshot(target + "/" + name)
    }

    private static func freePort() throws -> Int {
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { Glibc.close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw Chromium.Failure(description: "no free loopback port: \(String(cString: strerror(errno)))") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

/// Runs `body` with a started agentd and a browser (logged in unless `login` is false),
/// stopping both and removing the sandboxes agentd left, whatever happens.
func withConsole(
    policies: String = ConsoleAgentd.shippedPolicies, login: Bool = true, _ body: (ConsoleAgentd, Chromium) async throws -> Void
) async throws {
    let agentd = try ConsoleAgentd(policies: policies)
    var browser: Chromium?
    do {
        try await agentd.start()
        let started = try await Chromium.launch()
        browser = started
        if login { try await agentd.logIn(started, token: agentd.token) }
        try await body(agentd, started)
    } catch {
        browser?.close()
        await cleanUp(agentd)
        throw error
    }
    browser?.close()
    await cleanUp(agentd)
}

private func cleanUp(_ agentd: ConsoleAgentd) async {
    agentd.stop()
    let instance = ((try? String(contentsOfFile: agentd.stateDir + "/instance", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    guard let engine = try? await Components.engine(), !instance.isEmpty else { return }
    for c in (try? await engine.listContainers(labels: ["agentd.instance": instance])) ?? [] {
        _ = try? await engine.removeContainer(c.Id)
    }
    try? FileManager.default.removeItem(atPath: agentd.base)
}

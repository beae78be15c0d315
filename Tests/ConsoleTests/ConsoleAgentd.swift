import AgentdClient
import AgentdTestSupport
import EngineAPI
import Foundation
import Testing
import TestSupport

/// The real agentd for one console test (`AgentdProcess`): its own state directory and unix
/// socket, and a TCP listener on a free loopback port with a fresh token (the browser's way in).
final class ConsoleAgentd: @unchecked Sendable {
    // Invariant: used by one test at a time; `port` is set by the first start.
    let process: AgentdProcess
    let token = "console-test-\(UUID().uuidString)"
    private(set) var port = 0

    static var repository: URL { AgentdProcess.repository }
    static var shippedPolicies: String { AgentdProcess.policiesDirectory }

    init(policies: String = ConsoleAgentd.shippedPolicies) throws {
        process = try AgentdProcess(policies: policies, prefix: "agentd-console")
    }

    var stateDir: String { process.stateDir }
    var policies: String { process.policies }
    /// The API over the unix socket (no token), for driving sessions.
    var client: AgentdClient { process.client }
    var log: String { process.log }

    func url(_ path: String) -> String { "http://127.0.0.1:\(port)\(path)" }

    /// Starts agentd (again, on the same state and port after `stop`); returns once it answers.
    func start() async throws {
        if port == 0 { port = try Loopback.freePort() }
        try await process.start(extraArguments: ["--listen-tcp", "127.0.0.1:\(port)"], extraEnvironment: ["AGENTD_TOKEN": token])
    }

    /// SIGTERM and wait.
    func stop() { process.stop() }

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
    await agentd.process.stopAndRemoveSandboxes()
    try? FileManager.default.removeItem(atPath: agentd.process.base)
}

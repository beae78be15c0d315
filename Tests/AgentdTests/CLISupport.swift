import AgentdTestSupport
import Foundation
import TestSupport

/// What a run of the real `agentctl` printed, and how it ended.
struct CLIRun {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs the built `agentctl` with `arguments` (talking to `socket` through $AGENTD_SOCKET when
/// given, with `environment` added to the test's own) and waits for it, at most `timeout`: a
/// hang is killed and reported as status -9.
func runAgentctl(
    _ arguments: [String], socket: String? = nil, environment: [String: String] = [:], timeout: Duration = .seconds(120)
) async throws -> CLIRun {
    try await runChild(try agentctlBinary(), arguments, environment: agentctlEnvironment(socket: socket, adding: environment), timeout: timeout)
}

/// Runs `path` with `arguments` and `environment`, stdin empty, and waits for it, at most
/// `timeout`: a hang is killed and reported as status -9.
func runChild(_ path: String, _ arguments: [String], environment: [String: String], timeout: Duration) async throws -> CLIRun {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    process.environment = environment
    // Output goes to files: pipes could fill up and stall a chatty child.
    let base = NSTemporaryDirectory() + "child-\(Components.testID())"
    _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
    _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
    defer {
        try? FileManager.default.removeItem(atPath: base + ".out")
        try? FileManager.default.removeItem(atPath: base + ".err")
    }
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: base + ".out"))
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: base + ".err"))
    try process.run()
    let deadline = ContinuousClock.now + timeout
    while process.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
    var status: Int32
    if process.isRunning {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        status = -9
    } else {
        status = process.terminationStatus
    }
    let read = { (path: String) in (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
    return CLIRun(status: status, stdout: read(base + ".out"), stderr: read(base + ".err"))
}

/// The built `agentctl`.
func agentctlBinary() throws -> String {
    let binary = Components.buildProductsDirectory.appendingPathComponent("agentctl").path
    guard FileManager.default.isExecutableFile(atPath: binary) else {
        throw Components.Missing(description: "agentctl is not built at \(binary); `swift build` builds it (make test does)")
    }
    return binary
}

/// The test's environment with $AGENTD_SOCKET set to `socket` (when given) and `extra` added.
func agentctlEnvironment(socket: String?, adding extra: [String: String] = [:]) -> [String: String] {
    var environment = ProcessInfo.processInfo.environment.merging(extra) { $1 }
    if let socket { environment["AGENTD_SOCKET"] = socket }
    return environment
}

/// A copy of the repository's shipped policies in a fresh directory, `edit` applied to the
/// text of each file (by file name): for tests that need a policy changed.
func shippedPoliciesCopy(_ edit: (_ file: String, _ text: inout String) -> Void = { _, _ in }) throws -> String {
    let directory = "/tmp/agentd-policies-\(Components.testID())"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    for file in try FileManager.default.contentsOfDirectory(atPath: AgentdProcess.policiesDirectory) where file.hasSuffix(".yaml") {
        var text = try String(contentsOfFile: AgentdProcess.policiesDirectory + "/" + file, encoding: .utf8)
        edit(file, &text)
        try text.write(toFile: directory + "/" + file, atomically: true, encoding: .utf8)
    }
    return directory
}

/// Runs `path` with `arguments` and waits (at most `timeout`): for system tools in tests.
func runProgram(_ path: String, _ arguments: [String], timeout: Duration = .seconds(60)) async throws -> CLIRun {
    try await runChild(path, arguments, environment: ProcessInfo.processInfo.environment, timeout: timeout)
}

/// `runProgram` for a `defer`, which cannot await.
@discardableResult
func runProgramSync(_ path: String, _ arguments: [String]) throws -> Int32 {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    process.waitUntilExit()
    return process.terminationStatus
}

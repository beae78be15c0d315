import Foundation
import Hands

/// A Hands driver that answers at once without a sandbox: the fuzzer exercises the API, the
/// router and the journal, not the engine. Files written are kept in memory per sandbox.
final class FakeHands: HandsDriver, @unchecked Sendable {
    // Invariant: `files` and `next` are touched only under `lock`.
    private let lock = NSLock()
    private var files: [String: [String: [UInt8]]] = [:]
    private var next = 0

    var kind: String { "container" }

    func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        let id = lock.withLock {
            next += 1
            return "fake-\(next)"
        }
        return SandboxHandle(id: id, spec: spec, labels: labels)
    }

    func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {}
    func removeSessionData(session: String) async throws {}

    func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        CommandOutput(stdout: Array("ran \(argv.count) words\n".utf8), stderr: [], exitCode: argv.last?.contains("false") == true ? 1 : 0)
    }

    func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        lock.withLock { files[sandbox.id, default: [:]][path] = contents }
    }

    func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        guard let contents = lock.withLock({ files[sandbox.id]?[path] }) else {
            throw HandsError(.invalidRequest, "no such file: \(path)")
        }
        return contents
    }

    func destroy(_ sandbox: SandboxHandle) async throws { lock.withLock { _ = files.removeValue(forKey: sandbox.id) } }

    func list(instance: String) async throws -> [(id: String, labels: [String: String])] { [] }

    func destroy(id: String) async throws {}

    /// Lists nothing, so is never asked to adopt.
    func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? { nil }
}

import Foundation
import Hands
import Logging
import Policy
import SessionLog
import Synchronization
import Testing
import Vault

@testable import Runtime

/// An in-memory Hands driver: `bash` commands are not run but echoed back as stdout, so that
/// a test decides the output by the command it sends. It counts how often each command ran,
/// and a command starting with `hold` waits until the test releases it.
///
/// Commands: `big N` answers N bytes of `"` (each takes 2 bytes JSON-encoded); `x N` answers
/// N bytes of `x`; anything else is echoed.
final class FakeDriver: HandsDriver {
    private struct State {
        var runs: [String: Int] = [:]
        var provisioned = 0
        var destroyed = 0
        var files: [String: [UInt8]] = [:]
        var held: [CheckedContinuation<Void, Never>] = []
        var holding: [CheckedContinuation<Void, Never>] = []
        var released = false
        var removedSessions: [String] = []
        /// Sandboxes that exist now (provisioned or planted, not destroyed), by id: what `list` shows.
        var sandboxes: [String: [String: String]] = [:]
        /// Sandboxes that exist but do not answer (`adopt` refuses them).
        var silent: Set<String> = []
        var listingFails = false
    }
    private let state = Mutex(State())
    private let counter = Atomic<Int>(0)

    var kind: String { "container" }

    func runs(_ command: String) -> Int { state.withLock { $0.runs[command] ?? 0 } }
    var totalRuns: Int { state.withLock { $0.runs.values.reduce(0, +) } }
    var writes: Int { state.withLock { $0.files.count } }
    var destroyed: Int { state.withLock { $0.destroyed } }

    /// Returns once a `hold` command is running (held).
    func waitUntilHolding() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            state.withLock { s in
                if s.held.isEmpty { s.holding.append(c) } else { c.resume() }
            }
        }
    }

    /// Lets every held command (and every later one) finish.
    func release() {
        let held = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.released = true
            defer { s.held = [] }
            return s.held
        }
        for c in held { c.resume() }
    }

    func provision(_ spec: SandboxSpec, labels: [String: String]) async throws -> SandboxHandle {
        let id = "fake-\(counter.add(1, ordering: .relaxed).newValue)"
        state.withLock {
            $0.provisioned += 1
            $0.sandboxes[id] = labels
        }
        return SandboxHandle(id: id, spec: spec, labels: labels)
    }

    /// Puts a sandbox with `labels` in place, as a previous run of agentd would have left it;
    /// a `silent` one exists but does not answer.
    func plant(_ id: String, labels: [String: String], silent: Bool = false) {
        state.withLock {
            $0.sandboxes[id] = labels
            if silent { $0.silent.insert(id) }
        }
    }

    /// The ids of the sandboxes that exist now.
    var existing: Set<String> { state.withLock { Set($0.sandboxes.keys) } }

    func adopt(id: String, labels: [String: String], spec: SandboxSpec) async -> SandboxHandle? {
        state.withLock { $0.sandboxes[id] != nil && !$0.silent.contains(id) } ? SandboxHandle(id: id, spec: spec, labels: labels) : nil
    }

    func assign(_ sandbox: SandboxHandle, to key: TaskKey) async throws {}

    /// Sessions whose data the runtime asked to remove (deleted sessions).
    var removedSessions: [String] { state.withLock { $0.removedSessions } }

    func removeSessionData(session: String) async throws {
        state.withLock { $0.removedSessions.append(session) }
    }

    func run(
        _ argv: [String], in sandbox: SandboxHandle, workingDirectory: String?, timeout: Duration, output: OutputSink?
    ) async throws -> CommandOutput {
        let command = argv.last ?? ""
        state.withLock { $0.runs[command, default: 0] += 1 }
        if command.hasPrefix("hold") {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let waiting = state.withLock { s -> [CheckedContinuation<Void, Never>]? in
                    if s.released { return nil }
                    s.held.append(c)
                    defer { s.holding = [] }
                    return s.holding
                }
                guard let waiting else { return c.resume() }
                for w in waiting { w.resume() }
            }
        }
        let words = command.split(separator: " ")
        if words.count == 2, let n = Int(words[1]) {
            if words[0] == "big" { return CommandOutput(stdout: Array(repeating: 0x22, count: n), stderr: [], exitCode: 0) }
            if words[0] == "x" { return CommandOutput(stdout: Array(repeating: 0x78, count: n), stderr: [], exitCode: 0) }
        }
        return CommandOutput(stdout: Array(command.utf8), stderr: [], exitCode: 0)
    }

    func writeFile(_ path: String, contents: [UInt8], in sandbox: SandboxHandle) async throws {
        state.withLock { $0.files[path] = contents }
    }

    func readFile(_ path: String, in sandbox: SandboxHandle) async throws -> [UInt8] {
        guard let bytes = state.withLock({ $0.files[path] }) else { throw HandsError(.invalidRequest, "\(path): no such file") }
        return bytes
    }

    func destroy(_ sandbox: SandboxHandle) async throws {
        state.withLock {
            $0.destroyed += 1
            $0.sandboxes[sandbox.id] = nil
        }
    }
    /// Makes `list` fail (an engine that does not answer yet) or work again.
    func failListing(_ fails: Bool) { state.withLock { $0.listingFails = fails } }

    func list(instance: String) async throws -> [(id: String, labels: [String: String])] {
        if state.withLock({ $0.listingFails }) { throw HandsError(.unreachable, "the engine does not answer") }
        return state.withLock { $0.sandboxes.sorted { $0.key < $1.key }.map { (id: $0.key, labels: $0.value) } }
    }
    func destroy(id: String) async throws { _ = state.withLock { $0.sandboxes.removeValue(forKey: id) } }
}

/// A policy file's text: container driver, the given output and event limits, optional
/// credentials (`name: source`).
func policyYAML(_ name: String, outputLimit: String = "1MiB", maxEventSize: String = "1MiB", credentials: [String: String] = [:]) -> String {
    var text = """
        apiVersion: agentd/v1
        kind: Policy
        metadata:
          name: \(name)
        hands:
          driver: container
          outputLimit: \(outputLimit)
        session:
          maxEventSize: \(maxEventSize)

        """
    if !credentials.isEmpty {
        text += "credentials:\n"
        for (n, source) in credentials.sorted(by: { $0.key < $1.key }) { text += "  - name: \(n)\n    source: \(source)\n" }
    }
    return text
}

/// Everything a Runtime test works with: a real journal in a temp directory, real policies
/// from files, the redactor kept in step by a `CredentialRegistrar`, and a `FakeDriver`.
struct Fixture {
    let directory: String
    let journal: String
    let policyDirectory: String
    let store: SessionStore
    let policies: PolicyStore
    let driver: FakeDriver
    let hands: HandsManager
    let runtime: Runtime
    let registrar: CredentialRegistrar

    /// A second Runtime over the same journal and Hands, as after a restart of agentd (its
    /// state is rebuilt from the journal).
    func restartedRuntime(maxCachedSessions: Int = 1024) -> Runtime {
        Runtime(store: store, hands: hands, policies: policies, maxCachedSessions: maxCachedSessions)
    }

    func writePolicy(_ name: String, _ text: String) throws {
        try text.write(toFile: policyDirectory + "/\(name).yaml", atomically: true, encoding: .utf8)
    }

    /// Every byte of the journal's files, as on the disk.
    func journalBytes() -> [UInt8] {
        var out: [UInt8] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: journal)) ?? [] {
            if let d = FileManager.default.contents(atPath: journal + "/" + name) { out.append(contentsOf: d) }
        }
        return out
    }

    func events(_ session: String) async throws -> [Event] {
        var out: [Event] = []
        for try await e in try await runtime.events(session, after: 0, follow: false) { out.append(e) }
        return out
    }
}

/// Runs `body` with a fresh fixture whose policy directory holds `policies` (name → YAML;
/// `default` is added when missing), then closes the journal and removes the directory.
func withRuntime<T>(
    policies: [String: String] = [:], maxCachedSessions: Int = 1024, environment: [String: String] = [:],
    attachments: (any SandboxAttachments)? = nil, _ body: (Fixture) async throws -> T
) async throws -> T {
    let directory = NSTemporaryDirectory() + "agentd-runtime-\(UUID().uuidString.prefix(8))"
    let policyDirectory = directory + "/policies"
    try FileManager.default.createDirectory(atPath: policyDirectory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    var all = policies
    if all["default"] == nil { all["default"] = policyYAML("default") }
    for (name, text) in all { try text.write(toFile: policyDirectory + "/\(name).yaml", atomically: true, encoding: .utf8) }
    let policyStore = PolicyStore(directory: policyDirectory)
    let policyErrors = await policyStore.lastErrors
    #expect(policyErrors.isEmpty, "the test's policies load: \(policyErrors)")
    let journal = directory + "/journal"
    let store = try await SessionStore.open(directory: journal, options: SessionStoreOptions(maxEventBytes: Runtime.journalEventCeiling))
    let registrar = CredentialRegistrar(resolver: CredentialResolver(environment: environment), redactor: store.redactor)
    await registrar.sync(policyStore)
    let driver = FakeDriver()
    let hands = HandsManager(driver: driver, instance: "runtime-test", attachments: attachments)
    let runtime = Runtime(
        store: store, hands: hands, policies: policyStore, maxCachedSessions: maxCachedSessions,
        refreshSecrets: { await registrar.sync(policyStore) })
    let fixture = Fixture(
        directory: directory, journal: journal, policyDirectory: policyDirectory, store: store, policies: policyStore, driver: driver,
        hands: hands, runtime: runtime, registrar: registrar)
    do {
        let result = try await body(fixture)
        driver.release()
        try await store.close()
        return result
    } catch {
        driver.release()
        try? await store.close()
        throw error
    }
}

/// `{"command": …}` as JSON text.
func bash(_ command: String) -> [UInt8] {
    Array((try? JSONSerialization.data(withJSONObject: ["command": command])) ?? Data())
}

/// The code of the `RuntimeError` `body` throws (nil when it throws none or another error).
func runtimeErrorCode(_ body: () async throws -> Void) async -> RuntimeError.Code? {
    do {
        try await body()
        return nil
    } catch let e as RuntimeError {
        return e.code
    } catch {
        return nil
    }
}

func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool { firstIndex(of: needle, in: haystack) != nil }

/// Where `needle` first occurs in `haystack`.
func firstIndex(of needle: [UInt8], in haystack: [UInt8]) -> Int? {
    guard let first = needle.first, needle.count <= haystack.count else { return nil }
    return haystack.withUnsafeBufferPointer { h -> Int? in
        needle.withUnsafeBufferPointer { n -> Int? in
            guard let hb = h.baseAddress, let nb = n.baseAddress else { return nil }
            var i = 0
            while i <= h.count - n.count {
                if hb[i] == first && memcmp(hb + i, nb, n.count) == 0 { return i }
                i += 1
            }
            return nil
        }
    }
}

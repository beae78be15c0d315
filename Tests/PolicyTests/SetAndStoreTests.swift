import Foundation
import Testing

@testable import Policy

@Suite struct ShippedPolicyTests {
    @Test func everyShippedPolicyChecksClean() throws {
        let set = PolicySet.load(directory: shippedPoliciesDirectory)
        #expect(set.diagnostics.map(\.description) == [])
        #expect(set.names == ["coding-agent", "default", "offline-data"])
    }

    @Test func defaultPolicyHasNoNetwork() throws {
        let set = PolicySet.load(directory: shippedPoliciesDirectory)
        let p = try #require(set.policy(named: Policy.defaultName))
        #expect(p.network.mode == .none && p.network.allowHosts.isEmpty)
        #expect(p.routes.isEmpty && p.credentials.isEmpty && p.git == nil)
        #expect(p.hands == HandsPolicy())
    }

    @Test func examplesUseTheirFeatures() throws {
        let set = PolicySet.load(directory: shippedPoliciesDirectory)
        let coding = try #require(set.policy(named: "coding-agent"))
        #expect(coding.network.mode == .proxy)
        #expect(coding.git?.route == "github")
        #expect(coding.route(named: "github")?.credential == "github_token")
        #expect(coding.credential(named: "github_token")?.source == .env("GITHUB_TOKEN"))
        let offline = try #require(set.policy(named: "offline-data"))
        #expect(offline.hands.driver == .unit && offline.network.mode == .none)
    }

    /// `show` prints the effective policy as YAML; it must load back to the same policy.
    @Test func effectiveYAMLLoadsBackToTheSamePolicy() throws {
        for (name, original) in PolicySet.load(directory: shippedPoliciesDirectory).policies {
            let text = original.effectiveYAML()
            var reloaded = try policy(text)
            reloaded.sourcePath = original.sourcePath
            reloaded.sha256 = original.sha256
            #expect(reloaded == original, "round trip of \(name)")
        }
    }
}

@Suite struct PolicySetTests {
    @Test func duplicateNamesAcrossFilesAreErrors() async throws {
        try await withTemporaryDirectory { dir in
            try write(minimal(name: "same"), to: dir + "/a.yaml")
            try write(minimal(name: "same"), to: dir + "/b.yml")
            try write("not a policy", to: dir + "/notes.txt")
            try write("garbage: [", to: dir + "/.hidden.yaml")
            let set = PolicySet.load(directory: dir)
            #expect(set.files == [dir + "/a.yaml", dir + "/b.yml"])
            #expect(
                set.diagnostics.map(\.description) == [
                    "\(dir)/b.yml:4:9: duplicate policy name 'same' (also defined in \(dir)/a.yaml); names must be unique across the policy directory"
                ])
            #expect(set.policy(named: "same")?.sourcePath == dir + "/a.yaml")
        }
    }

    @Test func perFileDiagnostics() async throws {
        try await withTemporaryDirectory { dir in
            try write(minimal(name: "good"), to: dir + "/good.yaml")
            try write(minimal("pool: {size: -1}\n", name: "bad"), to: dir + "/bad.yaml")
            let set = PolicySet.load(directory: dir)
            #expect(!set.isValid)
            #expect(set.diagnostics(for: dir + "/good.yaml").isEmpty)
            #expect(set.diagnostics(for: dir + "/bad.yaml").map(\.message) == ["pool.size: -1 is out of range (0–64)"])
            #expect(set.names == ["good"])
        }
    }

    @Test func missingDirectoryAndFile() {
        #expect(
            PolicySet.load(directory: "/nonexistent/policies").diagnostics.map(\.description) == [
                "/nonexistent/policies:1:1: cannot read policy directory: no such directory"
            ])
        #expect(
            PolicyLoader.load(file: "/nonexistent/x.yaml").diagnostics == [
                "/nonexistent/x.yaml:1:1: cannot read file: no such file"
            ])
    }
}

@Suite struct PolicyStoreTests {
    static let good1 = minimal("hands: {memory: 1GiB}\n", name: "default")
    static let good2 = minimal("hands: {memory: 2GiB}\n", name: "default")
    static let bad = minimal("hands: {memory: 2 potatoes}\n", name: "default")

    @Test func goodBadGoodWhileSessionsRun() async throws {
        try await withTemporaryDirectory { dir in
            let file = dir + "/default.yaml"
            try write(Self.good1, to: file)
            let store = PolicyStore(directory: dir)
            #expect(await store.generation == 1)

            // A task in flight takes its snapshot and keeps it whatever happens next.
            let inFlight = try #require(await store.policy(named: "default"))
            let hash1 = inFlight.sha256

            // Sessions keep asking for the policy while reloads happen: never nil, never torn.
            let readers = Task {
                var seen = Set<Int>()
                repeat {
                    guard let p = await store.policy(named: "default") else { return Set<Int>() }
                    seen.insert(p.hands.memoryBytes)
                    await Task.yield()
                } while !Task.isCancelled
                return seen
            }

            try write(Self.bad, to: file)
            let refused = await store.reload()
            #expect(
                refused == .refused([PolicyDiagnostic(
                    path: file, line: 5, column: 17,
                    message: "hands.memory: '2 potatoes' is not a size (use e.g. 256MiB, 1GiB)")]))
            #expect(await store.policy(named: "default")?.sha256 == hash1)
            #expect(await store.lastErrors.map(\.description) == ["\(file):5:17: hands.memory: '2 potatoes' is not a size (use e.g. 256MiB, 1GiB)"])
            #expect(await store.lastFailure != nil)
            #expect(await store.generation == 1)

            try write(Self.good2, to: file)
            #expect(await store.reload() == .applied(generation: 2))
            #expect(await store.lastErrors.isEmpty)
            let after = try #require(await store.policy(named: "default"))
            #expect(after.hands.memoryBytes == 2 << 30)
            #expect(after.sha256 != hash1)
            #expect(await store.reload() == .unchanged)

            readers.cancel()
            let seen = await readers.value
            #expect(seen.isSubset(of: [1 << 30, 2 << 30]) && !seen.isEmpty)
            // The in-flight task's copy is untouched.
            #expect(inFlight.hands.memoryBytes == 1 << 30 && inFlight.sha256 == hash1)
        }
    }

    @Test func aStoreStartedOnABadDirectoryHasNoPoliciesAndSaysWhy() async throws {
        try await withTemporaryDirectory { dir in
            try write(Self.bad, to: dir + "/default.yaml")
            let store = PolicyStore(directory: dir)
            #expect(await store.generation == 0)
            #expect(await store.policy(named: "default") == nil)
            #expect(await store.lastErrors.count == 1)
            try write(Self.good1, to: dir + "/default.yaml")
            #expect(await store.reload() == .applied(generation: 1))
        }
    }

    @Test func watcherReloadsWhenFilesChange() async throws {
        try await withTemporaryDirectory { dir in
            let file = dir + "/default.yaml"
            try write(Self.good1, to: file)
            let store = PolicyStore(directory: dir)
            let watcher = Task { await store.watch(interval: .milliseconds(20)) }
            defer { watcher.cancel() }

            try write(Self.bad, to: file)
            #expect(await eventually { await store.lastErrors.count == 1 })
            #expect(await store.policy(named: "default")?.hands.memoryBytes == 1 << 30)

            try write(Self.good2, to: file)
            #expect(await eventually { await store.generation == 2 })
            #expect(await store.policy(named: "default")?.hands.memoryBytes == 2 << 30)
            #expect(await store.lastErrors.isEmpty)

            watcher.cancel()
            await watcher.value  // returns promptly once cancelled
        }
    }
}

/// Polls `condition` every 20 ms for up to 5 s.
func eventually(_ condition: () async -> Bool) async -> Bool {
    for _ in 0..<250 {
        if await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return false
}

import Foundation
import Testing

@testable import Policy

/// The repository's `policies/` directory, found from this file's location.
let shippedPoliciesDirectory: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }  // PolicyTests, Tests, repository root
    return url.appendingPathComponent("policies").path
}()

/// Loads YAML text as `t.yaml`, expecting failure; returns the diagnostics as strings.
func errors(_ yaml: String, path: String = "t.yaml") -> [String] {
    switch PolicyLoader.load(yaml: yaml, path: path) {
    case .success(let policy): return ["unexpectedly loaded policy '\(policy.name)'"]
    case .failure(let error): return error.diagnostics.map(\.description)
    }
}

/// Loads YAML text, expecting success.
func policy(_ yaml: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> Policy {
    switch PolicyLoader.load(yaml: yaml, path: "t.yaml") {
    case .success(let policy): return policy
    case .failure(let error):
        Issue.record("unexpected errors:\n\(error)", sourceLocation: sourceLocation)
        throw error
    }
}

/// The smallest valid policy, followed by `body` (top-level sections).
func minimal(_ body: String = "", name: String = "t") -> String {
    """
    apiVersion: agentd/v1
    kind: Policy
    metadata:
      name: \(name)

    """ + body
}

/// A fresh temporary directory, removed when `body` returns.
func withTemporaryDirectory<T>(_ body: (String) async throws -> T) async rethrows -> T {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("policy-tests-\(UUID().uuidString)").path
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: dir) }
    return try await body(dir)
}

func write(_ text: String, to path: String) throws {
    try Data(text.utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
}


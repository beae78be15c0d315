import Testing

@testable import Policy

/// `session.maxSandboxes`: how many sandboxes one session may hold at once.
@Suite("session.maxSandboxes")
struct SessionLimitTests {
    @Test("defaults to 8, takes a whole number, shows in the effective policy")
    func parses() throws {
        #expect(try policy(minimal()).session.maxSandboxes == 8)
        let p = try policy(minimal("session:\n  maxSandboxes: 3\n"))
        #expect(p.session.maxSandboxes == 3)
        #expect(p.effectiveYAML().contains("maxSandboxes: 3"))
    }

    @Test("out of range or not a number: an error at its line and column")
    func refuses() {
        #expect(errors(minimal("session:\n  maxSandboxes: 0\n")) == ["t.yaml:6:17: session.maxSandboxes: 0 is out of range (1–1024)"])
        #expect(errors(minimal("session:\n  maxSandboxes: lots\n")) == ["t.yaml:6:17: session.maxSandboxes: expected a whole number, found 'lots'"])
    }
}

import Foundation
import Testing

@testable import GitWorkspace

/// Secrets in git's messages, raw or encoded, never reach an error.
@Suite struct RedactionTests {
    @Test func aFailedGitsMessageIsRedactedClippedAndClassified() {
        let token = "ghp_0123456789abcdef"
        let redact = Redactor(header: ("Authorization", "Bearer \(token)"), secrets: ["raw-secret-value"])
        let basic = Data("x-access-token:\(token)".utf8).base64EncodedString()
        let stderr = """
            trace: header: Authorization: Bearer \(token)
            trace: basic \(basic) and \(Data(token.utf8).base64EncodedString()) and raw-secret-value
            fatal: unable to access 'https://h/o/r.git/': The requested URL returned error: 401
            """
        let error = GitWorkspaceError.gitFailed(
            "git fetch", status: 128, stderr: stderr, truncated: false, repository: "https://h/o/r.git", redact: redact)
        #expect(error.kind == .authentication)
        #expect(error.description.hasPrefix("git initialization of https://h/o/r.git: git fetch exited with status 128: "))
        #expect(!error.description.contains(token) && !error.description.contains("raw-secret-value"))
        #expect(!error.description.contains(Data(token.utf8).base64EncodedString().prefix(16)))
        #expect(error.description.contains("[REDACTED]"))

        let long = String(repeating: "x", count: 5000) + "\u{1b}[31m fatal: Failed to connect to h port 40123"
        let clipped = GitWorkspaceError.gitFailed("git ls-remote", status: 128, stderr: long, truncated: false, repository: "r", redact: redact)
        #expect(clipped.kind == .unreachable)
        #expect(clipped.message.count < 1800 && !clipped.message.contains("\u{1b}"))
    }
}

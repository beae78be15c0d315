import Foundation

/// Why a workspace could not be initialized. `description` names the repository and, for a
/// failed git, git's own message (its stderr's end, clipped, every secret `[REDACTED]`);
/// never a credential.
public struct GitWorkspaceError: Error, CustomStringConvertible, Sendable {
    public enum Kind: String, Sendable, Hashable {
        /// The initialization itself is malformed (a URL, a branch name, a header with a line
        /// break), or the policy does not describe one.
        case invalidRequest
        /// The workspace directory is missing, not a directory, not owned by the sandbox's
        /// uid, or the child could not be set up (agentd is not root).
        case workspace
        /// The repository refused the credential (HTTP 401/403).
        case authentication
        /// The server has no such repository (or hides it: 404), or no such commit.
        case notFound
        /// The host could not be reached: DNS, connection, TLS verification.
        case unreachable
        /// `timeout` passed; git was killed.
        case timedOut
        /// The calling task was cancelled; git was killed.
        case cancelled
        /// git failed otherwise (a checkout over existing files, a full disk, …).
        case failed
    }

    public let kind: Kind
    /// The repository URL (empty when the policy has none).
    public let repository: String
    /// What went wrong and what to do, secrets redacted.
    public let message: String

    public init(_ kind: Kind, repository: String, _ message: String) {
        self.kind = kind
        self.repository = repository
        self.message = message
    }

    public var description: String {
        repository.isEmpty ? "git initialization: \(message)" : "git initialization of \(repository): \(message)"
    }
}

/// Replaces every secret, raw and base64-encoded, with `[REDACTED]`.
struct Redactor: Sendable {
    static let mark = "[REDACTED]"
    private let needles: [String]

    /// Secrets shorter than this are not searched for: they would redact ordinary words.
    static let minimumLength = 4

    init(header: (name: String, value: String)?, secrets: [String]) {
        var raw = secrets
        if let value = header?.value {
            raw.append(value)
            // `Bearer <token>`, `token <token>`, `Basic <base64>`: the part after the scheme.
            if let space = value.firstIndex(of: " ") {
                raw.append(String(value[value.index(after: space)...]).trimmingCharacters(in: .whitespaces))
            }
        }
        var all = Set<String>()
        for secret in raw where secret.utf8.count >= Self.minimumLength {
            all.insert(secret)
            let encoded = Data(secret.utf8).base64EncodedString()
            all.insert(encoded)
            // The encoding without its padding, as it appears inside a longer encoded text.
            all.insert(String(encoded.prefix { $0 != "=" }))
            all.insert(secret.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? secret)
        }
        // Longest first, so that a secret holding another is replaced whole.
        needles = all.filter { $0.utf8.count >= Self.minimumLength }.sorted { $0.utf8.count > $1.utf8.count }
    }

    func callAsFunction(_ text: String) -> String {
        var out = text
        for needle in needles where out.contains(needle) {
            out = out.replacingOccurrences(of: needle, with: Self.mark)
        }
        return out
    }
}

extension GitWorkspaceError {
    /// The error for a git command that exited with `status`: its kind guessed from git's
    /// message, the message redacted, clipped to its last `limit` characters, and a hint.
    static func gitFailed(
        _ what: String, status: Int32, stderr: String, truncated: Bool, repository: String, redact: Redactor, limit: Int = 1500
    ) -> GitWorkspaceError {
        var text = redact(stderr)
        // A tail cut mid-line may start inside a secret: drop that partial first line.
        if truncated, let newline = text.firstIndex(of: "\n") { text = String(text[text.index(after: newline)...]) }
        text = String(
            text.unicodeScalars.map { $0 == "\n" || $0 == "\t" || ($0.value >= 0x20 && $0.value != 0x7f) ? Character($0) : "?" }
        ).trimmingCharacters(in: .whitespacesAndNewlines)
        if text.count > limit { text = "…" + String(text.suffix(limit)) }
        let lower = text.lowercased()
        let kind: Kind
        let hint: String
        if lower.contains("authentication failed") || lower.contains("could not read username") || lower.contains("could not read password")
            || lower.contains("returned error: 401") || lower.contains("returned error: 403")
        {
            (kind, hint) = (.authentication, "the repository refused the credential; check the route's credential and header")
        } else if lower.contains("not found") || lower.contains("returned error: 404") || lower.contains("couldn't find remote ref") {
            (kind, hint) = (.notFound, "check git.repository and git.branch, and that the credential may read the repository")
        } else if lower.contains("certificate") || lower.contains("ssl") || lower.contains("tls") {
            (kind, hint) = (.unreachable, "TLS verification failed; check the route's caFile")
        } else if lower.contains("could not resolve") || lower.contains("failed to connect") || lower.contains("couldn't connect")
            || lower.contains("connection refused") || lower.contains("timed out") || lower.contains("unable to access")
            || lower.contains("network is unreachable") || lower.contains("connection reset")
        {
            (kind, hint) = (.unreachable, "the repository's host could not be reached from agentd's host")
        } else {
            (kind, hint) = (.failed, "")
        }
        let detail = text.isEmpty ? "" : ": \(text)"
        return GitWorkspaceError(kind, repository: repository, "\(what) exited with status \(status)\(detail)\(hint.isEmpty ? "" : " (\(hint))")")
    }
}

/// One located problem in a policy file: `path:line:col: message`.
///
/// Lines and columns count from 1; columns count Unicode scalars (as libyaml does). Problems
/// that have no better location (an unreadable file, an empty file) point at 1:1.
public struct PolicyDiagnostic: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The file as it was named to the loader (relative paths stay relative).
    public var path: String
    public var line: Int
    public var column: Int
    /// What is wrong and, where possible, what to write instead.
    public var message: String

    public init(path: String, line: Int, column: Int, message: String) {
        self.path = path
        self.line = line
        self.column = column
        self.message = message
    }

    /// `path:line:col: message`, the form editors and CI logs link to.
    public var description: String { "\(path):\(line):\(column): \(message)" }
}

/// The Policy module's one error type.
///
/// Loading never throws for bad *content*; it returns `Result<Policy, PolicyError>` whose
/// failure carries every located diagnostic. `PolicyError` is also what `get()` throws for
/// callers that prefer `try`.
public struct PolicyError: Error, Sendable, Hashable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let raw: String
        /// The file (or directory) has located errors; see `diagnostics`.
        public static let invalid = Code(raw: "invalid")
        /// No policy of the requested name is loaded.
        public static let notFound = Code(raw: "notFound")
        public var description: String { raw }
    }

    public var code: Code
    /// A one-line summary.
    public var message: String
    /// Every located problem, in file order.
    public var diagnostics: [PolicyDiagnostic]

    public init(code: Code, message: String, diagnostics: [PolicyDiagnostic] = []) {
        self.code = code
        self.message = message
        self.diagnostics = diagnostics
    }

    /// The summary followed by one `path:line:col: message` line per diagnostic.
    public var description: String {
        ([message] + diagnostics.map(\.description)).joined(separator: "\n")
    }

    static func invalid(_ diagnostics: [PolicyDiagnostic]) -> PolicyError {
        let n = diagnostics.count
        return PolicyError(
            code: .invalid, message: "\(n) error\(n == 1 ? "" : "s") in policy", diagnostics: diagnostics)
    }
}

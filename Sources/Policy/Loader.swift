import Crypto
import Foundation
import Yams

/// Reads one policy file into a validated `Policy`, or every located problem in it.
///
/// The loader never throws for bad content and never traps on arbitrary bytes: unreadable
/// files, invalid UTF-8, YAML syntax errors and every schema or semantic problem come back as
/// `PolicyDiagnostic`s (`path:line:col: message`), all of them in one pass, sorted by position.
public enum PolicyLoader {
    /// Larger files are refused unread; a policy is a few hundred bytes.
    public static let maxFileBytes = 256 << 10
    /// Deeper nesting is refused before parsing (Yams composes nodes recursively).
    static let maxNesting = 128

    /// Loads the policy file at `path`.
    ///
    /// - Parameter path: The file, named as it should appear in diagnostics.
    /// - Returns: The policy (with `sourcePath` = `path` and the SHA-256 of its bytes) or a
    ///   `PolicyError` with code `.invalid` carrying every diagnostic.
    public static func load(file path: String) -> Result<Policy, PolicyError> {
        loadLocated(file: path).map(\.policy)
    }

    /// Validates policy file bytes as if read from `path`.
    public static func load(data: Data, path: String) -> Result<Policy, PolicyError> {
        loadLocated(data: data, path: path).map(\.policy)
    }

    /// Validates YAML text as if read from `path`; the hash is over its UTF-8 bytes.
    public static func load(yaml: String, path: String) -> Result<Policy, PolicyError> {
        loadLocated(data: Data(yaml.utf8), path: path).map(\.policy)
    }

    // MARK: - Internals

    /// A loaded policy with the position of its `metadata.name` value (for duplicate reports).
    struct Located {
        var policy: Policy
        var nameLine: Int
        var nameColumn: Int
    }

    static func loadLocated(file path: String) -> Result<Located, PolicyError> {
        switch readFile(path) {
        case .success(let data): return loadLocated(data: data, path: path)
        case .failure(let failure): return .failure(.invalid([PolicyDiagnostic(path: path, line: 1, column: 1, message: failure.message)]))
        }
    }

    static func loadLocated(data: Data, path: String) -> Result<Located, PolicyError> {
        func fail(_ line: Int, _ column: Int, _ message: String) -> Result<Located, PolicyError> {
            .failure(.invalid([PolicyDiagnostic(path: path, line: line, column: column, message: message)]))
        }
        guard data.count <= maxFileBytes else {
            return fail(1, 1, "file is \(data.count) bytes; policy files may be at most \(PolicyUnits.formatSize(maxFileBytes))")
        }
        if let bad = firstInvalidUTF8(data) {
            return fail(bad.line, bad.column, "file is not valid UTF-8 (byte 0x\(String(bad.byte, radix: 16, uppercase: true)))")
        }
        let text = String(decoding: data, as: UTF8.self)
        if let deep = excessiveNesting(text) {
            return fail(deep.line, deep.column, "nesting is deeper than \(maxNesting) levels; a policy needs only a few")
        }
        let root: Node?
        do {
            root = try Parser(yaml: text, resolver: .default, constructor: .default, encoding: .utf8).singleRoot()
        } catch let error as YamlError {
            let (line, column, message) = describe(error, text: text)
            return fail(line, column, message)
        } catch {
            return fail(1, 1, "cannot parse YAML: \(error)")
        }
        guard let root else {
            return fail(1, 1, "file is empty; a policy needs at least apiVersion: \(Policy.apiVersion), kind: \(Policy.kind) and metadata.name")
        }
        var checker = PolicyChecker(path: path)
        let policy = checker.policy(root)
        if let policy, checker.diagnostics.isEmpty {
            var located = Located(policy: policy, nameLine: checker.nameMark?.line ?? 1, nameColumn: checker.nameMark?.column ?? 1)
            located.policy.sourcePath = path
            located.policy.sha256 = sha256Hex(data)
            return .success(located)
        }
        return .failure(.invalid(checker.finishedDiagnostics()))
    }

    struct ReadFailure: Error {
        var message: String
    }

    /// Reads a file, or says in one phrase why not.
    static func readFile(_ path: String) -> Result<Data, ReadFailure> {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            return .failure(ReadFailure(message: "cannot read file: no such file"))
        }
        if isDirectory.boolValue { return .failure(ReadFailure(message: "cannot read file: it is a directory")) }
        if let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int, size > maxFileBytes {
            return .failure(ReadFailure(message: "file is \(size) bytes; policy files may be at most \(PolicyUnits.formatSize(maxFileBytes))"))
        }
        do {
            return .success(try Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            return .failure(ReadFailure(message: "cannot read file: \((error as NSError).localizedDescription)"))
        }
    }

    static func sha256Hex(_ data: Data) -> String {
        SHA256.hash(data: data).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }

    /// Position (1-based line, column in scalars) and value of the first byte that is not UTF-8.
    static func firstInvalidUTF8(_ data: Data) -> (line: Int, column: Int, byte: UInt8)? {
        var parser = Unicode.UTF8.ForwardParser()
        var iterator = data.makeIterator()
        var offset = 0
        var line = 1
        var column = 1
        while true {
            switch parser.parseScalar(from: &iterator) {
            case .valid(let encoded):
                offset += encoded.count
                if encoded.count == 1, encoded.first == UInt8(ascii: "\n") {
                    line += 1
                    column = 1
                } else {
                    column += 1
                }
            case .emptyInput:
                return nil
            case .error:
                return (line, column, data[data.startIndex + offset])
            }
        }
    }

    /// The first place where a cheap upper bound on YAML nesting exceeds `maxNesting`.
    ///
    /// Counts, per line, the indentation plus block indicators (`- `, `? `, `: `) plus open
    /// flow brackets, skipping quoted text and comments. It over-estimates, which is fine: real
    /// policies stay far below the limit, and pathological input must not reach the recursive
    /// composer (a deep enough document would overflow a task's stack).
    static func excessiveNesting(_ text: String) -> (line: Int, column: Int)? {
        var flow = 0
        var line = 1
        for rawLine in text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false) {
            let scalars = Array(rawLine)
            var depth = scalars.prefix { $0 == " " || $0 == "\t" }.count
            var quote: Unicode.Scalar?
            var column = 0
            while column < scalars.count {
                let c = scalars[column]
                let next: Unicode.Scalar = column + 1 < scalars.count ? scalars[column + 1] : " "
                if let q = quote {
                    if c == q { quote = nil }
                } else if c == "#", column == 0 || scalars[column - 1] == " " {
                    break
                } else if c == "\"" || c == "'" {
                    quote = c
                } else if c == "[" || c == "{" {
                    flow += 1
                } else if c == "]" || c == "}" {
                    flow = max(0, flow - 1)
                } else if c == "-" || c == "?" || c == ":", next == " " || next == "\t" || next == "\r" {
                    depth += 1
                }
                if depth + flow > maxNesting { return (line, column + 1) }
                column += 1
            }
            line += 1
        }
        return nil
    }

    /// Turns a Yams error into a position and a message.
    static func describe(_ error: YamlError, text: String) -> (Int, Int, String) {
        func context(_ context: YamlError.Context?) -> String {
            guard let context, !context.text.isEmpty else { return "" }
            return " (\(context.text) at \(context.mark.line):\(context.mark.column))"
        }
        switch error {
        case let .reader(problem, offset, _, _):
            let (line, column) = position(ofUTF8Offset: offset ?? 0, in: text)
            return (line, column, "cannot read YAML: \(problem)")
        case let .scanner(ctx, problem, mark, _), let .parser(ctx, problem, mark, _):
            return (mark.line, mark.column, "YAML syntax error: \(problem)\(context(ctx))")
        case let .composer(ctx, problem, mark, _):
            return (mark.line, mark.column, "YAML error: \(problem)\(context(ctx))")
        case let .duplicatedKeysInMapping(duplicates, ctx):
            let keys = duplicates.map { "'\($0)'" }.joined(separator: ", ")
            let line = max(ctx.mark.line, 1)
            let column = max(ctx.mark.column, 1)
            return (line, column, "duplicate key \(keys) in the same mapping (each key may appear once)")
        default:
            return (1, 1, "cannot parse YAML: \(error)")
        }
    }

    /// 1-based line and column (in Unicode scalars) of a UTF-8 byte offset.
    static func position(ofUTF8Offset offset: Int, in text: String) -> (Int, Int) {
        var line = 1
        var column = 1
        var consumed = 0
        for scalar in text.unicodeScalars {
            if consumed >= offset { break }
            consumed += UTF8.width(scalar)
            if scalar == "\n" {
                line += 1
                column = 1
            } else {
                column += 1
            }
        }
        return (line, column)
    }
}

import Foundation
import JSONValues

/// What a tool call returns to the Brain: always a string, marked when it is an error.
public struct ToolResult: Sendable, Codable, Equatable {
    public var output: String
    public var isError: Bool
    /// The command's exit code, for `bash`.
    public var exitCode: Int?
    /// The closing lines at the end of `output` that say what happened to the command
    /// (`[output cut: …]`, `[command timed out after …]`, `[exit code …]`), each with its
    /// leading newline: whoever shortens `output` keeps them. Not encoded (it is part of
    /// `output`).
    public var closingNotes: String

    private enum CodingKeys: String, CodingKey { case output, isError, exitCode }

    public init(output: String, isError: Bool, exitCode: Int? = nil, closingNotes: String = "") {
        self.output = output
        self.isError = isError
        self.exitCode = exitCode
        self.closingNotes = output.hasSuffix(closingNotes) ? closingNotes : ""
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            output: try c.decode(String.self, forKey: .output), isError: try c.decode(Bool.self, forKey: .isError),
            exitCode: try c.decodeIfPresent(Int.self, forKey: .exitCode))
    }

    /// `output` without its closing notes.
    public var body: String { String(output.dropLast(closingNotes.count)) }

    /// Equal when what the Brain sees is (the closing notes are part of `output`).
    public static func == (a: ToolResult, b: ToolResult) -> Bool {
        a.output == b.output && a.isError == b.isError && a.exitCode == b.exitCode
    }

    public static func error(_ message: String) -> ToolResult { ToolResult(output: message, isError: true) }
}

/// One field of a tool's input: what its JSON Schema says and what `ToolCall.decode` enforces.
public struct ToolField: Sendable {
    public enum Kind: Sendable, Equatable {
        case string
        /// A string that is one of these values.
        case oneOf([String])
        /// A number of seconds, above 0 and at most `max`.
        case seconds(max: Int)
    }

    public let name: String
    public let kind: Kind
    public let required: Bool
    public let description: String

    public init(_ name: String, _ kind: Kind, required: Bool = false, _ description: String) {
        self.name = name
        self.kind = kind
        self.required = required
        self.description = description
    }

    /// The field's JSON Schema.
    var schema: [String: Any] {
        switch kind {
        case .string: ["type": "string", "description": description]
        case .oneOf(let values): ["type": "string", "enum": values, "description": description]
        case .seconds(let max): ["type": "number", "exclusiveMinimum": 0, "maximum": max, "description": description]
        }
    }

    /// The field in a one-line usage: `"timeout_s"?: number`.
    var usage: String {
        let type =
            switch kind {
            case .string: "string"
            case .oneOf(let values): values.map { "\"\($0)\"" }.joined(separator: "|")
            case .seconds: "number"
            }
        return "\"\(name)\"\(required ? "" : "?"): \(type)"
    }
}

/// A tool every Hands driver serves: its name, what it does, and its input fields — the one
/// source of the catalog (`GET /v1/tools`, MCP's `tools/list`) and of the decoder's checks.
public struct ToolSpec: Sendable {
    public let name: String
    public let description: String
    public let fields: [ToolField]

    /// The input's JSON Schema, ready for `JSONSerialization`:
    /// `{"type": "object", "properties": {…}, "required": […], "additionalProperties": false}`.
    public var inputSchema: [String: Any] {
        [
            "type": "object",
            "properties": Dictionary(uniqueKeysWithValues: fields.map { ($0.name, $0.schema) }),
            "required": fields.filter(\.required).map(\.name),
            "additionalProperties": false,
        ]
    }

    /// The input in one line, for error messages: `{"command": string, "timeout_s"?: number}`.
    public var usage: String { "{" + fields.map(\.usage).joined(separator: ", ") + "}" }

    /// Checks `object` against the fields: required ones present, each of its type, no other.
    /// - Throws: `HandsError.invalidRequest` naming the field and saying what the tool takes.
    func check(_ object: [String: JSONValue]) throws {
        let usage = "\(name) takes \(usage)"
        for field in fields {
            guard let value = object[field.name] else {
                if field.required { throw HandsError(.invalidRequest, "\(name): missing field '\(field.name)'; \(usage)") }
                continue
            }
            switch field.kind {
            case .string:
                guard case .string = value else { throw HandsError(.invalidRequest, "\(name): field '\(field.name)' must be a string; \(usage)") }
            case .oneOf(let values):
                guard case .string(let s) = value, values.contains(s) else {
                    throw HandsError(.invalidRequest, "\(name): \(field.name) '\(value.compactText)' is not one of \(values.joined(separator: ", "))")
                }
            case .seconds(let max):
                guard case .number(let n) = value, n > 0, n <= Double(max) else {
                    throw HandsError(.invalidRequest, "\(name): \(field.name) must be a number of seconds between 0 and \(max)")
                }
            }
        }
        if let extra = object.keys.sorted().first(where: { key in !fields.contains { $0.name == key } }) {
            throw HandsError(.invalidRequest, "\(name): unknown field '\(extra)'; \(usage)")
        }
    }
}

extension JSONValue {
    /// The value as compact JSON text, for error messages.
    fileprivate var compactText: String { String(decoding: data, as: UTF8.self) }
}

/// A tool call decoded and checked against the tool's input schema.
public enum ToolCall: Sendable, Equatable {
    case bash(command: String, timeout: Duration?, cwd: String?)
    case readFile(path: String, base64: Bool)
    case writeFile(path: String, contents: [UInt8])
    case listFiles(path: String)

    /// The tools every Hands driver serves.
    public static let catalog: [ToolSpec] = [
        ToolSpec(
            name: "bash",
            description: "Run a shell command (sh -c) in the task's sandbox; returns stdout, then stderr, then the exit code when it is not 0.",
            fields: [
                ToolField("command", .string, required: true, "the shell command"),
                ToolField("timeout_s", .seconds(max: 86400), "seconds before the command is killed (capped by the policy)"),
                ToolField("cwd", .string, "working directory (default /workspace)"),
            ]),
        ToolSpec(
            name: "read_file", description: "Read a file from the task's sandbox (relative paths are under /workspace).",
            fields: [
                ToolField("path", .string, required: true, "the file to read"),
                ToolField("encoding", .oneOf(["utf8", "base64"]), "utf8 (default) or base64 for binary files"),
            ]),
        ToolSpec(
            name: "write_file", description: "Write a file in the task's sandbox, creating its directories (relative paths are under /workspace).",
            fields: [
                ToolField("path", .string, required: true, "the file to write"),
                ToolField("content", .string, required: true, "the file's content"),
                ToolField("encoding", .oneOf(["utf8", "base64"]), "how content is encoded: utf8 (default) or base64"),
            ]),
        ToolSpec(
            name: "list_files", description: "List a directory of the task's sandbox (ls -lA).",
            fields: [ToolField("path", .string, "the directory (default /workspace)")]),
    ]

    /// Decodes `input` (JSON text of an object; empty means `{}`) for tool `name`.
    /// - Throws: `HandsError.invalidRequest` when the text is not a JSON object, or as
    ///   `decode(name:input:)` for a `JSONValue`.
    public static func decode(name: String, input: [UInt8]) throws -> ToolCall {
        let value: JSONValue
        do {
            value = try JSONValue(data: Data(input.isEmpty ? Array("{}".utf8) : input))
        } catch {
            throw HandsError(.invalidRequest, "\(name): input is not valid JSON (\(error.localizedDescription)); it must be a JSON object")
        }
        return try decode(name: name, input: value)
    }

    /// Decodes `input` for tool `name`: the one place a tool's input is checked and typed, so
    /// that what runs is exactly what was checked (and journaled, through `input`).
    /// - Parameters:
    ///   - name: the tool (`bash`, `read_file`, `write_file`, `list_files`).
    ///   - input: the tool's input, a JSON object.
    /// - Throws: `HandsError.invalidRequest` saying which field is missing or wrong and what
    ///   the tool takes.
    public static func decode(name: String, input: JSONValue) throws -> ToolCall {
        guard let tool = catalog.first(where: { $0.name == name }) else {
            throw HandsError(.invalidRequest, "unknown tool '\(name)'; the tools are \(catalog.map(\.name).joined(separator: ", "))")
        }
        guard case .object(let object) = input else {
            throw HandsError(.invalidRequest, "\(name): input must be a JSON object; \(name) takes \(tool.usage)")
        }
        try tool.check(object)
        // `check` has made sure that required fields are there and that each has its type.
        func string(_ key: String) -> String? { object[key]?.stringValue }
        switch name {
        case "bash":
            let cwd = string("cwd")
            if let cwd, cwd.isEmpty { throw HandsError(.invalidRequest, "bash: cwd must not be empty") }
            var timeout: Duration?
            if case .number(let seconds)? = object["timeout_s"] { timeout = .milliseconds(Int64((seconds * 1000).rounded())) }
            return .bash(command: string("command") ?? "", timeout: timeout, cwd: cwd)
        case "read_file":
            return .readFile(path: try checkedPath(string("path") ?? "", tool: name), base64: string("encoding") == "base64")
        case "write_file":
            let path = try checkedPath(string("path") ?? "", tool: name)
            let content = string("content") ?? ""
            guard string("encoding") == "base64" else { return .writeFile(path: path, contents: Array(content.utf8)) }
            guard let data = Data(base64Encoded: content) else { throw HandsError(.invalidRequest, "write_file: content is not valid base64") }
            return .writeFile(path: path, contents: Array(data))
        default:
            return .listFiles(path: try checkedPath(string("path") ?? ContainerDriver.workspace, tool: name))
        }
    }

    /// The tool's name.
    public var name: String {
        switch self {
        case .bash: "bash"
        case .readFile: "read_file"
        case .writeFile: "write_file"
        case .listFiles: "list_files"
        }
    }

    /// The call's input in canonical form: every field spelled out the one way `decode`
    /// reads back to the same call (defaults explicit, file content as UTF-8 text when it is
    /// text, else base64). Journaled as the intent's input and hashed to tell a reused
    /// idempotency key's call apart from a different one.
    public var canonicalInput: JSONValue {
        switch self {
        case .bash(let command, let timeout, let cwd):
            var object: [String: JSONValue] = ["command": .string(command)]
            if let timeout {
                let c = timeout.components
                object["timeout_s"] = .number(Double(c.seconds) + Double(c.attoseconds) / 1e18)
            }
            if let cwd { object["cwd"] = .string(cwd) }
            return .object(object)
        case .readFile(let path, let base64):
            return .object(["path": .string(path), "encoding": .string(base64 ? "base64" : "utf8")])
        case .writeFile(let path, let contents):
            if let text = String(validating: contents, as: UTF8.self) {
                return .object(["path": .string(path), "content": .string(text), "encoding": .string("utf8")])
            }
            return .object(["path": .string(path), "content": .string(Data(contents).base64EncodedString()), "encoding": .string("base64")])
        case .listFiles(let path):
            return .object(["path": .string(path)])
        }
    }

    /// `{"input": canonicalInput, "tool": name}` as compact JSON with sorted keys: the same
    /// bytes for the same call, whatever spelling the caller used.
    public var canonicalEncoding: [UInt8] {
        Array(JSONValue.object(["tool": .string(name), "input": canonicalInput]).data)
    }

    private static func checkedPath(_ path: String, tool: String) throws -> String {
        guard !path.isEmpty else { throw HandsError(.invalidRequest, "\(tool): path must not be empty") }
        guard !path.utf8.contains(0) else { throw HandsError(.invalidRequest, "\(tool): path contains a NUL byte") }
        guard !path.hasSuffix("/") || tool == "list_files" else { throw HandsError(.invalidRequest, "\(tool): path '\(path)' names a directory") }
        return path
    }
}

/// Runs decoded tool calls on a sandbox and renders their results as strings.
enum ToolRunner {
    /// Runs `call`; `output`, when given, sees a `bash` command's output as it is produced.
    static func run(_ call: ToolCall, on sandbox: SandboxHandle, driver: any HandsDriver, output: OutputSink? = nil) async throws -> ToolResult {
        let spec = sandbox.spec
        switch call {
        case .bash(let command, let timeout, let cwd):
            let limit = min(timeout ?? spec.commandTimeout, spec.commandTimeout)
            let out = try await driver.run(["sh", "-c", command], in: sandbox, workingDirectory: cwd, timeout: limit, output: output)
            return render(out, limit: spec.outputLimitBytes, timeout: limit)
        case .readFile(let path, let base64):
            let bytes = try await driver.readFile(path, in: sandbox)
            if base64 { return ToolResult(output: Data(bytes).base64EncodedString(), isError: false) }
            guard let text = String(validating: bytes, as: UTF8.self) else {
                return .error("\(path) is binary (\(bytes.count) bytes); call read_file with \"encoding\": \"base64\"")
            }
            return ToolResult(output: text, isError: false)
        case .writeFile(let path, let contents):
            try await driver.writeFile(path, contents: contents, in: sandbox)
            return ToolResult(output: "wrote \(contents.count) bytes to \(path)", isError: false)
        case .listFiles(let path):
            let out = try await driver.run(["ls", "-lA", "--", path], in: sandbox, workingDirectory: nil, timeout: .seconds(30))
            if out.exitCode != 0 {
                return .error("list_files \(path): \(String(decoding: out.stderr, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))")
            }
            return ToolResult(output: String(decoding: out.stdout, as: UTF8.self), isError: false)
        }
    }

    /// stdout, then stderr under a marker, then the exit status when it is not 0; output
    /// beyond `limit` bytes is cut with a note saying how much.
    static func render(_ out: CommandOutput, limit: Int, timeout: Duration) -> ToolResult {
        var stdout = out.stdout
        var stderr = out.stderr
        let total = stdout.count + stderr.count
        var cut = 0
        if total > limit {
            let keepOut = min(stdout.count, max(limit / 2, limit - stderr.count))
            let keepErr = max(0, limit - keepOut)
            cut = total - keepOut - min(keepErr, stderr.count)
            stdout = Array(stdout.prefix(keepOut))
            stderr = Array(stderr.prefix(keepErr))
        }
        // What the driver cut before (the sandbox's agent counts it).
        cut += out.cutBytes
        var text = String(decoding: stdout, as: UTF8.self)
        if !stderr.isEmpty {
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text += "[stderr]\n" + String(decoding: stderr, as: UTF8.self)
        }
        // The closing notes, each on a line of its own after the output; they start at the
        // newline before the first one (the output's own last newline, if it has one).
        var bodyLength: Int?
        func markNotes() {
            if bodyLength == nil { bodyLength = text.hasSuffix("\n") ? text.count - 1 : text.count }
        }
        if cut > 0 || out.truncated {
            markNotes()
            if !text.hasSuffix("\n") { text += "\n" }
            text += "[output cut: \(cut > 0 ? "\(cut) more bytes" : "more bytes") beyond the limit of \(formatBytes(limit))]"
        }
        if out.timedOut {
            markNotes()
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text += "[command timed out after \(timeout) and was killed]"
        } else if out.exitCode != 0 {
            markNotes()
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text += "[exit code \(out.exitCode)]"
        }
        let notes = bodyLength.map { String(text.dropFirst(max(0, $0))) } ?? ""
        return ToolResult(output: text, isError: out.timedOut || out.exitCode != 0, exitCode: out.exitCode, closingNotes: notes)
    }
}

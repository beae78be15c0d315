import Foundation

/// What a tool call returns to the Brain: always a string, marked when it is an error.
public struct ToolResult: Sendable, Codable, Equatable {
    public var output: String
    public var isError: Bool
    /// The command's exit code, for `bash`.
    public var exitCode: Int?

    public init(output: String, isError: Bool, exitCode: Int? = nil) {
        self.output = output
        self.isError = isError
        self.exitCode = exitCode
    }

    public static func error(_ message: String) -> ToolResult { ToolResult(output: message, isError: true) }
}

/// A tool call decoded and checked against the tool's input schema.
public enum ToolCall: Sendable, Equatable {
    case bash(command: String, timeout: Duration?, cwd: String?)
    case readFile(path: String, base64: Bool)
    case writeFile(path: String, contents: [UInt8])
    case listFiles(path: String)

    /// The tools every Hands driver serves, with their inputs.
    public static let catalog: [(name: String, input: String, summary: String)] = [
        ("bash", #"{"command": string, "timeout_s"?: number, "cwd"?: string}"#, "run a shell command in the task's sandbox"),
        ("read_file", #"{"path": string, "encoding"?: "utf8"|"base64"}"#, "read a file (relative paths are under /workspace)"),
        ("write_file", #"{"path": string, "content": string, "encoding"?: "utf8"|"base64"}"#, "write a file, creating directories"),
        ("list_files", #"{"path"?: string}"#, "list a directory (default /workspace)"),
    ]

    /// Decodes `input` (a JSON object) for tool `name`.
    /// - Throws: `HandsError.invalidRequest` saying which field is missing or wrong and what
    ///   the tool takes.
    public static func decode(name: String, input: [UInt8]) throws -> ToolCall {
        guard let tool = catalog.first(where: { $0.name == name }) else {
            throw HandsError(.invalidRequest, "unknown tool '\(name)'; the tools are \(catalog.map(\.name).joined(separator: ", "))")
        }
        let usage = "\(name) takes \(tool.input)"
        let object: [String: Any]
        do {
            guard let o = try JSONSerialization.jsonObject(with: Data(input.isEmpty ? Array("{}".utf8) : input)) as? [String: Any] else {
                throw HandsError(.invalidRequest, "\(name): input must be a JSON object; \(usage)")
            }
            object = o
        } catch let error as HandsError {
            throw error
        } catch {
            throw HandsError(.invalidRequest, "\(name): input is not valid JSON (\(error.localizedDescription)); \(usage)")
        }
        func string(_ key: String, required: Bool) throws -> String? {
            guard let value = object[key] else {
                if required { throw HandsError(.invalidRequest, "\(name): missing field '\(key)'; \(usage)") }
                return nil
            }
            guard let s = value as? String else { throw HandsError(.invalidRequest, "\(name): field '\(key)' must be a string; \(usage)") }
            return s
        }
        func base64(_ encoding: String?) throws -> Bool {
            switch encoding {
            case nil, "utf8", "utf-8": return false
            case "base64": return true
            case let other?: throw HandsError(.invalidRequest, "\(name): encoding '\(other)' is not one of utf8, base64")
            }
        }
        let known: Set<String>
        let call: ToolCall
        switch name {
        case "bash":
            known = ["command", "timeout_s", "cwd"]
            let command = try string("command", required: true)!
            var timeout: Duration?
            if let t = object["timeout_s"] {
                guard let n = t as? NSNumber, !(String(describing: type(of: t)).contains("Boolean") || type(of: t) == Bool.self), n.doubleValue > 0, n.doubleValue <= 86400 else {
                    throw HandsError(.invalidRequest, "bash: timeout_s must be a number of seconds between 0 and 86400")
                }
                timeout = .milliseconds(Int64(n.doubleValue * 1000))
            }
            let cwd = try string("cwd", required: false)
            if let cwd, cwd.isEmpty { throw HandsError(.invalidRequest, "bash: cwd must not be empty") }
            call = .bash(command: command, timeout: timeout, cwd: cwd)
        case "read_file":
            known = ["path", "encoding"]
            call = .readFile(path: try checkedPath(try string("path", required: true)!, tool: name), base64: try base64(try string("encoding", required: false)))
        case "write_file":
            known = ["path", "content", "encoding"]
            let path = try checkedPath(try string("path", required: true)!, tool: name)
            let content = try string("content", required: true)!
            if try base64(try string("encoding", required: false)) {
                guard let data = Data(base64Encoded: content) else {
                    throw HandsError(.invalidRequest, "write_file: content is not valid base64")
                }
                call = .writeFile(path: path, contents: Array(data))
            } else {
                call = .writeFile(path: path, contents: Array(content.utf8))
            }
        default:
            known = ["path"]
            call = .listFiles(path: try checkedPath(try string("path", required: false) ?? ContainerDriver.workspace, tool: name))
        }
        if let extra = object.keys.sorted().first(where: { !known.contains($0) }) {
            throw HandsError(.invalidRequest, "\(name): unknown field '\(extra)'; \(usage)")
        }
        return call
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
    static func run(_ call: ToolCall, on sandbox: SandboxHandle, driver: any HandsDriver) async throws -> ToolResult {
        let spec = sandbox.spec
        switch call {
        case .bash(let command, let timeout, let cwd):
            let limit = min(timeout ?? spec.commandTimeout, spec.commandTimeout)
            let out = try await driver.run(["sh", "-c", command], in: sandbox, workingDirectory: cwd, timeout: limit)
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
        var text = String(decoding: stdout, as: UTF8.self)
        if !stderr.isEmpty {
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text += "[stderr]\n" + String(decoding: stderr, as: UTF8.self)
        }
        if cut > 0 || out.truncated {
            if !text.hasSuffix("\n") { text += "\n" }
            text += "[output cut: \(cut > 0 ? "\(cut) more bytes" : "more bytes") beyond the limit of \(formatBytes(limit))]"
        }
        if out.timedOut {
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text += "[command timed out after \(timeout) and was killed]"
            return ToolResult(output: text, isError: true, exitCode: out.exitCode)
        }
        if out.exitCode != 0 {
            if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
            text += "[exit code \(out.exitCode)]"
        }
        return ToolResult(output: text, isError: out.exitCode != 0, exitCode: out.exitCode)
    }
}

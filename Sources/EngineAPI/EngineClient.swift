import Foundation

/// A typed client of the Docker Engine API (served by Docker or by Podman's
/// `podman system service`), over any `HTTPTransport` — libcurl by default.
///
/// It knows containers, images and execs, and nothing about sessions or tasks. Every call
/// has a timeout and honours task cancellation; failures are `EngineError`s that keep
/// transport, HTTP and decoding apart.
public struct EngineClient: Sendable {
    public let endpoint: EngineEndpoint
    public let apiVersion: String
    private let transport: any HTTPTransport
    /// Timeout of calls that do not run user commands.
    public var requestTimeout: Duration

    /// - Parameters:
    ///   - endpoint: where the engine listens.
    ///   - apiVersion: the API version prefix, `1.41` by default (Docker 20.10; Podman 4 serves it).
    ///   - transport: the wire; `CurlTransport` when nil.
    public init(
        endpoint: EngineEndpoint, apiVersion: String = "1.41", transport: (any HTTPTransport)? = nil,
        requestTimeout: Duration = .seconds(30)
    ) {
        self.endpoint = endpoint
        self.apiVersion = apiVersion
        self.transport = transport ?? CurlTransport(endpoint: endpoint)
        self.requestTimeout = requestTimeout
    }

    /// A client for `$AGENTD_ENGINE`.
    /// - Throws: `EngineError.invalidArgument` when it is unset or malformed, saying to run `make env`.
    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment) throws -> EngineClient {
        guard let text = environment[EngineEndpoint.environmentVariable], !text.isEmpty else {
            throw EngineError(
                .invalidArgument,
                "\(EngineEndpoint.environmentVariable) is not set; run `eval \"$(make -s env)\"` to start the container engine and set it")
        }
        return EngineClient(endpoint: try EngineEndpoint(parsing: text))
    }

    // MARK: - System

    /// `GET /_ping`: the engine's answer (`OK`).
    public func ping() async throws -> String {
        let response = try await call("GET", "/_ping", versioned: false)
        return String(decoding: response.body, as: UTF8.self)
    }

    /// `GET /version`.
    public func version() async throws -> EngineVersion {
        try decode(EngineVersion.self, from: try await call("GET", "/version"), what: "version")
    }

    // MARK: - Images

    /// `POST /images/create?fromSrc=-`: imports a root filesystem tarball as `repository:tag`.
    /// - Parameter tarball: path of a tar archive of the root filesystem; streamed, not loaded.
    public func importImage(tarball: String, repository: String, tag: String = "latest", timeout: Duration = .seconds(300)) async throws {
        // The tag goes into `repo` ("the repo may include a tag", says the API reference):
        // Podman 4 ignores the separate `tag` parameter, Docker accepts both forms.
        let query = "fromSrc=-&repo=\(escape(repository + ":" + tag))"
        let response = try await call(
            "POST", "/images/create?\(query)", body: .file(path: tarball, contentType: "application/x-tar"), timeout: timeout)
        // Progress comes as a stream of JSON objects; an error may arrive with status 200.
        for line in String(decoding: response.body, as: UTF8.self).split(whereSeparator: \.isNewline) {
            if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                let error = object["error"] as? String
            {
                throw EngineError(.http, "importing \(tarball) as \(repository):\(tag) failed: \(error)", status: response.status, engineMessage: error)
            }
        }
    }

    /// `GET /images/{name}/json`: whether the engine has the image.
    public func imageExists(_ reference: String) async throws -> Bool {
        do {
            _ = try await call("GET", "/images/\(escape(reference))/json")
            return true
        } catch let error as EngineError where error.isNotFound {
            return false
        }
    }

    // MARK: - Containers

    /// `POST /containers/create`.
    /// - Returns: the new container's id.
    /// - Throws: `EngineError` with the engine's own message, e.g. for an unknown image.
    public func createContainer(_ spec: ContainerSpec, name: String? = nil) async throws -> String {
        struct Created: Decodable { var Id: String }
        let body = try JSONEncoder().encode(spec)
        let target = "/containers/create" + (name.map { "?name=\(escape($0))" } ?? "")
        let response = try await call("POST", target, body: .bytes(Array(body), contentType: "application/json"))
        return try decode(Created.self, from: response, what: "container create").Id
    }

    /// `POST /containers/{id}/start`.
    public func startContainer(_ id: String) async throws {
        _ = try await call("POST", "/containers/\(escape(id))/start")
    }

    /// `DELETE /containers/{id}?force=…&v=true`.
    /// - Returns: false when there was no such container (already gone), true when removed.
    @discardableResult
    public func removeContainer(_ id: String, force: Bool = true) async throws -> Bool {
        do {
            _ = try await call("DELETE", "/containers/\(escape(id))?force=\(force)&v=true")
            return true
        } catch let error as EngineError where error.isNotFound {
            return false
        }
    }

    /// `GET /containers/json?all=true&filters={"label":[…]}`: containers carrying all `labels`.
    public func listContainers(labels: [String: String] = [:], all: Bool = true) async throws -> [ContainerSummary] {
        var target = "/containers/json?all=\(all)"
        if !labels.isEmpty {
            let filters = ["label": labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }]
            let json = String(decoding: try JSONEncoder().encode(filters), as: UTF8.self)
            target += "&filters=\(escape(json))"
        }
        return try decode([ContainerSummary].self, from: try await call("GET", target), what: "container list")
    }

    // MARK: - Exec

    /// Runs `command` in the running container `id` and returns its stdout, stderr (apart and
    /// byte-exact) and exit code: `POST /containers/{id}/exec`, `POST /exec/{id}/start` (the
    /// multiplexed stream), `GET /exec/{id}/json`.
    /// - Parameters:
    ///   - timeout: the whole exec must finish within this, or `.timeout` is thrown.
    ///   - maxOutputBytes: the multiplexed output beyond this is cut and `truncated` is set.
    public func exec(
        _ id: String, command: [String], environment: [String] = [], workingDirectory: String? = nil,
        user: String? = nil, timeout: Duration = .seconds(120), maxOutputBytes: Int = 64 << 20
    ) async throws -> ExecResult {
        struct ExecCreate: Encodable {
            var AttachStdin = false
            var AttachStdout = true
            var AttachStderr = true
            var Tty = false
            var Cmd: [String]
            var Env: [String]?
            var WorkingDir: String?
            var User: String?
        }
        struct Created: Decodable { var Id: String }
        struct ExecInspect: Decodable {
            var ExitCode: Int?
            var Running: Bool?
        }
        guard !command.isEmpty else { throw EngineError(.invalidArgument, "exec needs a command") }
        let create = ExecCreate(
            Cmd: command, Env: environment.isEmpty ? nil : environment, WorkingDir: workingDirectory, User: user)
        let created = try decode(
            Created.self,
            from: try await call(
                "POST", "/containers/\(escape(id))/exec",
                body: .bytes(Array(try JSONEncoder().encode(create)), contentType: "application/json")),
            what: "exec create")
        let start = #"{"Detach":false,"Tty":false}"#
        let stream = try await call(
            "POST", "/exec/\(created.Id)/start", body: .bytes(Array(start.utf8), contentType: "application/json"),
            timeout: timeout, maxResponseBytes: maxOutputBytes)
        let (stdout, stderr, _) = StreamDemultiplexer.split(stream.body)
        let inspect = try decode(ExecInspect.self, from: try await call("GET", "/exec/\(created.Id)/json"), what: "exec inspect")
        guard let exitCode = inspect.ExitCode, inspect.Running != true else {
            throw EngineError(.decoding, "the engine reported no exit code for exec \(created.Id) in container \(id)")
        }
        return ExecResult(stdout: stdout, stderr: stderr, exitCode: exitCode, truncated: stream.truncated)
    }

    // MARK: - plumbing

    func call(
        _ method: String, _ path: String, versioned: Bool = true, body: HTTPRequest.Body = .none,
        timeout: Duration? = nil, maxResponseBytes: Int = 64 << 20
    ) async throws -> HTTPResponse {
        let target = versioned ? "/v\(apiVersion)\(path)" : path
        let request = HTTPRequest(
            method: method, target: target, body: body, timeout: timeout ?? requestTimeout, maxResponseBytes: maxResponseBytes)
        let response = try await transport.send(request)
        guard (200..<300).contains(response.status) else {
            let raw = String(decoding: response.body.prefix(4096), as: UTF8.self)
            let engineMessage = (try? JSONDecoder().decode(EngineMessage.self, from: Data(response.body)))?.message ?? raw
            let route = path.split(separator: "?").first.map(String.init) ?? path
            throw EngineError(
                .http, "the container engine refused \(method) \(route) (HTTP \(response.status)): \(engineMessage)",
                status: response.status, engineMessage: engineMessage)
        }
        return response
    }

    private func decode<T: Decodable>(_ type: T.Type, from response: HTTPResponse, what: String) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: Data(response.body))
        } catch {
            let excerpt = String(decoding: response.body.prefix(200), as: UTF8.self)
            throw EngineError(.decoding, "the engine's \(what) answer is not what the Docker Engine API specifies: \(excerpt)", cause: error)
        }
    }

    private func escape(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .urlQueryValueAllowed) ?? text
    }
}

private struct EngineMessage: Decodable { var message: String }

extension CharacterSet {
    fileprivate static let urlQueryValueAllowed: CharacterSet = {
        var set = CharacterSet.alphanumerics
        set.insert(charactersIn: "-._~:")
        return set
    }()
}

extension EngineClient {
    /// `DELETE /images/{name}`.
    /// - Returns: false when there was no such image.
    @discardableResult
    public func removeImage(_ reference: String, force: Bool = false) async throws -> Bool {
        do {
            _ = try await call("DELETE", "/images/\(reference)?force=\(force)")
            return true
        } catch let error as EngineError where error.isNotFound {
            return false
        }
    }
}

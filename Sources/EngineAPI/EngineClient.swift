@_exported import CurlHTTP
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
    let transport: any HTTPTransport
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
        self.transport = transport ?? CurlTransport(endpoint: endpoint.http)
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
        let response: HTTPResponse
        do {
            response = try await transport.send(request)
        } catch let error as HTTPClientError {
            throw EngineError(transportError: error, endpoint: endpoint)
        }
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

    func decode<T: Decodable>(_ type: T.Type, from response: HTTPResponse, what: String) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: Data(response.body))
        } catch {
            let excerpt = String(decoding: response.body.prefix(200), as: UTF8.self)
            throw EngineError(.decoding, "the engine's \(what) answer is not what the Docker Engine API specifies: \(excerpt)", cause: error)
        }
    }

    func escape(_ text: String) -> String {
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

// MARK: - Inspect, kill, wait, rename, archive

extension EngineClient {
    /// `GET /containers/{id}/json`.
    public func inspectContainer(_ id: String) async throws -> ContainerInspect {
        try decode(ContainerInspect.self, from: try await call("GET", "/containers/\(escape(id))/json"), what: "container inspect")
    }

    /// `POST /containers/{id}/kill?signal=…`.
    public func killContainer(_ id: String, signal: String = "KILL") async throws {
        _ = try await call("POST", "/containers/\(escape(id))/kill?signal=\(escape(signal))")
    }

    /// `POST /containers/{id}/wait`: blocks until the container stops; returns its exit code.
    public func waitContainer(_ id: String, timeout: Duration = .seconds(60)) async throws -> Int {
        struct Waited: Decodable { var StatusCode: Int }
        return try decode(Waited.self, from: try await call("POST", "/containers/\(escape(id))/wait", timeout: timeout), what: "container wait").StatusCode
    }

    /// `POST /containers/{id}/rename?name=…`.
    public func renameContainer(_ id: String, to name: String) async throws {
        _ = try await call("POST", "/containers/\(escape(id))/rename?name=\(escape(name))")
    }

    /// `PUT /containers/{id}/archive?path=…`: extracts `tar` into directory `path`.
    public func putArchive(_ id: String, directory path: String, tar: [UInt8], timeout: Duration? = nil) async throws {
        _ = try await call(
            "PUT", "/containers/\(escape(id))/archive?path=\(escape(path))",
            body: .bytes(tar, contentType: "application/x-tar"), timeout: timeout)
    }

    /// `GET /containers/{id}/archive?path=…`: a tar of the file or directory at `path`.
    /// - Parameter maxBytes: larger archives are refused with `.invalidArgument`.
    public func getArchive(_ id: String, path: String, maxBytes: Int = 256 << 20, timeout: Duration? = nil) async throws -> [UInt8] {
        let response = try await call(
            "GET", "/containers/\(escape(id))/archive?path=\(escape(path))", timeout: timeout, maxResponseBytes: maxBytes)
        if response.truncated {
            throw EngineError(.invalidArgument, "\(path) is larger than \(maxBytes) bytes")
        }
        return response.body
    }

    /// Writes one file into a container (a tar of one entry through `putArchive`).
    public func putFile(_ id: String, path: String, contents: [UInt8], mode: Int = 0o644, uid: Int = 0, gid: Int = 0) async throws {
        let (directory, name) = Self.split(path)
        let tar = TarArchive.singleFile(name: name, contents: contents, mode: mode, uid: uid, gid: gid, mtime: Int(Date().timeIntervalSince1970))
        try await putArchive(id, directory: directory, tar: tar)
    }

    /// Reads one regular file out of a container.
    /// - Throws: `EngineError.invalidArgument` when `path` is not a regular file.
    public func getFile(_ id: String, path: String, maxBytes: Int = 256 << 20) async throws -> [UInt8] {
        let entries = try TarArchive.entries(try await getArchive(id, path: path, maxBytes: maxBytes + 64 << 10))
        guard let first = entries.first else { throw EngineError(.invalidArgument, "\(path): the engine returned an empty archive") }
        switch first.kind {
        case .file:
            guard first.size <= maxBytes else { throw EngineError(.invalidArgument, "\(path) is larger than \(maxBytes) bytes") }
            return first.bytes
        case .directory: throw EngineError(.invalidArgument, "\(path) is a directory")
        case .symlink: throw EngineError(.invalidArgument, "\(path) is a symbolic link")
        case .other: throw EngineError(.invalidArgument, "\(path) is not a regular file")
        }
    }

    /// `/a/b/c` → (`/a/b`, `c`); `/c` → (`/`, `c`); `c` → (`.`, `c`).
    public static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let directory = String(path[..<slash])
        return (directory.isEmpty ? "/" : directory, String(path[path.index(after: slash)...]))
    }

    /// Negotiates the API version: the engine's own when it is older than ours.
    public func negotiated() async throws -> EngineClient {
        let version = try await version()
        func parts(_ v: String) -> [Int] { v.split(separator: ".").compactMap { Int($0) } }
        let theirs = parts(version.ApiVersion)
        let ours = parts(apiVersion)
        // Podman reports its own version (4.x) here and serves every Docker 1.x version.
        guard theirs.first == 1, theirs.lexicographicallyPrecedes(ours) else { return self }
        return EngineClient(endpoint: endpoint, apiVersion: version.ApiVersion, transport: transport, requestTimeout: requestTimeout)
    }
}

// MARK: - Images and events

/// `GET /images/{name}/json`: the fields agentd reads.
public struct ImageInspect: Decodable, Sendable {
    public var Id: String
    public var RepoTags: [String]?
    public var Size: Int?
    public var Created: String?
}

/// One record of `GET /events`.
public struct EngineEvent: Decodable, Sendable {
    public struct Actor: Decodable, Sendable {
        public var ID: String?
        public var Attributes: [String: String]?
    }
    public var `Type`: String?
    public var Action: String?
    public var Actor: Actor?
    public var time: Int?
}

extension EngineClient {
    /// `GET /images/{name}/json`.
    /// - Throws: `EngineError` with status 404 (`isNotFound`) for an unknown image.
    public func inspectImage(_ reference: String) async throws -> ImageInspect {
        try decode(ImageInspect.self, from: try await call("GET", "/images/\(escape(reference))/json"), what: "image inspect")
    }

    /// `GET /events?since=…&until=…&filters=…`: the engine's events in a closed time window
    /// (Unix seconds), e.g. every `die` or `oom` of the containers carrying `labels`.
    ///
    /// Podman 4 (file events backend) answers nothing at all once `until` has passed: ask with
    /// an `until` at least a second ahead; the call then returns when `until` comes.
    public func events(since: Int, until: Int, labels: [String: String] = [:], types: [String] = []) async throws -> [EngineEvent] {
        var filters: [String: [String]] = [:]
        if !labels.isEmpty { filters["label"] = labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" } }
        if !types.isEmpty { filters["type"] = types }
        var target = "/events?since=\(since)&until=\(until)"
        if !filters.isEmpty { target += "&filters=\(escape(String(decoding: try JSONEncoder().encode(filters), as: UTF8.self)))" }
        let response = try await call("GET", target, timeout: .seconds(Int64(max(5, until - since + 5))))
        var out: [EngineEvent] = []
        for line in String(decoding: response.body, as: UTF8.self).split(whereSeparator: \.isNewline) where !line.isEmpty {
            do {
                out.append(try JSONDecoder().decode(EngineEvent.self, from: Data(line.utf8)))
            } catch {
                throw EngineError(.decoding, "the engine's event stream has a line that is not an event: \(line.prefix(200))", cause: error)
            }
        }
        return out
    }
}

import Foundation

/// A real git smart-HTTP server over TLS on 127.0.0.1, for one test: nginx (TLS and the token
/// check) in front of fcgiwrap running `git http-backend`, Debian's packages, started as plain
/// child processes with their own configuration, pid and log files in a temporary directory.
///
/// It serves bare repositories `owner/repo.git` under `repositoriesRoot`, each created with an
/// initial commit on `main` and pushes allowed. Every request must carry the fixture's random
/// canary `token`, as `Authorization: Bearer <token>` (what the vault-proxy injects) or as
/// the password of basic auth with the user `x-access-token`; anything else gets 401. The
/// access log records, per request, the `tokenID` of the token used (never the token itself).
public final class GitHTTPServer: @unchecked Sendable {
    // Invariant: `nginx` and `fcgiwrap` are set by `start` and cleared once by `stop` (under `lock`).
    public let directory: String
    public let ca: TestCA
    public let port: Int
    /// The secret a client must present: a canary a test looks for where it must not be.
    public let token: String
    /// The name the access log uses for `token`.
    public let tokenID: String
    public var repositoriesRoot: String { directory + "/repos" }
    public var accessLogPath: String { directory + "/access.log" }
    public var errorLogPath: String { directory + "/error.log" }
    private let lock = NSLock()
    private var nginx: ChildProcess?
    private var fcgiwrap: ChildProcess?

    /// The user the canary authenticates as with basic auth.
    public static let basicUser = "x-access-token"

    /// `https://127.0.0.1:<port>/<repository>.git` (or with `host` instead of the address).
    public func url(_ repository: String, host: String = "127.0.0.1") -> String {
        "https://\(host):\(port)/\(repository).git"
    }

    /// The environment a host-side git needs to talk to this server: the test CA, and no
    /// user or system configuration.
    public var gitEnvironment: [String: String] {
        ["GIT_SSL_CAINFO": ca.caPath, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0"]
    }

    /// git's `-c` arguments that send the token as the vault-proxy would.
    public var bearerArguments: [String] { ["-c", "http.extraHeader=Authorization: Bearer \(token)"] }

    /// Starts a server with `repositories` (`owner/repo`) created, runs `body`, and stops it
    /// whatever `body` does.
    public static func with<T>(repositories: [String] = ["agentd/widgets"], _ body: (GitHTTPServer) async throws -> T) async throws -> T {
        let server = try await start(repositories: repositories)
        defer { server.stop() }
        return try await body(server)
    }

    /// Starts a server; call `stop()` when done (or use `with`).
    public static func start(repositories: [String] = ["agentd/widgets"]) async throws -> GitHTTPServer {
        let directory = NSTemporaryDirectory() + "agentd-git-server-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: directory + "/repos", withIntermediateDirectories: true)
        let ca = try TestCA.make(in: directory + "/tls")
        // Another process may take the free port before nginx binds it: try a few.
        var lastError: Error?
        for _ in 0..<5 {
            let server = GitHTTPServer(directory: directory, ca: ca, port: try Loopback.freePort())
            for repository in repositories { try server.createRepository(repository) }
            do {
                try await server.launch()
                return server
            } catch let error as PortTaken {
                server.stopProcesses()
                lastError = error
            } catch {
                server.stop()
                throw error
            }
        }
        throw lastError!
    }

    private init(directory: String, ca: TestCA, port: Int) {
        self.directory = directory
        self.ca = ca
        self.port = port
        token = "canary-" + (0..<4).map { _ in String(UInt64.random(in: 0...UInt64.max), radix: 36) }.joined()
        tokenID = "token-" + Components.testID()
    }

    struct PortTaken: Error {}

    /// Creates the bare repository `owner/repo.git` (if missing) with one commit on `main`
    /// (a README), pushes allowed.
    public func createRepository(_ name: String) throws {
        let bare = "\(repositoriesRoot)/\(name).git"
        guard !FileManager.default.fileExists(atPath: bare) else { return }
        let env = gitEnvironment
        try TestCommand.check(["git", "init", "-q", "--bare", "-b", "main", bare], environment: env)
        try TestCommand.check(["git", "-C", bare, "config", "http.receivepack", "true"], environment: env)
        let work = directory + "/seed-\(Components.testID())"
        defer { try? FileManager.default.removeItem(atPath: work) }
        try TestCommand.check(["git", "init", "-q", "-b", "main", work], environment: env)
        try "# \(name)\n".write(toFile: work + "/README.md", atomically: true, encoding: .utf8)
        try TestCommand.check(["git", "-C", work, "add", "README.md"], environment: env)
        try TestCommand.check(
            ["git", "-C", work, "-c", "user.name=agentd test", "-c", "user.email=test@agentd.test", "commit", "-q", "-m", "Initial commit"],
            environment: env)
        try TestCommand.check(["git", "-C", work, "push", "-q", bare, "main"], environment: env)
    }

    /// One request in the access log.
    public struct AccessLogEntry: Sendable, Equatable {
        public let method: String
        public let path: String
        public let status: Int
        /// The `tokenID` of the token the request carried, nil without a valid one.
        public let tokenID: String?
    }

    /// The requests served so far (nginx writes each line when its request completes).
    public func accessLog() throws -> [AccessLogEntry] {
        let text = (try? String(contentsOfFile: accessLogPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            // <method> <path> <status> token=<id or ->
            let fields = line.split(separator: " ")
            guard fields.count == 4, let status = Int(fields[2]), fields[3].hasPrefix("token=") else { return nil }
            let id = String(fields[3].dropFirst("token=".count))
            return AccessLogEntry(method: String(fields[0]), path: String(fields[1]), status: status, tokenID: id == "-" ? nil : id)
        }
    }

    private func launch() async throws {
        let nginxPath = try TestCommand.locate("nginx")
        let fcgiwrapPath = try TestCommand.locate("fcgiwrap")
        let backend = "/usr/lib/git-core/git-http-backend"
        guard access(backend, X_OK) == 0 else { throw Components.Missing(description: "\(backend) is missing; make env installs git") }
        try FileManager.default.createDirectory(atPath: directory + "/nginx-temp", withIntermediateDirectories: true)
        let socket = directory + "/fcgiwrap.sock"
        unlink(socket)
        let basic = Data("\(Self.basicUser):\(token)".utf8).base64EncodedString()
        // Run as root (the tests do), nginx would switch its workers to nobody, who can reach
        // neither the fcgiwrap socket nor the repositories.
        let user = geteuid() == 0 ? "user root;" : ""
        let config = """
            daemon off;
            master_process on;
            worker_processes 1;
            \(user)
            pid \(directory)/nginx.pid;
            error_log \(errorLogPath) info;
            events { worker_connections 256; }
            http {
                map_hash_bucket_size 512;
                map $http_authorization $agentd_token {
                    default "-";
                    "Bearer \(token)" "\(tokenID)";
                    "Basic \(basic)" "\(tokenID)";
                }
                log_format agentd '$request_method $uri $status token=$agentd_token';
                access_log \(accessLogPath) agentd;
                client_body_temp_path \(directory)/nginx-temp/body;
                proxy_temp_path \(directory)/nginx-temp/proxy;
                fastcgi_temp_path \(directory)/nginx-temp/fastcgi;
                uwsgi_temp_path \(directory)/nginx-temp/uwsgi;
                scgi_temp_path \(directory)/nginx-temp/scgi;
                server {
                    listen 127.0.0.1:\(port) ssl;
                    server_name _;
                    ssl_certificate \(ca.certificatePath);
                    ssl_certificate_key \(ca.keyPath);
                    client_max_body_size 0;
                    location / {
                        if ($agentd_token = "-") {
                            add_header WWW-Authenticate 'Basic realm="agentd test git"' always;
                            return 401 "a valid token is required\\n";
                        }
                        fastcgi_pass unix:\(socket);
                        fastcgi_param SCRIPT_FILENAME \(backend);
                        fastcgi_param GIT_PROJECT_ROOT \(repositoriesRoot);
                        fastcgi_param GIT_HTTP_EXPORT_ALL "";
                        fastcgi_param GIT_CONFIG_NOSYSTEM 1;
                        fastcgi_param PATH /usr/bin:/bin;
                        fastcgi_param PATH_INFO $uri;
                        fastcgi_param QUERY_STRING $query_string;
                        fastcgi_param REQUEST_METHOD $request_method;
                        fastcgi_param CONTENT_TYPE $content_type;
                        fastcgi_param CONTENT_LENGTH $content_length;
                        fastcgi_param REMOTE_USER $agentd_token;
                        fastcgi_param REMOTE_ADDR $remote_addr;
                        fastcgi_param SERVER_PROTOCOL $server_protocol;
                        fastcgi_param GATEWAY_INTERFACE CGI/1.1;
                    }
                }
            }

            """
        try config.write(toFile: directory + "/nginx.conf", atomically: true, encoding: .utf8)
        // One fcgiwrap process (no -c): it serves one request at a time, plenty for a test, and
        // ends on SIGTERM (with -c its preforked children outlive it).
        let env = ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"]
        try lock.withLock {
            fcgiwrap = try ChildProcess.spawn([fcgiwrapPath, "-f", "-s", "unix:\(socket)"], environment: env, output: directory + "/fcgiwrap.log")
            nginx = try ChildProcess.spawn(
                [nginxPath, "-p", directory, "-e", errorLogPath, "-c", directory + "/nginx.conf"], environment: env, output: directory + "/nginx.out")
        }
        let ready = await eventually(.seconds(20)) {
            let exited = lock.withLock { nginx?.exitStatusIfExited() != nil || fcgiwrap?.exitStatusIfExited() != nil }
            return exited || (Loopback.accepts(port: port) && FileManager.default.fileExists(atPath: socket))
        }
        let log = ((try? String(contentsOfFile: errorLogPath, encoding: .utf8)) ?? "")
            + ((try? String(contentsOfFile: directory + "/fcgiwrap.log", encoding: .utf8)) ?? "")
        if log.contains("Address already in use") { throw PortTaken() }
        let running = lock.withLock { nginx != nil && fcgiwrap != nil }
        guard ready, running, Loopback.accepts(port: port) else {
            throw TestCommand.Failed(description: "the git server (nginx + fcgiwrap) did not start on 127.0.0.1:\(port); its logs:\n\(log)")
        }
    }

    /// The processes the fixture runs now: nginx, fcgiwrap and their children.
    public var processes: [pid_t] {
        lock.withLock { [nginx, fcgiwrap].compactMap { $0?.pid } }.flatMap { [$0] + Loopback.descendants(of: $0) }
    }

    /// Stops nginx and fcgiwrap (SIGTERM, then waits for each) and removes the directory.
    public func stop() {
        if stopProcesses() { try? FileManager.default.removeItem(atPath: directory) }
    }

    /// Stops nginx and fcgiwrap; false when they were stopped already.
    @discardableResult
    private func stopProcesses() -> Bool {
        let children: [ChildProcess] = lock.withLock {
            defer { nginx = nil; fcgiwrap = nil }
            return [nginx, fcgiwrap].compactMap { $0 }
        }
        for child in children { child.terminate() }
        return !children.isEmpty
    }

    deinit { stop() }
}

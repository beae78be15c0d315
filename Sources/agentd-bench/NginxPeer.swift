import Foundation
import Glibc

/// nginx (Debian's) doing what a route does, as a peer measured in the same run: listening on
/// a unix socket, forwarding `/<route>/…` over TLS to the same upstream (verified against the
/// run's CA), injecting the credential as a header, keeping upstream connections alive, and
/// writing a (buffered) access-log line per request. One worker process, no master: the same
/// shape as the vault-proxy, one process on one event loop per core at most.
///
/// It is the reference for what a route's small request costs on this machine when the proxy
/// is written in C by people who have tuned it for twenty years, so that the route's figure can
/// be read against both the direct request and the best-known proxy.
final class NginxPeer {
    let socket: String
    private let process: Process
    private let directory: String

    /// Starts nginx in `directory` for `route` → `https://127.0.0.1:<port>` (TLS name
    /// `serverName`), injecting `header: value`; throws when nginx is missing or does not start.
    init(directory: String, route: String, port: Int, serverName: String, ca: String, header: String, value: String) throws {
        guard let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw RawUnixHTTP.Failure(description: "nginx is not installed (the peer figures need Debian's nginx-light: scripts/env-up installs it)")
        }
        self.directory = directory
        socket = directory + "/nginx.sock"
        try FileManager.default.createDirectory(atPath: directory + "/tmp", withIntermediateDirectories: true)
        try """
            daemon off;
            master_process off;
            worker_processes 1;
            pid \(directory)/nginx.pid;
            error_log \(directory)/error.log warn;
            events { worker_connections 1024; }
            http {
                access_log \(directory)/access.log combined buffer=64k flush=1s;
                client_body_temp_path \(directory)/tmp/body;
                proxy_temp_path \(directory)/tmp/proxy;
                fastcgi_temp_path \(directory)/tmp/fastcgi;
                uwsgi_temp_path \(directory)/tmp/uwsgi;
                scgi_temp_path \(directory)/tmp/scgi;
                upstream bench_upstream {
                    server 127.0.0.1:\(port);
                    keepalive 16;
                }
                server {
                    listen unix:\(socket);
                    location /\(route)/ {
                        proxy_pass https://bench_upstream/;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_set_header Host \(serverName);
                        proxy_set_header \(header) "\(value)";
                        proxy_set_header Proxy-Authorization "";
                        proxy_set_header Accept-Encoding identity;
                        proxy_redirect off;
                        proxy_ssl_verify on;
                        proxy_ssl_trusted_certificate \(ca);
                        proxy_ssl_name \(serverName);
                        proxy_ssl_server_name on;
                    }
                }
            }

            """.write(toFile: directory + "/nginx.conf", atomically: true, encoding: .utf8)
        process = Process()
        process.executableURL = URL(fileURLWithPath: nginx)
        process.arguments = ["-p", directory, "-c", directory + "/nginx.conf", "-e", directory + "/error.log"]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Ready once its socket accepts.
        for _ in 0..<500 {
            if RawUnixHTTP.canConnect(socket) { return }
            guard process.isRunning else { break }
            usleep(10_000)
        }
        let log = (try? String(contentsOfFile: directory + "/error.log", encoding: .utf8)) ?? ""
        stop()
        throw RawUnixHTTP.Failure(description: "nginx did not start listening on \(socket): \(log.suffix(500))")
    }

    var pid: pid_t { process.processIdentifier }

    /// Kills nginx (SIGKILL: Foundation's `Process` starts it with nearly every signal blocked,
    /// so a SIGTERM would stay pending; it holds nothing worth a clean shutdown).
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { stop() }
}

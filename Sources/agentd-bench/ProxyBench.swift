import EgressProxy
import Foundation
import Synchronization
import VaultProxy

/// The vault-proxy as agentd runs it (`ProxySupervisor` starting the release `vault-proxy`
/// next to this binary): a small GET through a route and a 100 MiB download through a route
/// and through CONNECT, each against the same libcurl client going straight to the same
/// loopback HTTPS upstream (a CA made with openssl for this run), and the proxy's memory idle
/// and with 100 sandboxes' listeners.
enum ProxyBench {
    static let smallRounds = 2000
    static let downloadRounds = 7
    static let bigBytes = 100 << 20
    static let listeners = 100
    /// The allowlisted name the CONNECT figures use; `--trust-resolve` maps it to 127.0.0.1.
    static let upstreamName = "upstream.bench"
    static let mib = Double(1 << 20)

    static func run(_ report: Reporter) async throws {
        let binary = try siblingExecutable("vault-proxy")
        let base = NSTemporaryDirectory() + "agentd-bench-proxy-\(getpid())"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let tls = try makeCA(in: base + "/tls")
        let upstream = try await HTTPSUpstream.start(certificate: tls.certificate, key: tls.key, bigBytes: bigBytes)
        do {
            try await measure(report, binary: binary, base: base, ca: tls.ca, upstream: upstream)
            await upstream.stop()
        } catch {
            await upstream.stop()
            throw error
        }
    }

    private static func measure(_ report: Reporter, binary: String, base: String, ca: String, upstream: HTTPSUpstream) async throws {
        let events = Atomic<Int>(0)
        let token = "ghp_" + String((0..<36).map { _ in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".randomElement()! })
        let supervisor = ProxySupervisor(
            executable: binary, arguments: ["--log-level", "warning", "--trust-resolve", "\(upstreamName)=127.0.0.1"],
            credentials: { ["bench_token": token] }, onEgress: { _ in events.add(1, ordering: .relaxed) })
        try await supervisor.start()
        defer { supervisor.stop() }
        let pid = supervisor.pid

        // 1. Memory: idle (credentials known, no sandbox), then with 100 sandboxes' listeners,
        // each with a route and an allowlist like a coding agent's policy.
        report.figure("proxy.idle_rss", Double(AgentdBench.rssKiB(pid)) / 1024, "MiB")
        report.goal("proxy.idle_rss", "<= 20 MiB")
        // Most of VmRSS is the mapped code of the binary and the Swift libraries (shared with
        // every Swift process): the proxy's own memory is this part.
        report.figure("proxy.idle_rss_anon", Double(AgentdBench.rssKiB(pid, field: "RssAnon:")) / 1024, "MiB")
        let target = "\(upstreamName):\(upstream.port)"
        let route = "up"
        for i in 0..<listeners {
            try await supervisor.addSandbox(
                SandboxSpec(
                    sandbox: "sb-\(i)", session: "bench", task: "main", policy: "bench", socketPath: "\(base)/sb-\(i)/proxy.sock",
                    network: NetworkRules(allowHosts: [target, "pypi.org", "*.pythonhosted.org", "registry.npmjs.org"]),
                    routes: [
                        RouteRule(name: route, upstream: "https://127.0.0.1:\(upstream.port)", credential: "bench_token", caFile: ca),
                        RouteRule(name: "github", upstream: "https://api.github.com", credential: "bench_token"),
                    ]))
        }
        report.figure("proxy.rss_100_listeners", Double(AgentdBench.rssKiB(pid)) / 1024, "MiB")
        report.goal("proxy.rss_100_listeners", "<= 40 MiB")
        report.figure("proxy.rss_anon_100_listeners", Double(AgentdBench.rssKiB(pid, field: "RssAnon:")) / 1024, "MiB")

        // 2. A 100-byte GET, paired round by round. The proxy keeps the sandbox's connection
        // alive and pools its upstream connections per sandbox, so the route is compared with
        // the direct client keeping its connection (what the sandbox would see without the
        // proxy) and with the direct client connecting anew each time (what a one-shot `curl`
        // in a sandbox pays without the proxy). The same request through a CONNECT tunnel is
        // the floor of any proxy in a process of its own, and nginx doing a route's job (see
        // `NginxPeer`) is what the best-known proxy makes of it on this machine.
        let socket = "\(base)/sb-0/proxy.sock"
        let direct = "https://127.0.0.1:\(upstream.port)"
        let nginx = try NginxPeer(
            directory: base + "/nginx", route: route, port: upstream.port, serverName: upstreamName, ca: ca, header: "Authorization",
            value: "Bearer " + token)
        defer { nginx.stop() }
        let keptDirect = try EasyCurl(caFile: ca, path: .direct, fresh: false)
        let freshDirect = try EasyCurl(caFile: ca, path: .direct, fresh: true)
        let keptRoute = try EasyCurl(caFile: ca, path: .unixSocket(socket), fresh: false)
        let freshRoute = try EasyCurl(caFile: ca, path: .unixSocket(socket), fresh: true)
        let keptTunnel = try EasyCurl(caFile: ca, path: .proxy(socket: socket), fresh: false)
        let keptNginx = try EasyCurl(caFile: ca, path: .unixSocket(nginx.socket), fresh: false)
        let routeURL = "http://localhost/\(route)/small", tunnelURL = "https://\(target)/small"
        let paths: [(name: String, client: EasyCurl, url: String)] = [
            ("raw.tls.get_100B.keepalive", keptDirect, direct + "/small"), ("raw.tls.get_100B.fresh", freshDirect, direct + "/small"),
            ("proxy.route.get_100B", keptRoute, routeURL), ("proxy.route.get_100B.fresh", freshRoute, routeURL),
            ("proxy.connect.get_100B.keepalive", keptTunnel, tunnelURL), ("peer.nginx.route.get_100B", keptNginx, routeURL),
        ]
        var samples = [[Double]](repeating: [], count: paths.count)
        for round in 0...smallRounds {
            for (i, path) in paths.enumerated() {
                let t0 = now()
                try get(path.client, path.url, expecting: HTTPSUpstream.smallBytes)
                let t = now() - t0
                if round > 0 { samples[i].append(t) }  // the first round warms every path
            }
        }
        for (path, values) in zip(paths, samples) {
            let sorted = values.sorted()
            report.figure(path.name + ".p50", percentile(sorted, 50) * 1000, "ms")
            report.figure(path.name + ".p99", percentile(sorted, 99) * 1000, "ms")
        }
        // Each ratio: numerator path, suffix, denominator path, goal. The CONNECT tunnel, where
        // the proxy only copies bytes (the client does the TLS), is the floor of any proxy in its
        // own process here; what a route costs beyond it is its own work (parsing, TLS
        // upstream, the credential, scrubbing, the event).
        let ratios: [(String, String, String, String)] = [
            ("proxy.route.get_100B", "vs_keepalive", "raw.tls.get_100B.keepalive", "<= 1.3 (both keep their connections)"),
            ("proxy.route.get_100B", "vs_fresh", "raw.tls.get_100B.fresh", "<= 1.3 (a one-shot client without the proxy: its own TLS handshake per request)"),
            ("proxy.route.get_100B.fresh", "vs_fresh", "raw.tls.get_100B.fresh", "<= 1.3 (a one-shot client: a new connection per request on both sides)"),
            ("proxy.connect.get_100B.keepalive", "vs_keepalive", "raw.tls.get_100B.keepalive", "report (the extra hop alone: two more wake-ups and copies per request)"),
            ("proxy.route.get_100B", "vs_tunnel", "proxy.connect.get_100B.keepalive", "report (the route's own work over the extra hop)"),
            ("peer.nginx.route.get_100B", "vs_keepalive", "raw.tls.get_100B.keepalive", "report (nginx doing a route's job, same client, same upstream)"),
            ("proxy.route.get_100B", "vs_nginx", "peer.nginx.route.get_100B", "report (<= 1 is as fast as nginx)"),
        ]
        for p in ["p50", "p99"] {
            for (numerator, suffix, denominator, goal) in ratios {
                report.ratio("\(numerator).\(p).\(suffix)", "\(numerator).\(p)", over: "\(denominator).\(p)", goal: goal)
            }
        }
        // CPU time per request of the process that proxies (all its threads, from the
        // scheduler's nanosecond accounting), path by path, whatever else the machine runs.
        for (path, process) in [(paths[2], pid), (paths[4], pid), (paths[5], nginx.pid)] {
            let c0 = cpuNanoseconds(process)
            for _ in 0..<smallRounds { try get(path.client, path.url, expecting: HTTPSUpstream.smallBytes) }
            report.figure(path.name + ".proxy_cpu", Double(cpuNanoseconds(process) - c0) / Double(smallRounds) / 1000, "us")
        }
        report.goal("proxy.route.get_100B.proxy_cpu", "report (compare peer.nginx.route.get_100B.proxy_cpu)")

        // 3. 100 MiB downloads, a new connection each, paired round by round.
        let downloads: [(String, EasyCurl, String)] = [
            ("raw.tls.download_100MiB", freshDirect, direct + "/big"),
            ("proxy.route.download_100MiB", freshRoute, "http://localhost/\(route)/big"),
            ("proxy.connect.download_100MiB", try EasyCurl(caFile: ca, path: .proxy(socket: socket), fresh: true), "https://\(target)/big"),
        ]
        var rates = [[Double]](repeating: [], count: downloads.count)
        var proxyCPU = [Double](repeating: 0, count: downloads.count)
        var allCPU = [Double](repeating: 0, count: downloads.count)
        for round in 0...downloadRounds {
            for (i, (_, client, url)) in downloads.enumerated() {
                let c0 = cpuNanoseconds(pid), b0 = cpuNanoseconds(getpid())
                let t0 = now()
                let (status, bytes) = try client.get(url)
                let t = now() - t0
                let c1 = Double(cpuNanoseconds(pid) - c0) / 1e9
                proxyCPU[i] += c1
                allCPU[i] += c1 + Double(cpuNanoseconds(getpid()) - b0) / 1e9
                guard status == 200, bytes == bigBytes else {
                    throw RawUnixHTTP.Failure(description: "GET \(url) gave HTTP \(status) with \(bytes) bytes, not 200 with \(bigBytes)")
                }
                if round > 0 { rates[i].append(Double(bigBytes) / mib / t) }
            }
        }
        for ((name, _, _), values) in zip(downloads, rates) { report.figure(name, percentile(values.sorted(), 50), "MiB/s") }
        // CPU time per download, whatever else the machine runs: the proxy's, and all of it
        // (client, upstream and proxy). Where the cores are the limit, throughput goes as the
        // inverse of the whole.
        for i in 1..<downloads.count {
            report.figure(downloads[i].0 + ".proxy_cpu", proxyCPU[i] / Double(downloadRounds + 1) * 1000, "ms")
        }
        for (i, (name, _, _)) in downloads.enumerated() { report.figure(name + ".cpu", allCPU[i] / Double(downloadRounds + 1) * 1000, "ms") }
        report.ratio("proxy.route.download_100MiB.vs_direct", "proxy.route.download_100MiB", over: "raw.tls.download_100MiB", goal: ">= 0.8")
        report.ratio("proxy.connect.download_100MiB.vs_direct", "proxy.connect.download_100MiB", over: "raw.tls.download_100MiB", goal: ">= 0.8")
        // The proxy streams: its peak memory over the whole run, downloads included.
        report.figure("proxy.peak_rss", Double(AgentdBench.rssKiB(pid, field: "VmHWM:")) / 1024, "MiB")
        report.goal("proxy.peak_rss", "report (a download streams a few chunks at a time)")

        // A tunnel's event comes when it has closed, just after the client is done.
        let expected = (smallRounds + 1) * 2 + smallRounds + (downloadRounds + 1) * 2
        for _ in 0..<100 where events.load(ordering: .relaxed) < expected { try await Task.sleep(for: .milliseconds(20)) }
        let seen = events.load(ordering: .relaxed)
        if seen < expected {
            FileHandle.standardError.write(Data("# proxy: \(seen) egress events of \(expected) requests through the proxy arrived\n".utf8))
        }
    }

    /// GETs `url` and checks for a 200 with `bytes` body bytes.
    private static func get(_ client: EasyCurl, _ url: String, expecting bytes: Int) throws {
        let (status, received) = try client.get(url)
        guard status == 200, received == bytes else {
            throw RawUnixHTTP.Failure(description: "GET \(url) gave HTTP \(status) with \(received) bytes, not 200 with \(bytes)")
        }
    }

    /// The CPU time `pid` has used so far, in nanoseconds: this process's from `getrusage`
    /// (ended threads included); another's as the sum over its threads of the first field of
    /// `/proc/PID/task/TID/schedstat` (the proxy's and nginx's threads live as long as they do).
    static func cpuNanoseconds(_ pid: pid_t) -> Int64 {
        if pid == getpid() {
            var usage = rusage()
            getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
            let micros = Int64(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1_000_000 + Int64(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec)
            return micros * 1000
        }
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.reduce(0) { sum, tid in
            let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/schedstat", encoding: .utf8)) ?? ""
            return sum + (Int64(text.prefix { $0 != " " }) ?? 0)
        }
    }

    /// A CA for this run and a certificate it signed for 127.0.0.1 and `upstreamName`, made
    /// with openssl (EC P-256, as the tests' TestCA); openssl's output goes to `openssl.log`.
    static func makeCA(in directory: String) throws -> (ca: String, certificate: String, key: String) {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let ca = directory + "/ca.pem", certificate = directory + "/server.pem", key = directory + "/server.key"
        try """
            basicConstraints=critical,CA:FALSE
            keyUsage=critical,digitalSignature,keyEncipherment
            extendedKeyUsage=serverAuth
            subjectAltName=DNS:\(upstreamName),IP:127.0.0.1

            """.write(toFile: directory + "/server.ext", atomically: true, encoding: .utf8)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        let log = directory + "/openssl.log"
        try openssl(
            ["req", "-x509"] + ec + [
                "-keyout", directory + "/ca.key", "-out", ca, "-days", "2", "-subj", "/CN=agentd-bench CA",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ], log: log)
        try openssl(["req"] + ec + ["-keyout", key, "-out", directory + "/server.csr", "-subj", "/CN=\(upstreamName)"], log: log)
        try openssl(
            [
                "x509", "-req", "-in", directory + "/server.csr", "-CA", ca, "-CAkey", directory + "/ca.key", "-set_serial", "0x1", "-days", "2",
                "-extfile", directory + "/server.ext", "-out", certificate,
            ], log: log)
        return (ca, certificate, key)
    }

    private static func openssl(_ arguments: [String], log: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["openssl"] + arguments
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let output = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        output.seekToEndOfFile()
        defer { try? output.close() }
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = output
        process.standardError = output
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            throw RawUnixHTTP.Failure(description: "openssl \(arguments.prefix(2).joined(separator: " ")) failed (exit \(process.terminationStatus)): \(text.suffix(500))")
        }
    }
}

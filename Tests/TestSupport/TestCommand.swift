import Foundation

/// A command-line tool run to completion by a test fixture or a test (openssl, git, curl),
/// with its output captured.
public enum TestCommand {
    public struct Result: Sendable {
        /// The exit code, or 128 + the signal number when a signal ended it.
        public let status: Int32
        /// stdout and stderr together, in the order written.
        public let output: String
        public var succeeded: Bool { status == 0 }
    }

    public struct Failed: Error, CustomStringConvertible {
        public let description: String
    }

    /// Runs `argv` (its first element found on `PATH`, then in /usr/sbin and /sbin) with
    /// `environment` added to a minimal one, and waits for it.
    public static func run(_ argv: [String], environment: [String: String] = [:]) throws -> Result {
        let executable = try locate(argv[0])
        let outputPath = NSTemporaryDirectory() + "agentd-test-cmd-\(Components.testID()).out"
        defer { unlink(outputPath) }
        var env = ["PATH": searchPath, "LANG": "C.UTF-8"]
        if let home = ProcessInfo.processInfo.environment["HOME"] { env["HOME"] = home }
        env.merge(environment) { $1 }
        let child = try ChildProcess.spawn([executable] + argv.dropFirst(), environment: env, output: outputPath)
        let status = child.wait()
        let output = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Result(status: code, output: output)
    }

    /// Runs `argv` and throws, with its output, unless it succeeds.
    @discardableResult
    public static func check(_ argv: [String], environment: [String: String] = [:]) throws -> String {
        let result = try run(argv, environment: environment)
        guard result.succeeded else {
            throw Failed(description: "\(argv.joined(separator: " ")) exited with \(result.status):\n\(result.output)")
        }
        return result.output
    }

    static var searchPath: String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return path + ":/usr/sbin:/sbin:/usr/bin:/bin"
    }

    /// The path of `name`: itself when it holds a slash, else the first executable on the search path.
    public static func locate(_ name: String) throws -> String {
        if name.contains("/") { return name }
        for dir in searchPath.split(separator: ":") where access("\(dir)/\(name)", X_OK) == 0 {
            return "\(dir)/\(name)"
        }
        throw Components.Missing(description: "\(name) is not installed; make env installs it (scripts/env-up's package list)")
    }
}

/// Loopback ports and readiness for the fixtures' servers.
public enum Loopback {
    /// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice for port 0).
    public static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestCommand.Failed(description: "socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { ptr in
            ptr.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard bound else { throw TestCommand.Failed(description: "bind 127.0.0.1:0: \(String(cString: strerror(errno)))") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    /// Whether something accepts TCP connections on 127.0.0.1:`port`.
    public static func accepts(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        return withUnsafePointer(to: &addr) { ptr in
            ptr.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }

    /// The pids of `pid`'s descendants, read from /proc (to prove a fixture leaves none behind).
    public static func descendants(of pid: pid_t) -> [pid_t] {
        var parents: [pid_t: pid_t] = [:]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let child = pid_t(entry), let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { continue }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            if fields.count > 1, let parent = pid_t(fields[1]) { parents[child] = parent }
        }
        var found: [pid_t] = []
        var frontier = [pid]
        while let next = frontier.popLast() {
            let children = parents.filter { $0.value == next }.map(\.key)
            found += children
            frontier += children
        }
        return found
    }

    /// Whether a process `pid` exists (and is not a zombie).
    public static func alive(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
        return !stat[stat.index(after: close)...].hasPrefix(" Z")
    }
}

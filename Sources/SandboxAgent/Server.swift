#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSandboxAgent
import SandboxAgentProtocol
import Synchronization

/// The agent: listens on its unix socket and serves each connection on its own thread.
final class Server: Sendable {
    static let software = "agentd-sandbox-agent \(AgentFrame.protocolVersion)"
    /// Connections served at once; more are refused with an error frame.
    static let maximumConnections = 256

    let reaper = Reaper()
    let startedAt = Posix.now()
    /// The file mode creation mask, read once at startup (reading it later is not thread-safe).
    let umask: mode_t
    private let active = Atomic<Int>(0)

    init(umask: mode_t) { self.umask = umask }

    /// Connections being served.
    var activeConnections: Int { active.load(ordering: .relaxed) }

    /// Creates the socket at `path` with mode 0600, replacing a stale socket.
    static func listen(at path: String) throws(AgentStartError) -> Int32 {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw AgentStartError("\(path) exists and is not a socket; refusing to replace it")
            }
            unlink(path)
        }
        guard var address = Posix.unixAddress(path) else {
            throw AgentStartError("socket path \(path) is longer than \(MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1) bytes")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw AgentStartError("cannot create a socket: \(Posix.message(errno))") }
        let old = Glibc.umask(0o177)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        let bindErrno = errno
        _ = Glibc.umask(old)
        guard rc == 0 else {
            close(fd)
            throw AgentStartError("cannot listen on \(path): \(Posix.message(bindErrno))")
        }
        guard Glibc.listen(fd, 128) == 0 else {
            close(fd)
            throw AgentStartError("cannot listen on \(path): \(Posix.message(errno))")
        }
        return fd
    }

    /// Accepts connections forever.
    func serve(listener: Int32) -> Never {
        while true {
            let fd = csa_accept_cloexec(listener)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                // EMFILE and the like: wait a little rather than spin.
                usleep(10_000)
                continue
            }
            if active.add(1, ordering: .relaxed).newValue > Self.maximumConnections {
                active.subtract(1, ordering: .relaxed)
                Connection(fd: fd).send(.error("the agent is serving \(Self.maximumConnections) connections; try again"))
                close(fd)
                continue
            }
            let started = Posix.startThread { [self] in
                handle(fd: fd)
                active.subtract(1, ordering: .relaxed)
            }
            if !started {
                active.subtract(1, ordering: .relaxed)
                Connection(fd: fd).send(.error("the agent cannot start a thread: \(Posix.message(errno))"))
                close(fd)
            }
        }
    }

    /// One connection: hello, one request, its reply.
    func handle(fd: Int32) {
        defer { close(fd) }
        // A host that connects and says nothing is dropped after a minute; a host that stops
        // reading is dropped after a minute too.
        Posix.setTimeout(fd, option: SO_RCVTIMEO, seconds: 60)
        Posix.setTimeout(fd, option: SO_SNDTIMEO, seconds: 60)
        let connection = Connection(fd: fd)
        do throws(ConnectionEnd) {
            guard case .hello(let hello) = try connection.receive() else {
                throw ConnectionEnd.violation("the first frame must be hello")
            }
            do {
                try hello.checkCompatible(peer: "the host")
            } catch {
                throw ConnectionEnd.violation(error.message)
            }
            connection.send(.hello(AgentHello(software: Self.software)))
            let request = try connection.receive()
            switch request {
            case .execRequest(let exec):
                try Exec(server: self, connection: connection, request: exec).run()
            case .readFileRequest(let path, let limit):
                Files.read(path: path, limit: limit, connection: connection)
            case .writeFileRequest(let path, let mode):
                try Files.write(path: path, mode: mode, umask: umask, connection: connection)
            case .listRequest(let path):
                Files.list(path: path, connection: connection)
            case .limitsRequest:
                connection.send(.limits(Cgroup.limits()))
            case .healthRequest:
                connection.send(.health(health()))
            default:
                throw ConnectionEnd.violation("unexpected \(request.type) frame; expected a request")
            }
        } catch .violation(let message) {
            connection.send(.error(message))
        } catch {
            return
        }
    }

    func health() -> AgentHealth {
        AgentHealth(
            software: Self.software, pid: getpid(), uid: getuid(), gid: getgid(),
            uptimeMilliseconds: (Posix.now() - startedAt) / 1_000_000, zombiesReaped: reaper.orphansReaped,
            runningCommands: UInt32(reaper.runningCount))
    }
}

/// The agent cannot start; the message says why.
struct AgentStartError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

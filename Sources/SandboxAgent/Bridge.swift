#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSandboxAgent

/// Listens on a loopback TCP port inside the sandbox and splices each connection to a unix
/// socket (the vault proxy's per-sandbox socket, bind-mounted in): `127.0.0.1:3128=/run/agentd/proxy.sock`.
struct Bridge: Sendable {
    let host: String
    let port: UInt16
    let target: String

    /// Parses `ADDRESS:PORT=SOCKET`.
    init(parsing spec: String) throws(AgentStartError) {
        let usage = "--bridge takes ADDRESS:PORT=SOCKET_PATH, e.g. 127.0.0.1:3128=/run/agentd/proxy.sock; got \(spec)"
        guard let eq = spec.firstIndex(of: "=") else { throw AgentStartError(usage) }
        let listen = spec[..<eq]
        target = String(spec[spec.index(after: eq)...])
        guard let colon = listen.lastIndex(of: ":"), let port = UInt16(listen[listen.index(after: colon)...]), port > 0,
            !target.isEmpty
        else { throw AgentStartError(usage) }
        host = String(listen[..<colon])
        self.port = port
        var probe = in_addr()
        guard inet_pton(AF_INET, host, &probe) == 1 else {
            throw AgentStartError("--bridge: \(host) is not an IPv4 address (\(usage))")
        }
    }

    /// Binds the listening socket (so a bad address fails at startup), then serves it on a thread.
    func start() throws(AgentStartError) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw AgentStartError("--bridge: cannot create a socket: \(Posix.message(errno))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        inet_pton(AF_INET, host, &address.sin_addr)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0, listen(fd, 128) == 0 else {
            let message = Posix.message(errno)
            close(fd)
            throw AgentStartError("--bridge: cannot listen on \(host):\(port): \(message)")
        }
        let target = self.target
        guard
            Posix.startThread({
                while true {
                    let client = csa_accept_cloexec(fd)
                    if client < 0 {
                        if errno != EINTR && errno != ECONNABORTED { usleep(10_000) }
                        continue
                    }
                    if !Posix.startThread({ Bridge.splice(client, to: target) }) { close(client) }
                }
            })
        else { throw AgentStartError("--bridge: cannot start a thread") }
    }

    /// Copies bytes both ways until both directions reach end of file.
    static func splice(_ client: Int32, to target: String) {
        defer { close(client) }
        guard var address = Posix.unixAddress(target) else { return }
        let upstream = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard upstream >= 0 else { return }
        defer { close(upstream) }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(upstream, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { return }
        var open = [true, true]  // client → upstream, upstream → client
        let ends: [(from: Int32, to: Int32)] = [(client, upstream), (upstream, client)]
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while open[0] || open[1] {
            var fds = [0, 1].filter { open[$0] }.map { pollfd(fd: ends[$0].from, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                if errno == EINTR { continue }
                return
            }
            for p in fds where p.revents != 0 {
                let i = p.fd == client ? 0 : 1
                let n = read(ends[i].from, &buffer, buffer.count)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 || !Posix.sendAll(ends[i].to, Array(buffer[0..<n])) {
                    open[i] = false
                    shutdown(ends[i].to, Int32(SHUT_WR))
                    if n < 0 { return }
                }
            }
        }
    }
}

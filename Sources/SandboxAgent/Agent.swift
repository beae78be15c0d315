#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSandboxAgent
import SandboxAgentProtocol

/// The sandbox agent's entry point: parses the command line, becomes a subreaper, takes over
/// signal handling, starts the bridges and serves the socket.
public enum SandboxAgent {
    public static let usage = """
        usage: agentd-sandbox-agent --socket PATH [--bridge ADDRESS:PORT=SOCKET]...

        The sandbox agent: PID 1 (or a plain service) in an agentd sandbox. It serves agentd's
        framed protocol (exec, files, list, limits, health; see Sources/SandboxAgentProtocol/README.md)
        on a unix socket, reaps every zombie in the sandbox, and forwards SIGTERM and SIGINT to the
        commands it runs before exiting.

        options:
          --socket PATH     the unix socket to create (mode 0600) and serve; its directory must exist
          --bridge A:P=S    listen on TCP A:P (e.g. 127.0.0.1:3128) and splice each connection to the
                            unix socket S (e.g. /run/agentd/proxy.sock); may be given more than once
          --version         print the protocol version and exit
          --help            print this help and exit
        """

    struct Options {
        var socket: String
        var bridges: [Bridge]
    }

    enum Parsed {
        case run(Options)
        case exit(Int32, String)
    }

    static func parse(_ arguments: [String]) -> Parsed {
        var socket: String?
        var bridges: [Bridge] = []
        var i = 0
        func value(_ name: String) -> String? {
            i += 1
            return i < arguments.count ? arguments[i] : nil
        }
        while i < arguments.count {
            let argument = arguments[i]
            switch argument {
            case "--help", "-h":
                return .exit(0, usage)
            case "--version":
                return .exit(0, "\(Server.software) (protocol version \(AgentFrame.protocolVersion))")
            case "--socket":
                guard let v = value(argument) else { return .exit(2, "--socket needs a path\n\n\(usage)") }
                socket = v
            case "--bridge":
                guard let v = value(argument) else { return .exit(2, "--bridge needs ADDRESS:PORT=SOCKET\n\n\(usage)") }
                do {
                    bridges.append(try Bridge(parsing: v))
                } catch {
                    return .exit(2, error.description)
                }
            default:
                return .exit(2, "unknown argument \(argument)\n\n\(usage)")
            }
            i += 1
        }
        guard let socket else { return .exit(2, "--socket PATH is required\n\n\(usage)") }
        return .run(Options(socket: socket, bridges: bridges))
    }

    /// Runs the agent; returns only to exit with the given status.
    public static func main(arguments: [String]) -> Int32 {
        let options: Options
        switch parse(arguments) {
        case .exit(let status, let text):
            let line = text.hasSuffix("\n") ? text : text + "\n"
            Posix.writeAll(status == 0 ? 1 : 2, Array(line.utf8))
            return status
        case .run(let o):
            options = o
        }
        // Every orphan below the agent becomes its child, so it can reap it.
        _ = csa_become_subreaper()
        // Signals are taken by one thread with sigwaitinfo: block them everywhere first (threads
        // inherit the mask). Commands get a clean mask and default dispositions at spawn.
        var handled = sigset_t()
        sigemptyset(&handled)
        for s in [SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2] { sigaddset(&handled, s) }
        pthread_sigmask(SIG_BLOCK, &handled, nil)
        signal(SIGPIPE, SIG_IGN)

        let mask = umask(0o022)
        umask(mask)
        let server = Server(umask: mask)
        let listener: Int32
        do {
            listener = try Server.listen(at: options.socket)
            for bridge in options.bridges { try bridge.start() }
        } catch {
            Posix.writeAll(2, Array("agentd-sandbox-agent: \(error.description)\n".utf8))
            return 1
        }
        let socketPath = options.socket
        guard Posix.startThread({ server.serve(listener: listener) }) else {
            Posix.writeAll(2, Array("agentd-sandbox-agent: cannot start the accept thread\n".utf8))
            return 1
        }
        // This thread reaps children and handles termination.
        while true {
            var info = siginfo_t()
            let sig = sigwaitinfo(&handled, &info)
            if sig < 0 { continue }
            switch sig {
            case SIGCHLD:
                server.reaper.reapAll()
            case SIGTERM, SIGINT:
                for group in server.reaper.runningGroups() { kill(-group, sig) }
                // Give the commands a moment to exit (reaping them as they do) and their
                // connections to report it, then go.
                let until = Posix.now() + 2_000_000_000
                while (server.reaper.runningCount > 0 || server.activeConnections > 0) && Posix.now() < until {
                    var ts = timespec(tv_sec: 0, tv_nsec: 20_000_000)
                    var sigchld = sigset_t()
                    sigemptyset(&sigchld)
                    sigaddset(&sigchld, SIGCHLD)
                    _ = sigtimedwait(&sigchld, nil, &ts)
                    server.reaper.reapAll()
                }
                unlink(socketPath)
                return 0
            default:
                continue  // SIGHUP, SIGQUIT, SIGUSR1/2: ignored, as PID 1 would without handlers
            }
        }
    }
}

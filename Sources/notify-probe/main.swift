import Foundation
import Glibc
import SystemdBus

// notify-probe: a tiny service for the tests of ServiceNotifier, SocketActivation and Sidecar,
// wired the way agentd's main wires them.
//
//   notify-probe DIR [--ready-after-ms N] [--stall-watchdog]
//       appends "start PID" to DIR/log, takes the sockets systemd passed (listenFDs), waits N ms,
//       appends "ready PID", sends READY=1 + STATUS=, then pings the watchdog at half its
//       interval (not with --stall-watchdog). On each passed listening socket it answers every
//       connection with "probe PID fds=COUNT\n".
//   notify-probe sidecar FILE
//       starts a supervised-child sidecar `sh -c 'echo $$ >> FILE; exec sleep 1000'` (no
//       manager) and waits; killing this process must take the sidecar with it.

func append(_ line: String, to path: String) {
    let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o644)
    guard fd >= 0 else { return }
    let text = line + "\n"
    _ = text.withCString { write(fd, $0, strlen($0)) }
    close(fd)
}

let args = CommandLine.arguments
guard args.count >= 3 || (args.count == 2 && args[1] != "sidecar") else {
    FileHandle.standardError.write(Data("usage: notify-probe DIR [--ready-after-ms N] [--stall-watchdog] | notify-probe sidecar FILE\n".utf8))
    exit(2)
}

if args[1] == "sidecar" {
    let file = args[2]
    let handle = try await Sidecar.start(
        name: "probe", argv: ["/bin/sh", "-c", "echo $$ >> '\(file)'; exec sleep 1000"], manager: nil)
    _ = handle
    while true { try await Task.sleep(for: .seconds(3600)) }
}

let dir = args[1]
let log = dir + "/log"
let pid = getpid()
append("start \(pid)", to: log)
let sockets = try SocketActivation.listenFDs()
for fd in sockets {
    Thread.detachNewThread {
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 { if errno == EINTR { continue } else { return } }
            let reply = "probe \(pid) fds=\(sockets.count)\n"
            _ = reply.withCString { write(client, $0, strlen($0)) }
            close(client)
        }
    }
}
var delay = 0
if let i = args.firstIndex(of: "--ready-after-ms"), i + 1 < args.count { delay = Int(args[i + 1]) ?? 0 }
if delay > 0 { try await Task.sleep(for: .milliseconds(delay)) }
let notifier = ServiceNotifier()
append("ready \(pid)", to: log)
try notifier.ready(status: "probe ready")
if !args.contains("--stall-watchdog") {
    let watchdog = Task { await notifier.runWatchdog() }
    _ = watchdog
}
while true { try await Task.sleep(for: .seconds(3600)) }

// journal-torture: the child process of the crash tests. It opens a journal, appends from
// many tasks at once, and reports every acknowledged event on stdout as one line
// `ack <session> <seq> <task> <n>` (plus `lease <session> <seq> <epoch>` for each wake and
// `checkpoint <session> <seq> <epoch>` for each checkpoint of the fenced session),
// written with a single write(2) (atomic on a pipe), until it is killed. Usage: journal-torture DIR [tasks] [sessions] [segmentBytes]
import Foundation
import SessionLog

let args = CommandLine.arguments
guard args.count >= 2 else {
    FileHandle.standardError.write("usage: journal-torture DIR [tasks] [sessions] [segmentBytes]\n".data(using: .utf8)!)
    exit(2)
}
let directory = args[1]
let tasks = args.count > 2 ? Int(args[2]) ?? 16 : 16
let sessionCount = args.count > 3 ? Int(args[3]) ?? 4 : 4
let segmentBytes = args.count > 4 ? Int(args[4]) ?? (1 << 20) : (1 << 20)

func emit(_ line: String) {
    var bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { write(1, $0.baseAddress, $0.count) }
}

do {
    let store = try await SessionStore.open(directory: directory, options: SessionStoreOptions(segmentBytes: segmentBytes))
    emit("ready \(store.recovery.tornTail.map { "torn \($0.segment) \($0.offset)" } ?? "clean")")
    let sessions = try (0..<sessionCount).map { try SessionID(String(format: "torture-%02d", $0)) }
    try await withThrowingTaskGroup(of: Void.self) { group in
        for task in 0..<tasks {
            group.addTask {
                let session = sessions[task % sessions.count]
                var n = 0
                while true {
                    let pad = String(repeating: "x", count: (task * 37 + n * 11) % 700)
                    let payload = Array("{\"task\":\(task),\"n\":\(n),\"pad\":\"\(pad)\"}".utf8)
                    let seq = try await store.append(session: session, type: "torture.event", payload: payload)
                    emit("ack \(session) \(seq) \(task) \(n)")
                    n += 1
                    try await Task.sleep(for: .microseconds(Int.random(in: 0...1500)))
                }
            }
        }
        // One more task drives a fenced session: wake, then appends under the new epoch.
        group.addTask {
            let session = try SessionID("torture-fenced")
            while true {
                let lease = try await store.wake(session: session)
                emit("lease \(session) \(lease.seq) \(lease.epoch)")
                for n in 0..<5 {
                    let seq = try await store.append(session: session, type: "torture.fenced", payload: Array("{\"epoch\":\(lease.epoch),\"n\":\(n)}".utf8), epoch: lease.epoch)
                    emit("ack \(session) \(seq) \(lease.epoch) \(n)")
                }
                let cp = try await store.checkpoint(session: session, state: Array("{\"epoch\":\(lease.epoch)}".utf8), epoch: lease.epoch)
                emit("checkpoint \(session) \(cp) \(lease.epoch)")
            }
        }
        try await group.next()
    }
} catch {
    emit("error \(error)")
    exit(1)
}

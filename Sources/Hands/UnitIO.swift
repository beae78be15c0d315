import Blocking
import Foundation
import Glibc
import Synchronization
import SystemdBus

/// Pipes and files handed to a unit as its stdin/stdout/stderr.
enum UnitIO {
    /// A pipe: `read` stays with agentd, `write` goes to the unit (both close-on-exec).
    /// - Throws: `HandsError.unreachable` when no pipe can be made (out of descriptors).
    static func pipe() throws -> (read: Int32, write: Int32) {
        _ = try PipeReader.loop()
        do { return try UnitStreams.pipe() } catch { throw HandsError(.unreachable, "\(error)") }
    }

    /// Reads `fd` to its end, keeping at most `limit` bytes and draining the rest so that the
    /// writer never blocks. Closes `fd`. No thread waits for it: the one `PipeReader` loop
    /// thread reads every pipe of every command, and this task suspends until the end.
    /// - Returns: the bytes kept and whether more arrived.
    static func drain(_ fd: Int32, limit: Int) async -> (bytes: [UInt8], truncated: Bool) {
        guard let loop = try? PipeReader.loop() else {
            // Unreachable in practice: `pipe()` started the loop before making `fd`.
            close(fd)
            return ([], true)
        }
        return await withCheckedContinuation { continuation in
            loop.add(PipeReader.Drain(fd: fd, limit: limit, continuation: continuation))
        }
    }

    /// An unlinked temporary file in `directory` holding `contents`: a unit's stdin.
    static func contentsFile(_ contents: [UInt8], in directory: String) throws -> Int32 {
        do { return try UnitStreams.temporaryFile(contents, in: directory) } catch { throw HandsError(.unreachable, "\(error)") }
    }
}

/// One thread that reads the output pipes of every running unit command.
///
/// Why: a blocking `read` per pipe held a `BlockingPool` thread per pipe (two per command)
/// for the whole command, so 16 long commands used up the pool that journal reads and engine
/// calls wait on. Here one dedicated thread `poll(2)`s every pipe at once, together with a
/// wake pipe that `add` writes to; each pipe's reader is a continuation resumed when its pipe
/// ends. A pipe read is one 64 KiB `read` per ready pipe per round (level-triggered), so one
/// chatty command cannot starve the others. `poll` rather than epoll: Swift's Glibc module
/// does not export epoll, and the set is rebuilt only when a round ends, for some hundred
/// descriptors at most.
final class PipeReader: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `drains` and `buffer` are touched only on the loop
    // thread; `pending` is behind its Mutex; the wake pipe's ends are written once in `init`.
    struct Drain: Sendable {
        let fd: Int32
        let limit: Int
        let continuation: CheckedContinuation<(bytes: [UInt8], truncated: Bool), Never>
    }

    /// One pipe being read, on the loop thread.
    private final class Reading {
        let drain: Drain
        var kept: [UInt8] = []
        var truncated = false
        init(_ drain: Drain) { self.drain = drain }
    }

    private static let instance = Mutex<PipeReader?>(nil)

    /// The process's reader, started on first use.
    /// - Throws: `HandsError.unreachable` when its wake pipe cannot be made.
    static func loop() throws -> PipeReader {
        try instance.withLock { current in
            if let current { return current }
            let wake: (read: Int32, write: Int32)
            do { wake = try UnitStreams.pipe() } catch { throw HandsError(.unreachable, "cannot start the pipe reader: \(error)") }
            // A full wake pipe already means "wake up": never block the writer.
            _ = fcntl(wake.write, F_SETFL, fcntl(wake.write, F_GETFL) | O_NONBLOCK)
            let reader = PipeReader(wakeRead: wake.read, wakeWrite: wake.write)
            startDedicatedThread(name: "agentd-pipes") { reader.run() }
            current = reader
            return reader
        }
    }

    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let pending = Mutex<[Drain]>([])
    private var drains: [Reading] = []
    private var buffer = [UInt8](repeating: 0, count: 65536)

    private init(wakeRead: Int32, wakeWrite: Int32) {
        self.wakeRead = wakeRead
        self.wakeWrite = wakeWrite
    }

    /// Starts reading `drain.fd`; its continuation is resumed at the pipe's end.
    func add(_ drain: Drain) {
        pending.withLock { $0.append(drain) }
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
    }

    private func run() {
        while true {
            let added = pending.withLock { queued in
                let taken = queued
                queued.removeAll()
                return taken
            }
            drains += added.map(Reading.init)
            var fds = [pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            fds += drains.map { pollfd(fd: $0.drain.fd, events: Int16(POLLIN), revents: 0) }
            let r = poll(&fds, nfds_t(fds.count), -1)
            if r < 0 { continue }  // EINTR; nothing else can fail for valid arguments
            if fds[0].revents != 0 {
                _ = buffer.withUnsafeMutableBytes { read(wakeRead, $0.baseAddress, 512) }
            }
            var ended: [Int] = []
            for (index, reading) in drains.enumerated() where fds[index + 1].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(reading.drain.fd, $0.baseAddress, $0.count) }
                if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                if n <= 0 {
                    ended.append(index)
                    continue
                }
                let room = max(0, reading.drain.limit - reading.kept.count)
                if room > 0 { reading.kept.append(contentsOf: buffer[0..<min(n, room)]) }
                if n > room { reading.truncated = true }
            }
            for index in ended.reversed() {
                let reading = drains.remove(at: index)
                close(reading.drain.fd)
                reading.drain.continuation.resume(returning: (reading.kept, reading.truncated))
            }
        }
    }
}

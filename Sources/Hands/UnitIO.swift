import Blocking
import Foundation
import Glibc
import SystemdBus

/// Pipes and files handed to a unit as its stdin/stdout/stderr.
enum UnitIO {
    /// A pipe: `read` stays with agentd, `write` goes to the unit (both close-on-exec).
    static func pipe() throws -> (read: Int32, write: Int32) {
        do { return try UnitStreams.pipe() } catch { throw HandsError(.unreachable, "\(error)") }
    }

    /// Reads `fd` to its end on a blocking-pool thread (never the cooperative pool), keeping
    /// at most `limit` bytes and draining the rest so that the writer never blocks. Closes `fd`.
    /// - Returns: the bytes kept and whether more arrived.
    static func drain(_ fd: Int32, limit: Int) async -> (bytes: [UInt8], truncated: Bool) {
        (try? await BlockingPool.shared.run {
            defer { close(fd) }
            var kept: [UInt8] = []
            var truncated = false
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                let room = max(0, limit - kept.count)
                if room > 0 { kept.append(contentsOf: buffer[0..<min(n, room)]) }
                if n > room { truncated = true }
            }
            return (kept, truncated)
        }) ?? ([], false)
    }

    /// An unlinked temporary file in `directory` holding `contents`: a unit's stdin.
    static func contentsFile(_ contents: [UInt8], in directory: String) throws -> Int32 {
        do { return try UnitStreams.temporaryFile(contents, in: directory) } catch { throw HandsError(.unreachable, "\(error)") }
    }
}

/// Splits the Docker Engine API's multiplexed stream (used by attach and by exec without a
/// TTY) into stdout and stderr.
///
/// Each frame is an 8-byte header — stream id (0 stdin, 1 stdout, 2 stderr), three zero bytes,
/// a big-endian UInt32 length — followed by that many bytes.
public enum StreamDemultiplexer {
    /// Demultiplexes a complete stream.
    /// - Returns: stdout, stderr, and whether the stream ended inside a frame (cut short).
    public static func split(_ bytes: [UInt8]) -> (stdout: [UInt8], stderr: [UInt8], incomplete: Bool) {
        var stdout: [UInt8] = []
        var stderr: [UInt8] = []
        var i = 0
        while i < bytes.count {
            guard bytes.count - i >= 8 else { return (stdout, stderr, true) }
            let kind = bytes[i]
            let length = Int(bytes[i + 4]) << 24 | Int(bytes[i + 5]) << 16 | Int(bytes[i + 6]) << 8 | Int(bytes[i + 7])
            let start = i + 8
            let end = min(start + length, bytes.count)
            if kind == 2 {
                stderr.append(contentsOf: bytes[start..<end])
            } else {
                stdout.append(contentsOf: bytes[start..<end])
            }
            if end < start + length { return (stdout, stderr, true) }
            i = end
        }
        return (stdout, stderr, false)
    }
}

import Foundation

/// The shell side of `write_file` and `read_file`, run inside a sandbox as its user by both
/// drivers: the sandbox's own view of the filesystem and its own permissions decide where a
/// path leads and whether it may be written, never the host's or root's.
enum SandboxFiles {
    /// Copies `$1` (bytes staged by agentd; removed afterwards) into `$2`, making its directory.
    static let copyScript = #"mkdir -p "$(dirname "$2")" && cat "$1" > "$2"; rc=$?; rm -f "$1"; exit $rc"#

    /// Writes stdin into `$1`, making its directory (the unit driver passes the bytes as stdin).
    static let writeScript = #"mkdir -p "$(dirname "$1")" && cat > "$1""#

    /// Prints `$1` if it is a file of at most `limit` bytes; otherwise says why on stderr and
    /// exits 2 (no such file, a directory) or 3 (too large).
    static func readScript(limit: Int) -> String {
        """
        if [ -d "$1" ]; then echo "$1 is a directory" >&2; exit 2; fi
        size=$(wc -c < "$1") || exit 2
        if [ "$size" -gt \(limit) ]; then echo "$1 is $size bytes, more than the limit of \(formatBytes(limit))" >&2; exit 3; fi
        exec cat "$1"
        """
    }

    /// The bytes `readScript` printed.
    /// - Throws: `HandsError.invalidRequest` saying why the file could not be read.
    static func checkedRead(_ out: CommandOutput, path: String, limit: Int) throws -> [UInt8] {
        guard out.exitCode == 0 else { throw HandsError(.invalidRequest, "cannot read \(path): \(text(out.stderr))") }
        guard !out.truncated, out.stdout.count <= limit else {
            throw HandsError(.invalidRequest, "\(path) is larger than the limit of \(formatBytes(limit))")
        }
        return out.stdout
    }

    static func text(_ bytes: [UInt8]) -> String {
        String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

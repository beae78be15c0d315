import Foundation
import Logging
import ServiceLifecycle

/// Gives back the code pages agentd touched while starting, once the API listens.
///
/// Starting touches a lot of code that never runs again (argument parsing, policy loading,
/// journal recovery, engine negotiation, NIO set-up); those pages stay resident and count in
/// the process's RSS although the host gets nothing from them. This advises the kernel to drop
/// them from agentd (`madvise(MADV_DONTNEED)`) — on the executable's and libraries' **`r-xp`
/// file mappings only**: those pages are clean copies of the file, so dropping them loses
/// nothing; they stay in the page cache and fault back in (cheaply) when code runs again.
/// Writable, anonymous and special mappings (`[vdso]`, `[stack]`) are never touched.
public enum StartupTrim {
    /// One mapping of `/proc/self/maps` that may be dropped.
    struct Mapping: Equatable {
        var start: UInt
        var end: UInt
        var path: String
    }

    /// The clean, executable, file-backed mappings in a `/proc/PID/maps` text.
    static func codeMappings(_ maps: String) -> [Mapping] {
        maps.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count == 6, fields[1] == "r-xp" else { return nil }
            let path = fields[5].trimmingCharacters(in: .whitespaces)
            guard path.hasPrefix("/"), !path.hasSuffix("(deleted)") else { return nil }
            let range = fields[0].split(separator: "-")
            guard range.count == 2, let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16), end > start else {
                return nil
            }
            return Mapping(start: start, end: end, path: path)
        }
    }

    /// Drops the pages of this process's code mappings.
    /// - Returns: how many mappings were advised and their total size in bytes.
    @discardableResult
    public static func run() -> (mappings: Int, bytes: UInt) {
        guard let maps = readToEnd("/proc/self/maps") else { return (0, 0) }
        var count = 0
        var bytes: UInt = 0
        for m in codeMappings(maps) {
            if madvise(UnsafeMutableRawPointer(bitPattern: m.start), Int(m.end - m.start), MADV_DONTNEED) == 0 {
                count += 1
                bytes += m.end - m.start
            }
        }
        return (count, bytes)
    }
}

extension StartupTrim {
    /// The whole of a `/proc` file: it reports size 0 and hands out a page per read, so read
    /// until `read` says the end (Foundation's file readers stop after the first page).
    static func readToEnd(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += chunk[..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Runs `StartupTrim` once the server listens, then waits for shutdown (a service may only
/// end with its group).
public struct StartupTrimService: Service {
    let server: HTTPServer
    let logger: Logger

    public init(server: HTTPServer, logger: Logger) {
        self.server = server
        self.logger = logger
    }

    public func run() async throws {
        try await server.waitUntilListening()
        // Let the first burst of start-up work (pool refills, reconcile) settle first.
        try? await Task.sleep(for: .milliseconds(500))
        let (mappings, bytes) = StartupTrim.run()
        logger.debug("dropped start-up code pages", metadata: ["mappings": "\(mappings)", "mapped-bytes": "\(bytes)"])
        try? await gracefulShutdown()
    }
}

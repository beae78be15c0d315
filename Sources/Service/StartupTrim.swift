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
        // Read to the end: a single sized read of /proc/self/maps returns one page only.
        guard let data = FileManager.default.contents(atPath: "/proc/self/maps") else { return (0, 0) }
        var count = 0
        var bytes: UInt = 0
        for m in codeMappings(String(decoding: data, as: UTF8.self)) {
            if madvise(UnsafeMutableRawPointer(bitPattern: m.start), Int(m.end - m.start), MADV_DONTNEED) == 0 {
                count += 1
                bytes += m.end - m.start
            }
        }
        return (count, bytes)
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
        await server.waitUntilListening()
        // Let the first burst of start-up work (pool refills, reconcile) settle first.
        try? await Task.sleep(for: .milliseconds(500))
        let (mappings, bytes) = StartupTrim.run()
        logger.debug("dropped start-up code pages", metadata: ["mappings": "\(mappings)", "mapped-bytes": "\(bytes)"])
        try? await gracefulShutdown()
    }
}

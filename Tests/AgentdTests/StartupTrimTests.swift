import Foundation
import Testing

@testable import Service

/// agentd's start-up trim on this very process: it must see every code mapping (a partial read
/// of /proc/self/maps once advised 3 of 57) and touch nothing but clean code.
@Suite("start-up trim")
struct StartupTrimTests {
    @Test("reads all of /proc/self/maps and picks only file-backed r-xp mappings; the process runs on after the trim")
    func trimsOnlyCode() throws {
        let maps = try #require(StartupTrim.readToEnd("/proc/self/maps"))
        let lines = maps.split(separator: "\n")
        // Larger than the one page a single read returns: the whole file was read.
        #expect(maps.utf8.count > 4096, "read \(maps.utf8.count) bytes")
        let expected = lines.filter { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return f.count >= 6 && f[1] == "r-xp" && f[5].hasPrefix("/")
        }.count
        let picked = StartupTrim.codeMappings(maps)
        #expect(picked.count == expected)
        #expect(picked.contains { $0.path.contains("libswiftCore") })
        #expect(picked.allSatisfy { $0.end > $0.start && $0.path.hasPrefix("/") })

        let (advised, bytes) = StartupTrim.run()
        #expect(advised == expected && bytes > 0)
        // Code paged out runs again from the page cache.
        let again = StartupTrim.codeMappings(try #require(StartupTrim.readToEnd("/proc/self/maps")))
        #expect(again.count == picked.count)
    }
}

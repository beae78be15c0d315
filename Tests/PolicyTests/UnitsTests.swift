import Testing

@testable import Policy

@Suite struct UnitsTests {
    @Test(arguments: [
        ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("64KiB", 64 << 10), ("1024", 1024), ("1024B", 1024),
        ("2MB", 2_000_000), ("1GB", 1_000_000_000), ("1.5GiB", 3 << 29), ("512 MiB", 512 << 20), ("1TiB", 1 << 40),
    ])
    func sizes(text: String, bytes: Int) {
        #expect(PolicyUnits.parseSize(text) == .success(bytes))
    }

    @Test func badSizes() {
        #expect(PolicyUnits.parseSize("12 potatoes") == .failure(.malformed))
        #expect(PolicyUnits.parseSize("512mib") == .failure(.unknownUnit("mib", suggestion: "MiB")))
        #expect(PolicyUnits.parseSize("512Mi") == .failure(.unknownUnit("Mi", suggestion: nil)))
        #expect(PolicyUnits.parseSize("-1MiB") == .failure(.malformed))
        #expect(PolicyUnits.parseSize("0.5") == .failure(.notWhole))
        #expect(PolicyUnits.parseSize("99999999TiB") == .failure(.tooLarge))
        #expect(PolicyUnits.parseSize("") == .failure(.malformed))
    }

    @Test(arguments: [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), ("1.5s", 1.5), ("1m30s", 90.0)])
    func durations(text: String, seconds: Double) {
        #expect(PolicyUnits.parseDuration(text) == .success(seconds))
    }

    @Test func badDurations() {
        #expect(PolicyUnits.parseDuration("30") == .failure(.missingUnit))
        #expect(PolicyUnits.parseDuration("30sec") == .failure(.unknownUnit("sec", suggestion: nil)))
        #expect(PolicyUnits.parseDuration("30S") == .failure(.unknownUnit("S", suggestion: "s")))
        #expect(PolicyUnits.parseDuration("soon") == .failure(.malformed))
        #expect(PolicyUnits.parseDuration("1m30") == .failure(.malformed))
    }

    @Test func formatting() {
        #expect(PolicyUnits.formatSize(512 << 20) == "512MiB")
        #expect(PolicyUnits.formatSize(1 << 30) == "1GiB")
        #expect(PolicyUnits.formatSize(1000) == "1000")
        #expect(PolicyUnits.formatDuration(seconds: 300) == "5m")
        #expect(PolicyUnits.formatDuration(seconds: 0.25) == "250ms")
        #expect(PolicyUnits.formatDuration(seconds: 1.5) == "1.5s")
        #expect(PolicyUnits.formatDuration(seconds: 7200) == "2h")
    }
}

/// Parsing and formatting of the units policy files use: sizes (`512MiB`), durations (`30s`).
public enum PolicyUnits {
    /// Accepted size suffixes and their multipliers. Binary (`KiB`…) and decimal (`KB`…).
    public static let sizeUnits: [(suffix: String, bytes: Int)] = [
        ("B", 1),
        ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40),
        ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("TB", 1_000_000_000_000),
    ]
    /// Accepted duration suffixes and their length in seconds.
    public static let durationUnits: [(suffix: String, seconds: Double)] = [
        ("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600),
    ]

    enum ParseError: Error, Equatable {
        /// Not shaped like a number followed by a unit.
        case malformed
        /// A number directly followed by letters that are not a known unit.
        case unknownUnit(String, suggestion: String?)
        /// A duration written as a bare number.
        case missingUnit
        /// Too large for the field type, or a fraction of a byte.
        case notWhole
        case tooLarge
    }

    /// Parses a size the way policy files write it (`512MiB`, `2GB`, `1024`) into bytes; nil
    /// when it is not one. For options outside policy files (agentd's `--sandbox-memory`).
    public static func size(_ text: String) -> Int? { try? parseSize(text).get() }

    /// Parses `512MiB`, `1.5GiB`, `64KiB`, `1024` (bytes), `2GB` into bytes.
    static func parseSize(_ text: String) -> Result<Int, ParseError> {
        let s = text.trimmingWhitespace()
        let (number, gap, unit) = splitNumber(s)
        guard let number, let value = Double(number), value.isFinite, value >= 0 else { return .failure(.malformed) }
        var multiplier = 1
        if !unit.isEmpty {
            guard let known = sizeUnits.first(where: { $0.suffix == unit }) else {
                if gap || !unit.allSatisfy(\.isLetter) { return .failure(.malformed) }
                let suggestion = sizeUnits.first { $0.suffix.lowercased() == unit.lowercased() }?.suffix
                return .failure(.unknownUnit(unit, suggestion: suggestion))
            }
            multiplier = known.bytes
        }
        let bytes = value * Double(multiplier)
        guard bytes < 9.0e18 else { return .failure(.tooLarge) }
        guard bytes.rounded() == bytes else { return .failure(.notWhole) }
        return .success(Int(bytes))
    }

    /// Parses `250ms`, `30s`, `1.5s`, `5m`, `1h` and sums like `1m30s` into seconds.
    static func parseDuration(_ text: String) -> Result<Double, ParseError> {
        var rest = Substring(text.trimmingWhitespace())
        guard !rest.isEmpty else { return .failure(.malformed) }
        var total = 0.0
        while !rest.isEmpty {
            let digits = rest.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
            guard !digits.isEmpty, let value = Double(digits), value.isFinite else { return .failure(.malformed) }
            rest = rest.dropFirst(digits.count)
            let unit = rest.prefix { $0.isLetter }
            if unit.isEmpty {
                return rest.isEmpty && total == 0 ? .failure(.missingUnit) : .failure(.malformed)
            }
            rest = rest.dropFirst(unit.count)
            guard let known = durationUnits.first(where: { $0.suffix == unit }) else {
                let suggestion = durationUnits.first { $0.suffix == unit.lowercased() }?.suffix
                return .failure(.unknownUnit(String(unit), suggestion: suggestion))
            }
            total += value * known.seconds
        }
        guard total < 1e12 else { return .failure(.tooLarge) }
        return .success(total)
    }

    /// Formats bytes with the largest binary unit that divides them exactly (`536870912` → `512MiB`).
    public static func formatSize(_ bytes: Int) -> String {
        for (suffix, unit) in [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        where bytes != 0 && bytes % unit == 0 {
            return "\(bytes / unit)\(suffix)"
        }
        return "\(bytes)"
    }

    /// Formats seconds with the largest unit that divides them exactly (`300` → `5m`, `0.25` → `250ms`).
    public static func formatDuration(seconds: Double) -> String {
        let ms = (seconds * 1000).rounded()
        if ms == 0 { return "0s" }
        for (suffix, unit) in [("h", 3_600_000.0), ("m", 60_000.0), ("s", 1000.0)]
        where ms.truncatingRemainder(dividingBy: unit) == 0 {
            return "\(Int64(ms / unit))\(suffix)"
        }
        if ms < 1000 { return "\(Int64(ms))ms" }
        return "\(formatNumber(ms / 1000))s"
    }

    /// `1.0` → `1`, `1.5` → `1.5`.
    static func formatNumber(_ value: Double) -> String {
        if value.rounded() == value, abs(value) < 1e15 { return String(Int64(value)) }
        return String(value)
    }

    /// Splits `12.5 MiB` into ("12.5", gap: true, "MiB").
    private static func splitNumber(_ s: String) -> (String?, Bool, String) {
        let number = s.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
        guard !number.isEmpty else { return (nil, false, "") }
        let afterNumber = s.dropFirst(number.count)
        let unit = afterNumber.drop { $0 == " " }
        return (String(number), unit.count != afterNumber.count, String(unit))
    }
}

extension String {
    func trimmingWhitespace() -> String {
        String(self.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
}

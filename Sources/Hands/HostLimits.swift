import Foundation

/// How many sandboxes one agentd may run on its host, and how much memory their limits may
/// add up to (agentd's `--max-sandboxes` and `--sandbox-memory`).
///
/// Every sandbox counts, live and warm (pooled) alike: a memory limit is a promise the kernel
/// keeps only while the limits together fit in the host's RAM, and 20 tasks of 512 MiB on a
/// host shared with other work is already most of it.
public struct HostLimits: Sendable, Equatable {
    /// Most sandboxes at once; nil for no limit.
    public var maxSandboxes: Int?
    /// Most bytes of memory limits summed over every sandbox; nil for no limit.
    public var memoryBytes: Int?
    /// How `memoryBytes` was given, for error messages (`75% of 23.4 GiB`).
    public var memorySource: String

    public init(maxSandboxes: Int? = nil, memoryBytes: Int? = nil, memorySource: String = "") {
        self.maxSandboxes = maxSandboxes
        self.memoryBytes = memoryBytes
        self.memorySource = memorySource
    }

    /// The host's RAM (`MemTotal` of `/proc/meminfo`), or nil when it cannot be read.
    public static func hostMemoryBytes(meminfo: String = "/proc/meminfo") -> Int? {
        guard let text = try? String(contentsOfFile: meminfo, encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("MemTotal:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, let kib = Int(fields[1]) else { return nil }
            let (bytes, overflow) = kib.multipliedReportingOverflow(by: 1024)
            return overflow ? nil : bytes
        }
        return nil
    }

    /// Parses a memory budget: a share of the host's RAM (`75%`), a size (`16GiB`), or `0`
    /// for no limit.
    /// - Parameters:
    ///   - text: what the operator wrote.
    ///   - hostMemory: the host's RAM in bytes, for a share.
    ///   - parseSize: the size syntax policies use (`PolicyUnits.size`), so that both read alike.
    /// - Returns: the budget in bytes (nil for no limit) and how to name it in messages.
    /// - Throws: `HandsError.invalidRequest` saying what is accepted.
    public static func memoryBudget(_ text: String, hostMemory: Int?, parseSize: (String) -> Int?) throws -> (bytes: Int?, source: String) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        if trimmed == "0" || trimmed == "none" { return (nil, "") }
        if trimmed.hasSuffix("%") {
            guard let percent = Double(trimmed.dropLast()), percent > 0, percent <= 100 else {
                throw HandsError(.invalidRequest, "sandbox memory budget '\(text)': a share must be a percentage above 0 and at most 100, such as 75%")
            }
            guard let hostMemory else {
                throw HandsError(.invalidRequest, "sandbox memory budget '\(text)': the host's RAM cannot be read from /proc/meminfo; give a size such as 16GiB instead")
            }
            return (Int(Double(hostMemory) * percent / 100), "\(trimmed) of the host's \(formatBytes(hostMemory))")
        }
        guard let bytes = parseSize(trimmed), bytes > 0 else {
            throw HandsError(.invalidRequest, "sandbox memory budget '\(text)': give a share of the host's RAM (75%), a size (16GiB, 512MiB) or 0 for no limit")
        }
        return (bytes, formatBytes(bytes))
    }
}

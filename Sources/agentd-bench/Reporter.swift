import Foundation

/// Prints one line per figure, `name value unit`, and keeps the figures so that later ones
/// can be printed as ratios of the baselines measured in the same run.
final class Reporter: @unchecked Sendable {
    // Invariant: used from the benchmark's single top-level task only.
    private var figures: [String: Double] = [:]

    func figure(_ name: String, _ value: Double, _ unit: String) {
        figures[name] = value
        let text = value >= 100 || value == value.rounded() ? String(format: "%.0f", value) : String(format: "%.3f", value)
        print("\(name) \(text) \(unit)")
        fflush(nil)
    }

    /// Prints `name` as `figures[numerator] / figures[denominator]`, with the goal in a comment.
    func ratio(_ name: String, _ numerator: String, over denominator: String, goal: String) {
        guard let n = figures[numerator], let d = figures[denominator], d > 0 else { return }
        print("\(name) \(String(format: "%.3f", n / d)) x")
        fflush(nil)
        self.goal(name, goal)
    }

    /// Writes the goal of figure `name` to stderr, so that stdout stays strictly `name value unit`.
    func goal(_ name: String, _ goal: String) {
        FileHandle.standardError.write(Data("# \(name): goal \(goal)\n".utf8))
    }

    func value(_ name: String) -> Double? { figures[name] }
}

/// Percentile of sorted samples (nearest rank).
func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return .nan }
    let rank = Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1
    return sorted[min(max(rank, 0), sorted.count - 1)]
}

/// Paired sampling: round `i` in `0...rounds` measures the baseline and the subject back to
/// back (in `body`), so that both see the same moment of the machine; round 0 only warms both
/// paths, and a round whose subject is nil is dropped. Returns both samples, sorted.
func pairedSamples(
    rounds: Int, _ body: (_ round: Int) async throws -> (baseline: Double, subject: Double?)
) async rethrows -> (baseline: [Double], subject: [Double]) {
    var baseline: [Double] = []
    var subject: [Double] = []
    for i in 0...rounds {
        let (b, s) = try await body(i)
        if i > 0, let s {
            baseline.append(b)
            subject.append(s)
        }
    }
    return (baseline.sorted(), subject.sorted())
}

/// Seconds `body` took, and what it returned.
func timed<T>(_ body: () async throws -> T) async rethrows -> (seconds: Double, value: T) {
    let t0 = now()
    let value = try await body()
    return (now() - t0, value)
}

/// Monotonic time in seconds.
func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// The executable `name` next to this binary (`make bench` builds them all into one directory).
func siblingExecutable(_ name: String) throws -> String {
    let binary = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
        .deletingLastPathComponent().appendingPathComponent(name).path
    guard FileManager.default.isExecutableFile(atPath: binary) else {
        throw RawUnixHTTP.Failure(description: "\(name) is not built next to agentd-bench (\(binary)); `make bench` builds both")
    }
    return binary
}

/// Journal benchmarks (issue 4). Placeholder until the SessionLog lands.
enum JournalBench {
    static func run(_ report: Reporter) async throws {}
}

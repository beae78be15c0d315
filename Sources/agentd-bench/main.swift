import EngineAPI
import Foundation

// agentd-bench [AREA…]: prints one figure per line, `name value unit`. Each area prints its
// raw baselines first, then agentd's figures and their ratios to those baselines (same run).
// Areas: engine hands throughput systemd unit agentd journal pgstore proxy (default: all, in that order).
CurlTransport.globalInit()
let report = Reporter()
let areas: [(String, (Reporter) async throws -> Void)] = [
    ("engine", EngineBench.run), ("hands", HandsBench.run), ("throughput", ThroughputBench.run), ("systemd", SystemdBench.run), ("unit", UnitBench.run),
    ("agentd", AgentdBench.run), ("journal", JournalBench.run), ("pgstore", PgStoreBench.run), ("proxy", ProxyBench.run),
]
let asked = Array(CommandLine.arguments.dropFirst())
if let unknown = asked.first(where: { name in !areas.contains { $0.0 == name } }) {
    FileHandle.standardError.write(Data("agentd-bench: unknown area '\(unknown)'; the areas are \(areas.map(\.0).joined(separator: " "))\n".utf8))
    exit(2)
}
for (name, run) in areas where asked.isEmpty || asked.contains(name) {
    try await run(report)
}

import EngineAPI

// agentd-bench: prints one figure per line, `name value unit`. Each area prints its raw
// baselines first, then agentd's figures and their ratios to those baselines (same run).
CurlTransport.globalInit()
let report = Reporter()
try await EngineBench.run(report)
try await HandsBench.run(report)
try await SystemdBench.run(report)
try await UnitBench.run(report)
try await AgentdBench.run(report)
try await JournalBench.run(report)

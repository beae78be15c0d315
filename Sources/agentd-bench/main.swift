// agentd-bench: prints one figure per line, `name value unit`, baselines first, then the
// figures that are compared with them in the same run.
let report = Reporter()
try await JournalBench.run(report)

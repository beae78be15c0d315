import ArgumentParser

@main
struct AgentCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agentctl",
        abstract: "Control agentd: sessions, tools, policies.",
        subcommands: [PolicyCommand.self])
}

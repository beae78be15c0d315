import ArgumentParser

/// agentd: the host service (`agentd serve`, the default subcommand) and its offline tools.
@main
struct AgentD: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agentd",
        abstract: "The agentd host service: sessions, on-demand sandboxes (Hands), policies, and the API for Brains.",
        discussion: "Without a subcommand, agentd runs `serve`: `agentd --state-dir DIR` is `agentd serve --state-dir DIR`.",
        subcommands: [Serve.self, MigrateJournal.self],
        defaultSubcommand: Serve.self)
}

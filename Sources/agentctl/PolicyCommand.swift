import ArgumentParser

/// `agentctl policy …` — placeholder until the Policy module lands.
struct PolicyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "policy", abstract: "Check and show policy files.")
}

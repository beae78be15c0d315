import Glibc
import SandboxAgent

/// The sandbox agent executable: wiring only (the logic is in the SandboxAgent module).
@main
struct SandboxAgentMain {
    static func main() {
        exit(SandboxAgent.main(arguments: Array(CommandLine.arguments.dropFirst())))
    }
}

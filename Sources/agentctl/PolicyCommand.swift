import ArgumentParser
import Foundation
import Policy

/// `agentctl policy …`: check policy files and show effective policies.
struct PolicyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Check and show policy files.",
        subcommands: [Check.self, Show.self])

    /// `agentctl policy check FILE…`
    struct Check: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate policy files; print every error as FILE:LINE:COL: message.")

        @Argument(help: "Policy files to check (names must also be unique across them).")
        var files: [String]

        @Flag(help: "Print a JSON array of {file, ok, diagnostics}.")
        var json = false

        func run() async throws {
            let set = PolicySet.load(files: files)
            if json {
                let reports = files.map { file in
                    FileReport(file: file, ok: set.diagnostics(for: file).isEmpty, diagnostics: set.diagnostics(for: file))
                }
                printJSON(reports)
            } else {
                for file in files {
                    let diagnostics = set.diagnostics(for: file)
                    if diagnostics.isEmpty {
                        print("\(file): ok")
                    } else {
                        diagnostics.forEach { print($0) }
                    }
                }
            }
            if !set.isValid { throw ExitCode.failure }
        }

        struct FileReport: Encodable {
            var file: String
            var ok: Bool
            var diagnostics: [PolicyDiagnostic]
        }
    }

    /// `agentctl policy show [NAME]`
    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a policy with every default filled in; credentials only as their sources.")

        @Argument(help: "Policy name (metadata.name).")
        var name: String = Policy.defaultName

        @Option(help: "Policy directory (default: $AGENTD_POLICIES, else ./policies).")
        var policies: String?

        @Flag(help: "Print the policy as JSON (sizes in bytes, durations in seconds).")
        var json = false

        func run() async throws {
            let directory = policies ?? ProcessInfo.processInfo.environment["AGENTD_POLICIES"] ?? "policies"
            let set = PolicySet.load(directory: directory)
            for diagnostic in set.diagnostics {
                FileHandle.standardError.write(Data("\(diagnostic)\n".utf8))
            }
            guard let policy = set.policy(named: name) else {
                let known = set.names.isEmpty ? "none loaded" : "found: \(set.names.joined(separator: ", "))"
                FileHandle.standardError.write(Data("no policy named '\(name)' in \(directory) (\(known))\n".utf8))
                throw ExitCode.failure
            }
            if json {
                printJSON(policy)
            } else {
                print(policy.effectiveYAML(), terminator: "")
            }
            // agentd would refuse this directory as a whole; say so through the exit status.
            if !set.isValid { throw ExitCode.failure }
        }
    }
}

import Crypto
import Foundation

/// Every policy of a directory (or of a list of files), by `metadata.name`, with the
/// diagnostics of every file that did not load.
///
/// A set with any diagnostic is not valid as a whole: `PolicyStore` refuses it and keeps its
/// last good set. The policies that did load are still available, for `agentctl policy show`.
public struct PolicySet: Sendable, Hashable {
    /// The directory the set was read from (empty when loaded from a list of files).
    public var directory: String
    /// Loaded policies by `metadata.name`.
    public var policies: [String: Policy]
    /// The files considered, in the order they were read (sorted by name for a directory).
    public var files: [String]
    /// Every located problem across the files, file by file.
    public var diagnostics: [PolicyDiagnostic]

    public init(directory: String = "", policies: [String: Policy] = [:], files: [String] = [], diagnostics: [PolicyDiagnostic] = []) {
        self.directory = directory
        self.policies = policies
        self.files = files
        self.diagnostics = diagnostics
    }

    /// True when every file loaded cleanly and names are unique.
    public var isValid: Bool { diagnostics.isEmpty }

    /// Policy names, sorted.
    public var names: [String] { policies.keys.sorted() }

    /// The policy called `name`; each returned value is an independent snapshot.
    public func policy(named name: String) -> Policy? { policies[name] }

    /// The diagnostics that belong to `file`.
    public func diagnostics(for file: String) -> [PolicyDiagnostic] { diagnostics.filter { $0.path == file } }

    /// SHA-256 over the names and hashes of every loaded policy: equal fingerprints mean
    /// equal effective content.
    public var fingerprint: String {
        let text = names.map { "\($0)\u{0}\(policies[$0]?.sha256 ?? "")\u{0}\(policies[$0]?.sourcePath ?? "")\n" }.joined()
        return PolicyLoader.sha256Hex(Data(text.utf8))
    }

    /// The policy files of `directory`: `*.yaml` and `*.yml`, not hidden, sorted by name.
    ///
    /// - Returns: Paths of the form `directory/file.yaml`, or a message saying why the
    ///   directory cannot be listed.
    public static func policyFiles(in directory: String) -> Result<[String], PolicyError> {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            return .failure(directoryError(directory, "no such directory"))
        }
        do {
            let names = try FileManager.default.contentsOfDirectory(atPath: directory)
                .filter { !$0.hasPrefix(".") && ($0.hasSuffix(".yaml") || $0.hasSuffix(".yml")) }
                .sorted()
            let prefix = directory.hasSuffix("/") ? directory : directory + "/"
            return .success(names.map { prefix + $0 })
        } catch {
            return .failure(directoryError(directory, (error as NSError).localizedDescription))
        }
    }

    /// Loads every policy file of `directory`. Never throws; problems are in `diagnostics`.
    public static func load(directory: String) -> PolicySet {
        switch policyFiles(in: directory) {
        case .success(let files):
            var set = load(files: files)
            set.directory = directory
            return set
        case .failure(let error):
            return PolicySet(directory: directory, diagnostics: error.diagnostics)
        }
    }

    /// Loads the given files as one set; a name defined twice is an error at the second file.
    public static func load(files: [String]) -> PolicySet {
        var set = PolicySet(files: files)
        for file in files {
            switch PolicyLoader.loadLocated(file: file) {
            case .success(let located):
                let name = located.policy.name
                if let first = set.policies[name] {
                    set.diagnostics.append(
                        PolicyDiagnostic(
                            path: file, line: located.nameLine, column: located.nameColumn,
                            message: "duplicate policy name '\(name)' (also defined in \(first.sourcePath)); names must be unique across the policy directory"))
                } else {
                    set.policies[name] = located.policy
                }
            case .failure(let error):
                set.diagnostics += error.diagnostics
            }
        }
        return set
    }

    static func directoryError(_ directory: String, _ reason: String) -> PolicyError {
        .invalid([PolicyDiagnostic(path: directory, line: 1, column: 1, message: "cannot read policy directory: \(reason)")])
    }
}

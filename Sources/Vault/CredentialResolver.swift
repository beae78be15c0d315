import Foundation
import Policy
import SessionLog

/// Reads credential values from their sources (`env:NAME`, `file:PATH`, `systemd:NAME`) on
/// the host. Values only ever live in `Secret`s, which redact themselves; they are handed to
/// the journal's redactor (so that none reaches the disk) and, later, to the egress proxy.
public struct CredentialResolver: Sendable {
    public let environment: [String: String]

    public init(environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.environment = environment
    }

    /// The value of `credential`, or a message saying why it is not available (the value is
    /// never part of the message).
    public func resolve(_ credential: Credential) -> Result<Secret, VaultError> {
        let bytes: [UInt8]?
        let whereFrom: String
        switch credential.source {
        case .env(let name):
            bytes = environment[name].map { Array($0.utf8) }
            whereFrom = "environment variable \(name)"
        case .file(let path):
            bytes = FileManager.default.contents(atPath: path).map(Array.init)
            whereFrom = "file \(path)"
        case .systemd(let name):
            let directory = environment["CREDENTIALS_DIRECTORY"] ?? ""
            bytes = directory.isEmpty ? nil : FileManager.default.contents(atPath: directory + "/" + name).map(Array.init)
            whereFrom = "systemd credential \(name) (LoadCredential=, $CREDENTIALS_DIRECTORY)"
        }
        guard var value = bytes, !value.isEmpty else {
            return .failure(VaultError("credential '\(credential.name)' is not available: \(whereFrom) is missing or empty"))
        }
        while let last = value.last, last == 0x0A || last == 0x0D { value.removeLast() }
        do {
            return .success(try Secret(name: credential.name, bytes: value))
        } catch {
            return .failure(VaultError("credential '\(credential.name)' from \(whereFrom) cannot be used: \(error)"))
        }
    }

    /// Every credential of every policy in `set` that resolves, plus the problems of those
    /// that do not.
    public func resolveAll(_ set: PolicySet) -> (secrets: [Secret], problems: [VaultError]) {
        var secrets: [Secret] = []
        var problems: [VaultError] = []
        var seen: Set<String> = []
        for name in set.names {
            for credential in set.policy(named: name)?.credentials ?? [] where seen.insert("\(credential.name)|\(credential.source)").inserted {
                switch resolve(credential) {
                case .success(let s): secrets.append(s)
                case .failure(let e): problems.append(e)
                }
            }
        }
        return (secrets, problems)
    }
}

/// The one error type of `Vault`.
public struct VaultError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

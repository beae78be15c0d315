/// Which systemd manager to talk to.
///
/// On a host booted with systemd that is the system bus. Where PID 1 is not systemd (CI
/// containers, some VMs) `make env` starts `systemd --user` and prints the address of its
/// private peer-to-peer socket, `unix:path=$XDG_RUNTIME_DIR/systemd/private`.
public enum SystemdAddress: Sendable, Hashable, CustomStringConvertible {
    /// The system bus (`sd_bus_open_system`), talking to PID 1.
    case system
    /// A D-Bus address, e.g. `unix:path=/run/user/0/systemd/private` (peer-to-peer, no bus daemon).
    case address(String)

    /// The environment variable `make env` sets.
    public static let environmentVariable = "AGENTD_SYSTEMD"

    /// Parses `system` or a D-Bus address (`unix:path=…`).
    /// - Throws: `SystemdError.invalidArgument` naming the text and the accepted forms.
    public init(parsing text: String) throws {
        let t = text.trimmingCharacters(in: .whitespaces)
        if t == "system" {
            self = .system
        } else if t.hasPrefix("unix:") {
            self = .address(t)
        } else if t.hasPrefix("/") {
            self = .address("unix:path=\(t)")
        } else {
            throw SystemdError(
                .invalidArgument, "'\(text)' is not a systemd manager address; use `system` or unix:path=/path/to/systemd/private")
        }
    }

    /// The address from `$AGENTD_SYSTEMD`; when unset, the system bus if PID 1 is systemd.
    /// - Throws: `SystemdError.invalidArgument` saying to run `make env` when neither applies.
    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment) throws -> SystemdAddress {
        if let text = environment[environmentVariable], !text.isEmpty { return try SystemdAddress(parsing: text) }
        if isSystemdBooted { return .system }
        throw SystemdError(
            .invalidArgument,
            "\(environmentVariable) is not set and PID 1 is not systemd; run `eval \"$(make -s env)\"` to start a systemd manager and set it")
    }

    /// True when the machine was booted with systemd (the check `sd_booted` makes).
    public static var isSystemdBooted: Bool {
        (try? String(contentsOfFile: "/proc/1/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "systemd"
    }

    public var description: String {
        switch self {
        case .system: "system"
        case .address(let a): a
        }
    }
}

import Foundation

import Foundation
import Glibc

/// Makes a sandbox's uid resolvable by systemd's `User=`: a user and a group record named
/// `agentd-<uid>` as JSON drop-ins in `/run/userdb/`, which nss-systemd (the `systemd` entry of
/// `passwd:` and `group:` in `/etc/nsswitch.conf`) serves.
///
/// Why: systemd refuses a numeric `User=` that no user database knows (exit status 217,
/// EXIT_USER), and the uids agentd allocates are nobody's. The records live in `/run`, so they
/// go with a reboot; a record left by a crash names a uid that nothing runs as.
/// The vault-proxy's unit uses them too (`agentd-vault-proxy-<uid>`).
public enum UserRecords {
    static let directory = "/run/userdb"

    /// Writes the records of `uid` (idempotent), named `name` (default `agentd-<uid>`).
    /// - Throws: `HandsError.provisioning` when they cannot be written.
    public static func write(_ uid: Int, name: String? = nil, home: String = "/workspace", shell: String = "/bin/sh") throws {
        let name = name ?? "agentd-\(uid)"
        let files: [(String, String)] = [
            ("\(name).user", #"{"userName":"\#(name)","uid":\#(uid),"gid":\#(uid),"homeDirectory":"\#(home)","shell":"\#(shell)","disposition":"container"}"#),
            ("\(name).group", #"{"groupName":"\#(name)","gid":\#(uid),"disposition":"container"}"#),
        ]
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            for (file, json) in files {
                try json.write(toFile: directory + "/" + file, atomically: true, encoding: .utf8)
                chmod(directory + "/" + file, 0o644)
            }
            for kind in ["user", "group"] {
                let link = directory + "/\(uid).\(kind)"
                unlink(link)
                guard symlink("\(name).\(kind)", link) == 0 else {
                    throw HandsError(.provisioning, "symlink(\(link)) failed: \(String(cString: strerror(errno)))")
                }
            }
        } catch let error as HandsError {
            throw error
        } catch {
            throw HandsError(.provisioning, "cannot write the user record of uid \(uid) in \(directory): \(error.localizedDescription)")
        }
    }

    /// Removes the records of `uid`.
    static func remove(_ uid: Int) {
        for file in ["agentd-\(uid).user", "agentd-\(uid).group", "\(uid).user", "\(uid).group"] { unlink(directory + "/" + file) }
    }
}

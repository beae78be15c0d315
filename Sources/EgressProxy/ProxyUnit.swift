import Foundation
import Logging
import Hands
import SystemdBus
import Vault

#if canImport(Glibc)
import Glibc
#endif

extension ProxySupervisor {
    /// How the proxy runs as a transient systemd service of its own (the sidecar mode): the
    /// manager, the unit's name, the socket the proxy connects back to, its uid and limits.
    ///
    /// The unit is hardened: its own uid, no capabilities, a read-only file system with no
    /// writable path at all (the sandboxes' listening sockets come to it as descriptors),
    /// private /tmp and /dev, AF_UNIX/AF_INET/AF_INET6 only, `MemoryMax`, `TasksMax`,
    /// `Restart=always`. Nothing secret is in any of its properties: credentials reach the
    /// proxy only over the control socket, after agentd has checked that the peer is the
    /// unit's process running as `uid`.
    public struct SystemdUnit: Sendable {
        /// The uid the proxy runs as unless told otherwise: 599999, just below agentd's
        /// default sandbox uid range (600000–699999), above the 16-bit ids of the host's users,
        /// system accounts and systemd's dynamic users, and below the ranges container engines
        /// hand to user namespaces by default. It must be used by nothing else on the host and
        /// lie outside agentd's `--sandbox-uids`.
        public static let defaultUID: uid_t = 599_999

        public var manager: SystemdManager
        /// Tells this agentd's unit from another's: `agentd-vault-proxy-<instance>.service`.
        public var instance: String
        /// Where agentd listens for the proxy (e.g. `/run/agentd/vault-proxy.sock`). Every
        /// directory above it must be searchable by `uid`, and it must not be under `/tmp`,
        /// `/var/tmp` (the unit's are private), `/home`, `/root` or `/run/user` (hidden).
        public var controlSocket: String
        /// The proxy's uid, also its gid. When no user database knows it, agentd writes a user
        /// and a group record `agentd-vault-proxy-<uid>` to `/run/userdb` (served by
        /// nss-systemd), since systemd refuses a numeric `User=` nobody knows.
        public var uid: uid_t
        public var memoryMax: UInt64
        public var tasksMax: UInt64
        /// systemd's pause before it starts the proxy again after it died.
        public var restartDelay: Duration
        /// The unit the proxy's unit is bound to (`BindsTo=`, `PartOf=`: stopped with it); by
        /// default agentd's own unit, when agentd runs in one.
        public var boundTo: String?

        /// - Parameters:
        ///   - memoryMax: `MemoryMax=` in bytes (256 MiB by default).
        ///   - tasksMax: `TasksMax=` (threads count: NIO's event loops and thread pool).
        public init(
            manager: SystemdManager, instance: String, controlSocket: String, uid: uid_t = defaultUID,
            memoryMax: UInt64 = 256 << 20, tasksMax: UInt64 = 512, restartDelay: Duration = .milliseconds(200), boundTo: String? = nil
        ) {
            self.manager = manager
            self.instance = instance
            self.controlSocket = controlSocket
            self.uid = uid
            self.memoryMax = memoryMax
            self.tasksMax = tasksMax
            self.restartDelay = restartDelay
            self.boundTo = boundTo
        }

        /// `agentd-vault-proxy-<instance>.service`.
        public var name: String { "agentd-vault-proxy-\(instance).service" }

        /// The options that mount systemd's "inaccessible" nodes over kernel interfaces. A
        /// manager that cannot make those mounts (systemd --user as root in a container, as in
        /// CI) fails the start with exit status 226 (EXIT_NAMESPACE); the unit is then started
        /// without them: `ProcSubset=pid` still hides /proc/sys, /proc/kmsg and /proc/kallsyms,
        /// `PrivateDevices` /dev/kmsg, and the proxy holds no capability to use them anyway.
        static let kernelProtections = ["ProtectKernelTunables", "ProtectKernelLogs"]

        /// The transient unit's properties for `argv`, bound to `owner` if given.
        func properties(argv: [String], owner: String?, kernelProtections: Bool = true) -> [UnitProperty] {
            var properties: [UnitProperty] = [
                .string("Description", "agentd egress proxy (vault-proxy) of \(owner ?? "agentd")"),
                .execStart(argv),
                .string("Type", "exec"),
                .string("User", String(uid)),
                .string("Group", String(uid)),
                .string("WorkingDirectory", "/"),
                .strings("Environment", ["LC_ALL=C"]),
                // Nothing it may write: the sandboxes' sockets arrive as descriptors.
                .string("ProtectSystem", "strict"),
                // An empty read-only tmpfs over /home, /root and /run/user.
                .string("ProtectHome", "tmpfs"),
                .bool("PrivateTmp", true),
                .bool("PrivateDevices", true),
                .bool("PrivateIPC", true),
                .string("ProtectProc", "invisible"),
                .string("ProcSubset", "pid"),
                .bool("ProtectKernelModules", true),
                .bool("ProtectControlGroups", true),
                .bool("ProtectClock", true),
                .bool("ProtectHostname", true),
                .bool("NoNewPrivileges", true),
                .uint64("CapabilityBoundingSet", 0),
                .uint64("AmbientCapabilities", 0),
                UnitProperty("RestrictAddressFamilies", .structure([.bool(true), .strings(["AF_UNIX", "AF_INET", "AF_INET6"])])),
                // The set of namespace types it may create: none.
                .uint64("RestrictNamespaces", 0),
                .bool("LockPersonality", true),
                .bool("RestrictRealtime", true),
                .bool("RestrictSUIDSGID", true),
                .bool("MemoryDenyWriteExecute", true),
                .strings("SystemCallArchitectures", ["native"]),
                .systemCallFilter(["@system-service"]),
                UnitProperty("SystemCallErrorNumber", .int32(EPERM)),
                UnitProperty("UMask", .uint32(0o077)),
                .string("KeyringMode", "private"),
                .uint64("MemoryMax", memoryMax),
                .uint64("TasksMax", tasksMax),
                .string("Restart", "always"),
                .duration("RestartUSec", restartDelay),
                // Exit status 3: agentd's control socket is gone, so is agentd: stay down.
                UnitProperty(
                    "RestartPreventExitStatus",
                    .structure([.array(elementSignature: "i", [.int32(3)]), .array(elementSignature: "i", [])])),
                // Restarted however often it dies (it fails closed meanwhile).
                .uint64("StartLimitIntervalUSec", 0),
                .duration("TimeoutStopUSec", .seconds(5)),
                .string("CollectMode", "inactive-or-failed"),
            ]
            if kernelProtections { properties += Self.kernelProtections.map { .bool($0, true) } }
            if let owner { properties += [.strings("BindsTo", [owner]), .strings("PartOf", [owner])] }
            return properties
        }

        /// Throws when the proxy, running as `uid` in its unit, could not reach `path`: a
        /// directory above it it may not search, or a place its namespace hides.
        func checkReachable(_ path: String, what: String, executable: Bool = false) throws {
            guard path.hasPrefix("/") else { throw VaultError("\(what) \(path) must be an absolute path") }
            for hidden in ["/tmp", "/var/tmp", "/home", "/root", "/run/user"] where path.hasPrefix(hidden + "/") {
                throw VaultError(
                    "\(what) \(path) is under \(hidden), which the proxy's unit does not see (PrivateTmp=, ProtectHome=); put it elsewhere, e.g. under /run/agentd")
            }
            var directory = (path as NSString).deletingLastPathComponent
            while true {
                var info = stat()
                guard stat(directory, &info) == 0 else {
                    throw VaultError("\(what) \(path): cannot stat \(directory): \(String(cString: strerror(errno)))")
                }
                let mode = info.st_mode
                let searchable =
                    mode & S_IXOTH != 0 || (info.st_uid == uid && mode & S_IXUSR != 0) || (info.st_gid == uid && mode & S_IXGRP != 0)
                guard searchable else {
                    throw VaultError(
                        "\(what) \(path): directory \(directory) (mode \(String(mode & 0o7777, radix: 8))) is not searchable by the proxy's uid \(uid); make it o+x or put the path elsewhere")
                }
                if directory == "/" { break }
                directory = (directory as NSString).deletingLastPathComponent
            }
            guard executable else { return }
            var info = stat()
            let mode = stat(path, &info) == 0 ? info.st_mode : 0
            guard mode & S_IXOTH != 0 || (info.st_uid == uid && mode & S_IXUSR != 0) || (info.st_gid == uid && mode & S_IXGRP != 0) else {
                throw VaultError("\(what) \(path) is not executable by the proxy's uid \(uid)")
            }
        }

        /// Makes `uid` resolvable for `User=`: nothing to do when a user database knows it;
        /// otherwise a user and a group record in `/run/userdb` (nss-systemd serves them).
        func ensureUserRecord() throws {
            if getpwuid(uid) != nil && getgrgid(uid) != nil { return }
            do {
                try UserRecords.write(Int(uid), name: "agentd-vault-proxy-\(uid)", home: "/", shell: "/usr/sbin/nologin")
            } catch let error as HandsError {
                throw VaultError("cannot make uid \(uid) known to systemd: \(error.message)")
            }
        }
    }
}

/// Runs `body` and waits for it on the calling thread (the supervisor's own thread, never a
/// thread of the concurrency pool).
func blockingAwait<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let result = Mutex<Result<T, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task {
        do {
            let value = try await body()
            result.withLock { $0 = .success(value) }
        } catch {
            result.withLock { $0 = .failure(error) }
        }
        done.signal()
    }
    done.wait()
    return try result.withLock { $0! }.get()
}

import Synchronization

extension ProxySupervisor {
    /// Starts the proxy the way agentd runs it: as the hardened unit `unit` when there is one,
    /// and as a supervised child when there is none or the unit does not start (a path its
    /// uid cannot reach, a manager that refuses). `make` builds a supervisor for a mode.
    /// - Returns: the running supervisor, or nil when neither mode started (each failure is
    ///   logged; proxy-mode sandboxes are then refused with an error saying so).
    public static func startPreferringUnit(
        _ unit: SystemdUnit?, make: (SystemdUnit?) -> ProxySupervisor, logger: Logger
    ) async -> ProxySupervisor? {
        let modes: [SystemdUnit?] = unit == nil ? [nil] : [unit, nil]
        for mode in modes {
            let candidate = make(mode)
            do {
                try await candidate.start()
                logger.info("vault-proxy started", metadata: ["mode": "\(mode.map { "unit \($0.name)" } ?? "child")"])
                return candidate
            } catch {
                await candidate.stopAndWait()
                logger.warning(
                    mode == nil
                        ? "no vault-proxy: sandboxes of network.mode: proxy policies will not be provisioned"
                        : "the vault-proxy unit did not start; trying a supervised child",
                    metadata: ["error": "\(error)"])
            }
        }
        return nil
    }
}

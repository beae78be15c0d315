import Glibc
import SystemdBus

/// The one long-lived service of a unit sandbox: the sandbox agent, started in the sandbox's
/// slice with the sandbox's isolation, serving commands and files on a unix socket.
///
/// Why one service and not a unit per command: a transient unit costs systemd a fork, a mount
/// namespace and a round of D-Bus jobs (≈ 50 ms); a command through the agent is a fork and
/// an exec inside a namespace that already exists. Every command and file action runs as a
/// child of the agent, so it has the service's isolation: `PrivateNetwork`, `PrivateTmp`,
/// `PrivateDevices`, `PrivateIPC`, `ProtectSystem=strict`, `ProtectHome=tmpfs`,
/// `ProtectProc=invisible` and `ProcSubset=pid` (no other user's processes, and nothing but
/// processes, in its `/proc`), `NoNewPrivileges`, `SystemCallFilter=@system-service`, the
/// sandbox's uid as `User=`/`Group=`, the workspace bind-mounted at `/workspace` as its only
/// writable path besides the socket directory, and optionally `RootDirectory=` an unpacked
/// image. The slice holds the limits (`MemoryMax`, `TasksMax`, `CPUQuota`) for the agent and
/// its commands together.
///
/// The agent executable is static and bind-mounted read-only at `agentPath`, so that it runs
/// in any image and the image cannot replace it. The sandbox's socket directory
/// (`AgentHands.hostDirectory`) is bind-mounted at `/run/agentd`; the agent listens on
/// `/run/agentd/agent.sock` there and agentd connects to the same socket through the host
/// path (`AgentHands`'s layout). The agent is not PID 1 here: it makes itself the subreaper of its commands, so that
/// orphans are reaped by it, and per-command timeouts are its own (`RuntimeMaxSec=` would end
/// the sandbox). `KillMode=control-group` takes every process with the service when it stops;
/// `OOMPolicy=continue` keeps the agent (and the sandbox) when the OOM killer takes a command.
enum UnitAgentService {
    /// Where the agent executable appears inside the sandbox (read-only): on the sandbox's own
    /// `/run` tmpfs, so that no mount point is made on the host's root (the sandbox's root
    /// when it has no image), unlike the container driver's `/.agentd/agent`.
    static let agentPath = "/run/agentd-agent"

    /// The service of sandbox slice `slice` (`…_<random>.slice` → `…_<random>.service`).
    static func name(ofSlice slice: String) -> String {
        String(slice.dropLast(".slice".count)) + ".service"
    }

    /// What the service of one sandbox is made of, on the host.
    struct Setup: Sendable {
        var slice: String
        var uid: Int
        /// The workspace's host path (mounted at `/workspace`).
        var workspace: String
        /// The socket directory's host path (mounted at `/run/agentd`).
        var socketDirectory: String
        /// The static agent executable on the host.
        var agent: String
        /// An unpacked image as the root, or nil for the host's root, read-only.
        var rootDirectory: String?
        var nofile: Int
        /// Names of the manager's own environment, removed from the service's.
        var unsetEnvironment: [String]
        /// Whether the agent bridges the vault-proxy's port (`SandboxSpec.egressProxy`).
        var proxy = false
    }

    /// The transient service's properties.
    static func properties(_ setup: Setup) -> [UnitProperty] {
        var properties: [UnitProperty] = [
            .string("Description", "agentd sandbox agent in \(setup.slice)"),
            .execStart([agentPath] + AgentHands.arguments(proxy: setup.proxy)),
            // The start job ends once the agent is exec'd; agentd then waits for it to answer.
            .string("Type", "exec"),
            .string("Slice", setup.slice),
            .string("User", String(setup.uid)),
            .string("Group", String(setup.uid)),
            .string("WorkingDirectory", UnitDriver.workspace),
            .bindPaths([(setup.workspace, UnitDriver.workspace), (setup.socketDirectory, AgentHands.sandboxDirectory)]),
            .bindPaths([(setup.agent, agentPath)], readOnly: true),
            .strings("ReadWritePaths", [UnitDriver.workspace]),
            .string("ProtectSystem", "strict"),
            .string("ProtectHome", "tmpfs"),
            .bool("PrivateNetwork", true),
            .bool("PrivateTmp", true),
            .bool("PrivateDevices", true),
            .bool("PrivateIPC", true),
            .string("ProtectProc", "invisible"),
            .string("ProcSubset", "pid"),
            // systemd gives a unit with its own root an empty, world-writable /run; the host's
            // /run holds sockets and user records. Either way: an empty, read-only one (the
            // agent's mounts lie on top of it).
            UnitProperty("TemporaryFileSystem", .array(elementSignature: "(ss)", [.structure([.string("/run"), .string("ro,mode=0755")])])),
            .bool("NoNewPrivileges", true),
            .systemCallFilter(["@system-service"]),
            UnitProperty("SystemCallErrorNumber", .int32(EPERM)),
            .string("KillMode", "control-group"),
            .string("OOMPolicy", "continue"),
            .duration("TimeoutStopUSec", .seconds(2)),
            // A failed agent leaves no unit behind once its state was read.
            .string("CollectMode", "inactive-or-failed"),
            .uint64("LimitNOFILE", UInt64(setup.nofile)),
            .strings("Environment", ["HOME=\(UnitDriver.workspace)", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
        ]
        if let root = setup.rootDirectory {
            properties += [.string("RootDirectory", root), .bool("MountAPIVFS", true)]
        }
        if !setup.unsetEnvironment.isEmpty { properties.append(.strings("UnsetEnvironment", setup.unsetEnvironment)) }
        return properties
    }
}

import Foundation
import Logging

/// The process's own resource limits, as a service with many connections needs them.
public enum ProcessLimits {
    /// Raises the soft limit on open files towards the hard one (at most 65536). Every
    /// connection is a descriptor, and the usual soft limit of 1024 is below the server's
    /// connection caps (`HTTPServer.Limits`: 256 on TCP, 1024 on the unix socket) plus what the
    /// journal and the engine client hold; a listener at its cap must not starve the others.
    /// Wraps `getrlimit`/`setrlimit(RLIMIT_NOFILE)`; a refusal is logged, not fatal.
    public static func raiseOpenFiles(logger: Logger) {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        let wanted = min(limit.rlim_max, 65536)
        guard limit.rlim_cur < wanted else { return }
        limit.rlim_cur = wanted
        if setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) != 0 {
            logger.warning("cannot raise the open-file limit", metadata: ["errno": "\(errno)", "soft": "\(limit.rlim_cur)"])
        }
    }
}

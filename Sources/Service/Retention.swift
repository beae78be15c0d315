import Logging
import Runtime
import ServiceLifecycle

/// Deletes sessions idle longer than `idle` (`agentd --retention`): once at start, then every
/// minute (or every tenth of `idle` when that is shorter), until shutdown.
public struct RetentionService: Service {
    let runtime: Runtime
    let idle: Duration
    let logger: Logger

    public init(runtime: Runtime, idle: Duration, logger: Logger) {
        self.runtime = runtime
        self.idle = idle
        self.logger = logger
    }

    public func run() async throws {
        let every = min(Duration.seconds(60), idle / 10)
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                let deleted = await runtime.deleteIdleSessions(idleLongerThan: idle)
                if !deleted.isEmpty { logger.info("retention deleted idle sessions", metadata: ["count": "\(deleted.count)"]) }
                try? await Task.sleep(for: every)
            }
        }
    }

    /// A retention period that a person writes: `30d`, `12h`, `90m`, `45s` (a positive whole
    /// number and one unit, at most 100 years).
    /// - Throws: `PeriodError` saying what it takes.
    public static func parsePeriod(_ text: String) throws -> Duration {
        let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86_400]
        guard let unit = text.last, let factor = units[unit], let n = Int64(text.dropLast()), n > 0, n <= 36_500 * 86_400 / factor else {
            throw PeriodError(description: "takes a positive whole number and a unit s, m, h or d (e.g. 30d), not '\(text)'")
        }
        return .seconds(n * factor)
    }

    public struct PeriodError: Error, CustomStringConvertible {
        public let description: String
    }
}

import AgentdAPI
import AgentdClient
import ArgumentParser
import Foundation

struct ImageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image", abstract: "Bring images into the container engine that agentd uses.", subcommands: [Import.self])

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Import a root filesystem tarball as an image that policies can name (hands.image).",
            discussion: """
                The tarball is streamed to agentd (it never needs to fit in memory), stored under agentd's state \
                directory and imported by the engine. Progress goes to stderr. Example:
                  tar -C rootfs -cf tools.tar . && agentctl image import tools.tar --name tools:1.0
                """)
        @OptionGroup var options: ClientOptions
        @Argument(help: "A tar archive of a root filesystem.") var tarball: String
        @Option(help: "Image name, REPOSITORY[:TAG] (tag default: latest).") var name: String

        func run() async throws {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: tarball, isDirectory: &isDirectory), !isDirectory.boolValue else {
                throw agentctlFailure("\(tarball): no such file (give the path of a .tar archive of a root filesystem)")
            }
            guard FileManager.default.isReadableFile(atPath: tarball) else { throw agentctlFailure("\(tarball): not readable by this user") }
            let progress = UploadProgress(label: (tarball as NSString).lastPathComponent)
            try await guarded {
                let image = try await options.client.importImage(file: tarball, name: name, progress: { progress.report($0, $1) })
                progress.finish()
                if options.json { return printJSON(image) }
                let id = image.id.replacingOccurrences(of: "sha256:", with: "").prefix(12)
                print("imported \(image.name) (id \(id), \(UploadProgress.human(image.size)))")
            }
        }
    }
}

/// Upload progress on stderr: in place on a terminal, a line per 10 % otherwise (logs).
final class UploadProgress: @unchecked Sendable {
    // Invariant: `report` is called from libcurl's one thread; `finish` after the upload.
    private let label: String
    private let terminal = isatty(STDERR_FILENO) == 1
    private var lastDecile = -1
    private var lastPercent = -1
    private var done = false

    init(label: String) { self.label = label }

    func report(_ sent: Int64, _ total: Int64) {
        guard total > 0, !done else { return }
        let percent = Int(sent * 100 / total)
        if terminal {
            guard percent != lastPercent else { return }
            lastPercent = percent
            FileHandle.standardError.write(Data("\r\u{1B}[Kuploading \(label): \(percent)% (\(Self.human(sent)) of \(Self.human(total)))".utf8))
        } else {
            guard percent / 10 != lastDecile else { return }
            lastDecile = percent / 10
            FileHandle.standardError.write(Data("uploading \(label): \(percent)% (\(Self.human(sent)) of \(Self.human(total)))\n".utf8))
        }
        if sent == total {
            done = true
            FileHandle.standardError.write(Data("\(terminal ? "\n" : "")uploaded; the engine is importing it\n".utf8))
        }
    }

    /// Ends an in-place line that did not reach 100 % (a refused upload).
    func finish() {
        if terminal && !done && lastPercent >= 0 { FileHandle.standardError.write(Data("\n".utf8)) }
    }

    static func human(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(bytes) B" : String(format: "%.1f %@", value, units[unit])
    }
}

struct PoolCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool", abstract: "Warm pools of started sandboxes (pool.size in a policy).", subcommands: [Status.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show each policy's warm pool; --wait follows the warm-up until every pool is full.",
            discussion: "With --wait, exits 1 with the reason when a pool cannot fill (its refill failed) or --timeout passes.")
        @OptionGroup var options: ClientOptions
        @Flag(help: "Wait until every pool holds its target, printing progress.") var wait = false
        @Option(help: "Seconds to wait at most with --wait.") var timeout: Double = 300

        func run() async throws {
            var failure: String?
            try await guarded {
                let client = options.client
                guard wait else {
                    let pools = try await client.pools()
                    if options.json { return printJSON(PoolList(pools: pools)) }
                    print("POLICY".padding(toLength: 20, withPad: " ", startingAt: 0) + "TARGET  READY  WARMING  LAST ERROR")
                    for p in pools {
                        let name = p.policy.padding(toLength: 20, withPad: " ", startingAt: 0)
                        let target = "\(p.target)".padding(toLength: 8, withPad: " ", startingAt: 0)
                        let ready = "\(p.ready)".padding(toLength: 7, withPad: " ", startingAt: 0)
                        let warming = (p.warming ? "yes" : "no").padding(toLength: 9, withPad: " ", startingAt: 0)
                        print(name + target + ready + warming + (p.lastError ?? "-"))
                    }
                    return
                }
                guard timeout.isFinite, timeout > 0, timeout <= 86400 else {
                    throw agentctlFailure("--timeout \(timeout) must be a number of seconds above 0 and at most 86400")
                }
                let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
                var shown: [String: Int] = [:]
                while true {
                    let pools = try await client.pools()
                    let active = pools.filter { $0.target > 0 }
                    var full = true
                    for p in active {
                        if shown[p.policy] != p.ready, !options.json {
                            print("pool \(p.policy): \(p.ready)/\(p.target) ready")
                            fflush(nil)
                            shown[p.policy] = p.ready
                        }
                        if p.ready < p.target {
                            full = false
                            if let error = p.lastError, !p.warming {
                                failure = "pool \(p.policy) cannot fill (\(p.ready)/\(p.target)): \(error)"
                            }
                        }
                    }
                    if failure != nil { return }
                    if full {
                        if options.json { printJSON(PoolList(pools: pools)) } else if active.isEmpty { print("no policy asks for a warm pool") } else { print("all pools full") }
                        return
                    }
                    if ContinuousClock.now >= deadline {
                        failure = "the pools were not full after \(timeout) s; `agentctl pool status` shows where they stand"
                        return
                    }
                    try await Task.sleep(for: .milliseconds(250))
                }
            }
            if let message = failure { throw agentctlFailure(message) }
        }
    }
}

struct SandboxesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandboxes", abstract: "List the sandboxes serving tasks now (warm ones: `agentctl pool status`).")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        try await guarded {
            let sandboxes = try await options.client.sandboxes()
            if options.json { return printJSON(SandboxList(sandboxes: sandboxes)) }
            if sandboxes.isEmpty { return print("no sandbox serves a task now") }
            print("SESSION".padding(toLength: 28, withPad: " ", startingAt: 0) + "TASK".padding(toLength: 16, withPad: " ", startingAt: 0)
                + "SANDBOX".padding(toLength: 16, withPad: " ", startingAt: 0) + "DRIVER     CALLS  IDLE")
            for s in sandboxes {
                print(
                    s.session.padding(toLength: 28, withPad: " ", startingAt: 0) + s.task.padding(toLength: 16, withPad: " ", startingAt: 0)
                        + String(s.id.prefix(12)).padding(toLength: 16, withPad: " ", startingAt: 0)
                        + s.driver.padding(toLength: 11, withPad: " ", startingAt: 0) + "\(s.inFlight)".padding(toLength: 7, withPad: " ", startingAt: 0)
                        + "\(Int(s.idleSeconds)) s")
            }
        }
    }
}

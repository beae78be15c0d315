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
                let reply = try await options.client.upload(
                    "/v1/images?name=\(name.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? name)", file: tarball,
                    contentType: "application/x-tar", progress: { progress.report($0, $1) })
                progress.finish()
                if options.json { return printJSONObject(reply.json) }
                let id = (reply["id"] as? String ?? "").replacingOccurrences(of: "sha256:", with: "").prefix(12)
                let size = (reply["size"] as? NSNumber)?.int64Value ?? 0
                print("imported \(reply["name"] ?? name) (id \(id), \(UploadProgress.human(size)))")
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
                    let reply = try await client.get("/v1/pools")
                    if options.json { return printJSONObject(reply.json) }
                    print("POLICY".padding(toLength: 20, withPad: " ", startingAt: 0) + "TARGET  READY  WARMING  LAST ERROR")
                    for p in pools(reply) {
                        let name = (p["policy"] as? String ?? "").padding(toLength: 20, withPad: " ", startingAt: 0)
                        let target = "\(p["target"] ?? 0)".padding(toLength: 8, withPad: " ", startingAt: 0)
                        let ready = "\(p["ready"] ?? 0)".padding(toLength: 7, withPad: " ", startingAt: 0)
                        let warming = ((p["warming"] as? Bool) == true ? "yes" : "no").padding(toLength: 9, withPad: " ", startingAt: 0)
                        print(name + target + ready + warming + (p["last_error"] as? String ?? "-"))
                    }
                    return
                }
                let deadline = ContinuousClock.now + .milliseconds(Int(timeout * 1000))
                var shown: [String: Int] = [:]
                while true {
                    let reply = try await client.get("/v1/pools")
                    let active = pools(reply).filter { (($0["target"] as? NSNumber)?.intValue ?? 0) > 0 }
                    var full = true
                    for p in active {
                        let name = p["policy"] as? String ?? "?"
                        let target = (p["target"] as? NSNumber)?.intValue ?? 0
                        let ready = (p["ready"] as? NSNumber)?.intValue ?? 0
                        if shown[name] != ready, !options.json {
                            print("pool \(name): \(ready)/\(target) ready")
                            fflush(nil)
                            shown[name] = ready
                        }
                        if ready < target {
                            full = false
                            if let error = p["last_error"] as? String, (p["warming"] as? Bool) != true {
                                failure = "pool \(name) cannot fill (\(ready)/\(target)): \(error)"
                            }
                        }
                    }
                    if failure != nil { return }
                    if full {
                        if options.json { printJSONObject(reply.json) } else if active.isEmpty { print("no policy asks for a warm pool") } else { print("all pools full") }
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

        private func pools(_ reply: AgentdClient.Reply) -> [[String: Any]] { (reply["pools"] as? [[String: Any]]) ?? [] }
    }
}

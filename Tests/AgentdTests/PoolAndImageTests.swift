import AgentdClient
import AgentdTestSupport
import EngineAPI
import Foundation
import Testing
import TestSupport

/// Long operations through agentctl, against a real agentd and Podman: a warm pool filling and
/// following policy edits, an image imported from a tarball with progress; and the global
/// options that every command takes.
@Suite("agentctl: pools, image import, global options")
struct PoolAndImageTests {
    @Test("pool status --wait shows the warm-up; a task takes a warm sandbox; a policy edit to size 0 empties the pool")
    func warmPool() async throws {
        let policies = try shippedPoliciesCopy { file, text in
            if file == "default.yaml" { text = text.replacingOccurrences(of: "pool:\n  size: 0", with: "pool:\n  size: 2") }
        }
        try await withAgentd(policies: policies) { agentd in
            let wait = try await runAgentctl(["pool", "status", "--wait", "--timeout", "120"], socket: agentd.socket)
            #expect(wait.status == 0, "stderr: \(wait.stderr)")
            #expect(wait.stdout.contains("pool default: 2/2 ready"), "\(wait.stdout)")
            #expect(wait.stdout.hasSuffix("all pools full\n"))
            let pooled = try await Components.engine().listContainers(labels: ["agentd.instance": agentd.instance, "agentd.pool": "warm"])
            #expect(pooled.count == 2)

            let table = try await runAgentctl(["pool", "status"], socket: agentd.socket)
            #expect(table.stdout.split(separator: "\n").contains { $0.hasPrefix("default ") && $0.split(separator: " ").prefix(3) == ["default", "2", "2"] }, "\(table.stdout)")

            // A task's first call takes a warm sandbox (journaled as such); the pool refills.
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", ["policy": "default"])["id"] as? String)
            let run = try await runAgentctl(["exec", id, "bash", #"{"command": "echo warm"}"#], socket: agentd.socket)
            #expect(run.stdout == "warm\n")
            let events = (try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]]) ?? []
            let provisioned = try #require(events.first { $0["type"] as? String == "hands.provisioned" })
            #expect((provisioned["payload"] as? [String: Any])?["from_pool"] as? Bool == true)
            #expect(await eventually { ((try? await c.get("/v1/pools")["pools"] as? [[String: Any]]) ?? []).contains { $0["policy"] as? String == "default" && ($0["ready"] as? NSNumber)?.intValue == 2 } })

            // The policy now asks for no pool: the warm sandboxes go; the task's (made warm, so
            // labelled so too) stays.
            var text = try String(contentsOfFile: policies + "/default.yaml", encoding: .utf8)
            text = text.replacingOccurrences(of: "pool:\n  size: 2", with: "pool:\n  size: 0")
            try text.write(toFile: policies + "/default.yaml", atomically: true, encoding: .utf8)
            let warm = { try await Components.engine().listContainers(labels: ["agentd.instance": agentd.instance, "agentd.pool": "warm"]) }
            #expect(await eventually { ((try? await warm()) ?? []).count == 1 })
            // The one left is the task's, renamed after its session when it was handed over.
            let left = try await warm()
            #expect(left.count == 1 && (left.first?.Names ?? []).contains { $0.contains("agentd-\(id)-main") }, "\(left.map { $0.Names ?? [] })")
            let after = try await runAgentctl(["--json", "pool", "status"], socket: agentd.socket)
            let pools = try #require((try JSONSerialization.jsonObject(with: Data(after.stdout.utf8)) as? [String: Any])?["pools"] as? [[String: Any]])
            let entry = try #require(pools.first { $0["policy"] as? String == "default" })
            #expect((entry["target"] as? NSNumber)?.intValue == 0 && (entry["ready"] as? NSNumber)?.intValue == 0)
        }
    }

    @Test("image import streams a tarball with progress into the engine; bad archives, names and paths are refused clearly")
    func imageImport() async throws {
        let env = try #require(Components.envDirectory, "AGENTD_ENV_DIR is not set; run make env")
        let tarball = env + "/agentd-base.tar"
        #expect(FileManager.default.fileExists(atPath: tarball), "make env keeps the base image's rootfs tarball at \(tarball)")
        let name = "agentd-test/imported:\(Components.testID().lowercased().filter { $0.isLetter || $0.isNumber })"
        try await withAgentd { agentd in
            let engine = try await Components.engine()
            defer { Task { _ = try? await engine.removeImage(name, force: true) } }
            let ok = try await runAgentctl(["image", "import", tarball, "--name", name], socket: agentd.socket)
            #expect(ok.status == 0, "stderr: \(ok.stderr)")
            #expect(ok.stdout.hasPrefix("imported \(name) (id "), "\(ok.stdout)")
            // Not a terminal: a progress line per 10 %, ending at 100 %, then the import.
            let lines = ok.stderr.split(separator: "\n")
            #expect(lines.filter { $0.hasPrefix("uploading agentd-base.tar: ") }.count >= 3, "\(ok.stderr)")
            #expect(lines.contains { $0.hasPrefix("uploading agentd-base.tar: 100% ") })
            #expect(lines.last == "uploaded; the engine is importing it")
            let image = try await engine.inspectImage(name)
            #expect((image.RepoTags ?? []).contains { $0.hasSuffix(name) })
            // Nothing of the upload is left under the state directory.
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: agentd.stateDir + "/uploads")) ?? ["?"]).isEmpty)

            // Random bytes: the engine's reason, exit 1.
            let junk = NSTemporaryDirectory() + "junk-\(Components.testID()).tar"
            _ = FileManager.default.createFile(atPath: junk, contents: Data((0..<200_000).map { _ in UInt8.random(in: 0...255) }))
            defer { try? FileManager.default.removeItem(atPath: junk) }
            let bad = try await runAgentctl(["image", "import", junk, "--name", "agentd-test/junk"], socket: agentd.socket)
            #expect(bad.status == 1)
            #expect(bad.stderr.contains("agentctl: the container engine refused the archive: "), "\(bad.stderr)")
            #expect(bad.stdout.isEmpty)
            #expect(!(try await engine.imageExists("agentd-test/junk")))

            // A name the engine would refuse: refused before the upload, saying what is allowed.
            let badName = try await runAgentctl(["image", "import", tarball, "--name", "Not A/Name"], socket: agentd.socket)
            #expect(badName.status == 1)
            #expect(badName.stderr.contains("image name 'Not A/Name' is not valid"), "\(badName.stderr)")
            #expect(badName.stderr.contains("lowercase letters, digits"))
            #expect(!badName.stderr.contains("100%"))

            let missing = try await runAgentctl(["image", "import", "/nonexistent/rootfs.tar", "--name", "x"], socket: agentd.socket)
            #expect(missing.status == 1)
            #expect(missing.stderr == "agentctl: /nonexistent/rootfs.tar: no such file (give the path of a .tar archive of a root filesystem)\n")
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: agentd.stateDir + "/uploads")) ?? ["?"]).isEmpty)
        }
    }

    @Test("an upload the disk has no room for is refused before its body is read (507, saying how much is free); agentd goes on")
    func uploadWithoutRoom() async throws {
        let env = try #require(Components.envDirectory, "AGENTD_ENV_DIR is not set; run make env")
        let agentd = try AgentdProcess()
        // The state directory on a 200 MiB file system: less than an upload plus the 256 MiB
        // agentd keeps free for the journal.
        try FileManager.default.createDirectory(atPath: agentd.stateDir, withIntermediateDirectories: true)
        let mount = try await runProgram("/bin/mount", ["-t", "tmpfs", "-o", "size=200m", "tmpfs", agentd.stateDir])
        try #require(mount.status == 0, "cannot mount a tmpfs for the test (run as root): \(mount.stderr)")
        defer { _ = try? runProgramSync("/bin/umount", ["-l", agentd.stateDir]) }
        try await agentd.start()
        defer { agentd.stop() }
        let refused = try await runAgentctl(["image", "import", env + "/agentd-base.tar", "--name", "agentd-test/noroom"], socket: agentd.socket)
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("not enough room to store a"), "\(refused.stderr)")
        #expect(refused.stderr.contains("kept for the journal"))
        #expect(!refused.stderr.contains("uploading agentd-base.tar: 100%"), "refused before the body was sent: \(refused.stderr)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: agentd.stateDir + "/uploads")) ?? ["?"]).isEmpty)
        #expect(!(try await Components.engine().imageExists("agentd-test/noroom")))
        // agentd is fine: a session and an event.
        let id = try #require(try await agentd.client.post("/v1/sessions", [:])["id"] as? String)
        #expect(try await agentd.client.get("/v1/sessions/\(id)")["last_seq"] as? NSNumber == 1)
    }

    @Test("a client that sends the body without waiting for 100 Continue still reads the refusal")
    func refusalWithoutExpect() async throws {
        let body = NSTemporaryDirectory() + "body-\(Components.testID()).tar"
        _ = FileManager.default.createFile(atPath: body, contents: Data(count: 16 << 20))
        defer { try? FileManager.default.removeItem(atPath: body) }
        try await withAgentd { agentd in
            for _ in 0..<5 {
                // curl asks for `100 Continue` but stops waiting after 1 ms and sends the 16 MiB,
                // as a client under load would after its usual 1 s: the server answers at the head.
                let run = try await runProgram(
                    "/usr/bin/curl",
                    ["-sS", "--unix-socket", agentd.socket, "--expect100-timeout", "0.001", "-H", "Content-Type: application/x-tar",
                     "--upload-file", body, "-X", "POST", "-w", "\n%{http_code}", "http://agentd/v1/images?name=Not%20A%20Name"])
                #expect(run.status == 0, "curl: \(run.stderr)")
                #expect(run.stdout.hasSuffix("\n400"), "\(run.stdout.suffix(300))")
                #expect(run.stdout.contains("image name 'Not A Name' is not valid"))
            }
            #expect(try await agentd.client.get("/v1/health")["status"] as? String == "ok")
        }
    }

    @Test("--socket and --json work before the command, as in `agentctl --socket S --json session create`")
    func globalOptionsFirst() async throws {
        try await withAgentd { agentd in
            let created = try await runAgentctl(["--socket", agentd.socket, "--json", "session", "create"])
            #expect(created.status == 0, "stderr: \(created.stderr)")
            let object = try #require(try JSONSerialization.jsonObject(with: Data(created.stdout.utf8)) as? [String: Any])
            let id = try #require(object["id"] as? String)
            // The same after the command; and `--` still ends the options.
            let shown = try await runAgentctl(["session", "show", id, "--socket=\(agentd.socket)"])
            #expect(shown.stdout.hasPrefix("session     \(id)\n"))
            let listed = try await runAgentctl(["--socket=\(agentd.socket)", "session", "list"])
            #expect(listed.stdout.contains(id))
            // A wrong socket: a clear error saying what to do, exit 1.
            let unreachable = try await runAgentctl(["--socket", "/nonexistent/agentd.sock", "health"])
            #expect(unreachable.status == 1)
            #expect(unreachable.stderr.contains("cannot reach agentd") && unreachable.stderr.contains("--socket"))
        }
    }
}

import EngineAPI
import Foundation
import Glibc
import Hands
import Testing
import TestSupport

/// No sandbox reaches another, nor the host's processes: each runs as a uid of its own, a unit
/// sees only its own processes, a container has its own PID namespace; file tools act as the
/// sandbox's user; a workspace is a filesystem of its own size.
@Suite("Sandboxes are isolated from each other")
struct IsolationTests {
    @Test(
        "a sandbox cannot see, read, write or signal another session's sandbox, nor see host command lines",
        arguments: DriverKind.allCases, DriverKind.allCases)
    func pairCannotReach(attacker: DriverKind, victim: DriverKind) async throws {
        // A process on the host whose command line carries a marker.
        let marker = "4242.\(UInt32.random(in: 100_000...999_999))"
        let hostProcess = try ChildProcess.spawn(["/bin/sleep", marker], environment: [:])
        defer {
            hostProcess.signal(SIGKILL)
            hostProcess.wait()
        }
        try await DriverFixture.with(attacker) { a in
            try await DriverFixture.with(victim) { b in
                let keyA = TaskKey(session: "attacker", task: "t")
                let keyB = TaskKey(session: "victim", task: "t")
                let spec = SandboxSpec()
                let planted = await b.manager.execute(keyB, spec: spec, tool: "bash", input: Input.bash("echo secret-of-b > /workspace/secret; id -u"))
                #expect(planted.exitCode == 0, "\(planted.output)")
                // The victim runs a long command beside its agent.
                let long = Task { await b.manager.execute(keyB, spec: spec, tool: "bash", input: Input.bash("exec sleep 120")) }
                defer { long.cancel() }
                let sandboxB = try #require(await b.manager.sandbox(of: keyB))
                let uidB = try #require(sandboxB.uid)
                let victimPIDs = try await Self.waitForProcesses(uid: uidB, count: 2)

                let provisioned = await a.manager.execute(keyA, spec: spec, tool: "bash", input: Input.bash("id -u"))
                let uidA = try #require(await a.manager.sandbox(of: keyA)?.uid)
                #expect(provisioned.output == "\(uidA)\n")
                #expect(uidA != uidB && uidA != 65534 && uidB != 65534)
                #expect(planted.output == "\(uidB)\n")

                let pids = victimPIDs.map(String.init).joined(separator: " ")
                let hostPath = b.workspaces.hostPath(try #require(sandboxB.workspace))
                let attack = """
                    for p in \(pids); do
                      [ -e /proc/$p ] && echo "VIS""IBLE $p"
                      cat /proc/$p/root/workspace/secret 2>/dev/null
                      echo overwritten 2>/dev/null > /proc/$p/root/workspace/secret && echo "WR""OTE $p"
                      kill -9 $p 2>/dev/null && echo "KIL""LED $p"
                    done
                    cat /proc/*/root/workspace/secret \(hostPath)/secret 2>/dev/null
                    cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '
                    echo "DO""NE"
                    """
                let result = await a.manager.execute(keyA, spec: spec, tool: "bash", input: Input.bash(attack))
                #expect(result.output.contains("DONE"), "\(result.output)")
                #expect(!result.output.contains("VISIBLE"), "\(result.output)")
                #expect(!result.output.contains("secret-of-b"), "\(result.output)")
                #expect(!result.output.contains("WROTE"), "\(result.output)")
                #expect(!result.output.contains("KILLED"), "\(result.output)")
                #expect(!result.output.contains(marker), "the host's command lines are visible: \(result.output)")
                #expect(!result.output.contains("sleep 120"), "the victim's command line is visible: \(result.output)")

                // Signal every process the attacker's user may signal (its own sandbox may go too).
                _ = await a.manager.execute(keyA, spec: spec, tool: "bash", input: Input.bash("kill -9 -1"))

                // The victim is untouched: its processes live, its file is its own.
                for pid in victimPIDs { #expect(kill(pid, 0) == 0, "victim process \(pid) is gone") }
                let kept = try await b.driver.readFile("secret", in: sandboxB)
                #expect(kept == Array("secret-of-b\n".utf8))
                await b.manager.endTask(keyB)
                let ended = await long.value
                #expect(ended.isError)
            }
        }
    }

    @Test("write_file and read_file act as the sandbox's user: no /run, /dev or /dev/null, no host file through a symlink", arguments: DriverKind.allCases)
    func filesAsTheSandboxUser(kind: DriverKind) async throws {
        let hostFile = "/var/tmp/agentd-symlink-target-\(Components.testID())"
        try "host-secret\n".write(toFile: hostFile, atomically: false, encoding: .utf8)
        defer { unlink(hostFile) }
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "files", task: "t")
            let spec = SandboxSpec()
            func write(_ path: String, _ content: String = "evil") async -> ToolResult {
                await f.manager.execute(key, spec: spec, tool: "write_file", input: Input.json(["path": path, "content": content]))
            }
            let ok = await write("dir/a.txt", "hello")
            #expect(ok == ToolResult(output: "wrote 5 bytes to dir/a.txt", isError: false))
            let uid = try #require(await f.manager.sandbox(of: key)?.uid)
            let owner = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("stat -c %u dir/a.txt; ls -A /workspace"))
            #expect(owner.output == "\(uid)\ndir\n", "the file belongs to the sandbox's user and nothing staged is left")

            for path in ["/run/evil", "/dev/evil"] {
                let refused = await write(path)
                #expect(refused.isError, "\(path): \(refused.output)")
                #expect(refused.output.contains("cannot write \(path)"), "\(refused.output)")
            }
            // Anyone may write into /dev/null; nobody but root may replace it.
            _ = await write("/dev/null")
            let devices = await f.manager.execute(
                key, spec: spec, tool: "bash", input: Input.bash("ls /run/evil /dev/evil 2>/dev/null; [ -c /dev/null ] && echo null-is-a-device"))
            #expect(devices.output == "null-is-a-device\n")

            // A symlink planted in the workspace resolves inside the sandbox, never on the host.
            _ = await f.manager.execute(key, spec: spec, tool: "bash", input: Input.bash("ln -s \(hostFile) link; ln -s /etc/../\(hostFile) link2"))
            let read = await f.manager.execute(key, spec: spec, tool: "read_file", input: Input.json(["path": "link"]))
            #expect(read.isError && !read.output.contains("host-secret"), "\(read.output)")
            _ = await write("link2", "overwritten")
            #expect(try String(contentsOfFile: hostFile, encoding: .utf8) == "host-secret\n")
        }
    }

    @Test("writing past hands.disk fails with ENOSPC inside the sandbox; the host's disk is untouched", arguments: DriverKind.allCases)
    func diskLimit(kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            let key = TaskKey(session: "disk", task: "t")
            var spec = SandboxSpec()
            spec.diskBytes = 32 << 20
            let fill = await f.manager.execute(
                key, spec: spec, tool: "bash", input: Input.bash("dd if=/dev/zero of=/workspace/big bs=1M count=64 2>&1; df -k /workspace | tail -1"))
            #expect(fill.output.contains("No space left on device"), "\(fill.output)")
            let name = try #require(await f.manager.sandbox(of: key)?.workspace)
            // The image on the host holds at most its size.
            var st = stat()
            #expect(stat(f.workspaces.directory + "/images/" + name + ".img", &st) == 0)
            #expect(Int(st.st_blocks) * 512 <= 33 << 20, "the image takes \(Int(st.st_blocks) * 512) bytes")
            let write = await f.manager.execute(
                key, spec: spec, tool: "write_file",
                input: Input.json(["path": "more.bin", "content": Data(count: 8 << 20).base64EncodedString(), "encoding": "base64"]))
            #expect(write.isError, "\(write.output)")
            #expect(write.output.contains("full") || write.output.contains("No space left"), "\(write.output)")
            // The task's workspace goes with its sandbox, and its uid back to the range.
            #expect(f.workspaces.uids.uid(of: name) != nil)
            await f.manager.endTask(key)
            #expect(f.workspaces.uids.uid(of: name) == nil)
            #expect(f.workspaces.imageNames() == [])
            #expect(TestWorkspaces.mounted(f.workspaces.directory) == [])
        }
    }

    @Test("a workspace that would cross the journal's free-space reserve is refused, and nothing is left behind", arguments: DriverKind.allCases)
    func reserveRefusesProvisioning(kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            var spec = SandboxSpec()
            spec.diskBytes = 1 << 50  // more than any test host's disk
            let result = await f.manager.execute(TaskKey(session: "reserve", task: "t"), spec: spec, tool: "bash", input: Input.bash("true"))
            #expect(result.isError)
            #expect(result.output.contains("refusing to make a"), "\(result.output)")
            #expect(result.output.contains("kept for the journal"), "\(result.output)")
            #expect(await f.count(session: "reserve") == 0)
            #expect(f.workspaces.imageNames() == [])
            #expect(f.workspaces.uids.uid(of: WorkspaceImages.taskName("x")) == nil)
        }
    }

    @Test("a session's workspace is kept across its tasks, given to each task's uid, and removed with the session's data", arguments: DriverKind.allCases)
    func sessionWorkspace(kind: DriverKind) async throws {
        try await DriverFixture.with(kind) { f in
            var spec = SandboxSpec()
            spec.workspace = .session
            let first = TaskKey(session: "keep", task: "one")
            _ = await f.manager.execute(first, spec: spec, tool: "write_file", input: Input.json(["path": "kept.txt", "content": "still here"]))
            await f.manager.endTask(first)
            #expect(TestWorkspaces.mounted(f.workspaces.directory) == [], "unmounted between tasks")
            let second = TaskKey(session: "keep", task: "two")
            let read = await f.manager.execute(second, spec: spec, tool: "bash", input: Input.bash("cat kept.txt && echo more >> kept.txt && echo appended"))
            #expect(read.output == "still hereappended\n", "\(read.output)")
            try await f.manager.removeSessionData(session: "keep")
            #expect(f.workspaces.imageNames() == [])
            #expect(TestWorkspaces.mounted(f.workspaces.directory) == [])
        }
    }

    /// Host pids of the processes running as `uid`, once there are `count` of them.
    static func waitForProcesses(uid: Int, count: Int) async throws -> [pid_t] {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            let found = processes(uid: uid)
            if found.count >= count { return found }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw FixtureMissing("no \(count) processes of uid \(uid) appeared within 30 s")
    }

    static func processes(uid: Int) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry),
                let status = try? String(contentsOfFile: "/proc/\(entry)/status", encoding: .utf8),
                let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Uid:") })
            else { return nil }
            let fields = line.split(whereSeparator: { $0 == "\t" || $0 == " " })
            return fields.count > 1 && Int(fields[1]) == uid ? pid : nil
        }
    }
}

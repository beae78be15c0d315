import EngineAPI
import Foundation
import Hands
import SystemdBus
import Testing
import TestSupport

/// The Hands drivers the conformance suite runs against.
enum DriverKind: String, Sendable, CaseIterable, CustomTestStringConvertible {
    case container, unit
    var testDescription: String { rawValue }
}

/// A `HandsManager` over a real driver of one kind, with a fresh instance id, torn down
/// (manager shut down, every sandbox of the instance removed, state directory deleted)
/// whatever the test does.
struct DriverFixture {
    let kind: DriverKind
    let manager: HandsManager
    let driver: any HandsDriver
    let instance: String
    let systemd: SystemdManager?
    let stateDirectory: String
    /// The driver's workspaces (and through them its uids).
    let workspaces: WorkspaceImages

    static func with<T>(_ kind: DriverKind, _ body: (DriverFixture) async throws -> T) async throws -> T {
        let fixture = try await make(kind)
        do {
            let result = try await body(fixture)
            await fixture.tearDown()
            return result
        } catch {
            await fixture.tearDown()
            throw error
        }
    }

    static func make(_ kind: DriverKind, instance given: String? = nil) async throws -> DriverFixture {
        let instance = given ?? "t" + Components.testID()
        switch kind {
        case .container:
            let engine = try await Components.engine()
            let state = "/tmp/agentd-container-test-\(instance)"
            let driver = ContainerDriver(
                engine: engine, instance: instance, workspaces: try WorkspaceImages(directory: state + "/workspaces"),
                agent: try AgentHands(directory: state + "/agents"))
            return DriverFixture(
                kind: kind, manager: HandsManager(driver: driver, instance: instance), driver: driver, instance: instance, systemd: nil,
                stateDirectory: state, workspaces: driver.workspaces)
        case .unit:
            let systemd = try await Components.systemd()
            let state = "/tmp/agentd-unit-test-\(instance)"
            let driver = try UnitDriver(manager: systemd, instance: instance, stateDirectory: state, rootDirectory: try UnitRootfs.path())
            return DriverFixture(
                kind: kind, manager: HandsManager(driver: driver, instance: instance), driver: driver, instance: instance, systemd: systemd,
                stateDirectory: state, workspaces: driver.workspaces)
        }
    }

    func tearDown() async {
        await manager.shutdown()
        for (id, _) in (try? await driver.list(instance: instance)) ?? [] { try? await driver.destroy(id: id) }
        TestWorkspaces.remove(stateDirectory + "/workspaces")
        try? FileManager.default.removeItem(atPath: stateDirectory)
        // The per-session slices systemd made implicitly go with the instance's slice.
        _ = try? await systemd?.stopUnitAndWait("agentd-\(instance).slice")
        systemd?.close()
    }

    /// Checks that the agent socket directory of `key`'s sandbox is sealed (root's, 0755, only
    /// the socket in it) while its agent answers, and that both go when the task ends.
    func expectAgentDirectorySealedUntilTheEnd(_ key: TaskKey, agent: AgentHands) async throws {
        let sandbox = try #require(await manager.sandbox(of: key))
        let directory = agent.hostDirectory(try #require(sandbox.agent))
        var st = stat()
        #expect(stat(directory, &st) == 0 && st.st_uid == 0 && st.st_mode & 0o7777 == 0o755)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == [AgentHands.socketName])
        #expect(await agent.answers(sandbox))
        #expect(await manager.endTask(key))
        #expect(!FileManager.default.fileExists(atPath: directory))
        #expect(await !agent.answers(sandbox))
    }

    /// How many sandboxes of `session` the driver lists (-1 when it cannot list).
    func count(session: String) async -> Int {
        guard let all = try? await driver.list(instance: instance) else { return -1 }
        return all.filter { $0.labels[SandboxLabel.session] == session }.count
    }
}

/// The base image's root filesystem, unpacked once from the tarball `make env` keeps
/// (`$AGENTD_ENV_DIR/agentd-base.tar`), for the unit driver's `RootDirectory=`: the same
/// userland as the container driver's image.
enum UnitRootfs {
    static func path() throws -> String {
        guard let env = Components.envDirectory else {
            throw FixtureMissing("AGENTD_ENV_DIR is not set; run `eval \"$(scripts/env-up)\"` (make env)")
        }
        let target = env + "/unit-rootfs"
        if FileManager.default.fileExists(atPath: target + "/bin/sh") { return target }
        let tarball = env + "/agentd-base.tar"
        guard FileManager.default.fileExists(atPath: tarball) else {
            throw FixtureMissing("\(tarball) is missing; scripts/env-up builds it with the base image")
        }
        let staging = target + ".tmp-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        let tar = try ChildProcess.spawn(["/bin/tar", "-C", staging, "-xf", tarball], environment: [:])
        let status = tar.wait()
        guard status == 0 else { throw FixtureMissing("tar -xf \(tarball) failed with status \(status)") }
        // Tests run in parallel: the first rename wins, the others drop their copy.
        if rename(staging, target) != 0 { try? FileManager.default.removeItem(atPath: staging) }
        // The sandbox user must traverse the root (the tarball's `.` is 0700).
        chmod(target, 0o755)
        return target
    }
}

/// JSON inputs for tool calls.
enum Input {
    static func bash(_ command: String, timeout: Int? = nil) -> [UInt8] {
        var object: [String: Any] = ["command": command]
        if let timeout { object["timeout_s"] = timeout }
        return json(object)
    }

    static func json(_ object: [String: Any]) -> [UInt8] { Array(try! JSONSerialization.data(withJSONObject: object)) }
}

/// A component a test needs is missing: a failure saying what to run, never a skip.
struct FixtureMissing: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Workspace stores of tests: made in a directory of their own, and removed with whatever a
/// failed test left mounted in them.
enum TestWorkspaces {
    static func make(_ instance: String) throws -> (workspaces: WorkspaceImages, directory: String) {
        let directory = "/tmp/agentd-workspaces-test-\(instance)"
        return (try WorkspaceImages(directory: directory), directory)
    }

    /// The sandbox agent (the one built next to the test bundle) with its sockets under `directory`.
    static func agent(_ directory: String) throws -> AgentHands { try AgentHands(directory: directory + "/agents") }

    /// Unmounts (lazily) what is still mounted under `directory` and removes it.
    static func remove(_ directory: String) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory + "/mnt")) ?? [] {
            (try? ChildProcess.spawn(["/bin/umount", "-l", directory + "/mnt/" + name], environment: [:]))?.wait()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Mount points under `directory` that are still mounted (what a leak looks like).
    static func mounted(_ directory: String) -> [String] {
        // Read to its end: /proc files report a size of 0.
        let table = String(decoding: FileHandle(forReadingAtPath: "/proc/self/mountinfo")?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
        return table.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4, fields[4].hasPrefix(directory + "/") else { return nil }
            return String(fields[4])
        }
    }
}

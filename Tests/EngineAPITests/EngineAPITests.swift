import Crypto
import EngineAPI
import Foundation
import Testing
import TestSupport

/// Integration tests against the real engine `make env` started (Podman's Docker API).
@Suite("Engine API against the real engine")
struct EngineAPITests {
    @Test("the engine answers ping and version")
    func pingAndVersion() async throws {
        let engine = try await Components.engine()
        #expect(try await engine.ping() == "OK")
        let version = try await engine.version()
        #expect(!version.Version.isEmpty)
    }

    @Test("exec returns stdout, stderr and the exit code apart and exactly")
    func execStreamsApart() async throws {
        let engine = try await Components.engine()
        try await ContainerFixture.with(engine) { container in
            let result = try await engine.exec(container, command: ["sh", "-c", "printf 'to out'; printf 'to err' >&2; exit 7"])
            #expect(String(decoding: result.stdout, as: UTF8.self) == "to out")
            #expect(String(decoding: result.stderr, as: UTF8.self) == "to err")
            #expect(result.exitCode == 7)

            let binary = try await engine.exec(container, command: ["printf", #"\000\001\377\r\n"#])
            #expect(binary.stdout == [0, 1, 255, 13, 10])
            #expect(binary.stderr.isEmpty)
            #expect(binary.exitCode == 0)
        }
    }

    @Test("output larger than 64 KiB, binary and interleaved, arrives byte-exact")
    func largeBinaryOutput() async throws {
        let engine = try await Components.engine()
        try await ContainerFixture.with(engine) { container in
            let size = 300_000
            let script = "head -c \(size) /dev/urandom > /tmp/blob && cat /tmp/blob && cat /tmp/blob >&2 && sha256sum /tmp/blob >&2"
            let result = try await engine.exec(container, command: ["sh", "-c", script])
            #expect(result.exitCode == 0)
            #expect(result.stdout.count == size)
            let digest = SHA256.hash(data: result.stdout).map { String(format: "%02x", $0) }.joined()
            // stderr carries the same bytes followed by the container's own checksum of them.
            #expect(Array(result.stderr.prefix(size)) == result.stdout)
            let reported = String(decoding: result.stderr.dropFirst(size), as: UTF8.self)
            #expect(reported.hasPrefix(digest))
        }
    }

    @Test("a test's container is gone afterwards, also when the test fails half-way")
    func containerRemovedOnFailure() async throws {
        let engine = try await Components.engine()
        struct HalfWay: Error {}
        let id = Components.testID()
        var created: String?
        await #expect(throws: HalfWay.self) {
            try await ContainerFixture.with(engine, id: id) { container in
                created = container
                #expect(try await engine.listContainers(labels: [ContainerFixture.labelKey: id]).count == 1)
                throw HalfWay()
            }
        }
        #expect(created != nil)
        #expect(try await engine.listContainers(labels: [ContainerFixture.labelKey: id]).isEmpty)
        #expect(try await engine.removeContainer(created!) == false)
    }

    @Test("a missing engine socket names the socket and says to run make env")
    func missingSocket() async throws {
        let path = "/tmp/agentd-no-engine-\(Components.testID()).sock"
        let engine = EngineClient(endpoint: .unixSocket(path: path))
        let error = await #expect(throws: EngineError.self) { try await engine.ping() }
        #expect(error?.code == .unreachable)
        #expect(error?.message.contains(path) == true)
        #expect(error?.message.contains("make env") == true)
    }

    @Test("an unknown image: the engine's own message reaches the caller")
    func unknownImage() async throws {
        let engine = try await Components.engine()
        let image = "agentd-no-such-image-\(Components.testID()):latest"
        let error = await #expect(throws: EngineError.self) {
            _ = try await engine.createContainer(ContainerSpec(image: image, command: ["true"]))
        }
        #expect(error?.code == .http)
        #expect(error?.status == 404 || error?.status == 500)
        let engineMessage = try #require(error?.engineMessage)
        #expect(engineMessage.contains(image) || engineMessage.localizedCaseInsensitiveContains("no such image"))
        #expect(error?.message.contains(engineMessage) == true)
    }

    @Test("a rootfs tarball imports as an image that runs")
    func importImage() async throws {
        let engine = try await Components.engine()
        let envDirectory = try #require(Components.envDirectory, "AGENTD_ENV_DIR is set by make env")
        let tarball = envDirectory + "/agentd-base.tar"
        let repository = "agentd-import-test-\(Components.testID())"
        try await engine.importImage(tarball: tarball, repository: repository, tag: "v1")
        defer { Task { _ = try? await engine.removeImage("\(repository):v1", force: true) } }
        #expect(try await engine.imageExists("\(repository):v1"))
        try await ContainerFixture.with(engine, image: "\(repository):v1") { container in
            let result = try await engine.exec(container, command: ["echo", "imported"])
            #expect(String(decoding: result.stdout, as: UTF8.self) == "imported\n")
        }
        #expect(try await engine.removeImage("\(repository):v1", force: true))
        #expect(try await engine.imageExists("\(repository):v1") == false)
    }

    @Test("a cancelled exec returns promptly instead of waiting for the command")
    func cancellation() async throws {
        let engine = try await Components.engine()
        try await ContainerFixture.with(engine) { container in
            let started = ContinuousClock.now
            let task = Task { try await engine.exec(container, command: ["sleep", "30"]) }
            try await Task.sleep(for: .milliseconds(500))
            task.cancel()
            let result = await task.result
            #expect(throws: EngineError.self) { try result.get() }
            #expect(ContinuousClock.now - started < .seconds(10))
        }
    }

    @Test("image inspect, and the engine's events of a labelled container's life")
    func inspectAndEvents() async throws {
        let engine = try await Components.engine()
        let image = try await engine.inspectImage(Components.baseImage)
        #expect(!image.Id.isEmpty)
        let missing = await #expect(throws: EngineError.self) { _ = try await engine.inspectImage("agentd-none-\(Components.testID())") }
        #expect(missing?.isNotFound == true)
        let id = Components.testID()
        let since = Int(Date().timeIntervalSince1970) - 1
        try await ContainerFixture.with(engine, id: id) { container in
            _ = try await engine.exec(container, command: ["true"])
        }
        // At least a second ahead: Podman answers nothing for a window that has already ended
        // (with `+ 1` the call sometimes began after it, and a quarter of the runs saw no event).
        let until = Int(Date().timeIntervalSince1970) + 2
        let events = try await engine.events(since: since, until: until, labels: [ContainerFixture.labelKey: id], types: ["container"])
        let actions = events.compactMap(\.Action)
        #expect(actions.contains("create"), "\(actions)")
        #expect(actions.contains("start"), "\(actions)")
        #expect(actions.contains("remove") || actions.contains("die"), "\(actions)")
    }

    @Test("the multiplexed stream splits at frame boundaries, and a cut frame is reported")
    func demultiplexer() {
        let frames: [UInt8] = [1, 0, 0, 0, 0, 0, 0, 2, 65, 66, 2, 0, 0, 0, 0, 0, 0, 1, 67, 1, 0, 0, 0, 0, 0, 0, 5, 68]
        let split = StreamDemultiplexer.split(frames)
        #expect(split.stdout == [65, 66, 68])
        #expect(split.stderr == [67])
        #expect(split.incomplete)
    }
}

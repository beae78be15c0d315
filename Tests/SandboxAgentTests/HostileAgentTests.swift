import Foundation
import Synchronization
import SandboxAgentClient
import Testing
import TestSupport

/// A fake agent speaking raw bytes: the client must fail with the right error, in time, without
/// allocating what the agent claims.
@Suite struct HostileAgentTests {
    func expectFailure(
        _ script: [UInt8], kind: SandboxAgentError.Kind, containing text: String, timeout: Duration = .seconds(3),
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        let fake = try FakeAgent(script: script)
        defer { fake.stop() }
        let client = SandboxAgentClient(socketPath: fake.socket)
        let started = ContinuousClock.now
        do {
            _ = try await client.health(timeout: timeout)
            Issue.record("health succeeded against a hostile agent", sourceLocation: sourceLocation)
        } catch let error as SandboxAgentError {
            #expect(error.kind == kind, "\(error)", sourceLocation: sourceLocation)
            #expect(error.message.contains(text), "\(error)", sourceLocation: sourceLocation)
        }
        #expect(ContinuousClock.now - started < timeout + .seconds(2), sourceLocation: sourceLocation)
    }

    @Test func anOversizedFrameIsRefusedFromItsHeader() async throws {
        try await expectFailure(FakeAgent.hello + [0xff, 0xff, 0xff, 0xf0, 0x61], kind: .protocolViolation, containing: "over the limit")
    }

    @Test func garbageIsAProtocolViolation() async throws {
        try await expectFailure(Array("HTTP/1.1 200 OK\r\n\r\n".utf8), kind: .protocolViolation, containing: "broke the protocol")
        try await expectFailure(FakeAgent.hello + [0, 0, 0, 2, 0x61, 1, 2], kind: .protocolViolation, containing: "truncated health frame")
    }

    @Test func aWrongVersionIsNamed() async throws {
        let hello = AgentMessage.hello(AgentHello(version: 99, software: "future-agent")).frame()
        try await expectFailure(hello, kind: .protocolViolation, containing: "speaks version 99, this side speaks version 1")
    }

    @Test func anUnexpectedAnswerIsAProtocolViolation() async throws {
        try await expectFailure(FakeAgent.hello + AgentMessage.listEnd.frame(), kind: .protocolViolation, containing: "unexpected listEnd frame in answer to healthRequest")
    }

    @Test func anAgentThatNeverAnswersTimesOut() async throws {
        try await expectFailure([], kind: .timeout, containing: "did not answer within 1.0 seconds", timeout: .seconds(1))
        // Half an answer, then silence.
        try await expectFailure(FakeAgent.hello + [0, 0, 0, 100, 0x61], kind: .timeout, containing: "did not answer", timeout: .seconds(1))
    }

    @Test func anAgentThatHangsUpEarlyIsNamed() async throws {
        let fake = try FakeAgent(script: FakeAgent.hello, hold: false)
        defer { fake.stop() }
        await #expect(throws: SandboxAgentError.self) {
            try await SandboxAgentClient(socketPath: fake.socket).health()
        }
    }

    @Test func aMissingSocketIsUnreachable() async throws {
        let client = SandboxAgentClient(socketPath: "/tmp/agentd-no-such-dir-\(Components.testID())/agent.sock")
        await #expect(throws: SandboxAgentError.self) { try await client.health() }
        do {
            _ = try await client.health()
        } catch let error as SandboxAgentError {
            #expect(error.kind == .unreachable)
            #expect(error.message.contains("is unreachable: no socket there"))
        }
    }
}

/// A counter shared with a callback.
final class Locked: @unchecked Sendable {
    private let lock = NSLock()
    private var count: Int
    init(_ count: Int) { self.count = count }
    func add(_ n: Int) { lock.withLock { count += n } }
    var value: Int { lock.withLock { count } }
}

/// Memory bounds, measured on this process's RSS: these tests run one at a time (the other
/// suites allocate little).
@Suite(.serialized) struct MemoryBoundTests {
    @Test(arguments: [64 << 20]) func largeFilesStreamWithBoundedClientMemory(size: Int) async throws {
        try await RunningAgent.with { agent in
            let path = agent.directory + "/large.bin"
            let chunk = randomBytes(1 << 20, seed: 7)
            // Generated one at a time as the client asks: the test itself never holds the file.
            let chunks = GeneratedChunks(count: size >> 20) { i in
                var c = chunk
                c[0] = UInt8(truncatingIfNeeded: i)
                return c
            }
            let before = currentMemory()
            resetPeakMemory()
            try await agent.client.writeFile(path, chunks: chunks, mode: nil, timeout: .seconds(120))
            let received = Mutex<(count: Int, sum: UInt64)>((0, 0))
            try await agent.client.readFile(path, limit: size, timeout: .seconds(120)) { piece in
                received.withLock { r in
                    r.count += piece.count
                    for b in piece { r.sum &+= UInt64(b) }
                }
            }
            let peak = peakMemory()
            var expectedSum: UInt64 = 0
            for i in 0..<(size >> 20) {
                var c = chunk
                c[0] = UInt8(truncatingIfNeeded: i)
                for b in c { expectedSum &+= UInt64(b) }
            }
            #expect(received.withLock { $0.count } == size)
            #expect(received.withLock { $0.sum } == expectedSum)
            var st = stat()
            #expect(stat(path, &st) == 0 && Int(st.st_size) == size)
            // Neither direction held the file whole: the peak grew by well under its size.
            #expect(peak - before < size / 2, "peak RSS grew by \(peak - before) bytes for a \(size)-byte file")
        }
    }

    @Test func aFloodOfOutputKeepsOnlyTheLimit() async throws {
        // An agent that streams stdout forever: the client keeps the limit and gives up at the deadline.
        let chunk = AgentMessage.output(.stdout, [UInt8](repeating: 65, count: 60_000)).frame()
        let fake = try FakeAgent(script: FakeAgent.hello, then: chunk, times: 2000)  // 120 MB, then silence
        defer { fake.stop() }
        let client = SandboxAgentClient(socketPath: fake.socket)
        let before = currentMemory()
        let delivered = Locked(0)
        await #expect(throws: SandboxAgentError.self) {
            _ = try await client.exec(
                .shell("yes", timeout: .milliseconds(200), outputLimit: 1000), output: { _, b in delivered.add(b.count) })
        }
        #expect(delivered.value == 1000)
        #expect(currentMemory() - before < 32 << 20, "RSS grew by \(currentMemory() - before) bytes")
    }

}

/// `count` chunks made on demand by `make`.
struct GeneratedChunks: AsyncSequence, Sendable {
    let count: Int
    let make: @Sendable (Int) -> [UInt8]
    struct AsyncIterator: AsyncIteratorProtocol {
        let sequence: GeneratedChunks
        var index = 0
        mutating func next() async -> [UInt8]? {
            guard index < sequence.count else { return nil }
            defer { index += 1 }
            return sequence.make(index)
        }
    }
    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(sequence: self) }
}

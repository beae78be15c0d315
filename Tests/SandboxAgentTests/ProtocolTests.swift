import Testing

@testable import SandboxAgentProtocol

/// The wire protocol on its own: no agent process, no socket.
@Suite struct ProtocolTests {
    static let samples: [AgentMessage] = [
        .hello(AgentHello(software: "test")),
        .error("permission denied: /etc/x"),
        .execRequest(
            AgentExecRequestMessage(
                argv: ["sh", "-c", "echo hi"], cwd: "/workspace", environment: ["PATH": "/bin", "É": "ü=1"],
                streamsStdin: true, timeoutMilliseconds: 1500, outputLimit: 4096)),
        .execRequest(AgentExecRequestMessage(argv: [])),
        .stdinChunk([0, 1, 2, 255]), .stdinEnd,
        .readFileRequest(path: "/workspace/a b", limit: 1 << 40),
        .writeFileRequest(path: "/x", mode: 0o4755), .writeFileRequest(path: "/y", mode: nil),
        .listRequest(path: "/"), .limitsRequest, .healthRequest,
        .fileChunk(Array(0...255)), .fileEnd,
        .output(.stdout, [10, 0, 13]), .output(.stderr, []),
        .execResult(AgentExecResultMessage(exitCode: 137, signal: 9, timedOut: true, cutBytes: 12, durationMicroseconds: 99)),
        .execResult(AgentExecResultMessage(exitCode: -1)),
        .fileInfo(AgentFileInfo(size: 300_000, mode: 0o644)),
        .writeDone(bytes: 7),
        .listEntries([
            AgentFileEntry(name: "a", type: .regular, size: 3, mode: 0o644, uid: 1000, gid: 1000, modificationTime: -5),
            AgentFileEntry(name: "l", type: .symlink, size: 1, mode: 0o777, uid: 0, gid: 0, modificationTime: 1, symlinkTarget: "a"),
        ]),
        .listEntries([]), .listEnd,
        .limits(AgentLimits(cgroupVersion: 2, oomKills: 1, memoryCurrent: 1 << 20, memoryMax: nil, pidsCurrent: 3, pidsMax: 64)),
        .limits(AgentLimits(cgroupVersion: 0)),
        .health(
            AgentHealth(
                software: "agentd-sandbox-agent", pid: 1, uid: 1000, gid: 1000, uptimeMilliseconds: 5, zombiesReaped: 1000,
                runningCommands: 2)),
    ]

    @Test func everyMessageRoundTrips() throws {
        var decoder = FrameDecoder()
        for message in Self.samples {
            decoder.feed(message.frame())
            #expect(try decoder.nextMessage() == message)
            #expect(try decoder.nextMessage() == nil)
        }
        #expect(decoder.bufferedCount == 0)
    }

    @Test func framesSplitAtEveryByteReassemble() throws {
        let stream = Self.samples.flatMap { $0.frame() }
        var decoder = FrameDecoder()
        var decoded: [AgentMessage] = []
        for byte in stream {
            decoder.feed([byte])
            while let m = try decoder.nextMessage() { decoded.append(m) }
        }
        #expect(decoded == Self.samples)
    }

    @Test func everyMessageTypeHasASample() {
        let covered = Set(Self.samples.map(\.type.rawValue))
        #expect(covered == Set(AgentMessageType.allCases.map(\.rawValue)))
    }

    @Test func maximumFrameIsAcceptedAndOneByteMoreIsRefusedFromTheHeaderAlone() throws {
        var decoder = FrameDecoder()
        decoder.feed(AgentMessage.fileChunk([UInt8](repeating: 7, count: AgentFrame.maximumPayload)).frame())
        #expect(try decoder.nextMessage() == .fileChunk([UInt8](repeating: 7, count: AgentFrame.maximumPayload)))

        var refusing = FrameDecoder()
        let n = AgentFrame.maximumPayload + 1
        refusing.feed([UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)])
        #expect(throws: AgentProtocolError("frame of 1048577 bytes is over the limit of 1048576 bytes")) {
            try refusing.next()
        }
        // A claimed length of 4 GiB is refused as soon as the length is in, with nothing allocated for it.
        var huge = FrameDecoder()
        huge.feed([0xff, 0xff, 0xff, 0xff])
        #expect(throws: AgentProtocolError.self) { try huge.next() }
    }

    @Test func unknownTypeIsRefused() {
        var decoder = FrameDecoder()
        decoder.feed([0, 0, 0, 0, 0x7e])
        #expect(throws: AgentProtocolError("unknown frame type 0x7e")) { try decoder.next() }
    }

    @Test func truncatedPayloadsAreRefused() throws {
        for message in Self.samples {
            let payload = message.payload()
            guard !payload.isEmpty else { continue }
            switch message {
            case .stdinChunk, .fileChunk, .output: continue  // raw bytes: any length is valid
            default: break
            }
            for cut in 0..<payload.count {
                let frame = RawFrame(type: message.type.rawValue, payload: Array(payload[0..<cut]))
                #expect(throws: AgentProtocolError.self, "\(message) cut at \(cut)") { try AgentMessage.decode(frame) }
            }
            let longer = RawFrame(type: message.type.rawValue, payload: payload + [0])
            #expect(throws: AgentProtocolError.self, "\(message) with a trailing byte") { try AgentMessage.decode(longer) }
        }
    }

    @Test func hugeCountsAreRefusedBeforeAllocating() {
        // An argv claiming 2^32-1 strings in a 9-byte payload.
        let frame = RawFrame(type: AgentMessageType.execRequest.rawValue, payload: [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0])
        #expect(throws: AgentProtocolError("truncated execRequest frame")) { try AgentMessage.decode(frame) }
        let list = RawFrame(type: AgentMessageType.listEntries.rawValue, payload: [0x7f, 0xff, 0xff, 0xff])
        #expect(throws: AgentProtocolError.self) { try AgentMessage.decode(list) }
    }

    @Test func randomGarbageNeverCrashesTheDecoder() {
        var rng = SplitMix(seed: 0x5A9D)
        for _ in 0..<3000 {
            var decoder = FrameDecoder()
            let count = Int(rng.next() % 64)
            var bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 2 == 0, count >= 5 {  // a plausible header makes the payload decoders work
                bytes[0] = 0
                bytes[1] = 0
                bytes[2] = 0
                bytes[3] = UInt8(count - 5)
                let types = AgentMessageType.allCases
                bytes[4] = types[Int(rng.next() % UInt64(types.count))].rawValue
            }
            decoder.feed(bytes)
            while true {
                do {
                    guard (try decoder.nextMessage()) != nil else { break }
                } catch {
                    break
                }
            }
            #expect(decoder.bufferedCount <= count)
        }
    }

    @Test func versionMismatchNamesBothVersions() {
        #expect(throws: AgentProtocolError("protocol version mismatch: the agent (x) speaks version 9, this side speaks version 1")) {
            try AgentHello(version: 9, software: "x").checkCompatible(peer: "the agent")
        }
        #expect(throws: Never.self) { try AgentHello(software: "x").checkCompatible(peer: "the agent") }
    }

    @Test func nonUTF8TextIsRefused() {
        let frame = RawFrame(type: AgentMessageType.error.rawValue, payload: [0, 0, 0, 2, 0xc3, 0x28])
        #expect(throws: AgentProtocolError("text that is not UTF-8 in error frame")) { try AgentMessage.decode(frame) }
    }
}

/// A small seeded generator, so a failing garbage case replays.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

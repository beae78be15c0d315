/// Framing of the sandbox agent protocol: every frame is a 4-byte big-endian payload length,
/// a 1-byte message type, then the payload. Frames are bounded by `maximumPayload`; a decoder
/// refuses a longer claimed length before reading (or allocating) any of it.
public enum AgentFrame {
    /// The protocol version both sides announce in their hello frame.
    public static let protocolVersion: UInt32 = 1
    /// Bytes before a frame's payload: the length (4) and the type (1).
    public static let headerSize = 5
    /// The largest payload a frame may carry (1 MiB).
    public static let maximumPayload = 1 << 20
    /// The payload size the agent uses for a command's output: a pipe read (a command's pipes
    /// hold up to `outputPipeSize`, a read takes at most this).
    public static let chunkSize = 64 << 10
    /// The payload size senders use for file contents and stdin: bulk data, where fewer,
    /// larger frames mean fewer system calls and wake-ups per byte.
    public static let fileChunkSize = 256 << 10

    /// Encodes one frame: header and payload.
    public static func encode(type: UInt8, payload: [UInt8]) -> [UInt8] {
        precondition(payload.count <= maximumPayload, "frame payload over the protocol's maximum")
        var bytes: [UInt8] = []
        bytes.reserveCapacity(headerSize + payload.count)
        bytes.append(contentsOf: header(type: type, length: payload.count))
        bytes.append(contentsOf: payload)
        return bytes
    }

    /// A frame's header (length and type), for a sender that puts the payload after it itself.
    public static func header(type: UInt8, length: Int) -> [UInt8] {
        precondition(length >= 0 && length <= maximumPayload, "frame payload over the protocol's maximum")
        let n = UInt32(length)
        return [UInt8(truncatingIfNeeded: n >> 24), UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n), type]
    }
}

/// A protocol violation: an oversized, truncated or malformed frame, an unknown message type,
/// an unexpected message, or a version mismatch.
public struct AgentProtocolError: Error, CustomStringConvertible, Sendable, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One undecoded frame.
public struct RawFrame: Sendable, Equatable {
    public let type: UInt8
    public let payload: [UInt8]
    public init(type: UInt8, payload: [UInt8]) {
        self.type = type
        self.payload = payload
    }
}

/// Splits a byte stream into frames. Holds at most one partial frame (bounded by the maximum
/// payload) beyond what it was fed; a length over the maximum or an unknown type throws at once.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0
    public let maximumPayload: Int

    public init(maximumPayload: Int = AgentFrame.maximumPayload) {
        self.maximumPayload = maximumPayload
    }

    /// Bytes fed but not yet returned as frames.
    public var bufferedCount: Int { buffer.count - start }

    public mutating func feed<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, nil when more bytes are needed.
    public mutating func next() throws(AgentProtocolError) -> RawFrame? {
        let available = buffer.count - start
        guard available >= 4 else { return nil }
        let length =
            Int(buffer[start]) << 24 | Int(buffer[start + 1]) << 16 | Int(buffer[start + 2]) << 8 | Int(buffer[start + 3])
        guard length <= maximumPayload else {
            throw AgentProtocolError("frame of \(length) bytes is over the limit of \(maximumPayload) bytes")
        }
        guard available >= AgentFrame.headerSize else { return nil }
        let type = buffer[start + 4]
        guard AgentMessageType(rawValue: type) != nil else {
            throw AgentProtocolError("unknown frame type 0x\(String(type, radix: 16))")
        }
        guard available >= AgentFrame.headerSize + length else { return nil }
        let payloadStart = start + AgentFrame.headerSize
        let payload = Array(buffer[payloadStart..<payloadStart + length])
        start = payloadStart + length
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: buffer.capacity <= 2 * (AgentFrame.headerSize + maximumPayload))
            start = 0
        } else if start > maximumPayload {
            buffer.removeFirst(start)
            start = 0
        }
        return RawFrame(type: type, payload: payload)
    }

    /// The next complete message, nil when more bytes are needed.
    public mutating func nextMessage() throws(AgentProtocolError) -> AgentMessage? {
        guard let frame = try next() else { return nil }
        return try AgentMessage.decode(frame)
    }
}

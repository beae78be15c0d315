#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SandboxAgentProtocol

/// Why a connection ends early.
enum ConnectionEnd: Error {
    /// The host closed the connection, or a read or write failed or timed out.
    case closed
    /// The host sent something the protocol does not allow; the text goes back in an error frame.
    case violation(String)
}

/// One host connection: frames in and out over a blocking socket with receive and send timeouts.
final class Connection {
    let fd: Int32
    private var decoder = FrameDecoder()
    private var buffer = [UInt8](repeating: 0, count: AgentFrame.fileChunkSize + AgentFrame.headerSize)

    init(fd: Int32) { self.fd = fd }

    /// Sends a message; false when the host is gone.
    @discardableResult
    func send(_ message: AgentMessage) -> Bool { Posix.sendAll(fd, message.frame()) }

    /// The next message, waiting at most the socket's receive timeout.
    func receive() throws(ConnectionEnd) -> AgentMessage {
        while true {
            if let message = try decoded() { return message }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw .closed }
            decoder.feed(buffer[0..<n])
        }
    }

    /// A message already buffered, if any.
    func decoded() throws(ConnectionEnd) -> AgentMessage? {
        do {
            return try decoder.nextMessage()
        } catch {
            throw .violation(error.message)
        }
    }

    /// Reads what the socket has without blocking; false at end of file or on error.
    func receiveAvailable() -> Bool {
        while true {
            let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return true }
            guard n > 0 else { return false }
            decoder.feed(buffer[0..<n])
            return true
        }
    }
}

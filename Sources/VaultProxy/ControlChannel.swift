import Logging
import NIOCore
import NIOPosix
import Secrets

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Runs a proxy commanded over a private channel (a unix socket from agentd: an inherited
/// socketpair end or a connection to agentd's control socket; or a pipe pair): newline-delimited
/// JSON `ControlMessage`s in, `ready`/`ok`/`error`/`egress` out. An `addSandbox` with
/// `listenerFD` carries the sandbox's listening socket as SCM_RIGHTS ancillary data. Returns
/// when agentd closes its end: the proxy has no purpose without it.
public enum ControlChannel {
    public static let maxMessageBytes = 4 << 20
    /// Messages queued for agentd while it does not read; beyond this the oldest are dropped.
    static let maxQueuedMessages = 65_536

    /// - Parameters:
    ///   - input: the descriptor to read messages from (e.g. 3, or 0 for stdin).
    ///   - output: the descriptor to write answers and events to (the same as `input` for a socket).
    ///   Both are closed when the channel ends.
    public static func run(
        input: CInt, output: CInt, group: any EventLoopGroup, configuration: ProxyConfiguration, logger: Logger
    ) async throws {
        // One writer thread: answers and events in the order they happen; bounded so a
        // stalled agentd cannot grow the proxy without limit.
        let writer = ControlWriter(fd: output, capacity: maxQueuedMessages, logger: logger)
        let proxy = VaultProxy(group: group, configuration: configuration, logger: logger) { event in
            writer.enqueue(.egress(event))
        }
        let lines = ControlReader.start(fd: input, maxLine: maxMessageBytes, logger: logger)
        writer.enqueue(.ready)
        var failure: (any Error)?
        do {
            for try await line in lines {
                if line.bytes.isEmpty {
                    line.descriptors.forEach { close($0) }
                    continue
                }
                writer.enqueue(await handle(line, proxy: proxy, logger: logger))
            }
            logger.info("control channel closed; stopping")
        } catch {
            logger.error("control channel: \(error); stopping")
            failure = error
        }
        await proxy.shutdown()
        await writer.finish()
        close(input)
        if output != input { close(output) }
        if let failure { throw failure }
    }

    /// Carries out one message; the answer names its `id`. Descriptors that came with the
    /// line are taken by an `addSandbox` with `listenerFD` (exactly one) and closed otherwise.
    static func handle(_ line: ControlLine, proxy: VaultProxy, logger: Logger) async -> ControlMessage {
        var descriptors = line.descriptors
        defer { descriptors.forEach { close($0) } }
        let message: ControlMessage
        do {
            message = try ControlMessage.parse(line.bytes)
        } catch {
            logger.warning("control: \(error)")
            return .error(id: nil, message: error.message)
        }
        logger.debug("control: \(message)")
        switch message {
        case .credentials(let id, let values):
            do {
                let secrets = try values.keys.sorted().map { name in try Secret(name: name, value: values[name]!) }
                proxy.setCredentials(secrets)
                return .ok(id: id)
            } catch {
                return .error(id: id, message: "\(error)")
            }
        case .addSandbox(let id, let spec, let listenerFD):
            var listener: CInt?
            if listenerFD {
                guard descriptors.count == 1 else {
                    return .error(
                        id: id,
                        message: "addSandbox \(spec.sandbox) says a listening socket comes with it, but \(descriptors.count) descriptors did (send exactly one with the line, SCM_RIGHTS)")
                }
                listener = descriptors.removeFirst()
            }
            do {
                try await proxy.addSandbox(spec, listener: listener)
                return .ok(id: id)
            } catch {
                logger.warning("control: addSandbox \(spec.sandbox): \(error)")
                return .error(id: id, message: "\(error)")
            }
        case .removeSandbox(let id, let sandbox):
            do {
                try await proxy.removeSandbox(sandbox)
                return .ok(id: id)
            } catch {
                return .error(id: id, message: "\(error)")
            }
        case .setIntent(let id, let sandbox, let task, let seq):
            do {
                try proxy.setIntent(sandbox: sandbox, task: task, seq: seq)
                return .ok(id: id)
            } catch {
                return .error(id: id, message: "\(error)")
            }
        case .ready, .ok, .error, .egress:
            return .error(id: nil, message: "message type '\(message)' goes from the proxy to agentd, not the other way")
        }
    }
}

/// One line of the control channel and the descriptors that arrived with it.
struct ControlLine: Sendable {
    var bytes: [UInt8]
    var descriptors: [CInt]
}

/// Reads the control channel on a thread of its own (blocking `recvmsg`), splits it into
/// lines and gives each line the descriptors that came with it.
///
/// Which line a descriptor belongs to: agentd sends a line that carries a descriptor with one
/// `sendmsg` that starts at the line's first byte, and the kernel delivers a message's
/// descriptors with the `recvmsg` that returns its first byte and never reads past the
/// message they came with in that call. So the descriptors belong to the last line that
/// *starts* within the bytes of that read.
enum ControlReader {
    static func start(fd: CInt, maxLine: Int, logger: Logger) -> AsyncThrowingStream<ControlLine, any Error> {
        let (stream, sink) = AsyncThrowingStream.makeStream(of: ControlLine.self)
        Threads.start(name: "vault-proxy.control") { read(fd: fd, maxLine: maxLine, logger: logger, sink: sink) }
        return stream
    }

    private static func read(fd: CInt, maxLine: Int, logger: Logger, sink: AsyncThrowingStream<ControlLine, any Error>.Continuation) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var line: [UInt8] = []
        var lineDescriptors: [CInt] = []
        var atLineStart = true
        defer { lineDescriptors.forEach { close($0) } }
        while true {
            var descriptors: [CInt] = []
            var truncated = false
            let n = buffer.withUnsafeMutableBytes { UnixSocket.receive(fd, into: $0, descriptors: &descriptors, truncated: &truncated) }
            if n <= 0 {
                descriptors.forEach { close($0) }
                if n < 0 { logger.warning("control channel: read failed: \(String(cString: strerror(errno)))") }
                sink.finish()
                return
            }
            if truncated {
                descriptors.forEach { close($0) }
                sink.finish(throwing: ProxyError("more descriptors arrived on the control channel than any message carries"))
                return
            }
            var owner: Int?
            if !descriptors.isEmpty {
                owner = atLineStart ? 0 : nil
                for i in 0..<(n - 1) where buffer[i] == 0x0A { owner = i + 1 }
                if owner == nil {
                    logger.warning("control channel: \(descriptors.count) descriptor(s) arrived in the middle of a line; closed")
                    descriptors.forEach { close($0) }
                }
            }
            var start = 0
            if owner == 0 { lineDescriptors += descriptors }
            for i in 0..<n where buffer[i] == 0x0A {
                line += buffer[start..<i]
                guard line.count <= maxLine else { break }
                sink.yield(ControlLine(bytes: line, descriptors: lineDescriptors))
                line.removeAll(keepingCapacity: true)
                lineDescriptors = []
                start = i + 1
                if owner == start { lineDescriptors += descriptors }
            }
            if start < n { line += buffer[start..<n] }
            if line.count > maxLine {
                sink.finish(throwing: ProxyError("control message longer than \(maxLine) bytes"))
                return
            }
            atLineStart = buffer[n - 1] == 0x0A
        }
    }
}

/// Writes messages to agentd on a thread of its own, in order, with at most `capacity`
/// waiting (the oldest are dropped beyond that, so a stalled agentd cannot grow the proxy).
///
/// The event loops only queue a message; the thread encodes it and writes. After each write it
/// lingers up to `batchDelay` for more: egress events queued meanwhile (one per request) wake
/// nobody and go out together when it ends — at most one wake-up and one write per delay under
/// load, not one per request. An answer (`ok`, `error`) ends the linger at once, so agentd
/// never waits for one.
final class ControlWriter: @unchecked Sendable {
    private let condition = Condition()
    private var queue = CircularBuffer<ControlMessage>()
    private var finishing = false
    private var ended = false
    /// The thread is in its linger after a write: an egress event need not wake it.
    private var lingering = false
    private var waiter: CheckedContinuation<Void, Never>?
    private let capacity: Int
    /// How long the thread lingers after a write for more events (1 ms, in nanoseconds).
    static let batchDelay = 1_000_000

    init(fd: CInt, capacity: Int, logger: Logger) {
        self.capacity = capacity
        var info = stat()
        let isSocket = fstat(fd, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK
        Threads.start(name: "vault-proxy.control-out") { [self] in run(fd: fd, isSocket: isSocket, logger: logger) }
    }

    func enqueue(_ message: ControlMessage) {
        condition.lock()
        defer { condition.unlock() }
        guard !finishing else { return }
        if queue.count >= capacity { _ = queue.removeFirst() }
        queue.append(message)
        if case .egress = message, lingering { return }
        condition.signal()
    }

    /// Writes what is queued, then ends the thread; returns once it has.
    func finish() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            condition.lock()
            finishing = true
            let done = ended
            if !done { waiter = c }
            condition.signal()
            condition.unlock()
            if done { c.resume() }
        }
    }

    private func run(fd: CInt, isSocket: Bool, logger: Logger) {
        var broken = false
        var batch: [ControlMessage] = []
        while true {
            condition.lock()
            while queue.isEmpty && !finishing { condition.wait() }
            if queue.isEmpty {
                ended = true
                let w = waiter
                waiter = nil
                condition.unlock()
                w?.resume()
                return
            }
            batch.removeAll(keepingCapacity: true)
            while let message = queue.popFirst() { batch.append(message) }
            condition.unlock()
            guard !broken else { continue }
            var bytes: [UInt8] = []
            for message in batch { bytes += message.line() }
            if isSocket {
                broken = !UnixSocket.send(fd, bytes)
            } else {
                var offset = 0
                while offset < bytes.count {
                    let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 {
                        broken = true
                        break
                    }
                    offset += n
                }
            }
            if broken { logger.warning("control channel: agentd no longer reads; dropping messages") }
            condition.lock()
            if !finishing && queue.isEmpty {
                lingering = true
                condition.wait(nanoseconds: ControlWriter.batchDelay)
                lingering = false
            }
            condition.unlock()
        }
    }
}

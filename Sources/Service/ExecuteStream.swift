import AgentdAPI
import Foundation
import Hands
import Runtime
import Synchronization

/// A streaming execute's output between the command (pushed from the driver's thread, which
/// must never wait) and the client (taken by the SSE writer, as fast as the client reads).
///
/// Bounded: it holds at most `capacity` bytes of output. Output that arrives while it is full
/// is dropped and counted, and the client gets an `event: dropped` block at that point saying
/// how much it missed (the result, journaled, still has it). So a slow or absent reader costs
/// agentd at most `capacity` bytes (plus the batch being written) per stream, never the
/// command's whole output, and never slows the command.
final class OutputBuffer: Sendable {
    enum Item: Sendable, Equatable {
        case output(Hands.OutputStream, [UInt8])
        case dropped(Int)
    }

    private struct State {
        var items: [Item] = []
        var bytes = 0
        var dropped = 0
        /// Bytes dropped in all (for tests and logs).
        var droppedTotal = 0
        /// The most bytes held at once.
        var peak = 0
        /// The command ended: nothing more comes.
        var ended = false
        /// The reader is gone: nothing more is kept.
        var closed = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    let capacity: Int
    private let state = Mutex(State())

    init(capacity: Int) { self.capacity = max(1, capacity) }

    /// Adds a piece of output, or drops it (counted) when the buffer is full.
    func push(_ stream: Hands.OutputStream, _ bytes: [UInt8]) {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard !s.closed, !s.ended, !bytes.isEmpty else { return nil }
            guard s.bytes + bytes.count <= capacity else {
                s.dropped += bytes.count
                s.droppedTotal += bytes.count
                return nil
            }
            if s.dropped > 0 {
                s.items.append(.dropped(s.dropped))
                s.dropped = 0
            }
            s.items.append(.output(stream, bytes))
            s.bytes += bytes.count
            s.peak = max(s.peak, s.bytes)
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
    }

    /// Nothing more will be pushed (the command ended).
    func end() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.ended = true
            if s.dropped > 0 {
                s.items.append(.dropped(s.dropped))
                s.dropped = 0
            }
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
    }

    /// The reader is gone: what is held is released and later pushes are ignored.
    func close() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.closed = true
            s.items = []
            s.bytes = 0
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
    }

    /// The most bytes held at once, and the bytes dropped in all.
    var figures: (peak: Int, dropped: Int) { state.withLock { ($0.peak, $0.droppedTotal) } }

    /// Everything held now, waiting until there is something; an empty answer means the
    /// command ended (and everything was taken), the reader was closed, or the task was
    /// cancelled.
    func take() async -> [Item] {
        while true {
            let batch = state.withLock { s -> [Item]? in
                if !s.items.isEmpty {
                    defer {
                        s.items = []
                        s.bytes = 0
                    }
                    return s.items
                }
                return s.ended || s.closed ? [] : nil
            }
            if let batch { return batch }
            if Task.isCancelled { return [] }
            await withTaskCancellationHandler {
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    let now = state.withLock { s -> Bool in
                        if !s.items.isEmpty || s.ended || s.closed { return true }
                        s.waiter = c
                        return false
                    }
                    if now { c.resume() }
                }
            } onCancel: {
                self.close()
            }
        }
    }
}

/// Keeps a stream's text whole: a UTF-8 character split between two pieces of output is held
/// back (at most 3 bytes) and sent with the next piece, so that text goes out as `data`, not
/// `base64`.
struct UTF8Carry {
    private var carry: [UInt8] = []

    /// `bytes` after what was held back, less an unfinished character at the end.
    mutating func feed(_ bytes: [UInt8]) -> [UInt8] {
        var all = carry + bytes
        carry = []
        let incomplete = Self.incompleteTail(all)
        if incomplete > 0 {
            carry = Array(all.suffix(incomplete))
            all.removeLast(incomplete)
        }
        return all
    }

    /// Whatever was held back: the stream ended.
    mutating func finish() -> [UInt8] {
        defer { carry = [] }
        return carry
    }

    /// How many bytes at the end of `bytes` begin a UTF-8 character that is not complete.
    static func incompleteTail(_ bytes: [UInt8]) -> Int {
        // Look back over at most 3 continuation bytes for a lead byte.
        var i = bytes.count - 1
        var seen = 0
        while i >= 0 && seen < 4 {
            let b = bytes[i]
            if b & 0xC0 == 0x80 {
                seen += 1
                i -= 1
                continue
            }
            let need = b & 0xE0 == 0xC0 ? 2 : b & 0xF0 == 0xE0 ? 3 : b & 0xF8 == 0xF0 ? 4 : 1
            let have = seen + 1
            return need > have ? have : 0
        }
        return 0
    }
}

/// Opens once: a streaming execute's handler waits on it for the call to be accepted (or to
/// end before it was).
final class Gate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func open() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.open = true
            defer { s.waiters = [] }
            return s.waiters
        }
        for w in waiters { w.resume() }
    }

    func wait() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.open { return true }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }
}

extension API {
    /// How much output a streaming execute holds for a slow client before it drops some
    /// (`event: dropped`): 256 KiB.
    static let streamBufferBytes = 256 << 10

    /// `POST …/execute?stream=true`: runs the call with its output streamed as server-sent
    /// events (see `ExecuteStreamEvent`). A refusal before the call is accepted is the plain
    /// error answer; from then on the answer is a stream ending in `result` or `error`.
    ///
    /// The call runs to its end whatever the client does: one that goes away or reads
    /// nothing for the server's write timeout loses the rest of the stream, not the result,
    /// which is journaled (a retry with the same idempotency key gets it).
    func streamingExecute(
        session: String, task: String, call: ToolCall, epoch: UInt64?, key: String?, bufferBytes: Int = API.streamBufferBytes
    ) async throws -> APIResponse {
        let buffer = OutputBuffer(capacity: bufferBytes)
        let accepted = Gate()
        let acceptedFlag = Atomic<Bool>(false)
        let runtime = runtime
        let metrics = metrics
        let started = ContinuousClock.now
        let work = Task { () async throws -> ExecuteOutcome in
            defer {
                buffer.end()
                accepted.open()
            }
            let outcome = try await runtime.execute(
                session: session, task: task, call: call, epoch: epoch, idempotencyKey: key,
                progress: { event in
                    switch event {
                    case .accepted:
                        acceptedFlag.store(true, ordering: .sequentiallyConsistent)
                        accepted.open()
                    case .output(let stream, let bytes):
                        buffer.push(stream, bytes)
                    }
                })
            metrics.observeExecute(seconds: (ContinuousClock.now - started).seconds, isError: outcome.result.isError)
            return outcome
        }
        await accepted.wait()
        guard acceptedFlag.load(ordering: .sequentiallyConsistent) else {
            // Refused before anything ran: the plain answer (404, 409, 400, …).
            return Self.executeResponse(try await work.value)
        }
        let logger = logger
        return APIResponse(
            status: 200, headers: [("content-type", "text/event-stream"), ("cache-control", "no-cache")],
            body: .stream(
                ResponseStream { writer in
                    await Self.pumpExecute(buffer: buffer, work: work, to: writer)
                    let (peak, dropped) = buffer.figures
                    if dropped > 0 {
                        logger.info("a streaming execute's client read too slowly; output was dropped from its stream", metadata: ["dropped-bytes": "\(dropped)", "peak-bytes": "\(peak)"])
                    }
                }))
    }

    /// Writes the buffer's output as `output`/`dropped` blocks until the command ends, then the
    /// `result` or `error` block; a comment every 15 s keeps a quiet stream's connection alive.
    static func pumpExecute(buffer: OutputBuffer, work: Task<ExecuteOutcome, any Error>, to writer: ResponseStreamWriter) async {
        await withDiscardingTaskGroup { group in
            group.addTask {
                while (try? await Task.sleep(for: EventStream.heartbeat)) != nil {
                    do { try await writer.write(Array(": keep-alive\n\n".utf8)) } catch { return }
                }
            }
            defer {
                group.cancelAll()
                buffer.close()
            }
            var stdout = UTF8Carry()
            var stderr = UTF8Carry()
            do {
                while true {
                    let batch = await buffer.take()
                    if batch.isEmpty { break }
                    var bytes: [UInt8] = []
                    for item in batch {
                        switch item {
                        case .output(let stream, let piece):
                            let text = stream == .stdout ? stdout.feed(piece) : stderr.feed(piece)
                            if !text.isEmpty { bytes += block(ExecuteStreamEvent.output, ExecuteOutputEvent(stream: stream.rawValue, bytes: text)) }
                        case .dropped(let n):
                            bytes += block(
                                ExecuteStreamEvent.dropped,
                                ExecuteDroppedEvent(
                                    bytes: n,
                                    message: "\(n) bytes of output were left out here: this client read more slowly than the command wrote; the result has them (up to the output limit)"))
                        }
                    }
                    if !bytes.isEmpty { try await writer.write(bytes) }
                }
                if Task.isCancelled { return }
                var tail: [UInt8] = []
                for (name, carry) in [(Hands.OutputStream.stdout, stdout.finish()), (.stderr, stderr.finish())] where !carry.isEmpty {
                    tail += block(ExecuteStreamEvent.output, ExecuteOutputEvent(stream: name.rawValue, bytes: carry))
                }
                switch await work.result {
                case .success(let outcome):
                    tail += block(ExecuteStreamEvent.result, executeBody(outcome))
                case .failure(let error):
                    tail += block(ExecuteStreamEvent.error, APIError.describe(error).body)
                }
                try await writer.write(tail)
            } catch ResponseStreamError.stalled(let bound) {
                await writer.finish(
                    with: block(
                        ExecuteStreamEvent.error,
                        ErrorResponse(
                            code: "stalled",
                            message: "this client read nothing for \(bound), so the stream ends here; the call goes on and its result is journaled: read it from the session's events, or repeat the call with the same idempotency key")))
            } catch {
                // The connection is gone: nobody to tell.
            }
        }
    }

    /// One SSE block: `event: NAME` and the value as JSON on one `data:` line.
    static func block(_ name: String, _ value: some Encodable) -> [UInt8] {
        Array("event: \(name)\ndata: ".utf8) + APIBody.encode(value) + Array("\n\n".utf8)
    }

    /// The answer of a non-streaming execute.
    static func executeResponse(_ outcome: ExecuteOutcome) -> APIResponse { JSON.ok(executeBody(outcome)) }

    static func executeBody(_ outcome: ExecuteOutcome) -> ExecuteResponse {
        let result = ExecuteResponse.Result(output: outcome.result.output, isError: outcome.result.isError, exitCode: outcome.result.exitCode)
        return ExecuteResponse(result: result, intentSeq: outcome.intent_seq, resultSeq: outcome.result_seq, replayed: outcome.replayed)
    }
}

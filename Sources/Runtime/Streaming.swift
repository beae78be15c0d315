import Hands
import SessionLog
import Synchronization

/// What a streaming `execute` reports before it returns its result.
public enum ExecuteProgress: Sendable, Equatable {
    /// The call passed its checks (session, fencing, input, idempotency key): from here on it
    /// ends in a result or a failure after the fact, not in a refusal. Reported once, first.
    /// A replay of a completed key, or a wait for the call running with its key, is accepted
    /// too, and reports no output.
    case accepted
    /// A piece of a `bash` command's output, as it is produced: redacted like the journaled
    /// result, and no more in all than the policy's output limit (`hands.outputLimit`).
    case output(OutputStream, [UInt8])
}

/// Receives an execute's progress, in order, from the thread that produced it: keep it quick
/// (hand the bytes over, do not write them out here).
public typealias ExecuteProgressHandler = @Sendable (ExecuteProgress) -> Void

/// Turns the driver's raw output into `ExecuteProgress.output`: at most `limit` bytes in all
/// (the rest is dropped, as the result cuts it), each stream redacted on its own with a
/// `StreamRedactor`, so that a secret split across two chunks is caught.
final class OutputRelay: Sendable {
    private struct State {
        var remaining: Int
        var stdout: StreamRedactor
        var stderr: StreamRedactor
        var finished = false
    }
    private let state: Mutex<State>
    private let handler: ExecuteProgressHandler

    init(limit: Int, redactor: Redactor, handler: @escaping ExecuteProgressHandler) {
        state = Mutex(State(remaining: max(0, limit), stdout: StreamRedactor(redactor), stderr: StreamRedactor(redactor)))
        self.handler = handler
    }

    /// The sink the driver writes to.
    var sink: OutputSink {
        { [self] stream, bytes in self.take(stream, bytes) }
    }

    private func take(_ stream: OutputStream, _ bytes: [UInt8]) {
        // The handler is called under the lock, so that pieces keep their order.
        state.withLock { s in
            guard s.remaining > 0, !bytes.isEmpty, !s.finished else { return }
            let kept = bytes.count <= s.remaining ? bytes : Array(bytes.prefix(s.remaining))
            s.remaining -= kept.count
            let out = stream == .stdout ? s.stdout.feed(kept) : s.stderr.feed(kept)
            if !out.isEmpty { handler(.output(stream, out)) }
        }
    }

    /// Lets out what the redactors held back: the command has ended.
    func finish() {
        state.withLock { s in
            s.finished = true
            let out = s.stdout.finish()
            if !out.isEmpty { handler(.output(.stdout, out)) }
            let err = s.stderr.finish()
            if !err.isEmpty { handler(.output(.stderr, err)) }
        }
    }
}

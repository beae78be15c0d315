import Foundation

/// A small pool of dedicated OS threads for short blocking calls (`fsync`, a file `write`,
/// `mmap` and decode) so that they never occupy a thread of Swift's cooperative pool.
///
/// Why not `Task.detached`: it runs on the same cooperative pool, and two blocked calls on a
/// two-core machine would stall every other task. Dedicated threads make the bound explicit
/// and visible in `top -H` by name.
public final class BlockingPool: @unchecked Sendable {
    // Invariant for @unchecked Sendable: every mutable field below is read and written only
    // while `condition` is locked.
    private let condition = NSCondition()
    private var queue: [@Sendable () -> Void] = []
    private var queueHead = 0
    private var idle = 0
    private var threads = 0

    private let name: String
    private let maxThreads: Int

    /// The process-wide pool, for short blocking calls only: writing a spooled upload chunk,
    /// persisting the journal index, opening and closing the journal.
    ///
    /// Nothing whose length a tenant controls may run here: a call that lasts as long as a
    /// command would let one tenant's long commands use up the pool and stall everyone (that
    /// is why HTTP runs on `CurlHTTP`'s multi loop thread, a unit's output pipes on the Hands
    /// pipe reader's thread, and journal reads on a pool of their own).
    public static let shared = BlockingPool(name: "agentd-blocking", threads: 32)

    /// Creates a pool that starts threads lazily, up to `threads` of them.
    public init(name: String, threads: Int) {
        self.name = name
        self.maxThreads = max(1, threads)
    }

    /// Runs `body` on a pool thread and returns its result to the calling task.
    ///
    /// Cancellation of the calling task does not interrupt `body`: a blocking C call cannot be
    /// interrupted from outside. Callers pass their own cancellation flag into `body` (for
    /// example libcurl's progress callback) where the call supports one.
    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            submit {
                do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
            }
        }
    }

    /// Queues `work` without waiting for it.
    public func submit(_ work: @escaping @Sendable () -> Void) {
        condition.lock()
        queue.append(work)
        let startThread = idle == 0 && threads < maxThreads
        if startThread { threads += 1 }
        condition.signal()
        condition.unlock()
        if startThread { startDedicatedThread(name: name) { self.workerLoop() } }
    }

    private func workerLoop() {
        while true {
            condition.lock()
            while queueHead == queue.count {
                idle += 1
                condition.wait()
                idle -= 1
            }
            let item = queue[queueHead]
            queueHead += 1
            if queueHead > 64 && queueHead * 2 > queue.count {
                queue.removeFirst(queueHead)
                queueHead = 0
            }
            condition.unlock()
            item()
        }
    }
}

/// Runs `body` on a new thread of its own, named `name` (for long-lived loops: an event loop,
/// a log writer). The thread ends when `body` returns.
public func startDedicatedThread(name: String, _ body: @escaping @Sendable () -> Void) {
    let thread = Thread(block: body)
    thread.name = name
    thread.stackSize = 1 << 20
    thread.start()
}

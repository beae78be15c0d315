import Foundation
import Logging
import MCP

/// A transport that keeps count of the requests it delivered and has not answered yet, so that
/// at the end of input the server can answer every call in flight before it exits.
///
/// Why: the SDK's `Server` handles each request in a task of its own and its receive loop ends
/// at end of input without waiting for them; a harness that closes stdin after its last call
/// still expects that call's answer.
actor AnsweringTransport: Transport {
    nonisolated let logger: Logger
    private let base: any Transport
    /// Ids (as `RequestKey`s) of the requests delivered and not answered.
    private var open: Set<RequestKey> = []
    private var waiters: [CheckedContinuation<Void, Never>] = []
    private let messages: AsyncThrowingStream<Data, any Error>
    private let continuation: AsyncThrowingStream<Data, any Error>.Continuation
    private var pump: Task<Void, Never>?

    init(base: some Transport, logger: Logger) {
        self.base = base
        self.logger = logger
        (messages, continuation) = AsyncThrowingStream.makeStream()
    }

    func connect() async throws {
        try await base.connect()
        let incoming = await base.receive()
        let continuation = continuation
        pump = Task {
            do {
                for try await message in incoming {
                    self.track(message)
                    continuation.yield(message)
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
    }

    func disconnect() async {
        pump?.cancel()
        await base.disconnect()
    }

    func send(_ data: Data) async throws {
        // Answered even when the write fails (the client is gone): nothing is left to wait for.
        defer {
            for object in Self.objects(data) where object["method"] == nil {
                if let key = RequestKey(object["id"]) { open.remove(key) }
            }
            resumeWaitersWhenAnswered()
        }
        try await base.send(data)
    }

    func receive() -> AsyncThrowingStream<Data, any Error> { messages }

    /// Returns once every request delivered so far has been answered (or cancelled by the
    /// client, which gets no answer).
    func answered() async {
        if open.isEmpty { return }
        await withCheckedContinuation { waiters.append($0) }
    }

    private func track(_ data: Data) {
        for object in Self.objects(data) {
            guard let method = object["method"] as? String else { continue }
            if let key = RequestKey(object["id"]) {
                open.insert(key)
            } else if method == CancelledNotification.name, let key = RequestKey((object["params"] as? [String: Any])?["requestId"]) {
                open.remove(key)
            }
        }
        resumeWaitersWhenAnswered()
    }

    private func resumeWaitersWhenAnswered() {
        guard open.isEmpty else { return }
        for waiter in waiters { waiter.resume() }
        waiters.removeAll()
    }

    /// The JSON-RPC messages in `data`: one object, or a batch (an array of them).
    private static func objects(_ data: Data) -> [[String: Any]] {
        switch try? JSONSerialization.jsonObject(with: data) {
        case let object as [String: Any]: [object]
        case let batch as [Any]: batch.compactMap { $0 as? [String: Any] }
        default: []
        }
    }
}

/// A JSON-RPC id (a string or a number, kept apart).
private enum RequestKey: Hashable {
    case string(String)
    case number(String)

    init?(_ value: Any?) {
        switch value {
        case let s as String: self = .string(s)
        case let n as NSNumber: self = .number(n.stringValue)
        default: return nil
        }
    }
}

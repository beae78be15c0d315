import AgentdAPI
import AgentdClient
import Foundation
import SessionLog
import Synchronization
import Testing

@testable import Service

/// `POST …/execute?stream=true` end to end through the real HTTP server, API, Runtime, journal
/// and `AgentdClient`, with a driver that streams in pieces and can be held mid-command.
@Suite("Streaming execute: output reaches the client while the command runs")
struct StreamingExecuteTests {
    private func input(_ command: String) -> Data {
        (try? JSONSerialization.data(withJSONObject: ["command": command])) ?? Data()
    }

    @Test("pieces reach the client in order while the command is still running; the result is the non-streaming one")
    func streamsWhileRunning() async throws {
        try await StreamingServer.with { server in
            let session = try await server.client.createSession().id
            let updates = Updates()
            let command = #"one\n|HOLD|two\n|!warning\n|three"#
            let call = Task {
                try await server.client.executeStreaming(
                    session: session, tool: "bash", input: input(command), idempotencyKey: "k1", onUpdate: updates.take)
            }
            // The first piece is at the client while the driver still holds the command.
            var iterator = updates.stream.makeAsyncIterator()
            let first = await iterator.next()
            #expect(first == .output(stream: "stdout", bytes: Array("one\n".utf8)))
            #expect(server.driver.isHolding, "the command is still running when its first line reaches the client")
            server.driver.release()
            let streamed = try await call.value
            #expect(updates.text("stdout") == "one\ntwo\nthree")
            #expect(updates.text("stderr") == "warning\n")
            let expected: [AgentdClient.ExecuteUpdate] = [
                .output(stream: "stdout", bytes: Array("one\n".utf8)), .output(stream: "stdout", bytes: Array("two\n".utf8)),
                .output(stream: "stderr", bytes: Array("warning\n".utf8)), .output(stream: "stdout", bytes: Array("three".utf8)),
            ]
            #expect(updates.all == expected, "each piece arrives as the driver wrote it, in order")
            // The same call without streaming gives the same result, as journaled.
            let plain = try await server.client.execute(session: session, tool: "bash", input: input(command), idempotencyKey: "k2")
            #expect(streamed.response.result == plain.response.result)
            #expect(streamed.output == "one\ntwo\nthree\n[stderr]\nwarning\n[exit code 3]")
            #expect(!streamed.response.replayed)
            // And the journal holds the result once, no output pieces.
            let events = try await server.client.events(session)
            #expect(events.filter { $0.type == "tool.result" }.count == 2)
            #expect(Set(events.map(\.type)).isSubset(of: ["session.created", "task.started", "hands.provisioned", "tool.intent", "tool.result"]), "\(events.map(\.type))")
        }
    }

    @Test("a replay of a completed idempotency key streams only the result")
    func replayStreamsOnlyTheResult() async throws {
        try await StreamingServer.with { server in
            server.driver.release()
            let session = try await server.client.createSession().id
            let first = try await server.client.executeStreaming(
                session: session, tool: "bash", input: input(#"a\n|b\n"#), idempotencyKey: "again", onUpdate: { _ in })
            let updates = Updates()
            let again = try await server.client.executeStreaming(
                session: session, tool: "bash", input: input(#"a\n|b\n"#), idempotencyKey: "again", onUpdate: updates.take)
            #expect(updates.all.isEmpty, "a replay streams no output: \(updates.all)")
            #expect(again.response.replayed)
            #expect(again.response.result == first.response.result)
            #expect(again.response.resultSeq == first.response.resultSeq)
            await server.driver.waitUntilFinished(1)
        }
    }

    @Test("a secret split across pieces is redacted in the stream and in the result")
    func redactsAcrossPieces() async throws {
        try await StreamingServer.with { server in
            server.driver.release()
            let session = try await server.client.createSession().id
            let secret = StreamingServer.secret
            let cut1 = secret.index(secret.startIndex, offsetBy: 5)
            let cut2 = secret.index(secret.startIndex, offsetBy: 12)
            // Split in three pieces on stdout, in two on stderr.
            let command = "token=\(secret[..<cut1])|\(secret[cut1..<cut2])|\(secret[cut2...]) done\\n|!e=\(secret[..<cut2])|!\(secret[cut2...])\\n"
            let updates = Updates()
            let result = try await server.client.executeStreaming(session: session, tool: "bash", input: input(command), onUpdate: updates.take)
            #expect(updates.text("stdout") == "token=[REDACTED:api-token] done\n")
            #expect(updates.text("stderr") == "e=[REDACTED:api-token]\n")
            #expect(!result.output.contains(secret) && result.output.contains("[REDACTED:api-token]"))
        }
    }

    @Test("refusals before anything runs stay plain HTTP errors, not streams")
    func refusalsArePlain() async throws {
        try await StreamingServer.with { server in
            server.driver.release()
            await #expect {
                try await server.client.executeStreaming(session: "no-such-session", tool: "bash", input: input("x"), onUpdate: { _ in })
            } throws: { ($0 as? AgentdClientError)?.status == 404 }
            let session = try await server.client.createSession().id
            let lease = try await server.client.wake(session)
            await #expect {
                try await server.client.executeStreaming(session: session, tool: "bash", input: input("x"), epoch: lease.epoch - 1, onUpdate: { _ in })
            } throws: { ($0 as? AgentdClientError)?.status == 409 }
            await #expect {
                try await server.client.executeStreaming(session: session, tool: "bash", input: Data(#"{"nope": 1}"#.utf8), epoch: lease.epoch, onUpdate: { _ in })
            } throws: { ($0 as? AgentdClientError)?.status == 400 }
        }
    }

    @Test("the stream carries no more than the output limit, and a slow reader gets a dropped note, not unbounded buffering")
    func slowReaderIsBounded() async throws {
        // 8 MiB of output in 64 KiB pieces, under an 8 MiB output limit: the client reads
        // nothing until the command has written everything.
        try await StreamingServer.with(outputLimit: "8MiB") { server in
            server.driver.release()
            let session = try await server.client.createSession().id
            let total = 128 * (64 << 10)
            let updates = Updates()
            let gate = DispatchSemaphore(value: 0)
            let blocked = Atomic<Bool>(false)
            let call = Task {
                try await server.client.executeStreaming(
                    session: session, tool: "bash", input: input("BIG 128 65536"),
                    onUpdate: { update in
                        // The first piece blocks the client's reading until the command ended.
                        if !blocked.exchange(true, ordering: .relaxed) { gate.wait() }
                        updates.take(update)
                    })
            }
            await server.driver.waitUntilFinished(1)
            gate.signal()
            let result = try await call.value
            var streamed = 0
            var dropped = 0
            for update in updates.all {
                switch update {
                case .output(_, let bytes): streamed += bytes.count
                case .dropped(let n, _): dropped += n
                }
            }
            #expect(dropped > 0, "the slow reader was told output was left out")
            #expect(streamed + dropped == total, "every byte is either streamed or counted as dropped")
            #expect(streamed < 4 << 20, "agentd held a bounded amount for the slow reader: \(streamed) bytes streamed of \(total)")
            #expect(result.output.contains("[result cut:"), "the result is there, cut to the session's event limit")
        }
    }
}

@Suite("Streaming pieces: redaction across boundaries, the bounded buffer, UTF-8 kept whole")
struct StreamingPiecesTests {
    @Test("StreamRedactor over every split of a text equals the redactor over the whole")
    func streamRedactorMatchesWhole() throws {
        let redactor = Redactor([try Secret(name: "a", value: "abcdefgh"), try Secret(name: "q", value: "x\"y")])
        let text = Array("1abcdefgh2abcdabcdefgh3 x\"y 4 \"x\\\"y\" abcdefg".utf8)
        let whole = redactor.redact(text)
        for i in 0...text.count {
            for j in i...text.count {
                var stream = StreamRedactor(redactor)
                let out = stream.feed(Array(text[..<i])) + stream.feed(Array(text[i..<j])) + stream.feed(Array(text[j...])) + stream.finish()
                #expect(out == whole, "split at \(i), \(j)")
            }
        }
    }

    @Test("output that cannot begin a secret is let out at once; only a possible secret's start waits")
    func streamRedactorHoldsOnlyPrefixes() throws {
        let redactor = Redactor([try Secret(name: "a", value: "sk-abcdefgh")])
        var stream = StreamRedactor(redactor)
        #expect(stream.feed(Array("1\n".utf8)) == Array("1\n".utf8), "a line with no secret's start is not held")
        #expect(stream.feed(Array("key sk-ab".utf8)) == Array("key ".utf8), "the possible start of the secret waits")
        #expect(stream.feed(Array("cdefgh!".utf8)) == Array("[REDACTED:a]!".utf8))
        #expect(stream.feed(Array("sk".utf8)).isEmpty)
        #expect(stream.finish() == Array("sk".utf8), "the held tail comes out at the end")
    }

    @Test("the output buffer holds at most its capacity with no reader, and says how much it dropped")
    func bufferIsBounded() async {
        let buffer = OutputBuffer(capacity: 1 << 20)
        let piece = [UInt8](repeating: 0x41, count: 64 << 10)
        for _ in 0..<1024 { buffer.push(.stdout, piece) }  // 64 MiB, nobody reading
        let expectedDrop: Int = (64 << 20) - (1 << 20)
        #expect(buffer.figures.peak <= 1 << 20)
        #expect(buffer.figures.dropped == expectedDrop)
        buffer.push(.stderr, [0x42])  // still full: dropped too
        buffer.end()
        let items = await buffer.take()
        #expect(items.count == 17)
        let last: OutputBuffer.Item = .dropped(expectedDrop + 1)
        #expect(items.last == last)
        #expect(await buffer.take().isEmpty, "ended and emptied")
    }

    @Test("a UTF-8 character split between pieces is kept whole")
    func utf8Carry() {
        var carry = UTF8Carry()
        let text = Array("héllo → 😀".utf8)
        var out: [UInt8] = []
        for b in text {
            let piece = carry.feed([b])
            if !piece.isEmpty { #expect(String(validating: piece, as: UTF8.self) != nil) }
            out += piece
        }
        out += carry.finish()
        #expect(out == text)
    }
}

import AgentdAPI
import Foundation
import SessionLog

extension API {
    /// Server-sent events for a live follow: one `id:`/`event:`/`data:` block per journal event,
    /// a comment every 15 s so that a gone client is noticed.
    ///
    /// Nothing is skipped silently. The events are read from the journal only as fast as the
    /// client takes them (the server's writer waits while it is not reading), so a slow reader
    /// lags instead of losing events. One that takes nothing for the server's write timeout gets
    /// an `event: gap` block naming the last seq it was sent and the request that resumes after
    /// it (`?after=N`), and the stream ends.
    static func sse(_ events: EventSequence) -> APIResponse {
        APIResponse(
            status: 200, headers: [("content-type", "text/event-stream"), ("cache-control", "no-cache")],
            body: .stream(ResponseStream { writer in await EventStream.pump(events, to: writer) }))
    }
}

/// The server-sent event encoding of a live follow, and its pump.
enum EventStream {
    /// How often a quiet stream gets a comment line.
    static let heartbeat: Duration = .seconds(15)

    /// Writes `events` to `writer` until they end (the journal closes), the connection closes,
    /// or the client stops reading (then a gap block ends the stream).
    static func pump(_ events: EventSequence, to writer: ResponseStreamWriter) async {
        await withDiscardingTaskGroup { group in
            group.addTask {
                // Heartbeats only probe the connection: a stalled one is left to the event
                // writes, which know where a resume has to start.
                while (try? await Task.sleep(for: heartbeat)) != nil {
                    do { try await writer.write(Array(": keep-alive\n\n".utf8)) } catch { return }
                }
            }
            defer { group.cancelAll() }
            do {
                for try await event in events {
                    do {
                        try await writer.write(block(event))
                    } catch ResponseStreamError.stalled(let bound) {
                        // Events are contiguous from the request's `after`: the one that could
                        // not be written is the first the client lacks.
                        await writer.finish(with: gap(after: event.seq > 0 ? event.seq - 1 : 0, session: event.session, stalledFor: bound))
                        return
                    }
                }
            } catch is ResponseStreamError {
                // The connection is gone: nobody to tell.
            } catch is CancellationError {
            } catch {
                try? await writer.write(Self.error(error))
            }
        }
    }

    /// One event as an SSE block.
    static func block(_ event: Event) -> [UInt8] {
        let data = String(decoding: APIBody.encode(API.info(event)), as: UTF8.self)
        return Array("id: \(event.seq)\nevent: \(event.type)\ndata: \(data)\n\n".utf8)
    }

    /// The block that ends a stream whose reader fell behind: the last seq it was sent and how
    /// to go on from there.
    static func gap(after last: UInt64, session: SessionID, stalledFor bound: Duration) -> [UInt8] {
        let resume = "/v1/sessions/\(session.rawValue)/events?follow=true&after=\(last)"
        let data = StreamGap(
            lastSeq: last, resume: resume,
            message: "the client read nothing for \(bound), so the stream ends here: events after seq \(last) were not sent; GET \(resume) to continue")
        return Array("event: gap\ndata: \(String(decoding: APIBody.encode(data), as: UTF8.self))\n\n".utf8)
    }

    /// The block that ends a stream the journal could not serve (a damaged session).
    static func error(_ error: any Error) -> [UInt8] {
        Array("event: error\ndata: \(String(decoding: APIBody.encode(["message": "\(error)"]), as: UTF8.self))\n\n".utf8)
    }
}

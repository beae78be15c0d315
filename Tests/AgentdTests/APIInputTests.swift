import AgentdAPI
import AgentdClient
import AgentdTestSupport
import Foundation
import JSONValues
import Testing
import TestSupport

/// Requests that used to kill agentd (issue 16, "one request crashes the daemon") and requests
/// it used to take silently the wrong way, against the real agentd binary: each is a 400 that
/// says what was wrong, and agentd is still up afterwards.
@Suite("API input: no request crashes agentd; bad input is a 400 naming the field")
struct APIInputTests {
    /// The answer to a raw request: status and agentd's error message (or the body).
    struct Answer {
        var status: Int
        var message: String
    }

    static func send(_ c: AgentdClient, _ method: String, _ path: String, _ body: String? = nil) async -> Answer {
        do {
            let reply = try await c.call(method, path, body: body.map { Data($0.utf8) }, timeout: .seconds(60))
            return Answer(status: reply.status, message: reply.text)
        } catch let e as AgentdClientError {
            return Answer(status: e.status, message: e.message)
        } catch {
            return Answer(status: -1, message: "\(error)")
        }
    }

    /// agentd answers and its process has not exited.
    static func expectUp(_ agentd: AgentdProcess, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let health = try await agentd.client.health(timeout: .seconds(10))
        #expect(health.status == "ok", sourceLocation: sourceLocation)
    }

    @Test("GET /v1/health?= (an empty query parameter name) is a 400, not a crash")
    func emptyQueryName() async throws {
        try await withAgentd { agentd in
            let answer = await Self.send(agentd.client, "GET", "/v1/health?=")
            #expect(answer.status == 400, "\(answer.message)")
            #expect(answer.message.contains("unknown query parameter"), "\(answer.message)")
            // A name without a value, and a value without a name, parse too.
            #expect(await Self.send(agentd.client, "GET", "/v1/health?&=x&y").status == 400)
            try await Self.expectUp(agentd)
        }
    }

    @Test("execute with an input that is not an object (\"ls\", null, 3, []) is a 400 naming input, not a crash")
    func executeInputFragment() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try await c.createSession().id
            for input in [#""ls""#, "null", "3", "[]"] {
                let answer = await Self.send(c, "POST", "/v1/sessions/\(id)/execute", #"{"tool":"bash","input":\#(input)}"#)
                #expect(answer.status == 400, "input \(input): \(answer.message)")
                #expect(answer.message.contains("\"input\"") && answer.message.contains("JSON object"), "input \(input): \(answer.message)")
            }
            try await Self.expectUp(agentd)
            // Nothing was journaled for the refused calls: only the session's creation.
            #expect(try await c.session(id).lastSeq == 1)
            #expect(try await sandboxes(agentd.instance, session: id) == 0)
        }
    }

    @Test("agentctl checkpoint ID '\"hello\"' stores the string (any JSON value is a state), agentd stays up")
    func checkpointStringState() async throws {
        try await withAgentd { agentd in
            let id = try await agentd.client.createSession().id
            let run = try await runAgentctl(["checkpoint", id, #""hello""#], socket: agentd.socket)
            #expect(run.status == 0, "\(run.stderr)")
            try await Self.expectUp(agentd)
            let snapshot = try await agentd.client.snapshot(id)
            #expect(snapshot.checkpoint?.state == .string("hello"))
            // null is no state: refused with a message, not stored.
            let answer = await Self.send(agentd.client, "POST", "/v1/sessions/\(id)/checkpoint", #"{"state": null}"#)
            #expect(answer.status == 400 && answer.message.contains("\"state\""), "\(answer.message)")
        }
    }

    @Test("events --after 2^64-1 is an empty timeline; after beyond 2^64-1, negative or not a number is a 400")
    func eventsAfterOverflow() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try await c.createSession().id
            let run = try await runAgentctl(["session", "events", id, "--after", "18446744073709551615", "--json"], socket: agentd.socket)
            #expect(run.status == 0, "\(run.stderr)")
            let listed = try APIBody.decodeResponse(EventList.self, from: Array(run.stdout.utf8))
            #expect(listed.events.isEmpty)
            try await Self.expectUp(agentd)
            for after in ["18446744073709551616", "-1", "1.5", "x", ""] {
                let answer = await Self.send(c, "GET", "/v1/sessions/\(id)/events?after=\(after)")
                #expect(answer.status == 400 && answer.message.contains("after"), "after=\(after): \(answer.message)")
            }
            let follow = await Self.send(c, "GET", "/v1/sessions/\(id)/events?follow=yes")
            #expect(follow.status == 400 && follow.message.contains("follow"), "\(follow.message)")
            try await Self.expectUp(agentd)
        }
    }

    @Test("an unknown field ({\"polcy\": …}) is refused with the fields allowed, and no session is made")
    func unknownFieldRefused() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let answer = await Self.send(c, "POST", "/v1/sessions", #"{"polcy": "coding-agent"}"#)
            #expect(answer.status == 400)
            #expect(answer.message.contains("\"polcy\"") && answer.message.contains("\"policy\""), "\(answer.message)")
            #expect(try await c.sessions().isEmpty)
            let id = try await c.createSession().id
            let execute = await Self.send(c, "POST", "/v1/sessions/\(id)/execute", #"{"tool": "bash", "input": {"command": "true"}, "epoc": 1}"#)
            #expect(execute.status == 400 && execute.message.contains("\"epoc\""), "\(execute.message)")
            let wake = await Self.send(c, "POST", "/v1/sessions/\(id)/wake", #"{"force": true}"#)
            #expect(wake.status == 400 && wake.message.contains("\"force\""), "\(wake.message)")
            #expect(try await c.session(id).leaseEpoch == 0)
        }
    }

    @Test("an epoch that is negative, a fraction, 2^64 or a string is a 400 naming epoch and its range")
    func epochRange() async throws {
        try await withAgentd { agentd in
            let c = agentd.client
            let id = try await c.createSession().id
            for epoch in ["-1", "1.5", "18446744073709551616", #""1""#, "true", "1e400"] {
                let answer = await Self.send(c, "POST", "/v1/sessions/\(id)/tasks/main/end", #"{"epoch": \#(epoch)}"#)
                #expect(answer.status == 400, "epoch \(epoch): \(answer.message)")
                #expect(answer.message.contains("epoch"), "epoch \(epoch): \(answer.message)")
            }
            let wrongType = await Self.send(c, "POST", "/v1/sessions", #"{"policy": 7}"#)
            #expect(wrongType.status == 400 && wrongType.message.contains("\"policy\"") && wrongType.message.contains("a string"), "\(wrongType.message)")
            let notJSON = await Self.send(c, "POST", "/v1/sessions", "{\"policy\": \"\u{FFFD}")
            #expect(notJSON.status == 400 && notJSON.message.contains("not valid JSON"), "\(notJSON.message)")
            try await Self.expectUp(agentd)
        }
    }

    @Test("a session id that is not one path segment (%2F, ..) is a 400")
    func pathSegments() async throws {
        try await withAgentd { agentd in
            for path in ["/v1/sessions/a%2Fb", "/v1/sessions/..", "/v1/sessions/%2E%2E/verify", "/v1/sessions/%zz"] {
                let answer = await Self.send(agentd.client, "GET", path)
                #expect(answer.status == 400 || answer.status == 404, "\(path): \(answer.status) \(answer.message)")
                #expect(answer.status != 500)
            }
            let answer = await Self.send(agentd.client, "GET", "/v1/sessions/a%2Fb")
            #expect(answer.status == 400 && answer.message.contains("one path segment"), "\(answer.message)")
            try await Self.expectUp(agentd)
        }
    }
}

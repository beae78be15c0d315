import AgentdAPI
import Console
import Fleet
import Foundation
import Hands
import JSONValues
import Logging
import Policy
import Runtime
import SessionLog

/// A JSON error response: `{"error": {"code": "...", "message": "..."}}`.
enum APIError {
    static func response(_ status: Int, _ code: String, _ message: String) -> APIResponse {
        JSON.ok(ErrorResponse(code: code, message: message), status: status)
    }

    static func response(for error: any Error) -> APIResponse {
        let (status, body) = describe(error)
        var response = JSON.ok(body, status: status)
        response.headers += redirectHeaders(error)
        return response
    }

    /// A call that another node of the fleet serves: 307 with the owner's name and address
    /// (`agentd-node`, `agentd-node-address`; `Location` too when the address is a URL) and how
    /// long to keep retrying when it does not answer (`Retry-After`, the rest of its lease).
    static func redirectHeaders(_ error: any Error) -> [(String, String)] {
        guard let e = error as? RuntimeError, let elsewhere = e.cause as? SessionElsewhere else { return [] }
        var headers = [
            ("agentd-node", elsewhere.owner.name), ("agentd-node-address", elsewhere.owner.address), ("retry-after", "\(elsewhere.retryAfterSeconds)"),
        ]
        if elsewhere.owner.address.hasPrefix("http://") || elsewhere.owner.address.hasPrefix("https://") {
            headers.append(("location", elsewhere.owner.address))
        }
        return headers
    }

    /// The status and body that answer `error`.
    static func describe(_ error: any Error) -> (status: Int, body: ErrorResponse) {
        if let e = error as? RuntimeError { return (e.code.httpStatus, ErrorResponse(code: e.code.rawValue, message: e.message)) }
        if let e = error as? BadRequest { return (400, ErrorResponse(code: "invalid-argument", message: e.message)) }
        if let e = error as? APIRequestError { return (400, ErrorResponse(code: "invalid-argument", message: e.message)) }
        return (500, ErrorResponse(code: "internal", message: "\(error)"))
    }
}

struct BadRequest: Error { let message: String }

/// Typed bodies in and out: requests decode strictly into the AgentdAPI types (or are a 400),
/// answers are encoded from them.
enum JSON {
    static func decode<Body: APIRequestBody>(_ type: Body.Type, _ request: APIRequest) throws -> Body {
        try APIBody.decode(type, from: request.body)
    }

    static func ok(_ value: some Encodable, status: Int = 200) -> APIResponse {
        APIResponse(status: status, headers: [("content-type", "application/json")], body: .bytes(APIBody.encode(value)))
    }
}

/// Path patterns like `v1/sessions/:id/events`.
enum Route {
    /// Every route of the API, for telling 405 (known path, other method) from 404.
    static let patterns = [
        "v1/health", "v1/tools", "metrics", "v1/sessions", "v1/sessions/:id", "v1/sessions/:id/events", "v1/sessions/:id/execute",
        "v1/sessions/:id/wake", "v1/sessions/:id/checkpoint", "v1/sessions/:id/snapshot", "v1/sessions/:id/verify",
        "v1/sessions/:id/tasks/:task/end", "v1/policies", "v1/policies/reload", "v1/pools", "v1/images", "v1/sandboxes",
    ]

    /// The captured `:name` segments (as sent, still percent-encoded) when `parts` match `pattern`, else nil.
    static func match(_ pattern: String, _ parts: [String]) -> [String]? {
        let segments = pattern.split(separator: "/").map(String.init)
        guard segments.count == parts.count else { return nil }
        var captured: [String] = []
        for (segment, part) in zip(segments, parts) {
            if segment.hasPrefix(":") {
                captured.append(part)  // percent-decoded and checked by APIParameters.segment
            } else if segment != part {
                return nil
            }
        }
        return captured
    }

    static func known(_ parts: [String]) -> Bool { patterns.contains { match($0, parts) != nil } }
}

/// The HTTP/JSON API over `Runtime`. Routes are documented in `openapi.yaml` (same folder), bodies are the AgentdAPI types.
public struct API: Sendable {
    public let runtime: Runtime
    public let metrics: Metrics
    let logger: Logger

    public init(runtime: Runtime, metrics: Metrics, logger: Logger) {
        self.runtime = runtime
        self.metrics = metrics
        self.logger = logger
    }

    public func handle(_ request: APIRequest) async -> APIResponse {
        let started = ContinuousClock.now
        let response: APIResponse
        do {
            response = try await route(request)
        } catch {
            response = APIError.response(for: error)
        }
        metrics.observeRequest(seconds: (ContinuousClock.now - started).seconds, status: response.status)
        var metadata: Logger.Metadata = ["method": "\(request.method)", "path": "\(request.path)", "status": "\(response.status)"]
        if let peer = request.peer { metadata["peer"] = "\(peer)" }
        if response.status >= 500 {
            logger.warning("request failed", metadata: metadata)
        } else if request.method != "GET" {
            // Who changed what: every request that changes state, with the caller's pid/uid/gid.
            logger.info("request", metadata: metadata)
        }
        return response
    }

    private func route(_ r: APIRequest) async throws -> APIResponse {
        // The web console's pages: static, served from the binary (see Sources/Console).
        if let page = ConsoleAssets.respond(method: r.method, path: r.path, ifNoneMatch: r.header("if-none-match")) {
            return HTTPServer.response(page)
        }
        let parts = r.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        /// The route's path parameters when `r` is `method pattern`; its query is checked
        /// against `query` (the parameters the route takes).
        func match(_ method: String, _ pattern: String, query: [String] = []) throws -> [String]? {
            guard r.method == method, let captured = Route.match(pattern, parts) else { return nil }
            try APIParameters.check(r.query, allowed: query, route: "\(method) /\(pattern)")
            return captured
        }
        if try match("GET", "v1/health") != nil {
            return JSON.ok(await health())
        }
        if try match("GET", "v1/tools") != nil {
            return JSON.ok(Self.tools)
        }
        if try match("GET", "metrics") != nil {
            return APIResponse(status: 200, headers: [("content-type", "text/plain; version=0.0.4")], body: .bytes(Array(await metrics.exposition(runtime).utf8)))
        }
        if try match("GET", "v1/sessions") != nil {
            return JSON.ok(SessionList(sessions: try await runtime.listSessions().map(Self.info)))
        }
        if try match("POST", "v1/sessions") != nil {
            let body = try JSON.decode(CreateSessionRequest.self, r)
            let summary = try await runtime.createSession(policy: body.policy, id: body.id)
            return JSON.ok(Self.info(summary), status: 201)
        }
        if let p = try match("GET", "v1/sessions/:id") {
            return JSON.ok(Self.info(try await runtime.summary(try Self.session(p))))
        }
        if let p = try match("DELETE", "v1/sessions/:id") {
            let id = try Self.session(p)
            let body = try JSON.decode(DeleteSessionRequest.self, r)
            let seq = try await runtime.deleteSession(id, epoch: body.epoch)
            return JSON.ok(DeleteSessionResponse(session: id, deletedSeq: seq))
        }
        if let p = try match("GET", "v1/sessions/:id/events", query: ["after", "follow"]) {
            let id = try Self.session(p)
            let after = try APIParameters.after(r.query["after"])
            let follow = try APIParameters.follow(r.query["follow"]) || (r.header("accept")?.contains("text/event-stream") ?? false)
            let events = try await runtime.events(id, after: after, follow: follow)
            return follow ? Self.sse(events) : JSON.ok(EventList(events: try await collect(events)))
        }
        if let p = try match("POST", "v1/sessions/:id/execute", query: ["stream"]) {
            let id = try Self.session(p)
            let stream = try APIParameters.flag(r.query["stream"], name: "stream")
            let body = try JSON.decode(ExecuteRequest.self, r)
            let key = try APIParameters.idempotencyKey(body: body.idempotencyKey, header: r.header("idempotency-key"))
            let started = ContinuousClock.now
            // The input is decoded once, here, into the typed call that is journaled and run.
            let call: ToolCall
            do { call = try ToolCall.decode(name: body.tool, input: body.input) } catch let e as HandsError { throw BadRequest(message: e.message) }
            if stream {
                return try await streamingExecute(session: id, task: body.task ?? "main", call: call, epoch: body.epoch, key: key)
            }
            let outcome = try await runtime.execute(session: id, task: body.task ?? "main", call: call, epoch: body.epoch, idempotencyKey: key)
            metrics.observeExecute(seconds: (ContinuousClock.now - started).seconds, isError: outcome.result.isError)
            return Self.executeResponse(outcome)
        }
        if let p = try match("POST", "v1/sessions/:id/wake") {
            let id = try Self.session(p)
            _ = try JSON.decode(EmptyRequest.self, r)
            let lease = try await runtime.wake(id)
            return JSON.ok(WakeResponse(session: lease.session.rawValue, epoch: lease.epoch, seq: lease.seq))
        }
        if let p = try match("POST", "v1/sessions/:id/checkpoint") {
            let id = try Self.session(p)
            let body = try JSON.decode(CheckpointRequest.self, r)
            let seq = try await runtime.checkpoint(id, state: Array(body.state.data), epoch: body.epoch)
            return JSON.ok(CheckpointResponse(seq: seq))
        }
        if let p = try match("GET", "v1/sessions/:id/snapshot") {
            let snapshot = try await runtime.getSession(try Self.session(p))
            let checkpoint = snapshot.checkpoint.map { SnapshotResponse.Checkpoint(seq: $0.seq, epoch: $0.epoch, state: Self.payload($0.state)) }
            return JSON.ok(
                SnapshotResponse(
                    session: snapshot.session.rawValue, leaseEpoch: snapshot.leaseEpoch, lastSeq: snapshot.lastSeq, checkpoint: checkpoint,
                    events: snapshot.events.map(Self.info)))
        }
        if let p = try match("GET", "v1/sessions/:id/verify") {
            let id = try Self.session(p)
            let report = try await runtime.verify(id)
            let broken = report.firstBroken.map { VerifyResponse.BrokenLink(seq: $0.seq, segment: $0.segment, offset: $0.offset, reason: $0.reason) }
            return JSON.ok(
                VerifyResponse(session: id, intact: report.isIntact, verifiedRecords: report.verifiedRecords, lastHash: report.lastHash, firstBroken: broken))
        }
        if let p = try match("POST", "v1/sessions/:id/tasks/:task/end") {
            let id = try Self.session(p)
            let task = try APIParameters.segment(p[1], what: "task")
            let body = try JSON.decode(TaskEndRequest.self, r)
            let had = try await runtime.endTask(id, task: task, epoch: body.epoch)
            return JSON.ok(TaskEndResponse(task: task, releasedSandbox: had))
        }
        if try match("GET", "v1/pools") != nil {
            let pools = await runtime.pools().map { entry in
                PoolList.Pool(
                    policy: entry.policy, target: entry.status.target, ready: entry.status.ready, warming: entry.status.warming,
                    lastError: entry.status.lastError)
            }
            return JSON.ok(PoolList(pools: pools))
        }
        if try match("GET", "v1/sandboxes") != nil {
            return JSON.ok(SandboxList(sandboxes: await runtime.hands.liveSandboxes().map(Self.info)))
        }
        if try match("POST", "v1/images", query: ["name"]) != nil {
            guard let file = r.bodyFile, let name = r.query["name"] else {
                throw BadRequest(message: "POST /v1/images takes the tarball as the body and ?name=REPOSITORY[:TAG]")
            }
            let image = try await runtime.importImage(tarball: file, name: name)
            return JSON.ok(ImageResponse(name: image.name, id: image.id, size: image.sizeBytes), status: 201)
        }
        if try match("GET", "v1/policies") != nil {
            return JSON.ok(await policyList())
        }
        if try match("POST", "v1/policies/reload") != nil {
            _ = try JSON.decode(EmptyRequest.self, r)
            let outcome = await runtime.policies.reload()
            var out = await policyList()
            out.outcome = "\(outcome)"
            return JSON.ok(out)
        }
        if Route.known(parts) {
            return APIError.response(405, "method-not-allowed", "\(r.method) is not allowed on \(r.path)")
        }
        return APIError.response(404, "no-route", "no route \(r.method) \(r.path); see GET /v1/health and the OpenAPI document")
    }

    /// The session id of a route's path parameters, checked to be one path segment.
    private static func session(_ parameters: [String]) throws -> String {
        try APIParameters.segment(parameters.first ?? "", what: "session id")
    }

    // MARK: - uploads

    /// The largest image upload agentd stores.
    public static let maxUploadBytes: Int64 = 16 << 30

    /// How the server spools image uploads: into `directory`, checked before the body comes
    /// (a name the engine would refuse, no size given, not enough room on the disk).
    public static func uploadSpool(directory: String) -> HTTPServer.Spool {
        HTTPServer.Spool(
            directory: directory, maxBytes: maxUploadBytes, matches: { method, path in method == "POST" && path == "/v1/images" },
            preflight: { request in
                guard let name = request.query["name"] else {
                    return APIError.response(400, "invalid-argument", "POST /v1/images needs ?name=REPOSITORY[:TAG], e.g. ?name=tools:1.0")
                }
                do { _ = try ImageName.parse(name) } catch let e as HandsError { return APIError.response(400, "invalid-argument", e.message) } catch {}
                guard let length = request.header("content-length").flatMap({ Int64($0) }) else {
                    return APIError.response(411, "length-required", "an image upload needs Content-Length (send the tarball as a file)")
                }
                guard length <= maxUploadBytes else {
                    return APIError.response(413, "too-large", "the upload is \(length) bytes; agentd takes images up to \(maxUploadBytes) bytes")
                }
                var fs = statvfs()
                if statvfs(directory, &fs) == 0 {
                    let free = Int64(fs.f_bavail) * Int64(fs.f_frsize)
                    // Keep room for the journal: never fill the disk with an upload.
                    let reserve: Int64 = 256 << 20
                    if length + reserve > free {
                        return APIError.response(
                            507, "storage",
                            "not enough room to store a \(length)-byte upload in \(directory) (\(free) bytes free, \(reserve) kept for the journal)")
                    }
                }
                return nil
            })
    }

    private func health() async -> HealthResponse {
        let policies = runtime.policies
        // One read of the store, timed: how many sessions it holds.
        let started = ContinuousClock.now
        let count: Result<Int, any Error>
        do { count = .success(try await runtime.store.sessions().count) } catch { count = .failure(error) }
        let latency = (ContinuousClock.now - started).seconds * 1000
        var storeError: String?
        if case .failure(let error) = count { storeError = "\(error)" }
        var nodes: [HealthResponse.Node]?
        if let fleet = runtime.fleet {
            nodes = await fleet.currentNodes().map {
                HealthResponse.Node(
                    name: $0.name, address: $0.address, live: $0.live, sinceHeartbeatSeconds: $0.sinceHeartbeat, missedHeartbeats: $0.missedHeartbeats,
                    this: $0.name == fleet.name)
            }
        }
        return HealthResponse(
            status: storeError == nil ? "ok" : "degraded", sessions: (try? count.get()) ?? 0,
            sandboxes: .init(live: await runtime.hands.liveCount, pooled: await runtime.hands.pooledCount),
            policies: .init(loaded: await policies.current.names, errors: await policies.lastErrors.map(\.description)),
            store: .init(kind: runtime.storeKind, ok: storeError == nil, latencyMs: latency, error: storeError), nodes: nodes)
    }

    private func policyList() async -> PolicyList {
        let store = runtime.policies
        let set = await store.current
        let policies = set.names.map { name in
            let p = set.policy(named: name)
            return PolicyList.Policy(
                name: name, sha256: p?.sha256 ?? "", file: p?.sourcePath ?? "", driver: p?.hands.driver.rawValue ?? "",
                commandTimeoutSeconds: p?.hands.commandTimeoutSeconds,
                brain: .init(retries: p?.brain.retries ?? 0, backoffSeconds: p?.brain.backoffSeconds ?? 0))
        }
        return PolicyList(policies: policies, generation: await store.generation, errors: await store.lastErrors.map(\.description))
    }

    /// `GET /v1/tools`: built once from the Hands' catalog (server data, not request data).
    static let tools = ToolList(
        tools: ToolCall.catalog.map { spec in
            ToolList.Tool(name: spec.name, description: spec.description, inputSchema: (try? JSONValue(foundationObject: spec.inputSchema)) ?? .object([:]))
        })

    private func collect(_ events: EventSequence) async throws -> [EventInfo] {
        var out: [EventInfo] = []
        do {
            for try await event in events { out.append(Self.info(event)) }
        } catch let e as SessionLogError {
            throw RuntimeError(.storage, e.message)
        }
        return out
    }

    static func info(_ s: SessionSummary) -> SessionInfo {
        SessionInfo(
            id: s.id, policy: s.policy, lastSeq: s.last_seq, leaseEpoch: s.lease_epoch, liveTasks: s.live_tasks, deleted: s.deleted, damage: s.damage)
    }

    static func info(_ s: HandsManager.LiveSandbox) -> SandboxList.Sandbox {
        SandboxList.Sandbox(
            session: s.key.session, task: s.key.task, id: s.sandbox.id, driver: s.sandbox.spec.driver, image: s.sandbox.spec.image,
            inFlight: s.inFlight, idleSeconds: s.idle.seconds)
    }

    static func info(_ e: Event) -> EventInfo {
        EventInfo(seq: e.seq, epoch: e.epoch, time: ISO8601DateFormatter.fractional.string(from: e.timestamp), type: e.type, payload: payload(e.payload))
    }

    /// A payload as JSON when it is JSON, else as a string.
    static func payload(_ bytes: [UInt8]) -> JSONValue {
        (try? JSONValue(data: Data(bytes))) ?? .string(String(decoding: bytes, as: UTF8.self))
    }
}

extension ISO8601DateFormatter {
    nonisolated(unsafe) static let fractional: ISO8601DateFormatter = {
        // Invariant: configured once here and only read afterwards (formatting is thread-safe).
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f
    }()
}


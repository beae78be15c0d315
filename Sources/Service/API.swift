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
        let body: [String: Any] = ["error": ["code": code, "message": message]]
        return APIResponse(status: status, headers: [("content-type", "application/json")], body: .bytes(JSON.bytes(body)))
    }

    static func response(for error: any Error) -> APIResponse {
        if let e = error as? RuntimeError {
            let status: Int =
                switch e.code {
                case .notFound: 404
                case .invalidArgument: 400
                case .staleLease: 409
                case .tooLarge: 413
                case .unavailable: 503
                default: 507
                }
            return response(status, e.code.rawValue, e.message)
        }
        if let e = error as? BadRequest { return response(400, "invalid-argument", e.message) }
        return response(500, "internal", "\(error)")
    }
}

struct BadRequest: Error { let message: String }

/// JSON helpers for the API (Foundation's JSONSerialization: payloads are free-form).
enum JSON {
    static func bytes(_ object: Any) -> [UInt8] {
        Array((try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8))
    }

    static func object(_ body: [UInt8]) throws -> [String: Any] {
        if body.isEmpty { return [:] }
        let value: Any
        do {
            value = try JSONSerialization.jsonObject(with: Data(body), options: [.fragmentsAllowed])
        } catch {
            throw BadRequest(message: "the request body is not valid JSON: \(error.localizedDescription)")
        }
        guard let object = value as? [String: Any] else { throw BadRequest(message: "the request body must be a JSON object") }
        return object
    }

    static func ok(_ object: Any, status: Int = 200) -> APIResponse {
        APIResponse(status: status, headers: [("content-type", "application/json")], body: .bytes(bytes(object)))
    }
}

/// Path patterns like `v1/sessions/:id/events`.
enum Route {
    /// Every route of the API, for telling 405 (known path, other method) from 404.
    static let patterns = [
        "v1/health", "v1/tools", "metrics", "v1/sessions", "v1/sessions/:id", "v1/sessions/:id/events", "v1/sessions/:id/execute",
        "v1/sessions/:id/wake", "v1/sessions/:id/checkpoint", "v1/sessions/:id/snapshot", "v1/sessions/:id/verify",
        "v1/sessions/:id/tasks/:task/end", "v1/policies", "v1/policies/reload", "v1/pools", "v1/images",
    ]

    /// The captured `:name` segments when `parts` match `pattern`, else nil.
    static func match(_ pattern: String, _ parts: [String]) -> [String]? {
        let segments = pattern.split(separator: "/").map(String.init)
        guard segments.count == parts.count else { return nil }
        var captured: [String] = []
        for (segment, part) in zip(segments, parts) {
            if segment.hasPrefix(":") {
                captured.append(part.removingPercentEncoding ?? part)
            } else if segment != part {
                return nil
            }
        }
        return captured
    }

    static func known(_ parts: [String]) -> Bool { patterns.contains { match($0, parts) != nil } }
}

/// The HTTP/JSON API over `Runtime`. Routes are documented in `openapi.json` (same folder).
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
        let parts = r.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        func match(_ method: String, _ pattern: String) -> [String]? {
            guard r.method == method else { return nil }
            return Route.match(pattern, parts)
        }
        if match("GET", "v1/health") != nil {
            return JSON.ok(await health())
        }
        if match("GET", "v1/tools") != nil {
            return JSON.ok(["tools": ToolCall.catalog.map { ["name": $0.name, "description": $0.description, "input_schema": $0.inputSchema] }])
        }
        if match("GET", "metrics") != nil {
            return APIResponse(status: 200, headers: [("content-type", "text/plain; version=0.0.4")], body: .bytes(Array(await metrics.exposition(runtime).utf8)))
        }
        if match("GET", "v1/sessions") != nil {
            return JSON.ok(["sessions": try await runtime.listSessions().map(Self.json)])
        }
        if match("POST", "v1/sessions") != nil {
            let body = try JSON.object(r.body)
            let summary = try await runtime.createSession(policy: try string(body, "policy"), id: try string(body, "id"))
            return JSON.ok(Self.json(summary), status: 201)
        }
        if let p = match("GET", "v1/sessions/:id") {
            let id = p[0]
            return JSON.ok(Self.json(try await runtime.summary(id)))
        }
        if let p = match("GET", "v1/sessions/:id/events") {
            let id = p[0]
            let after = try uint(r.query["after"], "after") ?? 0
            let follow = r.query["follow"] == "true" || r.query["follow"] == "1" || (r.header("accept")?.contains("text/event-stream") ?? false)
            let events = try await runtime.events(id, after: after, follow: follow)
            return follow ? Self.sse(events) : JSON.ok(["events": try await collect(events)])
        }
        if let p = match("POST", "v1/sessions/:id/execute") {
            let id = p[0]
            let body = try JSON.object(r.body)
            guard let tool = try string(body, "tool") else { throw BadRequest(message: "execute needs \"tool\" (one of bash, read_file, write_file, list_files)") }
            let input = body["input"].map { JSON.bytes($0) } ?? Array("{}".utf8)
            let key = try string(body, "idempotency_key") ?? r.header("idempotency-key")
            let started = ContinuousClock.now
            let outcome = try await runtime.execute(
                session: id, task: try string(body, "task") ?? "main", tool: tool, input: input, epoch: try uint(body["epoch"], "epoch"),
                idempotencyKey: key)
            metrics.observeExecute(seconds: (ContinuousClock.now - started).seconds, isError: outcome.result.isError)
            var result: [String: Any] = ["output": outcome.result.output, "is_error": outcome.result.isError]
            if let code = outcome.result.exitCode { result["exit_code"] = code }
            return JSON.ok(["result": result, "intent_seq": outcome.intent_seq, "result_seq": outcome.result_seq, "replayed": outcome.replayed])
        }
        if let p = match("POST", "v1/sessions/:id/wake") {
            let id = p[0]
            let lease = try await runtime.wake(id)
            return JSON.ok(["session": lease.session.rawValue, "epoch": lease.epoch, "seq": lease.seq])
        }
        if let p = match("POST", "v1/sessions/:id/checkpoint") {
            let id = p[0]
            let body = try JSON.object(r.body)
            guard let state = body["state"] else { throw BadRequest(message: "checkpoint needs \"state\" (any JSON value)") }
            let seq = try await runtime.checkpoint(id, state: JSON.bytes(state), epoch: try uint(body["epoch"], "epoch"))
            return JSON.ok(["seq": seq])
        }
        if let p = match("GET", "v1/sessions/:id/snapshot") {
            let id = p[0]
            let snapshot = try await runtime.getSession(id)
            var out: [String: Any] = [
                "session": snapshot.session.rawValue, "lease_epoch": snapshot.leaseEpoch, "last_seq": snapshot.lastSeq,
                "events": snapshot.events.map(Self.json),
            ]
            if let c = snapshot.checkpoint {
                out["checkpoint"] = ["seq": c.seq, "epoch": c.epoch, "state": Self.payload(c.state)]
            } else {
                out["checkpoint"] = NSNull()
            }
            return JSON.ok(out)
        }
        if let p = match("GET", "v1/sessions/:id/verify") {
            let id = p[0]
            let report = try await runtime.verify(id)
            var out: [String: Any] = ["session": id, "intact": report.isIntact, "verified_records": report.verifiedRecords, "last_hash": report.lastHash]
            if let b = report.firstBroken {
                out["first_broken"] = ["seq": b.seq, "segment": b.segment, "offset": b.offset, "reason": b.reason]
            } else {
                out["first_broken"] = NSNull()
            }
            return JSON.ok(out)
        }
        if let p = match("POST", "v1/sessions/:id/tasks/:task/end") {
            let id = p[0], task = p[1]
            let body = try JSON.object(r.body)
            let had = try await runtime.endTask(id, task: task, epoch: try uint(body["epoch"], "epoch"))
            return JSON.ok(["task": task, "released_sandbox": had])
        }
        if match("GET", "v1/pools") != nil {
            let pools = await runtime.pools().map { entry -> [String: Any] in
                [
                    "policy": entry.policy, "target": entry.status.target, "ready": entry.status.ready, "warming": entry.status.warming,
                    "last_error": entry.status.lastError ?? NSNull(),
                ]
            }
            return JSON.ok(["pools": pools])
        }
        if match("POST", "v1/images") != nil {
            guard let file = r.bodyFile, let name = r.query["name"] else {
                throw BadRequest(message: "POST /v1/images takes the tarball as the body and ?name=REPOSITORY[:TAG]")
            }
            let image = try await runtime.importImage(tarball: file, name: name)
            return JSON.ok(["name": image.name, "id": image.id, "size": image.sizeBytes], status: 201)
        }
        if match("GET", "v1/policies") != nil {
            return JSON.ok(await policiesJSON())
        }
        if match("POST", "v1/policies/reload") != nil {
            let outcome = await runtime.policies.reload()
            var out = await policiesJSON()
            out["outcome"] = "\(outcome)"
            return JSON.ok(out)
        }
        if Route.known(parts) {
            return APIError.response(405, "method-not-allowed", "\(r.method) is not allowed on \(r.path)")
        }
        return APIError.response(404, "no-route", "no route \(r.method) \(r.path); see GET /v1/health and the OpenAPI document")
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

    private func health() async -> [String: Any] {
        let policies = runtime.policies
        return [
            "status": "ok",
            "sessions": runtime.store.sessions().count,
            "sandboxes": ["live": await runtime.hands.liveCount, "pooled": await runtime.hands.pooledCount],
            "policies": ["loaded": await policies.current.names, "errors": await policies.lastErrors.map(\.description)],
        ]
    }

    private func policiesJSON() async -> [String: Any] {
        let store = runtime.policies
        let set = await store.current
        return [
            "policies": set.names.map { name -> [String: Any] in
                let p = set.policy(named: name)
                return [
                    "name": name, "sha256": p?.sha256 ?? "", "file": p?.sourcePath ?? "", "driver": p?.hands.driver.rawValue ?? "",
                    "brain": ["retries": p?.brain.retries ?? 0, "backoff_s": p?.brain.backoffSeconds ?? 0],
                ]
            },
            "generation": await store.generation,
            "errors": await store.lastErrors.map(\.description),
        ]
    }

    private func collect(_ events: EventSequence) async throws -> [[String: Any]] {
        var out: [[String: Any]] = []
        do {
            for try await event in events { out.append(Self.json(event)) }
        } catch let e as SessionLogError {
            throw RuntimeError(.storage, e.message)
        }
        return out
    }

    static func json(_ s: SessionSummary) -> [String: Any] {
        ["id": s.id, "policy": s.policy, "last_seq": s.last_seq, "lease_epoch": s.lease_epoch, "live_tasks": s.live_tasks]
    }

    static func json(_ e: Event) -> [String: Any] {
        ["seq": e.seq, "epoch": e.epoch, "time": ISO8601DateFormatter.fractional.string(from: e.timestamp), "type": e.type, "payload": payload(e.payload)]
    }

    /// A payload as JSON when it is JSON, else as a string.
    static func payload(_ bytes: [UInt8]) -> Any {
        (try? JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed])) ?? String(decoding: bytes, as: UTF8.self)
    }

    private func string(_ body: [String: Any], _ key: String) throws -> String? {
        guard let v = body[key], !(v is NSNull) else { return nil }
        guard let s = v as? String else { throw BadRequest(message: "\"\(key)\" must be a string") }
        return s
    }

    private func uint(_ value: Any?, _ key: String) throws -> UInt64? {
        guard let value, !(value is NSNull) else { return nil }
        if let s = value as? String {
            guard let n = UInt64(s) else { throw BadRequest(message: "\"\(key)\" must be a non-negative integer, not '\(s)'") }
            return n
        }
        guard let n = value as? NSNumber, !isJSONBoolean(value), n.doubleValue >= 0, n.doubleValue == n.doubleValue.rounded() else {
            throw BadRequest(message: "\"\(key)\" must be a non-negative integer")
        }
        return n.uint64Value
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

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}


import AgentdAPI
import Foundation
import JSONValues
import TestSupport

/// One request the fuzzer sends: its bytes, what kind of mutation made it, and a preview.
struct FuzzRequest {
    var kind: String
    var bytes: [UInt8]
    var preview: String { String(decoding: bytes.prefix(400), as: UTF8.self) }

    /// A well-framed request: Content-Length always matches the body, and the connection
    /// closes after the answer.
    static func raw(_ method: String, _ target: String, headers: [(String, String)] = [], body: [UInt8] = []) -> [UInt8] {
        var text = "\(method) \(target) HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n"
        for (name, value) in headers { text += "\(name): \(value)\r\n" }
        if !body.isEmpty || method == "POST" || method == "PUT" || method == "PATCH" {
            text += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n"
        }
        text += "\r\n"
        return Array(text.utf8) + body
    }

    /// Makes requests from the API's own routes and body shapes, then mutates them.
    struct Generator {
        var random: SeededGenerator
        let sessions: [String]

        init(seed: UInt64, sessions: [String]) {
            random = SeededGenerator(seed: seed)
            self.sessions = sessions
        }

        /// A route: method, path template and a valid body for it.
        typealias Route = (method: String, path: String, body: () -> JSONValue?)

        mutating func pick<T>(_ items: [T]) -> T { items[Int(random.next() % UInt64(items.count))] }
        mutating func chance(_ percent: UInt64) -> Bool { random.next() % 100 < percent }

        var routes: [Route] {
            [
                ("GET", "/v1/health", { nil }), ("GET", "/v1/tools", { nil }), ("GET", "/metrics", { nil }),
                ("GET", "/v1/sessions", { nil }), ("POST", "/v1/sessions", { .object(["policy": .string("default")]) }),
                ("GET", "/v1/sessions/{id}", { nil }), ("GET", "/v1/sessions/{id}/events", { nil }),
                (
                    "POST", "/v1/sessions/{id}/execute",
                    {
                        .object([
                            "tool": .string("bash"), "input": .object(["command": .string("echo hi"), "timeout_s": .number(5)]),
                            "task": .string("main"), "idempotency_key": .string("k1"),
                        ])
                    }
                ),
                ("POST", "/v1/sessions/{id}/execute", { .object(["tool": .string("write_file"), "input": .object(["path": .string("a.txt"), "content": .string("x")])]) }),
                ("POST", "/v1/sessions/{id}/execute", { .object(["tool": .string("read_file"), "input": .object(["path": .string("a.txt")])]) }),
                ("POST", "/v1/sessions/{id}/execute", { .object(["tool": .string("list_files")]) }),
                ("POST", "/v1/sessions/{id}/wake", { .object([:]) }),
                ("POST", "/v1/sessions/{id}/checkpoint", { .object(["state": .object(["step": .number(3), "notes": .array([.string("a")])])]) }),
                ("GET", "/v1/sessions/{id}/snapshot", { nil }), ("GET", "/v1/sessions/{id}/verify", { nil }),
                ("POST", "/v1/sessions/{id}/tasks/{task}/end", { .object(["epoch": .number(0)]) }),
                ("GET", "/v1/policies", { nil }), ("POST", "/v1/policies/reload", { .object([:]) }), ("GET", "/v1/pools", { nil }),
                // Not POST /v1/images: with no container engine behind the fuzzer's Runtime, a
                // well-formed upload is rightly a 503.
            ]
        }

        static let strangeNumbers = [
            "-1", "1.5", "18446744073709551615", "18446744073709551616", "1e999", "-0", "99999999999999999999999999999", "1e-400",
            "0x10", "NaN", "Infinity", "01",
        ]
        /// Path segments as sent (already percent-encoded, or not on purpose).
        static let strangeSegments = ["", "..", ".", "a%2Fb", "%2F", "%zz", "%", "%00", "%E2%80%AEx", String(repeating: "a", count: 300), "%E9%BB%98", "null", "a b", "é"]
        static let invalidUTF8: [[UInt8]] = [[0xFF], [0xC3, 0x28], [0xED, 0xA0, 0x80], [0xF8, 0x88, 0x80, 0x80, 0x80], [0xC0, 0xAF]]

        mutating func next() -> FuzzRequest {
            switch random.next() % 20 {
            case 0: return garbage()
            case 1, 2: return strangeTarget()
            default: return mutated()
            }
        }

        /// Bytes that are not HTTP at all (an invalid method character first, so that the
        /// parser fails at once instead of waiting for more).
        mutating func garbage() -> FuzzRequest {
            var bytes: [UInt8] = [pick([0x01, 0x40, 0x7F, 0x20])]
            for _ in 0..<Int(random.next() % 200) { bytes.append(UInt8(truncatingIfNeeded: random.next())) }
            return FuzzRequest(kind: "garbage", bytes: bytes + Array("\r\n\r\n".utf8))
        }

        /// A known route under an odd method, or an odd path and query.
        mutating func strangeTarget() -> FuzzRequest {
            let route = pick(routes)
            let method = pick(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW", "get"])
            var path = fill(route.path)
            switch random.next() % 6 {
            case 0: path += "/"
            case 1: path = path.replacingOccurrences(of: "/v1/", with: "//v1//")
            case 2: path += "/" + pick(Self.strangeSegments)
            case 3: path = "/" + String(repeating: "x/", count: Int(random.next() % 50))
            case 4: path = "*"
            default: break
            }
            return FuzzRequest(kind: "target", bytes: FuzzRequest.raw(method, path + query(), body: route.body().map { Array($0.data) } ?? []))
        }

        /// A route's valid request with its body, query or headers mutated.
        mutating func mutated() -> FuzzRequest {
            let route = pick(routes)
            let path = fill(route.path) + (chance(50) ? query() : "")
            var kind = "valid"
            var body: [UInt8] = route.body().map { Array($0.data) } ?? []
            if chance(70) {
                (kind, body) = mutateBody(route.body() ?? .object([:]))
            }
            var headers: [(String, String)] = []
            if chance(20) { headers.append(("Idempotency-Key", pick(["k1", "", String(repeating: "k", count: 300), "ключ"]))) }
            if chance(10) { headers.append(("X-\(random.next() % 1000)", pick(["", "a", String(repeating: "v", count: 2000)]))) }
            if chance(5) { headers.append(("Accept", "application/json, text/event-stream")) }
            return FuzzRequest(kind: kind, bytes: FuzzRequest.raw(route.method, path, headers: headers, body: body))
        }

        mutating func fill(_ template: String) -> String {
            var path = template
            let id = chance(70) ? pick(sessions) : pick(Self.strangeSegments)
            path = path.replacingOccurrences(of: "{id}", with: id)
            path = path.replacingOccurrences(of: "{task}", with: chance(80) ? "main" : pick(["%2F", "..", "t%00", "a.b", String(repeating: "t", count: 70)]))
            return path
        }

        mutating func query() -> String {
            let pairs = [
                "=", "&", "after=" + pick(Self.strangeNumbers + ["0", "1", "2"]), "follow=" + pick(["true", "false", "1", "0", "yes", ""]),
                "after", "follow", "%=%", "a=b=c", "name=" + pick(["x", "a:b", "%zz", ""]), "+=+", "after=%FF", "&&&",
            ]
            var parts: [String] = []
            for _ in 0..<Int(1 + random.next() % 3) { parts.append(pick(pairs)) }
            // follow=true on a live session streams until the client goes: keep it off the
            // list of what is read to the end (the reader stops at an event stream's head).
            return "?" + parts.joined(separator: "&")
        }

        /// A body built from `valid` with one mutation, as bytes.
        mutating func mutateBody(_ valid: JSONValue) -> (String, [UInt8]) {
            guard case .object(var object) = valid else { return ("as-is", Array(valid.data)) }
            let keys = object.keys.sorted()
            switch random.next() % 12 {
            case 0:
                if let key = keys.isEmpty ? nil : pick(keys) { object[key] = nil }
                return ("drop-field", Array(JSONValue.object(object).data))
            case 1:
                object[pick(["polcy", "epoc", "extra", "", "tool ", "Tool"])] = .string("x")
                return ("unknown-field", Array(JSONValue.object(object).data))
            case 2:
                let key = keys.isEmpty ? "epoch" : pick(keys)
                object[key] = pick([.null, .bool(true), .number(-1), .number(1.5), .string("s"), .array([]), .object([:])])
                return ("wrong-type", Array(JSONValue.object(object).data))
            case 3:
                let key = pick(keys + ["epoch", "epoch"])
                object[key] = .string("__NUMBER__")
                let text = String(decoding: JSONValue.object(object).data, as: UTF8.self)
                    .replacingOccurrences(of: "\"__NUMBER__\"", with: pick(Self.strangeNumbers))
                return ("number", Array(text.utf8))
            case 4:
                return ("fragment", Array(pick([#""hello""#, "null", "3", "[]", "true", "[{}]", #"{"#, "}", ""]).utf8))
            case 5:
                let depth = Int(1 + random.next() % 3000)
                let open = pick(["[", #"{"a":"#])
                let close = open == "[" ? "]" : "}"
                let key = pick(["state", "input", "tool", "policy"])
                return ("deep", Array(("{\"\(key)\":" + String(repeating: open, count: depth) + "1" + String(repeating: close, count: depth) + "}").utf8))
            case 6:
                var bytes = Array(JSONValue.object(object).data)
                let cut = bytes.isEmpty ? 0 : Int(random.next() % UInt64(bytes.count))
                bytes.insert(contentsOf: pick(Self.invalidUTF8), at: cut)
                return ("invalid-utf8", bytes)
            case 7:
                if let quote = Array(JSONValue.object(object).data).lastIndex(of: 0x22) {
                    var bytes = Array(JSONValue.object(object).data)
                    bytes.insert(contentsOf: pick(Self.invalidUTF8), at: quote)
                    return ("invalid-utf8-in-string", bytes)
                }
                return ("as-is", Array(JSONValue.object(object).data))
            case 8:
                let bytes = Array(JSONValue.object(object).data)
                return ("truncated", Array(bytes.prefix(Int(random.next() % UInt64(bytes.count + 1)))))
            case 9:
                let key = keys.first ?? "tool"
                return ("duplicate-key", Array("{\"\(key)\": 1, \"\(key)\": \"x\"}".utf8))
            case 10:
                if object["input"] != nil {
                    object["input"] = pick([.string("ls"), .null, .number(3), .array([]), .object(["command": .number(1)]), .object(["nope": .bool(true)])])
                } else if object["state"] != nil {
                    object["state"] = pick([.string("hello"), .null, .number(1e300), .array([.null])])
                } else {
                    object["state"] = .null
                }
                return ("input-or-state", Array(JSONValue.object(object).data))
            default:
                var bytes: [UInt8] = []
                for _ in 0..<Int(random.next() % 64) { bytes.append(UInt8(truncatingIfNeeded: random.next())) }
                return ("random-bytes", bytes)
            }
        }
    }
}

import AgentdAPI
import Foundation
import JSONValues

/// Renders journal events as a readable timeline, one line per event.
public enum Timeline {
    /// `  #12  23:13:02.180  tool.intent        bash  echo hi`
    public static func line(_ event: EventInfo) -> String {
        let time = event.time.count > 11 ? String(event.time.dropFirst(11).prefix(12)) : event.time
        let seqText = "#\(event.seq)".padding(toLength: 6, withPad: " ", startingAt: 0)
        let typeText = event.type.padding(toLength: 18, withPad: " ", startingAt: 0)
        let epochText = event.epoch > 0 ? " [epoch \(event.epoch)]" : ""
        return "  \(seqText) \(time)  \(typeText) \(summary(event.type, event.payload))\(epochText)"
    }

    static func summary(_ type: String, _ p: JSONValue) -> String {
        func s(_ k: String) -> String { p[k].map(text) ?? "" }
        func short(_ text: String, _ n: Int = 70) -> String {
            let one = text.replacingOccurrences(of: "\n", with: "⏎")
            return one.count > n ? String(one.prefix(n)) + "…" : one
        }
        switch type {
        case "session.created": return "policy \(s("policy")) (sha256 \(s("policy_sha256").prefix(12)))"
        case "task.started": return "task \(s("task")) on \(s("driver")) Hands, policy \(s("policy"))"
        case "tool.intent":
            let detail = p["input"]?["command"]?.stringValue ?? p["input"]?["path"]?.stringValue ?? ""
            return "\(s("task")): \(s("tool")) \(short(detail))"
        case "tool.result":
            let mark = p["is_error"] == .bool(true) ? "ERROR" : "ok"
            return "\(s("task")): \(s("tool")) \(mark) in \(s("duration_ms")) ms → \(short(s("output")))"
        case "tool.interrupted": return "\(s("task")): intent #\(s("intent_seq")) interrupted (\(s("reason")))"
        case "hands.provisioned":
            return "\(s("task")): sandbox \(s("sandbox").prefix(12)) ready in \(s("milliseconds")) ms\(p["from_pool"] == .bool(true) ? " (warm pool)" : "")"
        case "hands.released": return "\(s("task")): sandbox \(s("sandbox").prefix(12)) released (\(s("reason")))"
        case "hands.adopted": return "\(s("task")): sandbox \(s("sandbox").prefix(12)) adopted (\(s("reason")))"
        case "hands.failed": return "\(s("task")): sandbox \(s("sandbox").prefix(12)) failed: \(s("kind")) — \(short(s("message")))"
        case "egress.allowed", "egress.denied":
            let target = p["route"].map { "route \(text($0))\(s("path"))" } ?? s("host")
            let via = p["credential"].map { " with \(text($0))" } ?? ""
            let bytes = type == "egress.allowed" ? ", \(s("bytes_up")) B up, \(s("bytes_down")) B down" : ""
            let intent = p["intent_seq"].map { " (intent #\(text($0)))" } ?? ""
            return "\(s("task")): \(s("method")) \(short(target, 60))\(via) → \(s("status"))\(bytes); \(short(s("rule"), 80))\(intent)"
        case "task.ended": return "task \(s("task")) ended"
        case "agentd.lease": return "wake: a Brain took the session over"
        case "agentd.checkpoint": return "checkpoint stored"
        default: return short(String(decoding: p.data, as: UTF8.self))
        }
    }

    /// A value as text: a string as itself, anything else as JSON.
    static func text(_ value: JSONValue) -> String {
        if case .string(let s) = value { return s }
        return String(decoding: value.data, as: UTF8.self)
    }
}

import Foundation

/// Renders journal events as a readable timeline, one line per event.
public enum Timeline {
    /// `  #12  23:13:02.180  tool.intent        bash  echo hi`
    public static func line(_ event: [String: Any]) -> String {
        let seq = (event["seq"] as? NSNumber)?.intValue ?? 0
        let time = (event["time"] as? String).map { String($0.dropFirst(11).prefix(12)) } ?? ""
        let type = event["type"] as? String ?? "?"
        let epoch = (event["epoch"] as? NSNumber)?.intValue ?? 0
        let payload = event["payload"] as? [String: Any] ?? [:]
        let seqText = "#\(seq)".padding(toLength: 6, withPad: " ", startingAt: 0)
        let typeText = type.padding(toLength: 18, withPad: " ", startingAt: 0)
        let epochText = epoch > 0 ? " [epoch \(epoch)]" : ""
        return "  \(seqText) \(time)  \(typeText) \(summary(type, payload))\(epochText)"
    }

    static func summary(_ type: String, _ p: [String: Any]) -> String {
        func s(_ k: String) -> String { (p[k] as? String) ?? (p[k].map { "\($0)" } ?? "") }
        func short(_ text: String, _ n: Int = 70) -> String {
            let one = text.replacingOccurrences(of: "\n", with: "⏎")
            return one.count > n ? String(one.prefix(n)) + "…" : one
        }
        switch type {
        case "session.created": return "policy \(s("policy")) (sha256 \(s("policy_sha256").prefix(12)))"
        case "task.started": return "task \(s("task")) on \(s("driver")) Hands, policy \(s("policy"))"
        case "tool.intent":
            let input = (p["input"] as? [String: Any]) ?? [:]
            let detail = (input["command"] as? String) ?? (input["path"] as? String) ?? ""
            return "\(s("task")): \(s("tool")) \(short(detail))"
        case "tool.result":
            let mark = (p["is_error"] as? Bool) == true ? "ERROR" : "ok"
            return "\(s("task")): \(s("tool")) \(mark) in \(s("duration_ms")) ms → \(short(s("output")))"
        case "tool.interrupted": return "\(s("task")): intent #\(s("intent_seq")) interrupted (\(s("reason")))"
        case "hands.provisioned": return "\(s("task")): sandbox \(s("sandbox").prefix(12)) ready in \(s("milliseconds")) ms\((p["from_pool"] as? Bool) == true ? " (warm pool)" : "")"
        case "hands.released": return "\(s("task")): sandbox \(s("sandbox").prefix(12)) released (\(s("reason")))"
        case "hands.failed": return "\(s("task")): sandbox \(s("sandbox").prefix(12)) failed: \(s("kind")) — \(short(s("message")))"
        case "task.ended": return "task \(s("task")) ended"
        case "agentd.lease": return "wake: a Brain took the session over"
        case "agentd.checkpoint": return "checkpoint stored"
        default: return short(String(decoding: (try? JSONSerialization.data(withJSONObject: p)) ?? Data(), as: UTF8.self))
        }
    }
}

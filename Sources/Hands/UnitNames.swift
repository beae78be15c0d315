/// Unit names of the unit driver, and the ids inside them.
///
/// A task's sandbox is the slice `agentd-<instance>-<session>-<task>_<random>.slice`. systemd
/// reads the dashes of a slice name as nesting, so that slice sits in the per-session slice
/// `agentd-<instance>-<session>.slice`, itself in `agentd-<instance>.slice` and
/// `agentd.slice` (created implicitly). The sandbox's agent runs as `<sandbox stem>.service`
/// inside the sandbox's slice (`UnitAgentService`). Ids are escaped the way
/// `systemd-escape` does (`\xNN` for everything but ASCII letters and digits), so that a dash
/// or underscore in an id can never be taken for a separator and every name parses back.
/// A pooled sandbox, not yet a task's, is `agentd-<instance>-pool_<random>.slice`.
enum UnitNames {
    static func escape(_ id: String) -> String {
        var out = ""
        for byte in id.utf8 {
            if (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) {
                out.append(Character(UnicodeScalar(byte)))
            } else {
                out += "\\x" + String(byte, radix: 16).leftPadded(to: 2)
            }
        }
        return out
    }

    static func unescape(_ text: String) -> String {
        var bytes: [UInt8] = []
        var utf8 = Array(text.utf8)[...]
        while let b = utf8.first {
            if b == UInt8(ascii: "\\"), utf8.count >= 4, utf8.dropFirst().first == UInt8(ascii: "x"),
                let v = UInt8(String(decoding: utf8.dropFirst(2).prefix(2), as: UTF8.self), radix: 16)
            {
                bytes.append(v)
                utf8 = utf8.dropFirst(4)
            } else {
                bytes.append(b)
                utf8 = utf8.dropFirst()
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func random() -> String { String(UInt32.random(in: 0...UInt32.max), radix: 36) }

    /// The stem (no `.slice`) of a new sandbox slice.
    static func sandboxStem(instance: String, session: String?, task: String?) -> String {
        if let session, let task {
            return "agentd-\(escape(instance))-\(escape(session))-\(escape(task))_\(random())"
        }
        return "agentd-\(escape(instance))-pool_\(random())"
    }

    /// The per-session slice a task's sandbox slice `name` sits in
    /// (`agentd-<instance>-<session>.slice`), or nil for a pooled sandbox or a name not of
    /// `instance`.
    static func sessionSlice(ofSlice name: String, instance: String) -> String? {
        guard let labels = labels(ofSlice: name, instance: instance), labels[SandboxLabel.session] != nil,
            let dash = name.lastIndex(of: "-")
        else { return nil }
        return String(name[..<dash]) + ".slice"
    }

    /// The glob matching every sandbox slice of `instance`.
    static func pattern(instance: String) -> String { "agentd-\(escape(instance))-*.slice" }

    /// The labels a sandbox slice's name carries, or nil when `name` is not a sandbox slice of
    /// `instance` (a per-session slice, another instance's, an agent's service).
    static func labels(ofSlice name: String, instance: String) -> [String: String]? {
        let prefix = "agentd-\(escape(instance))-"
        guard name.hasPrefix(prefix), name.hasSuffix(".slice") else { return nil }
        let rest = name.dropFirst(prefix.count).dropLast(".slice".count)
        let parts = rest.split(separator: "-", omittingEmptySubsequences: false)
        var labels = [SandboxLabel.instance: instance]
        if parts.count == 1, parts[0].hasPrefix("pool_") {
            labels[SandboxLabel.pool] = "warm"
            return labels
        }
        guard parts.count == 2, let underscore = parts[1].lastIndex(of: "_") else { return nil }
        labels[SandboxLabel.session] = unescape(String(parts[0]))
        labels[SandboxLabel.task] = unescape(String(parts[1][..<underscore]))
        return labels
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

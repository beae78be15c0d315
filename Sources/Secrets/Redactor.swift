import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Replaces every occurrence of a known secret value in an event's type and payload with
/// `[REDACTED:name]` before the event is framed, so the secret never reaches the disk.
///
/// Payloads are JSON, and a JSON encoder writes a secret containing `"`, `\`, `/` or a
/// control character escaped (`\"`, `\\`, `\/`, `\n`, `\u001f` …), once inside a string
/// and twice inside a JSON document carried as a string. So each secret is matched as its
/// raw bytes and as every such encoded form. Callers should still redact values before they
/// encode them (`redact(_:)` on the strings): that needs no guessing about the encoder.
///
/// Secrets can be added while the store runs (a policy reload brings a credential); each
/// append sees the secrets known when it started. Longer secrets are replaced first, so a
/// secret that contains another is redacted whole. Adding a secret twice keeps one.
public final class Redactor: Sendable {
    private struct Known: Sendable {
        let secret: Secret
        /// The raw value and its distinct JSON-encoded forms, longest first.
        let forms: [[UInt8]]
        let replacement: [UInt8]
    }

    private let secrets: Mutex<[Known]>

    /// A redactor that knows `secrets`.
    public init(_ secrets: [Secret] = []) {
        self.secrets = Mutex([])
        for s in secrets { add(s) }
    }

    /// Learns another secret (a no-op when this name already has this value).
    public func add(_ secret: Secret) {
        // Longest form first: an escaped form contains the raw value's unescaped parts.
        let forms = Redactor.forms(of: secret.value).sorted { $0.count > $1.count }
        let known = Known(secret: secret, forms: forms, replacement: Array("[REDACTED:\(secret.name)]".utf8))
        secrets.withLock { list in
            guard !list.contains(where: { $0.secret.name == secret.name && $0.secret.value == secret.value }) else { return }
            list.append(known)
            list.sort { $0.secret.value.count > $1.secret.value.count }
        }
    }

    /// Every form of every known secret (for `StreamRedactor`).
    package func allForms() -> [[UInt8]] { secrets.withLock { $0.flatMap(\.forms) } }

    /// The names of the secrets known (never the values).
    public var names: [String] { secrets.withLock { $0.map(\.secret.name) } }

    /// Returns `bytes` with every known secret value, raw or JSON-encoded, replaced by
    /// `[REDACTED:name]`.
    public func redact(_ bytes: [UInt8]) -> [UInt8] {
        let known = secrets.withLock { $0 }
        var out = bytes
        for entry in known {
            for form in entry.forms { out = Redactor.replace(form, with: entry.replacement, in: out) }
        }
        return out
    }

    /// Returns `text` redacted the same way.
    public func redact(_ text: String) -> String {
        let bytes = Array(text.utf8)
        let clean = redact(bytes)
        return clean == bytes ? text : String(decoding: clean, as: UTF8.self)
    }

    /// The raw value and its JSON-escaped forms: with and without `\/`, short escapes (`\n`)
    /// or `\u00XX` for control characters in lower or upper case hex, and each of those
    /// escaped once more (a JSON document inside a JSON string).
    public static func forms(of value: [UInt8]) -> [[UInt8]] {
        var forms: [[UInt8]] = [value]
        func insert(_ form: [UInt8]) { if !forms.contains(form) { forms.append(form) } }
        var once: [[UInt8]] = []
        for slash in [false, true] {
            for short in [true, false] {
                for upper in [false, true] {
                    let e = jsonEscaped(value, escapeSlash: slash, shortForms: short, upperHex: upper)
                    if !once.contains(e) { once.append(e) }
                }
            }
        }
        for e in once {
            insert(e)
            insert(jsonEscaped(e, escapeSlash: false, shortForms: true, upperHex: false))
            insert(jsonEscaped(e, escapeSlash: true, shortForms: true, upperHex: false))
        }
        return forms
    }

    /// `bytes` as they appear inside a JSON string (without the quotes).
    package static func jsonEscaped(_ bytes: [UInt8], escapeSlash: Bool, shortForms: Bool, upperHex: Bool) -> [UInt8] {
        let hex = Array((upperHex ? "0123456789ABCDEF" : "0123456789abcdef").utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + 8)
        for b in bytes {
            switch b {
            case 0x22: out += [0x5C, 0x22]
            case 0x5C: out += [0x5C, 0x5C]
            case 0x2F where escapeSlash: out += [0x5C, 0x2F]
            case 0x0A where shortForms: out += [0x5C, 0x6E]
            case 0x0D where shortForms: out += [0x5C, 0x72]
            case 0x09 where shortForms: out += [0x5C, 0x74]
            case 0x08 where shortForms: out += [0x5C, 0x62]
            case 0x0C where shortForms: out += [0x5C, 0x66]
            case 0x00..<0x20:
                out += [0x5C, 0x75, 0x30, 0x30, hex[Int(b >> 4)], hex[Int(b & 0x0F)]]
            default: out.append(b)
            }
        }
        return out
    }

    package static func replace(_ needle: [UInt8], with replacement: [UInt8], in haystack: [UInt8]) -> [UInt8] {
        let n = needle.count
        guard n > 0, haystack.count >= n else { return haystack }
        let first = needle[0]
        var out: [UInt8] = []
        var copiedUpTo = 0
        var i = 0
        let limit = haystack.count - n
        haystack.withUnsafeBufferPointer { h in
            needle.withUnsafeBufferPointer { nd in
                while i <= limit {
                    if h[i] == first && memcmp(h.baseAddress! + i, nd.baseAddress!, n) == 0 {
                        if out.isEmpty { out.reserveCapacity(haystack.count + replacement.count) }
                        out.append(contentsOf: h[copiedUpTo..<i])
                        out.append(contentsOf: replacement)
                        i += n
                        copiedUpTo = i
                    } else {
                        i += 1
                    }
                }
            }
        }
        if copiedUpTo == 0 { return haystack }
        out.append(contentsOf: haystack[copiedUpTo...])
        return out
    }
}


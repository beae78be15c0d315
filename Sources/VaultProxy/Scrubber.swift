import NIOCore
import SessionLog

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The credentials the proxy holds, and every encoded form in which an upstream might echo
/// one back. Values live only in `Secret`s (whose `description` is redacted) and in the byte
/// patterns below; nothing here is ever printed.
public struct ScrubPatterns: Sendable, CustomStringConvertible {
    struct Pattern: Sendable {
        let bytes: [UInt8]
        let replacement: [UInt8]
    }
    /// Longest first, so a form that contains another is replaced whole.
    let patterns: [Pattern]
    /// For each first byte, the indexes of the patterns starting with it (longest first).
    let byFirstByte: [[Int]]
    /// For each first byte, the longest pattern starting with it (0: none).
    let longestByFirstByte: [Int]

    public var description: String { "ScrubPatterns(\(patterns.count) forms)" }

    public init(_ secrets: [Secret]) {
        var all: [Pattern] = []
        var seen: Set<[UInt8]> = []
        for secret in secrets {
            let replacement = Array("[REDACTED:\(secret.name)]".utf8)
            for form in ScrubPatterns.forms(of: secret.value) where seen.insert(form).inserted {
                all.append(Pattern(bytes: form, replacement: replacement))
            }
        }
        all.sort { $0.bytes.count > $1.bytes.count }
        var index = [[Int]](repeating: [], count: 256)
        var longest = [Int](repeating: 0, count: 256)
        for (i, p) in all.enumerated() {
            let first = Int(p.bytes[0])
            index[first].append(i)
            longest[first] = max(longest[first], p.bytes.count)
        }
        patterns = all
        byFirstByte = index
        longestByFirstByte = longest
    }

    /// The raw value, its JSON-escaped forms (the journal redactor's), its percent-encoded
    /// forms (upper and lower case hex, `+` for space) and its base64 forms (standard and URL
    /// alphabets, at each of the three alignments it can have inside a longer base64 text,
    /// so `Basic base64(user:token)` is caught too).
    static func forms(of value: [UInt8]) -> [[UInt8]] {
        var forms = Redactor.forms(of: value)
        func insert(_ f: [UInt8]) { if !f.isEmpty && !forms.contains(f) { forms.append(f) } }
        for upper in [true, false] {
            for plusForSpace in [false, true] { insert(percentEncoded(value, upperHex: upper, plusForSpace: plusForSpace)) }
        }
        for urlSafe in [false, true] {
            for shift in 0..<3 {
                let form = base64Fragment(value, shift: shift, urlSafe: urlSafe)
                // Short fragments would match unrelated base64 text.
                if form.count >= 8 { insert(form) }
            }
        }
        return forms
    }

    static func percentEncoded(_ bytes: [UInt8], upperHex: Bool, plusForSpace: Bool) -> [UInt8] {
        let hex = Array((upperHex ? "0123456789ABCDEF" : "0123456789abcdef").utf8)
        var out: [UInt8] = []
        for b in bytes {
            let unreserved = (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x2E || b == 0x5F || b == 0x7E
            if unreserved { out.append(b) } else if b == 0x20 && plusForSpace { out.append(0x2B) } else { out += [0x25, hex[Int(b >> 4)], hex[Int(b & 0x0F)]] }
        }
        return out
    }

    /// The base64 characters that depend only on `value` when it follows `shift` other bytes
    /// in a longer input: the characters mixing in a neighbour's bits are dropped.
    static func base64Fragment(_ value: [UInt8], shift: Int, urlSafe: Bool) -> [UInt8] {
        let alphabet = Array((urlSafe ? "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" : "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/").utf8)
        let input = [UInt8](repeating: 0, count: shift) + value
        var chars: [UInt8] = []
        var i = 0
        while i < input.count {
            let b0 = UInt32(input[i])
            let b1 = i + 1 < input.count ? UInt32(input[i + 1]) : 0
            let b2 = i + 2 < input.count ? UInt32(input[i + 2]) : 0
            let n = b0 << 16 | b1 << 8 | b2
            chars += [alphabet[Int(n >> 18 & 63)], alphabet[Int(n >> 12 & 63)], alphabet[Int(n >> 6 & 63)], alphabet[Int(n & 63)]]
            i += 3
        }
        let drop = [0, 2, 3][shift]
        let complete = input.count * 8 / 6
        guard complete > drop else { return [] }
        return Array(chars[drop..<complete])
    }
}

/// Replaces credential forms in a byte stream that arrives in chunks. A match may straddle
/// chunks: the bytes at a chunk's end that could begin a match are held back (fewer than the
/// longest pattern) until the next chunk or `finish()`.
struct StreamScrubber {
    private let patterns: ScrubPatterns
    private var pending: [UInt8] = []
    /// Replacements made so far.
    private(set) var replacements = 0

    init(_ patterns: ScrubPatterns) { self.patterns = patterns }

    /// The scrubbed bytes of `chunk` that are safe to send now.
    mutating func feed(_ chunk: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        if patterns.patterns.isEmpty { return chunk }
        if pending.isEmpty {
            return chunk.withUnsafeReadableBytes { scan($0, final: false, allocator: allocator) }
        }
        var joined = pending
        joined.append(contentsOf: chunk.readableBytesView)
        pending = []
        return joined.withUnsafeBytes { scan($0, final: false, allocator: allocator) }
    }

    /// The bytes held back, scrubbed: call once at the end of the stream.
    mutating func finish(allocator: ByteBufferAllocator) -> ByteBuffer {
        let rest = pending
        pending = []
        return rest.withUnsafeBytes { scan($0, final: true, allocator: allocator) }
    }

    private mutating func scan(_ data: UnsafeRawBufferPointer, final: Bool, allocator: ByteBufferAllocator) -> ByteBuffer {
        let n = data.count
        var out = allocator.buffer(capacity: n)
        guard let base = data.baseAddress else { return out }
        var i = 0
        var copied = 0
        var heldFrom = n
        while i < n {
            let first = Int(data[i])
            let candidates = patterns.byFirstByte[first]
            if candidates.isEmpty { i += 1; continue }
            if !final && i + patterns.longestByFirstByte[first] > n {
                // A match starting here could continue in the next chunk: check only those
                // that fit now, else hold the rest back.
                heldFrom = i
                break
            }
            var matched = false
            for index in candidates {
                let p = patterns.patterns[index]
                let length = p.bytes.count
                if i + length <= n, p.bytes.withUnsafeBytes({ memcmp(base + i, $0.baseAddress!, length) == 0 }) {
                    out.writeBytes(UnsafeRawBufferPointer(rebasing: data[copied..<i]))
                    out.writeBytes(p.replacement)
                    replacements += 1
                    i += length
                    copied = i
                    matched = true
                    break
                }
            }
            if !matched { i += 1 }
        }
        out.writeBytes(UnsafeRawBufferPointer(rebasing: data[copied..<min(heldFrom, n)]))
        if heldFrom < n { pending = Array(data[heldFrom..<n]) }
        return out
    }

    /// `text` scrubbed in one go (header values).
    static func scrub(_ text: String, with patterns: ScrubPatterns) -> String {
        var s = StreamScrubber(patterns)
        let allocator = ByteBufferAllocator()
        var out = s.feed(ByteBuffer(string: text), allocator: allocator)
        var tail = s.finish(allocator: allocator)
        out.writeBuffer(&tail)
        return String(buffer: out)
    }
}

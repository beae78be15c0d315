import NIOCore
import Secrets

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
    /// Bit `b0 << 8 | b1` is set when a pattern starts with the bytes b0 b1 (or is b0 alone):
    /// one more load rules out almost every position whose byte begins a pattern.
    let firstPairs: [UInt64]
    /// The shortest form's length (capped at 256): a window of this many bytes holds the start
    /// of every form that begins at its first byte.
    let shortest: Int
    /// Bit `b0 << 8 | b1` is set when the two bytes b0 b1 appear together within the first
    /// `shortest` bytes of some form (8 KiB: it stays in the L1 cache). A window of `shortest`
    /// bytes whose last two bytes are not such a block cannot hold the start of any form at any
    /// of its first `shortest - 1` positions, and the scan moves on that far at once.
    let prefixBlocks: [UInt64]

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
        var pairs = [UInt64](repeating: 0, count: 65_536 / 64)
        for (i, p) in all.enumerated() {
            let first = Int(p.bytes[0])
            index[first].append(i)
            longest[first] = max(longest[first], p.bytes.count)
            for second in p.bytes.count > 1 ? [Int(p.bytes[1])] : Array(0..<256) {
                let key = first << 8 | second
                pairs[key >> 6] |= 1 << UInt64(key & 63)
            }
        }
        let m = min(all.map(\.bytes.count).min() ?? 0, 256)
        var blocks = [UInt64](repeating: 0, count: 65_536 / 64)
        for p in all where m >= 2 {
            for q in 1..<m {
                let key = Int(p.bytes[q - 1]) << 8 | Int(p.bytes[q])
                blocks[key >> 6] |= 1 << UInt64(key & 63)
            }
        }
        self.shortest = m
        self.prefixBlocks = blocks
        patterns = all
        byFirstByte = index
        longestByFirstByte = longest
        firstPairs = pairs
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
///
/// The common case costs one pass over the bytes and no copy: a chunk without a match goes on
/// as a slice of itself. Held-back bytes are rescanned with only the start of the next chunk
/// (as much as a match beginning in them can reach), then the rest of that chunk in place.
struct StreamScrubber {
    private let patterns: ScrubPatterns
    private var pending: [UInt8] = []
    /// Replacements made so far.
    private(set) var replacements = 0

    init(_ patterns: ScrubPatterns) { self.patterns = patterns }

    /// The scrubbed bytes of `chunk` that are safe to send now.
    mutating func feed(_ chunk: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        guard let longest = patterns.patterns.first?.bytes.count else { return chunk }
        var out: ByteBuffer?
        var resume = 0
        if !pending.isEmpty {
            let held = pending
            pending = []
            if chunk.readableBytes < longest {
                // A short chunk: scan it together with the held bytes.
                let joined = held + chunk.readableBytesView
                out = allocator.buffer(capacity: joined.count)
                let end = joined.withUnsafeBytes { scan($0, from: 0, before: $0.count, holdBack: true, into: &out, allocator: allocator) }
                if end < joined.count { pending = Array(joined[end...]) }
                return out!
            }
            // Every match starting in the held bytes ends within `longest` bytes of the chunk.
            let head = held + chunk.readableBytesView.prefix(longest)
            out = allocator.buffer(capacity: chunk.readableBytes + held.count)
            let stop = head.withUnsafeBytes { scan($0, from: 0, before: held.count, holdBack: false, into: &out, allocator: allocator) }
            resume = stop - held.count
        }
        return chunk.withUnsafeReadableBytes { data in
            let end = scan(data, from: resume, before: data.count, holdBack: true, into: &out, allocator: allocator)
            if end < data.count { pending = Array(data[end...]) }
            // No match: the chunk itself (without the held-back bytes), not a copy.
            return out ?? chunk.getSlice(at: chunk.readerIndex + resume, length: end - resume)!
        }
    }

    /// The bytes held back, scrubbed: call once at the end of the stream.
    mutating func finish(allocator: ByteBufferAllocator) -> ByteBuffer {
        let rest = pending
        pending = []
        var out: ByteBuffer? = allocator.buffer(capacity: rest.count)
        _ = rest.withUnsafeBytes { scan($0, from: 0, before: $0.count, holdBack: false, into: &out, allocator: allocator) }
        return out!
    }

    /// The greedy pass over `data`: at each position from `start` up to `limit`, the longest
    /// form matching there is replaced, else the byte passes. With `holdBack`, it stops at the
    /// first position where a form could continue past the data's end. Returns where it
    /// stopped (a match may carry it past `limit`). The bytes passed go to `out` — created at
    /// the first match if nil, so that a pass without one copies nothing.
    private mutating func scan(
        _ data: UnsafeRawBufferPointer, from start: Int, before limit: Int, holdBack: Bool, into out: inout ByteBuffer?,
        allocator: ByteBufferAllocator
    ) -> Int {
        let n = data.count
        guard let base = data.baseAddress else { return start }
        let forms = patterns.patterns
        let byFirstByte = patterns.byFirstByte
        let firstPairs = patterns.firstPairs
        var i = start
        var copied = start
        var found = 0
        // Flat tables read through pointers. While a window of the shortest form's length fits
        // in the data, its last two bytes say whether a form could begin in it (`prefixBlocks`):
        // almost every window moves on `shortest - 1` bytes after three loads. The advance is a
        // branch the processor predicts, not a value it waits for, so it runs ahead. Where a
        // form could begin, and in the last window's worth of bytes, each position is checked:
        // one load for most, a second for the few whose byte begins a form, then the forms.
        let m = patterns.shortest
        let skipping = m >= 4
        patterns.longestByFirstByte.withUnsafeBufferPointer { longestStarting in
            firstPairs.withUnsafeBufferPointer { pairs in
                patterns.prefixBlocks.withUnsafeBufferPointer { blocks in
                    while i < limit {
                        if skipping && i + m <= n {
                            let end = i + m - 1
                            let key = Int(base.load(fromByteOffset: end - 1, as: UInt8.self)) << 8 | Int(base.load(fromByteOffset: end, as: UInt8.self))
                            if blocks[key >> 6] & (1 << UInt64(key & 63)) == 0 {
                                i += m - 1
                                if i > limit { i = limit }
                                continue
                            }
                        }
                        let first = Int(base.load(fromByteOffset: i, as: UInt8.self))
                        let reach = longestStarting[first]
                        if reach == 0 {
                            i += 1
                            continue
                        }
                        if i + 1 < n {
                            let key = first << 8 | Int(base.load(fromByteOffset: i + 1, as: UInt8.self))
                            if pairs[key >> 6] & (1 << UInt64(key & 63)) == 0 {
                                i += 1
                                continue
                            }
                        }
                        // A match starting here could continue in the next chunk: hold the rest back.
                        if holdBack && i + reach > n { break }
                        var matched = false
                        for index in byFirstByte[first] {
                            let p = forms[index]
                            let length = p.bytes.count
                            if i + length <= n, p.bytes.withUnsafeBytes({ memcmp(base + i, $0.baseAddress!, length) == 0 }) {
                                if out == nil { out = allocator.buffer(capacity: n - start) }
                                out!.writeBytes(UnsafeRawBufferPointer(rebasing: data[copied..<i]))
                                out!.writeBytes(p.replacement)
                                found += 1
                                i += length
                                copied = i
                                matched = true
                                break
                            }
                        }
                        if !matched { i += 1 }
                    }
                }
            }
        }
        replacements += found
        out?.writeBytes(UnsafeRawBufferPointer(rebasing: data[copied..<i]))
        return i
    }

    /// `text` scrubbed in one go (header values).
    static func scrub(_ text: String, with patterns: ScrubPatterns) -> String {
        // Too short to hold any form (most header values): as it is.
        if text.utf8.count < patterns.shortest || patterns.patterns.isEmpty { return text }
        var s = StreamScrubber(patterns)
        let allocator = ByteBufferAllocator()
        var out = s.feed(ByteBuffer(string: text), allocator: allocator)
        var tail = s.finish(allocator: allocator)
        out.writeBuffer(&tail)
        return String(buffer: out)
    }
}

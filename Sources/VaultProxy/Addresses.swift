#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 or IPv6 address, as the proxy checks and dials it.
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    /// 16 bytes, network order.
    case v6([UInt8])

    /// Dotted quad, or the compressed IPv6 text form (from `inet_ntop`).
    public var description: String {
        switch self {
        case .v4(let a): return "\(a >> 24).\((a >> 16) & 0xFF).\((a >> 8) & 0xFF).\(a & 0xFF)"
        case .v6(let bytes):
            var addr = in6_addr()
            withUnsafeMutableBytes(of: &addr) { raw in for i in 0..<16 { raw[i] = bytes[i] } }
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            _ = inet_ntop(AF_INET6, &addr, &buffer, socklen_t(buffer.count))
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// Parses an IP literal in any spelling a resolver or URL parser would accept: IPv4 in
    /// `inet_aton` forms (`127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`) and IPv6 with or
    /// without brackets. Nil when `text` is not an IP literal.
    public init?(literal text: String) {
        var t = Substring(text)
        if t.hasPrefix("[") && t.hasSuffix("]") { t = t.dropFirst().dropLast() }
        if t.contains(":") {
            // Zone ids (`fe80::1%eth0`) are refused by not parsing.
            var addr = in6_addr()
            guard !t.contains("%"), inet_pton(AF_INET6, String(t), &addr) == 1 else { return nil }
            self = .v6(withUnsafeBytes(of: addr) { Array($0) })
            return
        }
        guard let v4 = IPAddress.looseIPv4(t) else { return nil }
        self = .v4(v4)
    }

    /// `inet_aton`'s grammar: 1–4 parts of decimal, `0x` hex or leading-zero octal; the last
    /// part fills the remaining bytes.
    static func looseIPv4(_ text: Substring) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard (1...4).contains(parts.count) else { return nil }
        var values: [UInt64] = []
        for part in parts {
            guard let v = IPAddress.number(part) else { return nil }
            values.append(v)
        }
        var result: UInt64 = 0
        for (i, v) in values.dropLast().enumerated() {
            guard v <= 0xFF else { return nil }
            result |= v << UInt64(8 * (3 - i))
        }
        let lastBits = UInt64(8 * (5 - values.count))
        guard let last = values.last, last < (UInt64(1) << lastBits) else { return nil }
        return UInt32(result | last)
    }

    /// A decimal, `0x` hex or leading-zero octal number (nil if empty, malformed or huge).
    static func number(_ part: Substring) -> UInt64? {
        guard !part.isEmpty, part.count <= 32 else { return nil }
        let lower = part.lowercased()
        if lower.hasPrefix("0x") {
            let digits = lower.dropFirst(2)
            return digits.isEmpty ? 0 : UInt64(digits, radix: 16)
        }
        if lower.count > 1 && lower.hasPrefix("0") { return UInt64(lower.dropFirst(), radix: 8) }
        return UInt64(lower, radix: 10)
    }

    /// Why the proxy never dials this address, or nil for a public unicast address. IPv6 forms
    /// that embed an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by the
    /// embedded address.
    public var refusal: String? {
        switch self {
        case .v4(let a): return IPAddress.v4Refusal(a)
        case .v6(let b): return IPAddress.v6Refusal(b)
        }
    }

    private static let v4Blocks: [(UInt32, Int, String)] = [
        (0x0000_0000, 8, "a 'this network' address (0.0.0.0/8)"),
        (0x0A00_0000, 8, "a private address (10.0.0.0/8)"),
        (0x6440_0000, 10, "a carrier-grade NAT address (100.64.0.0/10)"),
        (0x7F00_0000, 8, "a loopback address (127.0.0.0/8)"),
        (0xA9FE_A9FE, 32, "the cloud metadata address"),
        (0xA9FE_0000, 16, "a link-local address (169.254.0.0/16)"),
        (0xAC10_0000, 12, "a private address (172.16.0.0/12)"),
        (0xC000_0000, 24, "an IETF protocol address (192.0.0.0/24)"),
        (0xC000_0200, 24, "a documentation address (192.0.2.0/24)"),
        (0xC058_6300, 24, "a 6to4 relay address (192.88.99.0/24)"),
        (0xC0A8_0000, 16, "a private address (192.168.0.0/16)"),
        (0xC612_0000, 15, "a benchmarking address (198.18.0.0/15)"),
        (0xC633_6400, 24, "a documentation address (198.51.100.0/24)"),
        (0xCB00_7100, 24, "a documentation address (203.0.113.0/24)"),
        (0xE000_0000, 4, "a multicast address (224.0.0.0/4)"),
        (0xF000_0000, 4, "a reserved or broadcast address (240.0.0.0/4)"),
    ]

    static func v4Refusal(_ a: UInt32) -> String? {
        for (base, bits, why) in v4Blocks {
            let mask: UInt32 = bits == 0 ? 0 : ~UInt32(0) << UInt32(32 - bits)
            if a & mask == base { return why }
        }
        return nil
    }

    static func v6Refusal(_ b: [UInt8]) -> String? {
        func embedded(at offset: Int) -> UInt32 {
            UInt32(b[offset]) << 24 | UInt32(b[offset + 1]) << 16 | UInt32(b[offset + 2]) << 8 | UInt32(b[offset + 3])
        }
        func prefix(_ p: [UInt8], bits: Int) -> Bool {
            var remaining = bits
            for (i, byte) in p.enumerated() where remaining > 0 {
                let take = min(8, remaining)
                let mask: UInt8 = take == 8 ? 0xFF : ~UInt8(0) << UInt8(8 - take)
                if b[i] & mask != byte & mask { return false }
                remaining -= take
            }
            return true
        }
        let zero10 = b[0..<10].allSatisfy { $0 == 0 }
        if b.allSatisfy({ $0 == 0 }) { return "the unspecified address (::)" }
        if b[0..<15].allSatisfy({ $0 == 0 }) && b[15] == 1 { return "a loopback address (::1)" }
        if zero10 && b[10] == 0xFF && b[11] == 0xFF {
            return v4Refusal(embedded(at: 12)).map { "an IPv4-mapped form of \($0)" }
        }
        if b[0..<12].allSatisfy({ $0 == 0 }) { return "an IPv4-compatible address (::/96)" }
        if b[0..<8].allSatisfy({ $0 == 0 }) && b[8] == 0xFF && b[9] == 0xFF && b[10] == 0 && b[11] == 0 {
            return "an IPv4-translated address (::ffff:0:0:0/96)"
        }
        if prefix([0x00, 0x64, 0xFF, 0x9B, 0, 0, 0, 0, 0, 0, 0, 0], bits: 96) {
            return v4Refusal(embedded(at: 12)).map { "a NAT64 form of \($0)" }
        }
        if prefix([0x00, 0x64, 0xFF, 0x9B, 0x00, 0x01], bits: 48) { return "a local NAT64 address (64:ff9b:1::/48)" }
        if prefix([0x20, 0x02], bits: 16) { return v4Refusal(embedded(at: 2)).map { "a 6to4 form of \($0)" } }
        if prefix([0x20, 0x01, 0x0D, 0xB8], bits: 32) { return "a documentation address (2001:db8::/32)" }
        if prefix([0x20, 0x01, 0x00, 0x00], bits: 32) { return "a Teredo address (2001::/32)" }
        if prefix([0x01, 0, 0, 0, 0, 0, 0, 0], bits: 64) { return "a discard address (100::/64)" }
        if prefix([0xFC], bits: 7) { return "a unique local address (fc00::/7)" }
        if prefix([0xFE, 0x80], bits: 10) { return "a link-local address (fe80::/10)" }
        if prefix([0xFE, 0xC0], bits: 10) { return "a site-local address (fec0::/10)" }
        if prefix([0xFF], bits: 8) { return "a multicast address (ff00::/8)" }
        return nil
    }
}

/// Host name rules shared by the policy's list and the requests checked against it.
public enum HostName {
    /// `host` lowercased without one trailing dot, if it is a valid DNS name (labels of
    /// `[a-z0-9-_]`, 1–63 bytes, 253 in all; non-ASCII names must come as `xn--`). Nil otherwise.
    /// A name whose last label is numeric is not a name (URL parsers read it as IPv4).
    public static func canonical(_ host: String) -> String? {
        var h = host.lowercased()
        if h.hasSuffix(".") { h.removeLast() }
        guard !h.isEmpty, h.utf8.count <= 253 else { return nil }
        let labels = h.split(separator: ".", omittingEmptySubsequences: false)
        for label in labels {
            guard (1...63).contains(label.utf8.count), !label.hasPrefix("-"), !label.hasSuffix("-"),
                label.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x5F })
            else { return nil }
        }
        if let last = labels.last, IPAddress.number(last) != nil { return nil }
        return h
    }
}

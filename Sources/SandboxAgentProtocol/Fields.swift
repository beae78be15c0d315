/// The payload encoding: fixed-width big-endian integers, and byte strings, text and lists
/// prefixed by a 4-byte big-endian count.
public struct FieldWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init() {}

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u32(_ v: UInt32) {
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) }
    }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func u64(_ v: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
    }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func blob(_ v: [UInt8]) {
        u32(UInt32(v.count))
        bytes.append(contentsOf: v)
    }
    public mutating func string(_ v: String) {
        u32(UInt32(v.utf8.count))
        bytes.append(contentsOf: v.utf8)
    }
    public mutating func optionalString(_ v: String?) {
        bool(v != nil)
        if let v { string(v) }
    }
    public mutating func optionalU64(_ v: UInt64?) {
        bool(v != nil)
        if let v { u64(v) }
    }
    public mutating func optionalU32(_ v: UInt32?) {
        bool(v != nil)
        if let v { u32(v) }
    }
    public mutating func strings(_ v: [String]) {
        u32(UInt32(v.count))
        for s in v { string(s) }
    }
}

/// Reads a payload written by `FieldWriter`; every read is bounds-checked, and a count is
/// checked against the bytes left before anything is allocated for it.
public struct FieldReader: Sendable {
    private let bytes: [UInt8]
    private var offset = 0
    private let what: String

    public init(_ bytes: [UInt8], what: String) {
        self.bytes = bytes
        self.what = what
    }

    private func truncated() -> AgentProtocolError { AgentProtocolError("truncated \(what) frame") }

    private mutating func take(_ n: Int) throws(AgentProtocolError) -> ArraySlice<UInt8> {
        guard n >= 0, bytes.count - offset >= n else { throw truncated() }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    public mutating func u8() throws(AgentProtocolError) -> UInt8 { try take(1).first! }
    public mutating func bool() throws(AgentProtocolError) -> Bool {
        switch try u8() {
        case 0: return false
        case 1: return true
        case let b: throw AgentProtocolError("bad boolean \(b) in \(what) frame")
        }
    }
    public mutating func u32() throws(AgentProtocolError) -> UInt32 {
        try take(4).reduce(0) { $0 << 8 | UInt32($1) }
    }
    public mutating func i32() throws(AgentProtocolError) -> Int32 { Int32(bitPattern: try u32()) }
    public mutating func u64() throws(AgentProtocolError) -> UInt64 {
        try take(8).reduce(0) { $0 << 8 | UInt64($1) }
    }
    public mutating func i64() throws(AgentProtocolError) -> Int64 { Int64(bitPattern: try u64()) }
    public mutating func blob() throws(AgentProtocolError) -> [UInt8] {
        let n = Int(try u32())
        return Array(try take(n))
    }
    public mutating func string() throws(AgentProtocolError) -> String {
        let n = Int(try u32())
        let slice = try take(n)
        guard let s = String(validating: slice, as: UTF8.self) else {
            throw AgentProtocolError("text that is not UTF-8 in \(what) frame")
        }
        return s
    }
    public mutating func optionalString() throws(AgentProtocolError) -> String? { try bool() ? try string() : nil }
    public mutating func optionalU64() throws(AgentProtocolError) -> UInt64? { try bool() ? try u64() : nil }
    public mutating func optionalU32() throws(AgentProtocolError) -> UInt32? { try bool() ? try u32() : nil }
    /// A count of elements that each take at least `minimumSize` bytes, checked against the rest.
    public mutating func count(minimumSize: Int) throws(AgentProtocolError) -> Int {
        let n = Int(try u32())
        guard n <= (bytes.count - offset) / max(minimumSize, 1) else { throw truncated() }
        return n
    }
    public mutating func strings() throws(AgentProtocolError) -> [String] {
        let n = try count(minimumSize: 4)
        var out: [String] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try string()) }
        return out
    }
    /// Refuses trailing bytes.
    public func finish() throws(AgentProtocolError) {
        guard offset == bytes.count else {
            throw AgentProtocolError("\(bytes.count - offset) unexpected trailing bytes in \(what) frame")
        }
    }
}

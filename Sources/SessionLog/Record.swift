import Crypto
import Foundation

/// A SHA-256 digest kept inline (no allocation), the link of the per-session hash chain.
struct Hash32: Equatable, Hashable, Sendable, CustomStringConvertible {
    var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0
    static let zero = Hash32()

    init() {}

    init(_ bytes: UnsafeRawBufferPointer) {
        a = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
        b = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        c = bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        d = bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
    }

    /// SHA-256 of `bytes`.
    static func sha256(_ bytes: UnsafeRawBufferPointer) -> Hash32 {
        SHA256.hash(data: bytes).withUnsafeBytes { Hash32($0) }
    }

    func store(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: a, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: b, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: c, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: d, toByteOffset: 24, as: UInt64.self)
    }

    var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        out.withUnsafeMutableBytes { store(to: $0.baseAddress!) }
        return out
    }

    var description: String { bytes.map { String(format: "%02x", $0) }.joined() }
}

/// The framing of one journal record. All integers little-endian.
///
/// ```
///  0  u32  magic "AGJR"
///  4  u32  length of the whole record in bytes
///  8  u32  CRC32C of bytes [16, length)            (the body)
/// 12  u32  CRC32C of bytes [16, 88 + sidLen)        (the identity: lets damage be attributed)
/// 16  u8   version (1)   17 u8 flags (0)   18 u16 sidLen
/// 20  u16  typeLen       22 u16 reserved
/// 24  u32  payloadLen    28 u32 reserved
/// 32  u64  seq           40 u64 lease epoch        48 i64 timestamp (ns since 1970)
/// 56  [32] SHA-256 of the session's previous record body (zeros for seq 1)
/// 88  sid bytes | type bytes | payload bytes
/// ```
/// The hash of a record is the SHA-256 of its body, bytes [16, length).
enum Record {
    static let magic: UInt32 = 0x524A_4741  // "AGJR" read as little-endian
    static let version: UInt8 = 1
    static let fixedSize = 88
    static let maxTypeBytes = 256
    /// No record is larger than this, whatever the options: a length above it is damage.
    static let hardMaxLength = 1 << 30

    /// The decoded identity and layout of a record whose checksums passed.
    struct Header {
        var length: Int
        var sidLen: Int
        var typeLen: Int
        var payloadLen: Int
        var seq: UInt64
        var epoch: UInt64
        var timestamp: Int64
        var prevHash: Hash32
    }

    /// Builds a record with zeroed seq/epoch/prevHash/checksums; `seal` fills them in.
    static func build(session: SessionID, type: [UInt8], payload: [UInt8], timestamp: Int64) -> [UInt8] {
        let sid = Array(session.rawValue.utf8)
        let length = fixedSize + sid.count + type.count + payload.count
        var out = [UInt8](repeating: 0, count: length)
        out.withUnsafeMutableBytes { raw in
            let p = raw.baseAddress!
            p.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            p.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 4, as: UInt32.self)
            p.storeBytes(of: version, toByteOffset: 16, as: UInt8.self)
            p.storeBytes(of: UInt16(sid.count).littleEndian, toByteOffset: 18, as: UInt16.self)
            p.storeBytes(of: UInt16(type.count).littleEndian, toByteOffset: 20, as: UInt16.self)
            p.storeBytes(of: UInt32(payload.count).littleEndian, toByteOffset: 24, as: UInt32.self)
            p.storeBytes(of: timestamp.littleEndian, toByteOffset: 48, as: Int64.self)
            var o = fixedSize
            sid.withUnsafeBytes { (p + o).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            o += sid.count
            type.withUnsafeBytes { if $0.count > 0 { (p + o).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
            o += type.count
            payload.withUnsafeBytes { if $0.count > 0 { (p + o).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        }
        return out
    }

    /// Fills in seq, epoch and the chain link, computes both checksums, and returns the
    /// record's hash (the next record's `prevHash`).
    static func seal(_ record: inout [UInt8], seq: UInt64, epoch: UInt64, prevHash: Hash32) -> Hash32 {
        record.withUnsafeMutableBytes { raw in
            let p = raw.baseAddress!
            p.storeBytes(of: seq.littleEndian, toByteOffset: 32, as: UInt64.self)
            p.storeBytes(of: epoch.littleEndian, toByteOffset: 40, as: UInt64.self)
            prevHash.store(to: p + 56)
            let sidLen = Int(UInt16(littleEndian: p.load(fromByteOffset: 18, as: UInt16.self)))
            let body = UnsafeRawBufferPointer(start: p + 16, count: raw.count - 16)
            p.storeBytes(of: CRC32C.checksum(body).littleEndian, toByteOffset: 8, as: UInt32.self)
            let identity = UnsafeRawBufferPointer(start: p + 16, count: fixedSize - 16 + sidLen)
            p.storeBytes(of: CRC32C.checksum(identity).littleEndian, toByteOffset: 12, as: UInt32.self)
            return Hash32.sha256(body)
        }
    }

    /// Why a candidate record at some offset is not valid.
    enum Problem: Error {
        case zeros
        case badMagic
        case badLength(Int)
        case truncated(Int)
        case badLayout
        case bodyChecksum(stored: UInt32, computed: UInt32)
        case identityChecksum

        var text: String {
            switch self {
            case .zeros: return "zero bytes where a record should start"
            case .badMagic: return "bad record magic"
            case .badLength(let n): return "implausible record length \(n)"
            case .truncated(let n): return "record of \(n) bytes runs past the end of the segment"
            case .badLayout: return "record fields do not add up to its length"
            case .bodyChecksum(let s, let c):
                return "CRC32C mismatch (stored 0x\(String(s, radix: 16)), computed 0x\(String(c, radix: 16)))"
            case .identityChecksum: return "identity CRC32C mismatch"
            }
        }
    }

    /// Validates the record at `p[0..<available]` (magic, length, layout, both checksums).
    static func parse(_ p: UnsafeRawPointer, available: Int) -> Result<Header, Problem> {
        guard available >= 16 else {
            // Fewer bytes than a header: zeros there are a clean end (a segment whose sealing
            // truncate a crash lost keeps its preallocated zeros), anything else a cut record.
            let allZero = (0..<available).allSatisfy { p.load(fromByteOffset: $0, as: UInt8.self) == 0 }
            return .failure(allZero ? .zeros : .truncated(available))
        }
        let m = UInt32(littleEndian: p.loadUnaligned(as: UInt32.self))
        let length = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        if m == 0 && length == 0 { return .failure(.zeros) }
        guard m == magic else { return .failure(.badMagic) }
        guard length >= fixedSize + 1, length <= hardMaxLength else { return .failure(.badLength(length)) }
        guard length <= available else { return .failure(.truncated(length)) }
        let sidLen = Int(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 18, as: UInt16.self)))
        let typeLen = Int(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 20, as: UInt16.self)))
        let payloadLen = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt32.self)))
        guard p.load(fromByteOffset: 16, as: UInt8.self) == version, sidLen >= 1, sidLen <= SessionID.maxLength,
            fixedSize + sidLen + typeLen + payloadLen == length
        else { return .failure(.badLayout) }
        let storedBody = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(start: p + 16, count: length - 16))
        guard storedBody == computed else { return .failure(.bodyChecksum(stored: storedBody, computed: computed)) }
        let storedIdentity = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        guard storedIdentity == CRC32C.checksum(UnsafeRawBufferPointer(start: p + 16, count: fixedSize - 16 + sidLen))
        else { return .failure(.identityChecksum) }
        return .success(header(p, length: length, sidLen: sidLen, typeLen: typeLen, payloadLen: payloadLen))
    }

    private static func header(_ p: UnsafeRawPointer, length: Int, sidLen: Int, typeLen: Int, payloadLen: Int) -> Header {
        Header(
            length: length, sidLen: sidLen, typeLen: typeLen, payloadLen: payloadLen,
            seq: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self)),
            epoch: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 40, as: UInt64.self)),
            timestamp: Int64(littleEndian: p.loadUnaligned(fromByteOffset: 48, as: Int64.self)),
            prevHash: Hash32(UnsafeRawBufferPointer(start: p + 56, count: 32)))
    }

    /// For a record that failed validation: the session it belongs to and its seq, when one
    /// of its checksums still covers its identity — the identity CRC (bytes [16, 88 + sidLen)),
    /// or the body CRC (bytes [16, length), which covers the identity too) when the damage
    /// hit only the identity CRC itself. Nil when neither holds.
    static func attribute(_ p: UnsafeRawPointer, available: Int) -> (SessionID, UInt64)? {
        guard available >= fixedSize else { return nil }
        let sidLen = Int(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 18, as: UInt16.self)))
        guard sidLen >= 1, sidLen <= SessionID.maxLength, fixedSize + sidLen <= available else { return nil }
        let storedIdentity = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        var trusted = storedIdentity == CRC32C.checksum(UnsafeRawBufferPointer(start: p + 16, count: fixedSize - 16 + sidLen))
        if !trusted {
            let length = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
            let storedBody = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            trusted = length >= fixedSize + sidLen && length <= available
                && storedBody == CRC32C.checksum(UnsafeRawBufferPointer(start: p + 16, count: length - 16))
        }
        guard trusted, let sid = SessionID.fromBytes(UnsafeRawBufferPointer(start: p + fixedSize, count: sidLen)) else { return nil }
        return (sid, UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self)))
    }

    /// What a damaged record whose checksums both fail still claims, unverified: its session
    /// id (when the bytes form one), its seq and its link to the previous record. Recovery
    /// weighs these against the chains of the sessions around it (see `SessionStore.scan`).
    static func claims(_ p: UnsafeRawPointer, available: Int) -> (session: SessionID?, seq: UInt64, prevHash: Hash32)? {
        guard available >= fixedSize else { return nil }
        let sidLen = Int(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 18, as: UInt16.self)))
        var sid: SessionID?
        if sidLen >= 1, sidLen <= SessionID.maxLength, fixedSize + sidLen <= available {
            sid = SessionID.fromBytes(UnsafeRawBufferPointer(start: p + fixedSize, count: sidLen))
        }
        return (sid, UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self)), Hash32(UnsafeRawBufferPointer(start: p + 56, count: 32)))
    }

    static func sessionBytes(_ p: UnsafeRawPointer, _ h: Header) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: p + fixedSize, count: h.sidLen)
    }

    static func typeString(_ p: UnsafeRawPointer, _ h: Header) -> String {
        String(decoding: UnsafeRawBufferPointer(start: p + fixedSize + h.sidLen, count: h.typeLen), as: UTF8.self)
    }

    static func isType(_ p: UnsafeRawPointer, _ h: Header, _ type: [UInt8]) -> Bool {
        guard h.typeLen == type.count else { return false }
        return type.withUnsafeBytes { memcmp(p + fixedSize + h.sidLen, $0.baseAddress!, type.count) == 0 }
    }

    static func payload(_ p: UnsafeRawPointer, _ h: Header) -> [UInt8] {
        [UInt8](UnsafeRawBufferPointer(start: p + fixedSize + h.sidLen + h.typeLen, count: h.payloadLen))
    }

    static func bodyHash(_ p: UnsafeRawPointer, _ h: Header) -> Hash32 {
        Hash32.sha256(UnsafeRawBufferPointer(start: p + 16, count: h.length - 16))
    }
}

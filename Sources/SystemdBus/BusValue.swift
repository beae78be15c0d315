import CSystemd

/// A D-Bus value, as sent to or read from systemd.
public indirect enum BusValue: Sendable, Equatable {
    case byte(UInt8)
    case bool(Bool)
    case int16(Int16)
    case uint16(UInt16)
    case int32(Int32)
    case uint32(UInt32)
    case int64(Int64)
    case uint64(UInt64)
    case double(Double)
    case string(String)
    case objectPath(String)
    case signature(String)
    /// A file descriptor (`h`); sd-bus duplicates it into the message.
    case fd(Int32)
    /// An array whose elements have `elementSignature` (needed when it is empty).
    case array(elementSignature: String, [BusValue])
    case structure([BusValue])
    case dictEntry(BusValue, BusValue)
    case variant(BusValue)

    /// The value's D-Bus type signature.
    public var signature: String {
        switch self {
        case .byte: "y"
        case .bool: "b"
        case .int16: "n"
        case .uint16: "q"
        case .int32: "i"
        case .uint32: "u"
        case .int64: "x"
        case .uint64: "t"
        case .double: "d"
        case .string: "s"
        case .objectPath: "o"
        case .signature: "g"
        case .fd: "h"
        case .array(let element, _): "a" + element
        case .structure(let fields): "(" + fields.map(\.signature).joined() + ")"
        case .dictEntry(let k, let v): "{" + k.signature + v.signature + "}"
        case .variant: "v"
        }
    }

    /// An array of strings (`as`).
    public static func strings(_ values: [String]) -> BusValue { .array(elementSignature: "s", values.map { .string($0) }) }

    // Convenience accessors for replies.
    public var stringValue: String? {
        switch self {
        case .string(let s), .objectPath(let s), .signature(let s): s
        case .variant(let v): v.stringValue
        default: nil
        }
    }

    public var uint64Value: UInt64? {
        switch self {
        case .uint64(let v): v
        case .uint32(let v): UInt64(v)
        case .uint16(let v): UInt64(v)
        case .byte(let v): UInt64(v)
        case .int64(let v) where v >= 0: UInt64(v)
        case .int32(let v) where v >= 0: UInt64(v)
        case .variant(let v): v.uint64Value
        default: nil
        }
    }

    public var int64Value: Int64? {
        switch self {
        case .int64(let v): v
        case .int32(let v): Int64(v)
        case .int16(let v): Int64(v)
        case .uint32(let v): Int64(v)
        case .uint64(let v) where v <= UInt64(Int64.max): Int64(v)
        case .variant(let v): v.int64Value
        default: nil
        }
    }

    public var boolValue: Bool? {
        switch self {
        case .bool(let b): b
        case .variant(let v): v.boolValue
        default: nil
        }
    }
}

// MARK: - Writing into and reading out of sd_bus_message

enum BusCodec {
    /// Appends `value` to `message` with `sd_bus_message_append_basic` / `open_container`.
    static func append(_ value: BusValue, to m: OpaquePointer) throws {
        func check(_ r: Int32, _ call: String) throws {
            if r < 0 { throw SystemdError.syscall(call, r, "building a D-Bus message", code: .invalidArgument) }
        }
        func basic<T>(_ type: Character, _ v: T) throws {
            var copy = v
            try check(withUnsafePointer(to: &copy) { sd_bus_message_append_basic(m, CChar(type.asciiValue!), $0) }, "sd_bus_message_append_basic")
        }
        switch value {
        case .byte(let v): try basic("y", v)
        case .bool(let v): try basic("b", Int32(v ? 1 : 0))
        case .int16(let v): try basic("n", v)
        case .uint16(let v): try basic("q", v)
        case .int32(let v): try basic("i", v)
        case .uint32(let v): try basic("u", v)
        case .int64(let v): try basic("x", v)
        case .uint64(let v): try basic("t", v)
        case .double(let v): try basic("d", v)
        case .fd(let v): try basic("h", v)
        case .string(let s), .objectPath(let s), .signature(let s):
            let type = CChar(value.signature.utf8.first!)
            try check(s.withCString { sd_bus_message_append_basic(m, type, $0) }, "sd_bus_message_append_basic")
        case .array(let element, let items):
            try check(sd_bus_message_open_container(m, CChar(UInt8(ascii: "a")), element), "sd_bus_message_open_container")
            for item in items { try append(item, to: m) }
            try check(sd_bus_message_close_container(m), "sd_bus_message_close_container")
        case .structure(let fields):
            let contents = String(value.signature.dropFirst().dropLast())
            try check(sd_bus_message_open_container(m, CChar(UInt8(ascii: "r")), contents), "sd_bus_message_open_container")
            for f in fields { try append(f, to: m) }
            try check(sd_bus_message_close_container(m), "sd_bus_message_close_container")
        case .dictEntry(let k, let v):
            try check(sd_bus_message_open_container(m, CChar(UInt8(ascii: "e")), k.signature + v.signature), "sd_bus_message_open_container")
            try append(k, to: m)
            try append(v, to: m)
            try check(sd_bus_message_close_container(m), "sd_bus_message_close_container")
        case .variant(let inner):
            try check(sd_bus_message_open_container(m, CChar(UInt8(ascii: "v")), inner.signature), "sd_bus_message_open_container")
            try append(inner, to: m)
            try check(sd_bus_message_close_container(m), "sd_bus_message_close_container")
        }
    }

    /// Reads every remaining value of `m` at the current level.
    static func readAll(_ m: OpaquePointer) throws -> [BusValue] {
        var values: [BusValue] = []
        while let v = try readOne(m) { values.append(v) }
        return values
    }

    /// Reads the next value, or nil at the end of the current container.
    static func readOne(_ m: OpaquePointer) throws -> BusValue? {
        var type: CChar = 0
        var contentsPtr: UnsafePointer<CChar>? = nil
        let r = sd_bus_message_peek_type(m, &type, &contentsPtr)
        if r < 0 { throw SystemdError.syscall("sd_bus_message_peek_type", r, "reading a reply", code: .badReply) }
        if r == 0 { return nil }
        let contents = contentsPtr.map { String(cString: $0) } ?? ""
        func check(_ r: Int32, _ call: String) throws {
            if r < 0 { throw SystemdError.syscall(call, r, "reading a reply", code: .badReply) }
        }
        func basic<T>(_ initial: T) throws -> T {
            var v = initial
            try check(withUnsafeMutablePointer(to: &v) { sd_bus_message_read_basic(m, type, $0) }, "sd_bus_message_read_basic")
            return v
        }
        func container(_ kind: Character, _ body: () throws -> BusValue) throws -> BusValue {
            try check(sd_bus_message_enter_container(m, CChar(kind.asciiValue!), contents), "sd_bus_message_enter_container")
            let v = try body()
            try check(sd_bus_message_exit_container(m), "sd_bus_message_exit_container")
            return v
        }
        switch UInt8(bitPattern: type) {
        case UInt8(ascii: "y"): return .byte(try basic(UInt8(0)))
        case UInt8(ascii: "b"): return .bool(try basic(Int32(0)) != 0)
        case UInt8(ascii: "n"): return .int16(try basic(Int16(0)))
        case UInt8(ascii: "q"): return .uint16(try basic(UInt16(0)))
        case UInt8(ascii: "i"): return .int32(try basic(Int32(0)))
        case UInt8(ascii: "u"): return .uint32(try basic(UInt32(0)))
        case UInt8(ascii: "x"): return .int64(try basic(Int64(0)))
        case UInt8(ascii: "t"): return .uint64(try basic(UInt64(0)))
        case UInt8(ascii: "d"): return .double(try basic(Double(0)))
        case UInt8(ascii: "h"): return .fd(try basic(Int32(-1)))
        case UInt8(ascii: "s"), UInt8(ascii: "o"), UInt8(ascii: "g"):
            let p = try basic(UnsafePointer<CChar>?.none)
            let s = p.map { String(cString: $0) } ?? ""
            switch UInt8(bitPattern: type) {
            case UInt8(ascii: "o"): return .objectPath(s)
            case UInt8(ascii: "g"): return .signature(s)
            default: return .string(s)
            }
        case UInt8(ascii: "a"):
            return try container("a") { .array(elementSignature: contents, try readAll(m)) }
        case UInt8(ascii: "r"):
            return try container("r") { .structure(try readAll(m)) }
        case UInt8(ascii: "e"):
            return try container("e") {
                let fields = try readAll(m)
                guard fields.count == 2 else { throw SystemdError(.badReply, "a D-Bus dict entry without two fields") }
                return .dictEntry(fields[0], fields[1])
            }
        case UInt8(ascii: "v"):
            return try container("v") {
                guard let inner = try readOne(m) else { throw SystemdError(.badReply, "an empty D-Bus variant") }
                return .variant(inner)
            }
        default:
            throw SystemdError(.badReply, "unsupported D-Bus type '\(Character(UnicodeScalar(UInt8(bitPattern: type))))' in a reply")
        }
    }
}

import Foundation
import Testing

@testable import SessionLog

/// A fresh directory under /tmp, removed when `body` returns or throws.
func withTempDirectory<T>(_ name: String = "journal", _ body: (String) async throws -> T) async throws -> T {
    let path = NSTemporaryDirectory() + "agentd-\(name)-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try await body(path)
}

func sid(_ s: String) -> SessionID { try! SessionID(s) }

func json(_ s: String) -> [UInt8] { Array(s.utf8) }

/// All events of a session, in order.
func allEvents(_ store: SessionStore, _ session: SessionID, after: UInt64 = 0) async throws -> [Event] {
    var out: [Event] = []
    for try await e in store.events(session: session, after: after) { out.append(e) }
    return out
}

/// The bytes of every file under `directory`, concatenated.
func allBytes(under directory: String) -> [UInt8] {
    var out: [UInt8] = []
    for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
        if let d = FileManager.default.contents(atPath: directory + "/" + name) { out.append(contentsOf: d) }
    }
    return out
}

func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard needle.count <= haystack.count else { return false }
    return !Redactor.replace(needle, with: [], in: haystack).elementsEqual(haystack)
}

/// Runs a command and returns its exit status and combined output.
@discardableResult
func run(_ path: String, _ args: [String]) throws -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Flips one bit of a file in place.
func flipBit(path: String, offset: UInt64, bit: Int) {
    let fd = open(path, O_RDWR)
    precondition(fd >= 0, "open \(path)")
    var b: UInt8 = 0
    precondition(pread(fd, &b, 1, off_t(offset)) == 1)
    b ^= UInt8(1 << bit)
    precondition(pwrite(fd, &b, 1, off_t(offset)) == 1)
    close(fd)
}

/// Overwrites [offset, offset+count) of a file with `byte` (or random bytes when nil).
func overwrite(path: String, offset: UInt64, count: Int, byte: UInt8?) {
    let fd = open(path, O_RDWR)
    precondition(fd >= 0, "open \(path)")
    let bytes = (0..<count).map { _ in byte ?? UInt8.random(in: 0...255) }
    _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, count, off_t(offset)) }
    close(fd)
}

/// A copy of the store's durable locations, for tests that damage the log on purpose.
func locations(_ store: SessionStore) -> [SessionID: [RecordLoc]] {
    store.lock.withLock { store.table.mapValues(\.locs) }
}

struct PristineRecord {
    var session: SessionID
    var seq: UInt64
    var loc: RecordLoc
}

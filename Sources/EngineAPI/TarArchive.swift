/// The little of the tar format the engine's archive endpoints need: one regular file in
/// (`PUT /containers/{id}/archive`), and the entries of an archive out (`GET …/archive`).
///
/// Writes POSIX ustar, with a PAX `path` record when a name does not fit ustar's 100 bytes.
/// Reads ustar, PAX (`x`/`g`) and GNU long names (`L`).
public enum TarArchive {
    public struct Entry: Sendable, Equatable {
        public enum Kind: Sendable, Equatable { case file, directory, symlink, other }
        public var name: String
        public var kind: Kind
        public var size: Int
        public var mode: Int
        public var bytes: [UInt8]
    }

    /// An archive holding one regular file `name` with `contents`.
    public static func singleFile(name: String, contents: [UInt8], mode: Int = 0o644, uid: Int = 0, gid: Int = 0, mtime: Int = 0) -> [UInt8] {
        var out: [UInt8] = []
        let nameBytes = Array(name.utf8)
        if nameBytes.count > 99 {
            let record = paxRecord("path", name)
            out += header(name: "PaxHeader", size: record.count, mode: 0o644, uid: uid, gid: gid, mtime: mtime, type: UInt8(ascii: "x"))
            out += pad(record)
        }
        out += header(name: String(decoding: nameBytes.prefix(99), as: UTF8.self), size: contents.count, mode: mode, uid: uid, gid: gid, mtime: mtime, type: UInt8(ascii: "0"))
        out += pad(contents)
        out += [UInt8](repeating: 0, count: 1024)
        return out
    }

    /// The entries of an archive, in order.
    /// - Throws: `EngineError.decoding` naming the offset of a malformed header.
    public static func entries(_ archive: [UInt8]) throws -> [Entry] {
        var result: [Entry] = []
        var offset = 0
        var longName: String?
        while offset + 512 <= archive.count {
            let block = archive[offset..<offset + 512]
            if block.allSatisfy({ $0 == 0 }) { break }
            guard checksumValid(block) else {
                throw EngineError(.decoding, "the engine's tar archive has a bad header at offset \(offset)")
            }
            let size = octal(block, 124, 12)
            let type = block[block.startIndex + 156]
            let dataStart = offset + 512
            guard size >= 0, dataStart + size <= archive.count else {
                throw EngineError(.decoding, "the engine's tar archive is cut short at offset \(offset)")
            }
            let data = Array(archive[dataStart..<dataStart + size])
            offset = dataStart + (size + 511) / 512 * 512
            switch type {
            case UInt8(ascii: "x"):
                longName = paxPath(data) ?? longName
                continue
            case UInt8(ascii: "g"):
                continue
            case UInt8(ascii: "L"):
                longName = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
                continue
            default:
                break
            }
            var name = string(block, 0, 100)
            let prefix = string(block, 345, 155)
            if !prefix.isEmpty && block[block.startIndex + 257..<block.startIndex + 262].elementsEqual("ustar".utf8) {
                name = prefix + "/" + name
            }
            if let long = longName { name = long; longName = nil }
            let kind: Entry.Kind =
                switch type {
                case UInt8(ascii: "0"), 0: .file
                case UInt8(ascii: "5"): .directory
                case UInt8(ascii: "2"): .symlink
                default: .other
                }
            result.append(Entry(name: name, kind: kind, size: size, mode: octal(block, 100, 8), bytes: kind == .file ? data : []))
        }
        return result
    }

    private static func header(name: String, size: Int, mode: Int, uid: Int, gid: Int, mtime: Int, type: UInt8) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        func put(_ text: String, _ at: Int, _ width: Int) {
            for (i, b) in text.utf8.prefix(width).enumerated() { h[at + i] = b }
        }
        func putOctal(_ value: Int, _ at: Int, _ width: Int) {
            put(String(String(value, radix: 8).suffix(width - 1)).leftPadded(to: width - 1), at, width - 1)
        }
        put(name, 0, 100)
        putOctal(mode, 100, 8)
        putOctal(uid, 108, 8)
        putOctal(gid, 116, 8)
        putOctal(size, 124, 12)
        putOctal(mtime, 136, 12)
        for i in 148..<156 { h[i] = 0x20 }
        h[156] = type
        put("ustar", 257, 6)
        put("00", 263, 2)
        let sum = h.reduce(0) { $0 + Int($1) }
        putOctal(sum, 148, 7)
        h[155] = 0x20
        return h
    }

    private static func pad(_ data: [UInt8]) -> [UInt8] {
        data + [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
    }

    private static func paxRecord(_ key: String, _ value: String) -> [UInt8] {
        let body = " \(key)=\(value)\n"
        var length = body.utf8.count + 1
        while String(length).utf8.count + body.utf8.count != length { length = String(length).utf8.count + body.utf8.count }
        return Array("\(length)\(body)".utf8)
    }

    private static func paxPath(_ data: [UInt8]) -> String? {
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            guard let space = line.firstIndex(of: " ") else { continue }
            let record = line[line.index(after: space)...]
            if record.hasPrefix("path=") { return String(record.dropFirst(5)) }
        }
        return nil
    }

    private static func checksumValid(_ block: ArraySlice<UInt8>) -> Bool {
        let stored = octal(block, 148, 8)
        var sum = 0
        for (i, b) in block.enumerated() { sum += (148..<156).contains(i) ? 0x20 : Int(b) }
        return stored == sum
    }

    private static func octal(_ block: ArraySlice<UInt8>, _ at: Int, _ width: Int) -> Int {
        let s = string(block, at, width).trimmingCharacters(in: .whitespaces)
        return Int(s, radix: 8) ?? (s.isEmpty ? 0 : -1)
    }

    private static func string(_ block: ArraySlice<UInt8>, _ at: Int, _ width: Int) -> String {
        let start = block.startIndex + at
        let field = block[start..<start + width]
        return String(decoding: field.prefix { $0 != 0 }, as: UTF8.self)
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

import Foundation

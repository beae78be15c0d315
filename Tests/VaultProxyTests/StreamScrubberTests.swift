import NIOCore
import SessionLog
import Testing
import TestSupport

@testable import VaultProxy

/// The streaming scrubber against a plain one-pass reference over the whole body, with chunks
/// both shorter and longer than the longest form (the two ways held-back bytes are rescanned),
/// over binary bytes like a download's.
@Suite struct StreamScrubberTests {
    /// One credential, or two of different lengths (the shorter sets how far the scan skips);
    /// bodies of random bytes, or of the forms' own bytes (where most windows could hold a form).
    @Test(arguments: [
        ["ghp_Zq8" + String(repeating: "x7", count: 16)],
        ["ghp_Zq8" + String(repeating: "x7", count: 16), "pw-12;x!"],
    ])
    func chunkedScrubEqualsTheReferenceForShortAndLongChunks(_ values: [String]) throws {
        let secrets = try values.enumerated().map { try Secret(name: "tok\($0.offset)", value: $0.element) }
        let patterns = ScrubPatterns(secrets)
        // Every form of every credential, longest first, with its replacement.
        let forms = secrets.flatMap { secret in
            ScrubPatterns.forms(of: secret.value).map { ($0, Array("[REDACTED:\(secret.name)]".utf8)) }
        }.sorted { $0.0.count > $1.0.count }
        let alphabet = Array(Set(forms.flatMap(\.0)))
        let longest = forms[0].0.count
        var rng = SeededGenerator(seed: 0x51C0)
        let allocator = ByteBufferAllocator()
        for round in 0..<400 {
            let fromForms = round % 8 >= 4
            var body: [UInt8] = []
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                body += (0..<Int.random(in: 0...400, using: &rng)).map { _ in
                    fromForms ? alphabet.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
                }
                // A form whole, or cut short (must pass as it is).
                let form = forms.randomElement(using: &rng)!.0
                body += Bool.random(using: &rng) ? form : Array(form.prefix(Int.random(in: 1..<form.count, using: &rng)))
            }
            let maxPiece = [9, longest + 3, 4 * longest, 2000][round % 4]
            var scrubber = StreamScrubber(patterns)
            var out: [UInt8] = []
            var offset = 0
            while offset < body.count {
                let n = min(body.count - offset, Int.random(in: 1...maxPiece, using: &rng))
                let piece = scrubber.feed(ByteBuffer(bytes: body[offset..<offset + n]), allocator: allocator)
                out += piece.readableBytesView
                offset += n
            }
            out += scrubber.finish(allocator: allocator).readableBytesView
            let expected = Self.reference(body, forms: forms)
            let same = out == expected
            #expect(same, "round \(round), pieces up to \(maxPiece) bytes: \(out.count) bytes out, \(expected.count) expected")
        }
    }

    @Test func aChunkWithoutAFormPassesUnchanged() {
        let value = Array("ghp_abcdefghijklmnop0123".utf8)
        let patterns = ScrubPatterns([try! Secret(name: "tok", bytes: value)])
        var scrubber = StreamScrubber(patterns)
        // No byte here begins a form of the credential.
        let firsts = Set(ScrubPatterns.forms(of: value).map { $0[0] })
        let others = (0...255).map(UInt8.init).filter { !firsts.contains($0) }
        let chunk = ByteBuffer(bytes: (0..<65_536).map { others[$0 % others.count] })
        let out = scrubber.feed(chunk, allocator: ByteBufferAllocator())
        #expect(out == chunk)
        #expect(scrubber.finish(allocator: ByteBufferAllocator()).readableBytes == 0)
        #expect(scrubber.replacements == 0)
    }

    /// Left to right, the longest form matching at each position is replaced.
    static func reference(_ body: [UInt8], forms: [([UInt8], [UInt8])]) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while i < body.count {
            if let (form, replacement) = forms.first(where: { body[i...].starts(with: $0.0) }) {
                out += replacement
                i += form.count
            } else {
                out.append(body[i])
                i += 1
            }
        }
        return out
    }
}

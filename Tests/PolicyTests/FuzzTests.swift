import Foundation
import Testing
import TestSupport

@testable import Policy

/// The loader must never crash, and must always produce either a policy or located errors.
@Suite struct FuzzTests {
    static let seeds = try! String(contentsOfFile: shippedPoliciesDirectory + "/coding-agent.yaml", encoding: .utf8)

    /// Checks the loader's contract for one input.
    func check(_ data: Data, sourceLocation: SourceLocation = #_sourceLocation) {
        switch PolicyLoader.load(data: data, path: "fuzz.yaml") {
        case .success(let policy):
            #expect(!policy.name.isEmpty, sourceLocation: sourceLocation)
            #expect(policy.sha256.count == 64, sourceLocation: sourceLocation)
        case .failure(let error):
            #expect(!error.diagnostics.isEmpty, sourceLocation: sourceLocation)
            let lines = data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).count
            for d in error.diagnostics {
                let ok = d.path == "fuzz.yaml" && d.line >= 1 && d.column >= 1 && d.line <= lines + 1 && !d.message.isEmpty
                #expect(ok, "bad diagnostic \(d) for input \(Array(data))", sourceLocation: sourceLocation)
            }
        }
    }

    @Test func arbitraryBytes() {
        var rng = SeededGenerator(seed: 0xA6E7)
        for _ in 0..<1500 {
            let count = Int.random(in: 0..<160, using: &rng)
            // Half the inputs from YAML-ish bytes, to get past the scanner more often.
            let alphabet = Array("ab:- \n\t[]{},#&*!|>'\"%@`?~0123456789.".utf8)
            let bytes = (0..<count).map { _ in
                Bool.random(using: &rng) ? UInt8.random(in: 0...255, using: &rng) : alphabet.randomElement(using: &rng)!
            }
            check(Data(bytes))
        }
    }

    @Test func mutatedValidFiles() {
        var rng = SeededGenerator(seed: 0x5EED)
        let base = Array(Self.seeds.utf8)
        let tokens = [":", "- ", "\n", "  ", "[", "]", "{", "}", "\"", "'", "*a", "&a ", "!!int ", "~", "0", "-1", "1e400",
                      "9999999999999999999999", "MiB", "xx", "\u{0}", "\u{FEFF}", "é", "\r\n", "---\n", "<<: "]
        for _ in 0..<2000 {
            var bytes = base
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                guard !bytes.isEmpty else { break }
                let at = Int.random(in: 0..<bytes.count, using: &rng)
                switch Int.random(in: 0..<5, using: &rng) {
                case 0: bytes[at] = UInt8.random(in: 0...255, using: &rng)
                case 1: bytes.remove(at: at)
                case 2: bytes.insert(contentsOf: Array(tokens.randomElement(using: &rng)!.utf8), at: at)
                case 3: bytes.removeSubrange(at..<min(bytes.count, at + Int.random(in: 1...40, using: &rng)))
                default:
                    let other = Int.random(in: 0..<bytes.count, using: &rng)
                    bytes.swapAt(at, other)
                }
            }
            check(Data(bytes))
        }
    }

    @Test func deeplyNestedInputIsRefusedNotOverflowed() {
        for text in [String(repeating: "[", count: 200_000), String(repeating: "- ", count: 100_000) + "x",
                     String(repeating: "{a: ", count: 50_000)] {
            let result = PolicyLoader.load(yaml: text, path: "deep.yaml")
            #expect(result.diagnostics.first?.hasSuffix("nesting is deeper than 128 levels; a policy needs only a few") == true)
        }
    }

    @Test func oversizedFilesAreRefused() {
        let big = minimal("# " + String(repeating: "x", count: 300_000) + "\n")
        #expect(PolicyLoader.load(yaml: big, path: "big.yaml").diagnostics == [
            "big.yaml:1:1: file is \(big.utf8.count) bytes; policy files may be at most 256KiB"
        ])
    }
}

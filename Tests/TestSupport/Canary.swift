import Foundation

/// A random secret a test hands to agentd as a credential and then searches for everywhere it
/// must never appear, in each form it could leak in: raw, base64 (also as the password of
/// HTTP basic auth), percent-encoded and JSON-escaped.
public struct Canary: Sendable, CustomStringConvertible {
    public let value: String

    /// `cnry+<hex>/<hex>`: the `+` and `/` make the percent-encoded and JSON-escaped forms
    /// differ from the raw one.
    public init() {
        let hex = { String(UInt64.random(in: 0...UInt64.max), radix: 16) }
        value = "cnry+\(hex())/\(hex())"
    }

    /// A canary made elsewhere (a test server's token).
    public init(_ value: String) {
        self.value = value
    }

    /// Every form searched for.
    public var forms: [String: String] {
        var forms = [
            "raw": value,
            "base64": Data(value.utf8).base64EncodedString(),
            "basic-auth base64": Data("x-access-token:\(value)".utf8).base64EncodedString(),
            "percent-encoded": value.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? value,
            "JSON-escaped": value.replacingOccurrences(of: "/", with: "\\/"),
        ]
        // The base64 of the value at each of the three alignments, without the padding-bound
        // ends: finds it inside a longer base64 text too.
        for shift in 0...2 {
            let padded = String(repeating: "a", count: shift) + value
            let encoded = Data(padded.utf8).base64EncodedString()
            forms["base64 (offset \(shift))"] = String(encoded.dropFirst(4).dropLast(4))
        }
        return forms
    }

    /// The forms found in `text`, by name (empty: none).
    public func found(in text: String) -> [String] {
        forms.filter { text.contains($0.value) }.map(\.key).sorted()
    }

    /// The forms found in the bytes of every regular file under `directory`, as
    /// `path: form` (empty: none).
    public func found(underDirectory directory: String) -> [String] {
        var hits: [String] = []
        guard let walker = FileManager.default.enumerator(atPath: directory) else { return ["cannot read \(directory)"] }
        while let relative = walker.nextObject() as? String {
            let path = directory + "/" + relative
            guard (try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType) == .typeRegular,
                let data = FileManager.default.contents(atPath: path)
            else { continue }
            let text = String(decoding: data, as: UTF8.self)
            hits += found(in: text).map { "\(relative): \($0)" }
        }
        return hits
    }

    /// Never shows the value.
    public var description: String { "Canary(\(value.count) characters)" }
}

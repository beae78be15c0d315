import Foundation
import Synchronization

/// A secret value with a name. Its `description` never shows the value, so a secret that
/// ends up in a log line or an error message stays hidden.
public struct Secret: Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    /// The name that replaces the value: `[REDACTED:name]`.
    public let name: String
    /// The secret bytes.
    public let value: [UInt8]

    /// - Parameters:
    ///   - name: 1–64 characters of `[A-Za-z0-9._-]`.
    ///   - value: the secret; must not be empty.
    /// - Throws: `SessionLogError(.invalidArgument)` for a bad name or an empty value.
    public init(name: String, value: String) throws {
        try self.init(name: name, bytes: Array(value.utf8))
    }

    /// Same as `init(name:value:)` for raw bytes.
    public init(name: String, bytes: [UInt8]) throws {
        guard !name.isEmpty, name.utf8.count <= 64, name.utf8.allSatisfy(SessionID.isAllowed) else {
            throw SessionLogError(.invalidArgument, "invalid secret name \"\(name)\": 1–64 characters of [A-Za-z0-9._-] are required")
        }
        guard !bytes.isEmpty else {
            throw SessionLogError(.invalidArgument, "secret \(name) has an empty value; an empty value cannot be redacted")
        }
        self.name = name
        self.value = bytes
    }

    /// `Secret(name: [REDACTED])`: never the value.
    public var description: String { "Secret(\(name): [REDACTED])" }
    /// Same as `description`.
    public var debugDescription: String { description }
}

/// Replaces every occurrence of a known secret value in an event's type and payload with
/// `[REDACTED:name]` before the event is framed, so the secret never reaches the disk.
///
/// Secrets can be added while the store runs (a vault learns a credential); each append
/// sees the secrets known when it started. Longer secrets are replaced first, so a secret
/// that contains another is redacted whole.
public final class Redactor: Sendable {
    private let secrets: Mutex<[Secret]>

    /// A redactor that knows `secrets`.
    public init(_ secrets: [Secret] = []) {
        self.secrets = Mutex(secrets.sorted { $0.value.count > $1.value.count })
    }

    /// Learns another secret.
    public func add(_ secret: Secret) {
        secrets.withLock {
            $0.append(secret)
            $0.sort { $0.value.count > $1.value.count }
        }
    }

    /// The names of the secrets known (never the values).
    public var names: [String] { secrets.withLock { $0.map(\.name) } }

    /// Returns `bytes` with every known secret value replaced by `[REDACTED:name]`.
    public func redact(_ bytes: [UInt8]) -> [UInt8] {
        let known = secrets.withLock { $0 }
        var out = bytes
        for secret in known { out = Redactor.replace(secret.value, with: Array("[REDACTED:\(secret.name)]".utf8), in: out) }
        return out
    }

    /// Returns `text` redacted the same way.
    public func redact(_ text: String) -> String {
        String(decoding: redact(Array(text.utf8)), as: UTF8.self)
    }

    static func replace(_ needle: [UInt8], with replacement: [UInt8], in haystack: [UInt8]) -> [UInt8] {
        let n = needle.count
        guard n > 0, haystack.count >= n else { return haystack }
        let first = needle[0]
        var out: [UInt8] = []
        var copiedUpTo = 0
        var i = 0
        let limit = haystack.count - n
        haystack.withUnsafeBufferPointer { h in
            needle.withUnsafeBufferPointer { nd in
                while i <= limit {
                    if h[i] == first && memcmp(h.baseAddress! + i, nd.baseAddress!, n) == 0 {
                        if out.isEmpty { out.reserveCapacity(haystack.count + replacement.count) }
                        out.append(contentsOf: h[copiedUpTo..<i])
                        out.append(contentsOf: replacement)
                        i += n
                        copiedUpTo = i
                    } else {
                        i += 1
                    }
                }
            }
        }
        if copiedUpTo == 0 { return haystack }
        out.append(contentsOf: haystack[copiedUpTo...])
        return out
    }
}


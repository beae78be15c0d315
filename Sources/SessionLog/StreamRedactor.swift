/// Redacts a stream of bytes that arrives in chunks (a command's output as it is produced),
/// so that a secret split across two chunks is still found.
///
/// Each `feed` lets out everything but the longest tail that could be the start of a known
/// secret (in any of its forms, see `Redactor`): that tail waits for the next chunk, which
/// tells whether the secret follows. Output that cannot begin a secret is never held, so a
/// command's lines reach the reader at once; at most one secret's length minus one byte
/// waits. A secret that straddles the point where the output is cut is let out whole,
/// redacted. `finish` lets the tail out.
public struct StreamRedactor: Sendable {
    private let redactor: Redactor
    /// Every form of every secret the redactor knew when the stream started.
    private let forms: [[UInt8]]
    private var pending: [UInt8] = []

    public init(_ redactor: Redactor) {
        self.redactor = redactor
        forms = redactor.allForms()
    }

    /// What `chunk` (after what was held back) lets out, redacted.
    public mutating func feed(_ chunk: [UInt8]) -> [UInt8] {
        guard !forms.isEmpty else { return chunk }
        pending += chunk
        var cut = pending.count - heldTail()
        // A secret that begins before the cut and ends after it is wholly in `pending` (one
        // that ran past the end would have been held): move the cut past it, so that it is
        // redacted whole.
        var moved = true
        while moved {
            moved = false
            for form in forms where form.count > 1 {
                var i = max(0, cut - form.count + 1)
                while i < cut, i + form.count <= pending.count {
                    if i + form.count > cut, pending[i] == form[0], pending[i..<(i + form.count)].elementsEqual(form) {
                        cut = i + form.count
                        moved = true
                        break
                    }
                    i += 1
                }
            }
        }
        guard cut > 0 else { return [] }
        let out = Array(pending[..<cut])
        pending.removeFirst(cut)
        return redactor.redact(out)
    }

    /// Whatever is still held back, redacted: the stream has ended.
    public mutating func finish() -> [UInt8] {
        defer { pending = [] }
        return pending.isEmpty ? [] : redactor.redact(pending)
    }

    /// The length of the longest tail of `pending` that is a proper prefix of some form.
    private func heldTail() -> Int {
        var longest = 0
        let n = pending.count
        for form in forms {
            var length = min(form.count - 1, n)
            while length > longest {
                if pending[n - length] == form[0], pending[(n - length)...].elementsEqual(form[..<length]) {
                    longest = length
                    break
                }
                length -= 1
            }
        }
        return longest
    }
}

import Blocking
import Foundation
import Logging

extension SessionStore {
    static let indexName = "index.bin"
    static let indexMagic: UInt32 = 0x494A_4741  // "AGJI"
    static let indexVersion: UInt32 = 1

    /// Opens and recovers the journal (runs on a blocking thread; see `open`).
    convenience init(directory: String, options: SessionStoreOptions, redactor: Redactor, logger: Logger) throws {
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            // 0700 whatever the umask or the unit says (chmod is not subject to the umask).
            if chmod(directory, 0o700) != 0 {
                throw SessionLogError.syscall("chmod", errno: errno, path: directory, context: "making the journal directory private (0700)")
            }
        } catch let error as SessionLogError {
            throw error
        } catch {
            throw SessionLogError(.ioError, "cannot create the journal directory \(directory): \(error.localizedDescription) — check the path and its permissions")
        }
        let lockPath = directory + "/LOCK"
        let lockFD = try Sys.open(lockPath, O_RDWR | O_CREAT, context: "opening the journal lock file")
        if flock(lockFD, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            _ = Glibc.close(lockFD)
            if e == EWOULDBLOCK {
                throw SessionLogError(.locked, "the journal at \(directory) is in use by another process (flock on \(lockPath)); stop it or use another directory", errno: e)
            }
            throw SessionLogError.syscall("flock", errno: e, path: lockPath, context: "locking the journal")
        }
        do {
            try self.init(directory: directory, options: options, redactor: redactor, logger: logger, lockFD: lockFD)
        } catch {
            _ = Glibc.close(lockFD)
            throw error
        }
    }

    convenience init(directory: String, options: SessionStoreOptions, redactor: Redactor, logger: Logger, lockFD: Int32) throws {
        var report = RecoveryReport()
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: directory)
        } catch {
            throw SessionLogError(.ioError, "cannot list the journal directory \(directory): \(error.localizedDescription)")
        }
        var ids = names.compactMap(SegmentFile.parseName).sorted()
        var files: [UInt32: SegmentFile] = [:]
        for id in ids {
            let path = directory + "/" + SegmentFile.name(id)
            files[id] = SegmentFile(id: id, directory: directory, fd: try Sys.open(path, O_RDWR, context: "opening segment \(SegmentFile.name(id))"))
        }
        if ids.isEmpty {
            let seg = try SessionStore.createSegment(id: 1, directory: directory, bytes: options.segmentBytes)
            files[1] = seg
            ids = [1]
        }

        var states: [SessionID: SessionState] = [:]
        var activeEnd: UInt64 = 0
        var start = (ids[0], UInt64(0))
        var unresolved: [UnresolvedDamage] = []
        do {
            // Segment ids are consecutive; a gap means a whole segment file is gone. Then the
            // index cannot be trusted either: scan, so that every session it broke is found.
            var missing: [UInt32] = []
            for (a, b) in zip(ids, ids.dropFirst()) where b != a + 1 { missing += Array((a + 1)..<b) }
            for id in missing {
                report.damage.append(.init(segment: SegmentFile.name(id), offset: 0, length: 0, session: nil, reason: "segment file is missing from \(directory)"))
            }
            var hints = IndexHints()
            let index = missing.isEmpty
                ? SessionStore.loadIndex(directory: directory, files: files, segmentBytes: options.segmentBytes)
                : .failure(IndexProblem(message: "segment files are missing"))
            switch index {
            case .success(let loaded):
                states = loaded.states
                start = loaded.covered
                report.usedIndex = true
            case .failure(let problem):
                report.indexProblem = problem.message
                hints = problem.hints
                if problem.logLacksIndexedRecords {
                    // The index saw durable records the log no longer has: something cut the
                    // log (a crash cannot: segments are preallocated). Say so loudly.
                    logger.warning(
                        "journal is shorter than its index: records the index had seen are gone; index rebuilt from the log",
                        metadata: ["journal.reason": "\(problem.message)"])
                } else if FileManager.default.fileExists(atPath: directory + "/" + SessionStore.indexName) {
                    logger.info("journal index rebuilt from the log", metadata: ["journal.reason": "\(problem.message)"])
                }
            }

            for id in ids where id >= start.0 {
                let from = id == start.0 ? start.1 : 0
                activeEnd = try SessionStore.scan(files[id]!, from: from, isLast: id == ids.last!, segmentBytes: options.segmentBytes, hints: hints, states: &states, report: &report, unresolved: &unresolved)
            }
        } catch {
            files.values.forEach { $0.closeFile() }
            throw error
        }

        SessionStore.resolve(unresolved, states: &states, report: &report)
        for key in Array(states.keys) { states[key]!.resetTentative() }
        report.damagedSessions = states.filter { $0.value.damage != nil }.keys.sorted()
        for d in report.damage { logger.info("journal damage found", metadata: ["journal.segment": "\(d.segment)", "journal.offset": "\(d.offset)", "journal.reason": "\(d.reason)"]) }
        if let t = report.tornTail { logger.info("journal torn tail truncated", metadata: ["journal.segment": "\(t.segment)", "journal.offset": "\(t.offset)"]) }

        let active = files[ids.last!]!
        let size = try Sys.fileSize(active.fd, path: active.path)
        var preallocated = size >= UInt64(options.segmentBytes)
        if !preallocated {
            preallocated = (try? Sys.preallocate(active.fd, from: Int(size), length: options.segmentBytes - Int(size), path: active.path)) ?? false
        }
        self.init(directory: directory, options: options, redactor: redactor, logger: logger, recovery: report, sessions: states, segments: files, active: active, activeEnd: activeEnd, preallocated: preallocated, lockFD: lockFD)
    }

    // MARK: Scanning

    /// Where the records of each session were according to an index that is intact (its
    /// checksum holds) but was not used: per segment, sorted by offset.
    typealias IndexHints = [UInt32: [(offset: UInt64, session: SessionID, seq: UInt64)]]

    /// A damaged record that no evidence attributed during the scan, with the session and
    /// seq its (unverified) bytes claim; `resolve` weighs the claim once every chain is known.
    struct UnresolvedDamage {
        var damageIndex: Int
        var segment: String
        var offset: UInt64
        var session: SessionID
        var seq: UInt64
        var reason: String
    }

    /// Scans one segment from `from`, applying valid records to `states` (checking each
    /// session's seq order and hash chain), locating damage, and truncating a torn tail when
    /// `isLast`. Returns the segment's logical end.
    ///
    /// A damaged record makes its session refused. Its owner is taken from the first evidence
    /// that holds (`owners`); a record none of it names goes to `unresolved`.
    static func scan(
        _ seg: SegmentFile, from: UInt64, isLast: Bool, segmentBytes: Int, hints: IndexHints = [:], states: inout [SessionID: SessionState],
        report: inout RecoveryReport, unresolved: inout [UnresolvedDamage]
    ) throws -> UInt64 {
        let size = Int(try Sys.fileSize(seg.fd, path: seg.path))
        guard Int(from) < size else { return from }
        let map = try seg.mapping(covering: size, segmentBytes: segmentBytes)
        let base = map.base
        var off = Int(from)
        defer { report.scannedBytes += UInt64(off - Int(from)) }
        while off < size {
            let parsed = Record.parse(base + off, available: size - off)
            if case .success(let h) = parsed {
                apply(base + off, h, loc: RecordLoc(segment: seg.id, length: UInt32(h.length), offset: UInt64(off)), segName: seg.name, states: &states)
                off += h.length
                continue
            }
            if case .failure(.zeros) = parsed, allZero(base + off, size - off) { return UInt64(off) }
            let next = findNextValid(base, from: off + 1, size: size)
            if next == nil && isLast {
                // A torn tail: the last, unacknowledged write did not complete. Cut it off.
                report.tornTail = .init(segment: seg.name, offset: UInt64(off), droppedBytes: UInt64(lastNonZero(base, from: off, size: size) - off))
                try Sys.truncate(seg.fd, to: UInt64(off), path: seg.path)
                _ = try? Sys.preallocate(seg.fd, from: off, length: max(segmentBytes, size) - off, path: seg.path)
                try Sys.fsync(seg.fd, path: seg.path, context: "truncating a torn tail")
                return UInt64(off)
            }
            let end = next ?? size
            let problem: String
            if case .failure(let p) = parsed { problem = p.text } else { problem = "unreadable record" }
            let found = owners(base + off, segment: seg.id, range: off..<end, available: size - off, hints: hints, states: states)
            report.damage.append(.init(segment: seg.name, offset: UInt64(off), length: UInt64(end - off), session: found.first?.0, reason: problem + (next == nil ? " (nothing valid follows in this sealed segment)" : "")))
            for (sid, seq) in found where states[sid]?.damage == nil {
                states[sid, default: SessionState()].damage = damageError(sid, segment: seg.name, offset: UInt64(off), seq: seq, reason: problem)
            }
            if found.isEmpty, let claim = Record.claims(base + off, available: size - off), let sid = claim.session {
                unresolved.append(UnresolvedDamage(damageIndex: report.damage.count - 1, segment: seg.name, offset: UInt64(off), session: sid, seq: claim.seq, reason: problem))
            }
            if next == nil { return UInt64(off) }
            off = end
        }
        return UInt64(off)
    }

    /// The sessions (and seqs) whose records the damaged range `range` of a segment held, from
    /// the evidence that can be trusted, strongest first:
    /// 1. a checksum that still covers the record's identity (`Record.attribute`);
    /// 2. an intact index that was not used but lists records starting in `range`, when
    ///    that session's chain has reached exactly the seq before (so a stale index cannot
    ///    point at a session whose chain goes on elsewhere);
    /// 3. the record's link to its predecessor: a `prevHash` equal to the SHA-256 of some
    ///    session's last record so far names that session (256 bits cannot match by chance).
    /// A single flipped bit leaves 1 or 3 intact everywhere in a record of seq 2 or later.
    static func owners(
        _ p: UnsafeRawPointer, segment: UInt32, range: Range<Int>, available: Int, hints: IndexHints, states: [SessionID: SessionState]
    ) -> [(SessionID, UInt64)] {
        var out: [(SessionID, UInt64)] = []
        if let trusted = Record.attribute(p, available: available) { out.append(trusted) }
        if let listed = hints[segment] {
            var lo = 0, hi = listed.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if listed[mid].offset < UInt64(range.lowerBound) { lo = mid + 1 } else { hi = mid }
            }
            while lo < listed.count, listed[lo].offset < UInt64(range.upperBound) {
                let h = listed[lo]
                lo += 1
                guard !out.contains(where: { $0.0 == h.session }) else { continue }
                let state = states[h.session]
                if state?.damage != nil || (state?.lastSeq ?? 0) + 1 == h.seq { out.append((h.session, h.seq)) }
            }
        }
        if out.isEmpty, let claim = Record.claims(p, available: available), claim.prevHash != .zero,
            let (sid, state) = states.first(where: { $0.value.lastSeq > 0 && $0.value.durableHash == claim.prevHash })
        {
            out.append((sid, state.lastSeq + 1))
        }
        return out
    }

    /// Attributes the damaged records no trusted evidence named, once every chain is known: a
    /// record that claims seq `n` of session S is S's when S's chain stops at `n - 1` and S has
    /// no earlier damage (its record `n` is missing: either nothing follows, or a later record
    /// showed the gap, which this record now locates more precisely). A claimed session that
    /// has no valid record at all is refused under that name when the claim is seq 1. A claim
    /// that does not fit (S's chain goes on past `n - 1`) is not believed: the bytes of the
    /// id are what was damaged, and the true owner is found by its broken chain.
    static func resolve(_ unresolved: [UnresolvedDamage], states: inout [SessionID: SessionState], report: inout RecoveryReport) {
        for u in unresolved {
            let fits: Bool
            if let state = states[u.session] {
                let earlier = state.damage.map { ($0.segment ?? "", $0.offset ?? 0) < (u.segment, u.offset) } ?? false
                fits = state.lastSeq + 1 == u.seq && !earlier
            } else {
                fits = u.seq == 1
            }
            guard fits else { continue }
            states[u.session, default: SessionState()].damage = damageError(u.session, segment: u.segment, offset: u.offset, seq: u.seq, reason: u.reason)
            let d = report.damage[u.damageIndex]
            report.damage[u.damageIndex] = .init(segment: d.segment, offset: d.offset, length: d.length, session: u.session, reason: d.reason)
        }
    }

    static func apply(_ p: UnsafeRawPointer, _ h: Record.Header, loc: RecordLoc, segName: String, states: inout [SessionID: SessionState]) {
        guard let sid = SessionID.fromBytes(Record.sessionBytes(p, h)) else { return }
        if states[sid] == nil { states[sid] = SessionState() }
        guard states[sid]!.damage == nil else { return }
        let expected = states[sid]!.lastSeq + 1
        if h.seq != expected {
            let reason = h.seq > expected
                ? "seq \(h.seq) follows seq \(expected - 1): records \(expected)…\(h.seq - 1) are missing"
                : "seq \(h.seq) appears again after seq \(expected - 1)"
            states[sid]!.damage = damageError(sid, segment: segName, offset: loc.offset, seq: h.seq, reason: reason)
            return
        }
        guard h.prevHash == states[sid]!.durableHash else {
            states[sid]!.damage = damageError(sid, segment: segName, offset: loc.offset, seq: h.seq, reason: "the hash chain is broken: its previous-record hash does not match seq \(expected - 1)")
            return
        }
        states[sid]!.locs.append(loc)
        states[sid]!.durableHash = Record.bodyHash(p, h)
        states[sid]!.durableEpoch = max(states[sid]!.durableEpoch, h.epoch)
        if Record.isType(p, h, checkpointType) { states[sid]!.checkpointSeq = h.seq }
    }

    static func allZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        var i = 0
        while i + 8 <= count {
            if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count {
            if p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }

    static func lastNonZero(_ p: UnsafeRawPointer, from: Int, size: Int) -> Int {
        var end = size
        while end > from && p.load(fromByteOffset: end - 1, as: UInt8.self) == 0 { end -= 1 }
        return end
    }

    /// The offset of the next fully valid record at or after `from`, if any.
    static func findNextValid(_ base: UnsafeRawPointer, from: Int, size: Int) -> Int? {
        var off = from
        while off + Record.fixedSize <= size {
            guard let hit = memchr(base + off, 0x41, size - off) else { return nil }
            let at = UnsafeRawPointer(hit) - base
            if at + Record.fixedSize > size { return nil }
            if UInt32(littleEndian: (base + at).loadUnaligned(as: UInt32.self)) == Record.magic,
                case .success = Record.parse(base + at, available: size - at)
            {
                return at
            }
            off = at + 1
        }
        return nil
    }

    // MARK: The persisted index

    struct LoadedIndex {
        var states: [SessionID: SessionState]
        var covered: (UInt32, UInt64)
    }

    struct IndexProblem: Error {
        var message: String
        /// The index covers log bytes that are no longer there: acknowledged records are lost.
        var logLacksIndexedRecords = false
        /// Set when the index itself is intact but disagrees with the log: where it says the
        /// records are, to attribute damage that the scan finds there.
        var hints: IndexHints = [:]
    }

    func nextIndexGeneration() -> UInt64 {
        indexLock.withLock {
            indexGeneration += 1
            return indexGeneration
        }
    }

    func persistIndexInBackground(covered: (UInt32, UInt64)) {
        let snapshot = lock.withLock { table }
        let generation = nextIndexGeneration()
        BlockingPool.shared.submit {
            do { try self.persistIndex(snapshot, covered: covered, generation: generation) } catch {
                self.logger.info("could not persist the journal index", metadata: ["journal.error": "\(error)"])
            }
        }
    }

    /// Writes the durable part of `states` to `index.bin` atomically (temp file, fsync,
    /// rename). An older generation never replaces a newer one.
    func persistIndex(_ states: [SessionID: SessionState], covered: (UInt32, UInt64), generation: UInt64) throws {
        var out: [UInt8] = []
        var count = 0
        for (_, s) in states { count += s.locs.count }
        out.reserveCapacity(64 + states.count * 256 + count * 16)
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        put(SessionStore.indexMagic)
        put(SessionStore.indexVersion)
        put(covered.0)
        put(covered.1)
        put(UInt32(states.count))
        for (sid, s) in states {
            let bytes = Array(sid.rawValue.utf8)
            put(UInt16(bytes.count))
            out.append(contentsOf: bytes)
            put(s.durableEpoch)
            put(s.checkpointSeq)
            out.append(contentsOf: s.durableHash.bytes)
            let damage = Array((s.damage?.message ?? "").utf8)
            put(UInt32(damage.count))
            out.append(contentsOf: damage)
            let segName = Array((s.damage?.segment ?? "").utf8)
            put(UInt16(segName.count))
            out.append(contentsOf: segName)
            put(s.damage?.offset ?? 0)
            put(UInt64(s.locs.count))
            for l in s.locs {
                put(l.segment)
                put(l.length)
                put(l.offset)
            }
        }
        put(CRC32C.checksum(out))

        indexLock.lock()
        defer { indexLock.unlock() }
        guard generation > writtenIndexGeneration else { return }
        let tmp = directory + "/" + SessionStore.indexName + ".tmp"
        let fd = try Sys.open(tmp, O_WRONLY | O_CREAT | O_TRUNC, context: "writing the journal index")
        do {
            try out.withUnsafeBytes { try Sys.pwriteAll(fd, $0, at: 0, path: tmp, context: "writing the journal index") }
            try Sys.fsync(fd, path: tmp, context: "writing the journal index")
        } catch {
            _ = Glibc.close(fd)
            unlink(tmp)
            throw error
        }
        _ = Glibc.close(fd)
        if rename(tmp, directory + "/" + SessionStore.indexName) != 0 {
            throw SessionLogError.syscall("rename", errno: errno, path: tmp, context: "installing the journal index")
        }
        try? Sys.fsyncDirectory(directory)
        writtenIndexGeneration = generation
    }

    /// Loads `index.bin` and checks that it agrees with the log: its checksum, the segments
    /// it names, and the last record of every session (seq, id and hash). Any disagreement
    /// means it is stale, and the log is scanned instead.
    static func loadIndex(directory: String, files: [UInt32: SegmentFile], segmentBytes: Int) -> Result<LoadedIndex, IndexProblem> {
        let path = directory + "/" + indexName
        guard let data = FileManager.default.contents(atPath: path) else { return .failure(IndexProblem(message: "no index file")) }
        let bytes = [UInt8](data)
        guard bytes.count >= 28 else { return .failure(IndexProblem(message: "index file is too short")) }
        let stored = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: bytes.count - 4, as: UInt32.self)) }
        guard stored == bytes.withUnsafeBytes({ CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<(bytes.count - 4)])) }) else {
            return .failure(IndexProblem(message: "index checksum mismatch"))
        }
        var pos = 0
        let limit = bytes.count - 4
        struct Short: Error {}
        func get<T: FixedWidthInteger>(_: T.Type) throws -> T {
            guard pos + MemoryLayout<T>.size <= limit else { throw Short() }
            defer { pos += MemoryLayout<T>.size }
            return bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: pos, as: T.self)) }
        }
        func take(_ n: Int) throws -> [UInt8] {
            guard n >= 0, pos + n <= limit else { throw Short() }
            defer { pos += n }
            return Array(bytes[pos..<(pos + n)])
        }
        do {
            guard try get(UInt32.self) == indexMagic, try get(UInt32.self) == indexVersion else {
                return .failure(IndexProblem(message: "index has an unknown format"))
            }
            let covered = (try get(UInt32.self), try get(UInt64.self))
            guard let coveredFile = files[covered.0], covered.1 <= (try Sys.fileSize(coveredFile.fd, path: coveredFile.path)) else {
                return .failure(
                    IndexProblem(
                        message: "index covers \(SegmentFile.name(covered.0)) offset \(covered.1), which the log does not have",
                        logLacksIndexedRecords: true))
            }
            let count = try get(UInt32.self)
            var states: [SessionID: SessionState] = [:]
            states.reserveCapacity(Int(count))
            for _ in 0..<count {
                let sidBytes = try take(Int(try get(UInt16.self)))
                guard let sid = sidBytes.withUnsafeBytes({ SessionID.fromBytes($0) }) else { return .failure(IndexProblem(message: "index holds an invalid session id")) }
                var s = SessionState()
                s.durableEpoch = try get(UInt64.self)
                s.checkpointSeq = try get(UInt64.self)
                s.durableHash = try take(32).withUnsafeBytes { Hash32($0) }
                let damage = String(decoding: try take(Int(try get(UInt32.self))), as: UTF8.self)
                let damageSegment = String(decoding: try take(Int(try get(UInt16.self))), as: UTF8.self)
                let damageOffset = try get(UInt64.self)
                if !damage.isEmpty { s.damage = SessionLogError(.damaged, damage, segment: damageSegment, offset: damageOffset) }
                let n = try get(UInt64.self)
                guard n <= UInt64(limit / 16) else { throw Short() }
                s.locs.reserveCapacity(Int(n))
                for _ in 0..<n { s.locs.append(RecordLoc(segment: try get(UInt32.self), length: try get(UInt32.self), offset: try get(UInt64.self))) }
                states[sid] = s
            }
            for (sid, s) in states {
                if let last = s.locs.last, s.damage == nil {
                    guard let f = files[last.segment], let m = try? f.mapping(covering: Int(last.offset) + Int(last.length), segmentBytes: segmentBytes),
                        Int(last.offset) + Int(last.length) <= Int((try? Sys.fileSize(f.fd, path: f.path)) ?? 0),
                        case .success(let h) = Record.parse(m.base + Int(last.offset), available: Int(last.length)),
                        h.seq == s.lastSeq, SessionID.fromBytes(Record.sessionBytes(m.base + Int(last.offset), h)) == sid,
                        Record.bodyHash(m.base + Int(last.offset), h) == s.durableHash
                    else {
                        // The last record is damaged, or the index is out of step with the log:
                        // scan, but keep what the index says to name the owners of damage.
                        var hints = IndexHints()
                        for (sid, s) in states {
                            for (i, l) in s.locs.enumerated() { hints[l.segment, default: []].append((l.offset, sid, UInt64(i + 1))) }
                        }
                        for key in Array(hints.keys) { hints[key]!.sort { $0.offset < $1.offset } }
                        return .failure(IndexProblem(message: "index is stale: the last record of session \(sid) does not match the log", hints: hints))
                    }
                }
            }
            return .success(LoadedIndex(states: states, covered: covered))
        } catch {
            return .failure(IndexProblem(message: "index file is truncated"))
        }
    }
}

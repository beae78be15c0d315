import Blocking
import Foundation
import Glibc
import SystemdBus
import Synchronization

/// Workspaces bounded on disk: each one is a sparse file holding an ext4 filesystem of the
/// policy's `hands.disk` size, loop-mounted `nosuid,nodev` under the state directory and
/// bind-mounted at `/workspace` by both drivers (the engine's `HostConfig.Binds`, the unit's
/// `BindPaths=`).
///
/// Why a filesystem of its own: writing past the limit fails with ENOSPC inside the sandbox
/// and never touches the host's disk, whichever driver runs it and without quota support on
/// the host filesystem; the filesystem's root is owned by the sandbox's own uid
/// (`mkfs.ext4 -E root_owner=`), and a hard link can never reach a file outside it.
///
/// Why a reserve: the images live on the state directory's disk, next to the journal. An
/// image is sparse, so what it may still grow by is *promised* space; making one is refused
/// when the disk's free space, minus what every image may still grow by, minus the new image,
/// would fall below `reserveBytes` — so that workspaces together can never fill the disk the
/// journal needs.
///
/// Layout: `<directory>/images/<name>.img` and the mount point `<directory>/mnt/<name>`, both
/// in 0700 directories owned by root. A task's workspace (`t-…`) goes with its sandbox; a
/// session's (`s-…`) stays, unmounted, between its tasks until `remove` (session deletion).
///
/// After a restart of agentd, the sandboxes of live tasks are adopted with their workspaces
/// (`attach`), those of other tasks removed (`closeOrphan`), and then `sweep` unmounts what
/// no sandbox uses any more and removes those task images.
public actor WorkspaceImages {
    /// A mounted workspace as a sandbox uses it.
    public struct Workspace: Sendable, Equatable {
        public var name: String
        /// Owner of the filesystem's root; the sandbox's uid and gid.
        public var uid: Int
        /// The mount point on the host (what is bind-mounted at `/workspace`).
        public var hostPath: String
    }

    public nonisolated let directory: String
    public nonisolated let uids: SandboxUIDs
    /// Free space kept on the state directory's disk for the journal.
    public nonisolated let reserveBytes: Int
    /// Sandboxes using each mounted workspace.
    private var users: [String: Int] = [:]
    /// Workspaces taken back for sandboxes adopted after a restart (`attach`), until unused.
    private var attached: Set<String> = []
    /// Names with an operation under way, and who waits for each (one operation per name).
    private var busy: Set<String> = []
    private var waiters: [String: [CheckedContinuation<Void, Never>]] = [:]

    /// The default reserve, 256 MiB (agentd's `--workspace-reserve`).
    public static let defaultReserveBytes = 256 << 20
    /// Serializes the free-space check with the creation of the image it admits.
    private static let admission = Mutex(())

    /// Makes the store's directories. What a previous run left mounted stays until `sweep`:
    /// sandboxes that outlived it may still use it.
    /// - Throws: `HandsError.provisioning` when a directory cannot be made.
    public init(directory: String, uids: SandboxUIDs = .shared, reserveBytes: Int = defaultReserveBytes) throws {
        self.directory = directory
        self.uids = uids
        self.reserveBytes = reserveBytes
        for dir in [directory, directory + "/images", directory + "/mnt"] {
            do {
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw HandsError(.provisioning, "cannot create the workspace directory \(dir): \(error.localizedDescription)")
            }
        }
    }

    /// The name of a task's workspace, unique to the sandbox: `unique` is a random id or a
    /// unit's slice stem (its `\` becomes `.`, which a stem never holds).
    public static func taskName(_ unique: String) -> String {
        "t-" + unique.replacingOccurrences(of: "\\", with: ".")
    }

    /// The name of `session`'s shared workspace (`workspace: session`).
    public static func sessionName(instance: String, session: String) -> String {
        "s-" + fileName(instance) + "-" + fileName(session)
    }

    /// Opens workspace `name` for one more sandbox: gives it a uid (the one it has while other
    /// sandboxes use it), makes its image of `sizeBytes` if there is none, mounts it, and makes
    /// the sandbox's uid the owner of every file of a kept image made for an earlier task.
    /// - Throws: `HandsError.provisioning` when the disk's reserve would be crossed, the range
    ///   has no free uid, or mkfs or mount fail.
    public func open(_ name: String, sizeBytes: Int) async throws -> Workspace {
        try Self.checkName(name)
        await lock(name)
        defer { unlock(name) }
        let uid = try uids.acquire(name)
        let paths = Paths(directory: directory, name: name)
        if users[name, default: 0] == 0 {
            do {
                try await BlockingPool.shared.run { [reserveBytes, directory] in
                    try Self.prepare(paths, sizeBytes: sizeBytes, uid: uid, reserveBytes: reserveBytes, directory: directory)
                }
            } catch {
                uids.release(name)
                throw error
            }
        }
        users[name, default: 0] += 1
        return Workspace(name: name, uid: uid, hostPath: paths.mount)
    }

    /// A sandbox using `name` is gone: when it was the last, unmounts the workspace, gives its
    /// uid back and, for a task's workspace, removes the image. Idempotent; an unknown name
    /// (a sandbox from before a restart) is cleared as if it was the last user.
    public func close(_ name: String) async {
        guard (try? Self.checkName(name)) != nil else { return }
        await lock(name)
        defer { unlock(name) }
        let left = max(0, users[name, default: 0] - 1)
        users[name] = left == 0 ? nil : left
        guard left == 0 else { return }
        attached.remove(name)
        uids.release(name)
        let paths = Paths(directory: directory, name: name)
        _ = try? await BlockingPool.shared.run { Self.unmount(paths, removeImage: name.hasPrefix("t-")) }
    }

    /// Removes workspace `name` and its image (a deleted session's data).
    /// - Throws: `HandsError.invalidRequest` while a sandbox still uses it.
    public func remove(_ name: String) async throws {
        try Self.checkName(name)
        await lock(name)
        defer { unlock(name) }
        guard users[name, default: 0] == 0 else {
            throw HandsError(.invalidRequest, "workspace \(name) is still used by \(users[name, default: 0]) sandbox(es); end the session's tasks first")
        }
        attached.remove(name)
        uids.release(name)
        let paths = Paths(directory: directory, name: name)
        _ = try? await BlockingPool.shared.run { Self.unmount(paths, removeImage: true) }
    }

    /// Records a sandbox that survived a restart: it holds `uid` for workspace `name`.
    public nonisolated func adopt(_ name: String, uid: Int) { uids.reserve(uid, for: name) }

    /// Takes workspace `name`, still mounted by a previous run of agentd, into use for one
    /// more sandbox that survived the restart and is adopted; it keeps `uid`.
    /// - Returns: the workspace, or nil when it is not mounted (the sandbox cannot be served:
    ///   staging a file needs the mount) or the name is not valid.
    public func attach(_ name: String, uid: Int) async -> Workspace? {
        guard (try? Self.checkName(name)) != nil else { return nil }
        await lock(name)
        defer { unlock(name) }
        let paths = Paths(directory: directory, name: name)
        guard Self.isMountPoint(paths.mount) else { return nil }
        uids.reserve(uid, for: name)
        users[name, default: 0] += 1
        attached.insert(name)
        return Workspace(name: name, uid: uids.uid(of: name) ?? uid, hostPath: paths.mount)
    }

    /// A sandbox left by a previous run, and not adopted, is gone: closes `name` as `close`
    /// does, unless an adopted sandbox uses it (a session's workspace shared with an adopted
    /// sibling): the orphan was never counted as one of its users.
    public func closeOrphan(_ name: String) async {
        guard !attached.contains(name) else { return }
        await close(name)
    }

    /// Unmounts every workspace no sandbox of this run uses and removes those task images:
    /// what the sandboxes of a previous run, all adopted or removed by now, left behind.
    /// Called once after the restore at start, before anything is provisioned.
    public func sweep() {
        let inUse = Set(users.filter { $0.value > 0 }.keys)
        Self.sweep(directory, keeping: inUse)
    }

    /// How many sandboxes use workspace `name` now.
    public func userCount(_ name: String) -> Int { users[name, default: 0] }

    /// The names of the images on disk (tests, diagnostics).
    public nonisolated func imageNames() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/images")) ?? [])
            .filter { $0.hasSuffix(".img") }.map { String($0.dropLast(4)) }.sorted()
    }

    /// The host path of workspace `name`'s mount point.
    public nonisolated func hostPath(_ name: String) -> String { Paths(directory: directory, name: name).mount }

    // MARK: - per-name lock

    private func lock(_ name: String) async {
        if busy.insert(name).inserted { return }
        await withCheckedContinuation { waiters[name, default: []].append($0) }
    }

    private func unlock(_ name: String) {
        if var queue = waiters[name], !queue.isEmpty {
            // The next waiter takes the lock over; `busy` keeps the name.
            let next = queue.removeFirst()
            waiters[name] = queue.isEmpty ? nil : queue
            next.resume()
        } else {
            busy.remove(name)
        }
    }

    // MARK: - blocking work (on the blocking pool)

    struct Paths: Sendable {
        let image: String
        let mount: String
        init(directory: String, name: String) {
            image = directory + "/images/" + name + ".img"
            mount = directory + "/mnt/" + name
        }
    }

    private static func prepare(_ paths: Paths, sizeBytes: Int, uid: Int, reserveBytes: Int, directory: String) throws {
        let made = try admit(paths.image, sizeBytes: sizeBytes, reserveBytes: reserveBytes, directory: directory)
        do {
            if made {
                try command(["/sbin/mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=\(uid):\(uid)", paths.image], doing: "making the workspace's filesystem")
            }
            if mkdir(paths.mount, 0o700) != 0 && errno != EEXIST {
                throw failure("mkdir(\(paths.mount))", errno, .provisioning)
            }
            if !isMountPoint(paths.mount) {
                try command(["/bin/mount", "-o", "loop,nosuid,nodev", paths.image, paths.mount], doing: "mounting the workspace")
            }
            // mkfs's root-owned lost+found would be the one thing in the workspace its user
            // cannot touch (e2fsck makes it again if it ever needs it).
            if made { rmdir(paths.mount + "/lost+found") }
            var st = stat()
            guard stat(paths.mount, &st) == 0 else { throw failure("stat(\(paths.mount))", errno, .provisioning) }
            if Int(st.st_uid) != uid || Int(st.st_gid) != uid {
                // A session's image made for an earlier task (another uid): its files become
                // this sandbox's. -h: symbolic links themselves, never what they point to.
                try command(["/bin/chown", "-hR", "\(uid):\(uid)", paths.mount], doing: "giving the session's workspace to the sandbox's user")
            }
        } catch {
            unmount(paths, removeImage: made)
            throw error
        }
    }

    /// Creates the sparse image file when there is none and the disk can take it.
    /// - Returns: whether it was made now.
    private static func admit(_ image: String, sizeBytes: Int, reserveBytes: Int, directory: String) throws -> Bool {
        try admission.withLock { _ in
            if access(image, F_OK) == 0 { return false }
            var fs = statvfs()
            guard statvfs(directory, &fs) == 0 else { throw failure("statvfs(\(directory))", errno, .provisioning) }
            let free = Int(clamping: UInt64(fs.f_bavail).multipliedReportingOverflow(by: UInt64(fs.f_frsize)).partialValue)
            let promised = promisedBytes(directory + "/images")
            let (needed, overflow) = sizeBytes.addingReportingOverflow(reserveBytes)
            if overflow || free - promised < needed {
                throw HandsError(
                    .provisioning,
                    "refusing to make a \(formatBytes(sizeBytes)) workspace: the state directory's disk has \(formatBytes(free)) free, "
                        + "\(formatBytes(promised)) of it promised to existing workspaces, and \(formatBytes(reserveBytes)) is kept for the journal "
                        + "— lower the policy's hands.disk, end idle tasks or delete sessions, or free space on \(directory)")
            }
            let fd = Glibc.open(image, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw failure("open(\(image))", errno, .provisioning) }
            defer { Glibc.close(fd) }
            guard ftruncate(fd, off_t(sizeBytes)) == 0 else {
                let e = errno
                unlink(image)
                throw failure("ftruncate(\(image), \(sizeBytes))", e, .provisioning)
            }
            return true
        }
    }

    /// What the images in `images` may still grow by: apparent size minus allocated bytes.
    static func promisedBytes(_ images: String) -> Int {
        var total = 0
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: images)) ?? [] where entry.hasSuffix(".img") {
            var st = stat()
            guard lstat(images + "/" + entry, &st) == 0 else { continue }
            total += max(0, Int(st.st_size) - Int(st.st_blocks) * 512)
        }
        return total
    }

    /// Unmounts (lazily: a sandbox being removed may still hold it) and removes the mount
    /// point, and the image when asked.
    private static func unmount(_ paths: Paths, removeImage: Bool) {
        // MNT_DETACH: lazily, as `umount -l`; `mount -o loop` set the loop device to detach
        // itself (autoclear) once the last user of the filesystem is gone.
        if isMountPoint(paths.mount) { _ = umount2(paths.mount, Int32(MNT_DETACH)) }
        rmdir(paths.mount)
        if removeImage { unlink(paths.image) }
    }

    /// Unmounts everything under `mnt/` and removes task images, except workspaces `keeping`.
    private static func sweep(_ directory: String, keeping: Set<String>) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory + "/mnt")) ?? [] where !keeping.contains(name) {
            unmount(Paths(directory: directory, name: name), removeImage: false)
        }
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: directory + "/images")) ?? []
        where entry.hasPrefix("t-") && entry.hasSuffix(".img") && !keeping.contains(String(entry.dropLast(".img".count))) {
            unlink(directory + "/images/" + entry)
        }
    }

    static func isMountPoint(_ path: String) -> Bool {
        var st = stat()
        var parent = stat()
        guard lstat(path, &st) == 0, lstat(path + "/..", &parent) == 0 else { return false }
        return st.st_dev != parent.st_dev
    }

    /// Runs a host command (mkfs, mount, chown) to its end, on the calling (blocking) thread.
    /// posix_spawn and waitpid, not Foundation's `Process`, which leaves descriptors behind in
    /// a long-lived daemon.
    /// - Throws: `HandsError.provisioning` with its stderr when it fails.
    private static func command(_ argv: [String], doing what: String) throws {
        // Close-on-exec both ends: only the dup2'd stderr reaches the child.
        let stderrPipe: (read: Int32, write: Int32)
        do { stderrPipe = try UnitStreams.pipe() } catch { throw HandsError(.provisioning, "\(what): cannot make a pipe: \(error)") }
        let pipeFDs = [stderrPipe.read, stderrPipe.write]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 2)
        let cArgs = argv.map { strdup($0) } + [nil]
        let environment: [String] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"]
        let cEnv = environment.map { strdup($0) } + [nil]
        defer { (cArgs + cEnv).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
        Glibc.close(pipeFDs[1])
        guard rc == 0 else {
            Glibc.close(pipeFDs[0])
            throw HandsError(.provisioning, "\(what): cannot start \(argv[0]): \(String(cString: strerror(rc)))")
        }
        var message: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(pipeFDs[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            if message.count < 64 << 10 { message += buffer[0..<n] }
        }
        Glibc.close(pipeFDs[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED && WEXITSTATUS == 0, spelled out (the macros are not imported).
        guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else {
            let detail = String(decoding: message, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            throw HandsError(
                .provisioning, "\(what): \(argv.joined(separator: " ")) failed (wait status \(status))\(detail.isEmpty ? "" : ": " + detail)")
        }
    }

    private static func failure(_ call: String, _ code: Int32, _ kind: HandsError.Kind) -> HandsError {
        HandsError(kind, "\(call) failed: \(String(cString: strerror(code))) (errno \(code))")
    }

    private static func checkName(_ name: String) throws {
        guard !name.isEmpty, name.utf8.count <= 251, !name.hasPrefix("."),
            name.utf8.allSatisfy({ isFileNameByte($0) })
        else { throw HandsError(.invalidRequest, "'\(name)' is not a workspace name") }
    }

    private static func isFileNameByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == UInt8(ascii: "-") || b == UInt8(ascii: "_")
            || b == UInt8(ascii: ".")
    }

    /// `id` with every byte but ASCII letters and digits as `_XX`, so that ids of any form
    /// make distinct, safe file names and `-` can separate them.
    static func fileName(_ id: String) -> String {
        var out = ""
        for b in id.utf8 {
            if (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) {
                out.append(Character(UnicodeScalar(b)))
            } else {
                let hex = String(b, radix: 16)
                out += "_" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return out
    }
}

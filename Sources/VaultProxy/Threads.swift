#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The two thread primitives the control channel needs, on pthreads: Foundation's `Thread` and
/// `NSCondition` would link all of Foundation (and ICU) into vault-proxy, ~6 MiB of RSS.
enum Threads {
    /// Starts a detached thread named `name` (its first 15 bytes: the kernel's limit) that runs
    /// `body` and ends when it returns.
    /// - Precondition: the thread can be created (fails only when the process is out of threads
    ///   or memory, which a proxy cannot run without).
    static func start(name: String, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(ThreadBody(name: name, body: body)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        pthread_attr_setstacksize(&attr, 1 << 20)
        #if canImport(Glibc)
        var thread = pthread_t()
        #else
        var thread: pthread_t?
        #endif
        let rc = pthread_create(&thread, &attr, runThreadBody, box)
        guard rc == 0 else {
            Unmanaged<ThreadBody>.fromOpaque(box).release()
            fatalError("cannot start thread \(name): pthread_create failed with errno \(rc)")
        }
    }
}

private final class ThreadBody {
    let name: String
    let body: @Sendable () -> Void
    init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }
}

private func runThreadBody(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let box = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
    #if canImport(Glibc)
    // Glibc's module does not import pthread_setname_np (a GNU extension); the kernel takes the
    // name through the thread's comm file.
    let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    if fd >= 0 {
        let name = Array(box.name.utf8.prefix(15))
        _ = name.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
    #else
    _ = pthread_setname_np(box.name)
    #endif
    box.body()
    return nil
}

/// A mutex with one condition variable (what `NSCondition` offers): `lock`, `unlock`, `wait`
/// (with the lock held) and `signal`.
final class Condition: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        mutex.initialize(to: pthread_mutex_t())
        cond.initialize(to: pthread_cond_t())
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    /// Releases the lock until signalled, then holds it again (wake-ups may be spurious: loop).
    func wait() { pthread_cond_wait(cond, mutex) }
    func signal() { pthread_cond_signal(cond) }
    /// `wait()` for at most `nanoseconds` (woken by `signal`, a timeout, or spuriously).
    func wait(nanoseconds: Int) {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        let total = deadline.tv_nsec + nanoseconds
        deadline.tv_sec += total / 1_000_000_000
        deadline.tv_nsec = total % 1_000_000_000
        pthread_cond_timedwait(cond, mutex, &deadline)
    }
}

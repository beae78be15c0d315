import Blocking
import CSystemd
import Foundation
import Glibc
import Synchronization

/// One D-Bus method call to send.
public struct BusCall: Sendable {
    public var destination: String?
    public var path: String
    public var interface: String
    public var member: String
    public var arguments: [BusValue]
    public var timeout: Duration

    public init(
        destination: String? = "org.freedesktop.systemd1", path: String, interface: String, member: String,
        arguments: [BusValue] = [], timeout: Duration = .seconds(25)
    ) {
        self.destination = destination
        self.path = path
        self.interface = interface
        self.member = member
        self.arguments = arguments
        self.timeout = timeout
    }
}

/// A signal received from the bus.
public struct BusSignal: Sendable {
    public var path: String
    public var interface: String
    public var member: String
    public var arguments: [BusValue]
}

/// An sd-bus connection of its own (never the thread-local default bus), driven by one
/// dedicated thread.
///
/// sd-bus objects may be used by one thread at a time, and `sd_bus_call` blocks. So the
/// connection lives on its own event-loop thread, which polls the bus fd together with an
/// eventfd that wakes it when work is queued. Calls are sent with `sd_bus_call_async` and a
/// timeout; replies and signals are decoded into `BusValue`s on that thread and handed back
/// to tasks through continuations. Nothing here blocks the cooperative pool.
public final class BusConnection: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `bus` and `matches` are touched only on the loop
    // thread; `queue`, `closed` only under `lock`; `wakeFD` is written with eventfd_write.
    private var bus: OpaquePointer?
    private let lock = NSLock()
    /// Work for the loop thread; it gets the bus, or nil when the connection has closed.
    private var queue: [(OpaquePointer?) -> Void] = []
    private var closed = false
    private let wakeFD: Int32
    public let address: SystemdAddress

    private init(address: SystemdAddress, wakeFD: Int32) {
        self.address = address
        self.wakeFD = wakeFD
    }

    /// Opens a connection to the manager at `address` and starts its loop thread.
    /// - Throws: `SystemdError.unreachable` naming the address and what to do.
    public static func open(_ address: SystemdAddress) async throws -> BusConnection {
        let efd = csd_eventfd_nonblocking()
        guard efd >= 0 else { throw SystemdError(.unreachable, "eventfd failed: \(String(cString: strerror(errno)))", errno: errno) }
        let connection = BusConnection(address: address, wakeFD: efd)
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            startDedicatedThread(name: "agentd-sdbus") {
                do {
                    connection.bus = try Self.connect(address)
                    continuation.resume()
                } catch {
                    continuation.resume(throwing: error)
                    return
                }
                connection.loop()
            }
        }
        return connection
    }

    private static func connect(_ address: SystemdAddress) throws -> OpaquePointer {
        var bus: OpaquePointer?
        let hint = "is the manager running? Run `make env` (it starts one when PID 1 is not systemd) and export the AGENTD_SYSTEMD it prints"
        switch address {
        case .system:
            let r = sd_bus_open_system(&bus)
            if r < 0 { throw SystemdError(.unreachable, "cannot connect to the system bus: \(String(cString: strerror(-r))) — \(hint)", errno: -r) }
        case .address(let text):
            var r = sd_bus_new(&bus)
            if r < 0 { throw SystemdError.syscall("sd_bus_new", r, "connecting to \(text)", code: .unreachable) }
            r = sd_bus_set_address(bus, text)
            if r >= 0 { r = sd_bus_start(bus) }
            if r < 0 {
                sd_bus_unref(bus)
                throw SystemdError(.unreachable, "cannot connect to the systemd manager at \(text): \(String(cString: strerror(-r))) — \(hint)", errno: -r)
            }
        }
        return bus!
    }

    /// Closes the connection; pending calls fail with `.closed`. The loop thread keeps the
    /// connection alive until this is called (`SystemdManager` calls it when it goes away).
    public func close() {
        lock.lock()
        closed = true
        lock.unlock()
        wake()
    }

    /// The loop thread holds a reference while it runs, so this runs after the loop ended;
    /// only then is the eventfd closed (an earlier close could let `wake()` write into an
    /// unrelated descriptor that reused its number).
    deinit { Glibc.close(wakeFD) }

    /// Queues `work` to run on the loop thread with the bus.
    private func enqueue(_ work: @escaping (OpaquePointer?) -> Void) -> Bool {
        lock.lock()
        if closed { lock.unlock(); return false }
        queue.append(work)
        lock.unlock()
        wake()
        return true
    }

    private func wake() { _ = csd_eventfd_signal(wakeFD) }

    private func loop() {
        guard let bus else { return }
        while true {
            lock.lock()
            let work = queue
            queue.removeAll()
            let stop = closed
            lock.unlock()
            if stop { break }
            for item in work { item(bus) }
            // Dispatch everything that is ready.
            while sd_bus_process(bus, nil) > 0 {}
            // The manager went away: sd-bus has already failed the pending calls.
            if sd_bus_is_open(bus) <= 0 { break }
            var fds = [
                pollfd(fd: sd_bus_get_fd(bus), events: Int16(truncatingIfNeeded: sd_bus_get_events(bus)), revents: 0),
                pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
            ]
            var timeoutUsec: UInt64 = .max
            sd_bus_get_timeout(bus, &timeoutUsec)
            var timeoutMs: Int32 = -1
            if timeoutUsec != .max {
                var ts = timespec()
                clock_gettime(CLOCK_MONOTONIC, &ts)
                let nowUsec = UInt64(ts.tv_sec) * 1_000_000 + UInt64(ts.tv_nsec) / 1000
                timeoutMs = timeoutUsec <= nowUsec ? 0 : Int32(min((timeoutUsec - nowUsec + 999) / 1000, 60_000))
            }
            let r = poll(&fds, 2, timeoutMs)
            if r < 0 && errno != EINTR { break }
            if fds[1].revents != 0 {
                _ = csd_eventfd_drain(wakeFD)
            }
        }
        // Fail whatever is still queued, then release the bus and every match with it.
        lock.lock()
        let leftovers = queue
        queue.removeAll()
        closed = true
        lock.unlock()
        // Closing first makes sd_bus_process deliver a "connection terminated" error to every
        // call still waiting for its reply, so that no continuation is left hanging.
        sd_bus_close(bus)
        while sd_bus_process(bus, nil) > 0 {}
        for (_, slot) in matches { sd_bus_slot_unref(slot) }
        matches.removeAll()
        sd_bus_flush_close_unref(bus)
        self.bus = nil
        for item in leftovers { item(nil) }
    }

    // MARK: - Calls

    /// Sends `call` and returns the reply's values.
    /// - Throws: `SystemdError.callFailed` with the D-Bus error name and message,
    ///   `.timeout` after `call.timeout`, `.closed` when the connection is closed.
    public func call(_ call: BusCall) async throws -> [BusValue] {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[BusValue], any Error>) in
            let box = ReplyBox(continuation: continuation, what: "\(call.interface).\(call.member)")
            let queued = enqueue { bus in
                guard let bus else {
                    return box.resume(throwing: SystemdError(.closed, "the connection to the systemd manager is closed"))
                }
                var m: OpaquePointer?
                var r = sd_bus_message_new_method_call(bus, &m, call.destination, call.path, call.interface, call.member)
                if r < 0 { return box.resume(throwing: SystemdError.syscall("sd_bus_message_new_method_call", r, box.what)) }
                defer { sd_bus_message_unref(m) }
                do {
                    for argument in call.arguments { try BusCodec.append(argument, to: m!) }
                } catch {
                    return box.resume(throwing: error)
                }
                let usec = UInt64(call.timeout.components.seconds) * 1_000_000 + UInt64(call.timeout.components.attoseconds / 1_000_000_000_000)
                let userdata = Unmanaged.passRetained(box).toOpaque()
                r = sd_bus_call_async(bus, nil, m, replyHandler, userdata, max(usec, 1))
                if r < 0 {
                    Unmanaged<ReplyBox>.fromOpaque(userdata).release()
                    box.resume(throwing: SystemdError.syscall("sd_bus_call_async", r, box.what, code: .unreachable))
                }
            }
            if !queued { box.resume(throwing: SystemdError(.closed, "the connection to the systemd manager is closed")) }
        }
    }

    // MARK: - Signals

    private var matches: [UInt64: OpaquePointer] = [:]
    private let nextMatch = Atomic<UInt64>(0)

    /// Delivers the signals matching (`path`, `interface`, `member`; nil matches any) to
    /// `handler` on the loop thread until the returned token is cancelled with
    /// `removeMatch`. `handler` must be quick and must not call back into the connection
    /// synchronously.
    public func addMatch(
        path: String?, interface: String?, member: String?, handler: @escaping @Sendable (BusSignal) -> Void
    ) async throws -> UInt64 {
        let token = nextMatch.add(1, ordering: .relaxed).newValue
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let queued = enqueue { [self] bus in
                guard let bus else {
                    return continuation.resume(throwing: SystemdError(.closed, "the connection to the systemd manager is closed"))
                }
                let box = SignalBox(handler: handler)
                var slot: OpaquePointer?
                let userdata = Unmanaged.passRetained(box).toOpaque()
                let r = sd_bus_match_signal(bus, &slot, nil, path, interface, member, signalHandler, userdata)
                if r < 0 {
                    Unmanaged<SignalBox>.fromOpaque(userdata).release()
                    return continuation.resume(throwing: SystemdError.syscall("sd_bus_match_signal", r, "subscribing to \(member ?? "signals")"))
                }
                // Release the box together with the slot.
                sd_bus_slot_set_destroy_callback(slot) { p in if let p { Unmanaged<SignalBox>.fromOpaque(p).release() } }
                matches[token] = slot
                continuation.resume()
            }
            if !queued { continuation.resume(throwing: SystemdError(.closed, "the connection to the systemd manager is closed")) }
        }
        return token
    }

    /// Stops delivering the signals of `token`.
    public func removeMatch(_ token: UInt64) {
        _ = enqueue { [self] bus in
            guard bus != nil, let slot = matches.removeValue(forKey: token) else { return }
            sd_bus_slot_unref(slot)
        }
    }
}

/// The continuation of one call, resumed exactly once.
private final class ReplyBox: @unchecked Sendable {
    // Invariant: resumed once, from the loop thread (or the caller when enqueueing failed).
    private var continuation: CheckedContinuation<[BusValue], any Error>?
    let what: String
    init(continuation: CheckedContinuation<[BusValue], any Error>, what: String) {
        self.continuation = continuation
        self.what = what
    }
    func resume(returning values: [BusValue]) {
        continuation?.resume(returning: values)
        continuation = nil
    }
    func resume(throwing error: any Error) {
        continuation?.resume(throwing: error)
        continuation = nil
    }
}

private final class SignalBox {
    let handler: @Sendable (BusSignal) -> Void
    init(handler: @escaping @Sendable (BusSignal) -> Void) { self.handler = handler }
}

private func replyHandler(_ m: OpaquePointer?, _ userdata: UnsafeMutableRawPointer?, _: UnsafeMutablePointer<sd_bus_error>?) -> Int32 {
    guard let userdata else { return 0 }
    let box = Unmanaged<ReplyBox>.fromOpaque(userdata).takeRetainedValue()
    guard let m else {
        box.resume(throwing: SystemdError(.badReply, "\(box.what): no reply"))
        return 0
    }
    if sd_bus_message_is_method_error(m, nil) != 0 {
        let error = sd_bus_message_get_error(m)
        let name = error?.pointee.name.map { String(cString: $0) } ?? "unknown"
        let message = error?.pointee.message.map { String(cString: $0) } ?? ""
        let code: SystemdError.Code = name == "org.freedesktop.DBus.Error.Timeout" || name == "org.freedesktop.DBus.Error.NoReply" ? .timeout : .callFailed
        box.resume(throwing: SystemdError(code, "\(box.what) failed: \(message) (\(name))", busError: name))
        return 0
    }
    do {
        box.resume(returning: try BusCodec.readAll(m))
    } catch {
        box.resume(throwing: error)
    }
    return 0
}

private func signalHandler(_ m: OpaquePointer?, _ userdata: UnsafeMutableRawPointer?, _: UnsafeMutablePointer<sd_bus_error>?) -> Int32 {
    guard let m, let userdata else { return 0 }
    let box = Unmanaged<SignalBox>.fromOpaque(userdata).takeUnretainedValue()
    guard let values = try? BusCodec.readAll(m) else { return 0 }
    let signal = BusSignal(
        path: sd_bus_message_get_path(m).map { String(cString: $0) } ?? "",
        interface: sd_bus_message_get_interface(m).map { String(cString: $0) } ?? "",
        member: sd_bus_message_get_member(m).map { String(cString: $0) } ?? "",
        arguments: values)
    box.handler(signal)
    return 0
}

import Foundation

/// A property of a transient unit, as `StartTransientUnit` takes it: a name and a variant.
public struct UnitProperty: Sendable, Equatable {
    public var name: String
    public var value: BusValue

    public init(_ name: String, _ value: BusValue) {
        self.name = name
        self.value = value
    }

    /// `ExecStart=`: the program and its argv (`a(sasb)`), argv[0] included.
    ///
    /// systemd expands `$NAME` and `${NAME}` in a command line even when it arrives over D-Bus;
    /// unless `expandEnvironment` is set, every `$` is sent as `$$` so that the argv reaches the
    /// program exactly as given (a shell script's `$$` or `$1` stays intact).
    public static func execStart(_ argv: [String], ignoreFailure: Bool = false, expandEnvironment: Bool = false) -> UnitProperty {
        let args = expandEnvironment ? argv : argv.map { $0.replacingOccurrences(of: "$", with: "$$") }
        return UnitProperty(
            "ExecStart",
            .array(elementSignature: "(sasb)", [.structure([.string(argv[0]), .strings(args), .bool(ignoreFailure)])]))
    }

    public static func string(_ name: String, _ value: String) -> UnitProperty { UnitProperty(name, .string(value)) }
    public static func bool(_ name: String, _ value: Bool) -> UnitProperty { UnitProperty(name, .bool(value)) }
    public static func uint64(_ name: String, _ value: UInt64) -> UnitProperty { UnitProperty(name, .uint64(value)) }
    public static func strings(_ name: String, _ value: [String]) -> UnitProperty { UnitProperty(name, .strings(value)) }

    var busValue: BusValue { .structure([.string(name), .variant(value)]) }
}

/// How a finished service ended, as systemd reports it.
public struct UnitOutcome: Sendable, Equatable {
    /// `ActiveState` when the main process had ended: `active` (it remained after exit),
    /// `inactive` or `failed`.
    public var activeState: String
    /// The service's `Result`: `success`, `exit-code`, `signal`, `timeout`, `oom-kill`, …
    public var result: String
    /// `ExecMainCode`: 1 exited, 2 killed, 3 dumped (the CLD_* codes).
    public var execMainCode: Int32
    /// `ExecMainStatus`: the exit status, or the signal number when killed.
    public var execMainStatus: Int32

    /// The exit status when the main process exited normally.
    public var exitStatus: Int32? { execMainCode == 1 ? execMainStatus : nil }
}

/// The systemd manager's D-Bus API (`org.freedesktop.systemd1.Manager`): transient units, their
/// jobs and properties. See systemd's `org.freedesktop.systemd1(5)`.
public final class SystemdManager: Sendable {
    public let connection: BusConnection
    static let managerPath = "/org/freedesktop/systemd1"
    static let managerInterface = "org.freedesktop.systemd1.Manager"

    private init(connection: BusConnection) { self.connection = connection }

    /// Connects to the manager at `address` and subscribes to its signals (systemd only emits
    /// `JobRemoved` and unit `PropertiesChanged` to subscribed clients).
    public static func connect(_ address: SystemdAddress) async throws -> SystemdManager {
        let connection = try await BusConnection.open(address)
        let manager = SystemdManager(connection: connection)
        _ = try await manager.callManager("Subscribe")
        return manager
    }

    /// Closes the connection (also done when the manager object goes away).
    public func close() { connection.close() }

    deinit { connection.close() }

    /// `Manager.Version`.
    public func version() async throws -> String {
        try await property(path: Self.managerPath, interface: Self.managerInterface, name: "Version").stringValue ?? ""
    }

    /// Starts a transient service (or scope) `name` with `properties` and waits for its start job.
    /// - Returns: the job's result (`done`, `failed`, `timeout`, `dependency`, …).
    /// - Throws: `SystemdError.callFailed` with systemd's message (e.g. an unknown property).
    @discardableResult
    ///
    /// - Parameter auxiliary: further transient units started in the same call (what
    ///   `systemd-run --socket-property` does: a `.socket` as the main unit, its `.service`
    ///   as an auxiliary one).
    public func startTransientUnit(
        _ name: String, properties: [UnitProperty], auxiliary: [(name: String, properties: [UnitProperty])] = [],
        mode: String = "fail", timeout: Duration = .seconds(30)
    ) async throws -> String {
        let waiter = JobWaiter()
        // Subscribe before starting: the job may finish before the call returns.
        let token = try await connection.addMatch(
            path: Self.managerPath, interface: Self.managerInterface, member: "JobRemoved"
        ) { signal in
            guard signal.arguments.count == 4, let job = signal.arguments[1].stringValue,
                let result = signal.arguments[3].stringValue
            else { return }
            waiter.finished(job: job, result: result)
        }
        defer { connection.removeMatch(token) }
        let reply = try await callManager(
            "StartTransientUnit",
            [
                .string(name), .string(mode),
                .array(elementSignature: "(sv)", properties.map(\.busValue)),
                .array(
                    elementSignature: "(sa(sv))",
                    auxiliary.map { .structure([.string($0.name), .array(elementSignature: "(sv)", $0.properties.map(\.busValue))]) }),
            ])
        guard let job = reply.first?.stringValue else {
            throw SystemdError(.badReply, "StartTransientUnit returned no job path")
        }
        return try await waiter.wait(job: job, timeout: timeout, unit: name)
    }

    /// Runs a transient service to completion and reports how it ended.
    ///
    /// The unit is started with `RemainAfterExit=yes`, so that systemd keeps it (and its
    /// `ExecMainStatus`) loaded after the main process exits; a failed unit stays loaded anyway
    /// (`CollectMode=inactive`, the default). Once the outcome is read the unit is stopped or
    /// its failure reset, and systemd collects it.
    /// (`AddRef=yes`, which `systemd-run --wait` uses, needs a bus with unique names and is
    /// refused on the manager's peer-to-peer socket.)
    public func runTransientService(
        _ name: String, properties: [UnitProperty], timeout: Duration = .seconds(120)
    ) async throws -> UnitOutcome {
        let path = Self.unitPath(name)
        let changes = Pulse()
        let token = try await connection.addMatch(
            path: path, interface: "org.freedesktop.DBus.Properties", member: "PropertiesChanged"
        ) { _ in changes.signal() }
        defer { connection.removeMatch(token) }
        let all = properties + [.bool("RemainAfterExit", true)]
        let jobResult = try await startTransientUnit(name, properties: all, timeout: timeout)
        defer { release(name) }
        if jobResult != "done" {
            let outcome = try? await outcome(path: path)
            throw SystemdError(
                .callFailed,
                "unit \(name) did not start (job \(jobResult)\(outcome.map { ", result \($0.result)" } ?? ""))")
        }
        let deadline = ContinuousClock.now + timeout
        while true {
            let unit = "org.freedesktop.systemd1.Unit"
            async let active = property(path: path, interface: unit, name: "ActiveState")
            async let sub = property(path: path, interface: unit, name: "SubState")
            let (state, subState) = (try await active.stringValue, try await sub.stringValue)
            if state == "failed" || state == "inactive" || subState == "exited" { return try await outcome(path: path) }
            if ContinuousClock.now >= deadline {
                throw SystemdError(.timeout, "unit \(name) still \(state ?? "unknown") after \(timeout)")
            }
            // Wake on the unit's next PropertiesChanged, or re-check after a second regardless.
            await changes.wait(atMost: .seconds(1))
        }
    }

    /// Lets systemd collect a finished unit: stop it if it remained active, reset it if failed.
    private func release(_ name: String) {
        Task { [connection] in
            _ = try? await connection.call(Self.managerCall("StopUnit", [.string(name), .string("replace")]))
            _ = try? await connection.call(Self.managerCall("ResetFailedUnit", [.string(name)]))
        }
    }

    /// Reads how the service at `path` ended.
    private func outcome(path: String) async throws -> UnitOutcome {
        let service = "org.freedesktop.systemd1.Service"
        async let state = property(path: path, interface: "org.freedesktop.systemd1.Unit", name: "ActiveState")
        async let result = property(path: path, interface: service, name: "Result")
        async let code = property(path: path, interface: service, name: "ExecMainCode")
        async let status = property(path: path, interface: service, name: "ExecMainStatus")
        return UnitOutcome(
            activeState: try await state.stringValue ?? "",
            result: try await result.stringValue ?? "",
            execMainCode: Int32(try await code.int64Value ?? 0),
            execMainStatus: Int32(try await status.int64Value ?? 0))
    }

    /// `Manager.StopUnit(name, mode)`.
    public func stopUnit(_ name: String, mode: String = "replace") async throws {
        _ = try await callManager("StopUnit", [.string(name), .string(mode)])
    }

    /// One property of an object (`org.freedesktop.DBus.Properties.Get`).
    public func property(path: String, interface: String, name: String) async throws -> BusValue {
        let reply = try await connection.call(
            BusCall(path: path, interface: "org.freedesktop.DBus.Properties", member: "Get", arguments: [.string(interface), .string(name)]))
        guard let value = reply.first else { throw SystemdError(.badReply, "Properties.Get(\(interface).\(name)) returned nothing") }
        return value
    }

    /// The object path of unit `name` (systemd's escaping of the unit name).
    public static func unitPath(_ name: String) -> String {
        var escaped = ""
        for (i, byte) in name.utf8.enumerated() {
            let c = Character(UnicodeScalar(byte))
            if c.isASCII && (c.isLetter || (c.isNumber && i > 0)) {
                escaped.append(c)
            } else {
                escaped += String(format: "_%02x", byte)
            }
        }
        return "/org/freedesktop/systemd1/unit/" + escaped
    }

    func callManager(_ member: String, _ arguments: [BusValue] = []) async throws -> [BusValue] {
        try await connection.call(Self.managerCall(member, arguments))
    }

    static func managerCall(_ member: String, _ arguments: [BusValue]) -> BusCall {
        BusCall(path: managerPath, interface: managerInterface, member: member, arguments: arguments)
    }
}

/// A wake-up flag: `signal` sets it, `wait` returns once it is set (clearing it) or after a
/// timeout.
private final class Pulse: Sendable {
    private struct State {
        var pending = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    func signal() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if let w = s.waiter {
                s.waiter = nil
                return w
            }
            s.pending = true
            return nil
        }
        waiter?.resume()
    }

    func wait(atMost timeout: Duration) async {
        let timer = Task { [self] in
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            signal()
        }
        await withCheckedContinuation { continuation in
            let ready = state.withLock { s -> Bool in
                if s.pending {
                    s.pending = false
                    return true
                }
                s.waiter = continuation
                return false
            }
            if ready { continuation.resume() }
        }
        timer.cancel()
    }
}

/// Collects `JobRemoved` signals and hands each job's result to whoever waits for it.
final class JobWaiter: Sendable {
    private struct State {
        var results: [String: String] = [:]
        var waiters: [String: CheckedContinuation<String, Never>] = [:]
    }
    private let state = Mutex(State())

    func finished(job: String, result: String) {
        let waiter = state.withLock { s -> CheckedContinuation<String, Never>? in
            if let w = s.waiters.removeValue(forKey: job) { return w }
            s.results[job] = result
            return nil
        }
        waiter?.resume(returning: result)
    }

    func wait(job: String, timeout: Duration, unit: String) async throws -> String {
        let result = await withTaskGroup(of: String?.self) { group in
            group.addTask {
                await withCheckedContinuation { continuation in
                    let ready = self.state.withLock { s -> String? in
                        if let r = s.results.removeValue(forKey: job) { return r }
                        s.waiters[job] = continuation
                        return nil
                    }
                    if let ready { continuation.resume(returning: ready) }
                }
            }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            let first = await group.next() ?? nil
            if first == nil {
                // Timed out: release the job waiter so that the group can finish.
                self.finished(job: job, result: "timeout")
            }
            group.cancelAll()
            return first
        }
        guard let result else {
            throw SystemdError(.timeout, "the start job of unit \(unit) did not finish within \(timeout)")
        }
        return result
    }
}

import Synchronization

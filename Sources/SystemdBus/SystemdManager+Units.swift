import CSystemd
import Foundation
import Glibc

/// What the manager reports about one unit: its state, how its main process ended and what it
/// used. Read with `SystemdManager.unitProperties(_:)`.
public struct UnitStatus: Sendable, Equatable {
    public var name: String
    /// `LoadState`: `loaded`, `not-found`, … (`not-found` for a unit the manager does not know).
    public var loadState: String
    /// `ActiveState`: `active`, `activating`, `deactivating`, `inactive`, `failed`, …
    public var activeState: String
    /// `SubState`, e.g. `running`, `exited`, `dead`.
    public var subState: String
    /// A service's `Result` (`success`, `exit-code`, `signal`, `timeout`, `oom-kill`,
    /// `watchdog`, …); empty for other unit types.
    public var result: String
    /// `ExecMainCode`: 1 exited, 2 killed, 3 dumped (the CLD_* codes); 0 when nothing ran.
    public var execMainCode: Int32
    /// `ExecMainStatus`: the exit status, or the signal number when killed.
    public var execMainStatus: Int32
    /// `ExecMainPID` of a service (0 when none).
    public var mainPID: UInt32
    /// `NRestarts` of a service.
    public var restarts: UInt32
    /// `MemoryCurrent` in bytes; nil when memory is not accounted (systemd reports UINT64_MAX).
    public var memoryCurrent: UInt64?
    /// `CPUUsageNSec`; nil when CPU is not accounted.
    public var cpuUsageNSec: UInt64?
    /// `ControlGroup`, the unit's cgroup path below the hierarchy root (empty when it has none).
    public var controlGroup: String
    /// The type of the job pending for the unit (`start`, `stop`, `restart`, …), nil when none,
    /// `unknown` when a job was pending but finished before its type could be read.
    public var jobType: String?
}

/// One row of `ListUnitsByPatterns`.
public struct UnitListEntry: Sendable, Equatable {
    public var name: String
    public var description: String
    public var loadState: String
    public var activeState: String
    public var subState: String
}

extension UnitProperty {
    /// A file descriptor property (`h`), e.g. `StandardOutputFileDescriptor`. sd-bus duplicates
    /// the descriptor into the message, so the caller may close its own copy once the call
    /// that carries it has returned.
    public static func fileDescriptor(_ name: String, _ fd: Int32) -> UnitProperty { UnitProperty(name, .fd(fd)) }

    /// `BindPaths=` (`a(ssbt)`): each host `source` mounted at `destination` inside the unit.
    public static func bindPaths(_ mounts: [(source: String, destination: String)], readOnly: Bool = false) -> UnitProperty {
        UnitProperty(
            readOnly ? "BindReadOnlyPaths" : "BindPaths",
            .array(elementSignature: "(ssbt)", mounts.map { .structure([.string($0.source), .string($0.destination), .bool(false), .uint64(0)]) }))
    }

    /// `SystemCallFilter=` (`(bas)`): an allow list (or a deny list) of calls and `@groups`.
    public static func systemCallFilter(_ names: [String], allow: Bool = true) -> UnitProperty {
        UnitProperty("SystemCallFilter", .structure([.bool(allow), .strings(names)]))
    }

    /// `CPUQuota=` as systemd's D-Bus API takes it: CPU time per second of wall time.
    public static func cpuQuota(_ cpus: Double) -> UnitProperty {
        .uint64("CPUQuotaPerSecUSec", UInt64(max(cpus, 0.01) * 1_000_000))
    }

    /// A duration property in microseconds (`RuntimeMaxUSec`, `TimeoutStopUSec`, `WatchdogUSec`, …).
    public static func duration(_ name: String, _ value: Duration) -> UnitProperty {
        let c = value.components
        return .uint64(name, UInt64(max(0, c.seconds)) * 1_000_000 + UInt64(max(0, c.attoseconds)) / 1_000_000_000_000)
    }

    /// `Listen` of a socket unit (`a(ss)`): the D-Bus names of the socket types, `Stream`,
    /// `Datagram`, `SequentialPacket`, `FIFO`…, e.g. `[("Stream", "/run/x.sock")]` for
    /// `ListenStream=/run/x.sock`.
    public static func listen(_ sockets: [(type: String, address: String)]) -> UnitProperty {
        UnitProperty("Listen", .array(elementSignature: "(ss)", sockets.map { .structure([.string($0.type), .string($0.address)]) }))
    }
}

extension SystemdManager {
    private static let unitInterface = "org.freedesktop.systemd1.Unit"

    /// The unit-type interface of `name` (`org.freedesktop.systemd1.Service` for a `.service`).
    private static func typeInterface(_ name: String) -> String? {
        switch name.split(separator: ".").last {
        case "service": "org.freedesktop.systemd1.Service"
        case "scope": "org.freedesktop.systemd1.Scope"
        case "slice": "org.freedesktop.systemd1.Slice"
        case "socket": "org.freedesktop.systemd1.Socket"
        default: nil
        }
    }

    /// Every property of `interface` on the object at `path` (`Properties.GetAll`).
    public func properties(path: String, interface: String) async throws -> [String: BusValue] {
        let reply = try await connection.call(
            BusCall(path: path, interface: "org.freedesktop.DBus.Properties", member: "GetAll", arguments: [.string(interface)]))
        guard case .array(_, let entries)? = reply.first else {
            throw SystemdError(.badReply, "Properties.GetAll(\(interface)) did not return a dictionary")
        }
        var result: [String: BusValue] = [:]
        for case .dictEntry(let key, let value) in entries {
            if let k = key.stringValue { result[k] = value }
        }
        return result
    }

    /// State, outcome and resource use of unit `name` (`ActiveState`, `SubState`, `Result`,
    /// `ExecMainCode`, `ExecMainStatus`, `MemoryCurrent`, `CPUUsageNSec`, …). A unit the
    /// manager does not know reads as `not-found`/`inactive`.
    public func unitProperties(_ name: String) async throws -> UnitStatus {
        let path = Self.unitPath(name)
        async let unitProps = properties(path: path, interface: Self.unitInterface)
        let typeProps: [String: BusValue]
        if let interface = Self.typeInterface(name) {
            typeProps = try await properties(path: path, interface: interface)
        } else {
            typeProps = [:]
        }
        let unit = try await unitProps
        var jobType: String?
        if case .structure(let job)? = unit["Job"].map({ if case .variant(let v) = $0 { v } else { $0 } }), job.count == 2,
            let id = job[0].uint64Value, id != 0, let jobPath = job[1].stringValue
        {
            // The job may finish between the two reads: then the state read above is already
            // stale, which `unknown` says.
            jobType = (try? await property(path: jobPath, interface: "org.freedesktop.systemd1.Job", name: "JobType").stringValue) ?? "unknown"
        }
        func accounted(_ key: String) -> UInt64? {
            guard let v = typeProps[key]?.uint64Value, v != .max else { return nil }
            return v
        }
        return UnitStatus(
            name: name,
            loadState: unit["LoadState"]?.stringValue ?? "",
            activeState: unit["ActiveState"]?.stringValue ?? "",
            subState: unit["SubState"]?.stringValue ?? "",
            result: typeProps["Result"]?.stringValue ?? "",
            execMainCode: Int32(truncatingIfNeeded: typeProps["ExecMainCode"]?.int64Value ?? 0),
            execMainStatus: Int32(truncatingIfNeeded: typeProps["ExecMainStatus"]?.int64Value ?? 0),
            mainPID: UInt32(truncatingIfNeeded: typeProps["ExecMainPID"]?.uint64Value ?? 0),
            restarts: UInt32(truncatingIfNeeded: typeProps["NRestarts"]?.uint64Value ?? 0),
            memoryCurrent: accounted("MemoryCurrent"),
            cpuUsageNSec: accounted("CPUUsageNSec"),
            controlGroup: typeProps["ControlGroup"]?.stringValue ?? "",
            jobType: jobType)
    }

    /// Loaded units whose names match one of `patterns` (shell globs, e.g. `agentd-x-*.slice`)
    /// and, when `states` is not empty, whose active, sub or load state is one of them
    /// (`Manager.ListUnitsByPatterns`).
    public func listUnits(matching patterns: [String], states: [String] = []) async throws -> [UnitListEntry] {
        let reply = try await callManager("ListUnitsByPatterns", [.strings(states), .strings(patterns)])
        guard case .array(_, let rows)? = reply.first else {
            throw SystemdError(.badReply, "ListUnitsByPatterns did not return an array")
        }
        return rows.compactMap { row in
            guard case .structure(let f) = row, f.count >= 5 else { return nil }
            return UnitListEntry(
                name: f[0].stringValue ?? "", description: f[1].stringValue ?? "", loadState: f[2].stringValue ?? "",
                activeState: f[3].stringValue ?? "", subState: f[4].stringValue ?? "")
        }
    }

    /// Stops unit `name` and waits until its stop job has finished (so that its processes
    /// are gone and the name can be used again). A unit the manager does not know counts as
    /// stopped.
    /// - Returns: the job's result (`done`, `canceled`, …), or `inactive` when there was no unit.
    /// - Throws: `SystemdError.timeout` when the job does not finish within `timeout`.
    @discardableResult
    public func stopUnitAndWait(_ name: String, mode: String = "replace", timeout: Duration = .seconds(30)) async throws -> String {
        do {
            return try await runJob("StopUnit", [.string(name), .string(mode)], unit: name, timeout: timeout)
        } catch let error as SystemdError where error.busError == "org.freedesktop.systemd1.NoSuchUnit" {
            return "inactive"
        }
    }

    /// Sends `signal` to the processes of unit `name` (`Manager.KillUnit`); `whom` is `all`,
    /// `main` or `control`.
    public func killUnit(_ name: String, whom: String = "all", signal: Int32 = SIGKILL) async throws {
        _ = try await callManager("KillUnit", [.string(name), .string(whom), .int32(signal)])
    }

    /// Forgets the `failed` state of unit `name` so that systemd may collect it
    /// (`Manager.ResetFailedUnit`). A unit it does not know is fine.
    public func resetFailedUnit(_ name: String) async throws {
        do {
            _ = try await callManager("ResetFailedUnit", [.string(name)])
        } catch let error as SystemdError where error.busError == "org.freedesktop.systemd1.NoSuchUnit" {}
    }

    /// Starts transient slice `name` (e.g. `agentd-x-s1.slice`, whose parents `agentd-x.slice`
    /// and `agentd.slice` systemd derives from the dashes and creates implicitly) with
    /// resource `properties` (`MemoryMax`, `TasksMax`, `CPUQuotaPerSecUSec`, …), so that every
    /// unit placed in it with `Slice=` shares those limits. A slice already active is left as
    /// it is.
    /// - Throws: `SystemdError.callFailed` when the manager refuses the slice or its job fails.
    public func startSlice(_ name: String, properties: [UnitProperty], timeout: Duration = .seconds(30)) async throws {
        precondition(name.hasSuffix(".slice"), "a slice name ends in .slice")
        do {
            let result = try await startTransientUnit(name, properties: properties, mode: "fail", timeout: timeout)
            guard result == "done" else {
                throw SystemdError(.callFailed, "the start job of slice \(name) ended with '\(result)'")
            }
        } catch let error as SystemdError where error.busError == "org.freedesktop.systemd1.UnitExists" {}
    }

    /// The unit that process `pid` belongs to in this manager (`Manager.GetUnitByPID`), or nil
    /// when the process is not in one of its units.
    public func unit(ofPID pid: pid_t) async throws -> String? {
        do {
            let reply = try await callManager("GetUnitByPID", [.uint32(UInt32(pid))])
            guard let path = reply.first?.stringValue else { return nil }
            return try await property(path: path, interface: Self.unitInterface, name: "Id").stringValue
        } catch let error as SystemdError where error.busError == "org.freedesktop.systemd1.NoUnitForPID" {
            return nil
        }
    }

    /// Calls a manager method that returns a job path and waits for that job's `JobRemoved`.
    func runJob(_ member: String, _ arguments: [BusValue], unit: String, timeout: Duration) async throws -> String {
        let waiter = JobWaiter()
        // Subscribe before calling: the job may finish before the call returns.
        let token = try await connection.addMatch(path: Self.managerPath, interface: Self.managerInterface, member: "JobRemoved") { signal in
            guard signal.arguments.count == 4, let job = signal.arguments[1].stringValue, let result = signal.arguments[3].stringValue else { return }
            waiter.finished(job: job, result: result)
        }
        defer { connection.removeMatch(token) }
        let reply = try await callManager(member, arguments)
        guard let job = reply.first?.stringValue else { throw SystemdError(.badReply, "\(member) returned no job path") }
        return try await waiter.wait(job: job, timeout: timeout, unit: unit)
    }
}

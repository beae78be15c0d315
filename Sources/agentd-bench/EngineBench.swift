import EngineAPI
import Foundation

/// Engine figures: the raw baseline (requests written straight to the socket), then the same
/// container life cycle through `EngineClient`.
enum EngineBench {
    static let iterations = 15

    static func run(_ report: Reporter) async throws {
        let engine = try EngineClient.fromEnvironment()
        guard case .unixSocket(let path) = engine.endpoint else { return }
        let raw = RawUnixHTTP(socketPath: path)
        let limits = HostConfig.Ulimit.withinHostLimits()
        let ulimits = limits.map { #"{"Name":"\#($0.Name)","Soft":\#($0.Soft),"Hard":\#($0.Hard)}"# }.joined(separator: ",")
        let create = #"{"Image":"agentd-base:latest","Cmd":["sleep","600"],"Labels":{"agentd.bench":"raw"},"HostConfig":{"NetworkMode":"none","Ulimits":[\#(ulimits)]}}"#

        // Warm both paths once (image cache, first connection).
        _ = try rawCycle(raw, create: create)
        _ = try await clientCycle(engine, limits: limits)

        var rawSamples: [Double] = []
        var clientSamples: [Double] = []
        // Interleave the two so that drift on the machine affects both alike.
        for _ in 0..<iterations {
            rawSamples.append(try rawCycle(raw, create: create))
            clientSamples.append(try await clientCycle(engine, limits: limits))
        }
        rawSamples.sort()
        clientSamples.sort()
        report.figure("raw.engine.lifecycle.p50", percentile(rawSamples, 50) * 1000, "ms")
        report.figure("engineapi.lifecycle.p50", percentile(clientSamples, 50) * 1000, "ms")
        report.ratio("engineapi.lifecycle.vs_raw", "engineapi.lifecycle.p50", over: "raw.engine.lifecycle.p50", goal: "<= 1.10")
    }

    /// create + start + exec `true` + remove, each request written by hand.
    static func rawCycle(
        _ raw: RawUnixHTTP, create: String, exec: String = #"{"AttachStdout":true,"AttachStderr":true,"Cmd":["true"]}"#
    ) throws -> Double {
        let t0 = now()
        let id = try raw.startContainer(create)
        _ = try raw.exec(in: id, body: exec)
        _ = try raw.send("DELETE", "/v1.41/containers/\(id)?force=true&v=true")
        return now() - t0
    }

    static func clientCycle(_ engine: EngineClient, limits: [HostConfig.Ulimit]) async throws -> Double {
        let t0 = now()
        var spec = ContainerSpec(image: "agentd-base:latest", command: ["sleep", "600"], labels: ["agentd.bench": "client"])
        var host = HostConfig()
        host.NetworkMode = "none"
        host.Ulimits = limits
        spec.HostConfig = host
        let id = try await engine.createContainer(spec)
        try await engine.startContainer(id)
        _ = try await engine.exec(id, command: ["true"])
        try await engine.removeContainer(id)
        return now() - t0
    }
}

import Foundation
import Testing

/// `units/agentd.service` and `units/agentd.socket` checked by systemd's own tools.
@Suite("unit files")
struct UnitFilesTests {
    static let units = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("units")

    /// Copies the unit files to a temporary directory with ExecStart's program replaced by
    /// /bin/true: `systemd-analyze verify` refuses a unit whose ExecStart binary does not exist
    /// ("Command /usr/bin/agentd is not executable"), and agentd is not installed where
    /// the tests run. Everything else is verified as shipped.
    static func stage() throws -> String {
        let dir = "/tmp/agentd-units-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for name in ["agentd.service", "agentd.socket"] {
            var text = try String(contentsOf: units.appendingPathComponent(name), encoding: .utf8)
            text = text.replacingOccurrences(of: "ExecStart=/usr/bin/agentd ", with: "ExecStart=/bin/true ")
            try text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
        }
        return dir
    }

    @Test("systemd-analyze verify accepts both unit files")
    func verify() async throws {
        let dir = try Self.stage()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (status, output) = try await runTool(["/usr/bin/systemd-analyze", "verify", dir + "/agentd.socket", dir + "/agentd.service"])
        #expect(status == 0, "\(output)")
        #expect(!output.contains("agentd.service:") && !output.contains("agentd.socket:"), "\(output)")
    }

    @Test("systemd-analyze security scores the service at 3.0 or below")
    func security() async throws {
        let dir = try Self.stage()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (_, output) = try await runTool(["/usr/bin/systemd-analyze", "security", "--offline=true", "--no-pager", dir + "/agentd.service"])
        let line = try #require(output.split(separator: "\n").first { $0.contains("Overall exposure level") }, "\(output.suffix(500))")
        let score = try #require(line.split(separator: ":").last?.split(separator: " ").first.flatMap { Double($0) }, "\(line)")
        print("unit files: \(line.trimmingCharacters(in: .whitespaces))")
        #expect(score <= 3.0, "\(line)")
    }

    @Test("the service is Type=notify with a watchdog, state directory and credentials; the socket is the API socket")
    func contents() throws {
        let service = try String(contentsOf: Self.units.appendingPathComponent("agentd.service"), encoding: .utf8)
        let socket = try String(contentsOf: Self.units.appendingPathComponent("agentd.socket"), encoding: .utf8)
        let lines = Set(service.split(separator: "\n").map(String.init))
        for required in ["Type=notify", "StateDirectory=agentd", "Requires=agentd.socket", "NoNewPrivileges=yes", "ProtectSystem=strict"] {
            #expect(lines.contains(required), "agentd.service lacks \(required)")
        }
        #expect(lines.contains { $0.hasPrefix("WatchdogSec=") })
        #expect(lines.contains { $0.hasPrefix("LoadCredential=") })
        #expect(lines.contains("ExecStart=/usr/bin/agentd --state-dir /var/lib/agentd --socket /run/agentd/agentd.sock --policies /etc/agentd/policies"))
        let socketLines = Set(socket.split(separator: "\n").map(String.init))
        #expect(socketLines.contains("ListenStream=/run/agentd/agentd.sock"))
        #expect(socketLines.contains("SocketMode=0660"))
    }
}

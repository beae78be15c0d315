import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// agentd that cannot start its API exits with the reason, instead of hanging half up.
@Suite("agentd start failures")
struct StartFailureTests {
    @Test("a TCP address already in use: agentd exits non-zero naming it, after its shutdown clean-up")
    func takenTCPPortEndsAgentd() async throws {
        // Hold a TCP port, as another service would.
        let holder = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #expect(holder >= 0)
        defer { close(holder) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(holder, $0, length) == 0 && listen(holder, 1) == 0 && getsockname(holder, $0, &length) == 0 }
        }
        #expect(bound)
        let port = Int(UInt16(bigEndian: address.sin_port))

        let base = "/tmp/agentd-startfail-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let binary = Components.buildProductsDirectory.appendingPathComponent("agentd").path
        let child = try ChildProcess.spawn(
            [
                binary, "--state-dir", base + "/state", "--socket", base + "/agentd.sock", "--policies", AgentdProcess.policiesDirectory,
                "--listen-tcp", "127.0.0.1:\(port)",
            ],
            environment: ProcessInfo.processInfo.environment.merging(["AGENTD_TOKEN": "a-token-of-sixteen-chars"]) { $1 },
            output: base + "/agentd.log")
        var status: Int32?
        let exited = await eventually(.seconds(60)) {
            status = child.exitStatusIfExited()
            return status != nil
        }
        if !exited {
            child.signal(SIGKILL)
            child.wait()
        }
        #expect(exited, "agentd exits when its API cannot listen (it hung before)")
        #expect(status != 0, "a failed start is not a success (wait status \(String(describing: status)))")
        let log = (try? String(contentsOfFile: base + "/agentd.log", encoding: .utf8)) ?? ""
        #expect(log.contains("127.0.0.1") || log.localizedCaseInsensitiveContains("address already in use"), "\(log.suffix(2000))")
        #expect(log.contains("closing the journal"), "the shutdown clean-up ran: \(log.suffix(2000))")
    }
}

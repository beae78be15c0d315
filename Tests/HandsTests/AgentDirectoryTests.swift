import Foundation
import Hands
import Testing
import TestSupport

/// The sandboxes' socket directories on the host (`AgentHands`).
@Suite("sandbox agent directories")
struct AgentDirectoryTests {
    @Test("the sweep at start removes the directories of sandboxes that vanished, keeps the adopted ones and anything that is not an agent's")
    func sweepKeepsAdoptedOnly() throws {
        let base = NSTemporaryDirectory() + "agentd-agents-\(Components.testID())"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let agent = try AgentHands(directory: base + "/agents")
        let adopted = AgentHands.freshName()
        let vanished = AgentHands.freshName()
        for name in [adopted, vanished] {
            try agent.prepare(name, uid: Int(getuid()))
            // What a live sandbox leaves there: its agent's and its proxy's sockets.
            _ = FileManager.default.createFile(atPath: agent.socketPath(name), contents: nil)
            _ = FileManager.default.createFile(atPath: agent.proxySocketPath(name), contents: nil)
        }
        try FileManager.default.createDirectory(atPath: base + "/agents/not-an-agent", withIntermediateDirectories: true)
        #expect(agent.sweep(keeping: [adopted]) == [vanished])
        #expect(FileManager.default.fileExists(atPath: agent.proxySocketPath(adopted)))
        #expect(!FileManager.default.fileExists(atPath: agent.hostDirectory(vanished)))
        #expect(FileManager.default.fileExists(atPath: base + "/agents/not-an-agent"))
    }
}

import Hands
import Testing

/// The uid allocator on its own: no components needed.
@Suite("Sandbox uids")
struct SandboxUIDsTests {
    @Test("each workspace gets a uid of its own; a shared workspace keeps one; a released uid goes back")
    func allocation() throws {
        let uids = try SandboxUIDs(range: 700_000...700_002)
        let a = try uids.acquire("t-a")
        let b = try uids.acquire("t-b")
        #expect(a != b)
        #expect(try uids.acquire("t-a") == a, "a workspace keeps its uid while it is open")
        let c = try uids.acquire("s-session")
        #expect(Set([a, b, c]).count == 3)
        #expect(throws: HandsError.self) { try uids.acquire("t-d") }
        uids.release("t-b")
        #expect(try uids.acquire("t-d") == b, "the one free uid")
        #expect(uids.inUse == 3)
    }

    @Test("a uid recorded on a sandbox that survived a restart is never handed out again while it lives")
    func survivorsKeepTheirUIDs() throws {
        let uids = try SandboxUIDs(range: 700_000...700_001)
        uids.reserve(700_000, for: "t-survivor")
        // A survivor from a run with another range: recorded, and no reason to loop forever.
        uids.reserve(123_456, for: "t-from-another-range")
        #expect(try uids.acquire("t-new") == 700_001)
        #expect(throws: HandsError.self) { try uids.acquire("t-another") }
        uids.release("t-survivor")
        #expect(try uids.acquire("t-another") == 700_000)
    }

    @Test("ranges that hold root, the host's 16-bit ids or nothing are refused")
    func badRanges() throws {
        #expect(throws: HandsError.self) { try SandboxUIDs(range: 0...100) }
        #expect(throws: HandsError.self) { try SandboxUIDs(range: 1000...70_000) }
        #expect(throws: HandsError.self) { try SandboxUIDs.parseRange("600000") }
        #expect(throws: HandsError.self) { try SandboxUIDs.parseRange("9-1") }
        #expect(try SandboxUIDs.parseRange("600000-699999") == 600_000...699_999)
    }
}

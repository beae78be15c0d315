import Foundation
import Testing
import TestSupport

@testable import VaultProxy

/// The `vault-proxy` executable driven over its control channel (stdin/stdout here) the way
/// agentd drives it: credentials, a sandbox, an intent; a request through the route; the
/// egress event comes back; the credential is in no output of the process.
@Suite(.serialized) struct ExecutableTests {
    /// Reads newline-delimited JSON messages from the proxy's stdout.
    final class Lines: @unchecked Sendable {
        let handle: FileHandle
        var buffer = Data()
        init(_ handle: FileHandle) { self.handle = handle }

        func next() throws -> [String: Any] {
            while true {
                if let newline = buffer.firstIndex(of: 0x0A) {
                    let line = buffer[buffer.startIndex..<newline]
                    buffer = Data(buffer[(newline + 1)...])
                    return try #require(try JSONSerialization.jsonObject(with: line) as? [String: Any])
                }
                let more = handle.availableData
                if more.isEmpty { throw ProxyError("the proxy closed its control channel") }
                buffer.append(more)
            }
        }
    }

    @Test func controlChannelDrivesTheProxyAndEventsComeBack() async throws {
        let binary = Components.buildProductsDirectory.appendingPathComponent("vault-proxy").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "vault-proxy is not built at \(binary); build with --build-tests")
        let upstream = try Upstream(ca: TestCA())
        defer { upstream.stop() }
        let dir = try TempDir()
        let socketPath = dir.path + "/sb/proxy.sock"
        let stderrPath = dir.path + "/stderr.log"
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)

        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["--log-level", "trace"]
        // Pipes whose descriptors close on exec: a child another test spawns meanwhile must not
        // inherit the write end of the proxy's stdin, or closing it here would not end it.
        let input = try ClosingPipe()
        let output = try ClosingPipe()
        process.standardInput = input.fileHandleForReading
        process.standardOutput = output.fileHandleForWriting
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        try process.run()
        try input.fileHandleForReading.close()
        try output.fileHandleForWriting.close()
        defer { if kill(process.processIdentifier, 0) == 0 { kill(process.processIdentifier, SIGKILL) } }
        let lines = Lines(output.fileHandleForReading)
        func send(_ json: String) { input.fileHandleForWriting.write(Data((json + "\n").utf8)) }

        #expect(try lines.next()["type"] as? String == "ready")
        // Only FoundationEssentials: Foundation and its ICU would add ~6 MiB to every proxy's RSS.
        let maps = try String(contentsOfFile: "/proc/\(process.processIdentifier)/maps", encoding: .utf8)
        for library in ["libFoundation.so", "libFoundationInternationalization.so", "lib_FoundationICU.so"] {
            #expect(!maps.contains("/" + library), "vault-proxy maps \(library); VaultProxy must import FoundationEssentials only")
        }
        let canaryJSON = String(decoding: try JSONEncoder().encode(ProxyFixture.canary), as: UTF8.self)
        send(#"{"type":"credentials","id":1,"credentials":{"canary":\#(canaryJSON)}}"#)
        var answer = try lines.next()
        #expect(answer["type"] as? String == "ok" && answer["id"] as? Int == 1)
        send(
            #"{"type":"addSandbox","id":2,"sandbox":"sb-1","session":"sess-1","task":"task-1","policy":"coding-agent","socketPath":"\#(socketPath)","network":{"allowHosts":["pypi.org"]},"routes":[{"name":"echo","upstream":"https://127.0.0.1:\#(upstream.port)","credential":"canary","caFile":"\#(upstream.ca.caFile)"}]}"#
        )
        answer = try lines.next()
        #expect(answer["type"] as? String == "ok" && answer["id"] as? Int == 2, "\(answer)")
        send(#"{"type":"setIntent","id":3,"sandbox":"sb-1","seq":17}"#)
        answer = try lines.next()
        #expect(answer["type"] as? String == "ok" && answer["id"] as? Int == 3)
        send(#"{"type":"addSandbox","id":4,"sandbox":"sb-1","session":"s","policy":"p","socketPath":"\#(socketPath)","network":{"allowHosts":[]},"routes":[]}"#)
        answer = try lines.next()
        #expect(answer["type"] as? String == "error" && answer["id"] as? Int == 4)
        #expect((answer["message"] as? String)?.contains("already has a listener") == true)
        send(#"{"type":"addSandbox","id":7,"sandbox":"sb-2","session":"s","policy":"p","socketPath":"\#(socketPath)2","listenerFD":true,"network":{"allowHosts":[]},"routes":[]}"#)
        answer = try lines.next()
        #expect(answer["type"] as? String == "error" && answer["id"] as? Int == 7)
        #expect((answer["message"] as? String)?.contains("0 descriptors did") == true, "\(answer)")
        send(#"{"type":"bogus","id":5}"#)
        answer = try lines.next()
        #expect(answer["type"] as? String == "error")

        let r = try run(["curl", "-sS", "--unix-socket", socketPath, "http://127.0.0.1:3128/echo/leak?x=1"])
        let body = String(decoding: r.out, as: UTF8.self)
        #expect(body.contains("[REDACTED:canary]"))
        for form in canaryForms() { #expect(!body.contains(form)) }

        answer = try lines.next()
        #expect(answer["type"] as? String == "egress")
        let event = try #require(answer["event"] as? [String: Any])
        #expect(event["type"] as? String == "egress.allowed")
        #expect(event["sandbox"] as? String == "sb-1" && event["session"] as? String == "sess-1" && event["task"] as? String == "task-1")
        #expect(event["toolIntentSeq"] as? Int == 17)
        #expect(event["route"] as? String == "echo" && event["path"] as? String == "/leak?[REDACTED]" && event["credential"] as? String == "canary")
        #expect(event["status"] as? Int == 200)

        send(#"{"type":"removeSandbox","id":6,"sandbox":"sb-1"}"#)
        answer = try lines.next()
        #expect(answer["type"] as? String == "ok" && answer["id"] as? Int == 6)
        #expect(!FileManager.default.fileExists(atPath: socketPath))

        // agentd going away stops the proxy.
        try input.fileHandleForWriting.close()
        let exited = await eventually(.seconds(20)) { !process.isRunning }
        #expect(exited && process.terminationStatus == 0, "vault-proxy exits 0 when its control channel closes")

        let log = try String(contentsOfFile: stderrPath, encoding: .utf8)
        #expect(log.contains("sb-1"), "the log is captured")
        for form in canaryForms() { #expect(!log.contains(form), "the proxy's log holds the credential") }
        #expect(!(process.arguments ?? []).joined().contains(ProxyFixture.canary))
    }
}

@Suite struct SocketDirectoryTests {
    /// The listener's directory is made from the socket path as NSString would split it.
    @Test func directoryOfASocketPathIsItsParent() {
        #expect(UnixSocket.directory(of: "/run/agentd/sb-1/proxy.sock") == "/run/agentd/sb-1")
        #expect(UnixSocket.directory(of: "/run//x//proxy.sock") == "/run//x")
        #expect(UnixSocket.directory(of: "/proxy.sock") == "/")
        #expect(UnixSocket.directory(of: "/run/x/") == "/run")
        #expect(UnixSocket.directory(of: "proxy.sock") == "")
    }
}

/// A pipe whose descriptors close on exec (set right after `pipe`: Glibc's module has no
/// `pipe2`): unlike Foundation's `Pipe`, they do not leak into children spawned concurrently by
/// other tests (the child it is given to gets a dup).
struct ClosingPipe {
    let fileHandleForReading: FileHandle
    let fileHandleForWriting: FileHandle

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw ProxyError("pipe: \(String(cString: strerror(errno)))") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        fileHandleForReading = FileHandle(fileDescriptor: fds[0], closeOnDealloc: true)
        fileHandleForWriting = FileHandle(fileDescriptor: fds[1], closeOnDealloc: true)
    }
}

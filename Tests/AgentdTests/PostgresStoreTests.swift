import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport

/// The real agentd binary keeping its sessions in the environment's real PostgreSQL
/// (`--store postgres`), with the URL in a file.
@Suite("agentd on PostgreSQL")
struct PostgresStoreTests {
    /// The URL file `make env` writes; in CI a missing PostgreSQL is a failure.
    static func urlFile() throws -> String {
        guard let file = ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"], FileManager.default.fileExists(atPath: file) else {
            throw Components.Missing(description: "no PostgreSQL: AGENTD_POSTGRES_URL_FILE is unset or names no file; `make env` starts one")
        }
        return file
    }

    func exec(_ c: AgentdClient, _ id: String, _ command: String, key: String) async throws -> AgentdClient.Reply {
        try await c.post("/v1/sessions/\(id)/execute", ["tool": "bash", "input": ["command": command], "task": "main", "idempotency_key": key])
    }

    func output(_ reply: AgentdClient.Reply) -> String { (reply["result"] as? [String: Any])?["output"] as? String ?? "" }

    @Test("with --store postgres a session lives in the database: after kill -9 and a restart its events are there, verify is intact, and a call's key is answered from the store without running it again")
    func sessionSurvivesInPostgres() async throws {
        let file = try Self.urlFile()
        let schema = "e2e_" + String((0..<10).map { _ in "abcdefghijklmnopqrstuvwxyz".randomElement()! })
        let arguments = ["--store", "postgres", "--store-url-file", file, "--store-schema", schema]
        try await withAgentd(arguments: arguments) { agentd in
            let c = agentd.client
            let id = try #require(try await c.post("/v1/sessions", ["policy": "default"])["id"] as? String)
            let first = try await exec(c, id, "echo run >> runs; cat runs | wc -l", key: "count")
            #expect(output(first).contains("1"), "\(first)")
            // Nothing of the session went to a file journal.
            #expect(!FileManager.default.fileExists(atPath: agentd.stateDir + "/journal"))
            let before = try #require(try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]])

            agentd.kill9()
            try await agentd.start(extraArguments: arguments)

            let after = try #require(try await c.get("/v1/sessions/\(id)/events")["events"] as? [[String: Any]])
            #expect(after.count >= before.count)
            #expect(zip(before, after).allSatisfy { ($0["seq"] as? Int) == ($1["seq"] as? Int) && ($0["type"] as? String) == ($1["type"] as? String) })
            let again = try await exec(c, id, "echo run >> runs; cat runs | wc -l", key: "count")
            #expect(again["replayed"] as? Bool == true, "\(again)")
            #expect(output(again) == output(first))
            let verify = try await c.get("/v1/sessions/\(id)/verify")
            #expect(verify["intact"] as? Bool == true, "\(verify)")
            #expect((verify["verified_records"] as? Int ?? 0) >= after.count, "\(verify)")
        }
    }

    @Test("--store postgres without a URL file, or with a file naming a closed port: agentd exits non-zero saying what to pass, and never prints the password")
    func badStoreArguments() async throws {
        let base = "/tmp/agentd-pgargs-\(Components.testID())"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let binary = Components.buildProductsDirectory.appendingPathComponent("agentd").path
        let common = [binary, "--state-dir", base + "/state", "--socket", base + "/agentd.sock", "--policies", AgentdProcess.policiesDirectory]
        var environment = ProcessInfo.processInfo.environment
        environment["CREDENTIALS_DIRECTORY"] = nil

        let noFile = try ChildProcess.spawn(common + ["--store", "postgres"], environment: environment, output: base + "/a.log")
        #expect(noFile.wait() != 0)
        let a = (try? String(contentsOfFile: base + "/a.log", encoding: .utf8)) ?? ""
        #expect(a.contains("--store-url-file"), "\(a)")

        let password = "pw-\(UUID().uuidString)"
        let url = base + "/url"
        try "postgres://agentd:\(password)@127.0.0.1:1/agentd\n".write(toFile: url, atomically: true, encoding: .utf8)
        let closed = try ChildProcess.spawn(common + ["--store", "postgres", "--store-url-file", url], environment: environment, output: base + "/b.log")
        #expect(closed.wait() != 0)
        let b = (try? String(contentsOfFile: base + "/b.log", encoding: .utf8)) ?? ""
        #expect(b.contains("127.0.0.1:1"), "\(b)")
        #expect(!b.contains(password))

        let unknown = try ChildProcess.spawn(common + ["--store", "sqlite"], environment: environment, output: base + "/c.log")
        #expect(unknown.wait() != 0)
        let c = (try? String(contentsOfFile: base + "/c.log", encoding: .utf8)) ?? ""
        #expect(c.contains("`file` or `postgres`"), "\(c)")
    }
}

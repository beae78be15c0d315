import Foundation
import PostgresNIO
import Testing
import TestSupport

@testable import PostgresStore
@testable import SessionLog

/// TLS to PostgreSQL as the URL's `sslmode` and `sslrootcert` ask for, against a private
/// cluster serving a certificate from a CA made for the test (and the environment's server,
/// which offers no TLS).
@Suite("PostgreSQL over TLS")
struct PostgresTLSTests {
    @Test func urlParametersAreCheckedAndShownWithoutThePassword() throws {
        let url = try PostgresURL(parsing: "postgres://agentd:s3cret@db.example:5433/agentd?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem")
        #expect(url.sslMode == .verifyFull && url.sslRootCert == "/etc/ca.pem")
        #expect(url.description == "postgres://agentd@db.example:5433/agentd?sslmode=verify-full")
        #expect(try PostgresURL(parsing: "postgres://agentd@h/agentd").sslMode == .prefer, "libpq's default")
        for (text, says) in [
            ("postgres://agentd:s3cret@h/agentd?sslmode=strict", "sslmode 'strict' is not one of disable, prefer, require, verify-ca, verify-full"),
            ("postgres://agentd:s3cret@h/agentd?sslcert=/x", "the parameter 'sslcert'; agentd reads sslmode and sslrootcert only"),
            ("postgres://agentd:s3cret@h/agentd?sslrootcert=", "sslrootcert names no file"),
        ] {
            let error = #expect(throws: SessionLogError.self) { try PostgresURL(parsing: text) }
            #expect(error?.message.contains(says) == true && error?.message.contains("s3cret") == false, "\(String(describing: error))")
        }
    }

    @Test func verifyFullConnectsOverTLSAndRefusesAnotherCA() async throws {
        let base = "/tmp/agentd-pgtls-\(Components.testID())"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ca = try TestCA.make(in: base + "/ca")
        let other = try TestCA.make(in: base + "/other")
        guard
            let cluster = try PrivateCluster.start(
                serverOptions: "-c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key",
                prepare: { cluster in
                    // The server reads its key and certificate from its data directory; it
                    // refuses a key others can read.
                    for name in ["server.pem", "server.key"] {
                        let target = cluster.data + "/" + name
                        try FileManager.default.copyItem(atPath: ca.directory + "/" + name, toPath: target)
                        if getuid() == 0 { try TestCommand.check(["chown", "postgres:postgres", target]) }
                        try TestCommand.check(["chmod", "0600", target])
                    }
                })
        else { return }
        defer { cluster.stop() }
        let plain = "postgres://agentd:\(cluster.password)@127.0.0.1:\(cluster.port)/agentd"

        // verify-full against the CA that signed the server's certificate (for 127.0.0.1): the
        // journal works, and the server says the connection is encrypted.
        let journal = try await PostgresJournal.open(
            url: try PostgresURL(parsing: plain + "?sslmode=verify-full&sslrootcert=\(ca.caPath)"), schema: "tls_ok")
        let s = try SessionID("over-tls")
        #expect(try await journal.append(session: s, type: "step", payload: Array("{}".utf8), epoch: nil) == 1)
        #expect(try await Self.encrypted(journal) == [true])
        try await journal.close()

        // Another CA: refused at open, saying so, never showing the password.
        let refused = await #expect(throws: SessionLogError.self) {
            _ = try await PostgresJournal.open(url: try PostgresURL(parsing: plain + "?sslmode=verify-full&sslrootcert=\(other.caPath)"), schema: "tls_bad")
        }
        #expect(refused?.message.contains("127.0.0.1:\(cluster.port)") == true, "\(String(describing: refused))")
        #expect(refused?.message.contains("check that sslrootcert is the CA that signed the server's certificate") == true)
        #expect(refused?.message.contains(cluster.password) == false)

        // disable: plain TCP, which this server also accepts.
        let cleartext = try await PostgresJournal.open(url: try PostgresURL(parsing: plain + "?sslmode=disable"), schema: "tls_off")
        #expect(try await Self.encrypted(cleartext) == [false])
        try await cleartext.close()
    }

    /// What the server says of the connection that runs the query: TLS or not.
    static func encrypted(_ journal: PostgresJournal) async throws -> [Bool] {
        var out: [Bool] = []
        for try await ssl in try await journal.client.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").decode(Bool.self) {
            out.append(ssl)
        }
        return out
    }

    @Test func requireAgainstAServerWithoutTLSIsRefused() async throws {
        let file = try #require(ProcessInfo.processInfo.environment["AGENTD_POSTGRES_URL_FILE"], "make env sets AGENTD_POSTGRES_URL_FILE")
        let text = try String(contentsOfFile: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let url = try PostgresURL(parsing: text + "?sslmode=require")
        let refused = await #expect(throws: SessionLogError.self) { _ = try await PostgresJournal.open(url: url, schema: "tls_required") }
        #expect(refused?.message.contains("the server does not offer TLS, and sslmode=require requires it") == true, "\(String(describing: refused))")
        #expect(refused.map { !$0.message.contains(text) } == true, "the URL with its password is never shown")
    }
}

import Foundation

/// A certificate authority made for one test with `openssl`, and a server certificate it
/// signed for `localhost`, `127.0.0.1` and `git.agentd.test` (plus any names asked for).
/// Clients verify against `caPath` (`curl --cacert`, `GIT_SSL_CAINFO`, a route's CA file).
public struct TestCA: Sendable {
    /// The name a test resolves to 127.0.0.1 (curl `--resolve`, git `http.curloptResolve`) to
    /// reach a fixture by a host name.
    public static let testHostName = "git.agentd.test"

    public let directory: String
    public var caPath: String { directory + "/ca.pem" }
    public var certificatePath: String { directory + "/server.pem" }
    public var keyPath: String { directory + "/server.key" }

    /// Makes the CA and the server certificate in `directory` (created if missing).
    public static func make(in directory: String, names: [String] = []) throws -> TestCA {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let ca = TestCA(directory: directory)
        let dnsNames = ["localhost", testHostName] + names
        let san = (dnsNames.map { "DNS:\($0)" } + ["IP:127.0.0.1"]).joined(separator: ",")
        try """
            basicConstraints=critical,CA:FALSE
            keyUsage=critical,digitalSignature,keyEncipherment
            extendedKeyUsage=serverAuth
            subjectAltName=\(san)

            """.write(toFile: directory + "/server.ext", atomically: true, encoding: .utf8)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try TestCommand.check(
            ["openssl", "req", "-x509"] + ec + [
                "-keyout", directory + "/ca.key", "-out", ca.caPath, "-days", "2", "-subj", "/CN=agentd test CA \(Components.testID())",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ])
        try TestCommand.check(
            ["openssl", "req"] + ec + ["-keyout", ca.keyPath, "-out", directory + "/server.csr", "-subj", "/CN=localhost"])
        try TestCommand.check([
            "openssl", "x509", "-req", "-in", directory + "/server.csr", "-CA", ca.caPath, "-CAkey", directory + "/ca.key",
            "-set_serial", "0x" + String(UInt64.random(in: 1...UInt64.max), radix: 16), "-days", "2",
            "-extfile", directory + "/server.ext", "-out", ca.certificatePath,
        ])
        return ca
    }
}

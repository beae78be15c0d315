import Foundation
import SessionLog

/// Where the PostgreSQL store is: `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, optionally
/// with `?sslmode=MODE&sslrootcert=PEMFILE` (libpq's names and meanings; see `SSLMode`).
///
/// It is read from a file (`PostgresURL.read(file:)`), never from argv or the environment's
/// values, and its `description` never shows the password.
public struct PostgresURL: Sendable, CustomStringConvertible {
    /// The server's host name or address.
    public let host: String
    /// The server's TCP port (5432 when the URL has none).
    public let port: Int
    /// The role to log in as.
    public let user: String
    /// The role's password (nil for none); never shown by `description`.
    let password: String?
    /// The database.
    public let database: String
    /// How the connection is encrypted and checked (`?sslmode=`; `prefer` when absent, as libpq).
    public let sslMode: SSLMode
    /// A PEM file of the CAs the server's certificate must chain to (`?sslrootcert=`); the
    /// system's trust store when absent.
    public let sslRootCert: String?

    /// libpq's `sslmode` values.
    public enum SSLMode: String, Sendable, CaseIterable {
        /// Plain TCP.
        case disable
        /// TLS when the server offers it, plain otherwise; the certificate is not checked.
        case prefer
        /// TLS or no connection; the certificate is not checked unless `sslrootcert` is given
        /// (then as `verify-ca`).
        case require
        /// TLS, the certificate chained to a trusted CA; the host name is not checked.
        case verifyCA = "verify-ca"
        /// TLS, the certificate chained to a trusted CA and naming the host. Use this across
        /// any network you do not control.
        case verifyFull = "verify-full"
    }

    /// Parses `postgres://` or `postgresql://` URLs; user and password may be percent-encoded.
    /// - Throws: `SessionLogError(.invalidArgument)`, whose message never contains the password.
    public init(parsing text: String) throws {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        func bad(_ why: String) -> SessionLogError {
            SessionLogError(.invalidArgument, "the PostgreSQL URL is not usable: \(why); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE")
        }
        guard let scheme = trimmed.range(of: "://"), ["postgres", "postgresql"].contains(trimmed[..<scheme.lowerBound].lowercased()) else {
            throw bad("it does not start with postgres://")
        }
        var rest = trimmed[scheme.upperBound...]
        var user = "", password: String?
        if let at = rest.lastIndex(of: "@") {
            let credentials = rest[..<at]
            rest = rest[rest.index(after: at)...]
            if let colon = credentials.firstIndex(of: ":") {
                user = String(credentials[..<colon]).removingPercentEncoding ?? ""
                password = String(credentials[credentials.index(after: colon)...]).removingPercentEncoding
            } else {
                user = String(credentials).removingPercentEncoding ?? ""
            }
        }
        guard !user.isEmpty else { throw bad("it names no user") }
        guard let slash = rest.firstIndex(of: "/") else { throw bad("it names no database") }
        var database = String(rest[rest.index(after: slash)...])
        var sslMode = SSLMode.prefer, sslRootCert: String?
        if let q = database.firstIndex(of: "?") {
            for pair in database[database.index(after: q)...].split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let name = String(parts[0]), value = parts.count > 1 ? (String(parts[1]).removingPercentEncoding ?? String(parts[1])) : ""
                switch name {
                case "sslmode":
                    guard let mode = SSLMode(rawValue: value) else {
                        throw bad("sslmode '\(value)' is not one of \(SSLMode.allCases.map(\.rawValue).joined(separator: ", "))")
                    }
                    sslMode = mode
                case "sslrootcert":
                    guard !value.isEmpty else { throw bad("sslrootcert names no file") }
                    sslRootCert = value
                default:
                    throw bad("it has the parameter '\(name)'; agentd reads sslmode and sslrootcert only")
                }
            }
            database = String(database[..<q])
        }
        database = database.removingPercentEncoding ?? database
        guard !database.isEmpty else { throw bad("it names no database") }
        let hostPort = rest[..<slash]
        var host = String(hostPort), port = 5432
        if let colon = hostPort.lastIndex(of: ":"), !hostPort.hasSuffix("]") {
            host = String(hostPort[..<colon])
            guard let p = Int(hostPort[hostPort.index(after: colon)...]), (1...65535).contains(p) else { throw bad("its port is not a number in 1–65535") }
            port = p
        }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw bad("it names no host") }
        (self.host, self.port, self.user, self.password, self.database) = (host, port, user, password, database)
        (self.sslMode, self.sslRootCert) = (sslMode, sslRootCert)
    }

    /// Reads the URL from a file (its only line), e.g. a systemd credential.
    /// - Throws: `SessionLogError(.invalidArgument)` naming the file when it cannot be read or parsed.
    public static func read(file path: String) throws -> PostgresURL {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SessionLogError(.invalidArgument, "cannot read the PostgreSQL URL file \(path): it is missing or unreadable; write postgres://USER:PASSWORD@HOST:PORT/DATABASE into it")
        }
        do {
            return try PostgresURL(parsing: String(decoding: data, as: UTF8.self))
        } catch let error as SessionLogError {
            throw SessionLogError(.invalidArgument, "in \(path): \(error.message)")
        }
    }

    /// `postgres://USER@HOST:PORT/DATABASE` (and `?sslmode=` unless `prefer`), without the password.
    public var description: String {
        "postgres://\(user)@\(host):\(port)/\(database)" + (sslMode == .prefer ? "" : "?sslmode=\(sslMode.rawValue)")
    }
}

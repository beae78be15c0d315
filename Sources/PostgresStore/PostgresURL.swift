import Foundation
import SessionLog

/// Where the PostgreSQL store is: `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
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
        if let q = database.firstIndex(of: "?") { database = String(database[..<q]) }
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

    /// `postgres://USER@HOST:PORT/DATABASE`, without the password.
    public var description: String { "postgres://\(user)@\(host):\(port)/\(database)" }
}

import NIOSSL
import PostgresNIO
import SessionLog

/// The TLS a `PostgresURL`'s `sslmode` and `sslrootcert` ask for, for postgres-nio's single
/// connections and its pool (the two take it in different forms).
extension PostgresURL {
    /// nil for `disable`; otherwise the client configuration: TLS 1.2 or later, the
    /// certificate checked as the mode says, against `sslrootcert`'s CAs or the system's.
    /// - Throws: `SessionLogError(.invalidArgument)` when `sslrootcert` cannot be read.
    func tlsConfiguration() throws -> TLSConfiguration? {
        guard sslMode != .disable else { return nil }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        if let file = sslRootCert {
            do {
                tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(file))
            } catch {
                throw SessionLogError(
                    .invalidArgument, "the PostgreSQL URL's sslrootcert \(file) cannot be read as PEM certificates (\(error)); name a readable CA file")
            }
        }
        switch sslMode {
        case .disable, .prefer: tls.certificateVerification = .none
        case .require: tls.certificateVerification = sslRootCert == nil ? .none : .noHostnameVerification
        case .verifyCA: tls.certificateVerification = .noHostnameVerification
        case .verifyFull: tls.certificateVerification = .fullVerification
        }
        return tls
    }

    /// For `PostgresConnection.connect`.
    func connectionTLS() throws -> PostgresConnection.Configuration.TLS {
        guard let tls = try tlsConfiguration() else { return .disable }
        let context = try NIOSSLContext(configuration: tls)
        return sslMode == .prefer ? .prefer(context) : .require(context)
    }

    /// For `PostgresClient`.
    func clientTLS() throws -> PostgresClient.Configuration.TLS {
        guard let tls = try tlsConfiguration() else { return .disable }
        return sslMode == .prefer ? .prefer(tls) : .require(tls)
    }
}

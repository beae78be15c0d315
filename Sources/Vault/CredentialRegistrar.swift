import Logging
import Policy
import SessionLog

/// Keeps the journal's redactor in step with the credentials the policies name: at start and
/// after every policy reload, each credential's value is resolved on the host and added to
/// the redactor, so that a credential that arrives with a reload is never journaled in clear.
///
/// `sync` is cheap when nothing changed (it compares the policy store's generation), so the
/// runtime calls it before it journals anything a caller sent, as well as on every change
/// notification: a call that races a reload cannot slip a new secret past the redactor.
public actor CredentialRegistrar {
    private let resolver: CredentialResolver
    private let redactor: Redactor
    private let logger: Logger
    private var synced: Int?
    private var reported: Set<String> = []

    /// - Parameters:
    ///   - resolver: reads the values (`env:`, `file:`, `systemd:`).
    ///   - redactor: the journal's redactor (`SessionJournal.redactor`).
    ///   - logger: credentials that cannot be resolved are logged once each (never a value).
    public init(resolver: CredentialResolver, redactor: Redactor, logger: Logger = Logger(label: "agentd.vault")) {
        self.resolver = resolver
        self.redactor = redactor
        self.logger = logger
    }

    /// Registers the credentials of the policies in force with the redactor, unless this
    /// generation of `policies` was already registered.
    /// - Returns: the credentials that could not be resolved (empty when nothing changed).
    @discardableResult
    public func sync(_ policies: PolicyStore) async -> [VaultError] {
        let generation = await policies.generation
        guard generation != synced else { return [] }
        let (secrets, problems) = resolver.resolveAll(await policies.current)
        for secret in secrets { redactor.add(secret) }
        for problem in problems where reported.insert(problem.message).inserted { logger.warning("\(problem.description)") }
        synced = generation
        return problems
    }
}

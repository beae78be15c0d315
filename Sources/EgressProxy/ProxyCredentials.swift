import Policy
import Synchronization
import Vault

/// The credential values of the policies in force, kept for the vault-proxy and the host-side
/// git clone: refreshed at start and after every policy reload (`update`), read synchronously
/// by `ProxySupervisor` at each (re)start. Never printed: it describes itself by names only.
public final class ProxyCredentials: Sendable, CustomStringConvertible {
    private let resolver: CredentialResolver
    private let values = Mutex<[String: String]>([:])

    public init(resolver: CredentialResolver) {
        self.resolver = resolver
    }

    /// Resolves every credential `set` names (unresolvable ones are left out; the registrar
    /// reports them). Returns whether any value was added or changed.
    @discardableResult
    public func update(_ set: PolicySet) -> Bool {
        let fresh = ProxySupervisor.credentialValues(set, resolver: resolver)
        return values.withLock { current in
            defer { current = fresh }
            return fresh.contains { current[$0.key] != $0.value }
        }
    }

    /// Every value by name.
    public var all: [String: String] { values.withLock { $0 } }

    /// The value of credential `name`, if it resolved.
    public func value(named name: String) -> String? { values.withLock { $0[name] } }

    public var description: String { "ProxyCredentials(\(values.withLock { $0.keys.sorted() }))" }
}

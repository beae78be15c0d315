/// `Secret` and `Redactor` live in the Foundation-free `Secrets` module (so that vault-proxy
/// can use them without linking Foundation); every importer of SessionLog sees them as before.
@_exported import Secrets

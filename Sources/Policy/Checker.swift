import Foundation
import Yams

/// Walks a composed YAML document against the policy schema, collecting every problem.
///
/// Each field reader reports at the value's own mark and returns nil on error, so one bad
/// field never hides another; cross-references (routes → credentials, git → routes, network
/// mode) are checked once every section has been read.
struct PolicyChecker {
    static let maxDiagnostics = 100

    static let topKeys = ["apiVersion", "kind", "metadata", "hands", "pool", "network", "credentials", "routes", "git", "brain", "session"]
    static let metadataKeys = ["name", "summary"]
    static let handsKeys = [
        "driver", "image", "memory", "cpus", "pids", "user", "commandTimeout", "idleTimeout", "outputLimit",
        "disk", "workspace", "ulimits",
    ]
    static let ulimitKeys = ["nofile", "nproc"]
    static let poolKeys = ["size"]
    static let networkKeys = ["mode", "allowHosts"]
    static let credentialKeys = ["name", "source"]
    static let routeKeys = ["name", "upstream", "credential", "header", "caFile"]
    static let gitKeys = ["repository", "branch", "route", "push"]
    static let gitPushKeys = ["branches", "tags"]
    static let brainKeys = ["retries", "backoff"]
    static let sessionKeys = ["maxEventSize", "maxSandboxes"]

    let path: String
    private(set) var diagnostics: [PolicyDiagnostic] = []
    /// Where `metadata.name`'s value is, once read.
    private(set) var nameMark: Mark?

    init(path: String) { self.path = path }

    /// The diagnostics sorted by position, capped at `maxDiagnostics`.
    func finishedDiagnostics() -> [PolicyDiagnostic] {
        let sorted = diagnostics.enumerated().sorted {
            ($0.element.line, $0.element.column, $0.offset) < ($1.element.line, $1.element.column, $1.offset)
        }.map(\.element)
        guard sorted.count > Self.maxDiagnostics else { return sorted }
        let last = sorted[Self.maxDiagnostics - 1]
        return Array(sorted.prefix(Self.maxDiagnostics)) + [
            PolicyDiagnostic(
                path: path, line: last.line, column: last.column,
                message: "too many errors; stopped after \(Self.maxDiagnostics)")
        ]
    }

    // MARK: - The document

    mutating func policy(_ root: Node) -> Policy? {
        guard case .mapping = root else {
            error(root.mark, "expected a policy (a mapping with apiVersion, kind and metadata), found \(Self.describe(root))")
            return nil
        }
        guard let top = mapping(root, label: "", keys: Self.topKeys) else { return nil }

        if let (value, node) = requiredString(top, "apiVersion", label: "apiVersion", place: nil, hint: "apiVersion: \(Policy.apiVersion)"),
            value != Policy.apiVersion
        {
            error(node.mark, "apiVersion: unsupported '\(value)' (this agentd reads \(Policy.apiVersion))")
        }
        if let (value, node) = requiredString(top, "kind", label: "kind", place: nil, hint: "kind: \(Policy.kind)"), value != Policy.kind {
            error(node.mark, "kind: expected '\(Policy.kind)', found '\(value)'")
        }

        var name: String?
        var summary: String?
        if top["metadata"] == nil {
            error(top.mark, "missing required key 'metadata' (add metadata: {name: NAME})")
        } else if let metadata = mapping(top["metadata"], label: "metadata", keys: Self.metadataKeys) {
            if let (value, node) = requiredString(metadata, "name", label: "metadata.name", place: "metadata", hint: "name: NAME") {
                nameMark = node.mark
                if checkName(value, node: node, label: "metadata.name") { name = value }
            }
            summary = string(metadata, "summary", label: "metadata.summary")
        }

        let hands = hands(top["hands"])
        let pool = pool(top["pool"])
        let network = network(top["network"])
        let credentials = credentials(top["credentials"])
        let routes = routes(top["routes"], credentials: credentials)
        let git = git(top["git"], routes: routes)
        let brain = brain(top["brain"])
        let session = session(top["session"])

        if let network, network.mode == .none {
            if let key = top.key("routes"), case .sequence(let items) = top["routes"], !items.isEmpty {
                error(key.mark, "routes are defined but network.mode is 'none'; set network.mode: proxy so the sandbox can reach them")
            }
        }

        if let hands, let pool, pool.size > 0, let sizeNode = top["pool"]?["size"] {
            // Pooled sandboxes are made before any session exists: they can hold neither a
            // session's workspace nor run as units (those start per call).
            if hands.workspace == .session {
                error(sizeNode.mark, "pool.size is \(pool.size) but hands.workspace is 'session': a warm sandbox cannot hold a session's workspace, so this pool would never be used; set pool.size: 0 or hands.workspace: task")
            } else if hands.driver == .unit {
                error(sizeNode.mark, "pool.size is \(pool.size) but hands.driver is 'unit': unit Hands start per call and are not pooled; set pool.size: 0 or hands.driver: container")
            }
        }

        var gitOK = true
        let gitValue = git.optional(&gitOK)
        guard gitOK, credentials.valid, routes.valid, let name, let hands, let pool, let network, let brain, let session
        else { return nil }
        return Policy(
            name: name, summary: summary, hands: hands, pool: pool, network: network,
            credentials: credentials.list.map(\.credential), routes: routes.list, git: gitValue, brain: brain,
            session: session)
    }

    // MARK: - Sections

    mutating func hands(_ node: Node?) -> HandsPolicy? {
        guard let f = mapping(node, label: "hands", keys: Self.handsKeys) else { return nil }
        let d = HandsPolicy()
        var ok = true
        var ulimits = Ulimits()
        if f["ulimits"] != nil {
            if let u = mapping(f["ulimits"], label: "hands.ulimits", keys: Self.ulimitKeys) {
                ulimits.nofile = int(u, "nofile", label: "hands.ulimits.nofile", min: 16, max: 1 << 20).optional(&ok)
                ulimits.nproc = int(u, "nproc", label: "hands.ulimits.nproc", min: 1, max: 4_194_304).optional(&ok)
            } else {
                ok = false
            }
        }
        let hands = HandsPolicy(
            driver: enumValue(f, "driver", label: "hands.driver", what: "driver", as: HandsDriverKind.self).or(d.driver, &ok),
            image: checkedString(
                f, "image", label: "hands.image", isValid: Self.isImageReference,
                problem: { _ in "is not an image reference (e.g. agentd-base:latest)" }
            ).or(d.image, &ok),
            memoryBytes: size(f, "memory", label: "hands.memory", min: 16 << 20, max: 1 << 40).or(d.memoryBytes, &ok),
            cpus: cpusValue(f, "cpus").or(d.cpus, &ok),
            pids: int(f, "pids", label: "hands.pids", min: 8, max: 4_194_304).or(d.pids, &ok),
            user: checkedString(
                f, "user", label: "hands.user", isValid: { $0 == HandsPolicy.autoUser },
                problem: { value in
                    Self.isUser(value)
                        ? "is a fixed uid, which every sandbox of this policy would share (one could reach another's files and processes); use auto: agentd gives each sandbox its own uid from --sandbox-uids"
                        : "is not allowed; use auto (each sandbox gets its own uid from agentd's --sandbox-uids range)"
                }
            ).or(d.user, &ok),
            commandTimeoutSeconds: duration(f, "commandTimeout", label: "hands.commandTimeout", min: 1, max: 86_400)
                .or(d.commandTimeoutSeconds, &ok),
            idleTimeoutSeconds: duration(f, "idleTimeout", label: "hands.idleTimeout", min: 1, max: 7 * 86_400)
                .or(d.idleTimeoutSeconds, &ok),
            outputLimitBytes: size(f, "outputLimit", label: "hands.outputLimit", min: 1 << 10, max: 1 << 30)
                .or(d.outputLimitBytes, &ok),
            diskBytes: size(f, "disk", label: "hands.disk", min: 16 << 20, max: 1 << 40).or(d.diskBytes, &ok),
            workspace: enumValue(
                f, "workspace", label: "hands.workspace", what: "workspace persistence", as: WorkspacePersistence.self
            ).or(d.workspace, &ok),
            ulimits: ulimits)
        return ok ? hands : nil
    }

    mutating func pool(_ node: Node?) -> PoolPolicy? {
        guard let f = mapping(node, label: "pool", keys: Self.poolKeys) else { return nil }
        var ok = true
        let pool = PoolPolicy(size: int(f, "size", label: "pool.size", min: 0, max: 64).or(0, &ok))
        return ok ? pool : nil
    }

    mutating func network(_ node: Node?) -> NetworkPolicy? {
        guard let f = mapping(node, label: "network", keys: Self.networkKeys) else { return nil }
        var ok = true
        var result = NetworkPolicy()
        result.mode = enumValue(f, "mode", label: "network.mode", what: "network mode", as: NetworkMode.self)
            .or(.none, &ok)
        if let items = sequence(f, "allowHosts", label: "network.allowHosts") {
            result.allowHosts = uniqueList(
                items, label: "network.allowHosts", expected: "a host name", what: "host", normalize: { $0.lowercased() },
                problem: { Self.isHostPattern($0) ? nil : "is not a host (write host, host:port or *.domain)" }
            ).or([], &ok)
            if result.mode == .none, !items.isEmpty, let key = f.key("allowHosts") {
                error(
                    key.mark,
                    "network.allowHosts lists hosts but network.mode is 'none'; set network.mode: proxy or remove the list")
            }
        } else if f["allowHosts"] != nil {
            ok = false
        }
        return ok ? result : nil
    }

    /// Credentials read so far, with the marks of their names for duplicate reports.
    struct CredentialList {
        var list: [(credential: Credential, mark: Mark?)] = []
        /// Every well-formed name, including those of entries with other problems, so that
        /// one bad entry does not also make every reference to it an error.
        var names: [String] = []
        var valid = true
        /// False when `credentials` is not a list at all: references to it are then not checked.
        var readable = true
    }

    mutating func credentials(_ node: Node?) -> CredentialList {
        guard let items = sequence(node, label: "credentials") else { return CredentialList(valid: node == nil, readable: node == nil) }
        var ok = true
        var result = CredentialList()
        for (index, item) in items.enumerated() {
            let name = Self.peekName(item)
            if let name { result.names.append(name) }
            let label = name.map { "credential '\($0)'" } ?? "credentials[\(index)]"
            guard let f = mapping(item, label: label, keys: Self.credentialKeys) else {
                ok = false
                continue
            }
            let nameValue = requiredString(f, "name", label: "\(label): name", place: label, hint: "name: NAME")
            let sourceValue = requiredString(f, "source", label: "\(label): source", place: label, hint: "source: env:NAME")
            var source: CredentialSource?
            if let (text, node) = sourceValue {
                source = CredentialSource(text)
                if source == nil {
                    error(
                        node.mark,
                        "\(label): '\(text)' is not a credential source (use env:NAME, file:/absolute/path or systemd:NAME)")
                }
            }
            guard let (nameText, nameNode) = nameValue, checkName(nameText, node: nameNode, label: "\(label): name"),
                let source
            else {
                ok = false
                continue
            }
            if let first = result.list.first(where: { $0.credential.name == nameText }) {
                error(nameNode.mark, "duplicate credential name '\(nameText)' (first defined at \(Self.at(first.mark)))")
                ok = false
                continue
            }
            result.list.append((Credential(name: nameText, source: source), nameNode.mark))
        }
        result.valid = ok
        return result
    }

    struct RouteList {
        var list: [Route] = []
        var marks: [String: Mark?] = [:]
        /// Every well-formed name, including those of routes with other problems.
        var names: [String] = []
        var valid = true
    }

    mutating func routes(_ node: Node?, credentials: CredentialList) -> RouteList {
        guard let items = sequence(node, label: "routes") else { return RouteList(valid: node == nil) }
        var ok = true
        var result = RouteList()
        for (index, item) in items.enumerated() {
            let name = Self.peekName(item)
            if let name { result.names.append(name) }
            let label = name.map { "route '\($0)'" } ?? "routes[\(index)]"
            guard let f = mapping(item, label: label, keys: Self.routeKeys) else {
                ok = false
                continue
            }
            var itemOK = true
            let nameValue = requiredString(f, "name", label: "\(label): name", place: label, hint: "name: NAME")
            var upstream: String?
            if let (text, node) = requiredString(f, "upstream", label: "\(label): upstream", place: label, hint: "upstream: https://HOST") {
                if let problem = Self.httpsURLProblem(text, allowPath: true) {
                    error(node.mark, "\(label): upstream '\(text)' \(problem)")
                } else {
                    upstream = text
                }
            }
            var credential: String?
            if let (text, node) = stringNode(f, "credential", label: "\(label): credential") {
                credential = text
                if credentials.readable, !credentials.names.contains(text) {
                    let hint = Self.suggestion(for: text, among: credentials.names).map { " (did you mean '\($0)'?)" } ?? ""
                    error(node.mark, "\(label) names credential '\(text)', which is not defined under credentials\(hint)")
                    itemOK = false
                }
            } else if f["credential"] != nil {
                itemOK = false
            }
            var header: String?
            if let (text, node) = stringNode(f, "header", label: "\(label): header") {
                if let problem = Self.headerProblem(text, hasCredential: credential != nil || f["credential"] != nil) {
                    error(node.mark, "\(label): header '\(text)' \(problem)")
                    itemOK = false
                } else {
                    header = text
                }
            } else if f["header"] != nil {
                itemOK = false
            }
            var caFile: String?
            if let (text, node) = stringNode(f, "caFile", label: "\(label): caFile") {
                if !text.hasPrefix("/") || text.count > 4096 || text.contains(where: { $0.isNewline || $0 == "\0" }) {
                    error(node.mark, "\(label): caFile '\(text.prefix(200))' must be an absolute path to a PEM file of CA certificates (caFile: /etc/agentd/ca.pem)")
                    itemOK = false
                } else {
                    caFile = text
                }
            } else if f["caFile"] != nil {
                itemOK = false
            }
            guard itemOK, let (nameText, nameNode) = nameValue, checkName(nameText, node: nameNode, label: "\(label): name"),
                let upstream
            else {
                ok = false
                continue
            }
            if let first = result.marks[nameText] {
                error(nameNode.mark, "duplicate route name '\(nameText)' (first defined at \(Self.at(first)))")
                ok = false
                continue
            }
            result.marks[nameText] = nameNode.mark
            result.list.append(Route(name: nameText, upstream: upstream, credential: credential, header: header, caFile: caFile))
        }
        result.valid = ok
        return result
    }

    mutating func git(_ node: Node?, routes: RouteList) -> Read<GitPolicy> {
        guard let node, !Self.isNull(node) else { return .absent }
        guard let f = mapping(node, label: "git", keys: Self.gitKeys) else { return .invalid }
        var ok = true
        var repository: String?
        var repositoryHost: String?
        if let (text, node) = requiredString(f, "repository", label: "git.repository", place: "git", hint: "repository: https://HOST/OWNER/REPO.git") {
            if let problem = Self.httpsURLProblem(text, allowPath: true) {
                let ssh = text.contains("@") && !text.contains("://") ? "; SSH remotes cannot go through the proxy" : ""
                error(node.mark, "git.repository: '\(text)' \(problem)\(ssh)")
            } else {
                repository = text
                repositoryHost = URLComponents(string: text)?.host?.lowercased()
            }
        }
        var branch: String?
        if let (text, node) = stringNode(f, "branch", label: "git.branch") {
            if GitPolicy.isBranchName(text) {
                branch = text
            } else {
                error(node.mark, "git.branch: '\(text)' is not a valid branch name")
                ok = false
            }
        } else if f["branch"] != nil {
            ok = false
        }
        var route: String?
        if let (text, node) = stringNode(f, "route", label: "git.route") {
            route = text
            if routes.names.contains(text) {
                if let target = routes.list.first(where: { $0.name == text }) {
                    let routeHost = URLComponents(string: target.upstream)?.host?.lowercased()
                    if let repositoryHost, let routeHost, repositoryHost != routeHost {
                        error(
                            node.mark,
                            "git.route: route '\(text)' goes to \(routeHost), but git.repository is on \(repositoryHost)")
                        ok = false
                    } else if let repository, GitPolicy(repository: repository).repositoryPath(below: target.upstream) == nil {
                        error(
                            node.mark,
                            "git.route: route '\(text)' goes to \(target.upstream), and git.repository is not below it (the proxy serves the repository's path below the route's upstream; make the upstream https://HOST[:PORT] or a prefix of the repository URL)")
                        ok = false
                    }
                }
            } else {
                let hint = Self.suggestion(for: text, among: routes.names).map { " (did you mean '\($0)'?)" } ?? ""
                error(node.mark, "git.route: '\(text)' is not defined under routes\(hint)")
                ok = false
            }
        } else if f["route"] != nil {
            ok = false
        }
        var push = GitPushPolicy()
        if let pushNode = f["push"] {
            if f["route"] == nil, let key = f.key("push") {
                error(key.mark, "git.push has no effect without git.route (the route's proxy enforces it); add route: NAME")
                ok = false
            }
            if let value = gitPush(pushNode) { push = value } else { ok = false }
        }
        guard ok, let repository else { return .invalid }
        return .value(GitPolicy(repository: repository, branch: branch, route: route, push: push))
    }

    /// `git.push`: `branches` (branch patterns, default `agent/*`) and `tags` (default false).
    mutating func gitPush(_ node: Node) -> GitPushPolicy? {
        guard let f = mapping(node, label: "git.push", keys: Self.gitPushKeys) else { return nil }
        var ok = true
        var push = GitPushPolicy()
        if let items = sequence(f, "branches", label: "git.push.branches") {
            push.branches = uniqueList(
                items, label: "git.push.branches", expected: "a branch pattern such as agent/*", what: "pattern",
                problem: GitPushPolicy.patternProblem
            ).or([], &ok)
        } else if f["branches"] != nil {
            ok = false
        }
        push.tags = bool(f, "tags", label: "git.push.tags").or(push.tags, &ok)
        return ok ? push : nil
    }

    mutating func brain(_ node: Node?) -> BrainPolicy? {
        guard let f = mapping(node, label: "brain", keys: Self.brainKeys) else { return nil }
        var ok = true
        let d = BrainPolicy()
        let brain = BrainPolicy(
            retries: int(f, "retries", label: "brain.retries", min: 0, max: 100).or(d.retries, &ok),
            backoffSeconds: duration(f, "backoff", label: "brain.backoff", min: 0, max: 3600).or(d.backoffSeconds, &ok))
        return ok ? brain : nil
    }

    mutating func session(_ node: Node?) -> SessionPolicy? {
        guard let f = mapping(node, label: "session", keys: Self.sessionKeys) else { return nil }
        var ok = true
        let session = SessionPolicy(
            maxEventBytes: size(f, "maxEventSize", label: "session.maxEventSize", min: 1 << 10, max: 64 << 20)
                .or(SessionPolicy().maxEventBytes, &ok),
            maxSandboxes: int(f, "maxSandboxes", label: "session.maxSandboxes", min: 1, max: 1024).or(SessionPolicy().maxSandboxes, &ok))
        return ok ? session : nil
    }

    // MARK: - Structure

    /// A mapping whose keys have been checked against a schema.
    struct Fields {
        var mark: Mark?
        var entries: [String: (key: Node, value: Node)] = [:]
        subscript(key: String) -> Node? { entries[key]?.value }
        func key(_ key: String) -> Node? { entries[key]?.key }
    }

    /// Checks that `node` is a mapping with only `keys`; absent or null reads as empty.
    mutating func mapping(_ node: Node?, label: String, keys: [String]) -> Fields? {
        guard let node else { return Fields() }
        switch node {
        case .scalar where Self.isNull(node):
            return Fields(mark: node.mark)
        case .mapping(let mapping):
            var fields = Fields(mark: node.mark)
            for (key, value) in mapping {
                guard case .scalar(let scalar) = key else {
                    error(key.mark, "keys\(label.isEmpty ? "" : " in \(label)") must be plain words, found \(Self.describe(key))")
                    continue
                }
                let name = scalar.string
                guard keys.contains(name) else {
                    let place = label.isEmpty ? "at the top level" : "in \(label)"
                    let hint = Self.suggestion(for: name, among: keys).map { " (did you mean '\($0)'?)" } ?? ""
                    error(key.mark, "unknown key '\(Self.clip(name))' \(place)\(hint)")
                    continue
                }
                fields.entries[name] = (key, value)
            }
            // Unknown keys are reported; the known ones are still checked.
            return fields
        default:
            let what = label.isEmpty ? "the document" : label
            error(node.mark, "\(what): expected a mapping, found \(Self.describe(node))")
            return nil
        }
    }

    /// Checks that `node` is a list (absent or null reads as empty); nil after reporting.
    mutating func sequence(_ node: Node?, label: String) -> [Node]? {
        guard let node else { return nil }
        switch node {
        case .scalar where Self.isNull(node): return []
        case .sequence(let sequence): return Array(sequence)
        default:
            error(node.mark, "\(label): expected a list, found \(Self.describe(node))")
            return nil
        }
    }

    mutating func sequence(_ f: Fields, _ key: String, label: String) -> [Node]? {
        sequence(f[key], label: label)
    }

    /// A list of strings, each normalized and checked by `problem` (nil: fine), without
    /// duplicates; every bad entry is reported at its own mark.
    mutating func uniqueList(
        _ items: [Node], label: String, expected: String, what: String, normalize: (String) -> String = { $0 }, problem: (String) -> String?
    ) -> Read<[String]> {
        var ok = true
        var values: [String] = []
        var seen: [String: Mark?] = [:]
        for (index, item) in items.enumerated() {
            let itemLabel = "\(label)[\(index)]"
            guard let text = scalarString(item, label: itemLabel, expected: expected) else {
                ok = false
                continue
            }
            let value = normalize(text)
            if let problem = problem(value) {
                error(item.mark, "\(itemLabel): '\(Self.clip(text))' \(problem)")
                ok = false
            } else if let first = seen[value] {
                error(item.mark, "\(itemLabel): duplicate \(what) '\(Self.clip(text))' (first listed at \(Self.at(first)))")
                ok = false
            } else {
                seen[value] = item.mark
                values.append(value)
            }
        }
        return ok ? .value(values) : .invalid
    }

    /// A non-null scalar's text; reports and returns nil otherwise.
    mutating func scalarString(_ node: Node, label: String, expected: String) -> String? {
        if case .scalar(let scalar) = node, !Self.isNull(node) { return scalar.string }
        if Self.isNull(node) {
            error(node.mark, "\(label): no value given (expected \(expected))")
        } else {
            error(node.mark, "\(label): expected \(expected), found \(Self.describe(node))")
        }
        return nil
    }

    /// The string value of `key` with its node; nil when absent or invalid (reported).
    mutating func stringNode(_ f: Fields, _ key: String, label: String) -> (String, Node)? {
        guard let node = f[key] else { return nil }
        if Self.isNull(node) {
            error(node.mark, "\(label): no value given (write a value or remove the key to use the default)")
            return nil
        }
        guard let text = scalarString(node, label: label, expected: "a string") else { return nil }
        return (text, node)
    }

    mutating func string(_ f: Fields, _ key: String, label: String) -> String? {
        stringNode(f, key, label: label)?.0
    }

    /// Like `stringNode`, but reports a missing key at the mapping (`place` names it).
    mutating func requiredString(_ f: Fields, _ key: String, label: String, place: String?, hint: String) -> (String, Node)? {
        guard f[key] != nil else {
            error(f.mark, "missing required key '\(key)'\(place.map { " in \($0)" } ?? "") (add \(hint))")
            return nil
        }
        return stringNode(f, key, label: label)
    }

    // MARK: - Typed values

    /// A field read: absent (use the default), invalid (already reported) or a value.
    enum Read<T> {
        case absent, invalid, value(T)

        /// The value, or `fallback` when absent; clears `ok` when invalid.
        func or(_ fallback: T, _ ok: inout Bool) -> T {
            switch self {
            case .absent: return fallback
            case .invalid:
                ok = false
                return fallback
            case .value(let v): return v
            }
        }

        /// The value, nil when absent; clears `ok` when invalid.
        func optional(_ ok: inout Bool) -> T? {
            switch self {
            case .absent: return nil
            case .invalid:
                ok = false
                return nil
            case .value(let v): return v
            }
        }
    }

    /// Reads a string field and checks it with `isValid`, reporting `problem` when it fails.
    mutating func checkedString(_ f: Fields, _ key: String, label: String, isValid: (String) -> Bool, problem: (String) -> String) -> Read<String> {
        guard f[key] != nil else { return .absent }
        guard let (value, node) = stringNode(f, key, label: label) else { return .invalid }
        guard isValid(value) else {
            error(node.mark, "\(label): '\(Self.clip(value))' \(problem(value))")
            return .invalid
        }
        return .value(value)
    }


    mutating func bool(_ f: Fields, _ key: String, label: String) -> Read<Bool> {
        guard let node = f[key] else { return .absent }
        guard let text = scalarString(node, label: label, expected: "true or false") else { return .invalid }
        switch text {
        case "true", "True", "TRUE": return .value(true)
        case "false", "False", "FALSE": return .value(false)
        default:
            error(node.mark, "\(label): expected true or false, found '\(Self.clip(text))'")
            return .invalid
        }
    }

    mutating func int(_ f: Fields, _ key: String, label: String, min: Int, max: Int) -> Read<Int> {
        guard let node = f[key] else { return .absent }
        guard let text = scalarString(node, label: label, expected: "a whole number") else { return .invalid }
        guard let value = Int(text.trimmingWhitespace()) else {
            error(node.mark, "\(label): expected a whole number, found '\(Self.clip(text))'")
            return .invalid
        }
        guard value >= min, value <= max else {
            error(node.mark, "\(label): \(value) is out of range (\(min)–\(max))")
            return .invalid
        }
        return .value(value)
    }

    mutating func cpusValue(_ f: Fields, _ key: String) -> Read<Double> {
        let label = "hands.cpus"
        guard let node = f[key] else { return .absent }
        guard let text = scalarString(node, label: label, expected: "a number of CPUs such as 1.5") else { return .invalid }
        guard let value = Double(text.trimmingWhitespace()), value.isFinite else {
            error(node.mark, "\(label): expected a number of CPUs such as 1.5, found '\(Self.clip(text))'")
            return .invalid
        }
        guard value > 0, value <= 256 else {
            error(node.mark, "\(label): \(PolicyUnits.formatNumber(value)) is out of range (more than 0, at most 256)")
            return .invalid
        }
        return .value(value)
    }

    mutating func size(_ f: Fields, _ key: String, label: String, min: Int, max: Int) -> Read<Int> {
        guard let node = f[key] else { return .absent }
        let example = "use e.g. 256MiB, 1GiB"
        guard let text = scalarString(node, label: label, expected: "a size (\(example))") else { return .invalid }
        let accepted = PolicyUnits.sizeUnits.map(\.suffix).joined(separator: ", ")
        switch PolicyUnits.parseSize(text) {
        case .success(let bytes):
            if bytes < min {
                error(node.mark, "\(label): \(text) is below the minimum of \(PolicyUnits.formatSize(min))")
                return .invalid
            }
            if bytes > max {
                error(node.mark, "\(label): \(text) is above the maximum of \(PolicyUnits.formatSize(max))")
                return .invalid
            }
            return .value(bytes)
        case .failure(.unknownUnit(let unit, let suggestion)):
            let hint = suggestion.map { " (did you mean '\($0)'?)" } ?? ""
            error(node.mark, "\(label): unknown size unit '\(Self.clip(unit))' in '\(Self.clip(text))'\(hint); accepted units: \(accepted)")
        case .failure(.notWhole):
            error(node.mark, "\(label): '\(Self.clip(text))' is not a whole number of bytes")
        case .failure(.tooLarge):
            error(node.mark, "\(label): '\(Self.clip(text))' is above the maximum of \(PolicyUnits.formatSize(max))")
        case .failure:
            error(node.mark, "\(label): '\(Self.clip(text))' is not a size (\(example))")
        }
        return .invalid
    }

    mutating func duration(_ f: Fields, _ key: String, label: String, min: Double, max: Double) -> Read<Double> {
        guard let node = f[key] else { return .absent }
        let example = "use e.g. 30s, 5m, 250ms"
        guard let text = scalarString(node, label: label, expected: "a duration (\(example))") else { return .invalid }
        let accepted = PolicyUnits.durationUnits.map(\.suffix).joined(separator: ", ")
        switch PolicyUnits.parseDuration(text) {
        case .success(let seconds):
            if seconds < min {
                error(node.mark, "\(label): \(text) is below the minimum of \(PolicyUnits.formatDuration(seconds: min))")
                return .invalid
            }
            if seconds > max {
                error(node.mark, "\(label): \(text) is above the maximum of \(PolicyUnits.formatDuration(seconds: max))")
                return .invalid
            }
            return .value(seconds)
        case .failure(.missingUnit):
            let n = Self.clip(text.trimmingWhitespace())
            error(node.mark, "\(label): '\(n)' has no unit (write \(n)s, \(n)m or \(n)ms)")
        case .failure(.unknownUnit(let unit, let suggestion)):
            let hint = suggestion.map { " (did you mean '\($0)'?)" } ?? ""
            error(node.mark, "\(label): unknown duration unit '\(Self.clip(unit))' in '\(Self.clip(text))'\(hint); accepted units: \(accepted)")
        case .failure(.tooLarge):
            error(node.mark, "\(label): \(Self.clip(text)) is above the maximum of \(PolicyUnits.formatDuration(seconds: max))")
        case .failure:
            error(node.mark, "\(label): '\(Self.clip(text))' is not a duration (\(example))")
        }
        return .invalid
    }

    mutating func enumValue<E: RawRepresentable & CaseIterable>(
        _ f: Fields, _ key: String, label: String, what: String, as type: E.Type
    ) -> Read<E> where E.RawValue == String {
        guard let node = f[key] else { return .absent }
        let names = E.allCases.map(\.rawValue)
        guard let text = scalarString(node, label: label, expected: "one of: \(names.joined(separator: ", "))") else {
            return .invalid
        }
        if let value = E(rawValue: text) { return .value(value) }
        let hint = Self.suggestion(for: text, among: names).map { "did you mean '\($0)'? " } ?? ""
        error(node.mark, "\(label): unknown \(what) '\(Self.clip(text))' (\(hint)expected one of: \(names.joined(separator: ", ")))")
        return .invalid
    }

    /// Checks a policy, route or credential name; reports and returns false when invalid.
    mutating func checkName(_ name: String, node: Node, label: String) -> Bool {
        if Self.isName(name) { return true }
        error(
            node.mark,
            "\(label): '\(Self.clip(name))' is not a valid name (letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters)"
        )
        return false
    }

    mutating func error(_ mark: Mark?, _ message: String) {
        guard diagnostics.count <= Self.maxDiagnostics else { return }
        diagnostics.append(
            PolicyDiagnostic(path: path, line: Swift.max(mark?.line ?? 1, 1), column: Swift.max(mark?.column ?? 1, 1), message: message))
    }

    // MARK: - Helpers

    static func isNull(_ node: Node) -> Bool {
        guard case .scalar(let scalar) = node else { return false }
        if scalar.style == .singleQuoted || scalar.style == .doubleQuoted { return false }
        return ["", "~", "null", "Null", "NULL"].contains(scalar.string)
    }

    static func describe(_ node: Node) -> String {
        switch node {
        case .scalar where isNull(node): return "nothing"
        case .scalar(let scalar): return "'\(clip(scalar.string))'"
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    static func clip(_ text: String) -> String {
        let oneLine = text.replacingOccurrences(of: "\n", with: "\\n")
        return oneLine.count > 60 ? String(oneLine.prefix(57)) + "…" : oneLine
    }

    static func at(_ mark: Mark?) -> String {
        guard let mark else { return "1:1" }
        return "\(mark.line):\(mark.column)"
    }

    /// The `name` of a list item, if it has a plain one, to label its problems.
    static func peekName(_ node: Node) -> String? {
        guard case .mapping(let mapping) = node, let name = mapping["name"], case .scalar(let scalar) = name,
            !isNull(name), isName(scalar.string)
        else { return nil }
        return scalar.string
    }

    static func isName(_ text: String) -> Bool {
        let scalars = Array(text.unicodeScalars)
        guard let first = scalars.first, scalars.count <= 63, isAlnum(first) else { return false }
        return scalars.allSatisfy { isAlnum($0) || $0 == "." || $0 == "_" || $0 == "-" }
    }

    static func isAlnum(_ c: Unicode.Scalar) -> Bool {
        ("a"..."z").contains(c) || ("A"..."Z").contains(c) || ("0"..."9").contains(c)
    }

    static func isImageReference(_ text: String) -> Bool {
        guard let first = text.unicodeScalars.first, isAlnum(first), text.unicodeScalars.count <= 255 else { return false }
        return text.unicodeScalars.allSatisfy { isAlnum($0) || "._-/:@".unicodeScalars.contains($0) }
    }

    static func isUser(_ text: String) -> Bool {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count) else { return false }
        return parts.allSatisfy { part in
            part.count <= 10 && part.unicodeScalars.allSatisfy { ("0"..."9").contains($0) }
                && UInt32(part).map { $0 < UInt32.max } == true
        }
    }

    /// `host`, `host:port` or `*.domain`, already lowercased.
    static func isHostPattern(_ text: String) -> Bool {
        var host = Substring(text)
        if let colon = host.lastIndex(of: ":") {
            guard let port = Int(host[host.index(after: colon)...]), (1...65535).contains(port) else { return false }
            host = host[..<colon]
        }
        if host.hasPrefix("*.") { host = host.dropFirst(2) }
        let labels = host.split(separator: ".", omittingEmptySubsequences: false)
        guard !host.isEmpty, host.count <= 253 else { return false }
        return labels.allSatisfy { label in
            guard let first = label.unicodeScalars.first, let last = label.unicodeScalars.last, label.count <= 63 else {
                return false
            }
            return isAlnum(first) && isAlnum(last) && label.unicodeScalars.allSatisfy { isAlnum($0) || $0 == "-" }
        }
    }

    /// Why `text` is not an acceptable `https://host/…` URL, or nil when it is.
    static func httpsURLProblem(_ text: String, allowPath: Bool) -> String? {
        guard let url = URLComponents(string: text), let scheme = url.scheme else {
            return "is not a URL (write https://HOST/…)"
        }
        guard scheme.lowercased() == "https" else { return "must use https" }
        guard let host = url.host, !host.isEmpty else { return "has no host" }
        if url.user != nil || url.password != nil {
            return "must not contain credentials (define them under credentials and name one in a route)"
        }
        if url.query != nil || url.fragment != nil { return "must not have a query or fragment" }
        return nil
    }

    /// Why `text` is not a header template, or nil when it is.
    static func headerProblem(_ text: String, hasCredential: Bool) -> String? {
        if text.contains("\n") || text.contains("\r") { return "must be a single line" }
        guard let colon = text.firstIndex(of: ":") else { return "must look like 'Name: value' (e.g. \(Route.defaultHeader))" }
        let name = text[..<colon]
        let tokenChars = "!#$%&'*+.^_`|~-".unicodeScalars
        guard !name.isEmpty, name.unicodeScalars.allSatisfy({ isAlnum($0) || tokenChars.contains($0) }) else {
            return "has an invalid header name '\(clip(String(name)))'"
        }
        let containsPlaceholder = text[colon...].contains(Route.placeholder)
        if hasCredential, !containsPlaceholder {
            return "must contain \(Route.placeholder) where the credential goes"
        }
        if !hasCredential, containsPlaceholder {
            return "uses \(Route.placeholder) but the route names no credential (add credential: NAME)"
        }
        return nil
    }

    /// The closest of `candidates` to `word`, if close enough to be a likely typo.
    static func suggestion(for word: String, among candidates: [String]) -> String? {
        let lower = word.lowercased()
        if let exact = candidates.first(where: { $0.lowercased() == lower }) { return exact }
        let limit = Swift.max(1, Swift.min(3, word.count / 3))
        let scored = candidates.map { ($0, editDistance(lower, $0.lowercased())) }.filter { $0.1 <= limit }
        return scored.min { $0.1 < $1.1 }?.0
    }

    /// Optimal-string-alignment distance (Levenshtein plus adjacent transpositions).
    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a.unicodeScalars.prefix(64))
        let b = Array(b.unicodeScalars.prefix(64))
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var d = Array(repeating: Array(repeating: 0, count: b.count + 1), count: a.count + 1)
        for i in 0...a.count { d[i][0] = i }
        for j in 0...b.count { d[0][j] = j }
        for i in 1...a.count {
            for j in 1...b.count {
                let cost = a[i - 1] == b[j - 1] ? 0 : 1
                d[i][j] = Swift.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
                if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] {
                    d[i][j] = Swift.min(d[i][j], d[i - 2][j - 2] + 1)
                }
            }
        }
        return d[a.count][b.count]
    }
}

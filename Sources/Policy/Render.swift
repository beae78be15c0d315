import Yams

extension Policy {
    /// The effective policy as policy-file YAML, every default filled in.
    ///
    /// Credentials appear only as their sources (`env:GITHUB_TOKEN`). The result loads back
    /// to an equal policy (apart from `sourcePath` and `sha256`).
    public func effectiveYAML() -> String {
        func s(_ text: String) -> Node { Node(text) }
        func map(_ pairs: [(String, Node)]) -> Node { Node(pairs.map { (Node($0.0), $0.1) }) }

        var metadata: [(String, Node)] = [("name", s(name))]
        if let summary { metadata.append(("summary", s(summary))) }

        var handsPairs: [(String, Node)] = [
            ("driver", s(hands.driver.rawValue)),
            ("image", s(hands.image)),
            ("memory", s(PolicyUnits.formatSize(hands.memoryBytes))),
            ("cpus", s(PolicyUnits.formatNumber(hands.cpus))),
            ("pids", s(String(hands.pids))),
            ("user", Node(hands.user, .implicit, .doubleQuoted)),
            ("commandTimeout", s(PolicyUnits.formatDuration(seconds: hands.commandTimeoutSeconds))),
            ("idleTimeout", s(PolicyUnits.formatDuration(seconds: hands.idleTimeoutSeconds))),
            ("outputLimit", s(PolicyUnits.formatSize(hands.outputLimitBytes))),
            ("disk", s(PolicyUnits.formatSize(hands.diskBytes))),
            ("workspace", s(hands.workspace.rawValue)),
        ]
        var ulimitPairs: [(String, Node)] = []
        if let nofile = hands.ulimits.nofile { ulimitPairs.append(("nofile", s(String(nofile)))) }
        if let nproc = hands.ulimits.nproc { ulimitPairs.append(("nproc", s(String(nproc)))) }
        if !ulimitPairs.isEmpty { handsPairs.append(("ulimits", map(ulimitPairs))) }

        var pairs: [(String, Node)] = [
            ("apiVersion", s(Policy.apiVersion)),
            ("kind", s(Policy.kind)),
            ("metadata", map(metadata)),
            ("hands", map(handsPairs)),
            ("pool", map([("size", s(String(pool.size)))])),
            ("network", map([("mode", s(network.mode.rawValue)), ("allowHosts", Node(network.allowHosts.map(s)))])),
            ("credentials", Node(credentials.map { map([("name", s($0.name)), ("source", s($0.source.description))]) })),
            ("routes", Node(routes.map { route in
                var r: [(String, Node)] = [("name", s(route.name)), ("upstream", s(route.upstream))]
                if let credential = route.credential { r.append(("credential", s(credential))) }
                if let header = route.header { r.append(("header", Node(header, .implicit, .doubleQuoted))) }
                if let caFile = route.caFile { r.append(("caFile", s(caFile))) }
                return map(r)
            })),
        ]
        if let git {
            var g: [(String, Node)] = [("repository", s(git.repository))]
            if let branch = git.branch { g.append(("branch", s(branch))) }
            if let route = git.route { g.append(("route", s(route))) }
            g.append(("push", map([
                ("branches", Node(git.push.branches.map { Node($0, .implicit, .doubleQuoted) })),
                ("tags", s(git.push.tags ? "true" : "false")),
            ])))
            pairs.append(("git", map(g)))
        }
        pairs.append(("brain", map([
            ("retries", s(String(brain.retries))),
            ("backoff", s(PolicyUnits.formatDuration(seconds: brain.backoffSeconds))),
        ])))
        pairs.append(("session", map([
            ("maxEventSize", s(PolicyUnits.formatSize(session.maxEventBytes))),
            ("maxSandboxes", s(String(session.maxSandboxes))),
        ])))

        var header = "# Effective policy '\(name)'"
        if !sourcePath.isEmpty { header += " from \(sourcePath)" }
        if !sha256.isEmpty { header += "\n# sha256: \(sha256)" }
        // Serializing a tree of plain scalars cannot fail; fall back to the header alone if it does.
        let body = (try? Yams.serialize(node: map(pairs), indent: 2, width: -1, allowUnicode: true)) ?? ""
        return header + "\n" + body
    }
}

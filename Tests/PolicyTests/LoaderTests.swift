import Foundation
import Testing

@testable import Policy

@Suite struct LoaderTests {
    @Test func minimalPolicyTakesEveryDefault() throws {
        let p = try policy(minimal())
        #expect(p.name == "t")
        #expect(p.sourcePath == "t.yaml")
        #expect(p.hands == HandsPolicy())
        #expect(p.hands.driver == .container)
        #expect(p.hands.image == "agentd-base:latest")
        #expect(p.hands.memoryBytes == 512 * 1024 * 1024)
        #expect(p.hands.cpus == 1.0)
        #expect(p.hands.pids == 256)
        #expect(p.hands.user == "auto")
        #expect(p.hands.diskBytes == 1 << 30)
        #expect(p.hands.commandTimeout == .seconds(120))
        #expect(p.hands.idleTimeout == .seconds(300))
        #expect(p.hands.outputLimitBytes == 1024 * 1024)
        #expect(p.hands.workspace == .task)
        #expect(p.hands.ulimits == Ulimits(nofile: nil, nproc: nil))
        #expect(p.pool.size == 0)
        #expect(p.network.mode == .none)
        #expect(p.network.allowHosts.isEmpty)
        #expect(p.credentials.isEmpty && p.routes.isEmpty && p.git == nil)
        #expect(p.brain.retries == 3 && p.brain.backoff == .seconds(1))
        #expect(p.session.maxEventBytes == 1024 * 1024)
    }

    @Test func fullPolicyReadsEveryField() throws {
        let p = try policy(
            minimal(
                """
                hands:
                  driver: unit
                  image: registry.example/agent@sha256:abc
                  memory: 1.5GiB
                  cpus: 0.5
                  pids: 64
                  user: auto
                  disk: 2GiB
                  commandTimeout: 1m30s
                  idleTimeout: 1h30m
                  outputLimit: 64KiB
                  workspace: session
                  ulimits: {nofile: 2048, nproc: 100}
                pool: {size: 0}
                network:
                  mode: proxy
                  allowHosts: [Example.COM, "*.pypi.org", "registry.npmjs.org:443"]
                credentials:
                  - {name: gh, source: env:GITHUB_TOKEN}
                  - {name: api, source: file:/etc/agentd/api-key}
                  - {name: sd, source: systemd:model-key}
                routes:
                  - {name: github, upstream: https://github.com, credential: gh}
                  - name: model
                    upstream: https://api.example.com/v1
                    credential: sd
                    header: "x-api-key: {{credential}}"
                  - {name: public, upstream: https://example.org}
                git: {repository: https://github.com/acme/w.git, branch: feature/x, route: github}
                brain: {retries: 0, backoff: 0s}
                session: {maxEventSize: 64KiB}
                """))
        #expect(p.hands.driver == .unit)
        #expect(p.hands.memoryBytes == 3 << 29)
        #expect(p.hands.cpus == 0.5)
        #expect(p.hands.diskBytes == 2 << 30)
        #expect(p.hands.commandTimeoutSeconds == 90)
        #expect(p.hands.idleTimeoutSeconds == 5400)
        #expect(p.hands.ulimits == Ulimits(nofile: 2048, nproc: 100))
        #expect(p.network == NetworkPolicy(mode: .proxy, allowHosts: ["example.com", "*.pypi.org", "registry.npmjs.org:443"]))
        #expect(p.credentials.map(\.source) == [.env("GITHUB_TOKEN"), .file("/etc/agentd/api-key"), .systemd("model-key")])
        #expect(p.routes[0].header == Route.defaultHeader)
        #expect(p.routes[1].renderHeader(credential: "s3cr3t")! == ("x-api-key", "s3cr3t"))
        #expect(p.routes[2].credential == nil && p.routes[2].header == nil)
        #expect(p.git == GitPolicy(repository: "https://github.com/acme/w.git", branch: "feature/x", route: "github"))
        #expect(p.brain == BrainPolicy(retries: 0, backoffSeconds: 0))
        #expect(p.session.maxEventBytes == 64 << 10)
    }

    // MARK: - Each kind of error, with its exact location

    @Test func aFixedUserOrABadDiskIsAnErrorAtItsLine() {
        #expect(
            errors(minimal("hands:\n  user: \"1000:1000\"\n  disk: 12 potatoes\n"))
                == [
                    "t.yaml:6:9: hands.user: '1000:1000' is a fixed uid, which every sandbox of this policy would share (one could reach another's files and processes); use auto: agentd gives each sandbox its own uid from --sandbox-uids",
                    "t.yaml:7:9: hands.disk: '12 potatoes' is not a size (use e.g. 256MiB, 1GiB)",
                ])
        #expect(errors(minimal("hands:\n  disk: 1MiB\n")).first?.contains("hands.disk") == true)
    }

    @Test func gitBranchFollowsGitsRefRules() {
        for good in ["main", "agent/feature-1", "release/v1.2", "a.b"] { #expect(GitPolicy.isBranchName(good), "\(good)") }
        for bad in ["", "-x", "HEAD", "@", "a..b", "a/.hidden", ".x", "x.lock", "x/", "a b", "a~1", "a:b", "a@{1}", "a\u{7}"] {
            #expect(!GitPolicy.isBranchName(bad), "\(bad)")
        }
        let git = "routes: []\ngit:\n  repository: https://github.com/acme/w.git\n  branch: a/.hidden\n"
        #expect(errors(minimal(git)) == ["t.yaml:8:11: git.branch: 'a/.hidden' is not a valid branch name"])
    }

    @Test func unknownKeysSuggestTheNearestKnownOne() {
        #expect(
            errors(minimal("hands:\n  memroy: 1GiB\nnetwrok: {}\n"))
                == [
                    "t.yaml:6:3: unknown key 'memroy' in hands (did you mean 'memory'?)",
                    "t.yaml:7:1: unknown key 'netwrok' at the top level (did you mean 'network'?)",
                ])
        #expect(
            errors(minimal("network: {mode: proxy}\nroutes:\n  - name: r\n    upstream: https://x.org\n    tokn: x\n"))
                == ["t.yaml:9:5: unknown key 'tokn' in route 'r'"])
    }

    @Test func wrongTypes() {
        #expect(errors(minimal("hands: small\n")) == ["t.yaml:5:8: hands: expected a mapping, found 'small'"])
        #expect(errors(minimal("hands:\n  pids: lots\n")) == ["t.yaml:6:9: hands.pids: expected a whole number, found 'lots'"])
        #expect(errors(minimal("hands:\n  image: [a, b]\n")) == ["t.yaml:6:10: hands.image: expected a string, found a list"])
        #expect(errors(minimal("credentials: {gh: env:X}\n")) == ["t.yaml:5:14: credentials: expected a list, found a mapping"])
        #expect(
            errors(minimal("hands:\n  cpus: two\n"))
                == ["t.yaml:6:9: hands.cpus: expected a number of CPUs such as 1.5, found 'two'"])
        #expect(
            errors(minimal("hands:\n  image:\n"))
                == ["t.yaml:6:9: hands.image: no value given (write a value or remove the key to use the default)"])
    }

    @Test func valuesOutOfRange() {
        #expect(errors(minimal("hands:\n  cpus: 300\n")) == ["t.yaml:6:9: hands.cpus: 300 is out of range (more than 0, at most 256)"])
        #expect(errors(minimal("hands:\n  cpus: 0\n")) == ["t.yaml:6:9: hands.cpus: 0 is out of range (more than 0, at most 256)"])
        #expect(errors(minimal("pool:\n  size: 65\n")) == ["t.yaml:6:9: pool.size: 65 is out of range (0–64)"])
        #expect(errors(minimal("hands:\n  memory: 1MiB\n")) == ["t.yaml:6:11: hands.memory: 1MiB is below the minimum of 16MiB"])
        #expect(
            errors(minimal("hands:\n  commandTimeout: 2h\n  idleTimeout: 8d\n"))
                == [
                    "t.yaml:7:16: hands.idleTimeout: unknown duration unit 'd' in '8d'; accepted units: ms, s, m, h"
                ])
        #expect(
            errors(minimal("hands:\n  commandTimeout: 25h\n"))
                == ["t.yaml:6:19: hands.commandTimeout: 25h is above the maximum of 24h"])
    }

    @Test func poolsThatCouldNeverBeUsedAreRefused() {
        #expect(
            errors(minimal("hands:\n  workspace: session\npool:\n  size: 2\n"))
                == [
                    "t.yaml:8:9: pool.size is 2 but hands.workspace is 'session': a warm sandbox cannot hold a session's workspace, so this pool would never be used; set pool.size: 0 or hands.workspace: task"
                ])
        #expect(
            errors(minimal("hands:\n  driver: unit\npool:\n  size: 1\n"))
                == [
                    "t.yaml:8:9: pool.size is 1 but hands.driver is 'unit': unit Hands start per call and are not pooled; set pool.size: 0 or hands.driver: container"
                ])
        #expect(throws: Never.self) { try policy(minimal("hands:\n  workspace: session\npool:\n  size: 0\n")) }
    }

    @Test func badUnits() {
        #expect(
            errors(minimal("hands:\n  memory: 12 potatoes\n"))
                == ["t.yaml:6:11: hands.memory: '12 potatoes' is not a size (use e.g. 256MiB, 1GiB)"])
        #expect(
            errors(minimal("hands:\n  memory: 512mib\n"))
                == [
                    "t.yaml:6:11: hands.memory: unknown size unit 'mib' in '512mib' (did you mean 'MiB'?); accepted units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"
                ])
        #expect(
            errors(minimal("hands:\n  commandTimeout: 30\n"))
                == ["t.yaml:6:19: hands.commandTimeout: '30' has no unit (write 30s, 30m or 30ms)"])
        #expect(
            errors(minimal("brain:\n  backoff: soon\n"))
                == ["t.yaml:6:12: brain.backoff: 'soon' is not a duration (use e.g. 30s, 5m, 250ms)"])
    }

    @Test func unknownEnumValues() {
        #expect(
            errors(minimal("hands:\n  driver: containr\n"))
                == ["t.yaml:6:11: hands.driver: unknown driver 'containr' (did you mean 'container'? expected one of: container, unit)"])
        #expect(
            errors(minimal("network:\n  mode: host\n"))
                == ["t.yaml:6:9: network.mode: unknown network mode 'host' (expected one of: none, proxy)"])
        #expect(
            errors(minimal("hands:\n  workspace: forever\n"))
                == ["t.yaml:6:14: hands.workspace: unknown workspace persistence 'forever' (expected one of: task, session)"])
    }

    @Test func routeNamingAnUndefinedCredential() {
        let yaml = minimal(
            """
            network: {mode: proxy}
            credentials:
              - name: gh-token
                source: env:GITHUB_TOKEN
            routes:
              - name: github
                upstream: https://api.github.com
                credential: gh_token
            """)
        #expect(
            errors(yaml, path: "policies/x.yaml") == [
                "policies/x.yaml:12:17: route 'github' names credential 'gh_token', which is not defined under credentials (did you mean 'gh-token'?)"
            ])
    }

    @Test func duplicateNames() {
        let yaml = minimal(
            """
            network: {mode: proxy}
            credentials:
              - {name: gh, source: env:A}
              - {name: gh, source: env:B}
            routes:
              - {name: r, upstream: https://a.org}
              - {name: r, upstream: https://b.org}
            """)
        #expect(
            errors(yaml) == [
                "t.yaml:8:12: duplicate credential name 'gh' (first defined at 7:12)",
                "t.yaml:11:12: duplicate route name 'r' (first defined at 10:12)",
            ])
        #expect(
            errors(minimal("hands:\n  pids: 1\n  pids: 2\n"))
                == ["t.yaml:6:3: duplicate key 'pids' in the same mapping (each key may appear once)"])
    }

    @Test func documentLevelProblems() {
        #expect(
            errors("kind: Policy\nmetadata: {name: x}\n") == [
                "t.yaml:1:1: missing required key 'apiVersion' (add apiVersion: agentd/v1)"
            ])
        #expect(
            errors("apiVersion: agentd/v2\nkind: Polcy\nmetadata: {}\n") == [
                "t.yaml:1:13: apiVersion: unsupported 'agentd/v2' (this agentd reads agentd/v1)",
                "t.yaml:2:7: kind: expected 'Policy', found 'Polcy'",
                "t.yaml:3:11: missing required key 'name' in metadata (add name: NAME)",
            ])
        #expect(
            errors(minimal(name: "Not a name")) == [
                "t.yaml:4:9: metadata.name: 'Not a name' is not a valid name (letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters)"
            ])
        #expect(
            errors("") == [
                "t.yaml:1:1: file is empty; a policy needs at least apiVersion: agentd/v1, kind: Policy and metadata.name"
            ])
        #expect(
            errors("- a\n- b\n") == [
                "t.yaml:1:1: expected a policy (a mapping with apiVersion, kind and metadata), found a list"
            ])
    }

    @Test func yamlSyntaxErrorsAreLocated() {
        #expect(
            errors(minimal("hands:\n  memory: [1GiB\n"))
                == ["t.yaml:7:1: YAML syntax error: did not find expected ',' or ']' (while parsing a flow sequence at 6:11)"])
        #expect(
            errors("apiVersion: agentd/v1\nkind: Policy\n  bad: indent\n")
                == ["t.yaml:3:6: YAML syntax error: mapping values are not allowed in this context"])
    }

    @Test func invalidUTF8IsLocated() {
        var bytes = Array(minimal("hands:\n  image: abc").utf8)
        bytes.insert(0xFF, at: bytes.count - 1)
        let result = PolicyLoader.load(data: Data(bytes), path: "bin.yaml")
        #expect(result.diagnostics == ["bin.yaml:6:12: file is not valid UTF-8 (byte 0xFF)"])
    }

    @Test func semanticRulesAcrossSections() {
        let yaml = minimal(
            """
            network:
              allowHosts: [example.com]
            credentials:
              - {name: gh, source: vault:gh}
            routes:
              - {name: r, upstream: "http://x.org", header: "Authorization: Bearer {{credential}}"}
            git:
              repository: git@github.com:acme/w.git
              route: nope
            """)
        #expect(
            errors(yaml) == [
                "t.yaml:6:3: network.allowHosts lists hosts but network.mode is 'none'; set network.mode: proxy or remove the list",
                "t.yaml:8:24: credential 'gh': 'vault:gh' is not a credential source (use env:NAME, file:/absolute/path or systemd:NAME)",
                "t.yaml:9:1: routes are defined but network.mode is 'none'; set network.mode: proxy so the sandbox can reach them",
                "t.yaml:10:25: route 'r': upstream 'http://x.org' must use https",
                "t.yaml:10:49: route 'r': header 'Authorization: Bearer {{credential}}' uses {{credential}} but the route names no credential (add credential: NAME)",
                "t.yaml:12:15: git.repository: 'git@github.com:acme/w.git' is not a URL (write https://HOST/…); SSH remotes cannot go through the proxy",
                "t.yaml:13:10: git.route: 'nope' is not defined under routes",
            ])
    }

    @Test func routeCAFileIsAnAbsolutePath() throws {
        let good = minimal(
            """
            network: {mode: proxy}
            routes: [{name: echo, upstream: "https://127.0.0.1:8443", caFile: /etc/agentd/test-ca.pem}]
            """)
        #expect(try policy(good).routes.first?.caFile == "/etc/agentd/test-ca.pem")
        let bad = minimal(
            """
            network: {mode: proxy}
            routes: [{name: echo, upstream: "https://127.0.0.1:8443", caFile: certs/ca.pem}]
            """)
        #expect(
            errors(bad) == [
                "t.yaml:6:67: route 'echo': caFile 'certs/ca.pem' must be an absolute path to a PEM file of CA certificates (caFile: /etc/agentd/ca.pem)"
            ])
    }

    @Test func gitRouteMustGoToTheRepositoryHost() {
        let yaml = minimal(
            """
            network: {mode: proxy}
            routes: [{name: gl, upstream: "https://gitlab.com"}]
            git: {repository: "https://github.com/a/b.git", route: gl}
            """)
        #expect(errors(yaml) == ["t.yaml:7:56: git.route: route 'gl' goes to gitlab.com, but git.repository is on github.com"])
    }

    // MARK: - Several independent problems in one file

    @Test func everyIndependentProblemIsReportedInOnePass() {
        let yaml = """
            apiVersion: agentd/v1
            kind: Policy
            metadata:
              name: multi
            hands:
              driver: podman
              memroy: 1GiB
              cpus: -1
              commandTimeout: 30
              outputLimit: 1 potato
            pool:
              size: many
            network:
              mode: proxy
              allowHosts: ["https://example.com"]
            routes:
              - name: github
                upstream: https://api.github.com
                credential: gh_token
            brain:
              retries: 1000
            session:
              maxEventSize: 1MiBs
            """
        #expect(
            errors(yaml, path: "policies/multi.yaml") == [
                "policies/multi.yaml:6:11: hands.driver: unknown driver 'podman' (expected one of: container, unit)",
                "policies/multi.yaml:7:3: unknown key 'memroy' in hands (did you mean 'memory'?)",
                "policies/multi.yaml:8:9: hands.cpus: -1 is out of range (more than 0, at most 256)",
                "policies/multi.yaml:9:19: hands.commandTimeout: '30' has no unit (write 30s, 30m or 30ms)",
                "policies/multi.yaml:10:16: hands.outputLimit: '1 potato' is not a size (use e.g. 256MiB, 1GiB)",
                "policies/multi.yaml:12:9: pool.size: expected a whole number, found 'many'",
                "policies/multi.yaml:15:16: network.allowHosts[0]: 'https://example.com' is not a host (write host, host:port or *.domain)",
                "policies/multi.yaml:19:17: route 'github' names credential 'gh_token', which is not defined under credentials",
                "policies/multi.yaml:21:12: brain.retries: 1000 is out of range (0–100)",
                "policies/multi.yaml:23:17: session.maxEventSize: unknown size unit 'MiBs' in '1MiBs'; accepted units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB",
            ])
    }

    // MARK: - Hashes and encodings

    @Test func hashIsSHA256OfTheFileBytes() throws {
        #expect(
            PolicyLoader.sha256Hex(Data("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let yaml = minimal()
        let p = try policy(yaml)
        #expect(p.sha256 == PolicyLoader.sha256Hex(Data(yaml.utf8)))
        #expect(try policy(yaml + "# comment\n").sha256 != p.sha256)
    }

    @Test func secretsAppearOnlyAsTheirSource() throws {
        let p = try policy(
            minimal(
                """
                network: {mode: proxy}
                credentials: [{name: gh, source: env:GITHUB_TOKEN}]
                routes: [{name: github, upstream: https://github.com, credential: gh}]
                """))
        let json = String(decoding: try JSONEncoder().encode(p), as: UTF8.self)
        #expect(json.contains(#""source":"env:GITHUB_TOKEN""#))
        #expect(p.effectiveYAML().contains("source: env:GITHUB_TOKEN"))
        #expect(try JSONDecoder().decode(Policy.self, from: Data(json.utf8)) == p)
    }

    @Test func diagnosticDescriptionIsFileLineColumnMessage() {
        let d = PolicyDiagnostic(path: "policies/x.yaml", line: 12, column: 5, message: "boom")
        #expect(d.description == "policies/x.yaml:12:5: boom")
        let e = PolicyError.invalid([d])
        #expect(e.description == "1 error in policy\npolicies/x.yaml:12:5: boom")
    }
}

extension Result where Success == Policy, Failure == PolicyError {
    /// The failure's diagnostics as strings, or a marker when it loaded.
    var diagnostics: [String] {
        switch self {
        case .success: ["loaded"]
        case .failure(let error): error.diagnostics.map(\.description)
        }
    }
}

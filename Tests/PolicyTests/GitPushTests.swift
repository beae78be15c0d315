import Foundation
import Testing

@testable import Policy

/// `git.push`: which refs a push through the git route may touch, its defaults, its errors at
/// their line and column, and its round trip through `effectiveYAML`.
@Suite struct GitPushTests {
    static func gitPolicy(_ git: String) -> String {
        minimal(
            """
            network: {mode: proxy}
            credentials: [{name: gh, source: env:GITHUB_TOKEN}]
            routes: [{name: github, upstream: "https://github.com", credential: gh}]
            git:
            \(git)
            """)
    }

    @Test func withoutPushTheAgentsOwnBranchesAndNoTags() throws {
        let p = try policy(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n"))
        #expect(p.git?.push == GitPushPolicy(branches: ["agent/*"], tags: false))
        #expect(GitPushPolicy() == GitPushPolicy(branches: GitPushPolicy.defaultBranches, tags: false))
        // Each field of a given push defaults on its own.
        let tagsOnly = try policy(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push: {tags: true}\n"))
        #expect(tagsOnly.git?.push == GitPushPolicy(branches: ["agent/*"], tags: true))
        let empty = try policy(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push:\n"))
        #expect(empty.git?.push == GitPushPolicy())
    }

    @Test func branchesAndTagsAreRead() throws {
        let p = try policy(
            Self.gitPolicy(
                """
                  repository: https://github.com/acme/w.git
                  route: github
                  push:
                    branches: ["agent/*", "release/**", fix-*, main]
                    tags: true
                """))
        #expect(p.git?.push == GitPushPolicy(branches: ["agent/*", "release/**", "fix-*", "main"], tags: true))
        let none = try policy(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push: {branches: [], tags: false}\n"))
        #expect(none.git?.push == GitPushPolicy(branches: [], tags: false))
    }

    @Test func errorsAreAtTheirLineAndColumn() {
        #expect(
            errors(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push: {tag: true, brnches: [x]}\n"))
                == [
                    "t.yaml:11:10: unknown key 'tag' in git.push (did you mean 'tags'?)",
                    "t.yaml:11:21: unknown key 'brnches' in git.push (did you mean 'branches'?)",
                ])
        #expect(
            errors(
                Self.gitPolicy(
                    """
                      repository: https://github.com/acme/w.git
                      route: github
                      push:
                        branches: ["refs/heads/x", "a..b", "x***", "", "[abc]", "agent/*", "agent/*"]
                    """))
                == [
                    "t.yaml:12:16: git.push.branches[0]: 'refs/heads/x' names a ref; write the branch name without refs/heads/ (e.g. agent/*)",
                    "t.yaml:12:32: git.push.branches[1]: 'a..b' is not a branch pattern (branch-name characters; * matches within a path segment, ** across segments)",
                    "t.yaml:12:40: git.push.branches[2]: 'x***' has more than two '*' in a row (* matches within a path segment, ** across segments)",
                    "t.yaml:12:48: git.push.branches[3]: '' is empty",
                    "t.yaml:12:52: git.push.branches[4]: '[abc]' is not a branch pattern (branch-name characters; * matches within a path segment, ** across segments)",
                    "t.yaml:12:72: git.push.branches[6]: duplicate pattern 'agent/*' (first listed at 12:61)",
                ])
    }

    @Test func wrongTypesAreReported() {
        #expect(
            errors(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push: [agent/*]\n"))
                == ["t.yaml:11:9: git.push: expected a mapping, found a list"])
        #expect(
            errors(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push: {branches: agent/x, tags: yes}\n"))
                == [
                    "t.yaml:11:20: git.push.branches: expected a list, found 'agent/x'",
                    "t.yaml:11:35: git.push.tags: expected true or false, found 'yes'",
                ])
        #expect(
            errors(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n  push: {branches: [[a]]}\n"))
                == ["t.yaml:11:21: git.push.branches[0]: expected a branch pattern such as agent/*, found a list"])
    }

    @Test func pushNeedsTheRouteThatEnforcesIt() {
        #expect(
            errors(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  push: {branches: [agent/*]}\n"))
                == ["t.yaml:10:3: git.push has no effect without git.route (the route's proxy enforces it); add route: NAME"])
    }

    @Test func theRepositoryMustBeBelowTheRoutesUpstream() {
        let yaml = minimal(
            """
            network: {mode: proxy}
            routes: [{name: scm, upstream: "https://git.example.com/scm"}, {name: port, upstream: "https://git.example.com:8443"}]
            git: {repository: "https://git.example.com/other/a/b.git", route: scm}
            """)
        #expect(
            errors(yaml) == [
                "t.yaml:7:67: git.route: route 'scm' goes to https://git.example.com/scm, and git.repository is not below it (the proxy serves the repository's path below the route's upstream; make the upstream https://HOST[:PORT] or a prefix of the repository URL)"
            ])
        #expect(errors(yaml.replacingOccurrences(of: "route: scm", with: "route: port")).first?.contains("route 'port' goes to https://git.example.com:8443") == true)
    }

    @Test func repositoryPathIsBelowTheUpstreamsPrefix() {
        let git = GitPolicy(repository: "https://GitHub.com/example/widgets.git")
        #expect(git.repositoryPath(below: "https://github.com") == "/example/widgets.git")
        #expect(git.repositoryPath(below: "https://github.com/") == "/example/widgets.git")
        #expect(git.repositoryPath(below: "https://github.com:443") == "/example/widgets.git")
        #expect(git.repositoryPath(below: "https://github.com/example") == "/widgets.git")
        #expect(git.repositoryPath(below: "https://github.com/exam") == nil)
        #expect(git.repositoryPath(below: "https://github.com/example/widgets.git") == nil)
        #expect(git.repositoryPath(below: "https://github.com:8443") == nil)
        #expect(git.repositoryPath(below: "https://gitlab.com") == nil)
        #expect(GitPolicy(repository: "https://h.example:8443/a/b").repositoryPath(below: "https://h.example:8443") == "/a/b")
    }

    @Test func effectiveYAMLShowsThePushPolicyAndLoadsBack() throws {
        for push in ["", "  push: {branches: [\"*\", \"release/**\"], tags: true}\n", "  push: {branches: []}\n"] {
            let p = try policy(Self.gitPolicy("  repository: https://github.com/acme/w.git\n  route: github\n" + push))
            let yaml = p.effectiveYAML()
            #expect(yaml.contains("push:"))
            let again = try policy(yaml)
            #expect(again.git == p.git, "\(yaml)")
        }
    }

    @Test func oldJSONWithoutPushDecodesWithTheDefault() throws {
        let json = #"{"repository":"https://github.com/a/b.git","route":"github"}"#
        let git = try JSONDecoder().decode(GitPolicy.self, from: Data(json.utf8))
        #expect(git == GitPolicy(repository: "https://github.com/a/b.git", route: "github", push: GitPushPolicy()))
        let round = try JSONDecoder().decode(GitPolicy.self, from: JSONEncoder().encode(GitPolicy(repository: "https://x.org/a", push: GitPushPolicy(branches: [], tags: true))))
        #expect(round.push == GitPushPolicy(branches: [], tags: true))
    }

    @Test func theShippedCodingAgentPushesOnlyAgentBranches() throws {
        let result = PolicyLoader.load(file: shippedPoliciesDirectory + "/coding-agent.yaml")
        let p = try result.get()
        #expect(p.git?.push == GitPushPolicy(branches: ["agent/*"], tags: false))
        #expect(p.git?.repositoryPath(below: try #require(p.route(named: "github")).upstream) == "/example/widgets.git")
    }
}

import AgentdClient
import AgentdTestSupport
import Foundation
import Testing
import TestSupport
import Yams

/// The OpenAPI document in the repository against what the server does.
@Suite("OpenAPI document matches the server")
struct APIContractTests {
    static var documentPath: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Sources/Service/openapi.yaml").path
    }

    @Test("every documented operation answers with one of its documented statuses; undocumented ones do not exist")
    func documentMatches() async throws {
        let text = try String(contentsOfFile: Self.documentPath, encoding: .utf8)
        let document = try #require(try Yams.load(yaml: text) as? [String: Any])
        let paths = try #require(document["paths"] as? [String: Any])
        #expect(paths.count >= 14)
        try await withAgentd { agentd in
            let c = agentd.client
            let session = try #require(try await c.post("/v1/sessions", [:])["id"] as? String)
            var checked = 0
            for (template, value) in paths.sorted(by: { $0.key < $1.key }) {
                let operations = (value as? [String: Any]) ?? [:]
                let path = template.replacingOccurrences(of: "{id}", with: session).replacingOccurrences(of: "{task}", with: "main")
                for method in ["get", "post", "put", "delete"] {
                    let documented = operations[method] as? [String: Any]
                    let status = await Self.status(c, method.uppercased(), path, body: Self.sampleBody(template))
                    if let documented {
                        let codes = Set(((documented["responses"] as? [String: Any]) ?? [:]).keys.compactMap { Int($0) })
                        #expect(codes.contains(status), "\(method.uppercased()) \(template) answered \(status), documented \(codes.sorted())")
                        checked += 1
                    } else {
                        #expect(status == 405, "\(method.uppercased()) \(template) is not documented but answered \(status)")
                    }
                }
            }
            #expect(checked >= 15)
            // A path the document does not list is no route at all.
            #expect(await Self.status(c, "GET", "/v1/sessions/\(session)/nothing", body: nil) == 404)
        }
    }

    @Test("GET /v1/tools lists the tools the document's execute takes, each with an object JSON Schema")
    func toolsMatchExecute() async throws {
        let text = try String(contentsOfFile: Self.documentPath, encoding: .utf8)
        let document = try #require(try Yams.load(yaml: text) as? [String: Any])
        let execute = try #require(((document["paths"] as? [String: Any])?["/v1/sessions/{id}/execute"] as? [String: Any])?["post"] as? [String: Any])
        let schema = try #require(
            ((((execute["requestBody"] as? [String: Any])?["content"] as? [String: Any])?["application/json"] as? [String: Any])?["schema"] as? [String: Any]))
        let documented = try #require(((schema["properties"] as? [String: Any])?["tool"] as? [String: Any])?["enum"] as? [String])
        let tools = try await withAgentd { agentd in try await agentd.client.tools() }
        #expect(tools.map(\.name).sorted() == documented.sorted())
        for tool in tools {
            let inputSchema = try #require(try JSONSerialization.jsonObject(with: tool.inputSchema) as? [String: Any])
            #expect(inputSchema["type"] as? String == "object", "\(tool.name)")
            #expect(inputSchema["additionalProperties"] as? Bool == false, "\(tool.name)")
            #expect(!tool.description.isEmpty, "\(tool.name)")
        }
    }

    static func sampleBody(_ template: String) -> Data? {
        switch template {
        case "/v1/sessions/{id}/execute": Data(#"{"tool": "bash", "input": {"command": "echo contract"}}"#.utf8)
        case "/v1/sessions/{id}/checkpoint": Data(#"{"state": {"step": 1}}"#.utf8)
        default: Data("{}".utf8)
        }
    }

    static func status(_ c: AgentdClient, _ method: String, _ path: String, body: Data?) async -> Int {
        do {
            return try await c.call(method, path, body: method == "GET" ? nil : body, timeout: .seconds(120)).status
        } catch let e as AgentdClientError {
            return e.status
        } catch {
            return -1
        }
    }
}

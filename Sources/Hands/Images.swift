import EngineAPI
import Foundation

/// An image a sandbox can be made from, as the engine holds it.
public struct ImageInfo: Sendable, Equatable {
    /// `repository:tag`.
    public var name: String
    /// The engine's image id (`sha256:…`).
    public var id: String
    public var sizeBytes: Int64
}

/// What can take an image in: the container driver (the engine's image store). Kept apart
/// from `HandsDriver`, which unit Hands also serve (they run on the host's root filesystem).
public protocol ImageImporting: Sendable {
    /// Imports the root filesystem tarball at `tarball` as image `name` (`repository[:tag]`),
    /// streamed from the file.
    /// - Throws: `HandsError(.invalidRequest)` for a bad name or an archive the engine refuses,
    ///   `HandsError(.unreachable)` when the engine cannot be reached.
    func importImage(tarball: String, name: String) async throws -> ImageInfo
}

/// Image references as agentd accepts them: `repository[:tag]`, the repository of lowercase
/// path components (`[a-z0-9]` runs joined by `.`, `_`, `__` or `-`, separated by `/`), an
/// optional registry host first, the tag `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
public enum ImageName {
    public static let rule = "repository[:tag]: lowercase letters, digits and . _ - in the repository (parts separated by /), up to 128 of A-Z a-z 0-9 _ . - in the tag (not starting with . or -)"

    /// `(repository, tag)` of `name`, the tag `latest` when none is given.
    /// - Throws: `HandsError(.invalidRequest)` saying what is wrong and what is allowed.
    public static func parse(_ name: String) throws -> (repository: String, tag: String) {
        func bad(_ why: String) -> HandsError { HandsError(.invalidRequest, "image name '\(name.prefix(200))' is not valid: \(why); use \(rule)") }
        guard !name.isEmpty, name.utf8.count <= 255 else { throw bad("it must have 1 to 255 characters") }
        var repository = name
        var tag = "latest"
        // A colon after the last slash starts the tag (a colon before it is a registry port).
        if let colon = name.lastIndex(of: ":"), !name[colon...].contains("/") {
            repository = String(name[..<colon])
            tag = String(name[name.index(after: colon)...])
        }
        guard let first = tag.utf8.first, first != UInt8(ascii: "."), first != UInt8(ascii: "-"), tag.utf8.count <= 128,
            tag.utf8.allSatisfy({ isAlnum($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") })
        else { throw bad("the tag '\(tag.prefix(130))' is not allowed") }
        let components = repository.split(separator: "/", omittingEmptySubsequences: false)
        for (i, component) in components.enumerated() {
            // The first of several components may be a registry host[:port].
            if i == 0, components.count > 1, component.contains(".") || component.contains(":") || component == "localhost" { continue }
            let bytes = Array(component.utf8)
            guard let f = bytes.first, let l = bytes.last, isLowerAlnum(f), isLowerAlnum(l),
                bytes.allSatisfy({ isLowerAlnum($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") })
            else { throw bad("'\(component.prefix(100))' is not a valid repository part") }
        }
        return (repository, tag)
    }

    private static func isLowerAlnum(_ b: UInt8) -> Bool { (b >= 0x30 && b <= 0x39) || (b >= 0x61 && b <= 0x7A) }
    private static func isAlnum(_ b: UInt8) -> Bool { isLowerAlnum(b) || (b >= 0x41 && b <= 0x5A) }
}

extension ContainerDriver: ImageImporting {
    public func importImage(tarball: String, name: String) async throws -> ImageInfo {
        let (repository, tag) = try ImageName.parse(name)
        do {
            try await engine.importImage(tarball: tarball, repository: repository, tag: tag, timeout: .seconds(3600))
            let image = try await engine.inspectImage(repository + ":" + tag)
            return ImageInfo(name: repository + ":" + tag, id: image.Id, sizeBytes: Int64(image.Size ?? 0))
        } catch let error as EngineError {
            switch error.code {
            case .unreachable, .timeout, .transport, .cancelled:
                throw HandsError(.unreachable, "the container engine could not import the image: \(error.message)")
            default:
                throw HandsError(.invalidRequest, "the container engine refused the archive: \(error.engineMessage ?? error.message)")
            }
        }
    }
}

import Testing
@testable import EngineAPI

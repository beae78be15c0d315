import Testing
@testable import SystemdBus

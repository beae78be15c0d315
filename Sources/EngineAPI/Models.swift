import Glibc

/// `POST /containers/create` body: the subset of the Docker Engine API's `ContainerConfig`
/// that agentd sets. Field names are the API's own (PascalCase).
public struct ContainerSpec: Codable, Sendable, Equatable {
    public var Image: String
    public var Cmd: [String]?
    public var Entrypoint: [String]?
    public var Env: [String]?
    public var User: String?
    public var WorkingDir: String?
    public var Labels: [String: String]?
    public var NetworkDisabled: Bool?
    /// Anonymous volumes to create, by mount point (`{"/workspace": {}}`); removed with the
    /// container when it is removed with `v=true`.
    public var Volumes: [String: EmptyObject]?
    public var HostConfig: HostConfig?

    public init(
        image: String, command: [String]? = nil, entrypoint: [String]? = nil, environment: [String]? = nil,
        user: String? = nil, workingDirectory: String? = nil, labels: [String: String]? = nil,
        hostConfig: HostConfig? = nil
    ) {
        self.Image = image
        self.Cmd = command
        self.Entrypoint = entrypoint
        self.Env = environment
        self.User = user
        self.WorkingDir = workingDirectory
        self.Labels = labels
        self.HostConfig = hostConfig
    }
}

/// `{}` in JSON.
public struct EmptyObject: Codable, Sendable, Equatable {
    public init() {}
}

/// `HostConfig`: limits, isolation and mounts.
public struct HostConfig: Codable, Sendable, Equatable {
    public struct Ulimit: Codable, Sendable, Equatable {
        public var Name: String
        public var Soft: Int
        public var Hard: Int
        public init(name: String, soft: Int, hard: Int) { Name = name; Soft = soft; Hard = hard }

        /// `nofile` and `nproc` limits at or below this host's hard limits, capped at `nofile`
        /// and `nproc`. An engine's defaults can exceed what a process without
        /// CAP_SYS_RESOURCE may set, and then every container fails in `setrlimit`.
        public static func withinHostLimits(nofile: Int = 65536, nproc: Int = 4096) -> [Ulimit] {
            func hard(_ resource: Int32) -> Int {
                var limit = rlimit()
                guard getrlimit(__rlimit_resource_t(resource), &limit) == 0 else { return 1024 }
                return limit.rlim_max >= UInt(Int.max) ? Int.max : Int(limit.rlim_max)
            }
            let n = min(hard(Int32(RLIMIT_NOFILE.rawValue)), nofile)
            let p = min(hard(6 /* RLIMIT_NPROC on Linux */), nproc)
            return [Ulimit(name: "nofile", soft: n, hard: n), Ulimit(name: "nproc", soft: p, hard: p)]
        }
    }

    public var NetworkMode: String?
    public var ReadonlyRootfs: Bool?
    public var CapDrop: [String]?
    public var SecurityOpt: [String]?
    public var Memory: Int?
    public var MemorySwap: Int?
    public var NanoCpus: Int?
    public var PidsLimit: Int?
    public var Ulimits: [Ulimit]?
    public var Tmpfs: [String: String]?
    public var Binds: [String]?
    public var AutoRemove: Bool?
    public var Init: Bool?

    public init() {}
}

/// `GET /version`.
public struct EngineVersion: Decodable, Sendable {
    public var Version: String
    public var ApiVersion: String
    public var MinAPIVersion: String?
    public var Os: String?
    public var Arch: String?
    public var KernelVersion: String?
}

/// A row of `GET /containers/json`.
public struct ContainerSummary: Decodable, Sendable {
    public var Id: String
    public var Names: [String]?
    public var Image: String?
    public var State: String?
    public var Labels: [String: String]?
}

/// What an exec produced: its two streams, kept apart and byte-exact, and its exit code.
public struct ExecResult: Sendable, Equatable {
    public var stdout: [UInt8]
    public var stderr: [UInt8]
    public var exitCode: Int
    /// True when the output exceeded the caller's limit and was cut.
    public var truncated: Bool

    public init(stdout: [UInt8], stderr: [UInt8], exitCode: Int, truncated: Bool = false) {
        self.stdout = stdout
        self.stderr = stderr
        self.exitCode = exitCode
        self.truncated = truncated
    }
}

/// `GET /containers/{id}/json`: the fields agentd reads back.
public struct ContainerInspect: Decodable, Sendable {
    public struct State: Decodable, Sendable {
        public var Status: String?
        public var Running: Bool?
        public var OOMKilled: Bool?
        public var ExitCode: Int?
        public var Error: String?
    }
    public struct Config: Decodable, Sendable {
        public var User: String?
        public var Env: [String]?
        public var Labels: [String: String]?
        public var Image: String?
        public var Cmd: [String]?
    }
    public struct Inspected: Decodable, Sendable {
        public var NetworkMode: String?
        public var ReadonlyRootfs: Bool?
        public var CapDrop: [String]?
        public var CapAdd: [String]?
        public var SecurityOpt: [String]?
        public var Memory: Int?
        public var NanoCpus: Int?
        public var PidsLimit: Int?
        public var Ulimits: [HostConfig.Ulimit]?
        public var Tmpfs: [String: String]?
        public var Binds: [String]?
    }
    public var Id: String
    public var Name: String?
    public var State: State?
    public var Config: Config?
    public var HostConfig: Inspected?
}

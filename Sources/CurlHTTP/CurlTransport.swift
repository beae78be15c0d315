import Blocking
import CCurl
import Foundation
import Synchronization

/// `HTTPTransport` over libcurl, to a unix socket (`CURLOPT_UNIX_SOCKET_PATH`) or a URL
/// (HTTP or HTTPS).
///
/// Concurrency: `curl_easy_perform` blocks, so every request runs on `BlockingPool` threads,
/// never on the cooperative pool. Easy handles are kept in a small free list and reused (after
/// `curl_easy_reset`, which keeps their connection cache), so that a request usually goes out
/// on an already-open connection. A handle is used by one thread at a time: it is taken out of
/// the list for the duration of a request.
///
/// Cancellation: a cancelled task sets an atomic flag that libcurl's progress callback reads;
/// the transfer aborts within one callback interval and the call throws `.cancelled`.
public final class CurlTransport: HTTPTransport, @unchecked Sendable {
    // Invariant for @unchecked Sendable: `idleHandles` is only touched under its Mutex; a
    // handle taken from it is owned by exactly one request until it is put back.
    public let endpoint: HTTPEndpoint
    private let idleHandles = Mutex<[HandleBox]>([])
    private let pool: BlockingPool
    private static let maxIdleHandles = 16

    /// `curl_global_init` must run once before any other libcurl call; Swift runs a static
    /// initializer exactly once, thread-safely. Executables also call `CurlTransport.globalInit()`
    /// at the top of `main`, before any thread starts, as libcurl recommends.
    private static let initialized: Bool = {
        curl_global_init(Int(CURL_GLOBAL_ALL)) == CURLE_OK
    }()

    /// Initializes libcurl for the process; call first thing in `main`.
    public static func globalInit() { _ = initialized }

    public init(endpoint: HTTPEndpoint, pool: BlockingPool = .shared) {
        _ = Self.initialized
        self.endpoint = endpoint
        self.pool = pool
    }

    public func send(_ request: HTTPRequest) async throws -> HTTPResponse {
        let context = RequestContext(request: request)
        return try await withTaskCancellationHandler {
            try await pool.run { [self] in try perform(context) }
        } onCancel: {
            context.cancelled.store(true, ordering: .relaxed)
        }
    }

    // MARK: - the blocking part

    private func perform(_ context: RequestContext) throws -> HTTPResponse {
        if context.cancelled.load(ordering: .relaxed) {
            throw HTTPClientError(.cancelled, "request \(context.request.method) \(context.request.target) was cancelled")
        }
        let box = idleHandles.withLock { $0.popLast() } ?? HandleBox()
        defer {
            curl_easy_reset(box.handle)
            idleHandles.withLock { if $0.count < Self.maxIdleHandles { $0.append(box) } }
        }
        let h = box.handle
        let request = context.request
        var headers: UnsafeMutablePointer<curl_slist>? = nil
        defer { curl_slist_free_all(headers) }
        var uploadFile: UnsafeMutablePointer<FILE>? = nil
        defer { if let f = uploadFile { fclose(f) } }

        let url: String
        switch endpoint {
        case .unixSocket(let path):
            url = "http://localhost" + request.target
            ccurl_easy_setopt_string(h, CURLOPT_UNIX_SOCKET_PATH, path)
        case .url(let base):
            url = (base.hasSuffix("/") ? String(base.dropLast()) : base) + request.target
        }
        ccurl_easy_setopt_string(h, CURLOPT_URL, url)
        ccurl_easy_setopt_long(h, CURLOPT_NOSIGNAL, 1)
        ccurl_easy_setopt_string(h, CURLOPT_CUSTOMREQUEST, request.method)
        let timeoutMs = max(1, Int(request.timeout.components.seconds) * 1000
            + Int(request.timeout.components.attoseconds / 1_000_000_000_000_000))
        ccurl_easy_setopt_long(h, CURLOPT_TIMEOUT_MS, timeoutMs)
        ccurl_easy_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, min(timeoutMs, 10_000))
        headers = curl_slist_append(headers, "Expect:")  // no 100-continue round trip
        for (name, value) in request.headers { headers = curl_slist_append(headers, "\(name): \(value)") }

        let unmanaged = Unmanaged.passUnretained(context).toOpaque()
        ccurl_easy_setopt_data_callback(h, CURLOPT_WRITEFUNCTION, curlWrite)
        ccurl_easy_setopt_pointer(h, CURLOPT_WRITEDATA, unmanaged)
        ccurl_easy_setopt_data_callback(h, CURLOPT_HEADERFUNCTION, curlHeader)
        ccurl_easy_setopt_pointer(h, CURLOPT_HEADERDATA, unmanaged)
        ccurl_easy_setopt_long(h, CURLOPT_NOPROGRESS, 0)
        ccurl_easy_setopt_xferinfo_callback(h, curlProgress)
        ccurl_easy_setopt_pointer(h, CURLOPT_XFERINFODATA, unmanaged)
        ccurl_easy_setopt_pointer(h, CURLOPT_ERRORBUFFER, context.errorBuffer)

        switch request.body {
        case .none:
            if request.method == "POST" || request.method == "PUT" {
                ccurl_easy_setopt_long(h, CURLOPT_POSTFIELDSIZE, 0)
                ccurl_easy_setopt_string(h, CURLOPT_POSTFIELDS, "")
            }
        case .bytes(_, let contentType):
            headers = curl_slist_append(headers, "Content-Type: \(contentType)")
            ccurl_easy_setopt_off_t(h, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(context.bodyBytes.count))
            ccurl_easy_setopt_pointer(h, CURLOPT_POSTFIELDS, context.bodyBytes.baseAddress)
        case .file(let path, let contentType):
            guard let f = fopen(path, "rb") else {
                throw HTTPClientError(.invalidArgument, "cannot open \(path) to send it: \(String(cString: strerror(errno)))")
            }
            uploadFile = f
            var st = stat()
            fstat(fileno(f), &st)
            headers = curl_slist_append(headers, "Content-Type: \(contentType)")
            ccurl_easy_setopt_long(h, CURLOPT_UPLOAD, 1)
            ccurl_easy_setopt_off_t(h, CURLOPT_INFILESIZE_LARGE, curl_off_t(st.st_size))
            ccurl_easy_setopt_pointer(h, CURLOPT_READDATA, UnsafeMutableRawPointer(f))
            ccurl_easy_setopt_data_callback(h, CURLOPT_READFUNCTION, curlReadFile)
            ccurl_easy_setopt_string(h, CURLOPT_CUSTOMREQUEST, request.method)
        }
        ccurl_easy_setopt_slist(h, CURLOPT_HTTPHEADER, headers)

        let code = curl_easy_perform(h)
        let detail = String(cString: context.errorBuffer)
        guard code == CURLE_OK else { throw transportError(code, detail: detail, request: request) }
        var status = 0
        ccurl_easy_getinfo_long(h, CURLINFO_RESPONSE_CODE, &status)
        return HTTPResponse(status: status, body: context.response, truncated: context.truncated, headers: context.headers)
    }

    private func transportError(_ code: CURLcode, detail: String, request: HTTPRequest) -> HTTPClientError {
        let what = "\(request.method) \(request.target.split(separator: "?").first ?? "")"
        let curlMessage = detail.isEmpty ? String(cString: curl_easy_strerror(code)) : detail
        let raw = Int(code.rawValue)
        switch code {
        case CURLE_ABORTED_BY_CALLBACK:
            return HTTPClientError(.cancelled, "\(what) was cancelled", curlCode: raw)
        case CURLE_OPERATION_TIMEDOUT:
            return HTTPClientError(.timeout, "\(what) to \(endpoint) timed out after \(request.timeout) (\(curlMessage))", curlCode: raw)
        case CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST:
            var reason = curlMessage
            if case .unixSocket(let path) = endpoint {
                var st = stat()
                reason = stat(path, &st) != 0 ? "no socket at \(path)" : "connection refused at \(path)"
            }
            return HTTPClientError(.unreachable, "cannot reach \(endpoint) (\(reason))", curlCode: raw)
        default:
            return HTTPClientError(.transport, "\(what) to \(endpoint) failed: \(curlMessage) (curl error \(raw))", curlCode: raw)
        }
    }
}

/// An easy handle, freed when the box goes away.
private final class HandleBox: @unchecked Sendable {
    // Invariant: a box is owned by one request (one thread) between `popLast` and `append`.
    let handle: UnsafeMutableRawPointer
    init() {
        guard let h = curl_easy_init() else { fatalError("curl_easy_init failed: out of memory") }
        handle = h
    }
    deinit { curl_easy_cleanup(handle) }
}

/// Per-request state shared with libcurl's C callbacks through their userdata pointer.
private final class RequestContext: @unchecked Sendable {
    // Invariant: `response` and `truncated` are written only by libcurl's callbacks on the one
    // thread running `curl_easy_perform`, and read after it returns; `cancelled` is atomic.
    let request: HTTPRequest
    let bodyBytes: UnsafeMutableBufferPointer<UInt8>
    var response: [UInt8] = []
    var truncated = false
    /// The final response's header fields (an interim `100 Continue` response's are dropped).
    var headers: [(String, String)] = []
    /// The upload byte count last handed to `onUploadProgress` (libcurl calls often).
    var lastUploadReported: curl_off_t = -1
    let cancelled = Atomic<Bool>(false)
    /// libcurl writes its detailed error message here (`CURLOPT_ERRORBUFFER`).
    let errorBuffer: UnsafeMutablePointer<CChar>

    init(request: HTTPRequest) {
        self.request = request
        errorBuffer = .allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        if case .bytes(let bytes, _) = request.body {
            bodyBytes = .allocate(capacity: max(bytes.count, 1))
            _ = bodyBytes.initialize(from: bytes)
        } else {
            bodyBytes = .allocate(capacity: 1)
        }
    }
    deinit {
        bodyBytes.deallocate()
        errorBuffer.deallocate()
    }
}

private func curlWrite(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ userdata: UnsafeMutableRawPointer?) -> Int {
    let n = size * count
    guard let ptr, let userdata else { return n }
    let context = Unmanaged<RequestContext>.fromOpaque(userdata).takeUnretainedValue()
    if let sink = context.request.onData {
        sink(ptr.withMemoryRebound(to: UInt8.self, capacity: n) { Array(UnsafeBufferPointer(start: $0, count: n)) })
        return n
    }
    let room = context.request.maxResponseBytes - context.response.count
    if room < n { context.truncated = true }
    let take = max(0, min(room, n))
    if take > 0 {
        ptr.withMemoryRebound(to: UInt8.self, capacity: take) {
            context.response.append(contentsOf: UnsafeBufferPointer(start: $0, count: take))
        }
    }
    return n
}

private func curlHeader(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ userdata: UnsafeMutableRawPointer?) -> Int {
    let n = size * count
    guard let ptr, let userdata else { return n }
    let context = Unmanaged<RequestContext>.fromOpaque(userdata).takeUnretainedValue()
    let line = ptr.withMemoryRebound(to: UInt8.self, capacity: n) { String(decoding: UnsafeBufferPointer(start: $0, count: n), as: UTF8.self) }
    if line.hasPrefix("HTTP/") {
        // A new response begins (after an interim one): only the last one's fields count.
        context.headers.removeAll()
    } else if let colon = line.firstIndex(of: ":") {
        let name = line[..<colon].trimmingCharacters(in: .whitespaces)
        let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespacesAndNewlines)
        context.headers.append((name, value))
    }
    return n
}

private func curlReadFile(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ userdata: UnsafeMutableRawPointer?) -> Int {
    guard let ptr, let userdata else { return 0 }
    let file = userdata.assumingMemoryBound(to: FILE.self)
    return fread(ptr, 1, size * count, file)
}

private func curlProgress(
    _ userdata: UnsafeMutableRawPointer?, _: curl_off_t, _: curl_off_t, _ uploadTotal: curl_off_t, _ uploadNow: curl_off_t
) -> Int32 {
    guard let userdata else { return 0 }
    let context = Unmanaged<RequestContext>.fromOpaque(userdata).takeUnretainedValue()
    if let report = context.request.onUploadProgress, uploadTotal > 0, uploadNow != context.lastUploadReported {
        context.lastUploadReported = uploadNow
        report(Int64(uploadNow), Int64(uploadTotal))
    }
    return context.cancelled.load(ordering: .relaxed) ? 1 : 0
}

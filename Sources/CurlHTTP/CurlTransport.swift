import Blocking
import CCurl
import Foundation
import Synchronization

/// `HTTPTransport` over libcurl, to a unix socket (`CURLOPT_UNIX_SOCKET_PATH`) or a URL
/// (HTTP or HTTPS).
///
/// Concurrency: every request of every `CurlTransport` in the process runs on ONE libcurl
/// multi handle, driven by one dedicated loop thread (`CurlLoop`): `curl_multi_perform`, then
/// `curl_multi_poll` until a socket is ready, a libcurl timer is due, or `curl_multi_wakeup`
/// says that work was queued. `send` queues its request and suspends on a continuation that
/// the loop thread resumes when the transfer ends. So a request in flight holds no thread at
/// all: a thousand `sleep 600` execs cost a thousand sockets, not a thousand threads, and an
/// `echo` behind them goes out at once. (Before, each request held a `BlockingPool` thread for
/// its whole length, and 32 long commands stalled every other tenant.) This is the shape of
/// `SystemdBus/BusConnection`: a loop thread, a wakeup, queued work and continuations.
///
/// Connections are cached by the multi handle and reused by later requests to the same
/// endpoint. libcurl's callbacks (body, header, upload progress, `onData`) run on the loop
/// thread, so they must be quick; the only blocking call there is `fread` of an upload file
/// from local disk, one buffer at a time.
///
/// Cancellation: a cancelled task queues a cancel for its transfer; the loop thread removes
/// the easy handle from the multi handle (closing its connection) and the call throws
/// `.cancelled`. Timeouts are libcurl's `CURLOPT_TIMEOUT_MS`.
public final class CurlTransport: HTTPTransport, Sendable {
    public let endpoint: HTTPEndpoint

    /// `curl_global_init` must run once before any other libcurl call; Swift runs a static
    /// initializer exactly once, thread-safely. Executables also call `CurlTransport.globalInit()`
    /// at the top of `main`, before any thread starts, as libcurl recommends.
    static let initialized: Bool = {
        curl_global_init(Int(CURL_GLOBAL_ALL)) == CURLE_OK
    }()

    /// Initializes libcurl for the process; call first thing in `main`.
    public static func globalInit() { _ = initialized }

    /// Creates a transport to `endpoint`; it shares the process's one libcurl loop thread.
    public init(endpoint: HTTPEndpoint) {
        _ = Self.initialized
        self.endpoint = endpoint
    }

    public func send(_ request: HTTPRequest) async throws -> HTTPResponse {
        guard let loop = CurlLoop.shared else {
            throw HTTPClientError(.transport, "libcurl could not be initialized (curl_global_init or curl_multi_init failed: out of memory?)")
        }
        let transfer = Transfer(request: request, endpoint: endpoint)
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<HTTPResponse, any Error>) in
                transfer.continuation = continuation
                loop.submit(.start(transfer))
            }
        } onCancel: {
            transfer.cancelled.store(true, ordering: .relaxed)
            loop.submit(.cancel(transfer))
        }
    }
}

/// The one libcurl multi handle of the process and the thread that drives it.
final class CurlLoop: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `multi` is used only on the loop thread, except for
    // `curl_multi_wakeup`, which libcurl documents as callable from any thread. `active` and
    // `idleHandles` are touched only on the loop thread; `pending` is behind its Mutex.
    enum Command: Sendable {
        case start(Transfer)
        case cancel(Transfer)
    }

    /// The loop, started on first use; nil when libcurl cannot be initialized.
    static let shared: CurlLoop? = {
        guard CurlTransport.initialized, let multi = curl_multi_init() else { return nil }
        let loop = CurlLoop(multi: multi)
        startDedicatedThread(name: "agentd-curl") { loop.run() }
        return loop
    }()

    private let multi: UnsafeMutableRawPointer
    private let pending = Mutex<[Command]>([])
    private var active: [UnsafeMutableRawPointer: Transfer] = [:]
    private var idleHandles: [EasyHandle] = []
    private static let maxIdleHandles = 16

    private init(multi: UnsafeMutableRawPointer) {
        self.multi = multi
        // Idle connections kept for reuse, across every endpoint (the oldest closes first): as
        // many as the 16 idle easy handles kept before, so that a burst of parallel requests
        // leaves a bounded number of sockets open behind it, here and in the server.
        _ = ccurl_multi_setopt_long(multi, CURLMOPT_MAXCONNECTS, 16)
    }

    /// Queues `command` for the loop thread and wakes it.
    func submit(_ command: Command) {
        pending.withLock { $0.append(command) }
        _ = curl_multi_wakeup(multi)
    }

    private func run() {
        while true {
            let commands = pending.withLock { queued in
                let taken = queued
                queued.removeAll()
                return taken
            }
            for command in commands {
                switch command {
                case .start(let transfer): start(transfer)
                case .cancel(let transfer): cancel(transfer)
                }
            }
            var running: Int32 = 0
            _ = curl_multi_perform(multi, &running)
            collectFinished()
            // Returns when a socket is ready, a libcurl timer is due (sooner than this bound)
            // or `curl_multi_wakeup` was called.
            var ready: Int32 = 0
            _ = curl_multi_poll(multi, nil, 0, 30_000, &ready)
        }
    }

    private func start(_ transfer: Transfer) {
        if transfer.cancelled.load(ordering: .relaxed) {
            return transfer.resume(throwing: HTTPClientError(.cancelled, "\(transfer.what) was cancelled"))
        }
        guard let easy = idleHandles.popLast() ?? EasyHandle() else {
            return transfer.resume(throwing: HTTPClientError(.transport, "\(transfer.what): curl_easy_init failed (out of memory?)"))
        }
        do {
            try transfer.configure(easy.handle)
        } catch {
            release(easy, of: transfer)
            return transfer.resume(throwing: error)
        }
        let code = curl_multi_add_handle(multi, easy.handle)
        guard code == CURLM_OK else {
            release(easy, of: transfer)
            let message = String(cString: curl_multi_strerror(code))
            return transfer.resume(throwing: HTTPClientError(.transport, "\(transfer.what): curl_multi_add_handle failed: \(message)"))
        }
        transfer.easy = easy
        active[easy.handle] = transfer
    }

    private func cancel(_ transfer: Transfer) {
        guard let easy = transfer.easy, active[easy.handle] === transfer else { return }
        active[easy.handle] = nil
        curl_multi_remove_handle(multi, easy.handle)
        release(easy, of: transfer)
        transfer.resume(throwing: HTTPClientError(.cancelled, "\(transfer.what) was cancelled"))
    }

    private func collectFinished() {
        var left: Int32 = 0
        while let message = curl_multi_info_read(multi, &left) {
            // The message is only valid until the handle is removed: read it first.
            guard message.pointee.msg == CURLMSG_DONE, let handle = message.pointee.easy_handle else { continue }
            let code = ccurl_msg_result(message)
            guard let transfer = active.removeValue(forKey: handle), let easy = transfer.easy else {
                curl_multi_remove_handle(multi, handle)
                continue
            }
            curl_multi_remove_handle(multi, handle)
            let result: Result<HTTPResponse, HTTPClientError>
            if code == CURLE_OK {
                var status = 0
                ccurl_easy_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &status)
                result = .success(
                    HTTPResponse(status: status, body: transfer.response, truncated: transfer.truncated, headers: transfer.headers))
            } else {
                result = .failure(transfer.error(code))
            }
            release(easy, of: transfer)
            switch result {
            case .success(let response): transfer.resume(returning: response)
            case .failure(let error): transfer.resume(throwing: error)
            }
        }
    }

    /// Frees what `transfer` set up on `easy` and keeps the handle for a later request.
    private func release(_ easy: EasyHandle, of transfer: Transfer) {
        transfer.releaseResources()
        transfer.easy = nil
        curl_easy_reset(easy.handle)
        if idleHandles.count < Self.maxIdleHandles { idleHandles.append(easy) }
    }
}

/// An easy handle, freed when the box goes away.
final class EasyHandle: @unchecked Sendable {
    // Invariant: used only on the loop thread.
    let handle: UnsafeMutableRawPointer
    init?() {
        guard let h = curl_easy_init() else { return nil }
        handle = h
    }
    deinit { curl_easy_cleanup(handle) }
}

/// One request in flight: its state, shared with libcurl's C callbacks through their
/// userdata pointer, and the continuation of the task that waits for it.
final class Transfer: @unchecked Sendable {
    // Invariant for @unchecked Sendable: `continuation` is set by `send` before the transfer
    // is queued (the queue's Mutex orders it) and from then on touched only on the loop
    // thread, like every other `var` here; `cancelled` is atomic.
    let request: HTTPRequest
    let endpoint: HTTPEndpoint
    var continuation: CheckedContinuation<HTTPResponse, any Error>?
    var easy: EasyHandle?
    var response: [UInt8] = []
    var truncated = false
    /// The final response's header fields (an interim `100 Continue` response's are dropped).
    var headers: [(String, String)] = []
    /// The upload byte count last handed to `onUploadProgress` (libcurl calls often).
    var lastUploadReported: curl_off_t = -1
    let cancelled = Atomic<Bool>(false)
    /// libcurl writes its detailed error message here (`CURLOPT_ERRORBUFFER`).
    let errorBuffer: UnsafeMutablePointer<CChar>
    let bodyBytes: UnsafeMutableBufferPointer<UInt8>
    private var headerList: UnsafeMutablePointer<curl_slist>?
    private var uploadFile: UnsafeMutablePointer<FILE>?

    init(request: HTTPRequest, endpoint: HTTPEndpoint) {
        self.request = request
        self.endpoint = endpoint
        errorBuffer = .allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        if case .bytes(let bytes, _) = request.body {
            bodyBytes = .allocate(capacity: max(bytes.count, 1))
            _ = bodyBytes.initialize(from: bytes)
        } else {
            bodyBytes = .allocate(capacity: 1)
            bodyBytes.initialize(repeating: 0)
        }
    }
    deinit {
        releaseResources()
        bodyBytes.deallocate()
        errorBuffer.deallocate()
    }

    /// `METHOD /path` without the query, for messages.
    var what: String { "\(request.method) \(request.target.split(separator: "?").first ?? "")" }

    func resume(returning response: HTTPResponse) {
        continuation?.resume(returning: response)
        continuation = nil
    }

    func resume(throwing error: any Error) {
        continuation?.resume(throwing: error)
        continuation = nil
    }

    /// Frees the header list and closes the upload file (both live as long as the transfer).
    func releaseResources() {
        curl_slist_free_all(headerList)
        headerList = nil
        if let f = uploadFile { fclose(f) }
        uploadFile = nil
    }

    /// Sets every option of the request on `h`.
    /// - Throws: `.invalidArgument` when the upload file cannot be opened.
    func configure(_ h: UnsafeMutableRawPointer) throws {
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
        // At most a year, so that the milliseconds cannot overflow.
        let seconds = min(max(request.timeout.components.seconds, 0), 365 * 86_400)
        let timeoutMs = max(1, Int(seconds) * 1000 + Int(request.timeout.components.attoseconds / 1_000_000_000_000_000))
        ccurl_easy_setopt_long(h, CURLOPT_TIMEOUT_MS, timeoutMs)
        ccurl_easy_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, min(timeoutMs, 10_000))
        headerList = curl_slist_append(headerList, "Expect:")  // no 100-continue round trip
        for (name, value) in request.headers { headerList = curl_slist_append(headerList, "\(name): \(value)") }

        let unmanaged = Unmanaged.passUnretained(self).toOpaque()
        ccurl_easy_setopt_data_callback(h, CURLOPT_WRITEFUNCTION, curlWrite)
        ccurl_easy_setopt_pointer(h, CURLOPT_WRITEDATA, unmanaged)
        ccurl_easy_setopt_data_callback(h, CURLOPT_HEADERFUNCTION, curlHeader)
        ccurl_easy_setopt_pointer(h, CURLOPT_HEADERDATA, unmanaged)
        ccurl_easy_setopt_long(h, CURLOPT_NOPROGRESS, 0)
        ccurl_easy_setopt_xferinfo_callback(h, curlProgress)
        ccurl_easy_setopt_pointer(h, CURLOPT_XFERINFODATA, unmanaged)
        ccurl_easy_setopt_pointer(h, CURLOPT_ERRORBUFFER, errorBuffer)

        switch request.body {
        case .none:
            if request.method == "POST" || request.method == "PUT" {
                // POSTFIELDS is not copied: point it at memory that lives as long as the transfer.
                ccurl_easy_setopt_long(h, CURLOPT_POSTFIELDSIZE, 0)
                ccurl_easy_setopt_pointer(h, CURLOPT_POSTFIELDS, bodyBytes.baseAddress)
            }
        case .bytes(_, let contentType):
            headerList = curl_slist_append(headerList, "Content-Type: \(contentType)")
            ccurl_easy_setopt_off_t(h, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(bodyBytes.count))
            ccurl_easy_setopt_pointer(h, CURLOPT_POSTFIELDS, bodyBytes.baseAddress)
        case .file(let path, let contentType):
            guard let f = fopen(path, "rb") else {
                throw HTTPClientError(.invalidArgument, "cannot open \(path) to send it: \(String(cString: strerror(errno)))")
            }
            uploadFile = f
            var st = stat()
            fstat(fileno(f), &st)
            headerList = curl_slist_append(headerList, "Content-Type: \(contentType)")
            ccurl_easy_setopt_long(h, CURLOPT_UPLOAD, 1)
            ccurl_easy_setopt_off_t(h, CURLOPT_INFILESIZE_LARGE, curl_off_t(st.st_size))
            ccurl_easy_setopt_pointer(h, CURLOPT_READDATA, UnsafeMutableRawPointer(f))
            ccurl_easy_setopt_data_callback(h, CURLOPT_READFUNCTION, curlReadFile)
            ccurl_easy_setopt_string(h, CURLOPT_CUSTOMREQUEST, request.method)
        }
        ccurl_easy_setopt_slist(h, CURLOPT_HTTPHEADER, headerList)
    }

    /// The error for a transfer that ended with `code`.
    func error(_ code: CURLcode) -> HTTPClientError {
        let detail = String(cString: errorBuffer)
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

private func curlWrite(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ userdata: UnsafeMutableRawPointer?) -> Int {
    let n = size * count
    guard let ptr, let userdata else { return n }
    let context = Unmanaged<Transfer>.fromOpaque(userdata).takeUnretainedValue()
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
    let context = Unmanaged<Transfer>.fromOpaque(userdata).takeUnretainedValue()
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
    let context = Unmanaged<Transfer>.fromOpaque(userdata).takeUnretainedValue()
    if let report = context.request.onUploadProgress, uploadTotal > 0, uploadNow != context.lastUploadReported {
        context.lastUploadReported = uploadNow
        report(Int64(uploadNow), Int64(uploadTotal))
    }
    return context.cancelled.load(ordering: .relaxed) ? 1 : 0
}

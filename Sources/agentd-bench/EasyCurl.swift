import CCurl
import Foundation
import Glibc

/// The client of the proxy figures: one blocking libcurl easy handle with the same options
/// on every path measured, so that the paths differ only in where the bytes go:
/// - `.direct`: TCP and TLS straight to the upstream;
/// - `.unixSocket`: plain HTTP to a vault-proxy listener (a route);
/// - `.proxy`: HTTPS through a listener as an HTTP proxy (libcurl's CONNECT tunnel, then TLS
///   inside it). libcurl reaches proxies only over TCP, so its open-socket callback makes a
///   unix socket instead and points the address at the listener (the callback may change the
///   address; libcurl keeps it in storage sized for any socket address, `sockaddr_un` included).
///
/// TLS sessions are not resumed (the vault-proxy's upstream connections never resume
/// either), HTTP/1.1 only, 256 KiB receive buffer. With `fresh`, every request has a new
/// connection; otherwise the handle keeps its connection alive between requests.
final class EasyCurl {
    enum Path {
        case direct
        case unixSocket(String)
        case proxy(socket: String)
    }

    private let handle: UnsafeMutableRawPointer
    private let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: Int(CURL_ERROR_SIZE) + 1)
    /// Body bytes of the current request (the body itself is dropped).
    fileprivate var received = 0
    /// The listener's address for `.proxy`.
    fileprivate var proxyAddress: sockaddr_un?

    init(caFile: String, path: Path, fresh: Bool) throws {
        guard let h = curl_easy_init() else { throw RawUnixHTTP.Failure(description: "curl_easy_init failed (out of memory?)") }
        handle = h
        errorBuffer.initialize(repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        ccurl_easy_setopt_long(h, CURLOPT_NOSIGNAL, 1)
        ccurl_easy_setopt_long(h, CURLOPT_TIMEOUT_MS, 300_000)
        ccurl_easy_setopt_string(h, CURLOPT_CAINFO, caFile)
        ccurl_easy_setopt_long(h, CURLOPT_SSL_SESSIONID_CACHE, 0)
        ccurl_easy_setopt_long(h, CURLOPT_HTTP_VERSION, Int(CURL_HTTP_VERSION_1_1))
        ccurl_easy_setopt_long(h, CURLOPT_BUFFERSIZE, 256 << 10)
        ccurl_easy_setopt_pointer(h, CURLOPT_ERRORBUFFER, errorBuffer)
        if fresh {
            ccurl_easy_setopt_long(h, CURLOPT_FRESH_CONNECT, 1)
            ccurl_easy_setopt_long(h, CURLOPT_FORBID_REUSE, 1)
        }
        let me = Unmanaged.passUnretained(self).toOpaque()
        ccurl_easy_setopt_data_callback(h, CURLOPT_WRITEFUNCTION, easyCurlCount)
        ccurl_easy_setopt_pointer(h, CURLOPT_WRITEDATA, me)
        switch path {
        case .direct: break
        case .unixSocket(let socket):
            ccurl_easy_setopt_string(h, CURLOPT_UNIX_SOCKET_PATH, socket)
        case .proxy(let socket):
            proxyAddress = RawUnixHTTP.address(socket)
            // An address literal: nothing to resolve, one connection attempt.
            ccurl_easy_setopt_string(h, CURLOPT_PROXY, "http://127.0.0.1:3128")
            ccurl_easy_setopt_opensocket_callback(h, easyCurlOpenUnix)
            ccurl_easy_setopt_pointer(h, CURLOPT_OPENSOCKETDATA, me)
        }
    }

    deinit {
        curl_easy_cleanup(handle)
        errorBuffer.deallocate()
    }

    /// GETs `url` and returns its status and how many body bytes came.
    func get(_ url: String) throws -> (status: Int, bytes: Int) {
        received = 0
        ccurl_easy_setopt_string(handle, CURLOPT_URL, url)
        errorBuffer[0] = 0
        let code = curl_easy_perform(handle)
        guard code == CURLE_OK else {
            let detail = String(cString: errorBuffer)
            throw RawUnixHTTP.Failure(description: "GET \(url): \(detail.isEmpty ? String(cString: curl_easy_strerror(code)) : detail)")
        }
        var status = 0
        ccurl_easy_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &status)
        return (status, received)
    }
}

private func easyCurlCount(_ ptr: UnsafeMutablePointer<CChar>?, _ size: Int, _ count: Int, _ userdata: UnsafeMutableRawPointer?) -> Int {
    guard let userdata else { return size * count }
    Unmanaged<EasyCurl>.fromOpaque(userdata).takeUnretainedValue().received += size * count
    return size * count
}

private func easyCurlOpenUnix(_ clientp: UnsafeMutableRawPointer?, _: curlsocktype, _ address: UnsafeMutablePointer<curl_sockaddr>?) -> curl_socket_t {
    guard let clientp, let address, let unix = Unmanaged<EasyCurl>.fromOpaque(clientp).takeUnretainedValue().proxyAddress else { return -1 }
    let fd = RawUnixHTTP.streamSocket()
    guard fd >= 0 else { return -1 }
    address.pointee.family = Int32(unix.sun_family)
    address.pointee.protocol = 0
    address.pointee.addrlen = UInt32(MemoryLayout.size(ofValue: unix))
    let offset = MemoryLayout<curl_sockaddr>.offset(of: \.addr)!
    withUnsafeBytes(of: unix) { (UnsafeMutableRawPointer(address) + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    return fd
}

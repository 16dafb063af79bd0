// tcp: the prefill's pool runs a small server; the decode's puller fetches buffers over pooled
// connections and receives the body straight into its KV blocks.
//
// Protocol (little-endian; one request at a time per connection, connections reused):
//   decode → prefill  request, 32 bytes: magic "PDKQ", u16 version 2, u8 mode, u8 0,
//                     u32 buffer id, u32 0, u64 generation, u64 0
//   prefill → decode  response, 32 bytes: magic "PDKR", u16 version 2, u16 0, u32 status code
//                     (0: OK), u32 message bytes (error: <= 1024, the message follows),
//                     u64 payload bytes (OK: header + body), u32 source block size (block-fixed),
//                     u32 0; on OK the 64-byte KV wire header follows
//   decode → prefill  1 byte: 1 go, 0 abort (the header was refused; the connection stays usable)
//   contiguous:       prefill → decode the body, payload - 64 bytes; for a layer-wise header
//                     (kKvWireLayerWise) each layer is sent once the prefill has written it, and
//                     an i32 first token follows the body
//   block-fixed:      per (block, layer), block-major: prefill → decode a 16-byte frame (magic
//                     "PDKB", u32 block index in the sequence, u32 layer, u32 piece bytes) and the
//                     piece (the block's n K rows, then its n V rows); decode → prefill 1 ack
//                     byte (1 go on, 0 abort) before the next piece.
// A malformed request closes the connection (the stream cannot be trusted any more); a refused
// pull (stale, expired, unknown buffer) answers an error and keeps the connection.
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <list>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/log.h"
#include "transfer/byte_order.h"
#include "transfer/memory.h"
#include "transfer/net.h"
#include "transfer/pull_common.h"
#include "transfer/transports.h"

namespace pdserve::transfer_internal {
namespace {

constexpr uint32_t kRequestMagic = 0x514B4450;   // "PDKQ"
constexpr uint32_t kResponseMagic = 0x524B4450;  // "PDKR"
constexpr uint32_t kPieceMagic = 0x424B4450;     // "PDKB"
// 2: a layer-wise body is followed by the first token (a version-1 peer would not read it).
constexpr uint16_t kProtocolVersion = 2;
constexpr size_t kRequestBytes = 32;
constexpr size_t kResponseBytes = 32;
constexpr size_t kPieceFrameBytes = 16;
constexpr uint32_t kMaxMessageBytes = 1024;
constexpr uint8_t kGo = 1;
constexpr uint8_t kAbort = 0;
constexpr size_t kMaxConnections = 256;
// A puller keeps idle connections to at most this many endpoints (4 per endpoint).
constexpr size_t kMaxIdleEndpoints = 64;
// The body is received in windows of this many bytes (one iovec list each), so the list of runs
// stays small whatever the KV size.
constexpr uint64_t kRecvWindowBytes = uint64_t{32} << 20;
// Largest block-fixed piece a puller accepts (2 x block_size rows).
constexpr uint64_t kMaxPieceBytes = uint64_t{1} << 30;

struct Request {
  KvTransferMode mode = KvTransferMode::kContiguous;
  uint32_t buffer_id = 0;
  uint64_t generation = 0;
};

std::array<uint8_t, kRequestBytes> encode_request(const Request& r) {
  std::array<uint8_t, kRequestBytes> b{};
  store_le<uint32_t>(b.data(), kRequestMagic);
  store_le<uint16_t>(b.data() + 4, kProtocolVersion);
  b[6] = static_cast<uint8_t>(r.mode);
  store_le<uint32_t>(b.data() + 8, r.buffer_id);
  store_le<uint64_t>(b.data() + 16, r.generation);
  return b;
}

StatusOr<Request> decode_request(const uint8_t* b) {
  const auto magic = load_le<uint32_t>(b);
  if (magic != kRequestMagic)
    return data_loss(
        fmt::format("not a KV request: magic 0x{:08x} at byte 0, expected 0x{:08x}", magic, kRequestMagic));
  const auto version = load_le<uint16_t>(b + 4);
  if (version != kProtocolVersion)
    return unimplemented(fmt::format("KV request version {} is not supported (this build speaks {})", version,
                                     kProtocolVersion));
  if (b[6] > static_cast<uint8_t>(KvTransferMode::kBlockFixed))
    return data_loss(fmt::format("KV request mode {} at byte 6 is unknown", b[6]));
  if (b[7] != 0 || load_le<uint32_t>(b + 12) != 0 || load_le<uint64_t>(b + 24) != 0)
    return data_loss("KV request reserved bytes are not zero");
  Request r;
  r.mode = static_cast<KvTransferMode>(b[6]);
  r.buffer_id = load_le<uint32_t>(b + 8);
  r.generation = load_le<uint64_t>(b + 16);
  return r;
}

struct Response {
  uint32_t code = 0;
  uint32_t message_bytes = 0;
  uint64_t payload_bytes = 0;
  uint32_t block_size_tokens = 0;
};

std::array<uint8_t, kResponseBytes> encode_response(const Response& r) {
  std::array<uint8_t, kResponseBytes> b{};
  store_le<uint32_t>(b.data(), kResponseMagic);
  store_le<uint16_t>(b.data() + 4, kProtocolVersion);
  store_le<uint32_t>(b.data() + 8, r.code);
  store_le<uint32_t>(b.data() + 12, r.message_bytes);
  store_le<uint64_t>(b.data() + 16, r.payload_bytes);
  store_le<uint32_t>(b.data() + 24, r.block_size_tokens);
  return b;
}

StatusOr<Response> decode_response(const uint8_t* b) {
  const auto magic = load_le<uint32_t>(b);
  if (magic != kResponseMagic)
    return data_loss(
        fmt::format("not a KV response: magic 0x{:08x} at byte 0, expected 0x{:08x}", magic, kResponseMagic));
  const auto version = load_le<uint16_t>(b + 4);
  if (version != kProtocolVersion)
    return unimplemented(fmt::format("KV response version {} is not supported (this build speaks {})",
                                     version, kProtocolVersion));
  Response r;
  r.code = load_le<uint32_t>(b + 8);
  r.message_bytes = load_le<uint32_t>(b + 12);
  r.payload_bytes = load_le<uint64_t>(b + 16);
  r.block_size_tokens = load_le<uint32_t>(b + 24);
  if (r.code != 0 && r.message_bytes > kMaxMessageBytes)
    return data_loss(
        fmt::format("KV error message of {} bytes at byte 12 exceeds {}", r.message_bytes, kMaxMessageBytes));
  return r;
}

Status send_error(int fd, const Status& status) {
  const std::string msg = status.message().substr(0, kMaxMessageBytes);
  Response r;
  r.code = static_cast<uint32_t>(status.code());
  r.message_bytes = static_cast<uint32_t>(msg.size());
  const auto head = encode_response(r);
  std::vector<iovec> iov = {{const_cast<uint8_t*>(head.data()), head.size()},
                            {const_cast<char*>(msg.data()), msg.size()}};
  return send_iov(fd, iov, "KV error response");
}

// The iovecs of wire body range [offset, offset + bytes) in the target's blocks, appended.
void append_runs(const PagedKvView& view, std::span<const int32_t> table, int32_t num_tokens, uint64_t offset,
                 uint64_t bytes, std::vector<iovec>& iov) {
  for_each_kv_run(view, table, num_tokens, offset, bytes, [&iov](uint8_t* p, uint64_t, size_t len) {
    iov.push_back({p, len});
  });
}

class TcpSendPool final : public CoreSendPool {
 public:
  static StatusOr<std::unique_ptr<KvSendPool>> create(const KvTransportOptions& options) {
    PD_ASSIGN_OR_RETURN(HostPort listen, parse_host_port(options.tcp_listen, true));
    PD_ASSIGN_OR_RETURN(std::string host,
                        advertised_kv_host(options.tcp_listen, listen, options.tcp_advertise_host));
    auto pool = std::unique_ptr<TcpSendPool>(new TcpSendPool(options));
    PD_ASSIGN_OR_RETURN(pool->memory_,
                        AnonymousMemory::create(options.pool_capacity_bytes, options.prefault_pool));
    pool->core_ = std::make_unique<SendPoolCore>(core_config(options), pool->memory_.data());
    uint16_t port = 0;
    PD_ASSIGN_OR_RETURN(pool->listen_, tcp_listen(listen, options.tcp_socket_buffer_bytes, &port));
    pool->endpoint_ = format_host_port(host, port);
    PD_ASSIGN_OR_RETURN(pool->wake_, WakePipe::create());
    pool->accept_thread_ = std::thread([p = pool.get()] { p->accept_loop(); });
    return std::unique_ptr<KvSendPool>(std::move(pool));
  }

  ~TcpSendPool() override {
    stop_.store(true);
    wake_.signal();
    if (accept_thread_.joinable()) accept_thread_.join();
    std::list<Conn> conns;
    {
      std::lock_guard lock(conns_mu_);
      for (Conn& c : conns_) ::shutdown(c.fd.get(), SHUT_RDWR);
      conns.splice(conns.end(), conns_);
    }
    for (Conn& c : conns) c.thread.join();
  }

  TransportKind kind() const override { return TransportKind::kTcp; }
  std::string endpoint() const override { return endpoint_; }
  bool supports_layer_wise() const override { return true; }
  std::span<uint8_t> host_memory() const override { return {memory_.data(), memory_.size()}; }

  StatusOr<KvHandle> expose_paged(const PagedKvView& view, std::span<const int32_t> block_table,
                                  int32_t num_tokens, uint32_t flags) override {
    PD_ASSIGN_OR_RETURN(std::unique_ptr<PagedSource> source,
                        make_paged_source(view, block_table, num_tokens, flags));
    const uint64_t bytes = kKvWireHeaderBytes + view.layout.body_bytes(num_tokens);
    PD_ASSIGN_OR_RETURN(KvBufferRef ref, core_->expose_paged(std::move(source), bytes));
    return KvHandle{
        TransportKind::kTcp, KvTransferMode::kBlockFixed, endpoint_, ref.buffer_id, ref.generation, bytes};
  }

 private:
  struct Conn {
    Fd fd;
    std::thread thread;
    std::atomic<bool> done{false};
  };

  explicit TcpSendPool(const KvTransportOptions& options)
      : io_timeout_ms_(options.io_timeout_ms), buffer_bytes_(options.tcp_socket_buffer_bytes) {}

  void accept_loop() {
    for (;;) {
      pollfd fds[2] = {{listen_.get(), POLLIN, 0}, {wake_.fd(), POLLIN, 0}};
      const int rc = ::poll(fds, 2, -1);
      if (stop_.load()) return;
      if (rc <= 0 || !(fds[0].revents & POLLIN)) continue;
      Fd fd(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!fd.valid()) continue;
      set_socket_options(fd.get(), buffer_bytes_, io_timeout_ms_);
      std::lock_guard lock(conns_mu_);
      reap_locked();
      if (conns_.size() >= kMaxConnections) {
        PD_LOG_WARN("KV server at {}: {} connections open, refusing another", endpoint_, conns_.size());
        continue;
      }
      Conn& c = conns_.emplace_back();
      c.fd = std::move(fd);
      c.thread = std::thread([this, &c] { serve_connection(c); });
    }
  }

  // Joins the threads of connections that have ended. conns_mu_ held.
  void reap_locked() {
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (it->done.load()) {
        it->thread.join();
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void serve_connection(Conn& c) {
    const int fd = c.fd.get();
    while (!stop_.load()) {
      // Idle between requests: no timeout (a pooled connection may wait long for its next pull).
      set_socket_timeouts(fd, 0);
      uint8_t req[kRequestBytes];
      if (!recv_all(fd, req, sizeof req, "KV request").ok()) break;
      set_socket_timeouts(fd, io_timeout_ms_);
      StatusOr<Request> r = decode_request(req);
      if (!r.ok()) {
        core_->count_pull(false);
        PD_LOG_WARN("KV server at {}: {}; closing the connection", endpoint_, r.status().message());
        (void)send_error(fd, r.status());
        break;
      }
      if (!serve_request(fd, *r).ok()) break;
    }
    ::shutdown(fd, SHUT_RDWR);
    c.done.store(true);
  }

  // An error return means the connection is broken.
  Status serve_request(int fd, const Request& r) {
    StatusOr<PinnedBuffer> pinned = core_->pin({r.buffer_id, r.generation}, r.mode);
    if (!pinned.ok()) {
      core_->count_pull(false);
      return send_error(fd, pinned.status());
    }
    bool served = false;
    Status st = r.mode == KvTransferMode::kContiguous ? serve_contiguous(fd, r, pinned->bytes, &served)
                                                      : serve_block_fixed(fd, *pinned->paged, &served);
    core_->unpin(r.buffer_id);
    core_->count_pull(st.ok() && served);
    return st;
  }

  // Sends the response and header, then waits for the decode's go. *go: whether it said go.
  Status send_header(int fd, uint64_t payload_bytes, uint32_t block_size, const uint8_t* header, bool* go) {
    Response resp;
    resp.payload_bytes = payload_bytes;
    resp.block_size_tokens = block_size;
    auto head = encode_response(resp);
    std::vector<iovec> iov = {{head.data(), head.size()}, {const_cast<uint8_t*>(header), kKvWireHeaderBytes}};
    PD_RETURN_IF_ERROR(send_iov(fd, iov, "KV response"));
    uint8_t answer = kAbort;
    PD_RETURN_IF_ERROR(recv_all(fd, &answer, 1, "KV go/abort"));
    *go = answer == kGo;
    return ok_status();
  }

  Status serve_contiguous(int fd, const Request& r, std::span<const uint8_t> bytes, bool* served) {
    bool go = false;
    PD_RETURN_IF_ERROR(send_header(fd, bytes.size(), 0, bytes.data(), &go));
    if (!go) return ok_status();  // the decode refused the header
    const uint8_t* body = bytes.data() + kKvWireHeaderBytes;
    if ((load_le<uint32_t>(bytes.data() + 8) & kKvWireLayerWise) == 0) {
      PD_RETURN_IF_ERROR(send_all(fd, body, bytes.size() - kKvWireHeaderBytes, "KV body"));
      *served = true;
      return ok_status();
    }
    // Layer-wise: each layer as the prefill finishes it, then the first token. A buffer given up
    // meanwhile breaks the connection (the decode's pull fails).
    PD_ASSIGN_OR_RETURN(KvWireHeader header, decode_kv_wire_header(bytes));
    const KvBufferRef ref{r.buffer_id, r.generation};
    const int32_t num_layers = header.layout.num_layers;
    const uint64_t layer_bytes = header.layout.layer_body_bytes(header.num_tokens);
    int32_t sent = 0;
    while (sent < num_layers) {
      PD_ASSIGN_OR_RETURN(SendPoolCore::Progress p,
                          core_->wait_progress(ref, sent + 1, false, io_timeout_ms_, &stop_));
      const int32_t ready = std::min(p.layers_ready, num_layers);
      PD_RETURN_IF_ERROR(send_all(fd, body + static_cast<uint64_t>(sent) * layer_bytes,
                                  static_cast<uint64_t>(ready - sent) * layer_bytes, "KV layers"));
      sent = ready;
    }
    PD_ASSIGN_OR_RETURN(SendPoolCore::Progress p,
                        core_->wait_progress(ref, num_layers, true, io_timeout_ms_, &stop_));
    uint8_t trailer[4];
    store_le<int32_t>(trailer, p.first_token);
    PD_RETURN_IF_ERROR(send_all(fd, trailer, sizeof trailer, "KV first token"));
    *served = true;
    return ok_status();
  }

  Status serve_block_fixed(int fd, const PagedSource& src, bool* served) {
    const PagedKvView& v = src.view;
    const uint64_t row = v.layout.row_bytes();
    const uint64_t bs = static_cast<uint64_t>(v.block_size);
    bool go = false;
    PD_RETURN_IF_ERROR(send_header(fd, kKvWireHeaderBytes + v.layout.body_bytes(src.num_tokens),
                                   static_cast<uint32_t>(v.block_size), src.header.data(), &go));
    if (!go) return ok_status();
    const uint64_t tokens = static_cast<uint64_t>(src.num_tokens);
    const uint64_t num_blocks = (tokens + bs - 1) / bs;
    for (uint64_t b = 0; b < num_blocks; ++b) {
      const uint64_t n = std::min(bs, tokens - b * bs);
      uint8_t* block = v.base + static_cast<uint64_t>(src.block_table[b]) * v.block_bytes;
      for (int32_t l = 0; l < v.layout.num_layers; ++l) {
        uint8_t frame[kPieceFrameBytes];
        store_le<uint32_t>(frame, kPieceMagic);
        store_le<uint32_t>(frame + 4, static_cast<uint32_t>(b));
        store_le<uint32_t>(frame + 8, static_cast<uint32_t>(l));
        store_le<uint32_t>(frame + 12, static_cast<uint32_t>(2 * n * row));
        uint8_t* k = block + 2 * static_cast<uint64_t>(l) * bs * row;
        std::vector<iovec> iov = {{frame, sizeof frame}, {k, n * row}, {k + bs * row, n * row}};
        PD_RETURN_IF_ERROR(send_iov(fd, iov, "KV block piece"));
        uint8_t ack = kAbort;
        PD_RETURN_IF_ERROR(recv_all(fd, &ack, 1, "KV block ack"));
        if (ack != kGo) return ok_status();
      }
    }
    *served = true;
    return ok_status();
  }

  AnonymousMemory memory_;
  Fd listen_;
  WakePipe wake_;
  std::string endpoint_;
  const int64_t io_timeout_ms_;
  const int buffer_bytes_;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex conns_mu_;
  std::list<Conn> conns_;  // guarded by conns_mu_; a Conn's thread holds a reference to it
};

class TcpPuller final : public QueuedPuller {
 public:
  explicit TcpPuller(const KvTransportOptions& options)
      : QueuedPuller(TransportKind::kTcp, KvMemory::kHost, kHostPullThreads),
        io_timeout_ms_(options.io_timeout_ms),
        buffer_bytes_(options.tcp_socket_buffer_bytes) {}
  ~TcpPuller() override { stop(); }

 protected:
  StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) override {
    ActiveSocket fd(*this);
    StatusOr<PullResult> result = pull(handle, target, fd);
    // A cancel shuts the socket down: whatever the I/O then reported, the pull was cancelled.
    if (!result.ok() && cancel_flag()->load())
      return Status(StatusCode::kCancelled,
                    fmt::format("the pull from the prefill at {} was cancelled", handle.endpoint));
    return result;
  }

  // Cancelling a running pull shuts its socket down, so that a pull blocked in recv (on a
  // layer-wise prefill still computing, or a stalled peer) ends at once, not at the I/O timeout.
  void interrupt(const std::atomic<bool>* cancel) override {
    std::lock_guard lock(active_mu_);
    if (auto it = active_.find(cancel); it != active_.end()) ::shutdown(it->second, SHUT_RDWR);
  }

 private:
  // The socket of the pull running on this thread, registered (by the thread's cancel flag) for
  // interrupt() while held. It leaves the registry before it is closed or pooled, so a cancel
  // never shuts down a socket the pull no longer owns.
  class ActiveSocket {
   public:
    explicit ActiveSocket(TcpPuller& puller) : puller_(puller) {}
    ~ActiveSocket() { (void)release(); }
    ActiveSocket(const ActiveSocket&) = delete;
    ActiveSocket& operator=(const ActiveSocket&) = delete;

    // Holds `fd` (closing the one held before); false when the pull is cancelled already.
    bool hold(Fd fd) {
      (void)release();
      std::lock_guard lock(puller_.active_mu_);
      fd_ = std::move(fd);
      puller_.active_[cancel_flag()] = fd_.get();
      return !cancel_flag()->load();
    }
    int get() const { return fd_.get(); }
    // Lets the socket go: none (it is closed) when a cancel may have shut it down.
    Fd release() {
      {
        std::lock_guard lock(puller_.active_mu_);
        puller_.active_.erase(cancel_flag());
      }
      Fd fd = std::move(fd_);
      if (cancel_flag()->load()) fd.reset();
      return fd;
    }

   private:
    TcpPuller& puller_;
    Fd fd_;
  };

  StatusOr<PullResult> pull(const KvHandle& handle, const KvScatterTarget& target, ActiveSocket& fd) {
    PD_ASSIGN_OR_RETURN(HostPort where, parse_host_port(handle.endpoint, false));
    const std::string peer = fmt::format("prefill at {}", handle.endpoint);
    Response resp;
    // A pooled connection may have been closed by the server meanwhile: one retry on a new one.
    for (int attempt = 0;; ++attempt) {
      if (cancel_flag()->load()) return Status(StatusCode::kCancelled, "the pull was cancelled");
      bool reused = false;
      // NOTE: a connect in progress is not interrupted; a cancel then waits for it (up to the I/O
      // timeout) and takes effect at hold().
      PD_ASSIGN_OR_RETURN(Fd conn, take_connection(handle.endpoint, where, &reused));
      if (!fd.hold(std::move(conn))) return Status(StatusCode::kCancelled, "the pull was cancelled");
      Status st = send_request(fd.get(), handle, &resp);
      if (st.ok()) break;
      if (!reused || attempt > 0) return st.with_context(peer);
    }
    if (resp.code != 0) {
      std::string message(resp.message_bytes, '\0');
      PD_RETURN_IF_ERROR(
          recv_all(fd.get(), message.data(), message.size(), "KV error message").with_context(peer));
      give_back(handle.endpoint, fd.release());
      return peer_status(resp.code, message, peer);
    }
    uint8_t header_bytes[kKvWireHeaderBytes];
    PD_RETURN_IF_ERROR(recv_all(fd.get(), header_bytes, sizeof header_bytes, "KV header").with_context(peer));
    StatusOr<KvWireHeader> header = decode_kv_wire_header(header_bytes);
    Status checked = header.ok() ? check_header_for_pull(*header, handle, target, resp.payload_bytes,
                                                         /*layer_wise_ok=*/true)
                                 : header.status();
    if (checked.ok()) checked = check_block_size(handle, resp);
    if (!checked.ok()) {
      const uint8_t abort = kAbort;
      if (send_all(fd.get(), &abort, 1, "KV abort").ok()) give_back(handle.endpoint, fd.release());
      return checked.with_context(peer);
    }
    const uint8_t go = kGo;
    PD_RETURN_IF_ERROR(send_all(fd.get(), &go, 1, "KV go").with_context(peer));
    Status received = handle.mode == KvTransferMode::kContiguous
                          ? receive_contiguous(fd.get(), *header, target)
                          : receive_block_fixed(fd.get(), *header, target, resp.block_size_tokens);
    PD_RETURN_IF_ERROR(received.with_context(peer));
    int32_t first_token = -1;
    if (header->flags & kKvWireLayerWise) {
      uint8_t trailer[4];
      PD_RETURN_IF_ERROR(recv_all(fd.get(), trailer, sizeof trailer, "KV first token").with_context(peer));
      first_token = load_le<int32_t>(trailer);
    }
    give_back(handle.endpoint, fd.release());
    if (header->flags & kKvWireBodyChecksum) {
      const uint64_t computed = scattered_body_checksum(target.view, target.block_table, header->num_tokens);
      if (computed != header->body_checksum)
        return data_loss(
            fmt::format("{}: KV body checksum 0x{:016x} != header's 0x{:016x}: body corrupted in transit",
                        peer, computed, header->body_checksum));
    }
    return PullResult{header->num_tokens, resp.payload_bytes, first_token};
  }

  Status check_block_size(const KvHandle& handle, const Response& resp) {
    if (handle.mode == KvTransferMode::kContiguous) {
      if (resp.block_size_tokens != 0)
        return data_loss(
            fmt::format("contiguous KV response names a block size ({})", resp.block_size_tokens));
      return ok_status();
    }
    if (resp.block_size_tokens < 1 || resp.block_size_tokens > (1u << 24))
      return data_loss(fmt::format("block-fixed KV response block size {} is outside [1, {}]",
                                   resp.block_size_tokens, 1u << 24));
    return ok_status();
  }

  Status send_request(int fd, const KvHandle& handle, Response* resp) {
    const auto req = encode_request(Request{handle.mode, handle.buffer_id, handle.generation});
    PD_RETURN_IF_ERROR(send_all(fd, req.data(), req.size(), "KV request"));
    uint8_t bytes[kResponseBytes];
    PD_RETURN_IF_ERROR(recv_all(fd, bytes, sizeof bytes, "KV response"));
    PD_ASSIGN_OR_RETURN(*resp, decode_response(bytes));
    return ok_status();
  }

  Status receive_contiguous(int fd, const KvWireHeader& header, const KvScatterTarget& target) {
    std::vector<iovec> iov;
    for (uint64_t off = 0; off < header.body_bytes; off += kRecvWindowBytes) {
      iov.clear();
      append_runs(target.view, target.block_table, header.num_tokens, off,
                  std::min(kRecvWindowBytes, header.body_bytes - off), iov);
      PD_RETURN_IF_ERROR(recv_iov(fd, iov, "KV body"));
      if (target.on_body_landed)
        target.on_body_landed(off + std::min(kRecvWindowBytes, header.body_bytes - off));
    }
    return ok_status();
  }

  Status receive_block_fixed(int fd, const KvWireHeader& header, const KvScatterTarget& target,
                             uint32_t src_bs) {
    const uint64_t row = header.layout.row_bytes();
    const uint64_t tokens = static_cast<uint64_t>(header.num_tokens);
    const uint64_t part = tokens * row;  // one layer's K (or V) in the wire body
    const uint64_t bs = src_bs;
    const uint64_t num_blocks = (tokens + bs - 1) / bs;
    std::vector<iovec> iov;
    for (uint64_t b = 0; b < num_blocks; ++b) {
      const uint64_t n = std::min(bs, tokens - b * bs);
      const uint64_t piece = 2 * n * row;
      if (piece > kMaxPieceBytes)
        return data_loss(fmt::format("block-fixed piece of {} bytes is too large", piece));
      for (int32_t l = 0; l < header.layout.num_layers; ++l) {
        uint8_t frame[kPieceFrameBytes];
        PD_RETURN_IF_ERROR(recv_all(fd, frame, sizeof frame, "KV block frame"));
        const auto magic = load_le<uint32_t>(frame);
        const auto got_block = load_le<uint32_t>(frame + 4);
        const auto got_layer = load_le<uint32_t>(frame + 8);
        const auto got_bytes = load_le<uint32_t>(frame + 12);
        if (magic != kPieceMagic || got_block != b || got_layer != static_cast<uint32_t>(l) ||
            got_bytes != piece) {
          const uint8_t abort = kAbort;
          (void)send_all(fd, &abort, 1, "KV block ack");
          return data_loss(
              fmt::format("block-fixed frame (magic 0x{:08x}, block {}, layer {}, {} bytes) != expected "
                          "(0x{:08x}, {}, {}, {})",
                          magic, got_block, got_layer, got_bytes, kPieceMagic, b, l, piece));
        }
        iov.clear();
        const uint64_t k_offset = 2 * static_cast<uint64_t>(l) * part + b * bs * row;
        append_runs(target.view, target.block_table, header.num_tokens, k_offset, n * row, iov);
        append_runs(target.view, target.block_table, header.num_tokens, k_offset + part, n * row, iov);
        PD_RETURN_IF_ERROR(recv_iov(fd, iov, "KV block piece"));
        const uint8_t ack = kGo;
        PD_RETURN_IF_ERROR(send_all(fd, &ack, 1, "KV block ack"));
      }
    }
    return ok_status();
  }

  StatusOr<Fd> take_connection(const std::string& endpoint, const HostPort& where, bool* reused) {
    {
      std::lock_guard lock(idle_mu_);
      auto it = idle_.find(endpoint);
      if (it != idle_.end() && !it->second.empty()) {
        Fd fd = std::move(it->second.back());
        it->second.pop_back();
        *reused = true;
        return fd;
      }
    }
    *reused = false;
    return tcp_connect(where, buffer_bytes_, io_timeout_ms_);
  }

  void give_back(const std::string& endpoint, Fd fd) {
    if (!fd.valid()) return;  // shut down by a cancel
    // Bounded: endpoints of prefills that went away are not kept forever.
    std::lock_guard lock(idle_mu_);
    if (idle_.size() >= kMaxIdleEndpoints && !idle_.contains(endpoint)) idle_.clear();
    std::vector<Fd>& idle = idle_[endpoint];
    if (idle.size() < 4) idle.push_back(std::move(fd));
  }

  const int64_t io_timeout_ms_;
  const int buffer_bytes_;
  std::mutex idle_mu_;
  std::unordered_map<std::string, std::vector<Fd>> idle_;  // guarded by idle_mu_
  std::mutex active_mu_;                                   // never held while taking QueuedPuller's lock
  // The running pulls' sockets by their threads' cancel flags; guarded by active_mu_.
  std::unordered_map<const std::atomic<bool>*, int> active_;
};

}  // namespace

StatusOr<std::unique_ptr<KvSendPool>> make_tcp_pool(const KvTransportOptions& options) {
  return TcpSendPool::create(options);
}

StatusOr<std::unique_ptr<KvPuller>> make_tcp_puller(const KvTransportOptions& options) {
  return std::unique_ptr<KvPuller>(std::make_unique<TcpPuller>(options));
}

}  // namespace pdserve::transfer_internal

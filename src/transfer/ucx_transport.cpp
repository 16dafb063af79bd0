// ucx: the tcp transport's shape over UCX (Debian's libucx, an optional build): the prefill's pool
// runs a UCX listener; the decode's puller asks for a buffer with an active message and receives
// the body by rendezvous into a staging buffer, then scatters it into its KV blocks. UCX picks the
// wire underneath: RDMA where a NIC has it, TCP otherwise (the endpoints handle peer failure,
// which leaves UCX 1.13's shared-memory transports out).
//
// Protocol (active messages; little-endian; a puller has one pull at a time in flight):
//   decode → prefill  AM 1, header 32 bytes, no data: magic "PDUQ", u16 version 1, u8 mode (0:
//                     contiguous), u8 0, u32 buffer id, u32 0, u64 generation, u64 pull sequence;
//                     sent with the reply flag (the prefill answers on the endpoint it came from)
//   prefill → decode  AM 2, header: magic "PDUR", u16 version 1, u16 0, u32 status code (0: OK),
//                     u32 message bytes (error: <= 1024), u64 payload bytes (OK: header + body),
//                     u64 the request's pull sequence; then the 64-byte KV wire header (OK) or the
//                     message (error). Data: the body (OK), none (error).
// The decode checks the wire header before it receives anything: a refused header drops the data
// (the prefill's send completes), so nothing lands in the blocks. A response for another pull
// sequence (a pull that timed out) is dropped. Block-fixed is not offered (UNIMPLEMENTED).
//
// Threads: the pool's UCX worker runs on its own thread (listener, requests, sends); the puller's
// on its progress thread. Neither is touched from elsewhere.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <list>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "common/log.h"
#include "transfer/byte_order.h"
#include "transfer/memory.h"
#include "transfer/net.h"
#include "transfer/pull_common.h"
#include "transfer/transports.h"
#include "transfer/ucx_protocol.h"

namespace pdserve::transfer_internal {
namespace {

using namespace ucx_protocol;

constexpr unsigned kAmRequest = 1;
constexpr unsigned kAmResponse = 2;
constexpr size_t kMaxIdleEndpoints = 64;
constexpr size_t kMaxConnections = 256;  // decode endpoints a prefill's server keeps (as tcp's)
constexpr size_t kRendezvousBytes = 64 << 10;
// A puller keeps its staging buffer between pulls up to this size.
constexpr uint64_t kKeptStagingBytes = uint64_t{1} << 30;

// libucp is opened when the first ucx pool or puller is made, not linked: loading UCX installs
// its memory hooks (libucm patches mmap, madvise and friends in the whole process), which no
// process that does not move KV over UCX should carry, and ThreadSanitizer cannot run under.
#define PD_UCX_FUNCTIONS(X)         \
  X(ucp_am_data_release)            \
  X(ucp_am_recv_data_nbx)           \
  X(ucp_am_send_nbx)                \
  X(ucp_cleanup)                    \
  X(ucp_config_read)                \
  X(ucp_config_release)             \
  X(ucp_ep_close_nbx)               \
  X(ucp_ep_create)                  \
  X(ucp_init_version)               \
  X(ucp_listener_create)            \
  X(ucp_listener_destroy)           \
  X(ucp_listener_query)             \
  X(ucp_listener_reject)            \
  X(ucp_request_cancel)             \
  X(ucp_request_check_status)       \
  X(ucp_request_free)               \
  X(ucp_worker_arm)                 \
  X(ucp_worker_create)              \
  X(ucp_worker_destroy)             \
  X(ucp_worker_get_efd)             \
  X(ucp_worker_progress)            \
  X(ucp_worker_query)               \
  X(ucp_worker_set_am_recv_handler) \
  X(ucs_status_string)

struct UcxLibrary {
#define PD_UCX_POINTER(name) decltype(&::name) name = nullptr;
  PD_UCX_FUNCTIONS(PD_UCX_POINTER)
#undef PD_UCX_POINTER
  Status status;  // why it could not be loaded
};

// Loaded once per process and never unloaded (UCX cannot be).
const UcxLibrary& ucx_library() {
  static const UcxLibrary lib = [] {
    UcxLibrary l;
    void* h = ::dlopen("libucp.so.0", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      l.status = failed_precondition(fmt::format(
          "the ucx KV transport cannot load UCX ({}): install it (Debian: apt-get install libucx0) "
          "or use --transport tcp",
          ::dlerror()));
      return l;
    }
#define PD_UCX_LOAD(name)                                                                                 \
  l.name = reinterpret_cast<decltype(&::name)>(::dlsym(h, #name));                                        \
  if (l.name == nullptr) {                                                                                \
    l.status =                                                                                            \
        failed_precondition(fmt::format("the UCX library lacks {}: UCX 1.13 or newer is needed", #name)); \
    return l;                                                                                             \
  }
    PD_UCX_FUNCTIONS(PD_UCX_LOAD)
#undef PD_UCX_LOAD
    return l;
  }();
  return lib;
}

// The loaded library: only after ucx_library().status was checked (UcxWorker::create does).
const UcxLibrary& ucx() { return ucx_library(); }

Status ucx_error(ucs_status_t st, std::string_view what) {
  return unavailable(fmt::format("UCX: {}: {}", what, ucx().ucs_status_string(st)));
}

// A UCP context and one worker with a wake-up fd (AM + WAKEUP features), used by one thread at a
// time.
class UcxWorker {
 public:
  static StatusOr<std::unique_ptr<UcxWorker>> create() {
    PD_RETURN_IF_ERROR(ucx_library().status);
    auto w = std::unique_ptr<UcxWorker>(new UcxWorker());
    ucp_config_t* config = nullptr;
    ucs_status_t st = ucx().ucp_config_read(nullptr, nullptr, &config);
    if (st != UCS_OK) return ucx_error(st, "reading the configuration (UCX_* environment)");
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    st = ucx().ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &w->context_);
    ucx().ucp_config_release(config);
    if (st != UCS_OK) return ucx_error(st, "ucp_init");
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    st = ucx().ucp_worker_create(w->context_, &wp, &w->worker_);
    if (st != UCS_OK) return ucx_error(st, "creating a worker");
    st = ucx().ucp_worker_get_efd(w->worker_, &w->efd_);
    if (st != UCS_OK) return ucx_error(st, "the worker's event fd");
    ucp_worker_attr_t attr{};
    attr.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
    st = ucx().ucp_worker_query(w->worker_, &attr);
    if (st != UCS_OK) return ucx_error(st, "querying the worker");
    if (attr.max_am_header < kResponseBytes + kMaxMessageBytes)
      return failed_precondition(
          fmt::format("UCX allows active-message headers of {} bytes; the KV protocol "
                      "needs {}",
                      attr.max_am_header, kResponseBytes + kMaxMessageBytes));
    return w;
  }

  ~UcxWorker() {
    if (worker_ != nullptr) ucx().ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucx().ucp_cleanup(context_);
  }
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;

  ucp_worker_h get() const { return worker_; }

  Status set_am_handler(unsigned id, ucp_am_recv_callback_t cb, void* arg) {
    ucp_am_handler_param_t p{};
    p.field_mask =
        UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    p.id = id;
    p.cb = cb;
    p.arg = arg;
    const ucs_status_t st = ucx().ucp_worker_set_am_recv_handler(worker_, &p);
    return st == UCS_OK ? ok_status() : ucx_error(st, "setting an active-message handler");
  }

  // Progresses until nothing is left to do; whether anything was (callbacks may have run).
  bool progress() {
    bool any = false;
    while (ucx().ucp_worker_progress(worker_) != 0) any = true;
    return any;
  }

  // Progresses; if nothing happened, sleeps until the worker has an event, `wake_fd` is readable,
  // or timeout_ms (-1: no limit) has passed. Returns at once after progress: its callbacks may
  // have left work for the caller, which must look before it waits again.
  void wait(int timeout_ms, int wake_fd = -1) {
    if (progress()) return;
    if (ucx().ucp_worker_arm(worker_) == UCS_ERR_BUSY) return;  // events came in meanwhile
    pollfd fds[2] = {{efd_, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    (void)::poll(fds, wake_fd >= 0 ? 2 : 1, timeout_ms);
  }

  // Closes an endpoint (force: nothing in flight is flushed) and progresses until it is gone.
  void close_endpoint(ucp_ep_h ep) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucx().ucp_ep_close_nbx(ep, &p);
    if (req == nullptr || UCS_PTR_IS_ERR(req)) return;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (ucx().ucp_request_check_status(req) == UCS_INPROGRESS &&
           std::chrono::steady_clock::now() < deadline)
      wait(10);
    ucx().ucp_request_free(req);
  }

 private:
  UcxWorker() = default;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
};

StatusOr<sockaddr_storage> resolve(const HostPort& where, socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(where.port);
  const int rc = ::getaddrinfo(where.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr)
    return unavailable(fmt::format("cannot resolve '{}': {}", where.host, ::gai_strerror(rc)));
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  ::freeaddrinfo(res);
  return ss;
}

// Completion of one UCX request, written by its callback. On the heap: a request that cannot be
// cancelled in time is abandoned with its state (the callback may still run later).
struct OpState {
  bool done = false;
  ucs_status_t status = UCS_OK;
};

void on_op_done(void* user_data, ucs_status_t status) {
  auto* op = static_cast<OpState*>(user_data);
  op->done = true;
  op->status = status;
}

class UcxSendPool final : public CoreSendPool {
 public:
  static StatusOr<std::unique_ptr<KvSendPool>> create(const KvTransportOptions& options) {
    PD_ASSIGN_OR_RETURN(HostPort listen, parse_host_port(options.tcp_listen, true));
    PD_ASSIGN_OR_RETURN(std::string host,
                        advertised_kv_host(options.tcp_listen, listen, options.tcp_advertise_host));
    auto pool = std::unique_ptr<UcxSendPool>(new UcxSendPool(options.io_timeout_ms));
    PD_ASSIGN_OR_RETURN(pool->memory_,
                        AnonymousMemory::create(options.pool_capacity_bytes, options.prefault_pool));
    pool->core_ = std::make_unique<SendPoolCore>(core_config(options), pool->memory_.data());
    PD_ASSIGN_OR_RETURN(pool->worker_, UcxWorker::create());
    PD_RETURN_IF_ERROR(pool->worker_->set_am_handler(kAmRequest, &UcxSendPool::on_request, pool.get()));

    socklen_t len = 0;
    PD_ASSIGN_OR_RETURN(sockaddr_storage addr, resolve(listen, &len));
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    lp.sockaddr.addrlen = len;
    lp.conn_handler.cb = &UcxSendPool::on_connection;
    lp.conn_handler.arg = pool.get();
    ucs_status_t st = ucx().ucp_listener_create(pool->worker_->get(), &lp, &pool->listener_);
    if (st != UCS_OK) return ucx_error(st, fmt::format("listening at {}", options.tcp_listen));
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    st = ucx().ucp_listener_query(pool->listener_, &la);
    if (st != UCS_OK) return ucx_error(st, "querying the listener");
    const auto* sa = reinterpret_cast<const sockaddr*>(&la.sockaddr);
    const uint16_t port =
        ntohs(sa->sa_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(sa)->sin6_port
                                        : reinterpret_cast<const sockaddr_in*>(sa)->sin_port);
    pool->endpoint_ = format_host_port(host, port);
    PD_ASSIGN_OR_RETURN(pool->wake_, WakePipe::create());
    pool->thread_ = std::thread([p = pool.get()] { p->loop(); });
    return std::unique_ptr<KvSendPool>(std::move(pool));
  }

  ~UcxSendPool() override {
    stop_.store(true);
    wake_.signal();
    if (thread_.joinable()) thread_.join();
    if (worker_ == nullptr) return;
    // Sends still in flight end with the endpoints; their buffers are unpinned as they complete.
    for (ucp_ep_h ep : eps_) worker_->close_endpoint(ep);
    for (Send& s : sends_) {
      if (s.request != nullptr && !s.op.done) ucx().ucp_request_cancel(worker_->get(), s.request);
    }
    worker_->progress();
    finish_sends();
    for (Send& s : sends_) {  // still not complete: given up on (their callbacks cannot run any more)
      if (s.pinned) core_->unpin(s.buffer_id);
    }
    for (ucp_conn_request_h r : conn_requests_) ucx().ucp_listener_reject(listener_, r);
    if (listener_ != nullptr) ucx().ucp_listener_destroy(listener_);
    worker_.reset();
  }

  TransportKind kind() const override { return TransportKind::kUcx; }
  std::span<uint8_t> host_memory() const override { return {memory_.data(), memory_.size()}; }
  std::string endpoint() const override { return endpoint_; }

  StatusOr<KvHandle> expose_paged(const PagedKvView&, std::span<const int32_t>, int32_t, uint32_t) override {
    return unimplemented(
        "the ucx transport moves contiguous buffers only (the block-fixed baseline is on tcp "
        "and shm)");
  }

 private:
  struct Queued {
    ucp_ep_h reply_ep = nullptr;
    StatusOr<Request> request;
  };
  // A response in flight: its header must live until UCX is done with it.
  struct Send {
    std::vector<uint8_t> header;
    void* request = nullptr;  // UCX's, freed when done
    ucp_ep_h ep = nullptr;
    std::chrono::steady_clock::time_point deadline;  // then its endpoint is closed (it unpins)
    uint32_t buffer_id = 0;
    bool pinned = false;
    OpState op;
  };

  explicit UcxSendPool(int64_t io_timeout_ms) : io_timeout_ms_(io_timeout_ms) {}

  static void on_connection(ucp_conn_request_h request, void* arg) {
    static_cast<UcxSendPool*>(arg)->conn_requests_.push_back(request);
  }

  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t) {
    static_cast<UcxSendPool*>(arg)->broken_.insert(ep);
  }

  static ucs_status_t on_request(void* arg, const void* header, size_t header_length, void*, size_t length,
                                 const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxSendPool*>(arg);
    Queued q{nullptr, decode_request({static_cast<const uint8_t*>(header), header_length})};
    if (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) q.reply_ep = param->reply_ep;
    if (q.request.ok() && length != 0) q.request = data_loss("KV request carries data");
    if (q.reply_ep == nullptr) {
      self->core_->count_pull(false);
      PD_LOG_WARN("KV server at {}: a request without a reply endpoint; dropped", self->endpoint_);
    } else {
      self->queued_.push_back(std::move(q));
    }
    return UCS_OK;  // any data it carried is dropped
  }

  void loop() {
    while (!stop_.load()) {
      worker_->progress();
      accept_connections();
      for (Queued& q : queued_) {
        if (!eps_.contains(q.reply_ep) || broken_.contains(q.reply_ep)) continue;
        serve(q);
      }
      queued_.clear();
      expire_sends();
      close_broken();
      finish_sends();
      worker_->wait(1000, wake_.fd());
    }
  }

  void accept_connections() {
    for (ucp_conn_request_h r : conn_requests_) {
      if (eps_.size() >= kMaxConnections) {
        PD_LOG_WARN("KV server at {}: {} connections open, refusing another", endpoint_, eps_.size());
        ucx().ucp_listener_reject(listener_, r);
        continue;
      }
      ucp_ep_params_t p{};
      p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                     UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
      p.conn_request = r;
      p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      p.err_handler.cb = &UcxSendPool::on_ep_error;
      p.err_handler.arg = this;
      ucp_ep_h ep = nullptr;
      const ucs_status_t st = ucx().ucp_ep_create(worker_->get(), &p, &ep);
      if (st != UCS_OK) {
        PD_LOG_WARN("KV server at {}: accepting a connection: {}", endpoint_, ucx().ucs_status_string(st));
        continue;
      }
      eps_.insert(ep);
    }
    conn_requests_.clear();
  }

  // Closing progresses the worker, whose callbacks may break more endpoints meanwhile.
  void close_broken() {
    while (!broken_.empty()) {
      const std::unordered_set<ucp_ep_h> broken = std::exchange(broken_, {});
      for (ucp_ep_h ep : broken) {
        if (eps_.erase(ep) != 0) worker_->close_endpoint(ep);
      }
    }
  }

  // A response the decode has not taken within the I/O timeout (a stalled or stopped peer) would
  // keep its buffer pinned, and release() waits for pins: its endpoint is closed, which fails it.
  void expire_sends() {
    const auto now = std::chrono::steady_clock::now();
    for (const Send& s : sends_) {
      if (!s.op.done && now > s.deadline) {
        PD_LOG_WARN("KV server at {}: a decode took no response for {} ms; closing its connection", endpoint_,
                    io_timeout_ms_);
        broken_.insert(s.ep);
      }
    }
  }

  // Answers one request: the buffer's header and body, or the reason it cannot be pulled.
  void serve(const Queued& q) {
    Send& s = sends_.emplace_back();
    s.ep = q.reply_ep;
    s.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(io_timeout_ms_);
    Response resp;
    std::span<const uint8_t> bytes;
    Status refused = q.request.status();
    if (refused.ok()) {
      resp.sequence = q.request->sequence;
      StatusOr<PinnedBuffer> pinned =
          core_->pin({q.request->buffer_id, q.request->generation}, KvTransferMode::kContiguous);
      refused = pinned.status();
      if (pinned.ok()) {
        s.pinned = true;
        s.buffer_id = q.request->buffer_id;
        bytes = pinned->bytes;
      }
    } else {
      PD_LOG_WARN("KV server at {}: {}", endpoint_, refused.message());
    }
    std::span<const uint8_t> after_head;  // what follows the response in the AM header
    std::string message;
    if (s.pinned) {
      resp.payload_bytes = bytes.size();
      after_head = bytes.first(kKvWireHeaderBytes);
    } else {
      resp.code = static_cast<uint32_t>(refused.code());
      message = refused.message().substr(0, kMaxMessageBytes);
      resp.message_bytes = static_cast<uint32_t>(message.size());
      after_head = {reinterpret_cast<const uint8_t*>(message.data()), message.size()};
    }
    const auto head = encode_response(resp);
    s.header.assign(head.begin(), head.end());
    s.header.insert(s.header.end(), after_head.begin(), after_head.end());
    const std::span<const uint8_t> body =
        s.pinned ? bytes.subspan(kKvWireHeaderBytes) : std::span<const uint8_t>();
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE |
                     UCP_OP_ATTR_FIELD_FLAGS;
    p.cb.send = [](void*, ucs_status_t status, void* user_data) { on_op_done(user_data, status); };
    p.user_data = &s.op;
    p.datatype = ucp_dt_make_contig(1);
    // Large bodies by rendezvous: the decode receives them in one piece into its staging buffer
    // (zero-copy where the wire allows), instead of UCX cutting them into eager fragments.
    p.flags = body.size() >= kRendezvousBytes ? UCP_AM_SEND_FLAG_RNDV : 0;
    void* req = ucx().ucp_am_send_nbx(q.reply_ep, kAmResponse, s.header.data(), s.header.size(), body.data(),
                                      body.size(), &p);
    if (req == nullptr)
      s.op.done = true;
    else if (UCS_PTR_IS_ERR(req))
      s.op = {true, UCS_PTR_STATUS(req)};
    else
      s.request = req;
  }

  // Unpins and counts the sends that have completed.
  void finish_sends() {
    for (auto it = sends_.begin(); it != sends_.end();) {
      if (!it->op.done) {
        ++it;
        continue;
      }
      if (it->request != nullptr) ucx().ucp_request_free(it->request);
      core_->count_pull(it->pinned && it->op.status == UCS_OK);  // before unpin: release() waits for it
      if (it->pinned) core_->unpin(it->buffer_id);
      if (it->op.status != UCS_OK)
        PD_LOG_WARN("KV server at {}: sending a response: {}", endpoint_,
                    ucx().ucs_status_string(it->op.status));
      it = sends_.erase(it);
    }
  }

  const int64_t io_timeout_ms_;
  AnonymousMemory memory_;
  std::unique_ptr<UcxWorker> worker_;
  ucp_listener_h listener_ = nullptr;
  std::string endpoint_;
  WakePipe wake_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  // The server thread's own (and the callbacks', which run inside its progress calls).
  std::vector<ucp_conn_request_h> conn_requests_;
  std::vector<Queued> queued_;
  std::unordered_set<ucp_ep_h> eps_;
  std::unordered_set<ucp_ep_h> broken_;
  std::list<Send> sends_;
};

class UcxPuller final : public QueuedPuller {
 public:
  explicit UcxPuller(const KvTransportOptions& options)
      : QueuedPuller(TransportKind::kUcx), io_timeout_ms_(options.io_timeout_ms) {}
  ~UcxPuller() override {
    stop();
    if (worker_ == nullptr) return;
    drop_response();
    for (auto& [endpoint, ep] : eps_) worker_->close_endpoint(ep);
  }

 protected:
  StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) override {
    if (handle.mode != KvTransferMode::kContiguous)
      return unimplemented("the ucx transport moves contiguous buffers only");
    if (worker_ == nullptr) {
      PD_ASSIGN_OR_RETURN(std::unique_ptr<UcxWorker> w, UcxWorker::create());
      PD_RETURN_IF_ERROR(w->set_am_handler(kAmResponse, &UcxPuller::on_response, this));
      worker_ = std::move(w);
    }
    const std::string peer = fmt::format("prefill at {}", handle.endpoint);
    connection_failed_ = false;
    StatusOr<PullResult> r = pull_once(handle, target, peer);
    if (worker_abandoned_) {
      abandon_worker();
      return r;
    }
    drop_response();
    // A refused pull leaves the connection usable; one that broke or timed out is replaced.
    if (connection_failed_) forget_endpoint(handle.endpoint);
    return r;
  }

 private:
  struct Pending {
    bool arrived = false;
    std::vector<uint8_t> header;
    bool rndv = false;
    void* desc = nullptr;             // rndv: UCX's descriptor; persistent eager: the data
    bool persistent = false;          // desc is eager data kept past the callback
    std::vector<uint8_t> eager_copy;  // eager data that was not persistent
    size_t length = 0;
  };

  static ucs_status_t on_response(void* arg, const void* header, size_t header_length, void* data,
                                  size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxPuller*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    const bool persistent = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) != 0;
    // Only the pull in flight wants a response; anything else (a pull that timed out) is dropped.
    uint64_t seq = 0;
    if (header_length >= kResponseBytes) seq = load_le<uint64_t>(static_cast<const uint8_t*>(header) + 24);
    if (self->pending_.arrived || seq != self->sequence_ ||
        header_length > kResponseBytes + kMaxMessageBytes + kKvWireHeaderBytes)
      return rndv ? UCS_ERR_CANCELED : UCS_OK;
    Pending& p = self->pending_;
    p.arrived = true;
    const auto* h = static_cast<const uint8_t*>(header);
    p.header.assign(h, h + header_length);
    p.rndv = rndv;
    p.length = length;
    if (rndv || persistent) {
      p.desc = data;
      p.persistent = persistent;
      return UCS_INPROGRESS;
    }
    const auto* d = static_cast<const uint8_t*>(data);
    if (length != 0) p.eager_copy.assign(d, d + length);
    return UCS_OK;
  }

  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<UcxPuller*>(arg);
    self->broken_[ep] = status;
  }

  // Releases a response's data that was kept and not received (a refused rendezvous: the release
  // answers the prefill, whose send then completes and unpins; progressed now, not at the next pull).
  void drop_response() {
    if (pending_.desc != nullptr) {
      ucx().ucp_am_data_release(worker_->get(), pending_.desc);
      worker_->progress();
    }
    pending_ = Pending{};
  }

  StatusOr<ucp_ep_h> endpoint_for(const std::string& endpoint) {
    if (auto it = eps_.find(endpoint); it != eps_.end()) return it->second;
    PD_ASSIGN_OR_RETURN(HostPort where, parse_host_port(endpoint, false));
    socklen_t len = 0;
    PD_ASSIGN_OR_RETURN(sockaddr_storage addr, resolve(where, &len));
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
    p.sockaddr.addrlen = len;
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.err_handler.cb = &UcxPuller::on_ep_error;
    p.err_handler.arg = this;
    ucp_ep_h ep = nullptr;
    const ucs_status_t st = ucx().ucp_ep_create(worker_->get(), &p, &ep);
    if (st != UCS_OK) return ucx_error(st, fmt::format("connecting to {}", endpoint));
    if (eps_.size() >= kMaxIdleEndpoints) {
      for (auto& [name, old] : eps_) {
        broken_.erase(old);  // UCX may hand the same address to a new endpoint
        worker_->close_endpoint(old);
      }
      eps_.clear();
    }
    eps_[endpoint] = ep;
    return ep;
  }

  void forget_endpoint(const std::string& endpoint) {
    drop_response();
    auto it = eps_.find(endpoint);
    if (it != eps_.end()) close_now(it->second);
  }

  // After a request that would not end: nothing the worker may still write to is freed or reused.
  void abandon_worker() {
    (void)worker_.release();
    (void)new AnonymousMemory(std::move(staging_));
    (void)request_.release();
    request_ = std::make_unique<std::array<uint8_t, kRequestBytes>>();
    eps_.clear();
    broken_.clear();
    pending_ = Pending{};  // its descriptor belongs to the abandoned worker
    worker_abandoned_ = false;
  }

  // Closes an endpoint now and forgets it.
  void close_now(ucp_ep_h ep) {
    for (auto it = eps_.begin(); it != eps_.end(); ++it) {
      if (it->second == ep) {
        eps_.erase(it);
        break;
      }
    }
    broken_.erase(ep);
    worker_->close_endpoint(ep);
  }

  // Progresses until done() or the I/O timeout; the error names `what`. NOTE: a deadline for the
  // whole wait, not tcp's "silent this long": UCX's progress reports work (keepalives, retries to a
  // stopped peer) that is no sign of the transfer moving, so it cannot tell silence apart.
  template <typename Done>
  Status wait_for(ucp_ep_h ep, Done&& done, std::string_view what) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(io_timeout_ms_);
    for (;;) {
      worker_->progress();
      if (done()) return ok_status();
      if (auto it = broken_.find(ep); it != broken_.end()) {
        connection_failed_ = true;
        return ucx_error(it->second, fmt::format("the connection broke while waiting for {}", what));
      }
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        connection_failed_ = true;
        return Status(StatusCode::kDeadlineExceeded, fmt::format("no {} within {} ms", what, io_timeout_ms_));
      }
      worker_->wait(static_cast<int>(std::min<int64_t>(left.count(), 100)));
    }
  }

  // Waits for a UCX request (null: complete already; an error pointer: failed) and frees it. One
  // that does not complete in time is cancelled; if even that does not end it, its connection is
  // closed, and if it still lives it is abandoned with its state.
  Status finish_request(ucp_ep_h ep, void* req, std::unique_ptr<OpState> op, std::string_view what) {
    if (req == nullptr) return ok_status();
    if (UCS_PTR_IS_ERR(req)) {
      connection_failed_ = true;
      return ucx_error(UCS_PTR_STATUS(req), what);
    }
    Status st = wait_for(
        ep, [&op] { return op->done; }, what);
    if (!st.ok()) {
      ucx().ucp_request_cancel(worker_->get(), req);
      worker_->progress();
      if (!op->done) close_now(ep);
    }
    if (!op->done) {
      // The request may still write (a NIC into the staging buffer): the whole worker, its
      // buffers and the request's state are given up on (leaked), and the next pull starts anew.
      PD_LOG_ERROR(
          "UCX request for {} did not end after cancelling it and closing its connection; this "
          "puller's UCX worker is abandoned",
          what);
      worker_abandoned_ = true;
      (void)op.release();
      return st;
    }
    ucx().ucp_request_free(req);
    PD_RETURN_IF_ERROR(st);
    if (op->status == UCS_OK) return ok_status();
    connection_failed_ = true;
    return ucx_error(op->status, what);
  }

  StatusOr<PullResult> pull_once(const KvHandle& handle, const KvScatterTarget& target,
                                 const std::string& peer) {
    PD_ASSIGN_OR_RETURN(ucp_ep_h ep, endpoint_for(handle.endpoint));
    drop_response();
    *request_ = encode_request(Request{handle.buffer_id, handle.generation, ++sequence_});
    auto sent = std::make_unique<OpState>();
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    p.cb.send = [](void*, ucs_status_t status, void* user_data) { on_op_done(user_data, status); };
    p.user_data = sent.get();
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    void* req = ucx().ucp_am_send_nbx(ep, kAmRequest, request_->data(), request_->size(), nullptr, 0, &p);
    PD_RETURN_IF_ERROR(finish_request(ep, req, std::move(sent), "sending the KV request").with_context(peer));
    PD_RETURN_IF_ERROR(wait_for(
                           ep, [this] { return pending_.arrived; }, "the KV response")
                           .with_context(peer));

    StatusOr<Response> decoded = decode_response(pending_.header);
    if (!decoded.ok()) return decoded.status().with_context(peer);
    const Response resp = *decoded;
    if (resp.code != 0) {
      const std::string message(pending_.header.begin() + kResponseBytes, pending_.header.end());
      drop_response();
      return peer_status(resp.code, message, peer);
    }
    StatusOr<KvWireHeader> header =
        decode_kv_wire_header(std::span<const uint8_t>(pending_.header).subspan(kResponseBytes));
    Status checked =
        header.ok() ? check_header_for_pull(*header, handle, target, resp.payload_bytes) : header.status();
    if (checked.ok() && pending_.length != header->body_bytes)
      checked = data_loss(fmt::format("KV response carries {} body bytes, its header says {}",
                                      pending_.length, header->body_bytes));
    if (!checked.ok()) {
      drop_response();
      return checked.with_context(peer);
    }
    const uint8_t* src = nullptr;
    if (pending_.rndv) {
      // Into one contiguous staging buffer, then scattered into the blocks: a receive straight into
      // an iov of the block runs measured 15-45 % slower with UCX 1.13 on one host (36-45 ms vs
      // 31-33 ms for 64 MiB).
      if (staging_.size() < header->body_bytes) {
        staging_ = AnonymousMemory();  // the old one first
        PD_ASSIGN_OR_RETURN(staging_, AnonymousMemory::create(header->body_bytes, /*prefault=*/true));
      }
      auto received = std::make_unique<OpState>();
      ucp_request_param_t rp{};
      rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
      rp.cb.recv_am = [](void*, ucs_status_t status, size_t, void* user_data) {
        on_op_done(user_data, status);
      };
      rp.user_data = received.get();
      rp.datatype = ucp_dt_make_contig(1);
      void* desc = pending_.desc;
      pending_.desc = nullptr;  // UCX owns it from here
      void* rreq = ucx().ucp_am_recv_data_nbx(worker_->get(), desc, staging_.data(), header->body_bytes, &rp);
      PD_RETURN_IF_ERROR(finish_request(ep, rreq, std::move(received), "the KV body").with_context(peer));
      src = staging_.data();
    } else {
      src = pending_.persistent ? static_cast<const uint8_t*>(pending_.desc) : pending_.eager_copy.data();
    }
    PD_RETURN_IF_ERROR(
        scatter_kv({src, header->body_bytes}, header->num_tokens, target.view, target.block_table)
            .with_context(peer));
    if (staging_.size() > kKeptStagingBytes) staging_ = AnonymousMemory();  // a rare huge KV: not kept
    drop_response();
    if (header->flags & kKvWireBodyChecksum) {
      const uint64_t computed = scattered_body_checksum(target.view, target.block_table, header->num_tokens);
      if (computed != header->body_checksum)
        return data_loss(
            fmt::format("{}: KV body checksum 0x{:016x} != header's 0x{:016x}: body corrupted in transit",
                        peer, computed, header->body_checksum));
    }
    return PullResult{header->num_tokens, resp.payload_bytes};
  }

  const int64_t io_timeout_ms_;
  // The progress thread's own (and the callbacks', which run inside its progress calls).
  std::unique_ptr<UcxWorker> worker_;
  std::unordered_map<std::string, ucp_ep_h> eps_;
  std::unordered_map<ucp_ep_h, ucs_status_t> broken_;
  uint64_t sequence_ = 0;
  bool connection_failed_ = false;
  AnonymousMemory staging_;  // rendezvous bodies land here (huge pages advised), then are scattered // the
                             // pull in flight met a UCX error: reconnect for the next
  // The request in flight (UCX may read it until sent).
  std::unique_ptr<std::array<uint8_t, kRequestBytes>> request_ =
      std::make_unique<std::array<uint8_t, kRequestBytes>>();
  bool worker_abandoned_ = false;
  Pending pending_;
};

}  // namespace

StatusOr<std::unique_ptr<KvSendPool>> make_ucx_pool(const KvTransportOptions& options) {
  return UcxSendPool::create(options);
}

StatusOr<std::unique_ptr<KvPuller>> make_ucx_puller(const KvTransportOptions& options) {
  PD_RETURN_IF_ERROR(ucx_library().status);  // said at start-up, not at the first pull
  return std::unique_ptr<KvPuller>(std::make_unique<UcxPuller>(options));
}

}  // namespace pdserve::transfer_internal

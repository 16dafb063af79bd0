// pdserve_transfer_bench: moving one request's KV from a prefill instance's paged memory to a
// decode instance's paged memory, as deployed — prefill and decode are separate processes (the
// prefill is a forked child). For each transport (shm, tcp over loopback), KV size and block
// size it measures, as medians over --reps repetitions after one warm-up (ucx too, in builds with
// libucx: contiguous only, it offers no block-fixed mode):
//
//   gather      prefill: publish_kv() — acquire a send buffer, gather the blocks into it
//               (contiguous, wire order), header, commit
//   contiguous  decode: pull() of that buffer — header exchange and check, the transfer and the
//               RecvScatter into the decode's blocks (a different fragmented block table, same
//               block size), from submit to done
//   block-fixed the P/D-Serve baseline: the prefill exposes its blocks, the decode pulls one
//               message and one confirmation per (block, layer), scattering each
//   raw         the transport's own ceiling for the same bytes, contiguous, no KV logic: shm, a
//               memcpy from a shared mapping written by the prefill process into private memory;
//               tcp, one bulk send over a loopback connection with the same socket options into
//               one buffer; ucx, one active message of the bytes by rendezvous into one buffer
//
// Both processes' KV memory and buffers are prefaulted (huge pages advised) and the contents
// random; every configuration's first timed pull is verified against the prefill's body checksum.
// Progress goes to stderr, a table to stdout, and --json FILE writes every measurement.
#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#ifdef PDSERVE_HAVE_UCX
#include <ucp/api/ucp.h>
#endif

#include "transfer/kv_layout.h"
#include "transfer/kv_transport.h"
#include "transfer/kv_wire.h"
// NOTE: the raw-tcp ceiling uses the transport's own socket helpers, so it runs with exactly the
// socket options the tcp transport uses.
#include "transfer/net.h"

namespace pdserve {
namespace {

using Clock = std::chrono::steady_clock;
using transfer_internal::Fd;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "transfer_bench: %s\n", what.c_str());
  std::exit(1);
}

template <typename T>
T check(StatusOr<T> v, std::string_view what) {
  if (!v.ok()) die(fmt::format("{}: {}", what, v.status().to_string()));
  return std::move(v).value();
}

void check(const Status& s, std::string_view what) {
  if (!s.ok()) die(fmt::format("{}: {}", what, s.to_string()));
}

// Anonymous memory, huge pages advised, prefaulted.
struct Arena {
  uint8_t* data = nullptr;
  size_t bytes = 0;
  explicit Arena(size_t n) : bytes(n) {
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die(fmt::format("cannot map {} bytes", n));
    ::madvise(p, n, MADV_HUGEPAGE);
    data = static_cast<uint8_t*>(p);
    std::memset(data, 0, n);
  }
  ~Arena() { ::munmap(data, bytes); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
};

void fill_random(uint8_t* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<uint8_t>(i);
}

struct Shape {
  KvLayout layout;
  uint64_t kv_bytes = 0;
  int32_t block_size = 0;
  int32_t tokens = 0;
  int32_t num_blocks = 0;  // in the view: the sequence's blocks plus a quarter more, shuffled
};

Shape make_shape(const KvLayout& layout, uint64_t kv_bytes, int32_t block_size) {
  Shape s;
  s.layout = layout;
  s.block_size = block_size;
  s.tokens = static_cast<int32_t>(kv_bytes / layout.token_bytes());
  s.kv_bytes = layout.body_bytes(s.tokens);
  const int32_t needed = (s.tokens + block_size - 1) / block_size;
  s.num_blocks = needed + needed / 4 + 1;
  return s;
}

PagedKvView view_in(const Arena& arena, const Shape& s) {
  PagedKvView v;
  v.layout = s.layout;
  v.block_size = s.block_size;
  v.num_blocks = s.num_blocks;
  v.block_bytes = v.used_block_bytes();
  if (v.block_bytes * static_cast<size_t>(v.num_blocks) > arena.bytes) die("arena too small");
  v.base = arena.data;
  return v;
}

std::vector<int32_t> shuffled_table(const Shape& s, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(s.num_blocks));
  std::iota(t.begin(), t.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(t.begin(), t.end(), rng);
  t.resize(static_cast<size_t>((s.tokens + s.block_size - 1) / s.block_size));
  return t;
}

size_t arena_bytes(const KvLayout& layout, uint64_t max_kv_bytes, const std::vector<int32_t>& block_sizes) {
  size_t most = 0;
  for (int32_t bs : block_sizes) {
    const Shape s = make_shape(layout, max_kv_bytes, bs);
    most =
        std::max(most, static_cast<size_t>(s.num_blocks) * 2 * layout.num_layers * bs * layout.row_bytes());
  }
  return most;
}

// The control channel between the decode (parent) and the prefill (child).
enum class Op : uint32_t {
  kStartTransport,
  kConfig,
  kPublish,
  kExpose,
  kRelease,
  kRawSend,
  kStopTransport,
  kExit
};

struct Command {
  Op op = Op::kExit;
  uint32_t transport = 0;
  uint64_t kv_bytes = 0;
  int32_t block_size = 0;
  uint32_t want_checksum = 0;
};

struct Reply {
  int32_t ok = 0;
  double gather_ms = 0;
  uint64_t checksum = 0;
  char text[512] = {};
};

void write_exact(int fd, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, b, n);
    if (w <= 0) die("control channel write failed");
    b += w;
    n -= static_cast<size_t>(w);
  }
}

void read_exact(int fd, void* p, size_t n) {
  auto* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    const ssize_t r = ::read(fd, b, n);
    if (r <= 0) die("control channel read failed (the prefill process died?)");
    b += r;
    n -= static_cast<size_t>(r);
  }
}

Reply reply_with(std::string_view text, int32_t ok = 1) {
  Reply r;
  r.ok = ok;
  const size_t n = std::min(text.size(), sizeof r.text - 1);
  std::memcpy(r.text, text.data(), n);
  return r;
}

#ifdef PDSERVE_HAVE_UCX
// The raw-ucx ceiling: one UCX worker each side (the prefill listens, the decode connects), and the
// bytes sent as one active message by rendezvous into one buffer. Busy progress: a benchmark. Its
// endpoints handle peer failures as the transport's do (UCX then leaves out transports that cannot,
// such as cross-memory attach on one host: the same choice the transport gets).
class RawUcx {
 public:
  RawUcx() {
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM;
    ucp_config_t* config = nullptr;
    if (ucp_config_read(nullptr, nullptr, &config) != UCS_OK) die("raw ucx: config");
    if (ucp_init(&params, config, &context_) != UCS_OK) die("raw ucx: init");
    ucp_config_release(config);
    ucp_worker_params_t wp{};
    if (ucp_worker_create(context_, &wp, &worker_) != UCS_OK) die("raw ucx: worker");
    ucp_am_handler_param_t h{};
    h.field_mask =
        UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    h.id = kAmId;
    h.cb = &RawUcx::on_message;
    h.arg = this;
    if (ucp_worker_set_am_recv_handler(worker_, &h) != UCS_OK) die("raw ucx: handler");
    h.id = kHelloId;
    h.cb = [](void* arg, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) {
      static_cast<RawUcx*>(arg)->hello_ = true;
      return UCS_OK;
    };
    if (ucp_worker_set_am_recv_handler(worker_, &h) != UCS_OK) die("raw ucx: handler");
  }
  ~RawUcx() {
    if (hello_request_ != nullptr) wait(hello_request_);
    if (ep_ != nullptr) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(ep_, &p);  // its status does not matter any more
      if (req != nullptr && !UCS_PTR_IS_ERR(req)) {
        while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker_);
        ucp_request_free(req);
      }
    }
    if (listener_ != nullptr) ucp_listener_destroy(listener_);
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
  }
  RawUcx(const RawUcx&) = delete;
  RawUcx& operator=(const RawUcx&) = delete;

  // Prefill: listens on loopback; returns the port.
  uint16_t listen() {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&a);
    lp.sockaddr.addrlen = sizeof a;
    lp.conn_handler.cb = [](ucp_conn_request_h r, void* arg) { static_cast<RawUcx*>(arg)->conn_ = r; };
    lp.conn_handler.arg = this;
    if (ucp_listener_create(worker_, &lp, &listener_) != UCS_OK) die("raw ucx: listen");
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    if (ucp_listener_query(listener_, &la) != UCS_OK) die("raw ucx: listener address");
    return ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  }
  // Decode: connects to the prefill's port.
  void connect(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    ucp_ep_params_t p{};
    p.field_mask =
        UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as the transport's endpoints
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&a);
    p.sockaddr.addrlen = sizeof a;
    if (ucp_ep_create(worker_, &p, &ep_) != UCS_OK) die("raw ucx: connect");
    // A first small message, so the connection is wired up before the prefill's first rendezvous
    // (UCX 1.13 asserts on a rendezvous send replayed at the end of wire-up).
    // Not waited for here: it completes while the prefill progresses too (the first send()).
    ucp_request_param_t hp{};
    hello_request_ = ucp_am_send_nbx(ep_, kHelloId, nullptr, 0, nullptr, 0, &hp);
    if (UCS_PTR_IS_ERR(hello_request_)) die("raw ucx: hello");
  }
  // Prefill: sends `bytes` from `data` to the connected decode (accepting it on first use).
  void send(const uint8_t* data, size_t bytes) {
    while (ep_ == nullptr || !hello_) {
      ucp_worker_progress(worker_);
      if (ep_ == nullptr && conn_ != nullptr) {
        ucp_ep_params_t p{};
        p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
        p.conn_request = conn_;
        p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
        if (ucp_ep_create(worker_, &p, &ep_) != UCS_OK) die("raw ucx: accept");
      }
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_RNDV;
    wait(ucp_am_send_nbx(ep_, kAmId, nullptr, 0, data, bytes, &p));
  }
  // Decode: receives the next message into `dst`.
  void receive(uint8_t* dst, size_t bytes) {
    if (hello_request_ != nullptr) {
      wait(hello_request_);
      hello_request_ = nullptr;
    }
    while (desc_ == nullptr) ucp_worker_progress(worker_);
    if (length_ != bytes) die("raw ucx: unexpected message size");
    ucp_request_param_t p{};
    void* desc = desc_;
    desc_ = nullptr;
    if (!rndv_) {  // arrived eagerly: already here
      std::memcpy(dst, desc, bytes);
      ucp_am_data_release(worker_, desc);
      return;
    }
    wait(ucp_am_recv_data_nbx(worker_, desc, dst, bytes, &p));
  }

 private:
  static constexpr unsigned kAmId = 7;
  static constexpr unsigned kHelloId = 8;
  static ucs_status_t on_message(void* arg, const void*, size_t, void* data, size_t length,
                                 const ucp_am_recv_param_t* param) {
    auto* self = static_cast<RawUcx*>(arg);
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    if (!rndv && !(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA))
      die("raw ucx: eager data that cannot be kept");
    self->desc_ = data;
    self->length_ = length;
    self->rndv_ = rndv;
    return UCS_INPROGRESS;
  }
  void wait(void* req) {
    if (req == nullptr) return;
    if (UCS_PTR_IS_ERR(req)) die(std::string("raw ucx: ") + ucs_status_string(UCS_PTR_STATUS(req)));
    while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker_);
    if (ucp_request_check_status(req) != UCS_OK) die("raw ucx: a transfer failed");
    ucp_request_free(req);
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  ucp_conn_request_h conn_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  void* desc_ = nullptr;
  size_t length_ = 0;
  bool rndv_ = false;
  bool hello_ = false;
  void* hello_request_ = nullptr;
};
#endif

struct Options {
  std::vector<std::string> transports = {"shm", "tcp"};
  std::vector<int64_t> sizes_mib = {1, 4, 16, 64, 256, 1024};
  std::vector<int32_t> block_sizes = {4, 16, 64, 256};
  int reps = 5;
  bool quick = false;
  int32_t num_layers = 32;
  int32_t kv_width = 1024;
  int tcp_buffer_bytes = 4 << 20;
  std::string json_path;
  int copy_threads = 0;
};

KvLayout bench_layout(const Options& o) { return KvLayout{0xbe7c4, KvDtype::kF16, o.num_layers, o.kv_width}; }

uint64_t max_kv_bytes(const Options& o) {
  return static_cast<uint64_t>(*std::max_element(o.sizes_mib.begin(), o.sizes_mib.end())) << 20;
}

KvTransportOptions transport_options(const Options& o) {
  KvTransportOptions t;
  t.pool_capacity_bytes = max_kv_bytes(o) + (uint64_t{4} << 20);
  t.max_buffers = 4;
  t.tcp_socket_buffer_bytes = o.tcp_buffer_bytes;
  t.io_timeout_ms = 60'000;
  t.shm_block_fixed_slot_bytes = uint64_t{4} << 20;
  return t;
}

// The prefill process: serves the parent's commands until kExit.
void run_prefill(int ctl, const Options& o) {
  const KvLayout layout = bench_layout(o);
  Arena arena(arena_bytes(layout, max_kv_bytes(o), o.block_sizes));
  fill_random(arena.data, arena.bytes, 12345);
  std::unique_ptr<KvSendPool> pool;
  Fd raw_listener;
  Fd raw_conn;
#ifdef PDSERVE_HAVE_UCX
  std::unique_ptr<RawUcx> raw_ucx;
#endif
  int raw_memfd = -1;
  uint8_t* raw_map = nullptr;
  size_t raw_map_bytes = 0;
  Shape shape;
  PagedKvView view;
  std::vector<int32_t> table;
  KvHandle handle;
  bool have_handle = false;

  for (;;) {
    Command c;
    read_exact(ctl, &c, sizeof c);
    Reply r = reply_with("");
    switch (c.op) {
      case Op::kStartTransport: {
        const TransportKind kind = static_cast<TransportKind>(c.transport);
        pool = check(make_send_pool(kind, transport_options(o)), "prefill pool");
        if (kind == TransportKind::kTcp) {
          uint16_t port = 0;
          raw_listener =
              check(transfer_internal::tcp_listen({"127.0.0.1", 0}, o.tcp_buffer_bytes, &port), "raw listen");
          r = reply_with(fmt::format("127.0.0.1:{}", port));
          write_exact(ctl, &r, sizeof r);
          raw_conn = Fd(::accept(raw_listener.get(), nullptr, nullptr));
          if (!raw_conn.valid()) die("raw accept failed");
          transfer_internal::set_socket_options(raw_conn.get(), o.tcp_buffer_bytes, 60'000);
          continue;
        }
#ifdef PDSERVE_HAVE_UCX
        if (kind == TransportKind::kUcx) {
          raw_ucx = std::make_unique<RawUcx>();
          r = reply_with(std::to_string(raw_ucx->listen()));
        }
#endif
        break;
      }
      case Op::kConfig: {
        shape = make_shape(layout, c.kv_bytes, c.block_size);
        view = view_in(arena, shape);
        table = shuffled_table(shape, 7 + c.kv_bytes + static_cast<uint64_t>(c.block_size));
        if (pool->kind() == TransportKind::kShm && raw_map_bytes != shape.kv_bytes) {
          // The raw-shm source: a shared file of the same size, written by this process.
          if (raw_map) ::munmap(raw_map, raw_map_bytes);
          if (raw_memfd >= 0) ::close(raw_memfd);
          raw_memfd = ::memfd_create("pdserve-bench-raw", MFD_CLOEXEC);
          raw_map_bytes = shape.kv_bytes;
          if (raw_memfd < 0 || ::ftruncate(raw_memfd, static_cast<off_t>(raw_map_bytes)) != 0)
            die("raw memfd");
          raw_map = static_cast<uint8_t*>(
              ::mmap(nullptr, raw_map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, raw_memfd, 0));
          if (raw_map == MAP_FAILED) die("raw memfd map");
          fill_random(raw_map, raw_map_bytes, 99);
        }
        if (pool->kind() == TransportKind::kShm)
          r = reply_with(fmt::format("/proc/{}/fd/{}", ::getpid(), raw_memfd));
        break;
      }
      case Op::kPublish: {
        const auto t0 = Clock::now();
        handle = check(publish_kv(*pool, view, table, shape.tokens), "publish_kv");
        r.gather_ms = ms_since(t0);
        have_handle = true;
        if (c.want_checksum) {
          std::vector<uint8_t> body(shape.kv_bytes);
          check(gather_kv(view, table, shape.tokens, body), "gather for checksum");
          r.checksum = XXH3_64bits(body.data(), body.size());
        }
        const std::string text = handle.to_string();
        std::memcpy(r.text, text.data(), std::min(text.size(), sizeof r.text - 1));
        break;
      }
      case Op::kExpose: {
        handle = check(pool->expose_paged(view, table, shape.tokens), "expose_paged");
        have_handle = true;
        const std::string text = handle.to_string();
        std::memcpy(r.text, text.data(), std::min(text.size(), sizeof r.text - 1));
        break;
      }
      case Op::kRelease:
        if (have_handle) check(pool->release(handle.ref()), "release");
        have_handle = false;
        break;
      case Op::kRawSend: {
#ifdef PDSERVE_HAVE_UCX
        if (raw_ucx) {
          raw_ucx->send(arena.data, c.kv_bytes);
          break;
        }
#endif
        uint8_t go = 0;
        check(transfer_internal::recv_all(raw_conn.get(), &go, 1, "raw go"), "raw go");
        check(transfer_internal::send_all(raw_conn.get(), arena.data, c.kv_bytes, "raw bytes"), "raw send");
        break;
      }
      case Op::kStopTransport:
#ifdef PDSERVE_HAVE_UCX
        raw_ucx.reset();
#endif
        raw_conn.reset();
        raw_listener.reset();
        pool.reset();
        break;
      case Op::kExit: return;
    }
    write_exact(ctl, &r, sizeof r);
  }
}

struct Row {
  std::string transport;
  uint64_t kv_bytes = 0;
  int32_t block_size = 0;
  int32_t tokens = 0;
  double gather_ms = 0;
  double contiguous_ms = 0;
  double contiguous_total_ms = 0;  // gather + contiguous, per repetition
  double block_fixed_ms = 0;
  double raw_ms = 0;
  std::vector<double> gather, contiguous, total, block_fixed, raw;
};

class Decode {
 public:
  Decode(int ctl, const Options& o)
      : ctl_(ctl),
        o_(o),
        layout_(bench_layout(o)),
        arena_(arena_bytes(layout_, max_kv_bytes(o), o.block_sizes)),
        raw_dst_(max_kv_bytes(o)),
        check_(max_kv_bytes(o)) {}

  std::vector<Row> run() {
    std::vector<Row> rows;
    for (const std::string& name : o_.transports) {
      const TransportKind kind = check(parse_transport_kind(name), "--transports");
      std::unique_ptr<KvPuller> puller = check(make_puller(kind, transport_options(o_)), "puller");
      Reply started = command({Op::kStartTransport, static_cast<uint32_t>(kind)});
      Fd raw;
      if (kind == TransportKind::kTcp) {
        auto where = check(transfer_internal::parse_host_port(started.text, false), "raw endpoint");
        raw = check(transfer_internal::tcp_connect(where, o_.tcp_buffer_bytes, 60'000), "raw connect");
        // The child answers kStartTransport before accepting; its accept happens now.
      }
#ifdef PDSERVE_HAVE_UCX
      if (kind == TransportKind::kUcx) {
        raw_ucx_ = std::make_unique<RawUcx>();
        raw_ucx_->connect(static_cast<uint16_t>(std::stoi(started.text)));
      }
#endif
      for (int64_t mib : o_.sizes_mib) {
        std::vector<double> raw_times;  // the same for every block size: measured once per size
        for (int32_t bs : o_.block_sizes) {
          rows.push_back(measure(kind, name, *puller, raw, static_cast<uint64_t>(mib) << 20, bs, &raw_times));
        }
      }
      command({Op::kStopTransport});
#ifdef PDSERVE_HAVE_UCX
      raw_ucx_.reset();
#endif
    }
    command({Op::kExit}, /*expect_reply=*/false);
    return rows;
  }

 private:
  Reply command(Command c, bool expect_reply = true) {
    write_exact(ctl_, &c, sizeof c);
    Reply r;
    if (expect_reply) read_exact(ctl_, &r, sizeof r);
    return r;
  }

  Row measure(TransportKind kind, const std::string& name, KvPuller& puller, const Fd& raw, uint64_t kv_bytes,
              int32_t bs, std::vector<double>* raw_times) {
    const Shape shape = make_shape(layout_, kv_bytes, bs);
    Row row;
    row.transport = name;
    row.kv_bytes = shape.kv_bytes;
    row.block_size = bs;
    row.tokens = shape.tokens;
    std::fprintf(stderr, "%s %6.0f MiB, %3d-token blocks (%d tokens): ", name.c_str(),
                 shape.kv_bytes / 1048576.0, bs, shape.tokens);
    std::fflush(stderr);
    Reply config = command({Op::kConfig, 0, kv_bytes, bs});
    const PagedKvView dst = view_in(arena_, shape);
    const std::vector<int32_t> dst_table = shuffled_table(shape, 1000 + kv_bytes + static_cast<uint64_t>(bs));
    const KvScatterTarget target{dst, dst_table, shape.tokens};

    const size_t dst_bytes = dst.block_bytes * static_cast<size_t>(dst.num_blocks);
    for (int rep = -1; rep < o_.reps; ++rep) {
      // The warm-up verifies both pulls into zeroed memory (so a pull that writes nothing fails).
      const bool verify = rep < 0;
      if (verify) std::memset(dst.base, 0, dst_bytes);
      // Contiguous.
      Reply pub = command({Op::kPublish, 0, 0, 0, verify ? 1u : 0u});
      const KvHandle h = check(KvHandle::parse(pub.text), "handle");
      auto t0 = Clock::now();
      TransferState st = puller.pull(h, target);
      const double contiguous_ms = ms_since(t0);
      if (st.phase != TransferPhase::kDone) die("contiguous pull: " + st.error.to_string());
      if (verify) verify_landed(dst, dst_table, shape, pub.checksum, "contiguous");
      command({Op::kRelease});
      // Block-fixed (not offered by ucx).
      double block_fixed_ms = std::nan("");
      if (kind != TransportKind::kUcx) {
        if (verify) std::memset(dst.base, 0, dst_bytes);
        Reply exp = command({Op::kExpose});
        const KvHandle bh = check(KvHandle::parse(exp.text), "handle");
        t0 = Clock::now();
        st = puller.pull(bh, target);
        block_fixed_ms = ms_since(t0);
        if (st.phase != TransferPhase::kDone) die("block-fixed pull: " + st.error.to_string());
        if (verify) verify_landed(dst, dst_table, shape, pub.checksum, "block-fixed");
        command({Op::kRelease});
      }
      // Raw, once per size (the first block size measures it).
      if (raw_times->size() < static_cast<size_t>(o_.reps) + 1) {
        raw_times->push_back(raw_once(kind, raw, config, shape.kv_bytes));
      }
      if (rep >= 0) {
        row.gather.push_back(pub.gather_ms);
        row.contiguous.push_back(contiguous_ms);
        row.total.push_back(pub.gather_ms + contiguous_ms);
        if (!std::isnan(block_fixed_ms)) row.block_fixed.push_back(block_fixed_ms);
      }
      std::fputc('.', stderr);
      std::fflush(stderr);
    }
    row.raw.assign(raw_times->begin() + 1, raw_times->end());  // the first one warmed up
    row.gather_ms = median(row.gather);
    row.contiguous_ms = median(row.contiguous);
    row.contiguous_total_ms = median(row.total);
    row.block_fixed_ms = row.block_fixed.empty() ? std::nan("") : median(row.block_fixed);
    row.raw_ms = median(row.raw);
    std::fprintf(stderr, " contiguous %.2f ms (+ gather %.2f), block-fixed %.2f ms, raw %.2f ms\n",
                 row.contiguous_ms, row.gather_ms, row.block_fixed_ms, row.raw_ms);
    return row;
  }

  double raw_once(TransportKind kind, const Fd& raw, const Reply& config, uint64_t bytes) {
    if (kind == TransportKind::kShm) {
      // Map the prefill's shared file (once per size), then time the copy into private memory.
      if (raw_path_ != config.text || raw_map_bytes_ != bytes) {
        if (raw_map_) ::munmap(const_cast<uint8_t*>(raw_map_), raw_map_bytes_);
        const int fd = ::open(config.text, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die(fmt::format("cannot open {}", config.text));
        raw_map_ = static_cast<const uint8_t*>(::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0));
        ::close(fd);
        if (raw_map_ == MAP_FAILED) die("raw map");
        raw_map_bytes_ = bytes;
        raw_path_ = config.text;
      }
      // In the parts the KV copies of this size use (one below 32 MiB).
      const uint64_t part = kv_copy_part_bytes(bytes);
      const auto t0 = Clock::now();
      std::vector<std::thread> helpers;
      for (uint64_t start = part; start < bytes; start += part)
        helpers.emplace_back([this, start, part, bytes] {
          std::memcpy(raw_dst_.data + start, raw_map_ + start, std::min(part, bytes - start));
        });
      std::memcpy(raw_dst_.data, raw_map_, std::min(part, bytes));
      for (std::thread& t : helpers) t.join();
      return ms_since(t0);
    }
    Command c{Op::kRawSend, 0, bytes};
#ifdef PDSERVE_HAVE_UCX
    if (kind == TransportKind::kUcx) {
      const auto t0 = Clock::now();
      write_exact(ctl_, &c, sizeof c);
      raw_ucx_->receive(raw_dst_.data, bytes);
      const double ms = ms_since(t0);
      Reply r;
      read_exact(ctl_, &r, sizeof r);
      return ms;
    }
#endif
    write_exact(ctl_, &c, sizeof c);
    const uint8_t go = 1;
    const auto t0 = Clock::now();
    check(transfer_internal::send_all(raw.get(), &go, 1, "raw go"), "raw go");
    check(transfer_internal::recv_all(raw.get(), raw_dst_.data, bytes, "raw bytes"), "raw recv");
    const double ms = ms_since(t0);
    Reply r;
    read_exact(ctl_, &r, sizeof r);
    return ms;
  }

  void verify_landed(const PagedKvView& dst, const std::vector<int32_t>& table, const Shape& shape,
                     uint64_t expected, const char* what) {
    check(gather_kv(dst, table, shape.tokens, {check_.data, shape.kv_bytes}), "gather for verification");
    if (XXH3_64bits(check_.data, shape.kv_bytes) != expected)
      die(fmt::format("{} pull of {} bytes did not land bit-exactly", what, shape.kv_bytes));
  }

  const int ctl_;
  const Options& o_;
  const KvLayout layout_;
  Arena arena_;    // the decode's paged KV
  Arena raw_dst_;  // where raw copies land
  Arena check_;    // verification scratch
  std::string raw_path_;
  const uint8_t* raw_map_ = nullptr;
  size_t raw_map_bytes_ = 0;
#ifdef PDSERVE_HAVE_UCX
  std::unique_ptr<RawUcx> raw_ucx_;
#endif
};

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

void print_table(const std::vector<Row>& rows) {
  std::printf(
      "| transport | KV MiB | block | gather ms | contiguous ms | contiguous+gather ms | block-fixed ms | "
      "raw ms | "
      "contiguous GB/s | raw GB/s | contiguous / raw bandwidth | (contiguous+gather) / block-fixed |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    const double gb = static_cast<double>(r.kv_bytes) / 1e9;
    const bool bf = !std::isnan(r.block_fixed_ms);  // ucx has no block-fixed mode
    std::printf("| %s | %.0f | %d | %.2f | %.2f | %.2f | %s | %.2f | %.2f | %.2f | %.0f %% | %s |\n",
                r.transport.c_str(), r.kv_bytes / 1048576.0, r.block_size, r.gather_ms, r.contiguous_ms,
                r.contiguous_total_ms, bf ? fmt::format("{:.2f}", r.block_fixed_ms).c_str() : "—", r.raw_ms,
                gb / (r.contiguous_ms / 1e3), gb / (r.raw_ms / 1e3), 100.0 * r.raw_ms / r.contiguous_ms,
                bf ? fmt::format("{:.2f}", r.contiguous_total_ms / r.block_fixed_ms).c_str() : "—");
  }
}

void write_json(const std::string& path, const Options& o, const std::vector<Row>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) die("cannot write " + path);
  auto list = [](const std::vector<double>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{:.4f}", i ? ", " : "", v[i]);
    return s + "]";
  };
  std::fprintf(
      f,
      "{\n  \"bench\": \"pdserve_transfer_bench\",\n  \"cpu\": \"%s\",\n  \"num_layers\": %d,\n"
      "  \"kv_width\": %d,\n  \"dtype\": \"f16\",\n  \"reps\": %d,\n  \"tcp_socket_buffer_bytes\": %d,\n"
      "  \"copy_threads\": %d,\n  \"results\": [\n",
      cpu_model().c_str(), o.num_layers, o.kv_width, o.reps, o.tcp_buffer_bytes, o.copy_threads);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::fprintf(f,
                 "    {\"transport\": \"%s\", \"kv_bytes\": %llu, \"block_size\": %d, \"tokens\": %d, "
                 "\"median_ms\": {\"gather\": %.4f, \"contiguous\": %.4f, \"contiguous_plus_gather\": %.4f, "
                 "\"block_fixed\": %s, \"raw\": %.4f}, \"ms\": {\"gather\": %s, \"contiguous\": %s, "
                 "\"block_fixed\": %s, \"raw\": %s}}%s\n",
                 r.transport.c_str(), static_cast<unsigned long long>(r.kv_bytes), r.block_size, r.tokens,
                 r.gather_ms, r.contiguous_ms, r.contiguous_total_ms,
                 std::isnan(r.block_fixed_ms) ? "null" : fmt::format("{:.4f}", r.block_fixed_ms).c_str(),
                 r.raw_ms, list(r.gather).c_str(), list(r.contiguous).c_str(), list(r.block_fixed).c_str(),
                 list(r.raw).c_str(), i + 1 < rows.size() ? "," : "");
  }
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
}

}  // namespace
}  // namespace pdserve

int main(int argc, char** argv) {
  using namespace pdserve;
  Options o;
  CLI::App app{"KV transfer between a prefill and a decode process: contiguous vs block-fixed vs raw"};
  app.add_option("--transports", o.transports, "shm, tcp and/or ucx (ucx: builds with libucx)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--sizes-mib", o.sizes_mib, "KV sizes per request, MiB")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--block-sizes", o.block_sizes, "tokens per KV block (both sides)")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--reps", o.reps, "timed repetitions per measurement (after one warm-up)")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  app.add_flag("--quick", o.quick, "skip KV sizes above 256 MiB");
  app.add_option("--layers", o.num_layers, "model layers (default: a Llama-3-8B-like shape)")
      ->capture_default_str();
  app.add_option("--kv-width", o.kv_width, "values per K (or V) row: kv heads x head dim")
      ->capture_default_str();
  app.add_option("--tcp-buffer-bytes", o.tcp_buffer_bytes, "SO_SNDBUF/SO_RCVBUF, 0: autotuning")
      ->capture_default_str();
  app.add_option("--json", o.json_path, "write every measurement as JSON");
  app.add_option("--copy-threads", o.copy_threads,
                 "threads a gather or scatter of 32 MiB or more is split over (0: up to 4, as the "
                 "hardware allows; 1: one)")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  set_kv_copy_threads(o.copy_threads);
  if (o.quick) std::erase_if(o.sizes_mib, [](int64_t m) { return m > 256; });
  if (o.sizes_mib.empty()) die("no KV sizes left");
  check(bench_layout(o).validate(), "layout");

  int ctl[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ctl) != 0) die("socketpair");
  std::fflush(stdout);
  const pid_t pid = ::fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    ::close(ctl[0]);
    run_prefill(ctl[1], o);
    ::_exit(0);
  }
  ::close(ctl[1]);
  const KvLayout layout = bench_layout(o);
  std::fprintf(
      stderr,
      "pdserve_transfer_bench: %d layers x %d values f16 (%zu KiB per token), %d reps; prefill pid %d, "
      "decode pid %d\n",
      o.num_layers, o.kv_width, layout.token_bytes() / 1024, o.reps, pid, ::getpid());
  std::vector<Row> rows;
  {
    Decode decode(ctl[0], o);
    rows = decode.run();
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) die("the prefill process failed");
  print_table(rows);
  if (!o.json_path.empty()) write_json(o.json_path, o, rows);
  return 0;
}

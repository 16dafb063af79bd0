#include "gateway/remote_instance.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "api/internal_protocol.h"
#include "common/log.h"

namespace pdserve {

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

constexpr size_t kMaxEventBytes = size_t{64} << 20;
// A whole stream (an error body too): bounds what a peer can make the gateway read.
constexpr uint64_t kMaxStreamBytes = uint64_t{1} << 30;

// Waits until the socket is readable (true) or `timeout` passes (false).
bool wait_readable(tcp::socket& socket, std::chrono::milliseconds timeout) {
  pollfd p{socket.native_handle(), POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(timeout.count())) > 0;
}

// Reads an answer's head (`head_only`) or all of it, failing with timed_out once `timeout` has
// passed. NOTE: a socket receive timeout would not do: Asio's blocking read waits again, without
// a limit, when the kernel's read times out.
beast::error_code read_within(tcp::socket& socket, beast::flat_buffer& buffer,
                              http::response_parser<http::string_body>& parser, bool head_only,
                              std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  beast::error_code ec, ignored;
  socket.non_blocking(true, ec);
  while (!ec && !(head_only ? parser.is_header_done() : parser.is_done())) {
    http::read_some(socket, buffer, parser, ec);
    if (ec != net::error::would_block && ec != net::error::try_again) continue;
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    ec = left.count() > 0 && wait_readable(socket, left) ? beast::error_code{} : net::error::timed_out;
  }
  socket.non_blocking(false, ignored);
  return ec;
}

// A stream's peer that vanishes without closing (a partition, a dead host) is noticed within
// about 10 s: TCP keepalive probes after 4 s idle, every 2 s, 3 times.
void set_keepalive(tcp::socket& socket) {
  int on = 1, idle = 4, interval = 2, count = 3;
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
  ::setsockopt(socket.native_handle(), IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  ::setsockopt(socket.native_handle(), IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  ::setsockopt(socket.native_handle(), IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
}

// A blocking connect that gives up after `timeout`.
Status connect_socket(tcp::socket& socket, const std::string& host, const std::string& port,
                      std::chrono::milliseconds timeout) {
  beast::error_code ec;
  tcp::resolver resolver(socket.get_executor());
  auto endpoints = resolver.resolve(host, port, ec);
  if (ec) return unavailable(fmt::format("cannot resolve {}:{}: {}", host, port, ec.message()));
  for (const auto& e : endpoints) {
    beast::error_code ignored;
    if (socket.is_open()) socket.close(ignored);
    socket.open(e.endpoint().protocol(), ec);
    if (ec) continue;
    socket.non_blocking(true, ec);
    socket.connect(e.endpoint(), ec);
    if (ec == net::error::would_block || ec == net::error::in_progress) {
      pollfd p{socket.native_handle(), POLLOUT, 0};
      if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) {
        ec = net::error::timed_out;
      } else {
        int err = 0;
        socklen_t len = sizeof(err);
        ::getsockopt(socket.native_handle(), SOL_SOCKET, SO_ERROR, &err, &len);
        ec = err == 0 ? beast::error_code{} : beast::error_code(err, net::error::get_system_category());
      }
    }
    if (!ec) {
      socket.non_blocking(false, ec);
      socket.set_option(tcp::no_delay(true), ignored);
      return ok_status();
    }
  }
  return unavailable(fmt::format("cannot connect to {}:{}: {}", host, port, ec.message()));
}

http::request<http::string_body> make_request(http::verb verb, const std::string& host,
                                              const std::string& path, std::string body,
                                              const std::string& token) {
  http::request<http::string_body> req{verb, path, 11};
  req.set(http::field::host, host);
  req.set(http::field::user_agent, "pdserve-gateway");
  if (!token.empty()) req.set(http::field::authorization, "Bearer " + token);
  if (verb == http::verb::post) {
    req.set(http::field::content_type, "application/json");
    req.body() = std::move(body);
  }
  req.prepare_payload();
  return req;
}

}  // namespace

struct StreamReactor::Impl {
  net::io_context ioc;
  net::executor_work_guard<net::io_context::executor_type> work{ioc.get_executor()};
  std::vector<std::thread> threads;
};

StreamReactor::StreamReactor(int threads) : threads_(std::max(1, threads)), impl_(std::make_unique<Impl>()) {
  try {
    for (int i = 0; i < threads_; ++i) impl_->threads.emplace_back([io = &impl_->ioc] { io->run(); });
  } catch (...) {
    stop_and_join();  // the threads already started (a joinable thread destroyed would terminate)
    throw;
  }
}

StreamReactor::~StreamReactor() { stop_and_join(); }

void StreamReactor::stop_and_join() {
  impl_->work.reset();
  impl_->ioc.stop();
  for (std::thread& t : impl_->threads) t.join();
}

struct RemoteInstance::Sweep {
  explicit Sweep(net::io_context& ioc) : timer(ioc) {}
  net::steady_timer timer;
};

struct RemoteInstance::Stream {
  Stream(net::io_context& ioc, std::shared_ptr<RequestHandle> h)
      : handle(std::move(h)), strand(net::make_strand(ioc)), socket(strand) {}

  // Hands every complete event in `pending` on; false when the stream must end (its final event,
  // or bytes that break the protocol).
  bool process() {
    size_t end;
    while (!got_final && (end = pending.find("\n\n")) != std::string::npos) {
      std::string_view block(pending.data(), end);
      if (block.substr(0, 6) == "data: ") {
        StatusOr<api::StreamEvent> e = api::decode_stream_event(block.substr(6));
        if (!e.ok()) {
          broken = data_loss(fmt::format("{} sent a malformed event: {}", what, e.status().message()));
          return false;
        }
        if (auto* pulled = std::get_if<api::PulledEvent>(&*e)) {
          if (on_pulled) std::exchange(on_pulled, nullptr)(pulled->status);
        } else {
          EngineOutput& out = std::get<EngineOutput>(*e);
          got_final = out.finished;
          sink(std::move(out));
        }
      }
      pending.erase(0, end + 2);
    }
    if (pending.size() > kMaxEventBytes) {
      broken = data_loss(fmt::format("{} sent an event larger than {} bytes", what, kMaxEventBytes));
      return false;
    }
    return !got_final;
  }

  // Moves the body bytes the parser has decoded to `pending`.
  void take_body() {
    std::string& received = parser.get().body();
    pending.append(received);
    received.clear();
  }

  // A cancelled stream: what already arrived may hold the final event (a prefill's handoff: the
  // router must see it to release the staged KV); takes it without waiting for more.
  void drain() {
    beast::error_code ec;
    socket.non_blocking(true, ec);
    while (!ec && !got_final && broken.ok() && !parser.is_done()) {
      http::read_some(socket, buffer, parser, ec);  // would_block once nothing more is there
      take_body();
      if (!process()) break;
    }
  }

  std::shared_ptr<RequestHandle> handle;
  OutputSink sink;
  PulledCallback on_pulled;
  std::string what;  // "the prefill instance at HOST:PORT"
  // Its handlers run in order, one at a time; the socket's completions come here.
  net::strand<net::io_context::executor_type> strand;
  tcp::socket socket;
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  // On the strand:
  std::string pending;  // event bytes not yet ended by a blank line
  bool got_final = false;
  Status broken = ok_status();
  beast::error_code read_error;  // of the last read
  bool cancelling = false;       // the sweep asked it to end
  // Guarded by the instance's mu_:
  std::list<std::shared_ptr<Stream>>::iterator self;  // in streams_
};

RemoteInstance::RemoteInstance(std::string address, const HostPort& where,
                               const RemoteInstanceOptions& options)
    : address_(std::move(address)), host_(where.host), port_(std::to_string(where.port)), options_(options) {}

StatusOr<std::unique_ptr<RemoteInstance>> RemoteInstance::connect(const std::string& address,
                                                                  const RemoteInstanceOptions& options) {
  StatusOr<HostPort> where = parse_host_port(address, /*allow_zero_port=*/false);
  if (!where.ok()) return where.status().with_context("instance address");
  std::unique_ptr<RemoteInstance> r(new RemoteInstance(address, *where, options));
  PD_RETURN_IF_ERROR(r->refresh_stats());
  r->reactor_ = options.reactor ? options.reactor : std::make_shared<StreamReactor>(kDefaultStreamThreads);
  r->sweep_ = std::make_unique<Sweep>(r->reactor_->impl().ioc);
  {
    std::lock_guard<std::mutex> lock(r->mu_);
    r->sweeping_ = true;
    r->arm_sweep();
  }
  r->stats_thread_ = std::thread([p = r.get()] { p->poll_stats(); });
  return r;
}

RemoteInstance::~RemoteInstance() { shutdown(); }

void RemoteInstance::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (stats_thread_.joinable()) stats_thread_.join();
  // The sweep cancels every stream and then ends, within poll_interval; each stream ends when its
  // read returns.
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !sweeping_ && streams_.empty(); });
}

void RemoteInstance::arm_sweep() {
  sweep_->timer.expires_after(options_.poll_interval);
  sweep_->timer.async_wait([this](const beast::error_code&) { sweep(); });
}

void RemoteInstance::sweep() {
  std::unique_lock<std::mutex> lock(mu_);
  // NOTE: posted again on every sweep until the stream ends: a cancel finds no read to abort when
  // it runs between two reads of a stream (Beast's read may go on to read more, or read_next was
  // not yet posted); read_next() looks at `cancelling` first.
  for (const std::shared_ptr<Stream>& s : streams_) {
    if (!stop_ && !s->handle->cancelled()) continue;
    net::post(s->strand, [s] {
      s->cancelling = true;
      beast::error_code ignored;
      s->socket.cancel(ignored);  // the pending read returns (operation_aborted)
    });
  }
  if (!stop_ || !streams_.empty()) {
    arm_sweep();
    return;
  }
  // NOTE: notified under the lock: shutdown() may return (and the instance go) once it is released.
  sweeping_ = false;
  cv_.notify_all();
}

void RemoteInstance::read_next(const std::shared_ptr<Stream>& s) {
  if (s->cancelling) {
    s->drain();
    return finish(s);
  }
  if (s->parser.is_done()) {
    s->broken = unavailable(fmt::format("{} ended the stream without a final event", s->what));
    return finish(s);
  }
  http::async_read_some(s->socket, s->buffer, s->parser, [this, s](beast::error_code ec, size_t) {
    s->read_error = ec;
    on_read(s);
  });
}

void RemoteInstance::on_read(const std::shared_ptr<Stream>& s) {
  s->take_body();
  if (!s->process()) return finish(s);
  if (s->cancelling) {
    // After a read that failed otherwise, the parser may not be fed again.
    if (!s->read_error || s->read_error == net::error::operation_aborted) s->drain();
    return finish(s);
  }
  if (s->read_error) {
    s->broken = unavailable(
        fmt::format("{} closed the stream before the request ended ({})", s->what, s->read_error.message()));
    return finish(s);
  }
  read_next(s);
}

void RemoteInstance::finish(const std::shared_ptr<Stream>& s) {
  beast::error_code ignored;
  s->socket.shutdown(tcp::socket::shutdown_both, ignored);
  s->socket.close(ignored);
  // The prefill must hear about a decode stream that ended without saying whether it has the KV.
  if (s->on_pulled)
    std::exchange(s->on_pulled, nullptr)(s->broken.ok() ? unavailable("the stream ended") : s->broken);
  if (!s->got_final) {
    EngineOutput out;
    out.finished = true;
    if (s->broken.ok()) {
      out.finish_reason = "cancelled";
    } else {
      PD_LOG_WARN("gateway: {}", s->broken.message());
      out.finish_reason = "error";
      out.error = s->broken;
    }
    s->sink(std::move(out));
  }
  s->sink = nullptr;  // what it holds (the router's request) goes now, not with the last handler
  std::lock_guard<std::mutex> lock(mu_);
  streams_.erase(s->self);
  // NOTE: notified under the lock: shutdown() may return (and the instance go) once it is released.
  cv_.notify_all();
}

Status RemoteInstance::refresh_stats() {
  net::io_context ioc;
  tcp::socket socket(ioc);
  PD_RETURN_IF_ERROR(connect_socket(socket, host_, port_, options_.connect_timeout));
  beast::error_code ec;
  auto req = make_request(http::verb::get, address_, "/internal/v1/stats", "", options_.token);
  req.keep_alive(false);
  http::write(socket, req, ec);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxEventBytes);
  if (!ec) ec = read_within(socket, buffer, parser, /*head_only=*/false, options_.connect_timeout);
  if (ec)
    return unavailable(fmt::format("instance {}: reading its stats failed: {}", address_, ec.message()));
  if (parser.get().result_int() == 401) {
    return unauthenticated(
        fmt::format("instance {} refused the gateway's internal token: give the gateway and "
                    "its instances the same --internal-token (or $PDSERVE_INTERNAL_TOKEN)",
                    address_));
  }
  if (parser.get().result_int() != 200) {
    return unavailable(fmt::format("instance {}: stats answered {}", address_, parser.get().result_int()));
  }
  StatusOr<api::InstanceStats> stats = api::decode_instance_stats(parser.get().body());
  if (!stats.ok()) return stats.status().with_context(fmt::format("instance {}", address_));
  std::lock_guard<std::mutex> lock(mu_);
  if (!identified_) {
    // NOTE: set once, before any other thread reads them (connect()); later answers only refresh
    // the metrics, and an instance that comes back as something else stays down.
    role_ = stats->role;
    max_context_ = stats->max_context;
    max_sequence_tokens_ = stats->max_sequence_tokens;
    fingerprint_ = stats->model_fingerprint;
    transport_ = stats->transport;
    kv_dtype_ = stats->kv_dtype;
    features_ = stats->features;
    identified_ = true;
  } else if (stats->role != role_ || stats->model_fingerprint != fingerprint_) {
    return failed_precondition(
        fmt::format("instance {} came back as a {} instance of model {:#x}, not the {} "
                    "instance of model {:#x} it was",
                    address_, engine_role_name(stats->role), stats->model_fingerprint,
                    engine_role_name(role_), fingerprint_));
  }
  metrics_ = stats->metrics;
  return ok_status();
}

void RemoteInstance::poll_stats() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, options_.stats_interval, [&] { return stop_; })) return;
    }
    Status st = refresh_stats();
    const bool was_up = up_.exchange(st.ok());
    if (was_up && !st.ok()) PD_LOG_WARN("gateway: instance {} is down: {}", address_, st.message());
    if (!was_up && st.ok()) PD_LOG_INFO("gateway: instance {} is back", address_);
  }
}

Status RemoteInstance::validate(const EngineRequest& r) const {
  PD_RETURN_IF_ERROR(check_request_limits(r, max_context_));
  for (std::string_view feature : api::features_used(r)) {
    if (std::find(features_.begin(), features_.end(), feature) == features_.end()) {
      return unimplemented(
          fmt::format("instance {} runs an older pdserve, which would ignore the request's {}: run the same "
                      "pdserve build on the gateway and every instance",
                      address_, feature));
    }
  }
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
  if (total > max_sequence_tokens_) {
    return invalid_argument(fmt::format(
        "the prompt ({} tokens) plus max_tokens ({}) needs more KV cache than instance {} has ({} tokens)",
        r.prompt.size(), r.max_tokens, address_, max_sequence_tokens_));
  }
  return ok_status();
}

StatusOr<std::shared_ptr<RequestHandle>> RemoteInstance::submit(EngineRequest request, OutputSink sink,
                                                                std::shared_ptr<RequestHandle> handle) {
  return start("/internal/v1/submit", api::encode_engine_request(request), std::move(sink), nullptr,
               std::move(handle));
}

StatusOr<std::shared_ptr<RequestHandle>> RemoteInstance::submit_handoff(
    EngineRequest request, const EngineHandoff& handoff, OutputSink sink, PulledCallback on_pulled,
    std::shared_ptr<RequestHandle> handle) {
  return start("/internal/v1/handoff", api::encode_handoff_request(request, handoff), std::move(sink),
               std::move(on_pulled), std::move(handle));
}

StatusOr<std::shared_ptr<RequestHandle>> RemoteInstance::start(const std::string& path, std::string body,
                                                               OutputSink sink, PulledCallback on_pulled,
                                                               std::shared_ptr<RequestHandle> handle) {
  if (!up_.load()) return unavailable(fmt::format("instance {} is down", address_));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return unavailable("the gateway is shutting down");
  }
  if (!handle) handle = std::make_shared<RequestHandle>();
  auto s = std::make_shared<Stream>(reactor_->impl().ioc, handle);
  s->sink = std::move(sink);
  s->on_pulled = std::move(on_pulled);
  s->parser.body_limit(kMaxStreamBytes);
  PD_RETURN_IF_ERROR(connect_socket(s->socket, host_, port_, options_.connect_timeout));
  set_keepalive(s->socket);
  beast::error_code ec;
  auto req = make_request(http::verb::post, address_, path, std::move(body), options_.token);
  req.keep_alive(false);
  http::write(s->socket, req, ec);
  // The answer's head (and a refusal's body) are read here, on the caller's thread (for a
  // handoff, a sink's on the reactor), within connect_timeout; the stream, asynchronously.
  if (!ec) ec = read_within(s->socket, s->buffer, s->parser, /*head_only=*/true, options_.connect_timeout);
  if (ec) return unavailable(fmt::format("instance {}: {} failed: {}", address_, path, ec.message()));
  if (s->parser.get().result_int() != 200) {
    ec = read_within(s->socket, s->buffer, s->parser, /*head_only=*/false, options_.connect_timeout);
    if (ec) {
      return unavailable(fmt::format("instance {}: {} answered {}, then reading why failed: {}", address_,
                                     path, s->parser.get().result_int(), ec.message()));
    }
    return api::decode_status(s->parser.get().body());
  }
  s->what = fmt::format("the {} instance at {}", engine_role_name(role_), address_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return unavailable("the gateway is shutting down");
    s->self = streams_.insert(streams_.end(), s);
  }
  // NOTE: the sink may run before this returns (as an engine's may).
  net::post(s->strand, [this, s] { read_next(s); });
  return handle;
}

Status RemoteInstance::release_handoff(const KvBufferRef& kv) {
  net::io_context ioc;
  tcp::socket socket(ioc);
  PD_RETURN_IF_ERROR(connect_socket(socket, host_, port_, options_.connect_timeout));
  beast::error_code ec;
  auto req = make_request(http::verb::post, address_, "/internal/v1/release", api::encode_release(kv),
                          options_.token);
  req.keep_alive(false);
  http::write(socket, req, ec);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  if (!ec) ec = read_within(socket, buffer, parser, /*head_only=*/false, options_.connect_timeout);
  if (ec) return unavailable(fmt::format("instance {}: release failed: {}", address_, ec.message()));
  if (parser.get().result_int() != 200) return api::decode_status(parser.get().body());
  return ok_status();
}

EngineMetrics RemoteInstance::metrics() const {
  std::lock_guard<std::mutex> lock(mu_);
  return metrics_;
}

}  // namespace pdserve

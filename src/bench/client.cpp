#include "bench/client.h"

#include <fmt/format.h>

#include <array>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <unordered_set>

#include "bench/sse.h"

namespace pdserve::bench {

namespace {
namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;

std::string_view sv(beast::string_view s) { return {s.data(), s.size()}; }

// The message of an OpenAI-style error body, else the body itself (shortened).
std::string error_message_of(const std::string& body) {
  nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (!j.is_discarded() && j.is_object() && j.contains("error")) {
    const auto& e = j["error"];
    if (e.is_object() && e.contains("message") && e["message"].is_string())
      return e["message"].get<std::string>();
    if (e.is_string()) return e.get<std::string>();
  }
  return body.substr(0, 300);
}

}  // namespace

StatusOr<Endpoint> parse_base_url(std::string_view url) {
  Endpoint e;
  std::string_view rest = url;
  if (rest.substr(0, 7) == "http://") {
    rest.remove_prefix(7);
  } else if (rest.substr(0, 8) == "https://") {
    return unimplemented(fmt::format("'{}': https is not supported (put a TLS proxy in front)", url));
  } else if (rest.find("://") != std::string_view::npos) {
    return invalid_argument(fmt::format("'{}': expected http://HOST[:PORT][/PATH]", url));
  }
  size_t slash = rest.find('/');
  std::string_view hostport = rest.substr(0, slash);
  if (slash != std::string_view::npos) {
    e.base_path = std::string(rest.substr(slash));
    while (!e.base_path.empty() && e.base_path.back() == '/') e.base_path.pop_back();
  }
  if (hostport.empty()) return invalid_argument(fmt::format("'{}': no host", url));
  size_t colon = hostport.rfind(':');
  if (colon != std::string_view::npos && hostport.find(']') == std::string_view::npos) {
    e.host = std::string(hostport.substr(0, colon));
    e.port = std::string(hostport.substr(colon + 1));
    if (e.port.empty() || e.port.find_first_not_of("0123456789") != std::string::npos) {
      return invalid_argument(fmt::format("'{}': bad port '{}'", url, e.port));
    }
  } else {
    e.host = std::string(hostport);
    e.port = "80";
  }
  return e;
}

StreamEvent apply_stream_event(std::string_view data, double now_s, bool save_chunk_times, RequestRecord& r) {
  if (data == "[DONE]") return StreamEvent::kDone;
  nlohmann::json j = nlohmann::json::parse(data, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return StreamEvent::kMalformed;
  if (j.contains("error")) {
    r.error = "stream_error";
    const auto& e = j["error"];
    r.error_message = e.is_object() && e.contains("message") && e["message"].is_string()
                          ? e["message"].get<std::string>()
                          : e.dump();
    return StreamEvent::kError;
  }
  bool content = false, usage = false;
  auto it = j.find("choices");
  if (it != j.end() && it->is_array()) {
    for (const auto& c : *it) {
      if (!c.is_object()) continue;
      auto text = c.find("text");
      if (text != c.end() && text->is_string() && !text->get_ref<const std::string&>().empty())
        content = true;
      auto delta = c.find("delta");
      if (delta != c.end() && delta->is_object()) {
        for (const char* key : {"content", "reasoning_content", "reasoning"}) {
          auto v = delta->find(key);
          if (v != delta->end() && v->is_string() && !v->get_ref<const std::string&>().empty())
            content = true;
        }
      }
    }
  }
  auto u = j.find("usage");
  if (u != j.end() && u->is_object()) {
    auto ct = u->find("completion_tokens");
    if (ct != u->end() && ct->is_number_integer()) {
      r.output_tokens = static_cast<int32_t>(ct->get<int64_t>());
      r.usage_reported = true;
      usage = true;
    }
    auto pt = u->find("prompt_tokens");
    if (pt != u->end() && pt->is_number_integer()) r.prompt_tokens = static_cast<int32_t>(pt->get<int64_t>());
  }
  if (content) {
    if (r.first_token_s < 0) r.first_token_s = now_s;
    ++r.num_chunks;
    if (save_chunk_times) r.chunk_s.push_back(now_s);
    if (!r.usage_reported) r.output_tokens = r.num_chunks;
  }
  if (content && usage) return StreamEvent::kContentAndUsage;
  if (content) return StreamEvent::kContent;
  if (usage) return StreamEvent::kUsage;
  return StreamEvent::kOther;
}

// ---------------------------------------------------------------------------------------------

struct LoadClient::Impl {
  std::vector<Endpoint> endpoints;                     // the servers, taken in turn
  std::vector<tcp::resolver::results_type> addresses;  // each one's, resolved
};

namespace {

class Session;

// One event loop and its share of the work.
struct Shard {
  net::io_context ioc{1};
  net::steady_timer arrival_timer{ioc};
  net::steady_timer tick_timer{ioc};
  std::vector<size_t> open_queue;  // request indices in arrival order (open loop)
  size_t open_next = 0;
  int32_t users = 0;  // closed loop
  int64_t in_flight = 0;
  bool stopping = false;
  std::vector<std::vector<std::unique_ptr<beast::tcp_stream>>> idle;  // per endpoint
  std::unordered_set<Session*> active;
};

struct RunContext {
  const LoadClient::Impl* client = nullptr;
  const std::vector<PreparedRequest>* requests = nullptr;
  std::vector<RequestRecord>* records = nullptr;
  RunOptions options;
  Clock::time_point start;
  const std::atomic<bool>* stop = nullptr;
  std::atomic<int64_t> closed_next{0};
  std::atomic<int64_t> started{0}, finished{0}, errors{0}, chunks{0};

  double now_s() const { return std::chrono::duration<double>(Clock::now() - start).count(); }
};

void session_done(RunContext& ctx, Shard& shard, Session* s);

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(RunContext& ctx, Shard& shard, size_t idx)
      : ctx_(ctx),
        shard_(shard),
        req_((*ctx.requests)[idx]),
        rec_((*ctx.records)[idx]),
        // Request i goes to endpoint i mod n: several gateways of one deployment share the load.
        server_(idx % ctx.client->endpoints.size()) {}

  void start() {
    shard_.active.insert(this);
    ++shard_.in_flight;
    ctx_.started.fetch_add(1, std::memory_order_relaxed);
    rec_.send_s = ctx_.now_s();
    if (ctx_.options.closed_loop) rec_.scheduled_s = rec_.send_s;  // a user sends when ready: no lag
    rec_.endpoint = static_cast<int32_t>(server_);
    const Endpoint& ep = ctx_.client->endpoints[server_];
    hreq_.method(http::verb::post);
    hreq_.target(ep.base_path + req_.path);
    hreq_.version(11);
    hreq_.set(http::field::host, ep.host + ":" + ep.port);
    hreq_.set(http::field::user_agent, "pdserve-bench");
    hreq_.set(http::field::content_type, "application/json");
    hreq_.set(http::field::accept, "text/event-stream");
    if (!ep.api_key.empty()) hreq_.set(http::field::authorization, "Bearer " + ep.api_key);
    if (!req_.scenario.empty()) hreq_.set("X-Scenario", req_.scenario);
    hreq_.keep_alive(ctx_.options.keep_alive);
    hreq_.body() = req_.body;
    hreq_.prepare_payload();
    auto& idle = shard_.idle[server_];
    if (ctx_.options.keep_alive && !idle.empty()) {
      stream_ = std::move(idle.back());
      idle.pop_back();
      rec_.reused_connection = true;
      write();
    } else {
      connect();
    }
  }

  void cancel() {
    cancelled_ = true;
    if (stream_) {
      beast::error_code ec;
      stream_->socket().shutdown(tcp::socket::shutdown_both, ec);
      stream_->close();
    }
  }

 private:
  void connect() {
    stream_ = std::make_unique<beast::tcp_stream>(shard_.ioc);
    stream_->expires_after(timeout());
    stream_->async_connect(ctx_.client->addresses[server_], [self = shared_from_this()](
                                                                beast::error_code ec, const tcp::endpoint&) {
      if (ec) return self->fail(ec == beast::error::timeout ? "timeout" : "connect", ec.message());
      beast::error_code ignored;
      self->stream_->socket().set_option(tcp::no_delay(true), ignored);
      self->write();
    });
  }

  std::chrono::steady_clock::duration timeout() const {
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(ctx_.options.timeout_s));
  }

  // A reused keep-alive connection the server had closed: try once more on a fresh one.
  bool retry_fresh(const beast::error_code& ec) {
    if (!rec_.reused_connection || got_bytes_ || retried_ || cancelled_) return false;
    if (ec != http::error::end_of_stream && ec != net::error::eof && ec != net::error::connection_reset &&
        ec != net::error::broken_pipe) {
      return false;
    }
    retried_ = true;
    rec_.reused_connection = false;
    stream_.reset();
    connect();
    return true;
  }

  void write() {
    stream_->expires_after(timeout());
    http::async_write(*stream_, hreq_, [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) {
        if (self->retry_fresh(ec)) return;
        return self->fail(ec == beast::error::timeout ? "timeout" : "disconnected", ec.message());
      }
      self->parser_.emplace();
      // NOTE: not boost::none: Boost 1.74 compares a Content-Length against an empty optional
      // limit as "exceeded" (basic_parser.ipp, len_ > body_limit_).
      self->parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
      self->read();
    });
  }

  void read() {
    parser_->get().body().data = body_buf_.data();
    parser_->get().body().size = body_buf_.size();
    stream_->expires_after(timeout());
    http::async_read_some(*stream_, buffer_, *parser_,
                          [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::need_buffer) ec = {};
    double now = ctx_.now_s();
    size_t n = body_buf_.size() - parser_->get().body().size;
    if (n > 0 || parser_->is_header_done()) got_bytes_ = true;
    if (parser_->is_header_done() && rec_.http_status == 0) {
      rec_.http_status = static_cast<int>(parser_->get().result_int());
      event_stream_ =
          sv(parser_->get()[http::field::content_type]).find("text/event-stream") != std::string_view::npos;
    }
    if (n > 0) on_body(std::string_view(body_buf_.data(), n), now);
    if (!rec_.error.empty()) return finish(now, /*reusable=*/false);
    if (ec) {
      if (retry_fresh(ec)) return;
      if (ec == beast::error::timeout) return fail("timeout", "no data for the timeout");
      if (ec == http::error::end_of_stream || ec == net::error::eof || ec == net::error::connection_reset) {
        return fail("disconnected", "the server closed the connection before the response was complete");
      }
      if (ec.category() == http::make_error_code(http::error::bad_version).category())
        return fail("protocol", ec.message());
      return fail("disconnected", ec.message());
    }
    if (parser_->is_done()) return finish(now, parser_->keep_alive());
    read();
  }

  void on_body(std::string_view bytes, double now) {
    if (rec_.http_status != 200 || !event_stream_) {
      if (other_body_.size() < (1u << 20)) other_body_.append(bytes);
      return;
    }
    events_.clear();
    sse_.feed(bytes, events_);
    handle_events(now);
  }

  void handle_events(double now) {
    for (const std::string& e : events_) {
      int64_t before = rec_.num_chunks;
      StreamEvent k = apply_stream_event(e, now, ctx_.options.save_chunk_times, rec_);
      if (rec_.num_chunks != before) ctx_.chunks.fetch_add(1, std::memory_order_relaxed);
      if (k == StreamEvent::kDone) saw_done_ = true;
      if (k == StreamEvent::kMalformed) {
        rec_.error = "protocol";
        rec_.error_message = fmt::format("not a JSON event: {}", e.substr(0, 200));
      }
      if (!rec_.error.empty()) return;
    }
  }

  void finish(double now, bool reusable) {
    if (rec_.error.empty()) {
      if (rec_.http_status != 200) {
        rec_.error = fmt::format("http_{}", rec_.http_status);
        rec_.error_message = error_message_of(other_body_);
      } else if (event_stream_) {
        events_.clear();
        sse_.finish(events_);
        handle_events(now);
      } else {
        // A non-streamed answer (the server ignored "stream"): usage only, no token times.
        nlohmann::json j = nlohmann::json::parse(other_body_, nullptr, false);
        if (j.is_discarded() || !j.is_object()) {
          rec_.error = "protocol";
          rec_.error_message = "the response is neither an event stream nor JSON";
        } else if (j.contains("usage") && j["usage"].is_object()) {
          const auto& u = j["usage"];
          if (u.value("completion_tokens", -1) >= 0) {
            rec_.output_tokens = u.value("completion_tokens", 0);
            rec_.usage_reported = true;
          }
          rec_.prompt_tokens = u.value("prompt_tokens", -1);
          rec_.first_token_s = now;
        }
      }
    }
    rec_.end_s = now;
    if (!rec_.error.empty()) {
      ctx_.errors.fetch_add(1, std::memory_order_relaxed);
      reusable = false;
    }
    if (reusable && ctx_.options.keep_alive && !shard_.stopping) {
      shard_.idle[server_].push_back(std::move(stream_));
    } else if (stream_) {
      beast::error_code ignored;
      stream_->socket().shutdown(tcp::socket::shutdown_both, ignored);
      stream_->close();
    }
    complete();
  }

  void fail(std::string type, std::string message) {
    if (done_) return;
    rec_.error = cancelled_ ? "cancelled" : std::move(type);
    rec_.error_message = cancelled_ ? "the run was stopped" : std::move(message);
    finish(ctx_.now_s(), false);
  }

  void complete() {
    if (done_) return;
    done_ = true;
    ctx_.finished.fetch_add(1, std::memory_order_relaxed);
    session_done(ctx_, shard_, this);
  }

  RunContext& ctx_;
  Shard& shard_;
  const PreparedRequest& req_;
  RequestRecord& rec_;
  size_t server_;  // index into the client's endpoints
  std::unique_ptr<beast::tcp_stream> stream_;
  http::request<http::string_body> hreq_;
  beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::buffer_body>> parser_;
  std::array<char, 16384> body_buf_{};
  SseParser sse_;
  std::vector<std::string> events_;
  std::string other_body_;
  bool event_stream_ = false;
  bool got_bytes_ = false;
  bool retried_ = false;
  bool saw_done_ = false;
  bool cancelled_ = false;
  bool done_ = false;
};

void launch(RunContext& ctx, Shard& shard, size_t idx) {
  std::make_shared<Session>(ctx, shard, idx)->start();
}

// Open loop: starts every request that is due (and fits under max_in_flight); arms the timer
// for the next one.
void launch_due(RunContext& ctx, Shard& shard) {
  if (shard.stopping) return;
  int32_t cap = ctx.options.max_in_flight;
  while (shard.open_next < shard.open_queue.size()) {
    size_t idx = shard.open_queue[shard.open_next];
    double at = (*ctx.requests)[idx].arrival_s;
    if (at > ctx.now_s()) {
      shard.arrival_timer.expires_at(
          ctx.start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(at)));
      shard.arrival_timer.async_wait([&ctx, &shard](beast::error_code ec) {
        if (!ec) launch_due(ctx, shard);
      });
      return;
    }
    if (cap > 0 && shard.in_flight >= cap) return;  // resumed by session_done
    ++shard.open_next;
    launch(ctx, shard, idx);
  }
}

// Closed loop: a user sends its next request.
void next_closed(RunContext& ctx, Shard& shard) {
  if (shard.stopping) return;
  if (ctx.options.duration_s > 0 && ctx.now_s() >= ctx.options.duration_s) return;
  int64_t idx = ctx.closed_next.fetch_add(1);
  if (idx >= static_cast<int64_t>(ctx.requests->size())) return;
  launch(ctx, shard, static_cast<size_t>(idx));
}

void session_done(RunContext& ctx, Shard& shard, Session* s) {
  shard.active.erase(s);
  --shard.in_flight;
  if (ctx.options.closed_loop) {
    // Posted: a user's next request never starts inside the previous one's handler.
    net::post(shard.ioc, [&ctx, &shard] { next_closed(ctx, shard); });
  } else if (ctx.options.max_in_flight > 0) {
    net::post(shard.ioc, [&ctx, &shard] { launch_due(ctx, shard); });
  }
}

bool shard_finished(const RunContext& ctx, const Shard& shard) {
  if (shard.in_flight > 0) return false;
  if (ctx.options.closed_loop) {
    return shard.stopping || ctx.closed_next.load() >= static_cast<int64_t>(ctx.requests->size()) ||
           (ctx.options.duration_s > 0 && ctx.now_s() >= ctx.options.duration_s);
  }
  return shard.stopping || shard.open_next >= shard.open_queue.size();
}

// Every 20 ms: the stop flag, and the end of the shard's work.
void tick(RunContext& ctx, Shard& shard) {
  if (!shard.stopping && ctx.stop->load()) {
    shard.stopping = true;
    shard.arrival_timer.cancel();
    std::vector<Session*> active(shard.active.begin(), shard.active.end());
    for (Session* s : active) s->cancel();
  }
  if (shard_finished(ctx, shard)) {
    shard.arrival_timer.cancel();
    for (auto& idle : shard.idle) idle.clear();
    return;
  }
  shard.tick_timer.expires_after(std::chrono::milliseconds(20));
  shard.tick_timer.async_wait([&ctx, &shard](beast::error_code ec) {
    if (!ec) tick(ctx, shard);
  });
}

// A blocking request on a private event loop.
StatusOr<HttpResult> blocking_request(const LoadClient::Impl& c, size_t server, http::verb verb,
                                      const std::string& path, const std::string& body, double timeout_s) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  const Endpoint& ep = c.endpoints.at(server);
  http::request<http::string_body> req{verb, ep.base_path + path, 11};
  req.set(http::field::host, ep.host + ":" + ep.port);
  req.set(http::field::user_agent, "pdserve-bench");
  if (!ep.api_key.empty()) req.set(http::field::authorization, "Bearer " + ep.api_key);
  if (verb == http::verb::post) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
  }
  req.keep_alive(false);
  req.prepare_payload();
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64u << 20);
  beast::error_code result;
  std::string stage = "connect";
  stream.expires_after(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s)));
  stream.async_connect(c.addresses.at(server), [&](beast::error_code ec, const tcp::endpoint&) {
    if (ec) {
      result = ec;
      return;
    }
    stage = "send";
    http::async_write(stream, req, [&](beast::error_code ec2, size_t) {
      if (ec2) {
        result = ec2;
        return;
      }
      stage = "receive";
      http::async_read(stream, buffer, parser, [&](beast::error_code ec3, size_t) { result = ec3; });
    });
  });
  ioc.run();
  if (result) {
    return unavailable(fmt::format("{} {}:{}{}: {} failed: {}", verb == http::verb::get ? "GET" : "POST",
                                   ep.host, ep.port, path, stage, result.message()));
  }
  HttpResult r;
  r.status = static_cast<int>(parser.get().result_int());
  r.content_type = std::string(sv(parser.get()[http::field::content_type]));
  r.body = std::move(parser.get().body());
  return r;
}

}  // namespace

LoadClient::LoadClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LoadClient::~LoadClient() = default;

StatusOr<std::unique_ptr<LoadClient>> LoadClient::create(const Endpoint& endpoint) {
  return create(std::vector<Endpoint>{endpoint});
}

StatusOr<std::unique_ptr<LoadClient>> LoadClient::create(const std::vector<Endpoint>& endpoints) {
  if (endpoints.empty()) return invalid_argument("no server to send to");
  auto impl = std::make_unique<Impl>();
  impl->endpoints = endpoints;
  net::io_context ioc;
  tcp::resolver resolver(ioc);
  for (const Endpoint& e : endpoints) {
    beast::error_code ec;
    impl->addresses.push_back(resolver.resolve(e.host, e.port, ec));
    if (ec) return unavailable(fmt::format("cannot resolve {}:{}: {}", e.host, e.port, ec.message()));
  }
  return std::unique_ptr<LoadClient>(new LoadClient(std::move(impl)));
}

const Endpoint& LoadClient::endpoint() const { return impl_->endpoints.front(); }

size_t LoadClient::num_endpoints() const { return impl_->endpoints.size(); }

StatusOr<HttpResult> LoadClient::get(const std::string& path, double timeout_s) const {
  return get_from(0, path, timeout_s);
}

StatusOr<HttpResult> LoadClient::get_from(size_t server, const std::string& path, double timeout_s) const {
  if (server >= impl_->endpoints.size()) return invalid_argument("no such server");
  return blocking_request(*impl_, server, http::verb::get, path, "", timeout_s);
}

StatusOr<HttpResult> LoadClient::post_json(const std::string& path, const std::string& body,
                                           double timeout_s) const {
  return blocking_request(*impl_, 0, http::verb::post, path, body, timeout_s);
}

std::vector<RequestRecord> LoadClient::run(const std::vector<PreparedRequest>& requests,
                                           const RunOptions& options, const std::atomic<bool>& stop,
                                           const std::function<void(const Progress&, double)>& on_tick,
                                           double tick_s) {
  std::vector<RequestRecord> records(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    RequestRecord& r = records[i];
    r.id = requests[i].id;
    r.scenario_idx = requests[i].scenario_idx;
    r.scheduled_s = options.closed_loop ? 0 : requests[i].arrival_s;
    r.planned_input_tokens = requests[i].planned_input_tokens;
    r.planned_output_tokens = requests[i].planned_output_tokens;
  }
  RunContext ctx;
  ctx.client = impl_.get();
  ctx.requests = &requests;
  ctx.records = &records;
  ctx.options = options;
  ctx.stop = &stop;
  int32_t num_shards = std::max(1, options.client_threads);
  std::vector<std::unique_ptr<Shard>> shards;
  for (int32_t i = 0; i < num_shards; ++i) {
    shards.push_back(std::make_unique<Shard>());
    shards.back()->idle.resize(impl_->endpoints.size());
  }
  if (options.closed_loop) {
    for (int32_t u = 0; u < std::max(1, options.users); ++u) ++shards[u % num_shards]->users;
  } else {
    for (size_t i = 0; i < requests.size(); ++i) shards[i % num_shards]->open_queue.push_back(i);
  }
  ctx.start = Clock::now();
  for (auto& s : shards) {
    Shard& shard = *s;
    net::post(shard.ioc, [&ctx, &shard] {
      if (ctx.options.closed_loop) {
        for (int32_t u = 0; u < shard.users; ++u) next_closed(ctx, shard);
      } else {
        launch_due(ctx, shard);
      }
      tick(ctx, shard);
    });
  }
  std::vector<std::thread> threads;
  for (auto& s : shards) threads.emplace_back([&shard = *s] { shard.ioc.run(); });
  std::atomic<int> running{num_shards};
  auto snapshot = [&] {
    Progress p;
    p.started = ctx.started.load(std::memory_order_relaxed);
    p.finished = ctx.finished.load(std::memory_order_relaxed);
    p.errors = ctx.errors.load(std::memory_order_relaxed);
    p.output_chunks = ctx.chunks.load(std::memory_order_relaxed);
    return p;
  };
  // The calling thread reports progress until every shard's loop has returned.
  std::vector<std::thread> joiners;
  for (auto& t : threads) {
    joiners.emplace_back([&t, &running] {
      t.join();
      running.fetch_sub(1);
    });
  }
  auto next_tick = Clock::now();
  while (running.load() > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (on_tick && Clock::now() >= next_tick) {
      on_tick(snapshot(), ctx.now_s());
      next_tick += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(tick_s));
    }
  }
  for (auto& j : joiners) j.join();
  if (on_tick) on_tick(snapshot(), ctx.now_s());
  for (RequestRecord& r : records) {
    if (r.send_s < 0 && r.error.empty()) {
      r.error = "not_sent";
      r.error_message = "never started (the run was stopped or its duration ended)";
    }
  }
  return records;
}

}  // namespace pdserve::bench

#include "api/http_server.h"

#include <fmt/format.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <future>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <thread>
#include <unordered_map>

#include "common/log.h"

namespace pdserve::api {

namespace {
namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

class Connection;

std::string response_head(int status, std::string_view content_type, const HttpHeaders& headers,
                          std::optional<size_t> content_length, bool keep_alive) {
  beast::string_view r = http::obsolete_reason(http::int_to_status(static_cast<unsigned>(status)));
  std::string_view reason(r.data(), r.size());
  std::string s = fmt::format("HTTP/1.1 {} {}\r\nServer: pdserve\r\nContent-Type: {}\r\n", status,
                              reason.empty() ? "Unknown" : reason, content_type);
  if (content_length) {
    s += fmt::format("Content-Length: {}\r\n", *content_length);
  } else {
    s += "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n";
  }
  s += keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  for (const auto& [k, v] : headers) s += fmt::format("{}: {}\r\n", k, v);
  s += "\r\n";
  return s;
}

bool iequals(beast::string_view a, std::string_view b) {
  return beast::iequals(a, beast::string_view(b.data(), b.size()));
}

std::string to_string(beast::string_view s) { return std::string(s.data(), s.size()); }

}  // namespace

// Shared by the HttpServer and every connection: a connection that a handler's ResponseChannel
// keeps past the server's destruction keeps this (its io_context included) alive with it.
struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  explicit Impl(HttpServerOptions o, RequestHandler h) : options(std::move(o)), handler(std::move(h)) {}
  void accept();
  void register_connection(const std::shared_ptr<Connection>& c);
  void unregister_connection(Connection* c);
  // Posts a close to every open connection (their on_close callbacks fire on their strands).
  void close_connections();
  // On the acceptor's strand, or once no I/O thread runs.
  void close_acceptor() {
    beast::error_code ignored;
    acceptor.close(ignored);
    accept_retry.cancel();
  }

  HttpServerOptions options;
  RequestHandler handler;
  std::mutex mu;
  std::unordered_map<Connection*, std::weak_ptr<Connection>> connections;  // guarded by mu
  std::atomic<int> num_connections{0};
  std::atomic<int> num_running_threads{0};
  bool stopped = false;  // controlling thread only
  // Set by stop() before it joins the I/O threads: from then on ResponseChannel calls post
  // nothing (no thread would run it, and a queued handler holding its connection, which holds
  // this, would never be freed).
  std::shared_mutex post_mu;
  bool posts_closed = false;  // guarded by post_mu

  net::io_context ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  tcp::acceptor acceptor{net::make_strand(ioc)};
  net::steady_timer accept_retry{acceptor.get_executor()};
  uint16_t port = 0;
  std::vector<std::thread> threads;
};

namespace {

// What the connection does once everything queued has been written.
enum class AfterFlush { kNothing, kResponseDone, kGracefulClose };

class Exchange;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(std::shared_ptr<HttpServer::Impl> server, tcp::socket socket)
      : server_(std::move(server)),
        socket_(std::move(socket)),
        idle_timer_(socket_.get_executor()),
        write_timer_(socket_.get_executor()) {
    server_->num_connections.fetch_add(1, std::memory_order_relaxed);
  }
  ~Connection() {
    server_->unregister_connection(this);
    server_->num_connections.fetch_sub(1, std::memory_order_relaxed);
  }

  net::any_io_executor executor() { return socket_.get_executor(); }
  // Posts `fn` to the connection's strand for a ResponseChannel call; drops it once the server
  // has stopped.
  template <class Fn>
  void post_for_channel(Fn&& fn) {
    std::shared_lock<std::shared_mutex> lock(server_->post_mu);
    if (!server_->posts_closed) net::post(executor(), std::forward<Fn>(fn));
  }

  void start() {
    net::post(executor(), [self = shared_from_this()] {
      self->arm_idle_timer();
      self->read();
    });
  }
  void close_from_server() {
    net::post(executor(), [self = shared_from_this()] { self->close(); });
  }

  // Exchange operations, on the strand.
  void respond(Exchange& ex, HttpResponse r);
  void start_stream(Exchange& ex, int status, const std::string& content_type, const HttpHeaders& headers);
  void write(Exchange& ex, const std::string& data);
  void end_stream(Exchange& ex);
  void on_close(Exchange& ex, std::function<void()> fn);

 private:
  void read();
  void on_header(beast::error_code ec);
  void on_body(beast::error_code ec);
  void on_read_error(beast::error_code ec);
  void dispatch(http::request<http::string_body> req);
  void respond_error_and_close(int status, std::string message);
  HttpResponse error_response(int status, std::string message) const;
  void queue(std::string_view bytes);
  void flush();
  void on_write(beast::error_code ec);
  void response_done();
  void graceful_close();
  void discard_until_eof();
  void close();
  void arm_idle_timer();

  // First: the socket and timers below must go before the io_context they belong to.
  std::shared_ptr<HttpServer::Impl> server_;
  tcp::socket socket_;  // on its own strand: every member below is touched on it only
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool reading_ = false;
  bool closing_ = false;  // send side shut down; waiting for the client to close
  bool closed_ = false;
  std::shared_ptr<Exchange> active_;                         // the response in progress
  std::optional<http::request<http::string_body>> pending_;  // a pipelined request waiting for it
  std::string out_current_;                                  // being written
  std::string out_next_;                                     // queued
  bool writing_ = false;
  AfterFlush after_flush_ = AfterFlush::kNothing;
  net::steady_timer idle_timer_;
  net::steady_timer write_timer_;
  uint64_t idle_generation_ = 0;
  uint64_t write_generation_ = 0;
  std::array<char, 4096> discard_{};
};

class Exchange final : public ResponseChannel, public std::enable_shared_from_this<Exchange> {
 public:
  enum class State { kOpen, kStreaming, kDone, kClosed };
  Exchange(std::shared_ptr<Connection> conn, bool keep_alive)
      : conn_(std::move(conn)), keep_alive_(keep_alive) {}

  void respond(HttpResponse response) override {
    conn_->post_for_channel([self = shared_from_this(), r = std::move(response)]() mutable {
      self->conn_->respond(*self, std::move(r));
    });
  }
  void start_stream(int status, std::string content_type, HttpHeaders headers) override {
    conn_->post_for_channel([self = shared_from_this(), status, ct = std::move(content_type),
                             h = std::move(headers)] { self->conn_->start_stream(*self, status, ct, h); });
  }
  void write(std::string data) override {
    if (data.empty()) return;
    conn_->post_for_channel(
        [self = shared_from_this(), d = std::move(data)] { self->conn_->write(*self, d); });
  }
  void end_stream() override {
    conn_->post_for_channel([self = shared_from_this()] { self->conn_->end_stream(*self); });
  }
  void on_close(std::function<void()> fn) override {
    conn_->post_for_channel([self = shared_from_this(), f = std::move(fn)]() mutable {
      self->conn_->on_close(*self, std::move(f));
    });
  }
  void post(std::function<void()> fn) override { conn_->post_for_channel(std::move(fn)); }

  // Strand only.
  State state = State::kOpen;
  std::function<void()> on_close_fn;
  bool keep_alive() const { return keep_alive_; }

 private:
  std::shared_ptr<Connection> conn_;
  bool keep_alive_;
};

void Connection::read() {
  if (reading_ || closed_ || closing_ || pending_) return;
  reading_ = true;
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(server_->options.max_header_bytes));
  parser_->body_limit(server_->options.max_body_bytes);
  http::async_read_header(socket_, buffer_, *parser_,
                          [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
}

void Connection::on_header(beast::error_code ec) {
  if (ec) return on_read_error(ec);
  if (closed_ || closing_) {
    reading_ = false;
    return close();
  }
  auto& req = parser_->get();
  if (!active_ && iequals(req[http::field::expect], "100-continue") && !parser_->is_done()) {
    queue("HTTP/1.1 100 Continue\r\n\r\n");
    flush();
  }
  http::async_read(socket_, buffer_, *parser_,
                   [self = shared_from_this()](beast::error_code e, size_t) { self->on_body(e); });
}

void Connection::on_body(beast::error_code ec) {
  if (ec) return on_read_error(ec);
  reading_ = false;
  if (closed_ || closing_) return close();
  http::request<http::string_body> req = parser_->release();
  if (active_) {
    pending_ = std::move(req);  // reading resumes once the current response has ended
    return;
  }
  dispatch(std::move(req));
  read();  // watches for the client going away, and for the next request
}

void Connection::on_read_error(beast::error_code ec) {
  reading_ = false;
  if (closed_) return;
  if (closing_) return close();
  const bool client_gone = ec == http::error::end_of_stream || ec == http::error::partial_message ||
                           ec == net::error::eof || ec == net::error::connection_reset ||
                           ec == net::error::broken_pipe || ec == net::error::operation_aborted;
  // While a response is in progress any read failure ends the connection (and so the request).
  if (client_gone || active_) return close();
  if (ec == http::error::body_limit) {
    return respond_error_and_close(
        413, fmt::format("the request body is larger than this server's limit of {} bytes (--max-body-bytes)",
                         server_->options.max_body_bytes));
  }
  if (ec == http::error::header_limit) {
    return respond_error_and_close(
        431, fmt::format("the request header is larger than {} bytes", server_->options.max_header_bytes));
  }
  respond_error_and_close(400, fmt::format("malformed HTTP request: {}", ec.message()));
}

void Connection::dispatch(http::request<http::string_body> req) {
  ++idle_generation_;
  idle_timer_.cancel();
  auto ex = std::make_shared<Exchange>(shared_from_this(), req.keep_alive());
  active_ = ex;
  HttpRequest r;
  r.method = to_string(req.method_string());
  r.target = to_string(req.target());
  r.path = r.target.substr(0, r.target.find('?'));
  r.authorization = to_string(req[http::field::authorization]);
  r.scenario = to_string(req["X-PDServe-Scenario"]);
  r.body = std::move(req.body());
  r.received = HttpClock::now();
  try {
    server_->handler(std::move(r), ex);
  } catch (const std::exception& e) {
    PD_LOG_ERROR("http: request handler failed: {}", e.what());
    if (ex->state == Exchange::State::kOpen) {
      respond(*ex, error_response(500, "internal error while handling the request"));
    } else {
      close();
    }
  }
}

void Connection::respond_error_and_close(int status, std::string message) {
  HttpResponse r = error_response(status, std::move(message));
  queue(response_head(r.status, r.content_type, r.headers, r.body.size(), false));
  queue(r.body);
  after_flush_ = AfterFlush::kGracefulClose;
  flush();
}

HttpResponse Connection::error_response(int status, std::string message) const {
  if (server_->options.error_response) return server_->options.error_response(status, std::move(message));
  return HttpResponse{status, "text/plain; charset=utf-8", message + "\n", {}};
}

void Connection::respond(Exchange& ex, HttpResponse r) {
  if (active_.get() != &ex || ex.state != Exchange::State::kOpen || closed_) return;
  ex.state = Exchange::State::kDone;
  queue(response_head(r.status, r.content_type, r.headers, r.body.size(), ex.keep_alive()));
  queue(r.body);
  after_flush_ = AfterFlush::kResponseDone;
  flush();
}

void Connection::start_stream(Exchange& ex, int status, const std::string& content_type,
                              const HttpHeaders& headers) {
  if (active_.get() != &ex || ex.state != Exchange::State::kOpen || closed_) return;
  ex.state = Exchange::State::kStreaming;
  queue(response_head(status, content_type, headers, std::nullopt, ex.keep_alive()));
  flush();
}

void Connection::write(Exchange& ex, const std::string& data) {
  if (active_.get() != &ex || ex.state != Exchange::State::kStreaming || closed_) return;
  out_next_ += fmt::format("{:x}\r\n", data.size());
  out_next_ += data;
  out_next_ += "\r\n";
  if (out_next_.size() > server_->options.max_buffered_bytes) {
    PD_LOG_WARN("http: closing a connection whose client does not read ({} bytes queued)", out_next_.size());
    return close();
  }
  flush();
}

void Connection::end_stream(Exchange& ex) {
  if (active_.get() != &ex || ex.state != Exchange::State::kStreaming || closed_) return;
  ex.state = Exchange::State::kDone;
  queue("0\r\n\r\n");
  after_flush_ = AfterFlush::kResponseDone;
  flush();
}

void Connection::on_close(Exchange& ex, std::function<void()> fn) {
  if (ex.state == Exchange::State::kClosed) {
    fn();
  } else if (ex.state != Exchange::State::kDone) {
    ex.on_close_fn = std::move(fn);
  }
}

void Connection::queue(std::string_view bytes) { out_next_ += bytes; }

void Connection::flush() {
  if (writing_ || closed_ || out_next_.empty()) return;
  writing_ = true;
  out_current_.swap(out_next_);
  out_next_.clear();
  const uint64_t generation = ++write_generation_;
  write_timer_.expires_after(server_->options.write_timeout);
  write_timer_.async_wait([self = shared_from_this(), generation](beast::error_code ec) {
    if (ec || generation != self->write_generation_ || !self->writing_) return;
    PD_LOG_WARN("http: closing a connection whose client stopped reading (write timeout)");
    self->close();
  });
  net::async_write(socket_, net::buffer(out_current_),
                   [self = shared_from_this()](beast::error_code e, size_t) { self->on_write(e); });
}

void Connection::on_write(beast::error_code ec) {
  writing_ = false;
  ++write_generation_;
  write_timer_.cancel();
  if (closed_) return;
  if (ec) return close();
  out_current_.clear();
  if (!out_next_.empty()) return flush();
  AfterFlush after = after_flush_;
  after_flush_ = AfterFlush::kNothing;
  if (after == AfterFlush::kResponseDone) {
    response_done();
  } else if (after == AfterFlush::kGracefulClose) {
    graceful_close();
  }
}

void Connection::response_done() {
  if (!active_) return;
  bool keep_alive = active_->keep_alive();
  active_->on_close_fn = nullptr;
  active_.reset();
  if (!keep_alive) return graceful_close();
  if (pending_) {
    http::request<http::string_body> next = std::move(*pending_);
    pending_.reset();
    dispatch(std::move(next));
  } else {
    arm_idle_timer();
  }
  read();
}

// Shuts down the send side and waits (bounded) for the client to close, so that a response sent
// before the request was read whole (413) reaches the client instead of a reset.
void Connection::graceful_close() {
  if (closed_ || closing_) return;
  closing_ = true;
  beast::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_send, ec);
  const uint64_t generation = ++idle_generation_;
  idle_timer_.expires_after(std::chrono::seconds(2));
  idle_timer_.async_wait([self = shared_from_this(), generation](beast::error_code e) {
    if (!e && generation == self->idle_generation_) self->close();
  });
  if (!reading_) discard_until_eof();
}

void Connection::discard_until_eof() {
  reading_ = true;
  socket_.async_read_some(net::buffer(discard_), [self = shared_from_this()](beast::error_code ec, size_t) {
    self->reading_ = false;
    if (ec || self->closed_) return self->close();
    self->discard_until_eof();
  });
}

void Connection::close() {
  if (closed_) return;
  closed_ = true;
  ++idle_generation_;
  ++write_generation_;
  idle_timer_.cancel();
  write_timer_.cancel();
  beast::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  pending_.reset();
  if (active_) {
    std::shared_ptr<Exchange> ex = std::move(active_);
    active_.reset();
    std::function<void()> fn = std::move(ex->on_close_fn);
    ex->on_close_fn = nullptr;
    ex->state = Exchange::State::kClosed;
    if (fn) fn();
  }
}

void Connection::arm_idle_timer() {
  const uint64_t generation = ++idle_generation_;
  idle_timer_.expires_after(server_->options.idle_timeout);
  idle_timer_.async_wait([self = shared_from_this(), generation](beast::error_code ec) {
    if (ec || generation != self->idle_generation_ || self->active_) return;
    self->close();
  });
}

}  // namespace

void HttpServer::Impl::register_connection(const std::shared_ptr<Connection>& c) {
  std::lock_guard<std::mutex> lock(mu);
  connections.emplace(c.get(), c);
}

void HttpServer::Impl::unregister_connection(Connection* c) {
  std::lock_guard<std::mutex> lock(mu);
  connections.erase(c);
}

void HttpServer::Impl::close_connections() {
  std::vector<std::shared_ptr<Connection>> open;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& [p, w] : connections) {
      if (auto c = w.lock()) open.push_back(std::move(c));
    }
  }
  for (auto& c : open) c->close_from_server();
}

void HttpServer::Impl::accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (!acceptor.is_open()) return;
    if (ec) {
      // E.g. out of file descriptors: retry shortly instead of spinning.
      PD_LOG_WARN("http: accept failed: {}", ec.message());
      accept_retry.expires_after(std::chrono::milliseconds(50));
      accept_retry.async_wait([this](beast::error_code e) {
        if (!e) accept();
      });
      return;
    }
    if (num_connections.load(std::memory_order_relaxed) >= options.max_connections) {
      PD_LOG_WARN("http: refusing a connection: {} are open (max)", options.max_connections);
      beast::error_code ignored;
      socket.close(ignored);
    } else {
      beast::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);
      auto c = std::make_shared<Connection>(shared_from_this(), std::move(socket));
      register_connection(c);
      c->start();
    }
    accept();
  });
}

HttpServer::HttpServer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { stop(); }

StatusOr<std::unique_ptr<HttpServer>> HttpServer::start(HttpServerOptions options, RequestHandler handler) {
  if (options.num_threads < 1) options.num_threads = 1;
  auto impl = std::make_shared<Impl>(std::move(options), std::move(handler));
  Impl& s = *impl;
  beast::error_code ec;
  net::ip::address address = net::ip::make_address(s.options.host, ec);
  if (ec) {
    return invalid_argument(
        fmt::format("'{}' is not an IP address (use e.g. 127.0.0.1 or 0.0.0.0)", s.options.host));
  }
  tcp::endpoint endpoint(address, s.options.port);
  s.acceptor.open(endpoint.protocol(), ec);
  if (!ec) s.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) s.acceptor.bind(endpoint, ec);
  if (!ec) s.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return unavailable(
        fmt::format("cannot listen on {}:{}: {}", s.options.host, s.options.port, ec.message()));
  }
  s.port = s.acceptor.local_endpoint().port();
  s.work.emplace(s.ioc.get_executor());
  s.accept();
  for (int i = 0; i < s.options.num_threads; ++i) {
    s.num_running_threads.fetch_add(1);
    s.threads.emplace_back([&s] {
      for (;;) {
        try {
          s.ioc.run();
          break;
        } catch (const std::exception& e) {
          PD_LOG_ERROR("http: I/O thread caught: {}", e.what());
        }
      }
      s.num_running_threads.fetch_sub(1);
    });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

uint16_t HttpServer::port() const { return impl_->port; }

int HttpServer::num_connections() const { return impl_->num_connections.load(std::memory_order_relaxed); }

void HttpServer::stop_accepting() {
  Impl& s = *impl_;
  if (s.threads.empty()) return;
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> f = done->get_future();
  net::post(s.acceptor.get_executor(), [&s, done] {
    s.close_acceptor();
    done->set_value();
  });
  f.wait_for(std::chrono::seconds(5));
}

void HttpServer::stop(std::chrono::milliseconds grace) {
  Impl& s = *impl_;
  if (s.stopped) return;
  s.stopped = true;
  stop_accepting();
  s.close_connections();
  s.work.reset();
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (s.num_running_threads.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  {
    std::unique_lock<std::shared_mutex> lock(s.post_mu);
    s.posts_closed = true;
  }
  s.ioc.stop();
  for (auto& t : s.threads) t.join();
  s.threads.clear();
  // What was posted and not run (past the grace, or a channel call racing the threads' exit) runs
  // here: its handlers hold connections, which hold this, so left queued they would never be
  // freed. The connections are closed, so they end quickly; ones they post run too. Should
  // stop_accepting() have given up waiting, the acceptor is closed here, and connections accepted
  // since the first round are closed too.
  s.close_acceptor();
  s.close_connections();
  s.ioc.restart();
  for (;;) {
    try {
      while (s.ioc.poll() > 0) {
      }
      break;
    } catch (const std::exception& e) {
      PD_LOG_ERROR("http: a handler run at shutdown threw: {}", e.what());
    }
  }
}

}  // namespace pdserve::api

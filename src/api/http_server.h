// HttpServer: an asynchronous HTTP/1.1 server (Boost.Beast over Boost.Asio, kept out of this
// header) that holds many keep-alive connections and long-lived streamed responses on a few I/O
// threads. It parses requests (a body limit answers 413, a malformed request 400) and hands each
// to a RequestHandler together with a ResponseChannel through which the handler answers — at
// once, later from any thread, or as a stream of chunks (chunked transfer encoding, for SSE).
//
// Connections: each has a strand, so its handlers never run concurrently. While a response is in
// progress the connection keeps reading: end of stream or an error there means the client went
// away, and the channel's on_close callback fires (that is how a disconnect cancels a request).
// A pipelined next request waits until the current response has ended. A connection idle longer
// than idle_timeout (between requests, or while a request trickles in) is closed; so is one whose
// client stops reading (a write pending for write_timeout, or more than max_buffered_bytes
// queued).
//
// Thread-safety: start() and stop() from one controlling thread; ResponseChannel methods from any
// thread. The handler runs on an I/O thread and must not block for long.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace pdserve::api {

using HttpClock = std::chrono::steady_clock;

struct HttpRequest {
  std::string method;         // "GET", "POST", ...
  std::string target;         // as sent: path and query
  std::string path;           // target without the query
  std::string authorization;  // the Authorization header, or ""
  std::string scenario;       // the X-PDServe-Scenario header, or ""
  std::string body;
  HttpClock::time_point received;  // when the whole request had arrived
};

// True when an Authorization header value is "Bearer TOKEN" (the scheme in any case; the token
// compared in constant time).
bool bearer_matches(std::string_view authorization, std::string_view token);

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  HttpHeaders headers;
};

// One exchange's response side. Exactly one of respond() or start_stream() ... end_stream() ends
// it; calls after the end, or after the client went away, are ignored. Thread-safe. A channel may
// be kept past the server's stop() and destruction, and released at any time. Calls made once
// stop() has ended its grace wait do nothing (functions given to on_close() and post() are
// destroyed unrun); ones made before may still run, on an I/O thread or on the thread in stop()
// (so the server is best stopped without holding locks those functions take).
class ResponseChannel {
 public:
  virtual ~ResponseChannel() = default;
  // A whole response with a Content-Length.
  virtual void respond(HttpResponse response) = 0;
  // The status line and headers of a streamed response (Transfer-Encoding: chunked).
  virtual void start_stream(int status, std::string content_type, HttpHeaders headers = {}) = 0;
  // One piece of the stream, sent as one chunk (empty data is skipped).
  virtual void write(std::string data) = 0;
  virtual void end_stream() = 0;
  // Calls `fn` once, on the connection's strand, if the connection closes before the response
  // ended (client gone, timeouts, server shutdown). If that already happened, `fn` runs soon.
  virtual void on_close(std::function<void()> fn) = 0;
  // Runs `fn` on the connection's strand (also after the connection closed), in posting order:
  // handlers use it to take results from other threads (the engine's) onto the connection.
  virtual void post(std::function<void()> fn) = 0;
};

using RequestHandler = std::function<void(HttpRequest request, std::shared_ptr<ResponseChannel> channel)>;

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;  // 0: any free port (see HttpServer::port())
  int num_threads = 2;
  size_t max_body_bytes = size_t{8} << 20;
  size_t max_header_bytes = size_t{64} << 10;
  std::chrono::milliseconds idle_timeout{60'000};
  std::chrono::milliseconds write_timeout{60'000};
  size_t max_buffered_bytes = size_t{16} << 20;  // per connection, not yet written
  int max_connections = 16384;
  // Builds the body of an error the server answers itself (400 malformed HTTP, 413).
  std::function<HttpResponse(int status, std::string message)> error_response;
};

class HttpServer {
 public:
  // Binds, listens and starts the I/O threads. Errors: kInvalidArgument (bad host), kUnavailable
  // (the address is in use or cannot be bound).
  static StatusOr<std::unique_ptr<HttpServer>> start(HttpServerOptions options, RequestHandler handler);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  uint16_t port() const;
  // Closes the listening socket; open connections go on.
  void stop_accepting();
  int num_connections() const;
  // Closes every connection (their on_close callbacks fire), lets the I/O threads finish what is
  // posted for up to `grace`, joins them, and runs on the calling thread what is still posted.
  // ResponseChannel calls made once the grace wait has ended do nothing. Idempotent.
  void stop(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));

  struct Impl;  // the Beast/Asio side, in http_server.cpp

 private:
  explicit HttpServer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace pdserve::api

// The load generator's HTTP/1.1 client: drives an OpenAI-compatible server with many concurrent
// streamed completions from one process (Boost.Asio/Beast, asynchronous; Beast stays inside
// client.cpp), and records what happened to each request (bench/stats.h).
//
// Threads: run() uses `client_threads` threads, each with its own event loop and a share of the
// requests (and of the closed-loop users), plus the calling thread, which only reports progress.
// A record is written by one event-loop thread and read by the caller after run() returns. The
// blocking helpers (get, post_json) are for before and after a run; they may be called from any
// thread, one connection per call.
//
// Error types recorded per request: "connect" (no connection), "http_<status>" (a non-200
// answer), "timeout" (no byte for --timeout seconds), "disconnected" (the connection closed
// before the response was complete), "stream_error" (an error event inside the stream),
// "protocol" (a malformed HTTP response), "cancelled" (still running when the run was stopped).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "bench/stats.h"
#include "common/status.h"

namespace pdserve::bench {

struct Endpoint {
  std::string host = "127.0.0.1";
  std::string port = "8000";
  std::string base_path;  // put before every route ("" or e.g. "/proxy"; no trailing '/')
  std::string api_key;    // sent as "Authorization: Bearer KEY" when not empty
};
// "http://HOST[:PORT][/PATH]" (https is not supported).
StatusOr<Endpoint> parse_base_url(std::string_view url);

struct HttpResult {
  int status = 0;
  std::string content_type;
  std::string body;
};

// A request ready to send: route, JSON body, when.
struct PreparedRequest {
  int64_t id = 0;
  double arrival_s = 0;  // open loop
  int32_t scenario_idx = 0;
  std::string scenario;  // sent as the X-Scenario header
  std::string path;      // "/v1/completions" or "/v1/chat/completions"
  std::string body;
  int32_t planned_input_tokens = 0;
  int32_t planned_output_tokens = 0;
};

struct RunOptions {
  bool closed_loop = false;
  int32_t users = 1;           // closed loop: concurrent users, each sends its next request
                               // when the last one completes
  double duration_s = 0;       // closed loop: start no request after this (0: none)
  int32_t max_in_flight = 0;   // open loop: requests wait (and lag) beyond this (0: no cap)
  int32_t client_threads = 1;  // event-loop threads
  double timeout_s = 300;      // a request fails when no byte arrives for this long
  bool keep_alive = true;      // reuse connections between requests
  bool save_chunk_times = true;
};

struct Progress {
  int64_t started = 0;
  int64_t finished = 0;
  int64_t errors = 0;
  int64_t output_chunks = 0;
};

// What one `data:` event of a streamed completion means for the request (exposed for tests).
enum class StreamEvent { kContent, kUsage, kContentAndUsage, kDone, kError, kOther, kMalformed };
// Updates `record` for the event (content chunk at time now_s, usage, error message).
StreamEvent apply_stream_event(std::string_view data, double now_s, bool save_chunk_times,
                               RequestRecord& record);

class LoadClient {
 public:
  // Resolves the host (errors: an unknown host).
  static StatusOr<std::unique_ptr<LoadClient>> create(const Endpoint& endpoint);
  // Several servers of one deployment (e.g. gateways over the same instances): run() sends request
  // i to endpoints[i mod n] (RequestRecord::endpoint); get() and post_json() use the first.
  static StatusOr<std::unique_ptr<LoadClient>> create(const std::vector<Endpoint>& endpoints);
  ~LoadClient();
  LoadClient(const LoadClient&) = delete;
  LoadClient& operator=(const LoadClient&) = delete;

  const Endpoint& endpoint() const;  // the first
  size_t num_endpoints() const;

  // Blocking requests (their own connection, `timeout_s` in all). A non-2xx status is a result,
  // not an error; errors are connection failures and timeouts.
  StatusOr<HttpResult> get(const std::string& path, double timeout_s = 10) const;
  // get() from endpoints[server].
  StatusOr<HttpResult> get_from(size_t server, const std::string& path, double timeout_s = 10) const;
  StatusOr<HttpResult> post_json(const std::string& path, const std::string& body,
                                 double timeout_s = 30) const;

  // Sends `requests` (open loop: at their arrival times; closed loop: in order, by the users)
  // and returns one record per request, in the same order. When `stop` becomes true, no new
  // request starts and those in flight are cancelled (their records say "cancelled"; requests
  // never started keep send_s = -1 and say "not_sent"). `on_tick` runs on the
  // calling thread about every tick_s seconds.
  std::vector<RequestRecord> run(const std::vector<PreparedRequest>& requests, const RunOptions& options,
                                 const std::atomic<bool>& stop,
                                 const std::function<void(const Progress&, double elapsed_s)>& on_tick,
                                 double tick_s = 1.0);

  struct Impl;  // opaque: defined in client.cpp

 private:
  explicit LoadClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pdserve::bench

// ApiService: the OpenAI-compatible API of one engine — routing, API-key check, request parsing,
// chat templates and tokenization, submission to the Engine, and the answers (JSON or SSE),
// plus /health, /metrics, /v1/models, /tokenize and /detokenize. It is the HttpServer's
// RequestHandler; it knows nothing of sockets.
//
// Life cycle: constructed before the model loads (every model route answers 503 and /health
// 503 "loading"), set_ready() once the engine runs, set_draining() at shutdown (/health and new
// generation requests answer 503 "draining"; running ones go on).
//
// One generation request becomes a Job with one engine request per choice (prompts × n). The
// engine's OutputSink only posts each output to the request's connection strand; all of a Job's
// state lives on that strand. A client that goes away (the channel's on_close) cancels every
// engine request of its Job. TTFT, TPOT and end-to-end latency are measured here, from the moment
// the whole HTTP request had arrived.
//
// Thread-safety: handle() runs on I/O threads, any number at once; set_ready(), set_draining()
// and the accessors are thread-safe. The Backend's objects must outlive the service's use of
// them: until the HTTP server has stopped and the engine has been destroyed.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "api/api_error.h"
#include "api/http_server.h"
#include "api/protocol.h"
#include "engine/engine.h"
#include "metrics/metrics.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace pdserve::api {

struct ServiceOptions {
  std::string served_model_name;  // what clients pass as "model" and /v1/models lists
  // More names clients may pass as "model" (a gateway's scenario model names); listed too.
  std::vector<std::string> model_aliases;
  std::string api_key;  // empty: no authentication
};

// What a request tells about its scenario, for a gateway's labelling.
struct ScenarioHints {
  std::string header;         // X-PDServe-Scenario, or ""
  std::string metadata;       // the body's metadata.scenario, or ""
  std::string model;          // the body's "model", or ""
  std::string system_prompt;  // chat: the first system message; completions: the prompt text
};
// The scenario of a request (EngineRequest::scenario), or kInvalidArgument for the client.
using ScenarioLabeler = std::function<StatusOr<std::string>(const ScenarioHints&)>;

// What serving needs once the model is loaded (not owned).
struct Backend {
  GenerationBackend* engine = nullptr;  // one Engine, or a prefill/decode router
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;  // nullptr: the model has none (chat answers 400)
  ScenarioLabeler label;                        // empty: every request in the one scenario
};

class ApiService {
 public:
  explicit ApiService(ServiceOptions options);
  ~ApiService();
  ApiService(const ApiService&) = delete;
  ApiService& operator=(const ApiService&) = delete;

  // The HttpServer's RequestHandler.
  void handle(HttpRequest request, std::shared_ptr<ResponseChannel> channel);

  void set_ready(const Backend& backend);
  void set_draining();
  bool ready() const;
  // Generation requests whose answer has not ended.
  int64_t num_in_flight() const { return in_flight_.load(std::memory_order_relaxed); }

  // Error answers in the API's format, for the HTTP server's own errors (400, 413, 431).
  HttpResponse error_response(int status, std::string message) const;

  metrics::Registry& registry() { return registry_; }
  // Records one engine step (EngineOptions::on_step): duration and tokens computed. Thread-safe.
  void observe_step(double step_seconds, int32_t step_tokens);

  const std::string& served_model_name() const { return options_.served_model_name; }

 private:
  enum class State { kLoading, kReady, kDraining };
  struct Job;             // one generation request (service.cpp)
  struct PreparedPrompt;  // a tokenized prompt (service.cpp)

  void reply(ResponseChannel& channel, std::string_view endpoint, HttpResponse response);
  bool serves_model(const std::string& model) const;
  // The request's scenario by the backend's labeller ("" without one), or the error to answer.
  StatusOr<std::string> label_scenario(const Backend& backend, const HttpRequest& request,
                                       const GenerationParams& params, std::string system_prompt) const;
  void reply_error(ResponseChannel& channel, std::string_view endpoint, const ApiError& error);
  void count_status(std::string_view endpoint, int status);
  bool authorized(const HttpRequest& request) const;
  std::optional<ApiError> check_model(const std::string& model) const;
  std::optional<Backend> backend_or_error(ResponseChannel& channel, std::string_view endpoint);

  void handle_chat(HttpRequest& request, std::shared_ptr<ResponseChannel> channel);
  void handle_completion(HttpRequest& request, std::shared_ptr<ResponseChannel> channel);
  // Validates every engine request, then submits them all (or none) and starts the answer.
  void start_generation(const std::shared_ptr<Job>& job, const GenerationParams& params,
                        std::vector<PreparedPrompt> prompts, std::string scenario);
  void handle_tokenize(HttpRequest& request, ResponseChannel& channel);
  void handle_detokenize(HttpRequest& request, ResponseChannel& channel);
  void handle_models(const HttpRequest& request, ResponseChannel& channel);
  void collect_engine_metrics(metrics::TextWriter& w) const;

  ServiceOptions options_;
  int64_t created_unix_;
  std::atomic<State> state_{State::kLoading};
  mutable std::mutex mu_;
  Backend backend_;  // guarded by mu_; set once by set_ready()
  std::atomic<int64_t> in_flight_{0};

  metrics::Registry registry_;
  metrics::Histogram* ttft_;
  metrics::Histogram* tpot_;
  metrics::Histogram* e2e_;
  metrics::Histogram* step_seconds_;
  metrics::Histogram* step_tokens_;
  metrics::Counter* disconnects_;
  metrics::Gauge* in_flight_gauge_;
};

}  // namespace pdserve::api

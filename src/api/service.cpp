#include "api/service.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <ctime>
#include <map>
#include <random>

#include "api/protocol.h"
#include "common/log.h"

namespace pdserve::api {

namespace {

uint64_t random_u64() {
  thread_local std::mt19937_64 rng = [] {
    std::random_device rd;
    std::seed_seq seq{rd(), rd(), rd(), rd()};
    return std::mt19937_64(seq);
  }();
  return rng();
}

std::string random_id(std::string_view prefix) {
  return fmt::format("{}{:016x}{:08x}", prefix, random_u64(), random_u64() & 0xffffffffu);
}

double seconds(HttpClock::duration d) { return std::chrono::duration<double>(d).count(); }

HttpResponse json_response(int status, std::string body, HttpHeaders headers = {}) {
  return HttpResponse{status, std::string(kJsonContentType), std::move(body), std::move(headers)};
}

struct RouteSpec {
  std::string_view path;
  std::string_view method;
};
constexpr std::array<RouteSpec, 7> kRoutes = {{
    {"/health", "GET"},
    {"/metrics", "GET"},
    {"/v1/models", "GET"},
    {"/v1/chat/completions", "POST"},
    {"/v1/completions", "POST"},
    {"/tokenize", "POST"},
    {"/detokenize", "POST"},
}};
constexpr std::string_view kModelPrefix = "/v1/models/";

const std::vector<double> kTtftBuckets = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60};
const std::vector<double> kTpotBuckets = {0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                          0.15,  0.2,  0.3,  0.5,  1,    2.5};
const std::vector<double> kE2eBuckets = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320};
const std::vector<double> kStepBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
const std::vector<double> kStepTokenBuckets = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};

}  // namespace

// One generation request: its engine requests (one per choice) and the answer being built. Every
// member is touched on the connection's strand only (handle(), posted outputs, on_close).
struct ApiService::Job : std::enable_shared_from_this<ApiService::Job> {
  struct Choice {
    std::shared_ptr<RequestHandle> handle;
    std::string echo;  // completions with echo: the prompt text, put in front
    std::string text;  // non-streaming: the answer so far
    std::vector<TokenLogprobs> logprobs;
    int64_t text_offset = 0;  // completions: offset of the next token's text
    bool finished = false;
    std::string finish_reason;
    int32_t prompt_tokens = 0;
    int32_t completion_tokens = 0;
    int32_t cached_tokens = 0;
    std::optional<HttpClock::time_point> first_token;
    HttpClock::time_point last_token;
  };

  Job(ApiService* s, std::shared_ptr<ResponseChannel> ch) : service(s), channel(std::move(ch)) {
    service->in_flight_.fetch_add(1, std::memory_order_relaxed);
    service->in_flight_gauge_->inc();
  }
  ~Job() {
    service->in_flight_.fetch_sub(1, std::memory_order_relaxed);
    service->in_flight_gauge_->dec();
  }

  void on_output(size_t i, EngineOutput& out);
  void fail(const EngineOutput& out);
  void complete();
  void client_gone();
  void cancel_all();
  void observe_latencies(const Choice& c, HttpClock::time_point now);

  ApiService* service;
  std::shared_ptr<ResponseChannel> channel;
  Backend backend;
  Endpoint endpoint = Endpoint::kChatCompletions;
  std::string endpoint_name;
  ResponseMeta meta;
  bool stream = false;
  bool include_usage = false;
  bool logprobs = false;
  int32_t n = 1;
  HttpClock::time_point received;
  std::vector<Choice> choices;
  size_t remaining = 0;
  bool ended = false;  // the answer ended: complete, failed, or the client went away
};

void ApiService::Job::on_output(size_t i, EngineOutput& out) {
  Choice& c = choices[i];
  const auto now = HttpClock::now();
  if (!out.tokens.empty()) {
    if (!c.first_token) c.first_token = now;
    c.last_token = now;
  }
  if (out.finished) {
    c.finished = true;
    c.finish_reason = out.finish_reason;
    c.prompt_tokens = out.prompt_tokens;
    c.completion_tokens = out.completion_tokens;
    c.cached_tokens = out.cached_prompt_tokens;
    --remaining;
    if (out.finish_reason == "stop" || out.finish_reason == "length") observe_latencies(c, now);
  }
  if (ended) return;
  if (out.finished && out.finish_reason != "stop" && out.finish_reason != "length") return fail(out);

  std::vector<TokenLogprobs> lps;
  if (logprobs) {
    const Tokenizer& tok = *backend.tokenizer;
    for (const GeneratedToken& g : out.tokens) {
      TokenLogprobs t;
      t.token = std::string(tok.token_piece(g.id));
      t.logprob = g.logprob;
      for (const TokenLogprob& a : g.top) t.top.push_back({std::string(tok.token_piece(a.token)), a.logprob});
      lps.push_back(std::move(t));
    }
  }
  const int64_t offset = c.text_offset;
  for (const TokenLogprobs& t : lps) c.text_offset += static_cast<int64_t>(t.token.size());

  if (stream) {
    ChoiceResult d;
    d.index = static_cast<int32_t>(i);
    d.text = std::move(out.text);
    d.logprobs = !lps.empty();
    d.token_logprobs = std::move(lps);
    d.text_offset = offset;
    if (!d.text.empty() || d.logprobs) {
      channel->write(sse_data(endpoint == Endpoint::kChatCompletions
                                  ? chat_chunk(meta, d, false, include_usage)
                                  : completion_chunk(meta, d, include_usage)));
    }
    if (out.finished) {
      ChoiceResult f;
      f.index = static_cast<int32_t>(i);
      f.finish_reason = c.finish_reason;
      channel->write(sse_data(endpoint == Endpoint::kChatCompletions
                                  ? chat_chunk(meta, f, false, include_usage)
                                  : completion_chunk(meta, f, include_usage)));
    }
  } else {
    c.text += out.text;
    for (auto& t : lps) c.logprobs.push_back(std::move(t));
  }
  if (remaining == 0) complete();
}

void ApiService::Job::observe_latencies(const Choice& c, HttpClock::time_point now) {
  service->e2e_->observe(seconds(now - received));
  if (c.first_token) {
    service->ttft_->observe(seconds(*c.first_token - received));
    if (c.completion_tokens >= 2) {
      service->tpot_->observe(seconds(c.last_token - *c.first_token) / (c.completion_tokens - 1));
    }
  }
}

void ApiService::Job::fail(const EngineOutput& out) {
  ended = true;
  cancel_all();
  ApiError e;
  if (out.finish_reason == "cancelled") {
    e = http_error(503, "the request was cancelled: the server is shutting down", "cancelled");
  } else {
    e = api_error(out.error.ok() ? internal_error("generation failed") : out.error);
    e.message = "generation failed: " + e.message;
  }
  PD_LOG_WARN("api: request {} failed: {}", meta.id, e.message);
  if (stream) {
    channel->write(sse_data(error_body(e)));
    channel->write(std::string(kSseDone));
    channel->end_stream();
  } else {
    service->reply_error(*channel, endpoint_name, e);
  }
}

void ApiService::Job::complete() {
  ended = true;
  Usage usage;
  for (size_t i = 0; i < choices.size(); ++i) {
    const Choice& c = choices[i];
    if (i % static_cast<size_t>(n) == 0) {  // the prompt counts once, however many choices share it
      usage.prompt_tokens += c.prompt_tokens;
      usage.cached_tokens += c.cached_tokens;
    }
    usage.completion_tokens += c.completion_tokens;
  }
  if (stream) {
    if (include_usage) channel->write(sse_data(usage_chunk(meta, endpoint, usage)));
    channel->write(std::string(kSseDone));
    channel->end_stream();
    return;
  }
  std::vector<ChoiceResult> results;
  for (size_t i = 0; i < choices.size(); ++i) {
    Choice& c = choices[i];
    ChoiceResult r;
    r.index = static_cast<int32_t>(i);
    r.text = c.echo + c.text;
    r.finish_reason = c.finish_reason;
    r.logprobs = logprobs;
    r.token_logprobs = std::move(c.logprobs);
    r.text_offset = static_cast<int64_t>(c.echo.size());
    results.push_back(std::move(r));
  }
  std::string body = endpoint == Endpoint::kChatCompletions ? chat_completion_body(meta, results, usage)
                                                            : completion_body(meta, results, usage);
  service->reply(*channel, endpoint_name, json_response(200, std::move(body)));
}

void ApiService::Job::client_gone() {
  if (ended) return;
  ended = true;
  cancel_all();
  service->disconnects_->inc();
  if (!stream) {
    // No status was sent: counted as nginx's 499 (client closed request).
    service->count_status(endpoint_name, 499);
  }
}

void ApiService::Job::cancel_all() {
  for (Choice& c : choices) {
    if (c.handle && !c.finished) c.handle->cancel();
  }
}

ApiService::ApiService(ServiceOptions options)
    : options_(std::move(options)), created_unix_(static_cast<int64_t>(std::time(nullptr))) {
  ttft_ = &registry_.histogram("pdserve_time_to_first_token_seconds",
                               "Time from a request's arrival to its first generated token (per choice).",
                               kTtftBuckets);
  tpot_ =
      &registry_.histogram("pdserve_time_per_output_token_seconds",
                           "Mean time between a choice's generated tokens after the first.", kTpotBuckets);
  e2e_ = &registry_.histogram("pdserve_e2e_request_latency_seconds",
                              "Time from a request's arrival to a choice's last token (finished choices).",
                              kE2eBuckets);
  step_seconds_ = &registry_.histogram("pdserve_engine_step_duration_seconds",
                                       "Duration of engine steps that ran the model.", kStepBuckets);
  step_tokens_ = &registry_.histogram("pdserve_engine_step_tokens",
                                      "Tokens computed per engine step (prefill chunks plus decodes).",
                                      kStepTokenBuckets);
  disconnects_ = &registry_.counter("pdserve_client_disconnects_total",
                                    "Generation requests cancelled because the client went away.");
  in_flight_gauge_ =
      &registry_.gauge("pdserve_requests_in_flight", "Generation requests whose answer has not ended.");
  registry_.add_collector([this](metrics::TextWriter& w) { collect_engine_metrics(w); });
}

ApiService::~ApiService() = default;

void ApiService::observe_step(double step_seconds, int32_t step_tokens) {
  step_seconds_->observe(step_seconds);
  step_tokens_->observe(step_tokens);
}

void ApiService::set_ready(const Backend& backend) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    backend_ = backend;
  }
  state_.store(State::kReady);
}

void ApiService::set_draining() { state_.store(State::kDraining); }

bool ApiService::ready() const { return state_.load() == State::kReady; }

HttpResponse ApiService::error_response(int status, std::string message) const {
  std::string code = status == 413   ? "request_too_large"
                     : status == 431 ? "headers_too_large"
                                     : "invalid_request";
  ApiError e = http_error(status, std::move(message), std::move(code));
  return json_response(status, error_body(e));
}

void ApiService::count_status(std::string_view endpoint, int status) {
  registry_
      .counter("pdserve_http_requests_total", "HTTP requests answered, by endpoint and status code.",
               {{"endpoint", std::string(endpoint)}, {"status", std::to_string(status)}})
      .inc();
}

void ApiService::reply(ResponseChannel& channel, std::string_view endpoint, HttpResponse response) {
  count_status(endpoint, response.status);
  channel.respond(std::move(response));
}

void ApiService::reply_error(ResponseChannel& channel, std::string_view endpoint, const ApiError& error) {
  reply(channel, endpoint, json_response(error.http_status, error_body(error), error.headers));
}

bool bearer_matches(std::string_view authorization, std::string_view token) {
  constexpr std::string_view kBearer = "Bearer ";
  std::string_view h = authorization;
  if (h.size() < kBearer.size() || !std::equal(kBearer.begin(), kBearer.end(), h.begin(), [](char a, char b) {
        return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b));
      })) {
    return false;
  }
  h.remove_prefix(kBearer.size());
  if (h.size() != token.size()) return false;
  unsigned char diff = 0;  // constant time: no early exit on the first difference
  for (size_t i = 0; i < h.size(); ++i) diff |= static_cast<unsigned char>(h[i] ^ token[i]);
  return diff == 0;
}

bool ApiService::authorized(const HttpRequest& request) const {
  return options_.api_key.empty() || bearer_matches(request.authorization, options_.api_key);
}

bool ApiService::serves_model(const std::string& model) const {
  if (model == options_.served_model_name) return true;
  for (const std::string& a : options_.model_aliases) {
    if (model == a) return true;
  }
  return false;
}

std::optional<ApiError> ApiService::check_model(const std::string& model) const {
  if (model.empty() || serves_model(model)) return std::nullopt;
  ApiError e = http_error(400,
                          fmt::format("the model '{}' does not exist; this server serves '{}'", model,
                                      options_.served_model_name),
                          "model_not_found");
  e.param = "model";
  return e;
}

std::optional<Backend> ApiService::backend_or_error(ResponseChannel& channel, std::string_view endpoint) {
  State s = state_.load();
  if (s == State::kReady) {
    std::lock_guard<std::mutex> lock(mu_);
    return backend_;
  }
  ApiError e =
      s == State::kLoading
          ? http_error(503, "the model is still loading; retry when GET /health answers 200", "model_loading")
          : http_error(503, "the server is shutting down", "shutting_down");
  e.headers.emplace_back("Retry-After", s == State::kLoading ? "5" : "1");
  reply_error(channel, endpoint, e);
  return std::nullopt;
}

void ApiService::handle(HttpRequest request, std::shared_ptr<ResponseChannel> channel) {
  std::string_view endpoint = "other";
  std::string_view method;
  for (const RouteSpec& r : kRoutes) {
    if (request.path == r.path) {
      endpoint = r.path;
      method = r.method;
    }
  }
  if (request.path.size() > kModelPrefix.size() && request.path.starts_with(kModelPrefix)) {
    endpoint = "/v1/models/{id}";
    method = "GET";
  }
  if (endpoint != "/health" && !authorized(request)) {
    ApiError e =
        http_error(401,
                   options_.api_key.empty() ? "unauthorized"
                                            : "missing or wrong API key: send the header "
                                              "'Authorization: Bearer <key>' with the server's --api-key",
                   "invalid_api_key");
    e.headers.emplace_back("WWW-Authenticate", "Bearer");
    return reply_error(*channel, endpoint, e);
  }
  if (endpoint == "other") {
    return reply_error(
        *channel, endpoint,
        http_error(404,
                   fmt::format("no route {} {}: see GET /v1/models, POST /v1/chat/completions, "
                               "POST /v1/completions, /tokenize, /detokenize, /health, /metrics",
                               request.method, request.path),
                   "not_found"));
  }
  if (request.method != method) {
    ApiError e = http_error(
        405, fmt::format("{} does not take {} requests; use {}", request.path, request.method, method),
        "method_not_allowed");
    e.headers.emplace_back("Allow", std::string(method));
    return reply_error(*channel, endpoint, e);
  }

  if (endpoint == "/health") {
    State s = state_.load();
    int status = s == State::kReady ? 200 : 503;
    std::string_view word = s == State::kReady ? "ok" : s == State::kLoading ? "loading" : "draining";
    return reply(*channel, endpoint, json_response(status, health_body(word)));
  }
  if (endpoint == "/metrics") {
    return reply(*channel, endpoint,
                 HttpResponse{200, std::string(metrics::kTextContentType), registry_.render(), {}});
  }
  if (endpoint == "/v1/models" || endpoint == "/v1/models/{id}") return handle_models(request, *channel);
  if (endpoint == "/tokenize") return handle_tokenize(request, *channel);
  if (endpoint == "/detokenize") return handle_detokenize(request, *channel);
  if (endpoint == "/v1/chat/completions") return handle_chat(request, std::move(channel));
  handle_completion(request, std::move(channel));
}

void ApiService::handle_models(const HttpRequest& request, ResponseChannel& channel) {
  const bool one = request.path != "/v1/models";
  std::string_view endpoint = one ? "/v1/models/{id}" : "/v1/models";
  std::optional<Backend> b = backend_or_error(channel, endpoint);
  if (!b) return;
  const int32_t max_context = b->engine->max_context();
  if (!one) {
    std::vector<std::string> names = {options_.served_model_name};
    for (const std::string& a : options_.model_aliases) {
      if (std::find(names.begin(), names.end(), a) == names.end()) names.push_back(a);
    }
    return reply(channel, endpoint, json_response(200, models_body(names, created_unix_, max_context)));
  }
  std::string id = request.path.substr(kModelPrefix.size());
  if (!serves_model(id)) {
    return reply_error(channel, endpoint,
                       http_error(404,
                                  fmt::format("the model '{}' does not exist; this server serves '{}'", id,
                                              options_.served_model_name),
                                  "model_not_found"));
  }
  reply(channel, endpoint, json_response(200, model_body(id, created_unix_, max_context)));
}

void ApiService::handle_tokenize(HttpRequest& request, ResponseChannel& channel) {
  constexpr std::string_view kEndpoint = "/tokenize";
  auto parsed = parse_tokenize_request(request.body);
  if (!parsed.ok()) return reply_error(channel, kEndpoint, parsed.error());
  if (auto e = check_model(parsed.value().model)) return reply_error(channel, kEndpoint, *e);
  std::optional<Backend> b = backend_or_error(channel, kEndpoint);
  if (!b) return;
  const TokenizeRequest& r = parsed.value();
  std::vector<int32_t> tokens = b->tokenizer->encode(r.text, r.add_special, r.parse_special);
  reply(channel, kEndpoint, json_response(200, tokenize_body(tokens, b->engine->max_context())));
}

void ApiService::handle_detokenize(HttpRequest& request, ResponseChannel& channel) {
  constexpr std::string_view kEndpoint = "/detokenize";
  auto parsed = parse_detokenize_request(request.body);
  if (!parsed.ok()) return reply_error(channel, kEndpoint, parsed.error());
  if (auto e = check_model(parsed.value().model)) return reply_error(channel, kEndpoint, *e);
  std::optional<Backend> b = backend_or_error(channel, kEndpoint);
  if (!b) return;
  const std::vector<int32_t>& tokens = parsed.value().tokens;
  const int32_t vocab = b->tokenizer->vocab_size();
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] >= vocab) {
      ApiError e =
          http_error(400, fmt::format("token id {} is outside the vocabulary (0..{})", tokens[i], vocab - 1),
                     "invalid_value");
      e.param = fmt::format("tokens[{}]", i);
      return reply_error(channel, kEndpoint, e);
    }
  }
  reply(channel, kEndpoint, json_response(200, detokenize_body(b->tokenizer->decode(tokens))));
}

// A prompt ready for the engine, with what echo puts in front of its answers.
struct ApiService::PreparedPrompt {
  std::vector<int32_t> tokens;
  std::string echo;
};

void ApiService::handle_chat(HttpRequest& request, std::shared_ptr<ResponseChannel> channel) {
  constexpr std::string_view kEndpoint = "/v1/chat/completions";
  auto parsed = parse_chat_completion_request(request.body);
  if (!parsed.ok()) return reply_error(*channel, kEndpoint, parsed.error());
  ChatCompletionRequest& r = parsed.value();
  if (auto e = check_model(r.params.model)) return reply_error(*channel, kEndpoint, *e);
  std::optional<Backend> b = backend_or_error(*channel, kEndpoint);
  if (!b) return;
  if (!b->chat_template) {
    return reply_error(*channel, kEndpoint,
                       http_error(400, "the model has no chat template: use /v1/completions with a prompt",
                                  "unsupported_endpoint"));
  }
  std::string system_prompt;
  for (const ChatMessage& m : r.messages) {
    if (m.role == "system") {
      system_prompt = m.content;
      break;
    }
  }
  StatusOr<std::string> scenario = label_scenario(*b, request, r.params, std::move(system_prompt));
  if (!scenario.ok())
    return reply_error(*channel, kEndpoint, api_error(scenario.status(), "scenario", "unknown_scenario"));
  const Tokenizer& tok = *b->tokenizer;
  ChatTemplateInputs inputs;
  inputs.messages = std::move(r.messages);
  inputs.add_generation_prompt = true;
  inputs.bos_token = tok.bos_id() >= 0 ? std::string(tok.token_text(tok.bos_id())) : "";
  inputs.eos_token = tok.eos_id() >= 0 ? std::string(tok.token_text(tok.eos_id())) : "";
  StatusOr<std::string> text = b->chat_template->render(inputs);
  if (!text.ok()) {
    Status st = text.status();
    return reply_error(
        *channel, kEndpoint,
        api_error(Status(StatusCode::kInvalidArgument, "the chat template failed: " + st.message()),
                  "messages"));
  }
  // The template may write the BOS token itself; never put a second one in front.
  bool add_special = !(tok.bos_id() >= 0 && !inputs.bos_token.empty() && text->starts_with(inputs.bos_token));
  std::vector<PreparedPrompt> prompts(1);
  prompts[0].tokens = tok.encode(*text, add_special, /*parse_special=*/true);

  auto job = std::make_shared<Job>(this, std::move(channel));
  job->backend = *b;
  job->endpoint = Endpoint::kChatCompletions;
  job->endpoint_name = std::string(kEndpoint);
  job->meta.id = random_id("chatcmpl-");
  job->received = request.received;
  start_generation(job, r.params, std::move(prompts), std::move(scenario).value());
}

void ApiService::handle_completion(HttpRequest& request, std::shared_ptr<ResponseChannel> channel) {
  constexpr std::string_view kEndpoint = "/v1/completions";
  auto parsed = parse_completion_request(request.body);
  if (!parsed.ok()) return reply_error(*channel, kEndpoint, parsed.error());
  CompletionRequest& r = parsed.value();
  if (auto e = check_model(r.params.model)) return reply_error(*channel, kEndpoint, *e);
  std::optional<Backend> b = backend_or_error(*channel, kEndpoint);
  if (!b) return;
  StatusOr<std::string> scenario = label_scenario(
      *b, request, r.params, r.prompts.empty() || r.prompts[0].is_tokens ? std::string() : r.prompts[0].text);
  if (!scenario.ok())
    return reply_error(*channel, kEndpoint, api_error(scenario.status(), "scenario", "unknown_scenario"));
  const Tokenizer& tok = *b->tokenizer;
  const int32_t vocab = tok.vocab_size();
  std::vector<PreparedPrompt> prompts;
  for (size_t p = 0; p < r.prompts.size(); ++p) {
    PromptInput& in = r.prompts[p];
    PreparedPrompt pp;
    if (in.is_tokens) {
      for (size_t i = 0; i < in.tokens.size(); ++i) {
        if (in.tokens[i] >= vocab) {
          ApiError e = http_error(
              400, fmt::format("token id {} is outside the vocabulary (0..{})", in.tokens[i], vocab - 1),
              "invalid_value");
          e.param = r.prompts.size() > 1 ? fmt::format("prompt[{}][{}]", p, i) : fmt::format("prompt[{}]", i);
          return reply_error(*channel, kEndpoint, e);
        }
      }
      pp.tokens = std::move(in.tokens);
      if (r.echo) pp.echo = tok.decode(pp.tokens);
    } else {
      pp.tokens = tok.encode(in.text, /*add_special=*/true, /*parse_special=*/true);
      if (r.echo) pp.echo = std::move(in.text);
    }
    prompts.push_back(std::move(pp));
  }
  auto job = std::make_shared<Job>(this, std::move(channel));
  job->backend = *b;
  job->endpoint = Endpoint::kCompletions;
  job->endpoint_name = std::string(kEndpoint);
  job->meta.id = random_id("cmpl-");
  job->received = request.received;
  start_generation(job, r.params, std::move(prompts), std::move(scenario).value());
}

StatusOr<std::string> ApiService::label_scenario(const Backend& backend, const HttpRequest& request,
                                                 const GenerationParams& params,
                                                 std::string system_prompt) const {
  if (!backend.label) return std::string();
  ScenarioHints hints;
  hints.header = request.scenario;
  hints.metadata = params.scenario;
  hints.model = params.model;
  hints.system_prompt = std::move(system_prompt);
  return backend.label(hints);
}

void ApiService::start_generation(const std::shared_ptr<Job>& job, const GenerationParams& params,
                                  std::vector<PreparedPrompt> prompts, std::string scenario) {
  GenerationBackend& engine = *job->backend.engine;
  const bool chat = job->endpoint == Endpoint::kChatCompletions;
  const std::string prompt_param = chat ? "messages" : "prompt";
  job->meta.created = static_cast<int64_t>(std::time(nullptr));
  job->meta.model = params.model.empty() ? options_.served_model_name : params.model;  // as asked
  job->stream = params.stream;
  job->include_usage = params.include_usage;
  job->logprobs = params.logprobs;
  job->n = params.n;

  // The most a sequence can hold: the context, and the KV cache it must fit alone.
  const int64_t capacity = engine.max_sequence_tokens();
  const uint64_t seed = params.seed ? static_cast<uint64_t>(*params.seed) : random_u64();
  const int32_t vocab = job->backend.tokenizer->vocab_size();
  for (const LogitBias& b : params.sampling.logit_bias) {
    if (b.token >= vocab) {
      ApiError e = http_error(
          400,
          fmt::format("logit_bias names token id {}, outside the vocabulary (0..{})", b.token, vocab - 1),
          "invalid_value");
      e.param = "logit_bias";
      return reply_error(*job->channel, job->endpoint_name, e);
    }
  }

  std::vector<EngineRequest> requests;
  for (const PreparedPrompt& p : prompts) {
    EngineRequest er;
    er.prompt = p.tokens;
    er.sampling = params.sampling;
    er.stop = params.stop;
    er.ignore_eos = params.ignore_eos;
    er.logprobs = params.logprobs;
    er.response_format = params.response_format;
    er.scenario = scenario;
    const int64_t n_prompt = static_cast<int64_t>(p.tokens.size());
    if (params.max_tokens) {
      er.max_tokens = *params.max_tokens;
    } else if (chat) {
      if (n_prompt >= capacity) {
        ApiError e =
            http_error(400,
                       fmt::format("the prompt ({} tokens) leaves no room to generate in this server's "
                                   "context of {} tokens; shorten the conversation",
                                   n_prompt, capacity),
                       "context_length_exceeded");
        e.param = prompt_param;
        return reply_error(*job->channel, job->endpoint_name, e);
      }
      er.max_tokens = static_cast<int32_t>(capacity - n_prompt);
    } else {
      er.max_tokens = 16;  // OpenAI's default for completions
    }
    if (Status st = engine.validate(er); !st.ok()) {
      const bool too_long = n_prompt + er.max_tokens > engine.max_context();
      return reply_error(
          *job->channel, job->endpoint_name,
          api_error(st, too_long ? prompt_param : "", too_long ? "context_length_exceeded" : ""));
    }
    for (int32_t i = 0; i < params.n; ++i) {
      EngineRequest copy = er;
      copy.sampling.seed = seed + static_cast<uint64_t>(i);
      requests.push_back(std::move(copy));
    }
  }

  job->choices.resize(requests.size());
  job->remaining = requests.size();
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (int32_t k = 0; k < params.n; ++k) {
      Job::Choice& c = job->choices[i * static_cast<size_t>(params.n) + static_cast<size_t>(k)];
      c.echo = prompts[i].echo;
      c.text_offset = static_cast<int64_t>(c.echo.size());
    }
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    OutputSink sink = [job, i](EngineOutput&& out) {
      // Engine thread: only hand the output over to the connection's strand.
      job->channel->post([job, i, o = std::move(out)]() mutable { job->on_output(i, o); });
    };
    auto handle = engine.submit(std::move(requests[i]), std::move(sink));
    if (!handle.ok()) {
      job->ended = true;
      job->cancel_all();
      return reply_error(*job->channel, job->endpoint_name, api_error(handle.status()));
    }
    job->choices[i].handle = *handle;
  }
  job->channel->on_close([weak = std::weak_ptr<Job>(job)] {
    if (auto j = weak.lock()) j->client_gone();
  });
  if (!job->stream) return;
  count_status(job->endpoint_name, 200);
  job->channel->start_stream(200, std::string(kSseContentType));
  for (size_t i = 0; i < job->choices.size(); ++i) {
    ChoiceResult first;
    first.index = static_cast<int32_t>(i);
    if (chat) {
      job->channel->write(sse_data(chat_chunk(job->meta, first, /*with_role=*/true, job->include_usage)));
    } else if (!job->choices[i].echo.empty()) {
      first.text = job->choices[i].echo;
      job->channel->write(sse_data(completion_chunk(job->meta, first, job->include_usage)));
    }
  }
}

void ApiService::collect_engine_metrics(metrics::TextWriter& w) const {
  Backend b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    b = backend_;
  }
  w.gauge("pdserve_model_loaded", "1 once the model is loaded and the server answers requests.",
          b.engine && state_.load() != State::kLoading ? 1 : 0);
  if (!b.engine) return;
  const EngineMetrics m = b.engine->metrics();
  w.gauge("pdserve_sequences_running", "Sequences in the running batch.", m.running);
  w.gauge("pdserve_sequences_waiting", "Sequences queued for admission.", m.waiting);
  w.gauge("pdserve_kv_blocks_capacity", "KV cache blocks in all.", m.kv.num_blocks_total);
  w.gauge("pdserve_kv_blocks_used", "KV cache blocks referenced by a sequence.", m.kv.num_blocks_used);
  w.gauge("pdserve_kv_blocks_free", "KV cache blocks allocatable now (free or evictable cached blocks).",
          m.kv.num_blocks_free);
  w.gauge("pdserve_kv_blocks_cached", "KV cache blocks held by the prefix cache (in use or not).",
          m.kv.num_blocks_cached);
  w.gauge(
      "pdserve_kv_cache_usage_ratio", "Fraction of the KV cache blocks referenced by a sequence.",
      m.kv.num_blocks_total > 0 ? static_cast<double>(m.kv.num_blocks_used) / m.kv.num_blocks_total : 0.0);
  w.counter("pdserve_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache.",
            static_cast<double>(m.kv.prefix_queried_tokens_total));
  w.counter("pdserve_prefix_cache_hit_tokens_total",
            "Prompt tokens found in the prefix cache (not recomputed).",
            static_cast<double>(m.kv.prefix_hit_tokens_total));
  w.gauge("pdserve_prefix_cache_hit_ratio", "Prefix cache hit tokens over queried tokens since start.",
          m.kv.prefix_queried_tokens_total > 0 ? static_cast<double>(m.kv.prefix_hit_tokens_total) /
                                                     static_cast<double>(m.kv.prefix_queried_tokens_total)
                                               : 0.0);
  w.counter("pdserve_kv_evictions_total", "Cached KV blocks evicted to make room.",
            static_cast<double>(m.kv.evictions_total));
  w.counter("pdserve_preemptions_total", "Sequences preempted (KV freed, recomputed later).",
            static_cast<double>(m.preemptions_total));
  w.counter("pdserve_prompt_tokens_total", "Prompt tokens of finished requests.",
            static_cast<double>(m.prompt_tokens_total));
  w.counter("pdserve_generation_tokens_total", "Tokens generated.",
            static_cast<double>(m.generated_tokens_total));
  w.counter("pdserve_computed_tokens_total", "Tokens run through the model (prefill and decode).",
            static_cast<double>(m.computed_tokens_total));
  w.counter("pdserve_nonfinite_logits_total",
            "Requests ended with an error because the model's logits held no usable value (NaN or -inf: a "
            "numeric overflow, or NaN in the weights).",
            static_cast<double>(m.nonfinite_logits_total));
  w.counter("pdserve_engine_steps_total", "Engine steps run.", static_cast<double>(m.steps_total));
  w.counter("pdserve_engine_step_seconds_total", "Time spent in engine steps.", m.step_seconds_total);
  w.gauge("pdserve_engine_last_step_seconds", "Duration of the latest engine step.", m.last_step_seconds);
  // Disaggregated serving (zero in aggregated mode).
  w.gauge("pdserve_prefill_slots_in_use", "Prefill slots held (accepted requests whose KV has not left).",
          m.prefill_slots_in_use);
  w.gauge("pdserve_handoffs_outstanding", "Prompt KV staged in prefill send buffers, not yet released.",
          m.handoffs_outstanding);
  w.counter("pdserve_handoffs_total", "Requests handed from a prefill to a decode instance.",
            static_cast<double>(m.handoffs_total));
  w.counter("pdserve_layer_wise_handoffs_total",
            "Handoffs whose KV left the prefill layer by layer during its forward pass (--kv-layer-wise).",
            static_cast<double>(m.layer_wise_handoffs_total));
  w.counter("pdserve_handoff_leases_expired_total", "Handoffs freed because no decode fetched them in time.",
            static_cast<double>(m.handoff_leases_expired_total));
  w.counter("pdserve_prefill_priority_refusals_total",
            "Requests a prefill refused with a slot free, keeping it for a request nearer its TTFT deadline "
            "(--deadline-priority-ms).",
            static_cast<double>(m.priority_refusals_total));
  w.gauge("pdserve_decode_pending", "Handed-off requests waiting for a decode seat.", m.decode_pending);
  w.gauge("pdserve_kv_pulls_in_flight", "KV transfers under way into decode instances.",
          m.kv_pulls_in_flight);
  w.counter("pdserve_kv_pulls_failed_total", "KV transfers that failed (the request ended with an error).",
            static_cast<double>(m.kv_pulls_failed_total));
  w.counter("pdserve_kv_pulls_total", "KV transfers that landed in decode instances.",
            static_cast<double>(m.kv_pulls_total));
  w.counter("pdserve_kv_pulled_bytes_total", "Wire bytes of the KV transfers that landed (header and body).",
            static_cast<double>(m.kv_pulled_bytes_total));
  w.counter("pdserve_kv_pull_seconds_total",
            "Time of the KV transfers that landed, from the decode's request to the KV in its blocks.",
            static_cast<double>(m.kv_pull_microseconds_total) / 1e6);
  w.gauge("pdserve_gateway_waiting", "Requests held at the gateway for a prefill or decode instance.",
          m.gateway_waiting);
  w.counter("pdserve_gateway_timeouts_total", "Requests that waited at the gateway beyond their TTFT budget.",
            static_cast<double>(m.gateway_timeouts_total));
  w.counter("pdserve_gateway_rejections_total",
            "Inquiries refused by a full prefill (requests waiting at the gateway are re-inquired as "
            "capacity frees and every 10 ms).",
            static_cast<double>(m.gateway_rejections_total));
  w.counter("pdserve_gateway_room_rejections_total",
            "Of those, inquiries refused because the prefill's KV send buffers had no room for the "
            "prompt's KV (shorter prompts waiting behind it may be offered meanwhile).",
            static_cast<double>(m.gateway_room_rejections_total));
  w.counter("pdserve_gateway_prefill_retries_total",
            "Requests moved on from a prefill that failed them before their first token or was found "
            "away (unreachable or shutting down), once per request and prefill.",
            static_cast<double>(m.gateway_prefill_retries_total));
  if (!m.scenarios.empty()) {
    w.family("pdserve_gateway_scenario_requests_total", "counter", "Requests received, by scenario.");
    for (const auto& s : m.scenarios) {
      w.sample("pdserve_gateway_scenario_requests_total", {{"scenario", s.name}},
               static_cast<double>(s.requests_total));
    }
    w.family("pdserve_gateway_scenario_waiting", "gauge", "Requests held at the gateway, by scenario.");
    for (const auto& s : m.scenarios) {
      w.sample("pdserve_gateway_scenario_waiting", {{"scenario", s.name}}, s.waiting);
    }
    w.family("pdserve_gateway_scenario_timeouts_total", "counter",
             "Requests that waited beyond their scenario's TTFT budget, by scenario.");
    for (const auto& s : m.scenarios) {
      w.sample("pdserve_gateway_scenario_timeouts_total", {{"scenario", s.name}},
               static_cast<double>(s.timeouts_total));
    }
  }
  w.family("pdserve_engine_requests_finished_total", "counter",
           "Engine requests finished, by finish reason.");
  std::map<std::string, int64_t> sorted(m.finished_by_reason.begin(), m.finished_by_reason.end());
  for (const char* reason : {"stop", "length", "cancelled", "error"}) sorted.emplace(reason, 0);
  for (const auto& [reason, count] : sorted) {
    w.sample("pdserve_engine_requests_finished_total", {{"reason", reason}}, static_cast<double>(count));
  }
}

}  // namespace pdserve::api

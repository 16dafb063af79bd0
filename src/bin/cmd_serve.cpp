// `pdserve serve`: the OpenAI-compatible HTTP API over, by default, a prefill and a decode engine
// in this process behind the gateway's Router (in-process KV transfer); `--mode aggregated`: one
// engine doing both phases. Listening, loading and draining: run_openai_front (serve_support.h).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <memory>
#include <string>

#include "bin/commands.h"
#include "bin/serve_support.h"
#include "common/thread_pool.h"
#include "gateway/router.h"
#include "kvcache/budget.h"

namespace pdserve {

namespace {

struct ServeArgs {
  std::string mode = "disaggregated";
  std::string model;
  std::string host = "127.0.0.1";
  int port = 8000;
  int http_threads = 2;
  EngineFlags engine;
  std::string api_key;
  std::string served_model_name;
  size_t max_body_bytes = size_t{8} << 20;
  int shutdown_timeout_s = 30;
  // Disaggregated mode.
  int64_t ttft_budget_ms = 60'000;
  double ttft_budget_ms_per_token = 0;
  std::string admission = "on-demand";
};

// What serves: one engine (aggregated), or a prefill and a decode engine in this process with the
// in-process KV transport behind a Router (disaggregated). Not movable: engines call back into it.
struct Deployment {
  KvTransport transport;
  std::vector<std::unique_ptr<Engine>> engines;
  std::unique_ptr<Router> router;
  std::atomic<Router*> router_ptr{nullptr};

  GenerationBackend* backend() {
    return router ? static_cast<GenerationBackend*>(router.get()) : engines[0].get();
  }
  size_t kv_bytes() const {
    size_t n = 0;
    for (const auto& e : engines) n += e->kv_bytes();
    return n;
  }
  // Router first (no new placements), then the engines (their last outputs still reach it).
  void shutdown() {
    if (router) router->stop();
    for (auto& e : engines) e->shutdown();
  }
};

// Splits the KV budget: the prefill holds prompts only while they run (a quarter, at least one
// full context); the decode holds every running sequence (the rest, at least one full context).
std::pair<int32_t, int32_t> split_kv_blocks(int32_t blocks, int32_t block_size, int32_t max_context) {
  const int32_t one = (max_context + block_size - 1) / block_size;
  const int32_t prefill = std::max(one, blocks / 4);
  const int32_t decode = std::max(one, blocks - prefill);
  return {prefill, decode};
}

StatusOr<std::unique_ptr<Deployment>> deploy(const ServeArgs& a, const LoadedModel& m, ThreadPool& pool,
                                             const EngineOptions& base) {
  auto d = std::make_unique<Deployment>();
  if (a.mode == "aggregated") {
    PD_RETURN_IF_ERROR(base.validate());
    d->engines.push_back(std::make_unique<Engine>(*m.model, *m.tokenizer, pool, base));
    return d;
  }
  const ModelConfig& cfg = m.model->config();
  auto [prefill_blocks, decode_blocks] = split_kv_blocks(base.num_blocks, base.block_size, base.max_context);
  PD_ASSIGN_OR_RETURN(d->transport, make_transport(TransportKind::kInproc,
                                                   send_pool_options(a.engine, cfg, base.max_context)));
  Deployment* raw = d.get();
  auto notify = [raw] {
    if (Router* r = raw->router_ptr.load()) r->notify_capacity();
  };
  EngineOptions p = base;
  p.role = EngineRole::kPrefill;
  p.num_blocks = prefill_blocks;
  p.kv_send = d->transport.pool.get();
  p.on_capacity = notify;
  PD_RETURN_IF_ERROR(p.validate().with_context("prefill instance"));
  EngineOptions dec = base;
  dec.role = EngineRole::kDecode;
  dec.num_blocks = decode_blocks;
  dec.kv_puller = d->transport.puller.get();
  dec.on_capacity = notify;
  PD_RETURN_IF_ERROR(dec.validate().with_context("decode instance"));
  d->engines.push_back(std::make_unique<Engine>(*m.model, *m.tokenizer, pool, p));
  d->engines.push_back(std::make_unique<Engine>(*m.model, *m.tokenizer, pool, dec));
  RouterOptions ro;
  ro.admission = a.admission == "baseline" ? AdmissionPolicy::kBaseline : AdmissionPolicy::kOnDemand;
  ro.ttft_budget_ms = a.ttft_budget_ms;
  ro.ttft_budget_ms_per_token = a.ttft_budget_ms_per_token;
  d->router = std::make_unique<Router>(std::vector<Instance*>{d->engines[0].get()},
                                       std::vector<Instance*>{d->engines[1].get()}, ro);
  d->router_ptr.store(d->router.get());
  return d;
}

// What `serve` keeps alive while it serves: the model, the thread pool, the engines.
struct ServeState {
  LoadedModel model;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<Deployment> deployment;
};

int run_serve(void* p) {
  auto& a = *static_cast<ServeArgs*>(p);
  FrontOptions front{.command = "serve",
                     .host = a.host,
                     .port = a.port,
                     .http_threads = a.http_threads,
                     .max_body_bytes = a.max_body_bytes,
                     .api_key = a.api_key,
                     .served_model_name = a.served_model_name,
                     .model_path = a.model,
                     .shutdown_timeout_s = a.shutdown_timeout_s};
  return run_openai_front(front, [&a](api::ApiService& service) -> StatusOr<FrontBackend> {
    auto state = std::make_shared<ServeState>();
    PD_ASSIGN_OR_RETURN(state->model, load_model(a.model, /*weights=*/true));
    const ModelConfig& cfg = state->model.model->config();
    PD_ASSIGN_OR_RETURN(EngineOptions eo, engine_options(a.engine, cfg));
    eo.on_step = [&service](double seconds, int32_t tokens) { service.observe_step(seconds, tokens); };
    // NOTE: one pool for every engine of this process: their forward passes take turns (the model
    // runs one at a time), so the cores are not oversubscribed.
    state->pool = std::make_unique<ThreadPool>(a.engine.threads);
    StatusOr<std::unique_ptr<Deployment>> deployed = deploy(a, state->model, *state->pool, eo);
    if (!deployed.ok()) return invalid_argument(deployed.status().message());
    state->deployment = std::move(deployed).value();
    FrontBackend b;
    b.backend = {.engine = state->deployment->backend(),
                 .tokenizer = state->model.tokenizer.get(),
                 .chat_template = state->model.chat_template ? &*state->model.chat_template : nullptr};
    b.description = fmt::format(
        "{} mode{}, model '{}' ({} layers, context {} tokens), KV cache {} blocks x {} tokens ({}), {} "
        "engine "
        "threads",
        a.mode,
        a.mode == "aggregated"
            ? ""
            : fmt::format(" (1 prefill with {} slots, 1 decode, in-process KV transfer, {} admission)",
                          a.engine.prefill_slots, a.admission),
        a.model, cfg.num_layers, eo.max_context, eo.num_blocks, eo.block_size,
        format_bytes(state->deployment->kv_bytes()), state->pool->num_threads());
    b.shutdown = [state] { state->deployment->shutdown(); };
    b.owner = state;
    return b;
  });
}

}  // namespace

void register_serve_command(CLI::App& app) {
  auto* a = new ServeArgs();  // lives for the process
  a->model = default_model_path();
  CLI::App* cmd = app.add_subcommand(
      "serve",
      "Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions, "
      "/tokenize, /detokenize; GET /v1/models, /health, /metrics)");
  cmd->add_option("--mode", a->mode,
                  "disaggregated: a prefill and a decode instance in this process (in-process KV transfer) "
                  "behind the gateway's router; aggregated: one engine instance runs prefill and decode (the "
                  "baseline)")
      ->capture_default_str()
      ->check(CLI::IsMember({"aggregated", "disaggregated"}));
  cmd->add_option("-m,--model", a->model, "GGUF model file (default: the default model, or $PDSERVE_MODEL)")
      ->capture_default_str();
  cmd->add_option("--host", a->host, "Address to listen on (0.0.0.0: every interface)")
      ->capture_default_str();
  cmd->add_option("--port", a->port, "TCP port (0: any free port)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--http-threads", a->http_threads,
                  "I/O threads of the HTTP server (parse, tokenize, stream)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  add_engine_flags(*cmd, a->engine);
  cmd->add_option(
      "--api-key", a->api_key,
      "Require 'Authorization: Bearer KEY' on every route but /health (default: $PDSERVE_API_KEY; "
      "unset: no key)");
  cmd->add_option(
      "--served-model-name", a->served_model_name,
      "The model name clients send and /v1/models lists (default: the model file's name without .gguf)");
  cmd->add_option("--max-body-bytes", a->max_body_bytes, "Largest request body; larger ones get 413")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1024}, size_t{1} << 32));
  cmd->add_option(
         "--shutdown-timeout", a->shutdown_timeout_s,
         "Seconds running requests may take to finish after SIGINT/SIGTERM before they are cancelled")
      ->capture_default_str()
      ->check(CLI::Range(0, 3600));
  cmd->add_option(
         "--ttft-budget-ms", a->ttft_budget_ms,
         "Disaggregated: how long a request may wait at the gateway for a prefill slot before it fails "
         "with 504 (plus --ttft-budget-ms-per-token for each prompt token)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}));
  cmd->add_option("--ttft-budget-ms-per-token", a->ttft_budget_ms_per_token,
                  "Disaggregated: extra waiting budget per prompt token")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1000.0));
  cmd->add_option(
         "--admission", a->admission,
         "Disaggregated: on-demand (prefills accept or refuse at once, requests wait at the gateway) or "
         "baseline (each request joins at once the queue of the prefill with the fewest open streams and "
         "waits there; no TTFT budget)")
      ->capture_default_str()
      ->check(CLI::IsMember({"on-demand", "baseline"}));
  cmd->callback([a] { set_command_action(run_serve, a); });
}

}  // namespace pdserve

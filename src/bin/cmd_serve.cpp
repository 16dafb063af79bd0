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
  std::string mode;  // empty: disaggregated on the CPU, aggregated on a GPU
  FrontOptions front{.command = "serve"};
  EngineFlags engine;
  RouterFlags router;
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

// Splits the KV budget, never beyond it: the prefill holds prompts only while they run (a quarter,
// or one full context if that is more, but never more than half); the decode holds every running
// sequence (the rest). A small budget thus limits the longest sequence, as it does aggregated.
StatusOr<std::pair<int32_t, int32_t>> split_kv_blocks(int32_t blocks, int32_t block_size,
                                                      int32_t max_context) {
  if (blocks < 2) {
    return invalid_argument(fmt::format(
        "--kv-cache-memory holds {} KV block{}; disaggregated serving needs at least 2 (one each for the "
        "prefill and the decode): raise it",
        blocks, blocks == 1 ? "" : "s"));
  }
  const int32_t one = (max_context + block_size - 1) / block_size;
  const int32_t prefill = std::min(std::max(one, blocks / 4), blocks / 2);
  return std::pair{prefill, blocks - prefill};
}

StatusOr<std::unique_ptr<Deployment>> deploy(const ServeArgs& a, const DeviceChoice& device,
                                             const LoadedModel& m, ThreadPool& pool,
                                             const EngineOptions& base) {
  auto d = std::make_unique<Deployment>();
  if (a.mode == "aggregated") {
    PD_RETURN_IF_ERROR(base.validate());
    PD_ASSIGN_OR_RETURN(std::unique_ptr<ModelExecutor> executor, make_executor(device, m, pool, base));
    d->engines.push_back(std::make_unique<Engine>(std::move(executor), *m.tokenizer, base));
    return d;
  }
  if (device.cuda)
    return invalid_argument(
        "--mode disaggregated moves the KV cache between host buffers in this process; on a GPU use --mode "
        "aggregated, or `pdserve launch` with prefill and decode instances on GPUs (transport \"cuda-ipc\")");
  const ModelConfig& cfg = m.model->config();
  PD_ASSIGN_OR_RETURN(auto split, split_kv_blocks(base.num_blocks, base.block_size, base.max_context));
  const auto [prefill_blocks, decode_blocks] = split;
  PD_ASSIGN_OR_RETURN(KvTransportOptions to, send_pool_options(a.engine, cfg, base.max_context));
  PD_ASSIGN_OR_RETURN(d->transport, make_transport(TransportKind::kInproc, to));
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
  d->router = std::make_unique<Router>(std::vector<Instance*>{d->engines[0].get()},
                                       std::vector<Instance*>{d->engines[1].get()}, a.router.options());
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
  return run_openai_front(a.front, [&a](api::ApiService& service) -> StatusOr<FrontBackend> {
    auto state = std::make_shared<ServeState>();
    PD_ASSIGN_OR_RETURN(DeviceChoice device, parse_device(a.engine.device, a.engine.dtype));
    if (a.mode.empty()) a.mode = device.cuda ? "aggregated" : "disaggregated";
    if (device.cuda && a.mode != "aggregated")
      return invalid_argument(
          "--device cuda needs --mode aggregated here: this process's in-process KV transfer moves host "
          "memory; for prefill and decode on GPUs run `pdserve launch` with instances on GPUs and transport "
          "= \"cuda-ipc\"");
    PD_ASSIGN_OR_RETURN(state->model, load_model_for(a.front.model_path, device));
    PD_ASSIGN_OR_RETURN(ModelConfig cfg, loaded_model_config(state->model));
    PD_ASSIGN_OR_RETURN(EngineOptions eo, engine_options(a.engine, cfg));
    eo.on_step = [&service](double seconds, int32_t tokens) { service.observe_step(seconds, tokens); };
    // NOTE: one pool for every engine of this process: their forward passes take turns (the model
    // runs one at a time), so the cores are not oversubscribed.
    state->pool = std::make_unique<ThreadPool>(a.engine.threads);
    StatusOr<std::unique_ptr<Deployment>> deployed = deploy(a, device, state->model, *state->pool, eo);
    if (!deployed.ok()) {
      // A bad setting is exit status 2; a GPU that cannot run it is not.
      if (deployed.status().code() == StatusCode::kInvalidArgument) return deployed.status();
      return unavailable(deployed.status().message());
    }
    state->deployment = std::move(deployed).value();
    FrontBackend b;
    b.backend = {.engine = state->deployment->backend(),
                 .tokenizer = state->model.tokenizer.get(),
                 .chat_template = state->model.chat_template ? &*state->model.chat_template : nullptr};
    b.description = fmt::format(
        "{} mode on {}{}, model '{}' ({} layers, context {} tokens), KV cache {} blocks x {} tokens ({}), {} "
        "engine "
        "threads",
        a.mode, state->deployment->engines.front()->device(),
        a.mode == "aggregated"
            ? ""
            : fmt::format(" (1 prefill with {} slots, 1 decode, in-process KV transfer, {} admission)",
                          a.engine.prefill_slots, a.router.admission),
        a.front.model_path, cfg.num_layers, eo.max_context, eo.num_blocks, eo.block_size,
        format_bytes(state->deployment->kv_bytes()), state->pool->num_threads());
    b.shutdown = [state] { state->deployment->shutdown(); };
    b.owner = state;
    return b;
  });
}

}  // namespace

void register_serve_command(CLI::App& app) {
  auto* a = new ServeArgs();  // lives for the process
  a->front.model_path = default_model_path();
  CLI::App* cmd = app.add_subcommand(
      "serve",
      "Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions, "
      "/tokenize, /detokenize; GET /v1/models, /health, /metrics)");
  cmd->add_option(
         "--mode", a->mode,
         "disaggregated: a prefill and a decode instance in this process (in-process KV transfer) "
         "behind the gateway's router; aggregated: one engine instance runs prefill and decode (the "
         "baseline). Default: disaggregated on the CPU, aggregated with --device cuda (the only mode "
         "on a GPU so far)")
      ->check(CLI::IsMember({"aggregated", "disaggregated"}));
  cmd->add_option("-m,--model", a->front.model_path,
                  "GGUF model file, a Hugging Face checkpoint directory (config.json, *.safetensors, "
                  "tokenizer.json; with --device cuda), or synthetic:NAME (default: the default model, or "
                  "$PDSERVE_MODEL)")
      ->capture_default_str();
  add_front_flags(*cmd, a->front);
  add_engine_flags(*cmd, a->engine);
  add_router_flags(*cmd, a->router);
  cmd->callback([a] { set_command_action(run_serve, a); });
}

}  // namespace pdserve

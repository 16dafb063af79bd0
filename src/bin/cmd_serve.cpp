// `pdserve serve --mode aggregated`: one engine instance doing prefill and decode, behind the
// OpenAI-compatible HTTP API. The socket listens before the model loads (GET /health answers 503
// meanwhile). SIGINT/SIGTERM: stop accepting, let running requests finish for up to
// --shutdown-timeout seconds (a second signal skips the wait), cancel the rest, exit 0.
#include <fmt/format.h>
#include <pthread.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "api/http_server.h"
#include "api/service.h"
#include "bin/commands.h"
#include "common/log.h"
#include "kvcache/budget.h"
#include "tokenizer/chat_template.h"

namespace pdserve {

namespace {

struct ServeArgs {
  std::string mode = "aggregated";
  std::string model;
  std::string host = "127.0.0.1";
  int port = 8000;
  int threads = 0;
  int http_threads = 2;
  std::string kv_cache_memory;  // empty: the default below
  int block_size = kDefaultBlockSize;
  int max_running = 64;
  int max_waiting = 1024;
  int step_token_budget = 512;
  int max_context = 0;
  bool no_prefix_caching = false;
  std::string api_key;
  std::string served_model_name;
  size_t max_body_bytes = size_t{8} << 20;
  int shutdown_timeout_s = 30;
};

constexpr std::string_view kDefaultKvMemory = "1GiB";

// Signals are taken by one thread (sigwait); every other thread blocks them.
std::atomic<int> g_signals{0};
std::atomic<bool> g_loading{true};

void start_signal_thread() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set] {
    for (;;) {
      int sig = 0;
      if (sigwait(&set, &sig) != 0) continue;
      if (g_loading.load()) {
        std::fputs("\npdserve: interrupted while loading; exiting\n", stderr);
        std::_Exit(0);
      }
      if (g_signals.fetch_add(1) >= 1) {
        std::fputs("\npdserve: second signal: cancelling running requests now\n", stderr);
      }
    }
  }).detach();
}

void raise_fd_limit() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

// MemAvailable from /proc/meminfo, for fractional --kv-cache-memory.
std::optional<uint64_t> available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

struct Loaded {
  std::shared_ptr<const GgufFile> file;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;
};

StatusOr<Loaded> load_model(const std::string& path) {
  Loaded l;
  PD_ASSIGN_OR_RETURN(auto file, GgufFile::open(path));
  l.file = std::shared_ptr<const GgufFile>(std::move(file));
  PD_ASSIGN_OR_RETURN(l.model, LlamaModel::load(l.file));
  PD_ASSIGN_OR_RETURN(auto tok, Tokenizer::from_gguf(*l.file));
  l.tokenizer = std::make_unique<Tokenizer>(std::move(tok));
  if (auto src = l.file->get_string("tokenizer.chat_template"); src.ok()) {
    auto tmpl = ChatTemplate::parse(*src);
    if (tmpl.ok()) {
      l.chat_template = std::move(*tmpl);
    } else {
      PD_LOG_WARN(
          "serve: the model's chat template cannot be used ({}); /v1/chat/completions will answer 400",
          tmpl.status().message());
    }
  } else {
    PD_LOG_WARN("serve: the model has no chat template; /v1/chat/completions will answer 400");
  }
  return l;
}

// KV blocks for the flag value; the default is capped at what max_running full contexts need.
StatusOr<int32_t> kv_blocks(const ServeArgs& a, const ModelConfig& cfg, int32_t max_context) {
  PD_ASSIGN_OR_RETURN(uint64_t per_block,
                      kv_bytes_per_block(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, a.block_size, 2));
  const bool is_default = a.kv_cache_memory.empty();
  std::string_view text = is_default ? kDefaultKvMemory : std::string_view(a.kv_cache_memory);
  StatusOr<int32_t> blocks = kv_blocks_for_budget(text, per_block, available_memory_bytes());
  if (!blocks.ok()) return blocks.status().with_context("--kv-cache-memory");
  if (is_default) {
    int64_t needed = (int64_t{a.max_running} * max_context + a.block_size - 1) / a.block_size;
    return static_cast<int32_t>(std::min<int64_t>(*blocks, needed));
  }
  return *blocks;
}

int run_serve(void* p) {
  auto& a = *static_cast<ServeArgs*>(p);
  if (a.mode != "aggregated") {
    fmt::print(stderr, "error: --mode {} is not implemented yet; use --mode aggregated\n", a.mode);
    return 2;
  }
  if (a.api_key.empty()) {
    if (const char* env = std::getenv("PDSERVE_API_KEY"); env && *env) a.api_key = env;
  }
  if (a.served_model_name.empty()) a.served_model_name = std::filesystem::path(a.model).stem().string();
  std::signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();
  start_signal_thread();  // before any other thread, so that they all inherit the blocked mask

  api::ApiService service({.served_model_name = a.served_model_name, .api_key = a.api_key});
  api::HttpServerOptions http;
  http.host = a.host;
  http.port = static_cast<uint16_t>(a.port);
  http.num_threads = a.http_threads;
  http.max_body_bytes = a.max_body_bytes;
  http.error_response = [&service](int status, std::string message) {
    return service.error_response(status, std::move(message));
  };
  auto server_or =
      api::HttpServer::start(http, [&service](api::HttpRequest r, std::shared_ptr<api::ResponseChannel> c) {
        service.handle(std::move(r), std::move(c));
      });
  if (!server_or.ok()) {
    fmt::print(stderr, "error: {}\n", server_or.status().message());
    return 1;
  }
  std::unique_ptr<api::HttpServer> server = std::move(server_or).value();
  service.registry().add_collector([&server](metrics::TextWriter& w) {
    w.gauge("pdserve_http_connections", "Open HTTP connections.", server->num_connections());
  });
  const std::string url_host = a.host == "0.0.0.0" ? "127.0.0.1" : a.host;
  PD_LOG_INFO("serve: listening on http://{}:{}; loading {}", a.host, server->port(), a.model);

  auto t0 = std::chrono::steady_clock::now();
  StatusOr<Loaded> loaded = load_model(a.model);
  if (!loaded.ok()) {
    fmt::print(stderr, "error: {}\n", loaded.status().message());
    return 1;
  }
  Loaded& m = *loaded;
  const ModelConfig& cfg = m.model->config();
  const int32_t max_context =
      a.max_context > 0 ? std::min(a.max_context, cfg.context_length) : cfg.context_length;
  StatusOr<int32_t> blocks = kv_blocks(a, cfg, max_context);
  if (!blocks.ok()) {
    fmt::print(stderr, "error: {}\n", blocks.status().message());
    return 2;
  }
  EngineOptions eo;
  eo.block_size = a.block_size;
  eo.num_blocks = *blocks;
  eo.step_token_budget = a.step_token_budget;
  eo.max_running = a.max_running;
  eo.max_waiting = a.max_waiting;
  eo.prefix_caching = !a.no_prefix_caching;
  eo.max_context = max_context;
  if (Status st = eo.validate(); !st.ok()) {
    fmt::print(stderr, "error: {}\n", st.message());
    return 2;
  }
  ThreadPool pool(a.threads);
  auto engine = std::make_unique<Engine>(*m.model, *m.tokenizer, pool, eo);
  service.set_ready({.engine = engine.get(),
                     .tokenizer = m.tokenizer.get(),
                     .chat_template = m.chat_template ? &*m.chat_template : nullptr});
  g_loading.store(false);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  PD_LOG_INFO(
      "serve: ready in {:.2f} s: model '{}' ({} layers, context {} tokens), KV cache {} blocks x {} tokens "
      "({}), "
      "{} engine threads, {} HTTP threads{}",
      load_s, a.served_model_name, cfg.num_layers, max_context, eo.num_blocks, eo.block_size,
      format_bytes(engine->kv_bytes()), pool.num_threads(), a.http_threads,
      a.api_key.empty() ? "" : ", API key required");
  fmt::print(
      "\npdserve is serving '{}' (OpenAI-compatible API) at http://{}:{}/v1 — try:\n\n"
      "  curl http://{}:{}/v1/chat/completions -H 'Content-Type: application/json'{} \\\n"
      "    -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
      "Health: /health; metrics: /metrics. Ctrl-C stops.\n\n",
      a.served_model_name, url_host, server->port(), url_host, server->port(),
      a.api_key.empty() ? "" : " -H \"Authorization: Bearer $PDSERVE_API_KEY\"", a.served_model_name);
  std::fflush(stdout);

  while (g_signals.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));

  PD_LOG_INFO("serve: shutting down: no new connections; {} requests running (waiting up to {} s)",
              service.num_in_flight(), a.shutdown_timeout_s);
  server->stop_accepting();
  service.set_draining();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(a.shutdown_timeout_s);
  while (service.num_in_flight() > 0 && g_signals.load() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (int64_t left = service.num_in_flight(); left > 0) PD_LOG_INFO("serve: cancelling {} requests", left);
  engine.reset();  // cancels what still runs; their clients get an error event or a 503
  for (int i = 0; i < 100 && service.num_in_flight() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->stop();
  server.reset();
  PD_LOG_INFO("serve: stopped");
  return 0;
}

}  // namespace

void register_serve_command(CLI::App& app) {
  auto* a = new ServeArgs();  // lives for the process
  a->model = default_model_path();
  CLI::App* cmd = app.add_subcommand(
      "serve",
      "Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions, "
      "/tokenize, /detokenize; GET /v1/models, /health, /metrics)");
  cmd->add_option(
         "--mode", a->mode,
         "aggregated: one engine instance runs prefill and decode (disaggregated: not implemented yet)")
      ->capture_default_str()
      ->check(CLI::IsMember({"aggregated", "disaggregated"}));
  cmd->add_option("-m,--model", a->model, "GGUF model file (default: the default model, or $PDSERVE_MODEL)")
      ->capture_default_str();
  cmd->add_option("--host", a->host, "Address to listen on (0.0.0.0: every interface)")
      ->capture_default_str();
  cmd->add_option("--port", a->port, "TCP port (0: any free port)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd->add_option("-t,--threads", a->threads, "CPU threads of the engine (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  cmd->add_option("--http-threads", a->http_threads,
                  "I/O threads of the HTTP server (parse, tokenize, stream)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  cmd->add_option(
      "--kv-cache-memory", a->kv_cache_memory,
      "KV cache size: bytes with a unit (2GiB, 512MiB) or a fraction of the available memory (0.5, "
      "50%) (default: 1GiB, capped at --max-running full contexts)");
  cmd->add_option("--block-size", a->block_size, "Tokens per KV cache block")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--max-running", a->max_running, "Most sequences in the running batch")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--max-waiting", a->max_waiting,
                  "Most queued requests; beyond it requests get 429 with Retry-After")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 24));
  cmd->add_option("--step-token-budget", a->step_token_budget,
                  "Tokens computed per engine step (decodes plus prefill chunks)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--max-context", a->max_context,
                  "Most tokens per sequence, prompt plus output (0: the model's)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 24));
  cmd->add_flag("--no-prefix-caching", a->no_prefix_caching, "Do not reuse the KV of shared prompt prefixes");
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
  cmd->callback([a] { set_command_action(run_serve, a); });
}

}  // namespace pdserve

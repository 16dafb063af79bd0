#include "bin/serve_support.h"

#include <fmt/format.h>
#include <pthread.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "api/http_server.h"
#include "bin/commands.h"
#include "common/log.h"
#include "kvcache/budget.h"
#include "tokenizer/hf_tokenizer.h"

namespace pdserve {

namespace {

constexpr std::string_view kDefaultKvMemory = "1GiB";

// Signals are taken by one thread (sigwait); every other thread blocks them.
std::atomic<int> g_signals{0};
std::atomic<bool> g_loading{true};

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

}  // namespace

void start_signal_thread() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);  // a closed terminal: stop cleanly too
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

int signals_received() { return g_signals.load(); }
void set_loading(bool loading) { g_loading.store(loading); }

void raise_fd_limit() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

StatusOr<LoadedModel> load_model(const std::string& path, bool weights) {
  LoadedModel l;
  std::string file_path = path;
  if (path.starts_with("synthetic:")) {
    if (weights)
      return invalid_argument(fmt::format(
          "{} is a synthetic model (random weights made on a GPU): run it with --device cuda", path));
    l.synthetic = path;
    file_path = builtin_model_path();
  }
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    if (weights)
      return invalid_argument(
          fmt::format("'{}' is a Hugging Face checkpoint, whose bf16/fp16 weights run on a GPU only: pass "
                      "--device cuda, or "
                      "convert it to GGUF (llama.cpp's convert_hf_to_gguf.py) for the CPU",
                      path));
    PD_ASSIGN_OR_RETURN(auto checkpoint, HfCheckpoint::open(path));
    l.checkpoint = std::shared_ptr<const HfCheckpoint>(std::move(checkpoint));
    PD_ASSIGN_OR_RETURN(auto tokenizer_file, load_hf_tokenizer(path));
    l.file = std::shared_ptr<const GgufFile>(std::move(tokenizer_file));
  } else {
    PD_ASSIGN_OR_RETURN(auto file, GgufFile::open(file_path));
    l.file = std::shared_ptr<const GgufFile>(std::move(file));
  }
  if (weights) {
    PD_ASSIGN_OR_RETURN(l.model, LlamaModel::load(l.file));
  }
  PD_ASSIGN_OR_RETURN(auto tok, Tokenizer::from_gguf(*l.file));
  l.tokenizer = std::make_unique<Tokenizer>(std::move(tok));
  if (auto src = l.file->get_string("tokenizer.chat_template"); src.ok()) {
    auto tmpl = ChatTemplate::parse(*src);
    if (tmpl.ok()) {
      l.chat_template = std::move(*tmpl);
    } else {
      PD_LOG_WARN("the model's chat template cannot be used ({}); /v1/chat/completions will answer 400",
                  tmpl.status().message());
    }
  } else {
    PD_LOG_WARN("the model has no chat template; /v1/chat/completions will answer 400");
  }
  return l;
}

namespace {

// KV blocks for a --kv-cache-memory value (empty: the default, 1GiB capped at what max_running
// full contexts need).
StatusOr<int32_t> kv_blocks(const EngineFlags& f, const ModelConfig& cfg, int32_t max_context) {
  PD_ASSIGN_OR_RETURN(uint64_t per_block,
                      kv_bytes_per_block(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, f.block_size, 2));
  const bool is_default = f.kv_cache_memory.empty();
  std::string_view text = is_default ? kDefaultKvMemory : std::string_view(f.kv_cache_memory);
  StatusOr<int32_t> blocks = kv_blocks_for_budget(text, per_block, available_memory_bytes());
  if (!blocks.ok()) return invalid_argument(blocks.status().with_context("--kv-cache-memory").message());
  if (is_default) {
    int64_t needed = (int64_t{f.max_running} * max_context + f.block_size - 1) / f.block_size;
    return static_cast<int32_t>(std::min<int64_t>(*blocks, needed));
  }
  return *blocks;
}

}  // namespace

StatusOr<DeviceChoice> parse_device(const std::string& text, const std::string& dtype) {
  if (dtype != "auto" && dtype != "bf16" && dtype != "fp16")
    return invalid_argument(fmt::format("--dtype '{}': give auto, bf16 or fp16", dtype));
  DeviceChoice d;
  d.dtype = dtype;
  if (text == "cpu") {
    if (dtype != "auto")
      return invalid_argument(
          fmt::format("--dtype {} is for --device cuda (the CPU engine's number formats are fixed); leave "
                      "it out, or give --dtype auto",
                      dtype));
    return d;
  }
  if (text == "cuda") {
    d.cuda = true;
    return d;
  }
  if (text.starts_with("cuda:")) {
    const std::string n = text.substr(5);
    if (!n.empty() && n.size() <= 3 &&
        std::all_of(n.begin(), n.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
      d.cuda = true;
      d.index = std::stoi(n);
      return d;
    }
  }
  return invalid_argument(fmt::format("--device '{}': give cpu, cuda (GPU 0) or cuda:N", text));
}

StatusOr<LoadedModel> load_model_for(const std::string& path, const DeviceChoice& device) {
  return load_model(path, /*weights=*/!device.cuda);
}

StatusOr<ModelConfig> loaded_model_config(const LoadedModel& m) {
  if (!m.synthetic.empty()) return synthetic_model_config(m.synthetic, m.tokenizer->vocab_size());
  if (m.checkpoint != nullptr) return m.checkpoint->config();
  return ModelConfig::from_gguf(*m.file);
}

uint64_t loaded_model_fingerprint(const LoadedModel& m) {
  if (!m.synthetic.empty())
    return synthetic_model_fingerprint(m.synthetic, kServedSyntheticSeed, m.tokenizer->vocab_size());
  if (m.checkpoint != nullptr) return m.checkpoint->fingerprint();  // its tokenizer files included
  return m.file->fingerprint();
}

StatusOr<KvTransport> make_instance_transport(TransportKind kind, const KvTransportOptions& options,
                                              bool gpu) {
  if (gpu) return make_cuda_transport(kind, options);
  return make_transport(kind, options);
}

StatusOr<std::unique_ptr<ModelExecutor>> make_executor(const DeviceChoice& device, const LoadedModel& m,
                                                       ThreadPool& pool, const EngineOptions& o) {
  if (device.cuda) return make_cuda_executor(m, device, o);
  if (m.model == nullptr) return internal_error("make_executor: the model was loaded without weights");
  return std::unique_ptr<ModelExecutor>(
      std::make_unique<CpuExecutor>(*m.model, pool, o.num_blocks, o.block_size));
}

void add_engine_flags(CLI::App& cmd, EngineFlags& f) {
  cmd.add_option(
         "--device", f.device,
         "Where the model runs: cpu, cuda (GPU 0) or cuda:N. On a GPU the weights are dequantized to "
         "bf16 or fp16 (--dtype) and the KV cache lives in GPU memory (give --kv-cache-memory in bytes: a "
         "fraction is of "
         "host memory); prefill and decode instances on GPUs move KV with --transport cuda-ipc (GPUs of one "
         "host) or staged through host memory over shm, tcp or ucx")
      ->capture_default_str();
  cmd.add_option(
         "--dtype", f.dtype,
         "The GPU's number format for weights, activations entering matrix products and the KV "
         "cache: bf16 (float's range), fp16 (8 times finer, values up to 65504: weights beyond are "
         "refused, activations beyond become infinite), or auto: fp16 for a Hugging Face checkpoint "
         "of fp16 tensors, else bf16. Prefill and decode instances must agree (their KV formats are checked)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bf16", "fp16"}));
  cmd.add_option("-t,--threads", f.threads, "CPU threads of the engine (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  cmd.add_option(
      "--kv-cache-memory", f.kv_cache_memory,
      "KV cache size: bytes with a unit (2GiB, 512MiB) or a fraction of the available memory (0.5, "
      "50%) (default: 1GiB, capped at --max-running full contexts)");
  cmd.add_option("--block-size", f.block_size, "Tokens per KV cache block")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd.add_option("--max-running", f.max_running, "Most sequences in the running batch")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  cmd.add_option("--max-waiting", f.max_waiting,
                 "Most queued requests; beyond it requests get 429 with Retry-After (on a prefill: "
                 "requests of the baseline admission waiting for a slot)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 24));
  cmd.add_option("--step-token-budget", f.step_token_budget,
                 "Tokens computed per engine step (decodes plus prefill chunks)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd.add_option("--max-context", f.max_context,
                 "Most tokens per sequence, prompt plus output (0: the model's)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 24));
  cmd.add_flag("--no-prefix-caching", f.no_prefix_caching, "Do not reuse the KV of shared prompt prefixes");
  cmd.add_option(
         "--prefill-slots", f.prefill_slots,
         "Prefill: requests held at once (b_p), from acceptance until a decode has their KV; a full "
         "prefill refuses more at once (a gateway's baseline admission asks it to queue them instead)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd.add_option("--decode-pending", f.decode_pending,
                 "Decode: handed-off requests kept waiting for a running seat")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd.add_option(
      "--kv-send-memory", f.kv_send_memory,
      "Prefill: memory of the KV send buffers, in bytes with a unit (default: --prefill-slots prompts "
      "of --max-context tokens, which always hold --prefill-slots prompts; with less, a prefill refuses a "
      "prompt it has no room for at acceptance, and the gateway offers it to another; on-demand admission "
      "lets shorter prompts behind it go ahead until it has used half its budget). On a GPU it is device "
      "memory, "
      "reserved at start besides "
      "--kv-cache-memory");
  cmd.add_option("--handoff-lease-ms", f.handoff_lease_ms,
                 "Prefill: a handed-off request's slot and KV are freed after this long even if no decode "
                 "fetched it")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{100}, int64_t{3'600'000}));
  cmd.add_flag(
      "--kv-layer-wise", f.kv_layer_wise,
      "Prefill: send each prompt's KV layer by layer while the forward pass that completes it runs, so "
      "the decode pulls it during the prefill instead of after it (inproc, shm and tcp transports; a GPU "
      "instance over shm or tcp)");
  cmd.add_option(
         "--deadline-priority-ms", f.deadline_priority_ms,
         "Prefill: for this long after refusing a request that waits at a gateway, keep the last free "
         "slot for the most urgent such request (the nearest TTFT deadline) instead of giving it to "
         "whichever gateway asks first; more than the gateways' 10 ms retry tick. 0: first come, first "
         "served")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{10'000}));
}

StatusOr<EngineOptions> engine_options(const EngineFlags& f, const ModelConfig& cfg) {
  EngineOptions o;
  o.max_context = f.max_context > 0 ? std::min(f.max_context, cfg.context_length) : cfg.context_length;
  PD_ASSIGN_OR_RETURN(o.num_blocks, kv_blocks(f, cfg, o.max_context));
  o.block_size = f.block_size;
  o.step_token_budget = f.step_token_budget;
  o.max_running = f.max_running;
  o.max_waiting = f.max_waiting;
  o.prefix_caching = !f.no_prefix_caching;
  o.prefill_slots = f.prefill_slots;
  o.decode_pending = f.decode_pending;
  o.handoff_lease_ms = f.handoff_lease_ms;
  o.layer_wise_kv = f.kv_layer_wise;
  o.deadline_priority_ms = f.deadline_priority_ms;
  return o;
}

StatusOr<KvTransportOptions> send_pool_options(const EngineFlags& f, const ModelConfig& cfg,
                                               int32_t max_context) {
  KvTransportOptions to;
  const uint64_t token_bytes = 2ull * static_cast<uint64_t>(cfg.num_layers) * cfg.kv_dim() * 2;
  // What one prompt's message takes of the pool (whole pages, and room for a pool's lead).
  const uint64_t one_prompt =
      kv_send_buffer_bytes(static_cast<uint64_t>(max_context) * token_bytes + kKvWireHeaderBytes);
  to.pool_capacity_bytes = static_cast<uint64_t>(f.prefill_slots) * one_prompt;
  if (!f.kv_send_memory.empty()) {
    StatusOr<KvMemoryBudget> b = parse_kv_memory_budget(f.kv_send_memory);
    if (!b.ok() || b->kind != KvMemoryBudget::Kind::kBytes)
      return invalid_argument(
          fmt::format("--kv-send-memory '{}': give a size in bytes with a unit (4GiB, 512MiB){}",
                      f.kv_send_memory, b.ok() ? "" : ": " + b.status().message()));
    if (b->bytes < one_prompt)
      return invalid_argument(
          fmt::format("--kv-send-memory {} cannot hold one prompt of --max-context {} tokens ({}); give at "
                      "least that, or "
                      "lower --max-context",
                      f.kv_send_memory, max_context, format_bytes(one_prompt)));
    to.pool_capacity_bytes = b->bytes;
  }
  to.pool_region_bytes = one_prompt;  // b_p held buffers of any prompt lengths fit b_p regions
  to.max_buffers = f.prefill_slots + 4;
  to.lease_ms = f.handoff_lease_ms + 5'000;  // the engine's lease frees first, with its slot
  to.prefault_pool = false;
  return to;
}

void add_front_flags(CLI::App& cmd, FrontOptions& o) {
  cmd.add_option("--host", o.host, "Address to listen on (0.0.0.0: every interface)")->capture_default_str();
  cmd.add_option("--port", o.port, "TCP port (0: any free port)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  cmd.add_option("--http-threads", o.http_threads, "I/O threads of the HTTP server (parse, tokenize, stream)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  cmd.add_option("--api-key", o.api_key,
                 "Require 'Authorization: Bearer KEY' on every route but /health (default: $PDSERVE_API_KEY; "
                 "unset: no key)");
  cmd.add_option(
      "--served-model-name", o.served_model_name,
      "The model name clients send and /v1/models lists (default: the model file's name without .gguf)");
  cmd.add_option("--max-body-bytes", o.max_body_bytes, "Largest request body; larger ones get 413")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1024}, size_t{1} << 32));
  cmd.add_option("--shutdown-timeout", o.shutdown_timeout_s,
                 "Seconds running requests may take to finish after SIGINT/SIGTERM before they are cancelled")
      ->capture_default_str()
      ->check(CLI::Range(0, 3600));
}

RouterOptions RouterFlags::options() const {
  RouterOptions o;
  o.admission = admission == "baseline" ? AdmissionPolicy::kBaseline : AdmissionPolicy::kOnDemand;
  o.scenario = scenario;
  o.ttft_budget_ms = ttft_budget_ms;
  o.ttft_budget_ms_per_token = ttft_budget_ms_per_token;
  return o;
}

void add_router_flags(CLI::App& cmd, RouterFlags& f) {
  cmd.add_option(
         "--ttft-budget-ms", f.ttft_budget_ms,
         "Disaggregated: how long a request may wait at the gateway for a prefill slot before it fails "
         "with 504 (plus --ttft-budget-ms-per-token for each prompt token)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}));
  cmd.add_option("--ttft-budget-ms-per-token", f.ttft_budget_ms_per_token,
                 "Disaggregated: extra waiting budget per prompt token")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1000.0));
  cmd.add_option(
         "--admission", f.admission,
         "Disaggregated: on-demand (prefills accept or refuse at once, requests wait at the gateway) or "
         "baseline (each request joins at once the queue of the prefill with the fewest open streams "
         "and waits there; no TTFT budget)")
      ->capture_default_str()
      ->check(CLI::IsMember({"on-demand", "baseline"}));
  cmd.add_option("--scenario", f.scenario,
                 "Disaggregated: the scenario these instances serve (in errors and logs)")
      ->capture_default_str();
}

int run_openai_front(FrontOptions o, const FrontLoader& load) {
  if (o.api_key.empty()) {
    if (const char* env = std::getenv("PDSERVE_API_KEY"); env && *env) o.api_key = env;
  }
  if (o.served_model_name.empty()) {
    // A file's name without its extension; a checkpoint directory's whole name ("Qwen2.5-7B").
    // (weakly_canonical, so that ".", ".." and "dir/" name the directory itself.)
    std::error_code ec;
    const std::filesystem::path path = std::filesystem::weakly_canonical(o.model_path, ec);
    o.served_model_name =
        o.model_path.starts_with("synthetic:") ? o.model_path
        : std::filesystem::is_directory(path, ec)
            ? (path.has_filename() ? path.filename() : path.parent_path().filename()).string()
            : std::filesystem::path(o.model_path).stem().string();
  }
  std::signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();
  start_signal_thread();  // before any other thread, so that they all inherit the blocked mask

  api::ApiService service(
      {.served_model_name = o.served_model_name, .model_aliases = o.model_aliases, .api_key = o.api_key});
  api::HttpServerOptions http;
  http.host = o.host;
  http.port = static_cast<uint16_t>(o.port);
  http.num_threads = o.http_threads;
  http.max_body_bytes = o.max_body_bytes;
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
  const std::string url_host = o.host == "0.0.0.0" ? "127.0.0.1" : o.host;
  PD_LOG_INFO("{}: listening on http://{}:{}; loading {}", o.command, o.host, server->port(), o.model_path);

  auto t0 = std::chrono::steady_clock::now();
  StatusOr<FrontBackend> loaded = load(service);
  if (!loaded.ok()) {
    fmt::print(stderr, "error: {}\n", loaded.status().message());
    return loaded.status().code() == StatusCode::kInvalidArgument ? 2 : 1;
  }
  FrontBackend& b = *loaded;
  service.set_ready(b.backend);
  set_loading(false);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  PD_LOG_INFO("{}: ready in {:.2f} s: {}, {} HTTP threads{}", o.command, load_s, b.description,
              o.http_threads, o.api_key.empty() ? "" : ", API key required");
  fmt::print(
      "\npdserve is serving '{}' (OpenAI-compatible API) at http://{}:{}/v1 — try:\n\n"
      "  curl http://{}:{}/v1/chat/completions -H 'Content-Type: application/json'{} \\\n"
      "    -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
      "Health: /health; metrics: /metrics. Ctrl-C stops.\n\n",
      o.served_model_name, url_host, server->port(), url_host, server->port(),
      o.api_key.empty() ? "" : " -H \"Authorization: Bearer $PDSERVE_API_KEY\"", o.served_model_name);
  std::fflush(stdout);

  while (signals_received() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));

  PD_LOG_INFO("{}: shutting down: no new connections; {} requests running (waiting up to {} s)", o.command,
              service.num_in_flight(), o.shutdown_timeout_s);
  server->stop_accepting();
  service.set_draining();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(o.shutdown_timeout_s);
  while (service.num_in_flight() > 0 && signals_received() < 2 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (int64_t left = service.num_in_flight(); left > 0)
    PD_LOG_INFO("{}: cancelling {} requests", o.command, left);
  b.shutdown();  // cancels what still runs; their clients get an error event or a 503
  for (int i = 0; i < 100 && service.num_in_flight() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->stop();
  server.reset();
  b.owner.reset();
  PD_LOG_INFO("{}: stopped", o.command);
  return 0;
}

}  // namespace pdserve

// What the serving commands (serve, instance, gateway) share: signal handling, model loading and
// the KV budget. Part of the pdserve binary, not a module.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "api/service.h"
#include "common/status.h"
#include "engine/engine.h"
#include "gateway/router.h"
#include "kvcache/kv_types.h"
#include "model/executor.h"
#include "model/gguf.h"
#include "model/llama_model.h"
#include "model/safetensors.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace CLI {
class App;
}

namespace pdserve {

// Blocks SIGINT and SIGTERM in this thread (call it before starting any other) and takes them on
// a thread of its own: while loading, a signal exits at once; afterwards each one is counted.
void start_signal_thread();
int signals_received();
void set_loading(bool loading);

// Raises the open-file limit to its hard maximum (many connections).
void raise_fd_limit();

struct LoadedModel {
  // A synthetic model ("synthetic:llama-3.1-8b": a published model's shapes, random weights made
  // on the GPU, for benchmarks) has no file of its own: `file` is then the built-in default model,
  // whose tokenizer and chat template it borrows, and its vocabulary is that tokenizer's.
  std::string synthetic;
  // A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json): its
  // weights run on a GPU only, and `file` holds its tokenizer as GGUF metadata (no tensors).
  std::shared_ptr<const HfCheckpoint> checkpoint;
  std::shared_ptr<const GgufFile> file;
  std::unique_ptr<LlamaModel> model;  // null when loaded without weights
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;  // none: chat completions answer 400
};
// The GGUF file, its tokenizer and chat template, and (weights = true) the model itself. A
// gateway tokenizes and applies the template but runs no model. "synthetic:NAME" loads the
// borrowed tokenizer, a directory a Hugging Face checkpoint (its tokenizer.json and headers;
// weights = true is refused for both: they run on a GPU only).
StatusOr<LoadedModel> load_model(const std::string& path, bool weights);
// The model's configuration (a synthetic model's from the CUDA backend).
StatusOr<ModelConfig> loaded_model_config(const LoadedModel& m);
// Seed of a served synthetic model's weights: the same in every process, so the prefills and
// decodes of a cluster run one model.
inline constexpr uint64_t kServedSyntheticSeed = 1;
// What the model's instances report as its fingerprint (the file's, or the synthetic model's).
uint64_t loaded_model_fingerprint(const LoadedModel& m);

// The engine flags of `serve` and `instance`.
struct EngineFlags {
  std::string device = "cpu";  // --device: cpu, cuda or cuda:N
  std::string dtype = "auto";  // --dtype: auto, bf16 or fp16 (GPU only)
  int threads = 0;
  std::string kv_cache_memory;  // empty: 1GiB, capped at max_running full contexts
  std::string kv_send_memory;   // prefill send buffers; empty: prefill_slots prompts of max_context
  int block_size = kDefaultBlockSize;
  int max_running = 64;
  int max_waiting = 1024;
  int step_token_budget = 512;
  int max_context = 0;
  bool no_prefix_caching = false;
  // Prefill and decode roles.
  int prefill_slots = 4;
  int decode_pending = 8;
  int64_t handoff_lease_ms = 30'000;
  bool kv_layer_wise = false;
  int64_t deadline_priority_ms = 15;
};
void add_engine_flags(CLI::App& cmd, EngineFlags& flags);
// The engine options the flags ask for on this model (the KV budget in blocks, the context);
// kInvalidArgument names the flag at fault.
StatusOr<EngineOptions> engine_options(const EngineFlags& flags, const ModelConfig& cfg);
// --device: where the model runs.
struct DeviceChoice {
  bool cuda = false;
  int index = 0;  // the GPU, with cuda
  // The GPU's number format: "bf16", "fp16", or "auto" (fp16 where the weights are stored as fp16,
  // else bf16).
  std::string dtype = "auto";
};
// `text`: --device; `dtype`: --dtype (anything but auto only with a GPU).
StatusOr<DeviceChoice> parse_device(const std::string& text, const std::string& dtype = "auto");
// Loads what `model` needs for the device (the weights on the CPU only for the CPU).
StatusOr<LoadedModel> load_model_for(const std::string& path, const DeviceChoice& device);
// The backend an engine runs on: the CPU engine over m.model (sharing `pool`), or the GGUF file's
// weights on the GPU; a KV cache of o.num_blocks × o.block_size either way.
StatusOr<std::unique_ptr<ModelExecutor>> make_executor(const DeviceChoice& device, const LoadedModel& m,
                                                       ThreadPool& pool, const EngineOptions& o);
// The CUDA backend's half of make_executor and of loaded_model_config, and its KV transport
// (cuda_backend.cpp, or no_cuda_backend.cpp in a build without nvcc, which says so).
// On a GPU, an instance that runs decode steps (not a prefill) tunes their matrix products for up to
// o.max_running sequences before it serves (CudaLlamaModel::tune_decode_steps).
StatusOr<std::unique_ptr<ModelExecutor>> make_cuda_executor(const LoadedModel& m, const DeviceChoice& device,
                                                            const EngineOptions& o);
StatusOr<ModelConfig> synthetic_model_config(const std::string& name, int32_t vocab_size);
// A KV transport for a KV cache on a GPU: cuda-ipc, or shm/tcp staged through host memory.
StatusOr<KvTransport> make_cuda_transport(TransportKind kind, const KvTransportOptions& options);
// Whether this build has the CUDA backend (nvcc was found when it was configured).
bool cuda_backend_built();
// The KV transport of an instance: for a GPU's cache from the CUDA backend, else make_transport.
StatusOr<KvTransport> make_instance_transport(TransportKind kind, const KvTransportOptions& options,
                                              bool gpu);

// KV transport options for a prefill's send pool: room for prefill_slots prompts of the longest
// context, or --kv-send-memory (host memory is reserved and touched only where used; GPU memory
// is allocated whole), a lease a little longer than the engine's. INVALID_ARGUMENT for a bad
// --kv-send-memory.
StatusOr<KvTransportOptions> send_pool_options(const EngineFlags& flags, const ModelConfig& cfg,
                                               int32_t max_context);

// The OpenAI-compatible front of `serve` and `gateway`.
struct FrontOptions {
  std::string command;  // "serve" or "gateway": names the log lines
  std::string host = "127.0.0.1";
  int port = 8000;
  int http_threads = 2;
  size_t max_body_bytes = size_t{8} << 20;
  std::string api_key;                     // empty: $PDSERVE_API_KEY, else none
  std::string served_model_name;           // empty: the model file's name without .gguf
  std::vector<std::string> model_aliases;  // more accepted "model" names (a gateway's scenarios)
  std::string model_path;
  int shutdown_timeout_s = 30;
};
// What a front's loader hands back.
struct FrontBackend {
  api::Backend backend;
  std::function<void()> shutdown;  // cancels what still runs (once, after draining)
  std::string description;         // for the "ready" log line
  std::shared_ptr<void> owner;     // keeps the backend's objects alive until the server stopped
};
using FrontLoader = std::function<StatusOr<FrontBackend>(api::ApiService& service)>;
// The front's flags: --host, --port, --http-threads, --api-key, --served-model-name,
// --max-body-bytes, --shutdown-timeout (the model flag is each command's own).
void add_front_flags(CLI::App& cmd, FrontOptions& options);

// The router's flags of `serve` (disaggregated) and `gateway`.
struct RouterFlags {
  int64_t ttft_budget_ms = 60'000;
  double ttft_budget_ms_per_token = 0;
  std::string admission = "on-demand";
  std::string scenario = "default";
  RouterOptions options() const;
};
void add_router_flags(CLI::App& cmd, RouterFlags& flags);
// Listens (GET /health answers 503 while loading), loads, prints how to call it, serves until
// SIGINT/SIGTERM, drains for up to shutdown_timeout_s (a second signal cancels at once), stops.
// Returns the exit code: 0, 1 when it could not start, 2 for a bad setting.
int run_openai_front(FrontOptions options, const FrontLoader& load);

}  // namespace pdserve

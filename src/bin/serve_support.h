// What the serving commands (serve, instance, gateway) share: signal handling, model loading and
// the KV budget. Part of the pdserve binary, not a module.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "api/service.h"
#include "common/status.h"
#include "model/gguf.h"
#include "model/llama_model.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {

// Blocks SIGINT and SIGTERM in this thread (call it before starting any other) and takes them on
// a thread of its own: while loading, a signal exits at once; afterwards each one is counted.
void start_signal_thread();
int signals_received();
void set_loading(bool loading);

// Raises the open-file limit to its hard maximum (many connections).
void raise_fd_limit();

struct LoadedModel {
  std::shared_ptr<const GgufFile> file;
  std::unique_ptr<LlamaModel> model;  // null when loaded without weights
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;  // none: chat completions answer 400
};
// The GGUF file, its tokenizer and chat template, and (weights = true) the model itself. A
// gateway tokenizes and applies the template but runs no model.
StatusOr<LoadedModel> load_model(const std::string& path, bool weights);

// KV blocks for a --kv-cache-memory value (empty: the default, 1GiB capped at what max_running
// full contexts need).
StatusOr<int32_t> kv_blocks(const std::string& kv_cache_memory, int32_t block_size, int32_t max_running,
                            const ModelConfig& cfg, int32_t max_context);

// The OpenAI-compatible front of `serve` and `gateway`.
struct FrontOptions {
  std::string command;  // "serve" or "gateway": names the log lines
  std::string host = "127.0.0.1";
  int port = 8000;
  int http_threads = 2;
  size_t max_body_bytes = size_t{8} << 20;
  std::string api_key;            // empty: $PDSERVE_API_KEY, else none
  std::string served_model_name;  // empty: the model file's name without .gguf
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
// Listens (GET /health answers 503 while loading), loads, prints how to call it, serves until
// SIGINT/SIGTERM, drains for up to shutdown_timeout_s (a second signal cancels at once), stops.
// Returns the exit code: 0, 1 when it could not start, 2 for a bad setting.
int run_openai_front(FrontOptions options, const FrontLoader& load);

}  // namespace pdserve

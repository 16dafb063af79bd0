// Engine: one instance serving many requests at once — a continuous-batching Scheduler, the
// model as executor, and the KV storage. One engine thread runs the step loop (plan a step,
// run one forward pass over all its chunks, sample, stream); any thread may submit or cancel.
//
// Outputs go to each request's OutputSink, called on the engine thread in order: text as it
// becomes final (stop strings held back), the sampled tokens with their log-probabilities when
// asked, and a last output with finished = true, the finish reason and usage. A sink must be
// quick and must not call back into the engine (post the output to your own thread instead).
// Cancellation (RequestHandle::cancel) frees the request's KV blocks at the start of the next
// step; its sink then gets a final output with finish reason "cancelled".
//
// Outputs do not depend on what else runs: the forward pass is batch invariant and each
// request samples with its own seeded Sampler, so a request streams the same tokens alone, in a
// busy batch, or after being preempted and recomputed.
// Thread-safety: submit(), validate(), metrics() and RequestHandle::cancel() are thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "engine/sampler.h"
#include "kvcache/kv_cache_manager.h"
#include "model/llama_model.h"
#include "scheduler/scheduler.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {

struct EngineOptions {
  int32_t block_size = kDefaultBlockSize;  // tokens per KV block
  int32_t num_blocks = 0;                  // KV capacity in blocks (required)
  int32_t step_token_budget = 512;         // tokens computed per step (decodes + prefill chunks)
  int32_t max_running = 64;                // sequences running at once
  int32_t max_waiting = 1024;              // queued requests beyond which submit() refuses
  bool prefix_caching = true;
  int32_t max_context = 0;  // most tokens per sequence (prompt + generated); 0: the model's context

  Status validate() const;
};

struct EngineRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 16;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  bool ignore_eos = false;
  bool logprobs = false;  // report each token's log-probability (and sampling.top_logprobs alternatives)
};

struct GeneratedToken {
  int32_t id = 0;
  float logprob = 0.0f;           // when EngineRequest::logprobs
  std::vector<TokenLogprob> top;  // sampling.top_logprobs alternatives, best first
};

struct EngineOutput {
  std::string text;                    // newly final text
  std::vector<GeneratedToken> tokens;  // tokens sampled since the previous output
  bool finished = false;
  std::string finish_reason;  // when finished: "stop", "length", "cancelled" or "error"
  Status error;               // when finish_reason is "error"
  // Usage, filled when finished.
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_prompt_tokens = 0;  // prompt tokens taken from the prefix cache
};

using OutputSink = std::function<void(EngineOutput&&)>;

class RequestHandle {
 public:
  void cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> cancelled_{false};
};

// A consistent snapshot, refreshed after every step.
struct EngineMetrics {
  int32_t running = 0;
  int32_t waiting = 0;  // in the scheduler's queue and not yet picked up
  KvCacheStats kv;
  int64_t preemptions_total = 0;
  int64_t prompt_tokens_total = 0;     // prompt tokens of finished requests
  int64_t generated_tokens_total = 0;  // tokens sampled
  int64_t computed_tokens_total = 0;   // tokens run through the model (prefill + decode)
  int64_t steps_total = 0;
  double step_seconds_total = 0;
  double last_step_seconds = 0;
  std::unordered_map<std::string, int64_t> finished_by_reason;
};

class Engine {
 public:
  // Starts the engine thread. The model, tokenizer and pool must outlive the engine; the pool
  // is used by the engine thread only.
  Engine(LlamaModel& model, const Tokenizer& tokenizer, ThreadPool& pool, const EngineOptions& options);
  ~Engine();  // finishes every request as "cancelled" and joins the engine thread
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Checks a request against the model and the limits without submitting it: kInvalidArgument
  // with a message naming the problem and the numbers (empty prompt, unknown token, prompt plus
  // max_tokens beyond the context, invalid sampling parameters).
  Status validate(const EngineRequest& request) const;
  // Queues a request. Errors: those of validate(); kResourceExhausted when max_waiting requests
  // are already queued (retry later).
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink);

  EngineMetrics metrics() const;
  const EngineOptions& options() const { return options_; }
  int32_t max_context() const { return max_context_; }
  size_t kv_bytes() const { return kv_storage_.bytes(); }

 private:
  struct Pending {
    EngineRequest request;
    OutputSink sink;
    std::shared_ptr<RequestHandle> handle;
  };
  struct Active;

  void loop();
  void step();
  void finish(SequenceId id, EngineOutput&& last);
  void publish_metrics(double step_seconds);

  LlamaModel& model_;
  const Tokenizer& tokenizer_;
  ThreadPool& pool_;
  EngineOptions options_;
  int32_t max_context_;

  // Engine thread only.
  KvStorage kv_storage_;
  KvCacheManager kv_;
  Scheduler scheduler_;
  std::unordered_map<SequenceId, std::unique_ptr<Active>> active_;
  SequenceId next_id_ = 1;
  std::vector<float> logits_;
  std::vector<int32_t> batch_tokens_;
  int64_t prompt_tokens_total_ = 0;
  int64_t generated_tokens_total_ = 0;
  int64_t computed_tokens_total_ = 0;
  int64_t steps_total_ = 0;
  double step_seconds_total_ = 0;
  std::unordered_map<std::string, int64_t> finished_by_reason_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> incoming_;  // guarded by mu_
  bool stop_ = false;             // guarded by mu_
  EngineMetrics metrics_;         // guarded by mu_
  std::thread thread_;
};

}  // namespace pdserve

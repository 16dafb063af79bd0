// Engine: one instance serving many requests at once — a continuous-batching Scheduler, the
// model as executor, and the KV storage. One engine thread runs the step loop (plan a step,
// run one forward pass over all its chunks, sample, stream); any thread may submit or cancel.
//
// Outputs go to each request's OutputSink, called in order, on the engine thread (a prefill's
// queued request that ends before it started — cancelled, or the engine shutting down — gets its
// one final output on the thread that freed a slot or shut the engine down): text as it
// becomes final (stop strings held back), the sampled tokens with their log-probabilities when
// asked, and a last output with finished = true, the finish reason and usage. A sink must be
// quick; it runs with no engine lock held, so it may call the thread-safe methods (submit,
// release_handoff — a router does) but nothing that waits for this engine's thread.
// Cancellation (RequestHandle::cancel) frees the request's KV blocks at the start of the next
// step; its sink then gets a final output with finish reason "cancelled" (a prefill's queued
// request: when it reaches the head of the queue, or sooner when another request joins it).
//
// Outputs do not depend on what else runs: the forward pass is batch invariant and each
// request samples with its own seeded Sampler, so a request streams the same tokens alone, in a
// busy batch, or after being preempted and recomputed.
//
// Roles (EngineOptions::role) are configurations of the same engine:
//   mixed    prefill and decode on this instance (aggregated serving)
//   prefill  at most prefill_slots requests at once and no queue: submit() refuses the next one
//            at once, and one whose KV the send pool (transfer/) has no room for — except a
//            request that asks to queue (EngineRequest::queue_if_full, the baseline admission),
//            which waits in a FIFO for the next free slot. The request's
//            contiguous send buffer is taken at submit(); when its first token is sampled, its
//            prompt KV is gathered into it, its blocks are freed, and its last output carries
//            an EngineHandoff (finish reason "handoff"). The slot stays held until
//            release_handoff() — the decode has the KV — or until the handoff's lease runs out.
//            With layer_wise_kv, the KV leaves layer by layer instead: before the step that
//            completes a prompt, the send buffer is committed and an early output carries its
//            handoff (first_token -1, not finished); each layer is gathered into it as the forward
//            pass finishes it, and the first token is published into it after sampling. A request
//            that ends otherwise at its first token (stop, error, cancel) gives the buffer up, which
//            fails the pulls waiting on it.
//   decode   continues handed-off requests (submit_handoff()): a small pending queue; when a
//            running seat and blocks are free, the KV is pulled into fresh blocks (one pull per
//            freed seat), `on_pulled` tells the caller (who tells the prefill), and the request
//            joins the batch at the next step. Outputs continue after the first token. A handoff
//            with first_token -1 (layer-wise) takes its first token from the KV transfer.
// Thread-safety: submit(), submit_handoff(), release_handoff(), validate(), metrics() and
// RequestHandle::cancel() are thread-safe.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "engine/json_constraint.h"
#include "engine/sampler.h"
#include "kvcache/kv_cache_manager.h"
#include "model/executor.h"
#include "model/llama_model.h"
#include "scheduler/scheduler.h"
#include "tokenizer/tokenizer.h"
#include "transfer/kv_transport.h"

namespace pdserve {

enum class EngineRole { kMixed, kPrefill, kDecode };

// Deadlines this close count as one (a request's deadline moves by the network's delay between
// its retries).
inline constexpr int64_t kDeadlineTieMs = 2;
std::string_view engine_role_name(EngineRole role);  // "mixed", "prefill", "decode"

struct EngineOptions {
  int32_t block_size = kDefaultBlockSize;  // tokens per KV block
  int32_t num_blocks = 0;                  // KV capacity in blocks (required)
  int32_t step_token_budget = 512;         // tokens computed per step (decodes + prefill chunks)
  int32_t max_running = 64;                // sequences running at once
  int32_t max_waiting = 1024;              // queued requests beyond which submit() refuses
  bool prefix_caching = true;
  int32_t max_context = 0;  // most tokens per sequence (prompt + generated); 0: the model's context
  EngineRole role = EngineRole::kMixed;
  // Prefill role: requests held at once, from acceptance until their KV has left (b_p). 0: no
  // limit (requests queue in the prefill, up to max_waiting).
  int32_t prefill_slots = 4;
  // Prefill role: a handed-off request's slot and send buffer are freed after this long even if
  // nobody calls release_handoff() (a decode that never pulls).
  int64_t handoff_lease_ms = 30'000;
  // Prefill role: send each prompt's KV layer by layer during the forward pass that completes it
  // (early handoff, see above), where the executor reports layers and the send pool supports it
  // (KvSendPool::supports_layer_wise); otherwise the KV leaves whole after the first token as
  // usual.
  bool layer_wise_kv = false;
  // Prefill role, requests with a deadline (EngineRequest::wait_budget_us): for this long after
  // refusing one, the last free slot goes only to a request due no later than the most urgent
  // refused (within kDeadlineTieMs), or to one of its gateway queue: requests wait at several gateways,
  // which retry every few ms, and this gives a freed slot to the most urgent of them rather than
  // to whichever asks first. Each refusal of that request renews it; taking it (or a request of
  // its queue) ends it. 0: first come, first served.
  int64_t deadline_priority_ms = 15;
  // The clock of deadline_priority_ms (injectable for tests); nullptr: the steady clock.
  std::function<std::chrono::steady_clock::time_point()> clock;
  // Decode role: handed-off requests waiting for a running seat and their KV (the pending queue).
  int32_t decode_pending = 8;
  KvSendPool* kv_send = nullptr;  // prefill role: where prompt KV leaves from (required)
  KvPuller* kv_puller = nullptr;  // decode role: how prompt KV arrives (required)
  // Called after a prefill slot or a decode pending place frees up (any thread, no engine lock
  // held): a gateway may retry what it holds back. Must be quick.
  std::function<void()> on_capacity;
  // Called on the engine thread after every step that ran the model, with its duration and the
  // tokens it computed (for histograms; must be quick and must not call into the engine).
  std::function<void(double step_seconds, int32_t step_tokens)> on_step;

  Status validate() const;
};

struct EngineRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 16;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any
  bool ignore_eos = false;
  bool logprobs = false;  // report each token's log-probability (and sampling.top_logprobs alternatives)
  std::string scenario;   // a gateway's P/D group for it (empty: its default); engines ignore it
  // How much longer a gateway lets the request wait for a prefill (what is left of its TTFT
  // budget), in microseconds; -1: no deadline. A prefill favours the nearest deadline among the
  // requests it refused (EngineOptions::deadline_priority_ms).
  int64_t wait_budget_us = -1;
  // The gateway queue it waits in (a router's id; 0: none). A queue goes in deadline order, so
  // what it offers after its most urgent request was refused means that one has gone: a prefill
  // keeping a slot for it gives the slot to that queue.
  uint64_t wait_queue = 0;
  // The paper's baseline admission: when every slot of this prefill is held, wait in its FIFO
  // queue (up to EngineOptions::max_waiting) instead of being refused. Other roles ignore it.
  bool queue_if_full = false;
  // kJsonObject: the generated text is one JSON object (engine/json_constraint.h), and its end is
  // the end of generation (so not with ignore_eos).
  ResponseFormat response_format = ResponseFormat::kText;
};

struct GeneratedToken {
  int32_t id = 0;
  float logprob = 0.0f;           // when EngineRequest::logprobs
  std::vector<TokenLogprob> top;  // sampling.top_logprobs alternatives, best first
};

// What a prefill hands to a decode instance besides the request itself.
struct EngineHandoff {
  KvHandle kv;  // the prompt's KV in the prefill's send pool
  // Sampled by the prefill (already in this output's tokens); -1 in an early (layer-wise)
  // handoff, whose first token comes with the KV.
  int32_t first_token = 0;
  int32_t num_prompt_tokens = 0;
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
  // Prefill role, finish reason "handoff": where the prompt KV waits and what was sampled. Also
  // in an early output (not finished, no tokens) when the KV leaves layer-wise.
  std::optional<EngineHandoff> handoff;
};

using OutputSink = std::function<void(EngineOutput&&)>;

// Called by a decode engine on its thread once a handed-off request's KV has landed (OK) or
// could not be fetched (the error): either way the prefill may free the slot and buffer.
using PulledCallback = std::function<void(const Status&)>;

class RequestHandle {
 public:
  RequestHandle() = default;
  // A handle also cancelled with `parent` (one attempt of a request that a router may give up
  // alone).
  explicit RequestHandle(std::shared_ptr<const RequestHandle> parent) : parent_(std::move(parent)) {}
  void cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const {
    return cancelled_.load(std::memory_order_relaxed) || (parent_ && parent_->cancelled());
  }

 private:
  std::atomic<bool> cancelled_{false};
  const std::shared_ptr<const RequestHandle> parent_;
};

// A consistent snapshot, refreshed after every step.
struct EngineMetrics {
  int32_t running = 0;
  int32_t waiting = 0;  // in the scheduler's queue and not yet picked up
  KvCacheStats kv;
  int64_t preemptions_total = 0;
  int64_t prompt_tokens_total = 0;        // prompt tokens of finished requests
  int64_t generated_tokens_total = 0;     // tokens sampled
  int64_t computed_tokens_total = 0;      // tokens run through the model (prefill + decode)
  int64_t nonfinite_logits_total = 0;     // requests failed for logits without a usable value (NaN)
  int32_t prefill_slots_in_use = 0;       // prefill role: accepted, KV not yet released
  int32_t handoffs_outstanding = 0;       // prefill role: KV waiting in send buffers
  int64_t handoffs_total = 0;             // prefill role
  int64_t layer_wise_handoffs_total = 0;  // prefill role: of which the KV left layer by layer
  int64_t handoff_leases_expired_total = 0;
  // Prefill role: requests refused although a slot was free, for a more urgent one (deadline_priority_ms).
  int64_t priority_refusals_total = 0;
  int32_t decode_pending = 0;         // decode role: handed-off requests waiting for a seat
  int32_t kv_pulls_in_flight = 0;     // decode role
  int64_t kv_pulls_failed_total = 0;  // decode role
  // Decode role: pulls that landed, their wire bytes, and their time from submission to landing
  // (microseconds; with the layer-wise option this includes waiting for the prefill's layers).
  int64_t kv_pulls_total = 0;
  int64_t kv_pulled_bytes_total = 0;
  int64_t kv_pull_microseconds_total = 0;
  // A router over several engines (gateway/): requests held at the gateway, budget timeouts,
  // refusals by full prefills, prefill failures retried elsewhere. Zero for one engine.
  int32_t gateway_waiting = 0;
  int64_t gateway_timeouts_total = 0;
  int64_t gateway_rejections_total = 0;
  int64_t gateway_room_rejections_total = 0;  // of those, for room in the prefill's KV send buffers
  int64_t gateway_prefill_retries_total = 0;
  int64_t steps_total = 0;
  double step_seconds_total = 0;
  double last_step_seconds = 0;
  std::unordered_map<std::string, int64_t> finished_by_reason;
  // A gateway: its figures per scenario (empty for one engine).
  struct Scenario {
    std::string name;
    int64_t requests_total = 0;  // requests received
    int32_t waiting = 0;         // held at the gateway
    int64_t timeouts_total = 0;  // waited beyond their TTFT budget
  };
  std::vector<Scenario> scenarios;
};

// Adds b's figures to a (sums; the latest step time is the larger; scenario lists appended).
void add_metrics(EngineMetrics& a, const EngineMetrics& b);

// The checks of a request that need no model: sampling parameters, a non-empty prompt,
// max_tokens >= 1, prompt plus max_tokens within max_context (the numbers named), no empty stop
// string. kInvalidArgument with a message for the client.
Status check_request_limits(const EngineRequest& request, int32_t max_context);

// What the OpenAI service needs from whatever generates tokens: one Engine (aggregated), or a
// router over prefill and decode engines (gateway/). Thread-safe.
class GenerationBackend {
 public:
  virtual ~GenerationBackend() = default;
  virtual int32_t max_context() const = 0;
  // The most tokens (prompt + generated) one sequence may hold: the context, and the KV cache it
  // must fit alone.
  virtual int64_t max_sequence_tokens() const = 0;
  virtual Status validate(const EngineRequest& request) const = 0;
  // `handle`: the request's cancellation flag (nullptr: a new one).
  virtual StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink,
                                                          std::shared_ptr<RequestHandle> handle) = 0;
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink) {
    return submit(std::move(request), std::move(sink), nullptr);
  }
  virtual EngineMetrics metrics() const = 0;
};

// One instance of a role, reached in this process (Engine) or over the network (a client that
// speaks the internal API). What a router needs beyond GenerationBackend. Thread-safe.
class Instance : public GenerationBackend {
 public:
  virtual EngineRole role() const = 0;
  // Decode role: continues a handed-off request (see Engine::submit_handoff).
  virtual StatusOr<std::shared_ptr<RequestHandle>> submit_handoff(EngineRequest request,
                                                                  const EngineHandoff& handoff,
                                                                  OutputSink sink, PulledCallback on_pulled,
                                                                  std::shared_ptr<RequestHandle> handle) = 0;
  // Prefill role: frees a handed-off request's slot and staged KV.
  virtual Status release_handoff(const KvBufferRef& kv) = 0;
};

class Engine : public Instance {
 public:
  // Starts the engine thread. The model, tokenizer and pool must outlive the engine. The pool is
  // used only inside the model's forward pass, which runs one at a time per model, so engines of
  // one process may share a pool.
  Engine(LlamaModel& model, const Tokenizer& tokenizer, ThreadPool& pool, const EngineOptions& options);
  // The same over any backend: `executor`'s KV cache must hold options.num_blocks blocks of
  // options.block_size. A prefill or decode role needs its KV in host memory (host_kv()).
  Engine(std::unique_ptr<ModelExecutor> executor, const Tokenizer& tokenizer, const EngineOptions& options);
  ~Engine() override;  // shutdown()
  // Finishes every request as "cancelled" (a prefill's queued ones, not started, as "error" with
  // kUnavailable) and joins the engine thread; later submissions fail (kUnavailable).
  // release_handoff() still works. Idempotent.
  void shutdown();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Checks a request against the model and the limits without submitting it: kInvalidArgument
  // with a message naming the problem and the numbers (empty prompt, unknown token, prompt plus
  // max_tokens beyond the context, invalid sampling parameters).
  Status validate(const EngineRequest& request) const override;
  // Queues a request. Errors: those of validate(); kResourceExhausted when max_waiting requests
  // are already queued (retry later).
  // Prefill role: kResourceExhausted at once when every slot is held (no queue; a queue_if_full
  // request waits instead in the prefill's FIFO, up to max_waiting, and takes the first slot that
  // frees, its send buffer then; it ends as "cancelled" if cancelled meanwhile, with kUnavailable
  // if the engine shuts down first), when the send
  // pool has no room for the prompt's KV (its buffer is taken here, so a request accepted always
  // has one to hand off in), or when the last free slot is kept for a more urgent request
  // (deadline_priority_ms).
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink,
                                                  std::shared_ptr<RequestHandle> handle) override;
  using GenerationBackend::submit;
  // Decode role: continues `request` from its handoff. Errors: those of validate() (and a
  // handoff that does not match the request); kResourceExhausted when decode_pending requests
  // already wait. `on_pulled` runs once, on the engine thread (see PulledCallback).
  StatusOr<std::shared_ptr<RequestHandle>> submit_handoff(EngineRequest request, const EngineHandoff& handoff,
                                                          OutputSink sink, PulledCallback on_pulled,
                                                          std::shared_ptr<RequestHandle> handle) override;
  // Prefill role: frees a handed-off request's slot and send buffer. kNotFound when it is no
  // longer held (released before, or its lease ran out).
  Status release_handoff(const KvBufferRef& kv) override;
  EngineRole role() const override { return options_.role; }
  uint64_t model_fingerprint() const { return kv_view_.layout.model_fingerprint; }
  // The element type of the KV it sends or takes (f16 on the CPU, bf16 on a GPU).
  KvDtype kv_dtype() const { return kv_view_.layout.dtype; }

  EngineMetrics metrics() const override;
  const EngineOptions& options() const { return options_; }
  int32_t max_context() const override { return max_context_; }
  int64_t max_sequence_tokens() const override {
    return std::min<int64_t>(max_context_, int64_t{options_.num_blocks} * options_.block_size);
  }
  size_t kv_bytes() const { return executor_->kv_bytes(); }
  std::string device() const { return executor_->device(); }

 private:
  struct Pending {
    EngineRequest request;
    OutputSink sink;
    std::shared_ptr<RequestHandle> handle;
    std::optional<EngineHandoff> handoff;  // decode role
    PulledCallback on_pulled;
    std::optional<KvSendBuffer> send;  // prefill role: the KV's send buffer, acquired at acceptance
  };
  struct HeldHandoff {
    KvBufferRef kv;
    std::chrono::steady_clock::time_point deadline;
    bool writing = false;        // layer-wise: the engine still writes it (no lease expiry)
    bool release_asked = false;  // layer-wise: released while writing; freed when the writing ends
  };
  struct Active;

  void loop();
  // Prefill role: starts queued requests (queue_if_full) while slots are free; called after a
  // slot was freed, on any thread, without mu_.
  void admit_slot_queue();
  // Ends a request that never started (queued, then cancelled or failed), on the caller's thread,
  // without mu_; counted in the metrics' finished_by_reason.
  void end_unstarted(Pending& p, std::string finish_reason, Status error);
  void step();
  void finish(SequenceId id, EngineOutput&& last);
  void publish_metrics(double step_seconds);
  void admit_incoming(std::deque<Pending>& incoming);
  // Prefill role: streams the first token, stages the prompt KV, ends the request "handoff".
  void hand_off(SequenceId id, EngineOutput& out);
  // Prefill role, layer-wise: commits a buffer for the prompt of `id` and streams the early
  // handoff (nothing when the pool has no buffer free now); send_layer() fills it.
  void begin_early_handoff(SequenceId id);
  void send_layer(int32_t layer);
  // Forgets the layer-wise buffer of a request that ends otherwise than "handoff"; the caller
  // releases it.
  KvBufferRef drop_early(Active& a);
  // Decode role: starts pulls for pending handoffs while seats and blocks allow; lands finished ones.
  void start_pulls();
  void land_pulls(bool wait);
  void expire_handoffs();
  void release_slot();
  // Prefill role: gives a slot back without waking anyone (taken, then not used).
  void unreserve_slot();
  // Prefill role: a send buffer for a prompt of `num_prompt` tokens; kResourceExhausted, naming
  // the sizes, when the pool has no room for it.
  StatusOr<KvSendBuffer> acquire_send_buffer(int32_t num_prompt);
  // Prefill role, mu_ held: a request due at `deadline`, waiting in gateway queue `queue`, was
  // refused (noted when it is the most urgent seen within deadline_priority_ms); whether such a
  // request may take one of `free_slots` (the last is kept for the noted one).
  void note_refused_locked(std::chrono::steady_clock::time_point deadline, uint64_t queue,
                           std::chrono::steady_clock::time_point now);
  bool may_take_slot_locked(std::chrono::steady_clock::time_point deadline, uint64_t queue,
                            int32_t free_slots, std::chrono::steady_clock::time_point now);
  // Copies the fields guarded by mu_ that change off the engine thread into metrics_ (mu_ held).
  void sync_transfer_metrics();
  // JSON mode's view of the vocabulary, made for the first request that needs it (any thread).
  const JsonVocabulary& json_vocab() const;

  std::unique_ptr<ModelExecutor> executor_;
  const ModelConfig& config_;
  const Tokenizer& tokenizer_;
  EngineOptions options_;
  int32_t max_context_;
  mutable std::once_flag json_vocab_once_;
  mutable std::unique_ptr<const JsonVocabulary> json_vocab_;  // set once, by json_vocab()

  // Engine thread only.
  KvCacheManager kv_;
  Scheduler scheduler_;
  std::unordered_map<SequenceId, std::unique_ptr<Active>> active_;
  SequenceId next_id_ = 1;
  std::vector<float> logits_;
  std::vector<int32_t> next_tokens_;  // drawn on the device
  std::vector<int32_t> host_rows_;    // logits rows the host samples (penalties, log-probabilities, JSON)
  std::vector<RowDraw> draws_;        // their draws
  std::vector<int32_t> batch_tokens_;
  std::vector<SequenceId> early_;  // prefill role: this step's layer-wise sends
  bool layer_wise_ = false;        // prefill role: layer_wise_kv and the executor and pool allow it
  int64_t prompt_tokens_total_ = 0;
  int64_t generated_tokens_total_ = 0;
  int64_t computed_tokens_total_ = 0;
  int64_t steps_total_ = 0;
  double step_seconds_total_ = 0;
  PagedKvView kv_view_;              // the executor's host KV for the transfer layer
  std::deque<SequenceId> to_pull_;   // decode role: pending handoffs, in arrival order
  std::vector<SequenceId> pulling_;  // decode role: KV on its way
  bool pull_blocked_ = false;        // decode role: the head of to_pull_ waits for a seat
  int64_t handoffs_total_ = 0;
  int64_t layer_wise_handoffs_total_ = 0;
  int64_t kv_pulls_failed_total_ = 0;
  int64_t nonfinite_logits_total_ = 0;
  int64_t kv_pulls_total_ = 0;
  int64_t kv_pulled_bytes_total_ = 0;
  int64_t kv_pull_microseconds_total_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> incoming_;    // guarded by mu_
  bool stop_ = false;               // guarded by mu_
  bool pull_ended_ = false;         // guarded by mu_; decode role: a KV pull ended, land it
  uint64_t pull_listener_ = 0;      // decode role: on kv_puller (0: none)
  int32_t slots_in_use_ = 0;        // guarded by mu_; prefill role
  std::deque<Pending> slot_queue_;  // guarded by mu_; prefill role: queue_if_full requests, FIFO
  uint64_t admit_epoch_ = 0;        // guarded by mu_; counts admit_slot_queue() calls
  int32_t sched_waiting_ = 0;       // guarded by mu_; the scheduler's waiting count, as published
  // guarded by mu_; prefill role: the most urgent deadline among the requests refused, and when
  // it was last refused (deadline_priority_ms)
  std::chrono::steady_clock::time_point urgent_deadline_{};
  std::chrono::steady_clock::time_point urgent_seen_{};
  uint64_t urgent_queue_ = 0;
  bool urgent_ = false;
  int64_t priority_refusals_total_ = 0;  // guarded by mu_
  int32_t num_pending_ = 0;              // guarded by mu_; decode role: handoffs submitted, not yet pulling
  std::vector<HeldHandoff> held_;        // guarded by mu_; prefill role
  int64_t leases_expired_total_ = 0;     // guarded by mu_
  // guarded by mu_; requests ended, by reason (finish(), and end_unstarted() on any thread)
  std::unordered_map<std::string, int64_t> finished_by_reason_;
  EngineMetrics metrics_;  // guarded by mu_
  std::thread thread_;
};

}  // namespace pdserve

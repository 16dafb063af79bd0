// Scheduler: continuous batching for one instance. Decides, step by step, which sequences run
// and how many of their tokens, under a per-step token budget and a cap on running sequences;
// admits waiting sequences first come, first served; and preempts by recomputation when KV
// blocks run out.
//
// Every sequence has tokens (prompt, then generated) of which the first num_computed have their
// KV written. A step gives each running sequence a chunk of its uncomputed tokens: decoding
// sequences (one token left) first, then prompts in admission order, chunked to the budget
// (chunked prefill), then newly admitted sequences. A chunk that reaches the end of a
// sequence's tokens asks for logits, and the caller appends the sampled token.
//
// When a chunk needs blocks and none are free, the most recently admitted running sequence is
// preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
// recomputed (prompt and generated tokens, prefix cache permitting) when blocks free up — never a
// crash or a stuck request, provided every sequence fits the cache alone (the caller checks
// that at submission with fits_alone()).
//
// Roles (prefill-only, decode-only, mixed) are configurations of this scheduler in later issues.
// Metadata only; no model, no KV memory. Not thread-safe: owned by the engine thread.
#pragma once

#include <cstdint>
#include <deque>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/status.h"
#include "kvcache/kv_cache_manager.h"

namespace pdserve {

struct SchedulerOptions {
  int32_t step_token_budget = 512;  // tokens computed per step, all chunks together
  int32_t max_running = 64;         // sequences holding KV blocks at once
};

struct ScheduledChunk {
  SequenceId seq = 0;
  int32_t first_position = 0;  // == the sequence's num_computed before the step
  int32_t num_tokens = 0;
  bool want_logits = false;  // the chunk ends at the sequence's last token: sample after it
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;                 // in batch order
  std::vector<SequenceId> preempted;                  // sent back to waiting during this plan
  std::vector<std::pair<SequenceId, Status>> failed;  // removed: they can never be admitted
  int32_t num_tokens() const;
  bool empty() const { return chunks.empty(); }
};

class Scheduler {
 public:
  Scheduler(KvCacheManager& kv, const SchedulerOptions& options);

  // Queues a new sequence with its prompt (non-empty). PD_CHECKs that `seq` is new.
  void add(SequenceId seq, std::vector<int32_t> prompt);
  // Whether a sequence of `total_tokens` (prompt + most tokens it may generate) fits the cache
  // with nothing else running; a sequence that does not could never finish.
  bool fits_alone(int64_t total_tokens) const;

  // Plans the next step and reserves the KV slots of its chunks. Call complete() after running
  // it, before the next plan.
  StepPlan plan();
  // Marks a planned step done: every chunk's tokens are computed (their KV written).
  void complete(const StepPlan& plan);
  // Appends a sampled token to a running sequence (after complete()).
  void append_token(SequenceId seq, int32_t token);
  // Drops a sequence wherever it is (finished, cancelled, failed, landing) and frees its blocks;
  // `uncache`: its blocks leave the prefix cache too where no other sequence holds them
  // (KvCacheManager::free).
  void remove(SequenceId seq, bool uncache = false);

  // Decode role: a sequence whose prompt KV is computed elsewhere (a prefill instance) and lands
  // here. `tokens` is the prompt followed by the first generated token. Allocates fresh blocks
  // for the prompt now; the caller writes the prompt's KV into block_table(seq), then calls
  // activate(). kResourceExhausted: no blocks now, running plus landing sequences are at the cap,
  // or sequences wait (they go first). A landing sequence is neither running nor waiting;
  // remove() drops it.
  Status import(SequenceId seq, std::vector<int32_t> tokens, int32_t num_prompt);
  // The imported KV has landed: the sequence runs (decoding) from the next plan. first_token >= 0
  // replaces the last of the imported tokens (a placeholder when the first token came with the
  // KV, as in a layer-wise transfer).
  void activate(SequenceId seq, int32_t first_token = -1);
  int32_t num_landing() const { return num_landing_; }

  std::span<const int32_t> tokens(SequenceId seq) const;
  int32_t num_prompt_tokens(SequenceId seq) const;
  // Prompt tokens taken from the prefix cache at the sequence's first admission.
  int32_t num_cached_prompt_tokens(SequenceId seq) const;
  std::span<const BlockId> block_table(SequenceId seq) const { return kv_.block_table(seq); }
  bool contains(SequenceId seq) const { return seqs_.contains(seq); }

  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int64_t num_preemptions() const { return preemptions_; }
  bool idle() const { return running_.empty() && waiting_.empty(); }

 private:
  struct Sequence {
    std::vector<int32_t> tokens;
    int32_t num_prompt = 0;
    int32_t num_computed = 0;
    int32_t num_cached_prompt = -1;  // set at first admission
    bool running = false;
    bool landing = false;  // imported, KV not yet landed
  };
  // Makes room for `needed` more slots of `seq`, preempting from the back of running_ (never
  // `seq` itself unless it is the last); false when `seq` itself was preempted.
  bool reserve(SequenceId seq, int32_t needed, StepPlan& plan);
  void preempt(SequenceId seq, StepPlan& plan);
  // Allocates blocks for a waiting sequence's tokens. kResourceExhausted: not now.
  Status admit(SequenceId seq);
  void plan_chunk(SequenceId seq, int32_t max_tokens, int32_t& budget, StepPlan& plan);

  KvCacheManager& kv_;
  SchedulerOptions options_;
  std::unordered_map<SequenceId, Sequence> seqs_;
  std::vector<SequenceId> running_;  // admission order
  std::deque<SequenceId> waiting_;   // arrival order; preempted sequences go back to the front
  int64_t preemptions_ = 0;
  int32_t num_landing_ = 0;
};

}  // namespace pdserve

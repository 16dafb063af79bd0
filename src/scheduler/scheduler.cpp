#include "scheduler/scheduler.h"

#include <algorithm>

#include "common/check.h"

namespace pdserve {

int32_t StepPlan::num_tokens() const {
  int32_t n = 0;
  for (const ScheduledChunk& c : chunks) n += c.num_tokens;
  return n;
}

Scheduler::Scheduler(KvCacheManager& kv, const SchedulerOptions& options) : kv_(kv), options_(options) {
  PD_CHECK(options.step_token_budget > 0 && options.max_running > 0);
}

void Scheduler::add(SequenceId seq, std::vector<int32_t> prompt) {
  PD_CHECK(!prompt.empty());
  Sequence s;
  s.num_prompt = static_cast<int32_t>(prompt.size());
  s.tokens = std::move(prompt);
  PD_CHECK_MSG(seqs_.emplace(seq, std::move(s)).second, "Scheduler::add: sequence id already in use");
  waiting_.push_back(seq);
}

bool Scheduler::fits_alone(int64_t total_tokens) const {
  return total_tokens > 0 &&
         (total_tokens + kv_.block_size() - 1) / kv_.block_size() <= kv_.block_pool().capacity();
}

void Scheduler::plan_chunk(SequenceId id, int32_t max_tokens, int32_t& budget, StepPlan& plan) {
  const Sequence& s = seqs_.at(id);
  int32_t remaining = static_cast<int32_t>(s.tokens.size()) - s.num_computed;
  int32_t n = std::min({remaining, max_tokens, budget});
  if (n <= 0) return;
  plan.chunks.push_back({id, s.num_computed, n, s.num_computed + n == static_cast<int32_t>(s.tokens.size())});
  budget -= n;
}

StepPlan Scheduler::plan() {
  StepPlan plan;
  int32_t budget = options_.step_token_budget;
  const std::vector<SequenceId> order = running_;  // preemption edits running_

  // Decoding sequences first: one token each, growing their tables as needed.
  for (SequenceId id : order) {
    if (budget == 0) break;
    const Sequence& s = seqs_.at(id);
    if (!s.running || static_cast<int32_t>(s.tokens.size()) - s.num_computed != 1) continue;
    if (!reserve(id, s.num_computed + 1, plan)) continue;
    plan_chunk(id, 1, budget, plan);
  }
  // Then prompts already admitted (their tables cover every token since admission).
  for (SequenceId id : order) {
    if (budget == 0) break;
    const Sequence& s = seqs_.at(id);
    if (!s.running || static_cast<int32_t>(s.tokens.size()) - s.num_computed <= 1) continue;
    plan_chunk(id, budget, budget, plan);
  }
  // Then new admissions, first come first served: the head of the queue waits for blocks
  // rather than being overtaken.
  while (budget > 0 && static_cast<int32_t>(running_.size()) < options_.max_running && !waiting_.empty()) {
    SequenceId id = waiting_.front();
    Status st = admit(id);
    if (st.code() == StatusCode::kResourceExhausted) break;
    waiting_.pop_front();
    if (!st.ok()) {
      seqs_.erase(id);
      plan.failed.emplace_back(id, std::move(st));
      continue;
    }
    running_.push_back(id);
    plan_chunk(id, budget, budget, plan);
  }
  return plan;
}

Status Scheduler::admit(SequenceId id) {
  Sequence& s = seqs_.at(id);
  PD_ASSIGN_OR_RETURN(SequenceAllocation a, kv_.allocate_for(id, s.tokens));
  s.num_computed = a.num_cached_tokens;
  if (s.num_cached_prompt < 0) s.num_cached_prompt = std::min(a.num_cached_tokens, s.num_prompt);
  s.running = true;
  return ok_status();
}

bool Scheduler::reserve(SequenceId id, int32_t needed, StepPlan& plan) {
  int32_t have = kv_.num_slots(id);
  if (have >= needed) return true;
  for (;;) {
    if (kv_.can_allocate(kv_.blocks_needed_to_append(id, needed - have))) break;
    SequenceId victim = running_.back();
    preempt(victim, plan);
    if (victim == id) return false;
  }
  Status st = kv_.append_slots(id, needed - have);
  PD_CHECK_MSG(st.ok(), st.message().c_str());
  return true;
}

void Scheduler::preempt(SequenceId id, StepPlan& plan) {
  Sequence& s = seqs_.at(id);
  kv_.free(id);
  s.num_computed = 0;
  s.running = false;
  running_.erase(std::find(running_.begin(), running_.end(), id));
  waiting_.push_front(id);
  ++preemptions_;
  plan.preempted.push_back(id);
  std::erase_if(plan.chunks, [id](const ScheduledChunk& c) { return c.seq == id; });
}

void Scheduler::complete(const StepPlan& plan) {
  for (const ScheduledChunk& c : plan.chunks) {
    auto it = seqs_.find(c.seq);
    if (it == seqs_.end() || !it->second.running) continue;  // removed meanwhile
    Sequence& s = it->second;
    PD_CHECK(s.num_computed == c.first_position);
    s.num_computed += c.num_tokens;
    kv_.commit_full_blocks(c.seq,
                           std::span<const int32_t>(s.tokens).first(static_cast<size_t>(s.num_computed)));
  }
}

void Scheduler::append_token(SequenceId id, int32_t token) { seqs_.at(id).tokens.push_back(token); }

Status Scheduler::import(SequenceId id, std::vector<int32_t> tokens, int32_t num_prompt) {
  PD_CHECK(num_prompt > 0 && static_cast<int32_t>(tokens.size()) > num_prompt);
  PD_CHECK_MSG(!seqs_.contains(id), "Scheduler::import: sequence id already in use");
  if (static_cast<int32_t>(running_.size()) + num_landing_ >= options_.max_running) {
    return resource_exhausted("every running seat is taken");
  }
  // First come, first served: what waits (on a decode, sequences preempted for blocks) goes
  // before an import, which would take the blocks it waits for.
  if (!waiting_.empty()) return resource_exhausted("sequences wait for blocks; they go first");
  StatusOr<SequenceAllocation> a =
      kv_.allocate_for(id, std::span<const int32_t>(tokens).first(static_cast<size_t>(num_prompt)),
                       /*use_prefix_cache=*/false);
  if (!a.ok()) return a.status();
  Sequence s;
  s.num_prompt = num_prompt;
  s.num_cached_prompt = 0;
  s.tokens = std::move(tokens);
  s.landing = true;
  seqs_.emplace(id, std::move(s));
  ++num_landing_;
  return ok_status();
}

void Scheduler::activate(SequenceId id, int32_t first_token) {
  Sequence& s = seqs_.at(id);
  PD_CHECK(s.landing);
  if (first_token >= 0) s.tokens.back() = first_token;
  s.landing = false;
  --num_landing_;
  s.num_computed = s.num_prompt;
  kv_.commit_full_blocks(id, std::span<const int32_t>(s.tokens).first(static_cast<size_t>(s.num_prompt)));
  s.running = true;
  running_.push_back(id);
}

void Scheduler::remove(SequenceId id, bool uncache) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return;
  if (it->second.landing) {
    kv_.free(id, uncache);
    --num_landing_;
  } else if (it->second.running) {
    kv_.free(id, uncache);
    running_.erase(std::find(running_.begin(), running_.end(), id));
  } else {
    auto w = std::find(waiting_.begin(), waiting_.end(), id);
    if (w != waiting_.end()) waiting_.erase(w);
  }
  seqs_.erase(it);
}

std::span<const int32_t> Scheduler::tokens(SequenceId id) const { return seqs_.at(id).tokens; }
int32_t Scheduler::num_prompt_tokens(SequenceId id) const { return seqs_.at(id).num_prompt; }
int32_t Scheduler::num_cached_prompt_tokens(SequenceId id) const {
  return std::max(0, seqs_.at(id).num_cached_prompt);
}

}  // namespace pdserve

#include "scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>

namespace pdserve {
namespace {

std::vector<int32_t> prompt_of(int32_t n, int32_t first = 1) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), first);
  return p;
}

// Runs plans as an executor would: completes each step and appends a token to every sequence
// whose chunk asked for logits, finishing sequences after `gen` tokens. Returns steps taken.
struct Driver {
  KvCacheManager kv;
  Scheduler sched;
  std::map<SequenceId, int32_t> to_generate;
  std::map<SequenceId, int32_t> generated;
  std::vector<SequenceId> finished;

  Driver(int32_t blocks, SchedulerOptions o, bool prefix = true)
      : kv(KvCacheConfig{blocks, 4, prefix, nullptr}), sched(kv, o) {}

  void add(SequenceId id, int32_t prompt_len, int32_t gen, int32_t first_token = 1) {
    sched.add(id, prompt_of(prompt_len, first_token));
    to_generate[id] = gen;
  }

  StepPlan step() {
    StepPlan plan = sched.plan();
    sched.complete(plan);
    for (const ScheduledChunk& c : plan.chunks) {
      if (!c.want_logits) continue;
      // A deterministic "sampled" token: position-dependent, like a real model's output.
      sched.append_token(c.seq, 1000 + c.first_position + c.num_tokens);
      if (++generated[c.seq] == to_generate[c.seq]) {
        sched.remove(c.seq);
        finished.push_back(c.seq);
      }
    }
    EXPECT_TRUE(kv.validate().ok());
    return plan;
  }

  int run(int max_steps = 10000) {
    int steps = 0;
    while (!sched.idle() && steps < max_steps) {
      step();
      ++steps;
    }
    return steps;
  }
};

TEST(Scheduler, ChunkedPrefillUnderTheTokenBudgetThenDecode) {
  Driver d(64, {.step_token_budget = 8, .max_running = 4});
  d.add(1, 20, 3);
  StepPlan p = d.step();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].num_tokens, 8);
  EXPECT_FALSE(p.chunks[0].want_logits);
  p = d.step();
  EXPECT_EQ(p.chunks[0].first_position, 8);
  p = d.step();
  EXPECT_EQ(p.chunks[0].num_tokens, 4);
  EXPECT_TRUE(p.chunks[0].want_logits);
  p = d.step();  // decode
  EXPECT_EQ(p.chunks[0].first_position, 20);
  EXPECT_EQ(p.chunks[0].num_tokens, 1);
  d.run();
  EXPECT_EQ(d.finished, std::vector<SequenceId>{1});
  EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
}

TEST(Scheduler, MixedStepsPutDecodesBeforePrefillAndRespectTheCap) {
  Driver d(64, {.step_token_budget = 6, .max_running = 2});
  d.add(1, 3, 5);
  d.add(2, 10, 2);
  d.add(3, 2, 2);  // waits: only two may run
  StepPlan p = d.step();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].seq, 1);
  EXPECT_EQ(p.chunks[1].seq, 2);
  EXPECT_EQ(p.chunks[1].num_tokens, 3);  // the budget's rest
  p = d.step();
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[0].seq, 1);  // decode first
  EXPECT_EQ(p.chunks[0].num_tokens, 1);
  EXPECT_EQ(p.chunks[1].num_tokens, 5);
  EXPECT_EQ(d.sched.num_waiting(), 1);
  d.run();
  EXPECT_EQ(d.finished.size(), 3u);
  EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
}

TEST(Scheduler, FirstComeFirstServedHeadWaitsForBlocks) {
  // 8 blocks of 4 tokens: a 20-token prompt (5 blocks) runs; the next needs 5 and waits even
  // though a small later one would fit.
  Driver d(8, {.step_token_budget = 64, .max_running = 8}, /*prefix=*/false);
  d.add(1, 20, 2);
  d.add(2, 20, 2);
  d.add(3, 2, 2);
  StepPlan p = d.step();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(d.sched.num_waiting(), 2);
  d.run();
  EXPECT_EQ(d.finished, (std::vector<SequenceId>{1, 2, 3}));
}

TEST(Scheduler, PreemptsTheNewestAndRecomputesItWhenBlocksRunOut) {
  // 6 blocks of 4 tokens = 24 slots; two sequences of 8 prompt + 10 generated need 36.
  Driver d(6, {.step_token_budget = 64, .max_running = 4}, /*prefix=*/false);
  d.add(1, 8, 10);
  d.add(2, 8, 10, 500);
  int steps = d.run();
  EXPECT_LT(steps, 200);
  EXPECT_EQ(d.finished.size(), 2u);
  EXPECT_GT(d.sched.num_preemptions(), 0);
  EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
}

TEST(Scheduler, PreemptedSequenceKeepsItsTokensAndRestartsFromThem) {
  Driver d(5, {.step_token_budget = 64, .max_running = 4}, /*prefix=*/false);
  d.add(1, 8, 8);
  d.add(2, 8, 8, 500);
  bool saw = false;
  for (int i = 0; i < 100 && !d.sched.idle(); ++i) {
    StepPlan p = d.step();
    for (SequenceId id : p.preempted) {
      saw = true;
      EXPECT_EQ(id, 2);  // the newest goes
      // Re-admission recomputes everything it had: prompt plus generated.
      EXPECT_GT(d.sched.tokens(id).size(), 8u);
    }
  }
  EXPECT_TRUE(saw);
  EXPECT_EQ(d.finished.size(), 2u);
}

TEST(Scheduler, PrefixCacheHitSkipsTheSharedBlocks) {
  Driver d(64, {.step_token_budget = 64, .max_running = 4});
  d.add(1, 13, 1);
  d.run();
  d.add(2, 13, 1);  // same 13 tokens: 3 full blocks cached, at most (13-1)/4 = 3 reused
  StepPlan p = d.sched.plan();
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].first_position, 12);
  EXPECT_EQ(p.chunks[0].num_tokens, 1);
  EXPECT_EQ(d.sched.num_cached_prompt_tokens(2), 12);
  d.sched.complete(p);
  d.sched.remove(2);
  EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
}

TEST(Scheduler, RemoveFreesWaitingAndRunningSequences) {
  Driver d(64, {.step_token_budget = 4, .max_running = 1});
  d.add(1, 10, 5);
  d.add(2, 10, 5);
  d.step();
  d.sched.remove(1);
  d.sched.remove(2);
  EXPECT_TRUE(d.sched.idle());
  EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
}

TEST(Scheduler, FitsAlone) {
  KvCacheManager kv(KvCacheConfig{10, 4, true, nullptr});
  Scheduler s(kv, {});
  EXPECT_TRUE(s.fits_alone(40));
  EXPECT_FALSE(s.fits_alone(41));
}

// Many random sequences through a small cache: every one finishes with exactly its tokens, no
// block leaks, and the plan never exceeds the budget or the cap.
TEST(Scheduler, RandomWorkloadsAlwaysDrain) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 20; ++trial) {
    int32_t blocks = std::uniform_int_distribution<int32_t>(12, 40)(rng);
    SchedulerOptions o{std::uniform_int_distribution<int32_t>(4, 40)(rng),
                       std::uniform_int_distribution<int32_t>(1, 8)(rng)};
    Driver d(blocks, o, trial % 2 == 0);
    int32_t n = 30;
    for (SequenceId id = 1; id <= n; ++id) {
      int32_t prompt = std::uniform_int_distribution<int32_t>(1, 20)(rng);
      int32_t gen = std::uniform_int_distribution<int32_t>(1, 20)(rng);
      ASSERT_TRUE(d.sched.fits_alone(prompt + gen));
      d.add(id, prompt, gen, static_cast<int32_t>(id % 3) * 100);
    }
    int steps = 0;
    while (!d.sched.idle() && steps < 5000) {
      StepPlan p = d.step();
      EXPECT_LE(p.num_tokens(), o.step_token_budget);
      EXPECT_LE(d.sched.num_running(), o.max_running);
      ++steps;
    }
    EXPECT_TRUE(d.sched.idle()) << "trial " << trial;
    EXPECT_EQ(static_cast<int32_t>(d.finished.size()), n);
    EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
  }
}

TEST(SchedulerImport, LandingSequencesHoldBlocksAndSeatsButDoNotRunUntilActivated) {
  Driver d(/*blocks=*/16, SchedulerOptions{64, /*max_running=*/2});
  std::vector<int32_t> tokens = prompt_of(10);
  tokens.push_back(777);  // the first token, sampled by a prefill elsewhere
  ASSERT_TRUE(d.sched.import(1, tokens, 10).ok());
  EXPECT_EQ(d.sched.num_landing(), 1);
  EXPECT_EQ(d.kv.num_slots(1), 10);  // ceil(10 / 4) = 3 fresh blocks
  EXPECT_EQ(d.kv.stats().num_blocks_used, 3);
  EXPECT_TRUE(d.sched.plan().empty()) << "a landing sequence must not run";
  // The seat counts: with one landing and one running, a third cannot import.
  d.add(2, 4, 5);
  d.step();
  ASSERT_EQ(d.sched.num_running(), 1);
  std::vector<int32_t> other = prompt_of(4, 50);
  other.push_back(5);
  EXPECT_EQ(d.sched.import(3, other, 4).code(), StatusCode::kResourceExhausted);

  d.sched.remove(2);
  d.sched.activate(1);
  EXPECT_EQ(d.sched.num_landing(), 0);
  StepPlan plan = d.sched.plan();
  ASSERT_EQ(plan.chunks.size(), 1u);
  EXPECT_EQ(plan.chunks[0].seq, 1);
  EXPECT_EQ(plan.chunks[0].first_position, 10);  // decodes the first token at once
  EXPECT_EQ(plan.chunks[0].num_tokens, 1);
  EXPECT_TRUE(plan.chunks[0].want_logits);
  d.sched.complete(plan);
  d.sched.remove(1);
  EXPECT_TRUE(d.kv.validate().ok());
}

TEST(SchedulerImport, WaitingSequencesGoBeforeImports) {
  Driver d(/*blocks=*/16, SchedulerOptions{64, 8});
  d.add(1, 4, 5);  // waits until a plan admits it
  std::vector<int32_t> tokens = prompt_of(4, 50);
  tokens.push_back(5);
  EXPECT_EQ(d.sched.import(2, tokens, 4).code(), StatusCode::kResourceExhausted);
  d.step();  // admitted: nothing waits now
  ASSERT_EQ(d.sched.num_waiting(), 0);
  EXPECT_TRUE(d.sched.import(2, tokens, 4).ok());
  d.sched.remove(2);
  d.sched.remove(1);
  EXPECT_TRUE(d.kv.validate().ok());
}

TEST(SchedulerImport, RemovingALandingSequenceFreesItsBlocks) {
  Driver d(/*blocks=*/4, SchedulerOptions{64, 8});
  std::vector<int32_t> tokens = prompt_of(13);
  tokens.push_back(9);
  ASSERT_TRUE(d.sched.import(1, tokens, 13).ok());
  EXPECT_EQ(d.kv.stats().num_blocks_used, 4);
  std::vector<int32_t> more = prompt_of(2, 100);
  more.push_back(9);
  EXPECT_EQ(d.sched.import(2, more, 2).code(), StatusCode::kResourceExhausted) << "no block left";
  d.sched.remove(1);
  EXPECT_EQ(d.sched.num_landing(), 0);
  EXPECT_EQ(d.kv.stats().num_blocks_used, 0);
  EXPECT_TRUE(d.sched.import(2, more, 2).ok());
  EXPECT_TRUE(d.kv.validate().ok());
}

}  // namespace
}  // namespace pdserve

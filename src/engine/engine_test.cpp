#include "engine/engine.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <future>
#include <limits>
#include <mutex>
#include <thread>

#include "common/check.h"
#include "engine/test_model.h"
#include "kernels/gumbel.h"
#include "kernels/truncation.h"

namespace pdserve {
namespace {

using testing::Collector;
using testing::Result;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const testing::TestModel* m = testing::default_test_model();
    ASSERT_NE(m, nullptr);
    model_ = m->model.get();
    tokenizer_ = m->tokenizer.get();
    pool_ = m->pool.get();
  }

  static EngineOptions options(int32_t blocks = 256) {
    EngineOptions o;
    o.num_blocks = blocks;
    o.block_size = 16;
    o.step_token_budget = 256;
    o.max_running = 64;
    return o;
  }

  // An in-process KV send pool of `capacity` bytes for a prefill engine.
  static KvTransport send_pool(uint64_t capacity = uint64_t{16} << 20) {
    KvTransportOptions to;
    to.pool_capacity_bytes = capacity;
    to.prefault_pool = false;
    StatusOr<KvTransport> t = make_transport(TransportKind::kInproc, to);
    PD_CHECK_MSG(t.ok(), t.status().message().c_str());
    return std::move(t).value();
  }
  static EngineOptions prefill_options(KvSendPool& pool, int32_t slots) {
    EngineOptions o = options();
    o.role = EngineRole::kPrefill;
    o.prefill_slots = slots;
    o.kv_send = &pool;
    return o;
  }

  EngineRequest request(const std::string& prompt, int32_t max_tokens) {
    EngineRequest r;
    r.prompt = tokenizer_->encode(prompt, true, false);
    r.max_tokens = max_tokens;
    return r;
  }

  static Result run_one(Engine& e, EngineRequest r) {
    Collector c;
    auto h = e.submit(std::move(r), c.sink());
    EXPECT_TRUE(h.ok()) << h.status().to_string();
    return c.wait();
  }

  static std::vector<Result> run_all(Engine& e, std::vector<EngineRequest> reqs) {
    std::vector<std::unique_ptr<Collector>> cs;
    for (auto& r : reqs) {
      cs.push_back(std::make_unique<Collector>());
      auto h = e.submit(std::move(r), cs.back()->sink());
      EXPECT_TRUE(h.ok()) << h.status().to_string();
    }
    std::vector<Result> out;
    for (auto& c : cs) out.push_back(c->wait());
    return out;
  }

  static LlamaModel* model_;
  static Tokenizer* tokenizer_;
  static ThreadPool* pool_;
};
LlamaModel* EngineTest::model_ = nullptr;
Tokenizer* EngineTest::tokenizer_ = nullptr;
ThreadPool* EngineTest::pool_ = nullptr;

const char* const kPrompts[] = {
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about autumn leaves:",
    "List three uses of a paperclip:",
    "The quick brown fox",
};

TEST_F(EngineTest, ConcurrentGreedyRequestsMatchRunningAlone) {
  Engine e(*model_, *tokenizer_, *pool_, options());
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 16; ++i) reqs.push_back(request(kPrompts[i % 8], 12 + i % 5));
  std::vector<Result> alone;
  for (const auto& r : reqs) alone.push_back(run_one(e, r));
  std::vector<Result> together = run_all(e, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].text, alone[i].text) << "request " << i;
    EXPECT_EQ(together[i].finish_reason, alone[i].finish_reason);
    EXPECT_EQ(together[i].completion_tokens, static_cast<int32_t>(together[i].tokens.size()));
  }
  EngineMetrics m = e.metrics();
  EXPECT_EQ(m.kv.num_blocks_used, 0);
  EXPECT_EQ(m.running, 0);
  EXPECT_EQ(m.finished_by_reason["length"] + m.finished_by_reason["stop"], 32);
}

// A backend that picks greedy tokens where its logits are (as a GPU does): here the CPU engine
// with its own argmax over the logits, counting which path each step took. It checks the
// engine's routing between the two paths, not a GPU's argmax (cuda_kernels_test does that).
// With `nan_from_position` set, every logits row at that position or later is NaN (as an overflow
// leaves it), and its draw -1 as the GPU's mark_unusable_draws makes it; `on_device` false leaves
// every draw to the host sampler (and the model is then no fp16 one).
class ArgmaxExecutor final : public ModelExecutor {
 public:
  ArgmaxExecutor(LlamaModel& model, ThreadPool& pool, int32_t blocks, int32_t block_size,
                 int32_t nan_from_position = std::numeric_limits<int32_t>::max(), bool on_device = true)
      : cpu_(model, pool, blocks, block_size), nan_from_(nan_from_position), on_device_(on_device) {}
  const ModelConfig& config() const override { return cpu_.config(); }
  uint64_t fingerprint() const override { return cpu_.fingerprint(); }
  Status forward(const ForwardBatch& batch, float* logits) override {
    // Counted where logits come to the host (a pass of prompt chunks without any has none).
    if (std::any_of(batch.chunks.begin(), batch.chunks.end(),
                    [](const SequenceChunk& c) { return c.want_logits; }))
      ++logits_steps;
    PD_RETURN_IF_ERROR(cpu_.forward(batch, logits));
    poison(batch, logits);
    return ok_status();
  }
  Status forward_draw(const ForwardBatch& batch, std::span<const RowDraw> draws, int32_t* next_tokens,
                      const HostLogitRows& host) override {
    ++argmax_steps;
    if (!host.rows.empty()) ++mixed_steps;
    const size_t rows = draws.size();
    const size_t vocab = static_cast<size_t>(cpu_.config().vocab_size);
    std::vector<float> logits(rows * vocab);
    PD_RETURN_IF_ERROR(cpu_.forward(batch, logits.data()));
    poison(batch, logits.data());
    for (size_t j = 0; j < host.rows.size(); ++j)
      std::copy_n(logits.data() + static_cast<size_t>(host.rows[j]) * vocab, vocab, host.logits + j * vocab);
    for (size_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * vocab;
      const RowDraw& d = draws[r];
      if (d.temperature > 0.0f && (d.top_k > 0 || d.top_p < 1.0f || d.min_p > 0.0f)) {
        // What the GPU's truncated kernel does: kernels/truncation.h's definition.
        next_tokens[r] = truncated_draw_reference(std::vector<float>(row, row + vocab), d.temperature,
                                                  d.top_k, d.top_p, d.min_p, d.seed, d.counter);
      } else {
        if (draws[r].temperature > 0.0f) {  // what the GPU kernel does: perturb, then argmax
          const float inv_t = 1.0f / draws[r].temperature;
          for (size_t i = 0; i < vocab; ++i)
            row[i] = gumbel_key(row[i], inv_t, draws[r].seed, draws[r].counter, static_cast<uint32_t>(i));
        }
        next_tokens[r] = 0;  // the first largest, NaN never (as the GPU's argmax)
        float best = -INFINITY;
        for (size_t i = 0; i < vocab; ++i) {
          if (row[i] > best) {
            best = row[i];
            next_tokens[r] = static_cast<int32_t>(i);
          }
        }
      }
      if (!(row[static_cast<size_t>(next_tokens[r])] > -INFINITY)) next_tokens[r] = -1;
    }
    return ok_status();
  }
  bool draws_on_device() const override { return on_device_; }
  // As a GPU model in fp16 where it draws, so that the error's fix for fp16 shows.
  std::string_view number_format() const override { return on_device_ ? "fp16" : ""; }
  KvStorage* host_kv() override { return cpu_.host_kv(); }
  size_t kv_bytes() const override { return cpu_.kv_bytes(); }
  std::string device() const override { return "argmax test backend"; }

  std::atomic<int> logits_steps{0};
  std::atomic<int> argmax_steps{0};
  std::atomic<int> mixed_steps{0};  // forward_draw with rows for the host

 private:
  void poison(const ForwardBatch& batch, float* logits) const {
    const size_t vocab = static_cast<size_t>(cpu_.config().vocab_size);
    size_t row = 0;
    for (const SequenceChunk& c : batch.chunks) {
      if (!c.want_logits) continue;
      if (c.first_position + c.num_tokens - 1 >= nan_from_)
        std::fill_n(logits + row * vocab, vocab, std::numeric_limits<float>::quiet_NaN());
      ++row;
    }
  }

  CpuExecutor cpu_;
  const int32_t nan_from_;
  const bool on_device_;
};

TEST_F(EngineTest, TokensDrawnOnTheBackendEqualTheSamplers) {
  const EngineOptions o = options();
  auto exec = std::make_unique<ArgmaxExecutor>(*model_, *pool_, o.num_blocks, o.block_size);
  ArgmaxExecutor* x = exec.get();
  Engine on_device(std::move(exec), *tokenizer_, o);
  Engine on_host(*model_, *tokenizer_, *pool_, o);
  for (int i = 0; i < 4; ++i) {
    const Result a = run_one(on_device, request(kPrompts[i], 16));
    EXPECT_EQ(a.tokens, run_one(on_host, request(kPrompts[i], 16)).tokens) << kPrompts[i];
  }
  EXPECT_GT(x->argmax_steps.load(), 0);
  EXPECT_EQ(x->logits_steps.load(), 0);
  // Plain tempered draws too: the same tokens as the host sampler's (same seed, same counters).
  const int before_tempered = x->argmax_steps.load();
  for (int i = 0; i < 3; ++i) {
    EngineRequest t = request(kPrompts[i], 12);
    t.sampling.temperature = 0.9f;
    t.sampling.seed = 42 + i;
    EXPECT_EQ(run_one(on_device, t).tokens, run_one(on_host, t).tokens) << kPrompts[i];
  }
  EXPECT_GT(x->argmax_steps.load(), before_tempered);
  EXPECT_EQ(x->logits_steps.load(), 0);
  // Truncated draws (top-k, top-p, min-p) too.
  const int before_truncated = x->argmax_steps.load();
  for (int i = 0; i < 3; ++i) {
    EngineRequest t = request(kPrompts[i], 12);
    t.sampling.temperature = 0.9f;
    t.sampling.top_k = 40;
    t.sampling.top_p = 0.8f;
    t.sampling.min_p = 0.02f;
    t.sampling.seed = 7 + i;
    EXPECT_EQ(run_one(on_device, t).tokens, run_one(on_host, t).tokens) << kPrompts[i];
  }
  EXPECT_GT(x->argmax_steps.load(), before_truncated);
  EXPECT_EQ(x->logits_steps.load(), 0);
  // Log-probabilities and penalties need the logits on the host: alone, the plain forward pass.
  EngineRequest with_logprobs = request(kPrompts[0], 4);
  with_logprobs.logprobs = true;
  Result r = run_one(on_device, with_logprobs);
  EXPECT_EQ(r.finish_reason, "length");
  const int after_logprobs = x->logits_steps.load();
  EXPECT_GT(after_logprobs, 0);
  EngineRequest penalised = request(kPrompts[1], 4);
  penalised.sampling.repetition_penalty = 1.3f;
  run_one(on_device, penalised);
  EXPECT_GT(x->logits_steps.load(), after_logprobs);

  // Batched with rows drawn on the backend, only those rows' logits come to the host: the others
  // keep their draws there, and every request gets the tokens (and log-probabilities) it gets alone.
  // (The host's rows end first, so that no step has only rows for the host, which would take the
  // plain forward pass.)
  std::vector<EngineRequest> mixed;
  for (int i = 0; i < 6; ++i) {
    EngineRequest m = request(kPrompts[i % 4], i == 1 || i == 3 ? 6 : 10);
    m.ignore_eos = true;
    if (i == 1) m.logprobs = true;
    if (i == 3) m.sampling.repetition_penalty = 1.3f;
    if (i == 4) {
      m.sampling.temperature = 0.8f;
      m.sampling.seed = 99;
    }
    mixed.push_back(std::move(m));
  }
  const int logits_before = x->logits_steps.load();
  std::vector<Result> on_device_results = run_all(on_device, mixed);
  std::vector<Result> on_host_results = run_all(on_host, mixed);
  for (size_t i = 0; i < mixed.size(); ++i) {
    EXPECT_EQ(on_device_results[i].tokens, on_host_results[i].tokens) << "request " << i;
    EXPECT_EQ(on_device_results[i].logprobs, on_host_results[i].logprobs) << "request " << i;
  }
  EXPECT_GT(x->mixed_steps.load(), 0);
  EXPECT_EQ(x->logits_steps.load(), logits_before);  // no step copied every row
}

// Logits with no usable value (NaN, as an fp16 overflow leaves them) fail their request with the
// reason, whether the backend drew the token (and said -1) or the host sampler did; a request
// batched beside it is untouched.
TEST_F(EngineTest, LogitsWithoutAUsableValueFailTheirRequestAlone) {
  const EngineOptions o = options();
  Engine plain(*model_, *tokenizer_, *pool_, o);
  EngineRequest longer = request(kPrompts[1], 40);
  longer.ignore_eos = true;
  EngineRequest shorter = request(kPrompts[0], 6);
  shorter.ignore_eos = true;
  const Result want_long = run_one(plain, longer);
  const Result want_short = run_one(plain, shorter);
  EXPECT_GT(plain.metrics().kv.num_blocks_cached, 0);  // a request that ends well leaves its blocks
  // The longer one's logits turn NaN 8 tokens into its answer; the shorter one never gets there.
  const int32_t nan_from = static_cast<int32_t>(longer.prompt.size()) + 7;
  ASSERT_LT(static_cast<int32_t>(shorter.prompt.size()) + 6, nan_from);
  for (const bool on_device : {true, false}) {
    for (const float temperature : {0.0f, 0.9f}) {
      SCOPED_TRACE(::testing::Message() << (on_device ? "drawn on the backend" : "drawn on the host")
                                        << ", temperature " << temperature);
      auto exec =
          std::make_unique<ArgmaxExecutor>(*model_, *pool_, o.num_blocks, o.block_size, nan_from, on_device);
      ArgmaxExecutor* x = exec.get();
      Engine e(std::move(exec), *tokenizer_, o);
      EngineRequest a = longer, b = shorter;
      a.sampling.temperature = temperature;
      a.sampling.seed = 5;
      std::vector<Result> got = run_all(e, {a, b});
      EXPECT_EQ(got[0].finish_reason, "error");
      EXPECT_EQ(got[0].error.code(), StatusCode::kInternal);
      EXPECT_THAT(got[0].error.message(),
                  ::testing::HasSubstr("no usable logits (NaN or -inf) after 8 generated"));
      EXPECT_EQ(got[0].error.message().find("--dtype bf16") != std::string::npos, on_device);
      ASSERT_EQ(got[0].tokens.size(), 8u);
      if (temperature == 0.0f) {
        EXPECT_EQ(got[0].tokens,
                  std::vector<int32_t>(want_long.tokens.begin(), want_long.tokens.begin() + 8));
      }
      EXPECT_EQ(got[1].finish_reason, "length");
      EXPECT_EQ(got[1].tokens, want_short.tokens);
      const EngineMetrics m = e.metrics();
      EXPECT_EQ(m.nonfinite_logits_total, 1);
      // Its full block (prompt and 8 tokens) left the prefix cache; the shorter one has none.
      EXPECT_EQ(m.kv.num_blocks_cached, 0);
      EXPECT_EQ(m.kv.num_blocks_used, 0);
      EXPECT_EQ(m.running, 0);
      // The backend drew every token itself, or never did.
      EXPECT_EQ(x->logits_steps.load() == 0, on_device);
    }
  }
}

TEST_F(EngineTest, PreemptionUnderASmallCacheKeepsOutputsExact) {
  std::vector<EngineRequest> reqs;
  for (int i = 0; i < 6; ++i) reqs.push_back(request(kPrompts[i], 40));
  Engine big(*model_, *tokenizer_, *pool_, options());
  std::vector<Result> ref;
  for (const auto& r : reqs) ref.push_back(run_one(big, r));
  // 10 blocks of 16 = 160 slots for six sequences of ~50 tokens each.
  Engine small(*model_, *tokenizer_, *pool_, options(10));
  std::vector<Result> got = run_all(small, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(got[i].tokens, ref[i].tokens) << "request " << i;
  EngineMetrics m = small.metrics();
  EXPECT_GT(m.preemptions_total, 0);
  EXPECT_EQ(m.kv.num_blocks_used, 0);
}

TEST_F(EngineTest, SharedSystemPromptHitsThePrefixCache) {
  std::string system;
  for (int i = 0; i < 40; ++i) system += "You are a careful assistant. ";
  EngineRequest a = request(system + "Question: what is two plus two?", 8);
  EngineRequest b = request(system + "Question: name a large ocean.", 8);
  ASSERT_GE(a.prompt.size(), 200u);
  Engine cold(*model_, *tokenizer_, *pool_, options());
  Result b_cold = run_one(cold, b);
  EXPECT_EQ(b_cold.cached_prompt_tokens, 0);

  Engine e(*model_, *tokenizer_, *pool_, options());
  Result ra = run_one(e, a);
  Result rb = run_one(e, b);
  EXPECT_EQ(ra.cached_prompt_tokens, 0);
  // The shared prefix's full blocks are reused.
  EXPECT_GE(rb.cached_prompt_tokens, 192);
  EXPECT_EQ(rb.tokens, b_cold.tokens);
  EngineMetrics m = e.metrics();
  EXPECT_GE(m.kv.prefix_hit_tokens_total, 192);
}

TEST_F(EngineTest, CancelFreesTheSequence) {
  Engine e(*model_, *tokenizer_, *pool_, options());
  EngineRequest r = request("Write a very long story about a dragon.", 400);
  r.ignore_eos = true;
  std::promise<void> first;
  std::atomic<bool> got_first{false};
  Collector c;
  OutputSink inner = c.sink();
  auto h = e.submit(std::move(r), [&](EngineOutput&& o) {
    if (!got_first.exchange(true)) first.set_value();
    inner(std::move(o));
  });
  ASSERT_TRUE(h.ok());
  first.get_future().wait();
  (*h)->cancel();
  Result res = c.wait();
  EXPECT_EQ(res.finish_reason, "cancelled");
  EXPECT_LT(res.completion_tokens, 400);
  EXPECT_EQ(e.metrics().kv.num_blocks_used, 0);
}

TEST_F(EngineTest, StopStringsAndSeededSamplingAreReproducible) {
  Engine e(*model_, *tokenizer_, *pool_, options());
  EngineRequest r = request("Count: 1, 2, 3, 4,", 30);
  r.stop = {" 7"};
  Result s = run_one(e, r);
  EXPECT_EQ(s.finish_reason, "stop");
  EXPECT_EQ(s.text.find(" 7"), std::string::npos) << s.text;

  EngineRequest t = request("Once upon a time", 24);
  t.sampling.temperature = 0.9f;
  t.sampling.seed = 1234;
  Result x = run_one(e, t);
  // The same request in a busy batch samples the same tokens.
  std::vector<EngineRequest> busy;
  for (int i = 0; i < 5; ++i) busy.push_back(request(kPrompts[i], 20));
  busy.push_back(t);
  std::vector<Result> ys = run_all(e, busy);
  EXPECT_EQ(ys.back().tokens, x.tokens);
}

TEST_F(EngineTest, RejectsWhatCanNeverRunAndAFullQueue) {
  EngineOptions o = options(4);  // 64 tokens of KV
  o.max_waiting = 2;
  Engine e(*model_, *tokenizer_, *pool_, o);
  EngineRequest big = request("Hello", 100);
  auto h = e.submit(big, [](EngineOutput&&) {});
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(h.status().message().find("KV cache"), std::string::npos) << h.status().message();

  EngineRequest too_long = request("Hello", 10);
  too_long.prompt.assign(static_cast<size_t>(model_->config().context_length), 1);
  EXPECT_NE(e.validate(too_long).message().find("context"), std::string::npos);

  EngineRequest empty;
  EXPECT_EQ(e.validate(empty).code(), StatusCode::kInvalidArgument);
}

// A layer-wise prefill: an early handoff (no tokens, first token -1) before the first token, then
// the usual final handoff naming the same buffer; and a release that comes while the buffer is
// still being written (a decode that gave up) ends the request "cancelled", freeing everything.
TEST_F(EngineTest, LayerWisePrefillHandsOffEarlyAndHonoursAReleaseWhileWriting) {
  KvTransport t = send_pool();
  EngineOptions o = prefill_options(*t.pool, 2);
  o.layer_wise_kv = true;
  Engine e(*model_, *tokenizer_, *pool_, o);
  for (bool release_early : {false, true}) {
    SCOPED_TRACE(release_early ? "released while writing" : "plain");
    std::vector<EngineOutput> outs;
    std::promise<void> done;
    auto sink = [&](EngineOutput&& out) {
      if (out.handoff && !out.finished && release_early) {
        EXPECT_TRUE(e.release_handoff(out.handoff->kv.ref()).ok());
      }
      const bool last = out.finished;
      outs.push_back(std::move(out));
      if (last) done.set_value();
    };
    ASSERT_TRUE(e.submit(request("The capital of France is", 8), sink).ok());
    done.get_future().wait();
    ASSERT_EQ(outs.size(), 3u);
    ASSERT_TRUE(outs[0].handoff.has_value());
    EXPECT_FALSE(outs[0].finished);
    EXPECT_TRUE(outs[0].tokens.empty());
    EXPECT_EQ(outs[0].handoff->first_token, -1);
    ASSERT_EQ(outs[1].tokens.size(), 1u);  // the first token, streamed at once
    EXPECT_TRUE(outs[2].finished);
    if (release_early) {
      EXPECT_EQ(outs[2].finish_reason, "cancelled");
      EXPECT_FALSE(outs[2].handoff.has_value());
    } else {
      EXPECT_EQ(outs[2].finish_reason, "handoff");
      ASSERT_TRUE(outs[2].handoff.has_value());
      EXPECT_EQ(outs[2].handoff->kv, outs[0].handoff->kv);
      EXPECT_EQ(outs[2].handoff->first_token, outs[1].tokens[0].id);
      EXPECT_EQ(e.metrics().prefill_slots_in_use, 1);
      // A second release of the same buffer is refused; the first frees the slot.
      EXPECT_TRUE(e.release_handoff(outs[2].handoff->kv.ref()).ok());
      EXPECT_EQ(e.release_handoff(outs[2].handoff->kv.ref()).code(), StatusCode::kNotFound);
    }
    EngineMetrics m = e.metrics();
    EXPECT_EQ(m.prefill_slots_in_use, 0);
    EXPECT_EQ(m.handoffs_outstanding, 0);
    // A given-up buffer is released just after the request's last output.
    for (int i = 0; i < 200 && t.pool->stats().buffers_in_use > 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    EXPECT_EQ(t.pool->stats().buffers_in_use, 0);
  }
  EngineMetrics m = e.metrics();
  EXPECT_EQ(m.handoffs_total, 1);
  EXPECT_EQ(m.layer_wise_handoffs_total, 1);
}

// The send buffer of a prefill's request is taken when the request is accepted: a prompt the
// pool has no room for is refused at submit() (the router then tries another prefill), not
// failed after its first token went out; the refusal gives the slot back without announcing
// capacity, and a request that ends at its first token gives its buffer back.
TEST_F(EngineTest, PrefillRefusesAPromptItsSendPoolHasNoRoomFor) {
  const uint64_t token_bytes = static_cast<uint64_t>(model_->config().kv_bytes_per_token(2));  // f16 K and V
  EngineRequest first = request("Once upon a time, in a small village,", 4);
  const uint64_t one_message = kKvWireHeaderBytes + token_bytes * first.prompt.size();
  KvTransport t = send_pool(kv_send_buffer_bytes(one_message));  // room for the first prompt only
  std::atomic<int> capacity_calls{0};
  EngineOptions o = prefill_options(*t.pool, 2);
  o.on_capacity = [&] { ++capacity_calls; };
  Engine e(*model_, *tokenizer_, *pool_, o);

  struct Handoff {
    std::promise<EngineOutput> last;
    OutputSink sink() {
      return [this](EngineOutput&& out) {
        if (out.finished) last.set_value(std::move(out));
      };
    }
  };
  Handoff a;
  ASSERT_TRUE(e.submit(std::move(first), a.sink()).ok());
  // Taken at acceptance, before the prefill pass.
  EXPECT_EQ(t.pool->stats().buffers_in_use, 1);
  EngineOutput a_last = a.last.get_future().get();
  ASSERT_EQ(a_last.finish_reason, "handoff") << a_last.error.to_string();
  ASSERT_TRUE(a_last.handoff.has_value());

  // A second prompt while the first's KV waits for its decode: a free slot, but no room.
  const int calls_before = capacity_calls.load();
  Handoff b;
  auto refused = e.submit(request("The capital of France is", 4), b.sink());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("no room for this prompt's KV"), std::string::npos)
      << refused.status().to_string();
  EXPECT_EQ(refused.status().reason(), kSendPoolNoRoom);  // for room, not for a slot: shorter may fit
  EXPECT_EQ(e.metrics().prefill_slots_in_use, 1);
  EXPECT_EQ(capacity_calls.load(), calls_before);  // a refusal frees nothing a router could use
  EXPECT_EQ(t.pool->stats().buffers_in_use, 1);

  // Once the decode has the first KV, the second is accepted and handed off.
  ASSERT_TRUE(e.release_handoff(a_last.handoff->kv.ref()).ok());
  ASSERT_TRUE(e.submit(request("The capital of France is", 4), b.sink()).ok());
  EngineOutput b_last = b.last.get_future().get();
  ASSERT_EQ(b_last.finish_reason, "handoff") << b_last.error.to_string();
  ASSERT_TRUE(e.release_handoff(b_last.handoff->kv.ref()).ok());

  // A request that ends at its first token gives its buffer back with its slot.
  Handoff c;
  ASSERT_TRUE(e.submit(request("The capital of France is", 1), c.sink()).ok());
  EXPECT_EQ(c.last.get_future().get().finish_reason, "length");
  EXPECT_EQ(e.metrics().prefill_slots_in_use, 0);
  EXPECT_EQ(t.pool->stats().buffers_in_use, 0);
}

// The baseline admission: a prefill whose slot is held keeps queue_if_full requests in its own
// FIFO and starts each as a slot frees; a request that does not ask is still refused, a full queue
// refuses, a request cancelled while it waits never runs (it leaves when another joins), the
// queue shows in the waiting count, and shutdown ends what still waits.
TEST_F(EngineTest, PrefillQueuesBaselineRequestsFirstComeFirstServed) {
  KvTransport t = send_pool();
  EngineOptions o = prefill_options(*t.pool, 1);
  o.max_waiting = 3;
  Engine e(*model_, *tokenizer_, *pool_, o);
  struct Waiter {
    std::promise<EngineOutput> last;
    std::atomic<int> outputs{0};
    OutputSink sink() {
      return [this](EngineOutput&& out) {
        ++outputs;
        if (out.finished) last.set_value(std::move(out));
      };
    }
  };
  auto queued = [&](const char* prompt) {
    EngineRequest r = request(prompt, 2);
    r.queue_if_full = true;
    return r;
  };

  Waiter first;
  ASSERT_TRUE(e.submit(queued(kPrompts[0]), first.sink()).ok());  // a free slot: it runs at once
  EngineOutput f = first.last.get_future().get();
  ASSERT_EQ(f.finish_reason, "handoff") << f.error.to_string();  // the slot stays held until released

  Waiter a, b, c;
  ASSERT_TRUE(e.submit(queued(kPrompts[1]), a.sink()).ok());
  auto b_handle = e.submit(queued(kPrompts[2]), b.sink());
  ASSERT_TRUE(b_handle.ok());
  ASSERT_TRUE(e.submit(queued(kPrompts[3]), c.sink()).ok());
  auto over = e.submit(queued(kPrompts[4]), [](EngineOutput&&) {});
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(over.status().message().find("already wait in this prefill's queue"), std::string::npos)
      << over.status().to_string();
  auto plain = e.submit(request(kPrompts[4], 2), [](EngineOutput&&) {});
  ASSERT_FALSE(plain.ok());
  EXPECT_EQ(plain.status().code(), StatusCode::kResourceExhausted);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(a.outputs.load(), 0);  // nothing starts while the slot is held
  EXPECT_EQ(e.metrics().prefill_slots_in_use, 1);
  EXPECT_EQ(e.metrics().waiting, 3);
  // b is cancelled while it waits: it leaves the queue when the next request joins, not running.
  (*b_handle)->cancel();
  Waiter d;
  ASSERT_TRUE(e.submit(queued(kPrompts[5]), d.sink()).ok());
  EngineOutput b_last = b.last.get_future().get();
  EXPECT_EQ(b_last.finish_reason, "cancelled");
  EXPECT_EQ(b.outputs.load(), 1);
  EXPECT_EQ(e.metrics().waiting, 3);                          // a, c, d
  EXPECT_EQ(e.metrics().finished_by_reason["cancelled"], 1);  // counted though it never ran

  // Each freed slot goes to the head: a, then c, then d.
  ASSERT_TRUE(e.release_handoff(f.handoff->kv.ref()).ok());
  EngineOutput a_last = a.last.get_future().get();
  ASSERT_EQ(a_last.finish_reason, "handoff") << a_last.error.to_string();
  auto c_future = c.last.get_future();
  EXPECT_EQ(c_future.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout);
  ASSERT_TRUE(e.release_handoff(a_last.handoff->kv.ref()).ok());
  EngineOutput c_last = c_future.get();
  ASSERT_EQ(c_last.finish_reason, "handoff") << c_last.error.to_string();
  EXPECT_EQ(d.outputs.load(), 0);
  ASSERT_TRUE(e.release_handoff(c_last.handoff->kv.ref()).ok());
  EngineOutput d_last = d.last.get_future().get();
  ASSERT_EQ(d_last.finish_reason, "handoff") << d_last.error.to_string();
  ASSERT_TRUE(e.release_handoff(d_last.handoff->kv.ref()).ok());
  for (int i = 0; i < 200 && e.metrics().prefill_slots_in_use > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(e.metrics().prefill_slots_in_use, 0);
  EXPECT_EQ(e.metrics().waiting, 0);
  EXPECT_EQ(t.pool->stats().buffers_in_use, 0);

  // Shutdown ends a request that still waits, as a failure a router may retry elsewhere.
  Waiter held, waiting;
  ASSERT_TRUE(e.submit(queued(kPrompts[6]), held.sink()).ok());
  ASSERT_EQ(held.last.get_future().get().finish_reason, "handoff");
  ASSERT_TRUE(e.submit(queued(kPrompts[7]), waiting.sink()).ok());
  e.shutdown();
  EngineOutput w_last = waiting.last.get_future().get();
  EXPECT_EQ(w_last.finish_reason, "error");
  EXPECT_EQ(w_last.error.code(), StatusCode::kUnavailable);
  EXPECT_NE(w_last.error.message().find("shutting down"), std::string::npos) << w_last.error.to_string();
  EngineMetrics m = e.metrics();
  EXPECT_EQ(m.finished_by_reason["error"], 1);
  EXPECT_EQ(m.finished_by_reason["cancelled"], 1);
  EXPECT_EQ(m.finished_by_reason["handoff"], 5);  // f, a, c, d, held
}

// A queued baseline request whose turn comes while the send pool has no room for its KV — a
// layer-wise request cancelled during its pass gives its slot back before the buffer it gave up —
// waits at the head of the queue and starts once that buffer is released, instead of failing.
TEST_F(EngineTest, QueuedRequestWaitsForTheBufferAGivenUpLayerWiseSendStillHolds) {
  const char* prompt = "Once upon a time, in a small village,";
  EngineRequest first = request(prompt, 4);
  const uint64_t token_bytes = static_cast<uint64_t>(model_->config().kv_bytes_per_token(2));
  const uint64_t one_message = kKvWireHeaderBytes + token_bytes * first.prompt.size();
  KvTransport t = send_pool(kv_send_buffer_bytes(one_message));  // room for one such prompt
  EngineOptions o = prefill_options(*t.pool, 1);
  o.layer_wise_kv = true;
  Engine e(*model_, *tokenizer_, *pool_, o);

  // The engine thread waits in the first request's sink at its early handoff, so that the second
  // request finds the slot held and joins the queue.
  std::promise<void> early_seen, go;
  std::shared_future<void> go_future = go.get_future().share();
  std::promise<EngineOutput> first_last;
  bool early = false;
  auto first_sink = [&](EngineOutput&& out) {
    if (out.handoff && !out.finished && !early) {
      early = true;
      early_seen.set_value();
      go_future.wait();
    }
    if (out.finished) first_last.set_value(std::move(out));
  };
  auto first_handle = e.submit(std::move(first), first_sink);
  ASSERT_TRUE(first_handle.ok());
  ASSERT_EQ(early_seen.get_future().wait_for(std::chrono::seconds(30)), std::future_status::ready)
      << "no early handoff";
  EngineRequest second = request(prompt, 2);
  second.queue_if_full = true;
  std::promise<EngineOutput> second_last;
  auto second_sink = [&](EngineOutput&& out) {
    if (out.finished) second_last.set_value(std::move(out));
  };
  ASSERT_TRUE(e.submit(std::move(second), second_sink).ok());
  EXPECT_EQ(e.metrics().waiting, 1);
  (*first_handle)->cancel();  // its early buffer is given up when it ends
  go.set_value();

  EXPECT_EQ(first_last.get_future().get().finish_reason, "cancelled");
  auto second_future = second_last.get_future();
  ASSERT_EQ(second_future.wait_for(std::chrono::seconds(30)), std::future_status::ready)
      << "the queued request never started";
  EngineOutput b = second_future.get();
  ASSERT_EQ(b.finish_reason, "handoff") << b.error.to_string();
  ASSERT_TRUE(e.release_handoff(b.handoff->kv.ref()).ok());
  for (int i = 0; i < 200 && t.pool->stats().buffers_in_use > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EngineMetrics m = e.metrics();
  EXPECT_EQ(m.prefill_slots_in_use, 0);
  EXPECT_EQ(m.waiting, 0);
  EXPECT_EQ(t.pool->stats().buffers_in_use, 0);
  EXPECT_EQ(m.layer_wise_handoffs_total, 1);
}

// Deadline priority: a prefill that refused a request with a deadline keeps its next free slot
// for it (or anyone due sooner, or its gateway queue) for deadline_priority_ms; the request
// itself, retried, takes it and ends the priority; it lapses when that request stops asking.
TEST_F(EngineTest, PrefillKeepsAFreeSlotForTheMostUrgentRequestItRefused) {
  KvTransport t = send_pool();
  using Clock = std::chrono::steady_clock;
  std::atomic<int64_t> now_ms{1'000'000};
  EngineOptions o = prefill_options(*t.pool, 1);
  o.deadline_priority_ms = 15;
  o.clock = [&] { return Clock::time_point(std::chrono::milliseconds(now_ms.load())); };
  Engine e(*model_, *tokenizer_, *pool_, o);

  // Runs a request through the prefill and frees its slot (as a decode would).
  auto run_to_handoff = [&](EngineRequest r) {
    std::promise<EngineOutput> last;
    auto h = e.submit(std::move(r), [&](EngineOutput&& out) {
      if (out.finished) last.set_value(std::move(out));
    });
    ASSERT_TRUE(h.ok()) << h.status().to_string();
    EngineOutput out = last.get_future().get();
    ASSERT_EQ(out.finish_reason, "handoff") << out.error.to_string();
    ASSERT_TRUE(e.release_handoff(out.handoff->kv.ref()).ok());
  };
  auto dated = [&](int64_t budget_ms) {
    EngineRequest r = request("The capital of France is", 2);
    r.wait_budget_us = budget_ms * 1000;
    return r;
  };
  auto refusal = [&](EngineRequest r) {
    auto h = e.submit(std::move(r), [](EngineOutput&&) {});
    return h.ok() ? ok_status() : h.status();
  };
  auto drain = [&] {  // a handoff's output comes before its slot is back
    for (int i = 0; i < 200 && e.metrics().prefill_slots_in_use > 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_EQ(e.metrics().prefill_slots_in_use, 0);
  };

  // The slot is held; requests due in 1 s (U) and in 60 s are refused, both with a full prefill.
  std::promise<EngineOutput> first_last;
  auto first = e.submit(request("Once upon a time, in a small village,", 2), [&](EngineOutput&& out) {
    if (out.finished) first_last.set_value(std::move(out));
  });
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(refusal(dated(1000)).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(refusal(dated(60'000)).code(), StatusCode::kResourceExhausted);
  EngineOutput out = first_last.get_future().get();
  ASSERT_TRUE(e.release_handoff(out.handoff->kv.ref()).ok());
  drain();

  // Free, but kept for U: the later one is refused, naming why; a request with no deadline is not
  // held back.
  now_ms += 5;
  Status st = refusal(dated(60'000));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("nearer its time-to-first-token deadline"), std::string::npos)
      << st.to_string();
  EXPECT_EQ(e.metrics().priority_refusals_total, 1);
  EXPECT_EQ(e.metrics().prefill_slots_in_use, 0);
  run_to_handoff(request("Water boils at a temperature of", 2));
  drain();
  // Anyone due sooner than U may take it; U is still waiting, so the slot after is kept too.
  run_to_handoff(dated(500));
  drain();
  EXPECT_EQ(refusal(dated(60'000)).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(e.metrics().priority_refusals_total, 2);
  // U retries (its deadline one tie's width later, as a network delay moves it): it takes the
  // slot, and the priority ends with it.
  now_ms += 10;
  run_to_handoff(dated(1000 - 15 + kDeadlineTieMs));
  drain();
  run_to_handoff(dated(60'000));
  drain();

  // A priority lapses when its request stops asking (placed elsewhere, or out of budget).
  std::promise<EngineOutput> hold_last;
  ASSERT_TRUE(e.submit(request("The quick brown fox", 2), [&](EngineOutput&& o2) {
                 if (o2.finished) hold_last.set_value(std::move(o2));
               }).ok());
  EXPECT_EQ(refusal(dated(1000)).code(), StatusCode::kResourceExhausted);
  out = hold_last.get_future().get();
  ASSERT_TRUE(e.release_handoff(out.handoff->kv.ref()).ok());
  drain();
  now_ms += 15;
  EXPECT_EQ(refusal(dated(60'000)).code(), StatusCode::kResourceExhausted);  // within the window
  EXPECT_EQ(e.metrics().priority_refusals_total, 3);
  now_ms += 1;
  run_to_handoff(dated(60'000));

  // A gateway offers its most urgent request first: once a request of the noted one's queue
  // asks, that one has gone (placed elsewhere), so the queue takes the slot and the priority ends.
  auto queued = [&](int64_t budget_ms, uint64_t queue) {
    EngineRequest r = dated(budget_ms);
    r.wait_queue = queue;
    return r;
  };
  std::promise<EngineOutput> hold2_last;
  ASSERT_TRUE(e.submit(request("The quick brown fox", 2), [&](EngineOutput&& o2) {
                 if (o2.finished) hold2_last.set_value(std::move(o2));
               }).ok());
  EXPECT_EQ(refusal(queued(1000, 7)).code(), StatusCode::kResourceExhausted);
  out = hold2_last.get_future().get();
  ASSERT_TRUE(e.release_handoff(out.handoff->kv.ref()).ok());
  drain();
  EXPECT_EQ(refusal(queued(60'000, 9)).code(), StatusCode::kResourceExhausted);  // another queue
  EXPECT_EQ(e.metrics().priority_refusals_total, 4);
  run_to_handoff(queued(60'000, 7));
  drain();
  run_to_handoff(queued(60'000, 9));
}

// With several slots free, the priority keeps one for the noted request; the others go to anyone.
TEST_F(EngineTest, DeadlinePriorityKeepsOneSlotNotAll) {
  KvTransport t = send_pool();
  const auto fixed = std::chrono::steady_clock::time_point(std::chrono::seconds(1000));
  EngineOptions o = prefill_options(*t.pool, 2);
  o.clock = [fixed] { return fixed; };
  Engine e(*model_, *tokenizer_, *pool_, o);
  auto dated = [&](int64_t budget_ms) {
    EngineRequest r = request("The capital of France is", 2);
    r.wait_budget_us = budget_ms * 1000;
    return r;
  };
  // Holds both slots until their handoffs come, then frees them.
  std::vector<KvBufferRef> held;
  std::mutex mu;
  std::condition_variable cv;
  auto holding_sink = [&](EngineOutput&& out) {
    if (!out.finished || !out.handoff) return;
    std::lock_guard<std::mutex> lock(mu);
    held.push_back(out.handoff->kv.ref());
    cv.notify_all();
  };
  auto wait_held = [&](size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return held.size() >= n; }));
  };
  ASSERT_TRUE(e.submit(request("Water boils at a temperature of", 2), holding_sink).ok());
  ASSERT_TRUE(e.submit(request("The quick brown fox", 2), holding_sink).ok());
  EXPECT_EQ(e.submit(dated(1000), [](EngineOutput&&) {}).status().code(), StatusCode::kResourceExhausted);
  wait_held(2);
  for (const KvBufferRef& kv : held) ASSERT_TRUE(e.release_handoff(kv).ok());
  held.clear();
  ASSERT_TRUE(e.submit(dated(60'000), holding_sink).ok());  // two free: one may go
  auto kept = e.submit(dated(60'000), [](EngineOutput&&) {});
  ASSERT_FALSE(kept.ok());
  EXPECT_EQ(e.metrics().priority_refusals_total, 1);
  ASSERT_TRUE(e.submit(dated(1000), holding_sink).ok());  // the noted one takes the kept slot
  wait_held(2);
  for (const KvBufferRef& kv : held) ASSERT_TRUE(e.release_handoff(kv).ok());
}

}  // namespace
}  // namespace pdserve

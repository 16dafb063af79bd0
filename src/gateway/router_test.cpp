#include "gateway/router.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <future>
#include <limits>
#include <mutex>
#include <thread>

#include "engine/test_model.h"

namespace pdserve {
namespace {

using testing::Collector;
using testing::Result;

EngineOptions base_options(EngineRole role) {
  EngineOptions o;
  o.role = role;
  o.num_blocks = 256;
  o.block_size = 16;
  o.step_token_budget = 256;
  o.max_running = 64;
  return o;
}

// Prefill and decode engines over the default model with the in-process transport, behind a
// Router — what `pdserve serve` runs.
class Cluster {
 public:
  // layer_wise: the prefills send KV layer by layer, with a small step budget so that longer
  // prompts are prefilled in several chunks (only the last chunk's pass sends).
  Cluster(const testing::TestModel& m, int num_prefills, int32_t prefill_slots, const RouterOptions& ro,
          int32_t decode_block_size = 16, int32_t decode_blocks = 256, bool layer_wise = false,
          int32_t decode_pending = 8, int32_t decode_max_running = 64) {
    KvTransportOptions to;
    to.pool_capacity_bytes = uint64_t{64} << 20;
    to.prefault_pool = false;
    auto t = make_transport(TransportKind::kInproc, to);
    PD_CHECK_MSG(t.ok(), t.status().message().c_str());
    transport_ = std::move(t).value();
    auto notify = [this] {
      if (Router* r = router_ptr_.load()) r->notify_capacity();
    };
    for (int i = 0; i < num_prefills; ++i) {
      EngineOptions o = base_options(EngineRole::kPrefill);
      o.prefill_slots = prefill_slots;
      o.kv_send = transport_.pool.get();
      o.layer_wise_kv = layer_wise;
      if (layer_wise) o.step_token_budget = 16;
      o.on_capacity = notify;
      prefills.push_back(std::make_unique<Engine>(*m.model, *m.tokenizer, *m.pool, o));
    }
    EngineOptions o = base_options(EngineRole::kDecode);
    o.block_size = decode_block_size;
    o.num_blocks = decode_blocks;
    o.kv_puller = transport_.puller.get();
    o.decode_pending = decode_pending;
    o.max_running = decode_max_running;
    o.on_capacity = notify;
    decode = std::make_unique<Engine>(*m.model, *m.tokenizer, *m.pool, o);
    std::vector<Instance*> ps;
    for (auto& p : prefills) ps.push_back(p.get());
    router = std::make_unique<Router>(ps, std::vector<Instance*>{decode.get()}, ro);
    router_ptr_.store(router.get());
  }
  ~Cluster() {
    router->stop();
    for (auto& p : prefills) p->shutdown();
    decode->shutdown();
    router_ptr_.store(nullptr);
  }

  // Every slot, buffer and block is back.
  void expect_idle() {
    // The last release may trail the final output by a moment (it runs after the pull lands).
    for (int i = 0; i < 200 && transport_.pool->stats().buffers_in_use > 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_EQ(transport_.pool->stats().buffers_in_use, 0);
    for (auto& p : prefills) {
      for (int i = 0; i < 200 && p->metrics().prefill_slots_in_use > 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      EngineMetrics m = p->metrics();
      EXPECT_EQ(m.prefill_slots_in_use, 0);
      EXPECT_EQ(m.handoffs_outstanding, 0);
      EXPECT_EQ(m.kv.num_blocks_used, 0);
    }
    // A decode attempt given up (layer-wise) ends when its pull notices, a moment later.
    for (int i = 0; i < 200 && decode->metrics().kv.num_blocks_used > 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EngineMetrics d = decode->metrics();
    EXPECT_EQ(d.kv.num_blocks_used, 0);
    EXPECT_EQ(d.running, 0);
    EXPECT_EQ(d.decode_pending, 0);
    EXPECT_EQ(router->metrics().gateway_waiting, 0);
  }

  std::vector<std::unique_ptr<Engine>> prefills;
  std::unique_ptr<Engine> decode;
  std::unique_ptr<Router> router;

 private:
  KvTransport transport_;
  std::atomic<Router*> router_ptr_{nullptr};
};

class RouterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = testing::default_test_model();
    ASSERT_NE(model_, nullptr);
  }

  static EngineRequest request(const std::string& prompt, int32_t max_tokens) {
    EngineRequest r;
    r.prompt = model_->tokenizer->encode(prompt, true, false);
    r.max_tokens = max_tokens;
    return r;
  }

  // Submits all, then waits for all.
  static std::vector<Result> run_all(GenerationBackend& backend, const std::vector<EngineRequest>& requests) {
    std::vector<std::unique_ptr<Collector>> collectors;
    for (const EngineRequest& r : requests) {
      collectors.push_back(std::make_unique<Collector>());
      auto h = backend.submit(r, collectors.back()->sink());
      EXPECT_TRUE(h.ok()) << h.status().to_string();
    }
    std::vector<Result> results;
    for (auto& c : collectors) results.push_back(c->wait());
    return results;
  }

  static std::vector<EngineRequest> prompts(int32_t max_tokens) {
    const std::vector<std::string> texts = {
        "The capital of France is",
        "Once upon a time, in a land far away,",
        "def fibonacci(n):",
        "The three primary colors are",
        "Water boils at",
        "A haiku about the sea:",
        "List three fruits: apple,",
        "The quick brown fox",
        "In 1969, humans first",
        "The meaning of life is",
        "To make a cup of tea, first",
        "Photosynthesis is the process by which plants convert light energy into chemical energy. "
        "It takes place mainly in the leaves, where chlorophyll absorbs sunlight. In summary,",
        "SELECT name FROM users WHERE",
        "Dear hiring manager, I am writing to",
        "The largest planet in our solar system is",
        "Translate to French: good morning ->",
        "1, 1, 2, 3, 5, 8,",
        "The recipe calls for two cups of flour, one cup of sugar, three eggs and a pinch of salt. Mix",
        "Why is the sky blue? Because",
        "My favourite programming language is",
    };
    std::vector<EngineRequest> out;
    for (const auto& t : texts) out.push_back(request(t, max_tokens));
    return out;
  }

  static void cancel_everywhere(bool layer_wise);

  static const testing::TestModel* model_;
};

const testing::TestModel* RouterTest::model_ = nullptr;

TEST_F(RouterTest, GreedyOutputEqualsAggregatedMode) {
  const std::vector<EngineRequest> requests = prompts(24);
  std::vector<Result> expected;
  {
    Engine aggregated(*model_->model, *model_->tokenizer, *model_->pool, base_options(EngineRole::kMixed));
    expected = run_all(aggregated, requests);
  }
  // Also with another block size on the decode: the wire body does not depend on it.
  for (int32_t decode_block_size : {16, 5}) {
    Cluster c(*model_, 1, 4, RouterOptions{}, decode_block_size);
    std::vector<Result> got = run_all(*c.router, requests);
    ASSERT_EQ(got.size(), expected.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].tokens, expected[i].tokens)
          << "prompt " << i << ", decode block size " << decode_block_size;
      EXPECT_EQ(got[i].text, expected[i].text) << "prompt " << i;
      EXPECT_EQ(got[i].finish_reason, expected[i].finish_reason) << "prompt " << i;
      EXPECT_EQ(got[i].completion_tokens, expected[i].completion_tokens) << "prompt " << i;
    }
    EngineMetrics m = c.router->metrics();
    EXPECT_GE(m.handoffs_total, 1);
    c.expect_idle();
  }
}

// A decode with room for a few sequences only: running ones are preempted (recomputed later) while
// handed-off requests keep arriving; outputs stay exact and everything is freed.
TEST_F(RouterTest, DecodePreemptionUnderImportsKeepsOutputsExact) {
  const std::vector<EngineRequest> requests = prompts(40);
  std::vector<Result> expected;
  {
    Engine aggregated(*model_->model, *model_->tokenizer, *model_->pool, base_options(EngineRole::kMixed));
    expected = run_all(aggregated, requests);
  }
  // 16 blocks of 16 = 256 slots for 20 sequences of up to ~80 tokens.
  Cluster c(*model_, 2, 4, RouterOptions{}, 16, 16);
  std::vector<Result> got = run_all(*c.router, requests);
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].tokens, expected[i].tokens) << "prompt " << i;
    EXPECT_EQ(got[i].finish_reason, expected[i].finish_reason) << "prompt " << i;
  }
  EXPECT_GT(c.decode->metrics().preemptions_total, 0);
  c.expect_idle();
}

TEST_F(RouterTest, SeededSamplingEqualsAggregatedMode) {
  std::vector<EngineRequest> requests = prompts(16);
  requests.resize(6);
  for (size_t i = 0; i < requests.size(); ++i) {
    requests[i].sampling.temperature = 0.9f;
    requests[i].sampling.top_p = 0.95f;
    requests[i].sampling.seed = 1000 + i;
  }
  std::vector<Result> expected;
  {
    Engine aggregated(*model_->model, *model_->tokenizer, *model_->pool, base_options(EngineRole::kMixed));
    expected = run_all(aggregated, requests);
  }
  Cluster c(*model_, 1, 4, RouterOptions{});
  std::vector<Result> got = run_all(*c.router, requests);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].tokens, expected[i].tokens) << "prompt " << i;
  c.expect_idle();
}

TEST_F(RouterTest, PrefillsNeverHoldMoreThanTheirSlotsAndRequestsWaitAtTheGateway) {
  Cluster c(*model_, 2, 2, RouterOptions{});
  std::atomic<bool> done{false};
  std::atomic<int32_t> max_slots{0}, max_waiting{0};
  std::thread monitor([&] {
    while (!done.load()) {
      for (auto& p : c.prefills) {
        int32_t s = p->metrics().prefill_slots_in_use;
        if (s > max_slots.load()) max_slots.store(s);
      }
      int32_t w = c.router->metrics().gateway_waiting;
      if (w > max_waiting.load()) max_waiting.store(w);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::vector<EngineRequest> requests = prompts(4);
  std::vector<Result> got = run_all(*c.router, requests);
  done.store(true);
  monitor.join();
  for (const Result& r : got) {
    EXPECT_TRUE(r.finish_reason == "length" || r.finish_reason == "stop")
        << r.finish_reason << " " << r.error.to_string();
  }
  EXPECT_LE(max_slots.load(), 2);
  EXPECT_GT(max_waiting.load(), 0) << "a burst of 20 over 4 slots must wait at the gateway";
  EngineMetrics m = c.router->metrics();
  EXPECT_GT(m.gateway_rejections_total, 0);
  EXPECT_EQ(m.gateway_timeouts_total, 0);
  c.expect_idle();
}

TEST_F(RouterTest, ExcessRequestsTimeOutWithinTheirBudgetAndNothingLeaks) {
  RouterOptions ro;
  ro.ttft_budget_ms = 1;
  Cluster c(*model_, 1, 1, ro);
  std::vector<EngineRequest> requests = prompts(8);
  std::vector<Result> got = run_all(*c.router, requests);
  int ok = 0, timed_out = 0;
  for (const Result& r : got) {
    if (r.finish_reason == "error") {
      EXPECT_EQ(r.error.code(), StatusCode::kDeadlineExceeded) << r.error.to_string();
      EXPECT_NE(r.error.message().find("scenario 'default'"), std::string::npos) << r.error.message();
      EXPECT_NE(r.error.message().find("waited"), std::string::npos) << r.error.message();
      ++timed_out;
    } else {
      ++ok;
    }
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(timed_out, 1);
  EXPECT_EQ(c.router->metrics().gateway_timeouts_total, timed_out);
  c.expect_idle();
}

TEST_F(RouterTest, CancellationReachesWhereverTheRequestIs) {
  for (bool layer_wise : {false, true}) {
    SCOPED_TRACE(layer_wise ? "layer-wise" : "whole KV");
    cancel_everywhere(layer_wise);
  }
}

void RouterTest::cancel_everywhere(bool layer_wise) {
  Cluster c(*model_, 1, 1, RouterOptions{}, 16, 256, layer_wise);
  // The first occupies the only slot and then decodes for long; the second waits at the gateway.
  Collector long_one, waiting_one;
  EngineRequest r1 = request("Tell me a very long story about a dragon.", 400);
  r1.ignore_eos = true;
  auto h1 = c.router->submit(r1, long_one.sink());
  auto h2 = c.router->submit(request("Hello", 8), waiting_one.sink());
  ASSERT_TRUE(h1.ok() && h2.ok());
  (*h2)->cancel();
  EXPECT_EQ(waiting_one.wait().finish_reason, "cancelled");
  // Let the first reach the decode, then cancel it mid-stream.
  for (int i = 0; i < 400 && c.decode->metrics().running == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  (*h1)->cancel();
  Result r = long_one.wait();
  EXPECT_EQ(r.finish_reason, "cancelled");
  EXPECT_LT(r.tokens.size(), 400u);
  c.expect_idle();
}

TEST_F(RouterTest, PrefixCacheHitsOfThePrefillShowInUsage) {
  Cluster c(*model_, 1, 4, RouterOptions{});
  std::string system(900, ' ');
  for (size_t i = 0; i < system.size(); i += 9) system.replace(i, 9, "context. ");
  Result first, second;
  {
    Collector col;
    ASSERT_TRUE(c.router->submit(request(system + "Question one?", 4), col.sink()).ok());
    first = col.wait();
  }
  {
    Collector col;
    ASSERT_TRUE(c.router->submit(request(system + "Question two?", 4), col.sink()).ok());
    second = col.wait();
  }
  EXPECT_EQ(first.cached_prompt_tokens, 0);
  EXPECT_GE(second.cached_prompt_tokens, 160);
  c.expect_idle();
}

TEST_F(RouterTest, APrefillThatIsGoneIsSkippedAndOthersServe) {
  Cluster c(*model_, 2, 2, RouterOptions{});
  c.prefills[0]->shutdown();
  std::vector<EngineRequest> requests = prompts(4);
  requests.resize(6);
  for (const Result& r : run_all(*c.router, requests)) {
    EXPECT_TRUE(r.finish_reason == "length" || r.finish_reason == "stop") << r.error.to_string();
  }
  EXPECT_GE(c.router->metrics().gateway_prefill_retries_total, 1);
  c.expect_idle();
}

// A prefill engine that ends the first `ends` requests offered to it unstarted with kUnavailable,
// as a prefill does that shuts down with them in its queue; after that it serves.
class AwayPrefill : public Instance {
 public:
  AwayPrefill(Engine& engine, int32_t ends) : engine_(engine), ends_(ends) {}
  ~AwayPrefill() override { join(); }
  int32_t max_context() const override { return engine_.max_context(); }
  int64_t max_sequence_tokens() const override { return engine_.max_sequence_tokens(); }
  Status validate(const EngineRequest& r) const override { return engine_.validate(r); }
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink sink,
                                                  std::shared_ptr<RequestHandle> handle) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++submits_;
      if (ends_ > 0) {
        --ends_;
        threads_.emplace_back([sink = std::move(sink)] {
          EngineOutput out;
          out.finished = true;
          out.finish_reason = "error";
          out.error = unavailable("the prefill instance is shutting down");
          sink(std::move(out));
        });
        return handle ? handle : std::make_shared<RequestHandle>();
      }
    }
    return engine_.submit(std::move(request), std::move(sink), std::move(handle));
  }
  EngineMetrics metrics() const override { return engine_.metrics(); }
  EngineRole role() const override { return engine_.role(); }
  StatusOr<std::shared_ptr<RequestHandle>> submit_handoff(EngineRequest request, const EngineHandoff& handoff,
                                                          OutputSink sink, PulledCallback on_pulled,
                                                          std::shared_ptr<RequestHandle> handle) override {
    return engine_.submit_handoff(std::move(request), handoff, std::move(sink), std::move(on_pulled),
                                  std::move(handle));
  }
  Status release_handoff(const KvBufferRef& kv) override { return engine_.release_handoff(kv); }

  int32_t submits() const {
    std::lock_guard<std::mutex> lock(mu_);
    return submits_;
  }
  // Once nothing submits any more.
  void join() {
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }

 private:
  Engine& engine_;
  mutable std::mutex mu_;
  int32_t ends_;
  int32_t submits_ = 0;
  std::vector<std::thread> threads_;
};

// A prefill that ended a request unstarted with kUnavailable (it shut down with the request in
// its queue) may be back: the request is offered to it again — with no other prefill, under both
// policies — instead of failing; a second such end rules that prefill out for the request.
TEST_F(RouterTest, APrefillThatWentAwayWithARequestIsAskedAgainOnce) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kOnDemand, AdmissionPolicy::kBaseline}) {
    for (int32_t ends : {1, 2}) {
      SCOPED_TRACE(fmt::format("baseline {}, ends {}", policy == AdmissionPolicy::kBaseline, ends));
      RouterOptions ro;
      ro.admission = policy;
      Cluster c(*model_, 1, 1, ro);
      AwayPrefill away(*c.prefills[0], ends);
      Router router({&away}, {c.decode.get()}, ro);
      Collector col;
      ASSERT_TRUE(router.submit(prompts(4)[0], col.sink()).ok());
      ASSERT_TRUE(col.finished_within(std::chrono::seconds(60))) << "the request never ended";
      Result r = col.wait();
      if (ends == 1) {
        EXPECT_TRUE(r.finish_reason == "length" || r.finish_reason == "stop") << r.error.to_string();
        EXPECT_EQ(r.completion_tokens, 4);
      } else {
        EXPECT_EQ(r.finish_reason, "error");
        EXPECT_EQ(r.error.code(), StatusCode::kUnavailable);
        EXPECT_NE(r.error.message().find("failed this request"), std::string::npos) << r.error.to_string();
      }
      EXPECT_EQ(away.submits(), 2);
      EXPECT_EQ(router.metrics().gateway_prefill_retries_total, ends);
      EXPECT_EQ(router.metrics().gateway_waiting, 0);
      router.stop();
      away.join();
      c.expect_idle();
    }
  }
}

// With other prefills there, one found away — refusing at submit (shut down) or ending a request
// unstarted — is offered that request only after the others: the request goes to a prefill that
// serves, never back and forth between two that are away.
TEST_F(RouterTest, PrefillsFoundAwayAreAskedAfterTheOthers) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kOnDemand, AdmissionPolicy::kBaseline}) {
    SCOPED_TRACE(policy == AdmissionPolicy::kBaseline ? "baseline" : "on-demand");
    RouterOptions ro;
    ro.admission = policy;
    Cluster c(*model_, 3, 1, ro);
    c.prefills[1]->shutdown();                    // refuses at submit (kUnavailable)
    AwayPrefill away(*c.prefills[0], 1'000'000);  // ends every request unstarted (kUnavailable)
    Router router({&away, c.prefills[1].get(), c.prefills[2].get()}, {c.decode.get()}, ro);
    const std::vector<EngineRequest> requests = prompts(4);
    for (int i = 0; i < 6; ++i) {  // one at a time: every prefill's count is 0 at arrival
      Collector col;
      ASSERT_TRUE(router.submit(requests[static_cast<size_t>(i)], col.sink()).ok());
      ASSERT_TRUE(col.finished_within(std::chrono::seconds(60))) << "request " << i << " never ended";
      Result r = col.wait();
      EXPECT_TRUE(r.finish_reason == "length" || r.finish_reason == "stop") << r.error.to_string();
      // The first prefill is offered each request once at most (on-demand: always first, by index).
      if (policy == AdmissionPolicy::kOnDemand) {
        EXPECT_EQ(away.submits(), i + 1);
      } else {
        EXPECT_LE(away.submits(), i + 1);
      }
    }
    EXPECT_EQ(c.prefills[2]->metrics().handoffs_total, 6);
    // Each request moved on from each of the two once at most (on-demand: from both, in order).
    if (policy == AdmissionPolicy::kOnDemand) {
      EXPECT_EQ(router.metrics().gateway_prefill_retries_total, 12);
    } else {
      EXPECT_LE(router.metrics().gateway_prefill_retries_total, 12);
    }
    router.stop();
    away.join();
    c.expect_idle();
  }
}

// A baseline request whose only prefill is down waits at the gateway for it (it has no TTFT
// budget), re-offered on every tick, and counts as one retry, not one per offer.
TEST_F(RouterTest, ARequestHeldForADownPrefillCountsOneRetry) {
  RouterOptions ro;
  ro.admission = AdmissionPolicy::kBaseline;
  Cluster c(*model_, 1, 1, ro);
  c.prefills[0]->shutdown();
  Collector col;
  ASSERT_TRUE(c.router->submit(prompts(4)[0], col.sink()).ok());
  EXPECT_FALSE(col.finished_within(std::chrono::milliseconds(200)));  // about 20 re-offers
  EXPECT_EQ(c.router->metrics().gateway_waiting, 1);
  EXPECT_EQ(c.router->metrics().gateway_prefill_retries_total, 1);
  c.router->stop();  // ends what waits
  ASSERT_TRUE(col.finished_within(std::chrono::seconds(10)));
  EXPECT_EQ(col.wait().finish_reason, "cancelled");
}

// The baseline has no TTFT budget; a request whose every prefill stays away still ends, after
// prefill_away_wait_ms, with UNAVAILABLE and the reason.
TEST_F(RouterTest, ABaselineRequestWhosePrefillsAllStayAwayFailsAfterTheWaitLimit) {
  RouterOptions ro;
  ro.admission = AdmissionPolicy::kBaseline;
  ro.prefill_away_wait_ms = 300;
  Cluster c(*model_, 2, 1, ro);
  for (auto& p : c.prefills) p->shutdown();
  Collector col;
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(c.router->submit(prompts(4)[0], col.sink()).ok());
  ASSERT_TRUE(col.finished_within(std::chrono::seconds(10)));
  const auto waited = std::chrono::steady_clock::now() - start;
  Result r = col.wait();
  EXPECT_EQ(r.finish_reason, "error");
  EXPECT_EQ(r.error.code(), StatusCode::kUnavailable) << r.error.to_string();
  EXPECT_NE(r.error.message().find("down or going away"), std::string::npos) << r.error.to_string();
  EXPECT_GE(waited, std::chrono::milliseconds(300));
  EXPECT_EQ(c.router->metrics().gateway_waiting, 0);
  // Unseen for over a second, the prefills may have been back meanwhile: a request that finds them
  // away again waits the whole limit anew.
  std::this_thread::sleep_for(std::chrono::milliseconds(1300));
  Collector again;
  const auto again_start = std::chrono::steady_clock::now();
  ASSERT_TRUE(c.router->submit(prompts(4)[1], again.sink()).ok());
  ASSERT_TRUE(again.finished_within(std::chrono::seconds(10)));
  EXPECT_GE(std::chrono::steady_clock::now() - again_start, std::chrono::milliseconds(300));
  EXPECT_EQ(again.wait().error.code(), StatusCode::kUnavailable);
}

// Layer-wise KV: the decode pulls each layer while the prefill's last pass computes it and takes
// the first token from the transfer; greedy and seeded outputs stay those of aggregated mode.
TEST_F(RouterTest, LayerWiseKvKeepsOutputsExact) {
  std::vector<EngineRequest> requests = prompts(24);
  for (size_t i = 0; i < 6; ++i) {
    requests[i].sampling.temperature = 0.8f;
    requests[i].sampling.top_k = 40;
    requests[i].sampling.seed = 77 + i;
  }
  requests[6].max_tokens = 2;  // the decode computes one step
  std::vector<Result> expected;
  {
    Engine aggregated(*model_->model, *model_->tokenizer, *model_->pool, base_options(EngineRole::kMixed));
    expected = run_all(aggregated, requests);
  }
  // Decode block size 5; and a decode with one seat and one pending place, which must refuse
  // early handoffs while four prefill slots are busy: their KV goes by the final handoff instead.
  struct Config {
    int32_t block_size, pending, seats;
  };
  for (Config cfg : {Config{16, 8, 64}, Config{5, 8, 64}, Config{16, 1, 1}}) {
    const int32_t decode_block_size = cfg.block_size;
    RouterOptions ro;
    ro.ttft_budget_ms = 600'000;  // 20 requests on 4 slots wait long in a sanitizer build
    Cluster c(*model_, 2, 2, ro, decode_block_size, 256, /*layer_wise=*/true, cfg.pending, cfg.seats);
    std::vector<Result> got = run_all(*c.router, requests);
    ASSERT_EQ(got.size(), expected.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].tokens, expected[i].tokens)
          << "prompt " << i << ", decode block size " << decode_block_size;
      EXPECT_EQ(got[i].text, expected[i].text) << "prompt " << i;
      EXPECT_EQ(got[i].finish_reason, expected[i].finish_reason)
          << "prompt " << i << " " << got[i].error.to_string();
    }
    int64_t handoffs = 0, layer_wise = 0;
    for (auto& p : c.prefills) {
      handoffs += p->metrics().handoffs_total;
      layer_wise += p->metrics().layer_wise_handoffs_total;
    }
    EXPECT_EQ(handoffs, static_cast<int64_t>(requests.size()));
    EXPECT_EQ(layer_wise, handoffs) << "every KV left layer-wise";
    c.expect_idle();
  }
}

// JSON mode across the handoff: the prefill masks the first token, the decode goes on from it (with
// the KV, or after it, layer-wise); the tokens equal one engine's, and each text is a JSON object.
TEST_F(RouterTest, JsonModeHoldsAcrossTheHandoff) {
  std::vector<EngineRequest> requests;
  for (const char* topic : {"a cat", "a city", "a car", "a book"}) {
    EngineRequest r =
        request(fmt::format("Describe {} as a JSON object with three fields. Answer:", topic), 160);
    r.response_format = ResponseFormat::kJsonObject;
    requests.push_back(r);
    r.sampling.temperature = 1.0f;
    r.sampling.seed = requests.size();
    requests.push_back(r);
  }
  std::vector<Result> expected;
  {
    Engine aggregated(*model_->model, *model_->tokenizer, *model_->pool, base_options(EngineRole::kMixed));
    expected = run_all(aggregated, requests);
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    JsonPrefix p;
    EXPECT_TRUE(p.advance(std::string_view(expected[i].text))) << expected[i].text;
    EXPECT_EQ(p.complete(), expected[i].finish_reason == "stop") << expected[i].text;
  }
  for (bool layer_wise : {false, true}) {
    Cluster c(*model_, 1, 4, RouterOptions{}, 16, 256, layer_wise);
    std::vector<Result> got = run_all(*c.router, requests);
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].tokens, expected[i].tokens) << "request " << i << (layer_wise ? ", layer-wise" : "");
    }
    // A peer's first token that cannot begin an object is refused.
    EngineHandoff h;
    h.first_token = model_->tokenizer->encode("Hello", false, false).at(0);
    h.num_prompt_tokens = static_cast<int32_t>(requests[0].prompt.size());
    auto refused = c.decode->submit_handoff(
        requests[0], h, [](EngineOutput) {}, nullptr, nullptr);
    ASSERT_FALSE(refused.ok());
    EXPECT_NE(refused.status().message().find("cannot begin a JSON object"), std::string::npos)
        << refused.status().to_string();
    c.expect_idle();
  }
}

// A request that ends at its first token after its early handoff (a stop string there) gives the
// decode attempt up: the client sees the prefill's end, and nothing is left behind.
TEST_F(RouterTest, LayerWiseRequestEndingAtItsFirstTokenLeavesNothing) {
  std::vector<EngineRequest> requests = prompts(1);
  requests.resize(5);
  std::vector<Result> first;
  {
    Engine aggregated(*model_->model, *model_->tokenizer, *model_->pool, base_options(EngineRole::kMixed));
    first = run_all(aggregated, requests);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_FALSE(first[i].text.empty());
    requests[i].max_tokens = 16;
    requests[i].stop = {first[i].text};
  }
  Cluster c(*model_, 1, 2, RouterOptions{}, 16, 256, /*layer_wise=*/true);
  for (const Result& r : run_all(*c.router, requests)) {
    EXPECT_EQ(r.finish_reason, "stop") << r.error.to_string();
    EXPECT_EQ(r.completion_tokens, 1);
    EXPECT_TRUE(r.text.empty()) << r.text;
  }
  EXPECT_EQ(c.prefills[0]->metrics().layer_wise_handoffs_total, 0);
  c.expect_idle();
}

// Gateways that do not share their counts must not all pick the same prefill among equals.
TEST_F(RouterTest, BaselineBreaksTiesBetweenIdlePrefillsAtRandom) {
  RouterOptions ro;
  ro.admission = AdmissionPolicy::kBaseline;
  Cluster c(*model_, 3, 1, ro);
  const std::vector<EngineRequest> all = prompts(2);
  for (int i = 0; i < 12; ++i) {  // one at a time: every prefill is idle when each arrives
    std::vector<Result> got = run_all(*c.router, {all[static_cast<size_t>(i) % all.size()]});
    ASSERT_EQ(got.size(), 1u);
    EXPECT_TRUE(got[0].finish_reason == "length" || got[0].finish_reason == "stop")
        << got[0].error.to_string();
  }
  int used = 0;
  for (auto& p : c.prefills) used += p->metrics().handoffs_total > 0 ? 1 : 0;
  // By index every request would go to the first prefill; at random all 12 do with chance 3^-11.
  EXPECT_GE(used, 2);
  c.expect_idle();
}

TEST_F(RouterTest, BaselineAdmissionQueuesPerPrefillWithoutABudget) {
  RouterOptions ro;
  ro.admission = AdmissionPolicy::kBaseline;
  ro.ttft_budget_ms = 1;  // ignored by the baseline: requests wait in their prefill's queue
  Cluster c(*model_, 2, 1, ro);
  std::atomic<bool> done{false};
  std::atomic<int32_t> max_waiting{0};
  std::thread monitor([&] {
    while (!done.load()) {
      // The queues are the prefills' own (queue_if_full); the gateway holds a request only
      // for a moment, or when a prefill refuses even to queue it.
      int32_t w = 0;
      for (auto& p : c.prefills) w += p->metrics().waiting;
      if (w > max_waiting.load()) max_waiting.store(w);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::vector<Result> got = run_all(*c.router, prompts(4));
  done.store(true);
  monitor.join();
  for (const Result& r : got) {
    EXPECT_TRUE(r.finish_reason == "length" || r.finish_reason == "stop") << r.error.to_string();
  }
  EXPECT_GT(max_waiting.load(), 0);
  EXPECT_EQ(c.router->metrics().gateway_timeouts_total, 0);
  for (auto& p : c.prefills) EXPECT_GT(p->metrics().handoffs_total, 0) << "both prefills take requests";
  c.expect_idle();
}

// An instance that records what it is offered and accepts only while open (never answers).
class ScriptedInstance : public Instance {
 public:
  explicit ScriptedInstance(EngineRole role) : role_(role) {}
  int32_t max_context() const override { return 4096; }
  int64_t max_sequence_tokens() const override { return 4096; }
  Status validate(const EngineRequest&) const override { return ok_status(); }
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest request, OutputSink,
                                                  std::shared_ptr<RequestHandle> handle) override {
    std::lock_guard<std::mutex> lock(mu_);
    offered_.push_back(request.prompt.empty() ? -1 : request.prompt[0]);
    if (away_) return unavailable("away");
    if (!open_) return resource_exhausted("closed");
    if (request.prompt.size() > room_tokens_)
      return resource_exhausted("no room").with_reason(std::string(kSendPoolNoRoom));
    accepted_.push_back(std::move(request));
    return handle;
  }
  EngineMetrics metrics() const override { return {}; }
  EngineRole role() const override { return role_; }
  StatusOr<std::shared_ptr<RequestHandle>> submit_handoff(EngineRequest, const EngineHandoff&, OutputSink,
                                                          PulledCallback,
                                                          std::shared_ptr<RequestHandle>) override {
    return resource_exhausted("closed");
  }
  Status release_handoff(const KvBufferRef&) override { return ok_status(); }

  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
  }
  // Down or going away: every offer fails with kUnavailable.
  void set_away() {
    std::lock_guard<std::mutex> lock(mu_);
    away_ = true;
  }
  // Open, with room for the KV of prompts of at most `tokens` (longer ones are refused for room).
  void open_with_room(size_t tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    room_tokens_ = tokens;
  }
  std::vector<EngineRequest> accepted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return accepted_;
  }
  // How many times requests whose prompts start with `tag` were offered (accepted or not).
  int64_t offers(int32_t tag) const {
    std::lock_guard<std::mutex> lock(mu_);
    return std::count(offered_.begin(), offered_.end(), tag);
  }

 private:
  const EngineRole role_;
  mutable std::mutex mu_;
  bool open_ = false;
  bool away_ = false;
  size_t room_tokens_ = std::numeric_limits<size_t>::max();
  std::vector<EngineRequest> accepted_;
  std::vector<int32_t> offered_;
};

// Submits a prompt of `n` copies of the token `tag` (which names it in offers and acceptances),
// its outputs dropped.
bool submit_tagged(Router& router, int32_t n, int32_t tag) {
  EngineRequest r;
  r.prompt.assign(static_cast<size_t>(n), tag);
  return router.submit(std::move(r), [](EngineOutput&&) {}).ok();
}

// Waits (up to 2 s) until `prefill` accepted `n` requests; returns what it accepted.
std::vector<EngineRequest> wait_accepted(const ScriptedInstance& prefill, size_t n) {
  std::vector<EngineRequest> got;
  for (int i = 0; i < 400 && (got = prefill.accepted()).size() < n; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return got;
}

// Requests waiting at the gateway are offered in the order of their deadlines (a per-token
// budget gives a long prompt more time, so a short one that came later goes first), each with
// what is left of its budget; the baseline sends no budget.
TEST(RouterOrderTest, WaitingRequestsGoByDeadlineWithTheirBudgetLeft) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kOnDemand, AdmissionPolicy::kBaseline}) {
    SCOPED_TRACE(policy == AdmissionPolicy::kOnDemand ? "on-demand" : "baseline");
    ScriptedInstance prefill(EngineRole::kPrefill), decode(EngineRole::kDecode);
    RouterOptions ro;
    ro.admission = policy;
    ro.ttft_budget_ms = 10'000;
    ro.ttft_budget_ms_per_token = 100;
    Router router({&prefill}, {&decode}, ro);
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(submit_tagged(router, 50, 1));  // due in 15 s
    ASSERT_TRUE(submit_tagged(router, 2, 2));   // due in 10.2 s
    ASSERT_TRUE(submit_tagged(router, 50, 3));  // due 15 s, after the first
    prefill.open();
    router.notify_capacity();
    std::vector<EngineRequest> got = wait_accepted(prefill, 3);
    ASSERT_EQ(got.size(), 3u);
    const int64_t waited_us =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
    if (policy == AdmissionPolicy::kBaseline) {
      for (int k = 0; k < 3; ++k) {
        EXPECT_EQ(got[static_cast<size_t>(k)].prompt[0], k + 1);  // first come, first served
        EXPECT_EQ(got[static_cast<size_t>(k)].wait_budget_us, -1);
      }
    } else {
      EXPECT_EQ(got[0].prompt[0], 2);
      EXPECT_EQ(got[1].prompt[0], 1);
      EXPECT_EQ(got[2].prompt[0], 3);
      EXPECT_LE(got[0].wait_budget_us, 10'200'000);
      EXPECT_GE(got[0].wait_budget_us, 10'200'000 - waited_us);
      EXPECT_LE(got[1].wait_budget_us, 15'000'000);
      EXPECT_GE(got[1].wait_budget_us, 15'000'000 - waited_us);
    }
    router.stop();
  }
}

// A request refused for room in the prefills' KV send buffers (a long prompt) does not hold back
// shorter ones due later while it has half its budget left; those at least as long wait behind it.
TEST(RouterOrderTest, ShorterPromptsGoAheadOfOneRefusedForRoom) {
  ScriptedInstance prefill(EngineRole::kPrefill), decode(EngineRole::kDecode);
  RouterOptions ro;
  ro.ttft_budget_ms = 60'000;
  Router router({&prefill}, {&decode}, ro);
  ASSERT_TRUE(submit_tagged(router, 100, 1));
  ASSERT_TRUE(submit_tagged(router, 5, 2));
  ASSERT_TRUE(submit_tagged(router, 100, 3));
  ASSERT_TRUE(submit_tagged(router, 8, 4));
  prefill.open_with_room(10);
  router.notify_capacity();
  std::vector<EngineRequest> got = wait_accepted(prefill, 2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].prompt[0], 2);
  EXPECT_EQ(got[1].prompt[0], 4);
  // The router thread may have the waiting requests in hand for a moment.
  int32_t waiting = 0;
  for (int i = 0; i < 400 && (waiting = router.metrics().gateway_waiting) != 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(waiting, 2);
  EXPECT_EQ(prefill.offers(3), 0) << "as long as the one refused for room, yet offered";
  const EngineMetrics m = router.metrics();
  EXPECT_GT(m.gateway_room_rejections_total, 0);
  EXPECT_GT(m.gateway_rejections_total, m.gateway_room_rejections_total);  // "closed" ones too
  // Room for them now: the long ones go, in their order.
  prefill.open_with_room(1000);
  router.notify_capacity();
  got = wait_accepted(prefill, 4);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[2].prompt[0], 1);
  EXPECT_EQ(got[3].prompt[0], 3);
  router.stop();
}

// A prefill found away does not count as a refusal of another kind: the other's refusal for room
// still lets a shorter prompt go ahead.
TEST(RouterOrderTest, APrefillFoundAwayDoesNotHoldBackShorterPrompts) {
  ScriptedInstance away(EngineRole::kPrefill), roomy(EngineRole::kPrefill), decode(EngineRole::kDecode);
  away.set_away();
  RouterOptions ro;
  ro.ttft_budget_ms = 60'000;
  Router router({&away, &roomy}, {&decode}, ro);
  ASSERT_TRUE(submit_tagged(router, 100, 1));
  ASSERT_TRUE(submit_tagged(router, 5, 2));
  roomy.open_with_room(10);
  router.notify_capacity();
  std::vector<EngineRequest> got = wait_accepted(roomy, 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].prompt[0], 2);
  EXPECT_GT(away.offers(1), 0);
  router.stop();
}

// Past half its budget, a request refused for room holds back everything due later, so that the
// room other prompts would take frees for it; a refusal for a slot always does.
TEST(RouterOrderTest, ARequestRefusedForRoomPastHalfItsBudgetHoldsBackTheRest) {
  ScriptedInstance prefill(EngineRole::kPrefill), decode(EngineRole::kDecode);
  RouterOptions ro;
  ro.ttft_budget_ms = 2'000;
  Router router({&prefill}, {&decode}, ro);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(submit_tagged(router, 100, 1));
  std::this_thread::sleep_until(std::chrono::steady_clock::now() + std::chrono::milliseconds(1'100));
  ASSERT_TRUE(submit_tagged(router, 5, 2));
  prefill.open_with_room(10);
  router.notify_capacity();
  // Until the router has offered the long one (for room, now) again.
  const int64_t offers_before = prefill.offers(1);
  for (int i = 0; i < 400 && prefill.offers(1) == offers_before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // a few passes of the router's loop
  // (Unless this thread slept so long that the long one's budget ran out.)
  const bool long_one_waits = std::chrono::steady_clock::now() < t0 + std::chrono::milliseconds(1'900);
  if (long_one_waits) {
    EXPECT_TRUE(prefill.accepted().empty()) << "the short prompt went ahead";
    EXPECT_EQ(prefill.offers(2), 0) << "the short prompt was offered";
  }
  prefill.open_with_room(1000);
  router.notify_capacity();
  std::vector<EngineRequest> got = wait_accepted(prefill, 2);
  if (long_one_waits) {
    ASSERT_EQ(got.size(), 2u);
    EXPECT_EQ(got[0].prompt[0], 1);
    EXPECT_EQ(got[1].prompt[0], 2);
  }
  router.stop();
}

}  // namespace
}  // namespace pdserve

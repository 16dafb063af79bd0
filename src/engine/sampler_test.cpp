#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "kernels/gumbel.h"
#include "kernels/truncation.h"

namespace pdserve {
namespace {

std::vector<float> logits() { return {1.0f, 3.0f, 2.0f, -1.0f, 2.5f}; }

TEST(Sampler, GreedyPicksTheLargestLogitAndReportsLogprobs) {
  SamplingParams p;
  p.top_logprobs = 3;
  Sampler s(p);
  auto l = logits();
  SampleResult r = s.sample(l, {});
  EXPECT_EQ(r.token, 1);
  double z = 0;
  for (float x : logits()) z += std::exp(x);
  EXPECT_NEAR(r.logprob, 3.0 - std::log(z), 1e-5);
  ASSERT_EQ(r.top.size(), 3u);
  EXPECT_EQ(r.top[0].token, 1);
  EXPECT_EQ(r.top[1].token, 4);
  EXPECT_EQ(r.top[2].token, 2);
}

// NaN ranks lowest everywhere (as in the GPU's draws): a NaN logit never wins nor spoils the others'
// log-probabilities; a row of NaN alone draws token 0, whose logit says the row was unusable.
TEST(Sampler, NaNLogitsRankLowest) {
  const float nan = std::nanf("");
  for (const float temperature : {0.0f, 0.7f}) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_logprobs = 3;
    Sampler s(p);
    std::vector<float> l = {nan, 1.0f, 3.0f, nan, 2.0f};
    SampleResult r = s.sample(l, {});
    if (temperature == 0.0f) {
      EXPECT_EQ(r.token, 2);
    }
    EXPECT_TRUE(usable_logit(l[static_cast<size_t>(r.token)])) << temperature;
    const double z = std::exp(1.0) + std::exp(3.0) + std::exp(2.0);
    if (temperature == 0.0f) {
      EXPECT_NEAR(r.logprob, 3.0 - std::log(z), 1e-5);
    }
    ASSERT_EQ(r.top.size(), 3u);
    EXPECT_EQ(r.top[0].token, 2);
    EXPECT_EQ(r.top[1].token, 4);
    EXPECT_EQ(r.top[2].token, 1);
    std::vector<float> all_nan(5, nan);
    r = s.sample(all_nan, {});
    EXPECT_FALSE(usable_logit(all_nan[static_cast<size_t>(r.token)])) << temperature;
  }
  EXPECT_FALSE(usable_logit(-INFINITY));
  EXPECT_TRUE(usable_logit(-3e38f));
}

// Temperatures too small to change a draw are greedy, on the host as on a backend that draws.
TEST(Sampler, TinyTemperaturesAreGreedy) {
  SamplingParams p;
  p.temperature = 1e-38f;
  Sampler s(p);
  EXPECT_EQ(s.params().temperature, 0.0f);
  std::vector<float> l = {-5.0f, -1.0f, -2.0f};
  EXPECT_EQ(s.sample(l, {}).token, 1);
  p.temperature = kGreedyBelowTemperature;
  EXPECT_EQ(Sampler(p).params().temperature, kGreedyBelowTemperature);
}

TEST(Sampler, SeededSamplingIsReproducibleAndFollowsTheDistribution) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  Sampler a(p), b(p);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 20000; ++i) {
    auto la = logits(), lb = logits();
    int32_t ta = a.sample(la, {}).token;
    ASSERT_EQ(ta, b.sample(lb, {}).token);
    counts[ta]++;
  }
  double z = 0;
  for (float x : logits()) z += std::exp(x);
  for (int32_t t = 0; t < 5; ++t) {
    double want = std::exp(logits()[static_cast<size_t>(t)]) / z;
    EXPECT_NEAR(counts[t] / 20000.0, want, 0.015) << t;
  }
}

TEST(Sampler, TopKTopPAndMinPRestrictTheCandidates) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  Sampler k2(p);
  p.top_k = 0;
  p.top_p = 0.4f;
  Sampler tp(p);
  p.top_p = 1.0f;
  p.min_p = 0.7f;
  Sampler mp(p);
  for (int i = 0; i < 500; ++i) {
    auto l1 = logits(), l2 = logits(), l3 = logits();
    int32_t a = k2.sample(l1, {}).token;
    EXPECT_TRUE(a == 1 || a == 4);
    EXPECT_EQ(tp.sample(l2, {}).token, 1);  // p(top) ≈ 0.47 ≥ 0.4: the top token alone
    int32_t c = mp.sample(l3, {}).token;    // exp(-0.5) ≈ 0.61 < 0.7: only the top survives
    EXPECT_EQ(c, 1);
  }
}

// The sampler sorts only as much of the vocabulary as it needs for a truncated draw (top-k, top-p,
// min-p); kernels/truncation.h's reference follows the definition literally (the whole vocabulary
// sorted, every weight computed), so every draw must agree. (The GPU kernel is held to the same
// reference in cuda_kernels_test.)
int32_t reference_draw(const std::vector<float>& logits, const SamplingParams& p, uint64_t counter) {
  return truncated_draw_reference(logits, p.temperature, p.top_k, p.top_p, p.min_p, p.seed, counter);
}

TEST(Sampler, PartialSortingDrawsWhatAFullSortWould) {
  std::mt19937_64 gen(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const SamplingParams shapes[] = {
      {.temperature = 0.7f, .top_p = 0.9f},
      {.temperature = 1.3f, .top_k = 40},
      {.temperature = 0.8f, .top_k = 500, .top_p = 0.95f, .min_p = 0.01f},
      {.temperature = 2.0f, .min_p = 0.05f},
      {.temperature = 5.0f, .top_p = 0.999f},  // a flat distribution: most of the vocabulary
      {.temperature = 1.0f, .top_k = 1},
  };
  for (const SamplingParams& shape : shapes) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> l(4096 + trial * 97);
      for (float& x : l) x = normal(gen);
      l[trial % l.size()] = l[(trial * 31) % l.size()];  // a tie
      SamplingParams p = shape;
      p.seed = 100 + trial;
      Sampler s(p);
      for (uint64_t draw = 0; draw < 5; ++draw) {
        std::vector<float> copy = l;
        const int32_t want = reference_draw(l, p, draw);
        ASSERT_EQ(s.sample(copy, {}, false).token, want) << "shape T=" << p.temperature << " trial " << trial;
      }
    }
  }
}

TEST(Sampler, TruncatedDrawsContinueAcrossSkip) {
  // Keyed by (seed, draw number) alone: a decode that skips the prefill's draw continues the
  // same sequence of tokens.
  SamplingParams p{.temperature = 0.9f, .top_k = 50, .top_p = 0.9f, .seed = 11};
  std::mt19937_64 gen(3);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> l(1000);
  for (float& x : l) x = normal(gen);
  Sampler whole(p), decode(p);
  decode.skip(1);
  auto a = l;
  whole.sample(a, {}, false);
  for (int i = 0; i < 20; ++i) {
    auto x = l, y = l;
    EXPECT_EQ(whole.sample(x, {}, false).token, decode.sample(y, {}, false).token) << i;
  }
}

TEST(Sampler, TruncationWeightsFollowExp) {
  // The weight's exp (basic operations only, so the GPU gets the same bits) against the library's.
  for (float x = -27.9f; x <= 0.0f; x += 0.0137f) {
    const double want = std::ldexp(std::exp(static_cast<double>(x)), 40);
    const double got = static_cast<double>(truncation_weight(x, 0.0f, 1.0f));
    EXPECT_NEAR(got, want, want * 4e-7 + 1.0) << x;
  }
  EXPECT_EQ(truncation_weight(0.0f, 0.0f, 1.0f), uint64_t{1} << 40);
  EXPECT_EQ(truncation_weight(-30.0f, 0.0f, 1.0f), 0u);
  EXPECT_EQ(truncation_weight(NAN, 0.0f, 1.0f), 0u);
  EXPECT_EQ(truncation_weight(-INFINITY, 0.0f, 1.0f), 0u);
  EXPECT_GT(order_key(1.0f, 5), order_key(-1.0f, 0));
  EXPECT_GT(order_key(1.0f, 4), order_key(1.0f, 5));      // equal logits: the lower id first
  EXPECT_GT(order_key(-INFINITY, 0), order_key(NAN, 9));  // NaN ranks as -inf
  EXPECT_EQ(order_key(-0.0f, 3), order_key(0.0f, 3));
  EXPECT_EQ(top_p_target(10, 0.5f), 5u);
  EXPECT_EQ(top_p_target(10, 0.55f), 6u);
}

// Plain tempered draws are Gumbel-max draws keyed by (seed, draw number): a decode that skips
// the prefill's draw continues the same sequence, and T scales the distribution.
TEST(Sampler, PlainTemperatureDrawsContinueAcrossSkipAndFollowTheTemperature) {
  SamplingParams p;
  p.temperature = 0.5f;
  p.seed = 7;
  Sampler whole(p), prefill(p), decode(p);
  decode.skip(1);
  for (int i = 0; i < 50; ++i) {
    auto a = logits(), b = logits();
    const int32_t t = whole.sample(a, {}).token;
    if (i == 0) {
      EXPECT_EQ(prefill.sample(b, {}).token, t);
    } else {
      EXPECT_EQ(decode.sample(b, {}).token, t) << "draw " << i;
    }
  }
  std::map<int32_t, int> counts;
  Sampler s(p);
  for (int i = 0; i < 20000; ++i) {
    auto l = logits();
    counts[s.sample(l, {}, false).token]++;
  }
  double z = 0;
  for (float x : logits()) z += std::exp(x / 0.5);
  for (int32_t t = 0; t < 5; ++t)
    EXPECT_NEAR(counts[t] / 20000.0, std::exp(logits()[static_cast<size_t>(t)] / 0.5) / z, 0.015) << t;
}

// The uniform behind a Gumbel key stays inside (0, 1) at both ends of its bits, so every key is
// finite: no token can win whatever its logit.
TEST(Sampler, GumbelKeysAreFiniteAtTheExtremes) {
  for (uint64_t bits : {uint64_t{0}, ~uint64_t{0}, uint64_t{1} << 63, (uint64_t{1} << 41) - 1}) {
    const float u = gumbel_uniform_from_bits(bits);
    EXPECT_GT(u, 0.0f) << bits;
    EXPECT_LT(u, 1.0f) << bits;
    EXPECT_TRUE(std::isfinite(-std::log(-std::log(u)))) << bits;
  }
  // Over a large vocabulary and many draws, the winner is always among the largest logits: one
  // logit 40 above the rest (at T = 1 the rest together have probability ~1e-13).
  std::vector<float> l(152064, 0.0f);
  l[777] = 40.0f;
  for (uint64_t counter = 0; counter < 50; ++counter) {
    int32_t best = -1;
    float best_key = -INFINITY;
    for (size_t i = 0; i < l.size(); ++i) {
      const float k = gumbel_key(l[i], 1.0f, 5, counter, static_cast<uint32_t>(i));
      ASSERT_TRUE(std::isfinite(k)) << i;
      if (k > best_key) {
        best_key = k;
        best = static_cast<int32_t>(i);
      }
    }
    EXPECT_EQ(best, 777) << "draw " << counter;
  }
}

TEST(Sampler, PenaltiesLowerRepeatedTokens) {
  SamplingParams p;
  p.frequency_penalty = 1.0f;
  Sampler s(p);
  auto l = logits();
  std::vector<int32_t> history = {1, 1};
  EXPECT_EQ(s.sample(l, history).token, 4);  // 3 - 2 = 1 < 2.5
  SamplingParams r;
  r.repetition_penalty = 2.0f;
  Sampler s2(r);
  auto l2 = logits();
  std::vector<int32_t> h2 = {1};
  EXPECT_EQ(s2.sample(l2, h2).token, 4);  // 3 / 2 = 1.5 < 2.5
}

TEST(Sampler, LogitBiasIsAddedBeforePenaltiesAndLogprobs) {
  // logits 1, 3, 2, -1, 2.5: +2 on token 2 makes it the largest (4).
  SamplingParams p;
  p.logit_bias = {{2, 2.0f}, {4, -100.0f}};
  EXPECT_FALSE(Sampler(p).device_drawable());  // biases alone send the row to the host
  EXPECT_TRUE(Sampler(SamplingParams{}).device_drawable());
  p.top_logprobs = 2;
  Sampler s(p);
  auto l = logits();
  SampleResult r = s.sample(l, {});
  EXPECT_EQ(r.token, 2);
  double z = std::exp(1.0) + std::exp(3.0) + std::exp(4.0) + std::exp(-1.0) + std::exp(-97.5);
  EXPECT_NEAR(r.logprob, 4.0 - std::log(z), 1e-5);  // of the biased distribution
  ASSERT_EQ(r.top.size(), 2u);
  EXPECT_EQ(r.top[1].token, 1);
  // The bias comes first: token 2's 2 + 3 = 5 is then halved by the repetition penalty to 2.5,
  // below token 1's 3. The other way round, 2 / 2 + 3 = 4 would win.
  p = {};
  p.logit_bias = {{2, 3.0f}};
  p.repetition_penalty = 2.0f;
  Sampler s2(p);
  auto l2 = logits();
  std::vector<int32_t> history = {2};
  EXPECT_EQ(s2.sample(l2, history).token, 1);
  // A tempered draw with +100 on one token always takes it.
  p = {};
  p.temperature = 1.0f;
  p.seed = 7;
  p.logit_bias = {{3, 100.0f}};
  Sampler s3(p);
  for (int i = 0; i < 50; ++i) {
    auto l3 = logits();
    EXPECT_EQ(s3.sample(l3, {}).token, 3);
  }
}

TEST(Sampler, ValidateNamesTheBadField) {
  SamplingParams p;
  p.top_p = 0.0f;
  EXPECT_NE(p.validate().message().find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_NE(p.validate().message().find("temperature"), std::string::npos);
  p = {};
  p.top_logprobs = 21;
  EXPECT_FALSE(p.validate().ok());
  p = {};
  p.logit_bias = {{5, 100.5f}};
  EXPECT_NE(p.validate().message().find("logit_bias 100.5 for token 5"), std::string::npos);
  p.logit_bias = {{5, 1.0f}, {5, 2.0f}};
  EXPECT_NE(p.validate().message().find("not strictly ascending"), std::string::npos);
  p.logit_bias = {{-1, 1.0f}};
  EXPECT_NE(p.validate().message().find("negative token id"), std::string::npos);
  p.logit_bias = {{1, -100.0f}, {9, 100.0f}};
  EXPECT_TRUE(p.validate().ok());
  EXPECT_TRUE(SamplingParams{}.validate().ok());
}

}  // namespace
}  // namespace pdserve

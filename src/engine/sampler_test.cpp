#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

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
  EXPECT_TRUE(SamplingParams{}.validate().ok());
}

}  // namespace
}  // namespace pdserve

#include "bench/workload.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <sstream>

namespace pdserve::bench {
namespace {

struct Moments {
  double mean = 0, var = 0;
};
Moments moments(const std::vector<double>& v) {
  Moments m;
  for (double x : v) m.mean += x;
  m.mean /= static_cast<double>(v.size());
  for (double x : v) m.var += (x - m.mean) * (x - m.mean);
  m.var /= static_cast<double>(v.size() - 1);
  return m;
}

std::vector<double> gaps(const std::vector<double>& t) {
  std::vector<double> g;
  double prev = 0;
  for (double x : t) {
    g.push_back(x - prev);
    prev = x;
  }
  return g;
}

TEST(LengthDist, ParseAndErrors) {
  auto d = parse_length_dist("128");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->kind, LengthDist::Kind::kFixed);
  EXPECT_EQ(d->a, 128);
  ASSERT_TRUE(parse_length_dist("uniform:10:20").ok());
  ASSERT_TRUE(parse_length_dist("normal:100:5.5").ok());
  for (const char* bad : {"", "abc", "uniform:5", "uniform:20:10", "normal:10", "normal:-1:2", "fixed:0",
                          "poisson:3", "fixed:1:2", "uniform:1:x"}) {
    auto r = parse_length_dist(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_NE(r.status().message().find("length"), std::string::npos);
    }
  }
}

TEST(LengthDist, FixedUniformNormalHaveTheirMoments) {
  std::mt19937_64 rng(42);
  const int n = 200000;
  auto draw = [&](const LengthDist& d) {
    std::vector<double> v;
    for (int i = 0; i < n; ++i) v.push_back(d.sample(rng));
    return v;
  };
  auto fixed = draw(*parse_length_dist("fixed:77"));
  EXPECT_EQ(*std::min_element(fixed.begin(), fixed.end()), 77);
  EXPECT_EQ(*std::max_element(fixed.begin(), fixed.end()), 77);

  auto uni = draw(*parse_length_dist("uniform:100:300"));
  EXPECT_EQ(*std::min_element(uni.begin(), uni.end()), 100);
  EXPECT_EQ(*std::max_element(uni.begin(), uni.end()), 300);
  Moments mu = moments(uni);
  EXPECT_NEAR(mu.mean, 200, 0.5);
  EXPECT_NEAR(mu.var, (201.0 * 201.0 - 1) / 12, 0.02 * 3367);  // discrete uniform variance

  auto nor = draw(*parse_length_dist("normal:500:50"));
  Moments mn = moments(nor);
  EXPECT_NEAR(mn.mean, 500, 0.5);
  EXPECT_NEAR(std::sqrt(mn.var), 50, 0.5);
  // about 68.3 % within one standard deviation
  double within = static_cast<double>(std::count_if(nor.begin(), nor.end(),
                                                    [](double x) { return std::abs(x - 500) <= 50; })) /
                  n;
  EXPECT_NEAR(within, 0.683 + 0.008, 0.01);  // rounding to integers adds the boundary values

  auto clamped = draw(*parse_length_dist("normal:2:10"));
  EXPECT_GE(*std::min_element(clamped.begin(), clamped.end()), 1);
}

TEST(Samplers, GammaMoments) {
  std::mt19937_64 rng(7);
  for (double shape : {0.25, 1.0, 4.0}) {
    std::vector<double> v;
    for (int i = 0; i < 200000; ++i) v.push_back(sample_gamma(rng, shape, 2.0));
    Moments m = moments(v);
    EXPECT_NEAR(m.mean, shape * 2, 0.02 * shape * 2) << shape;
    EXPECT_NEAR(m.var, shape * 4, 0.05 * shape * 4) << shape;
  }
}

TEST(Arrivals, PoissonInterArrivalsAreExponential) {
  std::mt19937_64 rng(1);
  ArrivalProcess p;
  p.kind = ArrivalProcess::Kind::kPoisson;
  p.rate_rps = 5;
  auto t = generate_arrivals(p, 100000, 0, rng);
  ASSERT_EQ(t.size(), 100000u);
  EXPECT_TRUE(std::is_sorted(t.begin(), t.end()));
  auto g = gaps(t);
  Moments m = moments(g);
  EXPECT_NEAR(m.mean, 0.2, 0.003);
  EXPECT_NEAR(std::sqrt(m.var) / m.mean, 1.0, 0.02);  // CV of an exponential is 1
  // Kolmogorov-Smirnov against the exponential CDF; critical value at alpha = 0.01 is 1.63/sqrt(n).
  std::sort(g.begin(), g.end());
  double d = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    double cdf = 1 - std::exp(-5 * g[i]);
    d = std::max({d, std::abs(cdf - static_cast<double>(i) / g.size()),
                  std::abs(cdf - static_cast<double>(i + 1) / g.size())});
  }
  EXPECT_LT(d, 1.63 / std::sqrt(static_cast<double>(g.size())));
  // Counts in 1 s windows: Poisson, variance equal to the mean.
  std::vector<double> counts(static_cast<size_t>(t.back()) + 1, 0);
  for (double x : t) counts[static_cast<size_t>(x)] += 1;
  counts.pop_back();
  Moments mc = moments(counts);
  EXPECT_NEAR(mc.var / mc.mean, 1.0, 0.05);
}

TEST(Arrivals, GammaHasTheRequestedRateAndBurstiness) {
  for (double cv : {0.5, 2.0, 4.0}) {
    std::mt19937_64 rng(3);
    ArrivalProcess p;
    p.kind = ArrivalProcess::Kind::kGamma;
    p.rate_rps = 10;
    p.cv = cv;
    auto g = gaps(generate_arrivals(p, 200000, 0, rng));
    Moments m = moments(g);
    EXPECT_NEAR(m.mean, 0.1, 0.1 * 0.03) << cv;
    EXPECT_NEAR(std::sqrt(m.var) / m.mean, cv, cv * 0.05) << cv;
  }
}

TEST(Arrivals, ConstantAndLimits) {
  std::mt19937_64 rng(1);
  ArrivalProcess p;
  p.kind = ArrivalProcess::Kind::kConstant;
  p.rate_rps = 4;
  auto t = generate_arrivals(p, 0, 2.0, rng);
  ASSERT_EQ(t.size(), 8u);
  EXPECT_DOUBLE_EQ(t[1], 0.25);
  p.kind = ArrivalProcess::Kind::kPoisson;
  EXPECT_EQ(generate_arrivals(p, 10, 0, rng).size(), 10u);
  auto d = generate_arrivals(p, 0, 50, rng);
  EXPECT_LT(d.back(), 50);
  EXPECT_NEAR(static_cast<double>(d.size()), 200, 4 * std::sqrt(200.0));
}

TEST(Arrivals, TidalFollowsTheCurve) {
  std::mt19937_64 rng(5);
  ArrivalProcess p;
  p.kind = ArrivalProcess::Kind::kTidal;
  p.rate_rps = 50;
  p.period_s = 24;  // an hour per second
  const double days = 100;
  auto t = generate_arrivals(p, 0, p.period_s * days, rng);
  EXPECT_NEAR(static_cast<double>(t.size()) / (p.period_s * days), 50, 0.5);
  // Per-hour counts follow the curve's mean over that hour.
  auto curve = default_tidal_curve();
  std::vector<double> per_hour(24, 0);
  for (double x : t) per_hour[static_cast<size_t>(std::fmod(x, 24.0))] += 1;
  for (int h = 0; h < 24; ++h) {
    double expected = 0;
    for (int k = 0; k < 100; ++k) expected += tidal_factor(curve, (h + (k + 0.5) / 100) / 24) / 100;
    expected *= 50 * days;
    EXPECT_NEAR(per_hour[h], expected, 4 * std::sqrt(expected) + 0.01 * expected) << "hour " << h;
  }
  EXPECT_GT(per_hour[19], 4 * per_hour[4]);  // the evening peak vs the night trough
}

TEST(Scenarios, ParseMixAndErrors) {
  Scenario d;
  d.input = *parse_length_dist("100");
  auto s = parse_scenarios(
      R"([{"name": "chat", "rate": 2, "input": "normal:512:64", "output": 32, "system_tokens": 100},
                               {"name": "code", "arrival": "gamma", "cv": 3, "system_prompt": "You write code."}])",
      d);
  ASSERT_TRUE(s.ok()) << s.status().message();
  ASSERT_EQ(s->size(), 2u);
  EXPECT_EQ((*s)[0].arrival.rate_rps, 2);
  EXPECT_EQ((*s)[0].input.kind, LengthDist::Kind::kNormal);
  EXPECT_EQ((*s)[0].output.a, 32);
  EXPECT_EQ((*s)[0].system_prompt_tokens, 100);
  EXPECT_EQ((*s)[1].input.a, 100);  // the default
  EXPECT_EQ((*s)[1].arrival.kind, ArrivalProcess::Kind::kGamma);
  EXPECT_EQ((*s)[1].system_prompt, "You write code.");
  EXPECT_TRUE(parse_scenarios(R"({"scenarios": [{"name": "x"}]})", d).ok());
  auto bad = parse_scenarios(R"([{"name": "x", "rate": -1}])", d);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'rate'"), std::string::npos) << bad.status().message();
  auto unknown = parse_scenarios(R"([{"name": "x", "speed": 1}])", d);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("unknown field"), std::string::npos);
  EXPECT_FALSE(parse_scenarios("[", d).ok());
  EXPECT_FALSE(parse_scenarios("[]", d).ok());
  EXPECT_FALSE(parse_scenarios(R"([{"input": "uniform:3"}])", d).ok());
}

TEST(Plan, OpenLoopMixesScenariosByRate) {
  Scenario a, b;
  a.name = "a";
  a.arrival.rate_rps = 3;
  a.input = *parse_length_dist("10");
  b.name = "b";
  b.arrival.rate_rps = 1;
  b.input = *parse_length_dist("20");
  auto plan = plan_synthetic({a, b}, PlanOptions{.max_requests = 0, .duration_s = 2000, .seed = 9});
  ASSERT_TRUE(plan.ok());
  int64_t na = 0;
  for (const auto& r : *plan) na += r.scenario_idx == 0;
  EXPECT_NEAR(static_cast<double>(na) / plan->size(), 0.75, 0.02);
  EXPECT_TRUE(std::is_sorted(
      plan->begin(), plan->end(),
      [](const PlannedRequest& x, const PlannedRequest& y) { return x.arrival_s < y.arrival_s; }));
  for (size_t i = 0; i < plan->size(); ++i) EXPECT_EQ((*plan)[i].id, static_cast<int64_t>(i));
  // Same seed, same plan.
  auto again = plan_synthetic({a, b}, PlanOptions{.max_requests = 0, .duration_s = 2000, .seed = 9});
  ASSERT_EQ(again->size(), plan->size());
  EXPECT_EQ(again->back().arrival_s, plan->back().arrival_s);
  auto capped = plan_synthetic({a, b}, PlanOptions{.max_requests = 50, .duration_s = 0, .seed = 9});
  EXPECT_EQ(capped->size(), 50u);
}

TEST(Plan, ClosedLoopByWeight) {
  Scenario a, b;
  a.weight = 1;
  b.weight = 3;
  auto plan = plan_synthetic({a, b}, PlanOptions{.max_requests = 20000, .seed = 2, .closed_loop = true});
  ASSERT_TRUE(plan.ok());
  int64_t nb = 0;
  for (const auto& r : *plan) nb += r.scenario_idx == 1;
  EXPECT_NEAR(nb / 20000.0, 0.75, 0.015);
  EXPECT_FALSE(plan_synthetic({a}, PlanOptions{.closed_loop = true}).ok());
}

TEST(Trace, MooncakeGoodAndMalformed) {
  std::istringstream good(
      "{\"timestamp\": 1000, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 1]}\n"
      "\n"
      "{\"timestamp\": 3000, \"input_length\": 100, \"output_length\": 7}\n");
  auto t = parse_mooncake_trace(good, "t.jsonl");
  ASSERT_TRUE(t.ok()) << t.status().message();
  ASSERT_EQ(t->size(), 2u);
  EXPECT_DOUBLE_EQ((*t)[1].timestamp_s, 2.0);
  EXPECT_EQ((*t)[0].hash_ids, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ((*t)[1].output_tokens, 7);

  auto err = [](const std::string& text) {
    std::istringstream in(text);
    auto r = parse_mooncake_trace(in, "t.jsonl");
    return r.ok() ? std::string("ok") : r.status().message();
  };
  std::string line1 = "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n";
  EXPECT_EQ(err(line1 + "{\"timestamp\": 5, \"input_length\": 1}\n"),
            "t.jsonl:2: missing field 'output_length'");
  EXPECT_EQ(err(line1 + "not json\n"), "t.jsonl:2: not a JSON object");
  EXPECT_EQ(err(line1 + "{\"timestamp\": 1, \"input_length\": \"x\", \"output_length\": 1}\n"),
            "t.jsonl:2: 'input_length' must be a number >= 0");
  EXPECT_EQ(
      err(line1 + "{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [\"a\"]}\n"),
      "t.jsonl:2: 'hash_ids' must be an array of integers");
  EXPECT_EQ(err("{\"timestamp\": 9, \"input_length\": 1, \"output_length\": 1}\n" + line1),
            "t.jsonl:2: timestamps go backwards");
  EXPECT_EQ(err(""), "t.jsonl: no requests in the trace");
}

TEST(Trace, AzureGoodAndMalformed) {
  std::istringstream good(
      "TIMESTAMP,ContextTokens,GeneratedTokens\n"
      "2023-11-16 18:17:03.9799600,4808,10\n"
      "2023-11-16 18:17:04.0319600,3180,8\n"
      "2023-11-17 00:00:00,5,1\n");
  auto t = parse_azure_trace(good, "a.csv");
  ASSERT_TRUE(t.ok()) << t.status().message();
  ASSERT_EQ(t->size(), 3u);
  EXPECT_NEAR((*t)[1].timestamp_s, 0.052, 1e-6);
  EXPECT_NEAR((*t)[2].timestamp_s, 6 * 3600 - (17 * 60 + 3.97996), 1e-6);
  EXPECT_EQ((*t)[0].input_tokens, 4808);
  EXPECT_EQ((*t)[1].output_tokens, 8);

  auto err = [](const std::string& text) {
    std::istringstream in(text);
    auto r = parse_azure_trace(in, "a.csv");
    return r.ok() ? std::string("ok") : r.status().message();
  };
  const std::string h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  EXPECT_EQ(err("a,b,c\n1,2,3\n"), "a.csv:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens");
  EXPECT_EQ(err(h + "2023-11-16 18:17:03,5\n"), "a.csv:2: expected 3 columns, got 2");
  EXPECT_EQ(err(h + "2023-13-16 18:17:03,5,1\n"), "a.csv:2: bad TIMESTAMP '2023-13-16 18:17:03'");
  EXPECT_EQ(err(h + "2023-11-16 18:17:03,-5,1\n"), "a.csv:2: bad ContextTokens '-5'");
  EXPECT_EQ(err(h + "2023-11-16 18:17:03,5,x\n"), "a.csv:2: bad GeneratedTokens 'x'");
  EXPECT_EQ(err(h + "12.5,1,1\n3,1,1\n"), "a.csv:3: timestamps go backwards");
  EXPECT_EQ(err(""), "a.csv: empty file (expected a CSV header)");
  EXPECT_EQ(err(h), "a.csv: no requests in the trace");
}

TEST(Trace, ReplayScalesTimeAndLengths) {
  std::vector<TraceRecord> trace = {{0, 100, 10, {1, 2}}, {2, 50, 4, {}}, {4, 1000, 1, {}}, {6, 10, 10, {}}};
  TraceReplayOptions o;
  o.speedup = 2;
  o.input_scale = 0.5;
  o.output_scale = 2;
  o.max_input_tokens = 300;
  auto p = plan_trace(trace, o);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->size(), 4u);
  EXPECT_DOUBLE_EQ((*p)[1].arrival_s, 1.0);
  EXPECT_EQ((*p)[0].input_tokens, 50);
  EXPECT_EQ((*p)[0].output_tokens, 20);
  EXPECT_EQ((*p)[2].input_tokens, 300);  // clamped
  EXPECT_EQ((*p)[0].hash_ids, (std::vector<int64_t>{1, 2}));
  o.duration_s = 2.5;  // replay seconds: 0, 1, 2 fit
  EXPECT_EQ(plan_trace(trace, o)->size(), 3u);
  o.duration_s = 0;
  o.max_requests = 2;
  EXPECT_EQ(plan_trace(trace, o)->size(), 2u);
  o.max_requests = 0;
  o.start_s = 3;
  auto late = plan_trace(trace, o);
  ASSERT_EQ(late->size(), 2u);
  EXPECT_DOUBLE_EQ((*late)[0].arrival_s, 0);
  o.start_s = 100;
  EXPECT_FALSE(plan_trace(trace, o).ok());
}

}  // namespace
}  // namespace pdserve::bench

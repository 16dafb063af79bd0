#include "bench/stats.h"

#include <gtest/gtest.h>

namespace pdserve::bench {
namespace {

RequestRecord ok_record(double send, double first, double end, int32_t tokens) {
  RequestRecord r;
  r.send_s = send;
  r.first_token_s = first;
  r.end_s = end;
  r.output_tokens = tokens;
  r.num_chunks = tokens;
  r.usage_reported = true;
  r.planned_input_tokens = 10;
  r.http_status = 200;
  for (int32_t i = 0; i < tokens; ++i) {
    r.chunk_s.push_back(tokens > 1 ? first + (end - first) * i / (tokens - 1) : first);
  }
  return r;
}

TEST(Percentile, LinearInterpolationLikeNumpy) {
  std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(percentile(v, 50), 2.5);
  EXPECT_DOUBLE_EQ(percentile(v, 90), 3.7);
  EXPECT_DOUBLE_EQ(percentile(v, 100), 4);
  EXPECT_DOUBLE_EQ(percentile({}, 50), 0);
  EXPECT_DOUBLE_EQ(percentile({7}, 99), 7);
}

TEST(RequestRecord, Tpot) {
  RequestRecord r = ok_record(0, 0.1, 1.1, 11);
  EXPECT_DOUBLE_EQ(r.ttft_s(), 0.1);
  EXPECT_DOUBLE_EQ(r.e2e_s(), 1.1);
  EXPECT_NEAR(r.tpot_s(), 0.1, 1e-12);
  EXPECT_LT(ok_record(0, 0.1, 0.1, 1).tpot_s(), 0);
}

TEST(Slo, TtftObjectiveGrowsWithThePrompt) {
  const SloSpec slo{.ttft_ms = 100, .ttft_ms_per_token = 2};
  RequestRecord r = ok_record(0, 0.25, 1, 4);  // TTFT 250 ms
  r.prompt_tokens = 50;                        // objective 100 + 2 x 50 = 200 ms
  EXPECT_DOUBLE_EQ(slo.ttft_objective_ms(r), 200);
  EXPECT_FALSE(meets_ttft(r, slo));
  r.prompt_tokens = 100;  // 300 ms
  EXPECT_TRUE(meets_ttft(r, slo));
  r.prompt_tokens = -1;  // no usage: the planned 10 tokens, 120 ms
  EXPECT_DOUBLE_EQ(slo.ttft_objective_ms(r), 120);
  EXPECT_FALSE(meets_ttft(r, slo));
  EXPECT_DOUBLE_EQ(SloSpec{.ttft_ms_per_token = 2}.ttft_objective_ms(r), 0);  // no base: no objective
}

// A hand-made result set: 4 successes, 1 failure, 1 cancelled, 1 never sent.
TEST(Summarize, AttainmentAndGoodputOnAHandMadeSet) {
  std::vector<RequestRecord> rs;
  rs.push_back(ok_record(0.0, 0.10, 1.10, 11));  // TTFT 100 ms, TPOT 100 ms: meets both
  rs.push_back(ok_record(1.0, 1.30, 2.30, 11));  // TTFT 300 ms: misses TTFT
  rs.push_back(ok_record(2.0, 2.05, 4.05, 11));  // TPOT 200 ms: misses TPOT
  rs.push_back(ok_record(3.0, 3.20, 3.20, 1));   // one token: no TPOT, meets both
  RequestRecord err;
  err.send_s = 4.0;
  err.end_s = 5.0;
  err.error = "http_500";
  rs.push_back(err);
  RequestRecord cancelled;
  cancelled.send_s = 4.5;
  cancelled.error = "cancelled";
  rs.push_back(cancelled);
  RequestRecord not_sent;
  not_sent.error = "not_sent";
  rs.push_back(not_sent);

  Summary s = summarize(rs, SloSpec{.ttft_ms = 250, .tpot_ms = 150});
  EXPECT_EQ(s.num_requests, 5);
  EXPECT_EQ(s.num_ok, 4);
  EXPECT_EQ(s.num_errors, 1);
  EXPECT_EQ(s.num_cancelled, 1);
  EXPECT_EQ(s.num_not_sent, 1);
  EXPECT_EQ(s.errors_by_type.at("http_500"), 1);
  EXPECT_DOUBLE_EQ(s.duration_s, 5.0);
  EXPECT_DOUBLE_EQ(s.ttft_attainment, 3.0 / 5);  // all but the slow first token and the error
  EXPECT_DOUBLE_EQ(s.tpot_attainment, 3.0 / 5);  // all but the slow decode and the error
  EXPECT_DOUBLE_EQ(s.slo_attainment, 2.0 / 5);
  EXPECT_DOUBLE_EQ(s.goodput_rps, 2.0 / 5.0);
  EXPECT_DOUBLE_EQ(s.requests_per_s, 4.0 / 5.0);
  EXPECT_EQ(s.output_tokens, 34);
  EXPECT_EQ(s.input_tokens, 40);
  EXPECT_DOUBLE_EQ(s.output_tokens_per_s, 34 / 5.0);
  EXPECT_EQ(s.ttft_ms.count, 4);
  EXPECT_NEAR(s.ttft_ms.max, 300, 1e-9);
  EXPECT_NEAR(s.ttft_ms.min, 50, 1e-9);
  EXPECT_NEAR(s.ttft_ms.p50, 150, 1e-9);  // {50, 100, 200, 300}
  EXPECT_EQ(s.tpot_ms.count, 3);
  EXPECT_NEAR(s.tpot_ms.p50, 100, 1e-9);
  EXPECT_EQ(s.itl_ms.count, 30);
  EXPECT_NEAR(s.itl_ms.max, 200, 1e-9);
  EXPECT_EQ(s.e2e_ms.count, 4);
}

TEST(Summarize, NoSloMeansEverySuccessAttains) {
  std::vector<RequestRecord> rs = {ok_record(0, 1, 2, 3), ok_record(0, 5, 9, 3)};
  Summary s = summarize(rs, SloSpec{});
  EXPECT_DOUBLE_EQ(s.slo_attainment, 1.0);
  EXPECT_DOUBLE_EQ(s.goodput_rps, 2 / 9.0);
}

TEST(Summarize, UsageMismatchCounted) {
  RequestRecord r = ok_record(0, 1, 2, 3);
  r.output_tokens = 6;  // the server packed two tokens per chunk
  Summary s = summarize({r}, SloSpec{});
  EXPECT_EQ(s.usage_mismatches, 1);
}

TEST(Summarize, Empty) {
  Summary s = summarize({}, SloSpec{.ttft_ms = 1});
  EXPECT_EQ(s.num_requests, 0);
  EXPECT_DOUBLE_EQ(s.duration_s, 0);
  EXPECT_DOUBLE_EQ(s.slo_attainment, 0);
}

}  // namespace
}  // namespace pdserve::bench

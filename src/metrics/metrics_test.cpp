#include "metrics/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

namespace pdserve::metrics {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, CounterAndGaugeRender) {
  Registry r;
  r.counter("pdserve_things_total", "Things seen.").inc(3);
  r.counter("pdserve_things_total", "Things seen.").inc();
  Gauge& g = r.gauge("pdserve_level", "A level.");
  g.set(2.5);
  EXPECT_EQ(r.render(),
            "# HELP pdserve_things_total Things seen.\n# TYPE pdserve_things_total counter\n"
            "pdserve_things_total 4\n"
            "# HELP pdserve_level A level.\n# TYPE pdserve_level gauge\npdserve_level 2.5\n");
}

TEST(MetricsTest, LabelsAreEscapedAndGroupedInOneFamily) {
  Registry r;
  r.counter("pdserve_req_total", "Requests.", {{"code", "200"}}).inc();
  r.counter("pdserve_req_total", "Requests.", {{"code", "4\"0\\0\n"}}).inc(2);
  std::string s = r.render();
  EXPECT_THAT(s, HasSubstr("pdserve_req_total{code=\"200\"} 1\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_req_total{code=\"4\\\"0\\\\0\\n\"} 2\n"));
  EXPECT_EQ(s.find("# TYPE"), s.rfind("# TYPE"));  // one family header
}

TEST(MetricsTest, HistogramBucketsAreCumulative) {
  Registry r;
  const std::vector<double> bounds = {0.1, 1, 10};
  Histogram& h = r.histogram("pdserve_latency_seconds", "Latency.", bounds);
  h.observe(0.05);
  h.observe(0.1);  // on a bound: in that bucket
  h.observe(5);
  h.observe(100);
  std::string s = r.render();
  EXPECT_THAT(s, HasSubstr("# TYPE pdserve_latency_seconds histogram\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_latency_seconds_bucket{le=\"0.1\"} 2\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_latency_seconds_bucket{le=\"1\"} 2\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_latency_seconds_bucket{le=\"10\"} 3\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_latency_seconds_bucket{le=\"+Inf\"} 4\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_latency_seconds_sum 105.15\n"));
  EXPECT_THAT(s, HasSubstr("pdserve_latency_seconds_count 4\n"));
}

TEST(MetricsTest, CollectorsWriteAfterOwnFamilies) {
  Registry r;
  r.gauge("pdserve_a", "A.").set(1);
  r.add_collector([](TextWriter& w) {
    w.family("pdserve_b_total", "counter", "B with a\nnewline.");
    w.sample("pdserve_b_total", {{"reason", "stop"}}, 7);
  });
  std::string s = r.render();
  EXPECT_LT(s.find("pdserve_a 1"), s.find("pdserve_b_total{reason=\"stop\"} 7"));
  EXPECT_THAT(s, HasSubstr("# HELP pdserve_b_total B with a\\nnewline.\n"));
}

TEST(MetricsTest, ConcurrentUpdatesAreNotLost) {
  Registry r;
  Counter& c = r.counter("pdserve_n_total", "N.");
  const std::vector<double> bounds = exponential_buckets(1, 2, 4);
  Histogram& h = r.histogram("pdserve_h", "H.", bounds);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        c.inc();
        h.observe(3);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c.value(), 40000);
  EXPECT_EQ(h.snapshot().count, 40000u);
}

}  // namespace
}  // namespace pdserve::metrics

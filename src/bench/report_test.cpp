#include "bench/report.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

namespace pdserve::bench {
namespace {

TEST(Prometheus, ParseSamples) {
  auto m = parse_prometheus_text(
      "# HELP pdserve_x_total x\n# TYPE pdserve_x_total counter\npdserve_x_total 5\n"
      "pdserve_h_bucket{le=\"0.1\"} 3\npdserve_req_total{endpoint=\"/v1/a b\",status=\"200\"} 7 1700000000\n"
      "garbage line here\nnovalue\npdserve_g 1.5e3\r\n");
  EXPECT_EQ(m.size(), 4u);
  EXPECT_EQ(m.at("pdserve_x_total"), 5);
  EXPECT_EQ(m.at("pdserve_h_bucket{le=\"0.1\"}"), 3);
  EXPECT_EQ(m.at("pdserve_req_total{endpoint=\"/v1/a b\",status=\"200\"}"), 7);
  EXPECT_EQ(m.at("pdserve_g"), 1500);
}

TEST(Prometheus, CounterDeltas) {
  std::map<std::string, double> before = {
      {"a_total", 1}, {"h_sum", 2}, {"h_count", 2}, {"g", 5}, {"same_total", 3}};
  std::map<std::string, double> after = {{"a_total", 4},           {"h_sum", 2.5},
                                         {"h_count", 3},           {"g", 9},
                                         {"same_total", 3},        {"new_total{x=\"1\"}", 2},
                                         {"h_bucket{le=\"1\"}", 9}};
  auto d = counter_deltas(before, after);
  std::map<std::string, double> m(d.begin(), d.end());
  EXPECT_EQ(m.size(), 4u);
  EXPECT_EQ(m.at("a_total"), 3);
  EXPECT_EQ(m.at("h_sum"), 0.5);
  EXPECT_EQ(m.at("h_count"), 1);
  EXPECT_EQ(m.at("new_total{x=\"1\"}"), 2);
}

TEST(RequestBody, CompletionsAndChat) {
  BuiltPrompt p;
  p.system = "be brief";
  p.body = "the of and";
  BodyOptions o;
  o.model = "m";
  auto j = nlohmann::json::parse(make_request_body(o, p, 32, "chat"));
  EXPECT_EQ(j["model"], "m");
  EXPECT_EQ(j["prompt"], "be brief\nthe of and");
  EXPECT_EQ(j["max_tokens"], 32);
  EXPECT_EQ(j["stream"], true);
  EXPECT_EQ(j["stream_options"]["include_usage"], true);
  EXPECT_EQ(j["ignore_eos"], true);
  EXPECT_EQ(j["metadata"]["scenario"], "chat");
  o.api = Api::kChat;
  o.ignore_eos = false;
  o.scenario_metadata = false;
  o.extra_json = R"({"top_k": 5, "temperature": 0.7})";
  ASSERT_TRUE(validate_body_options(o).ok());
  j = nlohmann::json::parse(make_request_body(o, p, 8, "chat"));
  EXPECT_EQ(j["messages"].size(), 2u);
  EXPECT_EQ(j["messages"][0]["role"], "system");
  EXPECT_EQ(j["messages"][1]["content"], "the of and");
  EXPECT_FALSE(j.contains("ignore_eos"));
  EXPECT_FALSE(j.contains("metadata"));
  EXPECT_EQ(j["top_k"], 5);
  EXPECT_EQ(j["temperature"], 0.7);
  o.extra_json = "[1]";
  EXPECT_FALSE(validate_body_options(o).ok());
}

TEST(RequestBody, ServerAnswers) {
  EXPECT_EQ(*first_model_id(R"({"object":"list","data":[{"id":"smol"}]})"), "smol");
  EXPECT_FALSE(first_model_id(R"({"data":[]})").ok());
  EXPECT_EQ(*tokenize_count(R"({"tokens":[1,2,3]})"), 3);
  EXPECT_EQ(*tokenize_count(R"({"count":4})"), 4);
  EXPECT_FALSE(tokenize_count("oops").ok());
  EXPECT_EQ(nlohmann::json::parse(tokenize_request_body("a \"q\"\n"))["content"], "a \"q\"\n");
}

TEST(Report, SummaryTableAndJson) {
  RequestRecord r;
  r.send_s = 0;
  r.first_token_s = 0.1;
  r.end_s = 0.5;
  r.output_tokens = 5;
  r.num_chunks = 5;
  r.chunk_s = {0.1, 0.2, 0.3, 0.4, 0.5};
  RequestRecord e;
  e.id = 1;
  e.send_s = 0.2;
  e.end_s = 0.3;
  e.error = "http_503";
  e.error_message = "loading";
  RunResult run;
  run.label = "run";
  run.records = {r, e};
  run.summary = summarize(run.records, SloSpec{.ttft_ms = 200, .tpot_ms = 0});
  std::string table = format_summary(run.summary, "run");
  EXPECT_NE(table.find("1 ok, 1 failed"), std::string::npos) << table;
  EXPECT_NE(table.find("error http_503: 1"), std::string::npos);
  EXPECT_NE(table.find("both 50.0 %"), std::string::npos) << table;
  Report rep;
  rep.runs.push_back(run);
  std::string path = ::testing::TempDir() + "bench_report_test.json";
  ASSERT_TRUE(write_json_report(path, rep).ok());
  std::ifstream in(path);
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["runs"][0]["requests"].size(), 2u);
  EXPECT_EQ(j["runs"][0]["requests"][1]["error"], "http_503");
  EXPECT_NEAR(j["runs"][0]["requests"][0]["ttft_ms"].get<double>(), 100, 1e-9);
  EXPECT_EQ(j["runs"][0]["requests"][0]["chunk_s"].size(), 5u);
  EXPECT_EQ(j["runs"][0]["summary"]["num_ok"], 1);
  std::remove(path.c_str());
  EXPECT_FALSE(write_json_report("/nonexistent-dir/x.json", rep).ok());
}

}  // namespace
}  // namespace pdserve::bench

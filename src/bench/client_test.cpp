#include "bench/client.h"

#include <gtest/gtest.h>

namespace pdserve::bench {
namespace {

TEST(BaseUrl, Parse) {
  auto e = parse_base_url("http://localhost:8123/v1/");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->host, "localhost");
  EXPECT_EQ(e->port, "8123");
  EXPECT_EQ(e->base_path, "/v1");
  auto d = parse_base_url("127.0.0.1");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->port, "80");
  EXPECT_EQ(d->base_path, "");
  EXPECT_FALSE(parse_base_url("https://x").ok());
  EXPECT_FALSE(parse_base_url("ftp://x").ok());
  EXPECT_FALSE(parse_base_url("http://x:port").ok());
  EXPECT_FALSE(parse_base_url("http://").ok());
}

TEST(StreamEvent, CompletionChunksUsageAndDone) {
  RequestRecord r;
  EXPECT_EQ(apply_stream_event(R"({"choices":[{"index":0,"text":"Hi"}]})", 1.0, true, r),
            StreamEvent::kContent);
  EXPECT_EQ(apply_stream_event(R"({"choices":[{"index":0,"text":""}]})", 1.5, true, r), StreamEvent::kOther);
  EXPECT_EQ(apply_stream_event(R"({"choices":[{"index":0,"text":" there"}]})", 2.0, true, r),
            StreamEvent::kContent);
  EXPECT_EQ(r.first_token_s, 1.0);
  EXPECT_EQ(r.num_chunks, 2);
  EXPECT_EQ(r.output_tokens, 2);  // counted until usage arrives
  EXPECT_EQ(r.chunk_s, (std::vector<double>{1.0, 2.0}));
  EXPECT_EQ(
      apply_stream_event(R"({"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}})", 2.1, true, r),
      StreamEvent::kUsage);
  EXPECT_EQ(r.output_tokens, 3);
  EXPECT_EQ(r.prompt_tokens, 7);
  EXPECT_TRUE(r.usage_reported);
  EXPECT_EQ(apply_stream_event("[DONE]", 2.2, true, r), StreamEvent::kDone);
  EXPECT_TRUE(r.ok());
}

TEST(StreamEvent, ChatDeltasRoleOnlyChunkIsNotAToken) {
  RequestRecord r;
  EXPECT_EQ(apply_stream_event(R"({"choices":[{"delta":{"role":"assistant"}}]})", 0.5, false, r),
            StreamEvent::kOther);
  EXPECT_LT(r.first_token_s, 0);
  EXPECT_EQ(apply_stream_event(R"({"choices":[{"delta":{"content":"x"}}],"usage":null})", 0.7, false, r),
            StreamEvent::kContent);
  EXPECT_EQ(r.first_token_s, 0.7);
  EXPECT_TRUE(r.chunk_s.empty());  // not saved
  EXPECT_EQ(apply_stream_event(R"({"choices":[{"delta":{"content":"y"}}],"usage":{"completion_tokens":2}})",
                               0.8, false, r),
            StreamEvent::kContentAndUsage);
  EXPECT_EQ(r.output_tokens, 2);
}

TEST(StreamEvent, ErrorsAndMalformed) {
  RequestRecord r;
  EXPECT_EQ(apply_stream_event(R"({"error":{"message":"engine died","type":"server_error"}})", 1, true, r),
            StreamEvent::kError);
  EXPECT_EQ(r.error, "stream_error");
  EXPECT_EQ(r.error_message, "engine died");
  RequestRecord m;
  EXPECT_EQ(apply_stream_event("{not json", 1, true, m), StreamEvent::kMalformed);
}

TEST(LoadClient, SeveralServersTakeTheRequestsInTurn) {
  auto a = parse_base_url("http://127.0.0.1:1"), b = parse_base_url("http://127.0.0.1:2");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_FALSE(LoadClient::create(std::vector<Endpoint>{}).ok()) << "no server";
  auto c = LoadClient::create(std::vector<Endpoint>{*a, *b});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->num_endpoints(), 2u);
  EXPECT_EQ((*c)->endpoint().port, "1");
  EXPECT_EQ((*c)->get_from(2, "/metrics", 1).status().code(), StatusCode::kInvalidArgument)
      << "no third server";
  auto second = (*c)->get_from(1, "/metrics", 1);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find("127.0.0.1:2"), std::string::npos) << second.status().to_string();
  std::vector<PreparedRequest> reqs(5);
  for (auto& q : reqs) q.path = "/v1/completions";
  std::atomic<bool> stop{false};
  auto records = (*c)->run(reqs, RunOptions{}, stop, nullptr);
  ASSERT_EQ(records.size(), 5u);
  for (size_t i = 0; i < records.size(); ++i) {
    EXPECT_EQ(records[i].endpoint, static_cast<int32_t>(i % 2)) << "request " << i;
    EXPECT_EQ(records[i].error, "connect") << "request " << i;
  }
}

TEST(LoadClient, UnreachableServerIsAConnectError) {
  auto e = parse_base_url("http://127.0.0.1:1");
  auto c = LoadClient::create(*e);
  ASSERT_TRUE(c.ok());
  auto r = (*c)->get("/health", 2);
  EXPECT_FALSE(r.ok());
  std::vector<PreparedRequest> reqs(2);
  for (auto& q : reqs) q.path = "/v1/completions";
  std::atomic<bool> stop{false};
  auto records = (*c)->run(reqs, RunOptions{}, stop, nullptr);
  ASSERT_EQ(records.size(), 2u);
  for (const auto& rec : records) EXPECT_EQ(rec.error, "connect") << rec.error_message;
}

}  // namespace
}  // namespace pdserve::bench

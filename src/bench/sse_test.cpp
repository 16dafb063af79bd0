#include "bench/sse.h"

#include <gtest/gtest.h>

namespace pdserve::bench {
namespace {

std::vector<std::string> feed_all(SseParser& p, const std::vector<std::string>& pieces) {
  std::vector<std::string> events;
  for (const auto& piece : pieces) p.feed(piece, events);
  return events;
}

TEST(SseParser, EventsAndDone) {
  SseParser p;
  auto e = feed_all(p, {"data: {\"a\":1}\n\ndata: [DONE]\n\n"});
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[0], "{\"a\":1}");
  EXPECT_EQ(e[1], "[DONE]");
}

TEST(SseParser, SplitAtEveryByte) {
  const std::string stream =
      "data: one\r\n\r\n: keep-alive\r\n\r\ndata: two\r\ndata: three\r\n\r\ndata:[DONE]\r\n\r\n";
  SseParser p;
  std::vector<std::string> events;
  for (char c : stream) p.feed(std::string_view(&c, 1), events);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0], "one");
  EXPECT_EQ(events[1], "two\nthree");
  EXPECT_EQ(events[2], "[DONE]");
  EXPECT_EQ(p.num_pending_bytes(), 0u);
}

TEST(SseParser, CrOnlyLineEndsAndCrLfSplitAcrossPieces) {
  SseParser p;
  auto e = feed_all(p, {"data: a\r", "\n\r", "\ndata: b\r\r"});
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[0], "a");
  EXPECT_EQ(e[1], "b");
}

TEST(SseParser, CommentsAndOtherFieldsIgnored) {
  SseParser p;
  auto e = feed_all(p, {": ping\n\nevent: message\nid: 7\nretry: 10\ndata: x\n\n", ":only a comment\n\n"});
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0], "x");
}

TEST(SseParser, DataWithoutSpaceAndEmptyData) {
  SseParser p;
  auto e = feed_all(p, {"data:x\n\ndata\n\ndata:  two spaces\n\n"});
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0], "x");
  EXPECT_EQ(e[1], "");
  EXPECT_EQ(e[2], " two spaces");
}

TEST(SseParser, FinishDispatchesAnUnterminatedEvent) {
  SseParser p;
  auto e = feed_all(p, {"data: last"});
  EXPECT_TRUE(e.empty());
  EXPECT_EQ(p.num_pending_bytes(), 10u);
  p.finish(e);
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0], "last");
}

TEST(SseParser, SplitInsideAJsonPayload) {
  SseParser p;
  auto e = feed_all(p, {"data: {\"choices\":[{\"te", "xt\":\"hi\"}]}\n", "\n"});
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0], "{\"choices\":[{\"text\":\"hi\"}]}");
}

}  // namespace
}  // namespace pdserve::bench

#include "bench/prompt.h"

#include <gtest/gtest.h>

namespace pdserve::bench {
namespace {

// A counter that is not one token per word: words of more than 4 letters count two tokens.
StatusOr<int32_t> count_long_words_twice(const std::string& text) {
  int32_t n = 0;
  size_t len = 0;
  for (size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == ' ' || text[i] == '\n') {
      if (len > 0) n += len > 4 ? 2 : 1;
      len = 0;
    } else {
      ++len;
    }
  }
  return n;
}

TEST(PromptBuilder, ExactLengthWithWords) {
  PromptBuilder b(count_words, 16);
  PlannedRequest r;
  r.input_tokens = 100;
  r.seed = 5;
  auto p = b.build("", r);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->exact);
  EXPECT_EQ(*count_words(p->completion_prompt()), 100);
  // Deterministic.
  EXPECT_EQ(b.build("", r)->body, p->body);
  r.seed = 6;
  EXPECT_NE(b.build("", r)->body, p->body);
}

TEST(PromptBuilder, ExactLengthWithAnUnevenCounter) {
  PromptBuilder b(count_long_words_twice, 16);
  int32_t exact = 0;
  for (int32_t n : {2, 3, 4, 17, 100, 513, 2000}) {
    PlannedRequest r;
    r.input_tokens = n;
    r.seed = static_cast<uint64_t>(n);
    auto p = b.build("", r);
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(*count_long_words_twice(p->completion_prompt()), p->tokens);
    EXPECT_EQ(p->tokens, n);
    exact += p->exact;
  }
  EXPECT_EQ(exact, 7);
}

TEST(PromptBuilder, SystemPromptCountsTowardsTheLength) {
  PromptBuilder b(count_words, 16);
  auto sys = b.system_prompt("chat", 30);
  ASSERT_TRUE(sys.ok());
  EXPECT_EQ(*count_words(*sys), 30);
  EXPECT_EQ(*b.system_prompt("chat", 30), *sys);
  EXPECT_NE(*b.system_prompt("code", 30), *sys);
  PlannedRequest r;
  r.input_tokens = 50;
  auto p = b.build(*sys, r);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->system, *sys);
  EXPECT_EQ(*count_words(p->completion_prompt()), 50);
  EXPECT_EQ(p->completion_prompt().substr(0, sys->size() + 1), *sys + "\n");
  r.input_tokens = 10;  // shorter than the system prompt: one word of body, not exact
  auto s = b.build(*sys, r);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->exact);
}

TEST(PromptBuilder, SharedHashIdsShareThePrefix) {
  PromptBuilder b(count_words, 8);
  PlannedRequest x, y;
  x.input_tokens = 30;
  x.hash_ids = {1, 2, 3, 4};
  x.seed = 1;
  y.input_tokens = 40;
  y.hash_ids = {1, 2, 9, 10, 11};
  y.seed = 2;
  auto px = b.build("", x), py = b.build("", y);
  ASSERT_TRUE(px.ok() && py.ok());
  auto words = [](const std::string& s) {
    std::vector<std::string> w;
    size_t i = 0;
    while (i < s.size()) {
      size_t j = s.find(' ', i);
      if (j == std::string::npos) j = s.size();
      w.push_back(s.substr(i, j - i));
      i = j + 1;
    }
    return w;
  };
  auto wx = words(px->body), wy = words(py->body);
  ASSERT_EQ(wx.size(), 30u);
  ASSERT_EQ(wy.size(), 40u);
  EXPECT_TRUE(std::equal(wx.begin(), wx.begin() + 16, wy.begin()));             // blocks 1 and 2
  EXPECT_FALSE(std::equal(wx.begin() + 16, wx.begin() + 24, wy.begin() + 16));  // 3 vs 9
}

TEST(PromptBuilder, CounterErrorsPropagate) {
  PromptBuilder b([](const std::string&) -> StatusOr<int32_t> { return unavailable("no tokenizer"); }, 8);
  PlannedRequest r;
  r.input_tokens = 5;
  auto p = b.build("", r);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().message(), "no tokenizer");
}

}  // namespace
}  // namespace pdserve::bench

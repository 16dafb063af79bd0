#include "engine/json_constraint.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "engine/test_model.h"

namespace pdserve {
namespace {

// How many bytes of `text` JsonPrefix takes before one is refused (text.size(): all of them).
size_t accepted_bytes(std::string_view text, JsonPrefix* out = nullptr) {
  JsonPrefix p;
  size_t i = 0;
  while (i < text.size() && p.advance(static_cast<uint8_t>(text[i]))) ++i;
  if (out) *out = p;
  return i;
}

bool is_json_object(std::string_view text) {
  JsonPrefix p;
  return accepted_bytes(text, &p) == text.size() && p.complete();
}

TEST(JsonPrefix, AcceptsObjectsOfEveryKindOfValue) {
  const char* documents[] = {
      "{}",
      " \n\t\r{ }",
      R"({"a":1})",
      R"({"a": [1, -0, -0.5e+10, 2E-3, 10.25, 0e0, true, false, null, "x", {}, [], [[]]]})",
      R"({"nested": {"deeper": {"list": [{"k": "v"}, [1, [2, [3]]]]}}, "empty": ""})",
      R"({"escapes": "\" \\ \/ \b \f \n \r \t \u00e9 \uFFFF \ud83d\ude00 \uD800\uDFFF"})",
      "{\"utf8\": \"\xc3\xa9 \xe0\xa0\x80 \xed\x9f\xbf \xef\xbf\xbf \xf0\x90\x80\x80 \xf4\x8f\xbf\xbf\"}",
      "{\"a\"  :  1  ,\n  \"b\"\t:\r\"c\"  }",
  };
  for (const char* d : documents) EXPECT_TRUE(is_json_object(d)) << d << " stops at " << accepted_bytes(d);
}

TEST(JsonPrefix, RefusesTheFirstByteThatLeavesNoJsonObject) {
  struct Case {
    std::string text;
    size_t refused_at;
  };
  const Case cases[] = {
      {"[1]", 0},  // the text must be an object
      {"\"a\"", 0},
      {"{'a': 1}", 1},
      {R"({"a" 1})", 5},
      {R"({"a":01})", 6},
      {R"({"a":1,})", 7},
      {R"({"a":1 "b":2})", 7},
      {R"({"a":1}})", 7},
      {R"({"a":1} )", 7},  // nothing after the object, whitespace neither
      {R"({"a":[1}})", 7},
      {R"({"a":{"b":1]})", 11},
      {R"({"a":tru})", 8},
      {R"({"a":nul1})", 8},
      {R"({"a":-})", 6},
      {R"({"a":1.})", 7},
      {R"({"a":1e})", 7},
      {R"({"a":1e+})", 8},
      {R"({"a":.5})", 5},
      {R"({"a":+1})", 5},
      {R"({"a":"\x"})", 7},
      {R"({"a":"\u12G4"})", 10},
      {R"({"a":"\udc00"})", 9},    // a lone low surrogate, known at its second digit
      {R"({"a":"\ud800x"})", 12},  // a high surrogate must be followed by a low one
      {R"({"a":"\ud800\u0041"})", 14},
      {R"({"a":"\ud800\udb00"})", 15},
      {"{\"a\":\"\x01\"}", 6},      // control characters must be escaped
      {"{\"a\":\"\xc0\x80\"}", 6},  // overlong
      {"{\"a\":\"\xe0\x80\x80\"}", 7},
      {"{\"a\":\"\xed\xa0\x80\"}", 7},      // a surrogate in UTF-8
      {"{\"a\":\"\xf4\x90\x80\x80\"}", 7},  // past U+10FFFF
      {"{\"a\":\"\xf5\"}", 6},
      {"{\"a\":\"\xc3(\"}", 7},
      {"{\"a\":\"\x80\"}", 6},
  };
  for (const Case& c : cases) EXPECT_EQ(accepted_bytes(c.text), c.refused_at) << c.text;
}

TEST(JsonPrefix, BoundsNestingAndWhitespaceRuns) {
  std::string deep = "{\"a\":";
  for (int i = 1; i < kMaxJsonDepth; ++i) deep += "[";
  EXPECT_EQ(accepted_bytes(deep + "1"), deep.size() + 1);
  EXPECT_EQ(accepted_bytes(deep + "["), deep.size());  // depth kMaxJsonDepth + 1
  EXPECT_EQ(accepted_bytes(deep + "{"), deep.size());

  const std::string run(kMaxJsonWhitespaceRun, ' ');
  EXPECT_TRUE(is_json_object(run + "{" + run + "\"a\"" + run + ":" + run + "1" + run + "}"));
  EXPECT_EQ(accepted_bytes(run + " {}"), run.size());
  EXPECT_EQ(accepted_bytes("{\"a\":1" + run + " }"), 6 + run.size());
  // Inside strings spaces are plain characters.
  EXPECT_TRUE(is_json_object("{\"a\":\"" + run + run + "\"}"));
}

TEST(JsonPrefix, EveryAcceptedPrefixOfTheTrickyPartsStillCompletes) {
  // Prefixes that stop mid-way through each multi-byte construct, and the bytes that complete them.
  struct Case {
    std::string prefix, completion;
  };
  const Case cases[] = {
      {R"({"a":"\ud83d)", R"(\ude00"})"},
      {R"({"a":"\ud83d\)", R"(udfff"})"},
      {R"({"a":"\u00)", R"(41"})"},
      {"{\"a\":\"\xf0\x9f", "\x98\x80\"}"},
      {R"({"a":-)", "0}"},
      {R"({"a":1.)", "5}"},
      {R"({"a":1e-)", "7}"},
      {R"({"a":f)", "alse}"},
      {R"({"a":[)", "]}"},
      {R"({"a":[)", "{}]}"},
  };
  for (const Case& c : cases) {
    const std::string text = c.prefix + c.completion;
    EXPECT_TRUE(is_json_object(text)) << text << " stops at " << accepted_bytes(text);
  }
}

TEST(JsonVocabulary, MasksTokensThatLeaveNoJsonObjectAndAllowsTheEndOnlyAfterOne) {
  const testing::TestModel* m = testing::default_test_model();
  ASSERT_NE(m, nullptr);
  const Tokenizer& tok = *m->tokenizer;
  JsonVocabulary vocab(tok);
  ASSERT_EQ(vocab.size(), tok.vocab_size());
  EXPECT_EQ(vocab.unsupported_reason(), "");  // byte-level BPE: every byte is a token
  const auto id = [&](std::string_view text) {
    std::vector<int32_t> ids = tok.encode(text, false, false);
    EXPECT_EQ(ids.size(), 1u) << text;
    return ids.at(0);
  };
  std::vector<float> logits(static_cast<size_t>(tok.vocab_size()) + 3, 0.0f);  // padded past the vocabulary
  JsonPrefix p;
  int32_t allowed = vocab.mask(p, logits);
  // At the start: whitespace and '{' (alone or followed by what may follow it).
  EXPECT_GT(allowed, 1);
  EXPECT_EQ(logits[static_cast<size_t>(id("{"))], 0.0f);
  EXPECT_EQ(logits[static_cast<size_t>(id("Hello"))], -INFINITY);
  EXPECT_EQ(logits[static_cast<size_t>(tok.eos_id())], -INFINITY);
  EXPECT_EQ(logits.back(), -INFINITY);
  for (int32_t t = 0; t < tok.vocab_size(); ++t) {
    if (logits[static_cast<size_t>(t)] == 0.0f) {
      JsonPrefix q = p;
      EXPECT_TRUE(vocab.advance(q, t)) << t;
    }
  }
  // Inside a string most text is allowed, control tokens never.
  ASSERT_TRUE(p.advance(std::string_view(R"({"name": ")")));
  std::fill(logits.begin(), logits.end(), 0.0f);
  allowed = vocab.mask(p, logits);
  EXPECT_GT(allowed, tok.vocab_size() / 2);
  EXPECT_EQ(logits[static_cast<size_t>(id("Hello"))], 0.0f);
  EXPECT_EQ(logits[static_cast<size_t>(tok.eos_id())], -INFINITY);
  for (int32_t t = 0; t < tok.vocab_size(); ++t) {
    if (tok.is_control(t)) {
      EXPECT_EQ(logits[static_cast<size_t>(t)], -INFINITY) << t;
    }
  }
  // Complete: the end-of-generation tokens alone.
  ASSERT_TRUE(p.advance(std::string_view("Ann\"}")));
  ASSERT_TRUE(p.complete());
  std::fill(logits.begin(), logits.end(), 0.0f);
  allowed = vocab.mask(p, logits);
  EXPECT_EQ(allowed, static_cast<int32_t>(tok.eog_ids().size()));
  for (int32_t t : tok.eog_ids()) EXPECT_EQ(logits[static_cast<size_t>(t)], 0.0f);
  JsonPrefix done = p;
  EXPECT_TRUE(vocab.advance(done, tok.eos_id()));
  EXPECT_FALSE(vocab.advance(done, id("}")));
  EXPECT_FALSE(vocab.advance(done, -1));
  EXPECT_FALSE(vocab.advance(done, tok.vocab_size()));
}

TEST(JsonVocabulary, TheTrieMasksWhatCheckingEachTokenWould) {
  const testing::TestModel* m = testing::default_test_model();
  ASSERT_NE(m, nullptr);
  const Tokenizer& tok = *m->tokenizer;
  JsonVocabulary vocab(tok);
  const std::string prefixes[] = {
      "",
      std::string(kMaxJsonWhitespaceRun - 1, ' '),
      "{",
      "{\"",
      "{\"na",
      "{\"name\"",
      "{\"name\":",
      "{\"name\": \"Whisk",
      "{\"a\": \"\\",
      "{\"a\": \"\\u00",
      "{\"a\": \"\\ud83d",
      "{\"a\": \"\\ud83d\\u",
      "{\"a\": \"\xc3",
      "{\"a\": \"\xf0\x9f",
      "{\"a\": 3",
      "{\"a\": 0",
      "{\"a\": -",
      "{\"a\": 1.5e",
      "{\"a\": tr",
      "{\"a\": [",
      "{\"a\": [1, ",
      "{\"a\": {}",
      "{\"a\": 1}",
      "{\"a\": 1" + std::string(kMaxJsonWhitespaceRun, ' '),
  };
  for (const std::string& prefix : prefixes) {
    JsonPrefix p;
    ASSERT_TRUE(p.advance(std::string_view(prefix))) << prefix;
    std::vector<float> logits(static_cast<size_t>(tok.vocab_size()), 1.0f);
    const int32_t allowed = vocab.mask(p, logits);
    int32_t expected = 0;
    for (int32_t t = 0; t < tok.vocab_size(); ++t) {
      JsonPrefix q = p;
      const bool ok = vocab.advance(q, t);
      expected += ok ? 1 : 0;
      ASSERT_EQ(logits[static_cast<size_t>(t)], ok ? 1.0f : -INFINITY)
          << "after '" << prefix << "', token " << t;
    }
    EXPECT_EQ(allowed, expected) << prefix;
    EXPECT_GT(allowed, 0) << prefix;
  }
}

}  // namespace
}  // namespace pdserve

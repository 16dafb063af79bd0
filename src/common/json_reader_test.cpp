#include "common/json_reader.h"

#include <gtest/gtest.h>

#include <string>

namespace pdserve {
namespace {

TEST(JsonReader, ReadsEveryKindOfValue) {
  auto v = parse_json(R"( {"a": [1, -2, 3.5, 1e3, -0.0], "b": {"c": "x\"y\u00e9\ud83d\ude00\n"}, "t": true,
                        "f": false, "n": null, "big": 18446744073709551616, "max": 9223372036854775807} )",
                      "test");
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  ASSERT_EQ(v->type, JsonValue::Type::kObject);
  const JsonValue* a = v->find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->array.size(), 5u);
  EXPECT_TRUE(a->array[0].is_integer);
  EXPECT_EQ(a->array[1].integer, -2);
  EXPECT_FALSE(a->array[2].is_integer);
  EXPECT_DOUBLE_EQ(a->array[2].number, 3.5);
  EXPECT_DOUBLE_EQ(a->array[3].number, 1000.0);
  EXPECT_FALSE(a->array[3].is_integer) << "an exponent makes a float";
  EXPECT_EQ(v->find("b")->find("c")->string, "x\"y\u00e9\U0001F600\n");
  EXPECT_TRUE(v->find("t")->boolean);
  EXPECT_EQ(v->find("f")->type, JsonValue::Type::kBool);
  EXPECT_EQ(v->find("n")->type, JsonValue::Type::kNull);
  EXPECT_FALSE(v->find("big")->is_integer) << "past int64: a double only";
  EXPECT_EQ(v->find("max")->integer, 9223372036854775807);
  EXPECT_EQ(v->find("missing"), nullptr);
  EXPECT_EQ(v->object[0].key, "a") << "members keep their order";
}

TEST(JsonReader, RefusesWhatIsNotJsonWithTheOffset) {
  struct Case {
    const char* text;
    const char* says;
  };
  const Case cases[] = {
      {"", "a value is missing"},
      {"{\"a\": 1,}", "an object key"},
      {"[1, 2", "not closed"},
      {"[1 2]", "',' or ']'"},
      {"{\"a\" 1}", "':' is missing"},
      {"{\"a\": 1, \"a\": 2}", "appears twice"},
      {"\"abc", "not closed"},
      {"\"a\tb\"", "control character"},
      {"\"\\x\"", "unknown escape"},
      {"\"\\ud800\"", "low half"},
      {"\"\\udc00\"", "lone low surrogate"},
      {"\"\\u12\"", "4 hex digits"},
      {"\"\xff\"", "UTF-8"},
      {"01", "text after the value"},
      {"1.", "decimal point"},
      {"1e", "exponent"},
      {"-", "no digits"},
      {"1e999", "out of range"},
      {"tru", "unexpected character"},
      {"{} x", "text after the value"},
      {"NaN", "unexpected character"},
  };
  for (const Case& c : cases) {
    auto v = parse_json(c.text, "doc.json");
    ASSERT_FALSE(v.ok()) << c.text;
    EXPECT_NE(v.status().message().find(c.says), std::string::npos) << c.text << ": " << v.status().message();
    EXPECT_EQ(v.status().message().rfind("doc.json: byte ", 0), 0u) << v.status().message();
  }
}

TEST(JsonReader, DeepNestingIsAnErrorNotACrash) {
  std::string deep(100000, '[');
  auto v = parse_json(deep, "deep");
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("64 deep"), std::string::npos);
  std::string ok(64, '[');
  ok += std::string(64, ']');
  EXPECT_TRUE(parse_json(ok, "ok").ok()) << "64 levels are allowed";
  EXPECT_FALSE(parse_json("[" + ok + "]", "65").ok()) << "65 are not";
}

TEST(JsonReader, TheNumberOfValuesIsBounded) {
  std::string many = "[";
  for (int i = 0; i < 1000; ++i) many += "0,";
  many += "0]";
  EXPECT_TRUE(parse_json(many, "a", 1001 + 1).ok());
  auto v = parse_json(many, "b", 1000);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("more values"), std::string::npos) << v.status().message();
}

}  // namespace
}  // namespace pdserve

#include "common/toml.h"

#include <gtest/gtest.h>

#include <cmath>

namespace pdserve {
namespace {

TomlValue parse_ok(std::string_view text) {
  StatusOr<TomlValue> v = parse_toml(text, "t.toml");
  EXPECT_TRUE(v.ok()) << v.status().to_string() << "\n" << text;
  return v.ok() ? std::move(v).value() : TomlValue{};
}

std::string parse_error(std::string_view text) {
  StatusOr<TomlValue> v = parse_toml(text, "t.toml");
  EXPECT_FALSE(v.ok()) << text;
  if (v.ok()) return "";
  EXPECT_EQ(v.status().code(), StatusCode::kInvalidArgument);
  return v.status().message();
}

TEST(Toml, ScalarsArraysAndTablesInFileOrder) {
  TomlValue r = parse_ok(R"(# a comment
b = "basic \"quoted\" \u00e9 \U0001F600\ttab"   # after a value
a = 'C:\literal'
"quoted key" = -42
int = 1_000_000
big = 9223372036854775807
neg = -9223372036854775808
f = 6.02e23
g = -0.5
h = +inf
yes = true
no = false
empty = []
nested = [[1, 2], ["x"], []]
multi = [
  1,   # one
  2,
]

[table]
k = "v"

[[arr]]
x = 1
[[arr]]
x = 2
)");
  ASSERT_EQ(r.table.size(), 16u);
  EXPECT_EQ(r.table[0].key, "b");  // file order, not sorted
  EXPECT_EQ(r.find("b")->string, "basic \"quoted\" \xC3\xA9 \xF0\x9F\x98\x80\ttab");
  EXPECT_EQ(r.find("a")->string, "C:\\literal");
  EXPECT_EQ(r.find("quoted key")->integer, -42);
  EXPECT_EQ(r.find("int")->integer, 1'000'000);
  EXPECT_EQ(r.find("big")->integer, INT64_MAX);
  EXPECT_EQ(r.find("neg")->integer, INT64_MIN);
  EXPECT_DOUBLE_EQ(r.find("f")->number, 6.02e23);
  EXPECT_EQ(r.find("f")->type, TomlValue::Type::kFloat);
  EXPECT_DOUBLE_EQ(r.find("g")->number, -0.5);
  EXPECT_TRUE(std::isinf(r.find("h")->number));
  EXPECT_TRUE(r.find("yes")->boolean);
  EXPECT_FALSE(r.find("no")->boolean);
  EXPECT_TRUE(r.find("empty")->array.empty());
  const TomlValue& nested = *r.find("nested");
  ASSERT_EQ(nested.array.size(), 3u);
  EXPECT_EQ(nested.array[0].array[1].integer, 2);
  EXPECT_EQ(nested.array[1].array[0].string, "x");
  EXPECT_EQ(r.find("multi")->array.size(), 2u);
  EXPECT_EQ(r.find("table")->find("k")->string, "v");
  const TomlValue& arr = *r.find("arr");
  EXPECT_TRUE(arr.is_table_array);
  ASSERT_EQ(arr.array.size(), 2u);
  EXPECT_EQ(arr.array[1].find("x")->integer, 2);
  EXPECT_EQ(arr.array[1].line, 25);
  EXPECT_EQ(r.find("quoted key")->line, 4);
  EXPECT_EQ(r.find("quoted key")->column, 16);
}

TEST(Toml, AByteOrderMarkIsSkipped) {
  TomlValue r = parse_ok(
      "\xEF\xBB\xBF"
      "a = 1\n");
  EXPECT_EQ(r.find("a")->integer, 1);
  EXPECT_EQ(r.find("a")->column, 5);
}

TEST(Toml, MultiLineStrings) {
  TomlValue r = parse_ok(
      "a = \"\"\"\nline one\n  line two\"\"\"\n"
      "b = '''\n[raw] \\n # not a comment\n'''\n"
      "c = \"\"\"joined \\\n    here\"\"\"\n"
      "d = \"\"\"ends with quotes\"\"\"\"\"\n"
      "e = \"crlf\"\r\nf = 1\r\n");
  EXPECT_EQ(r.find("a")->string, "line one\n  line two");
  EXPECT_EQ(r.find("b")->string, "[raw] \\n # not a comment\n");
  EXPECT_EQ(r.find("c")->string, "joined here");
  EXPECT_EQ(r.find("d")->string, "ends with quotes\"\"");
  EXPECT_EQ(r.find("e")->string, "crlf");
  EXPECT_EQ(r.find("f")->integer, 1);
}

TEST(Toml, ErrorsNameLineColumnAndWhat) {
  struct Case {
    std::string text;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"a = ", "t.toml:1:5: not valid TOML: expected a value"},
      {"a = 1\na = 2\n", "t.toml:2:1: not valid TOML: 'a' is already defined (line 1)"},
      {"[t]\n[t]\n", "t.toml:2:1: not valid TOML: 't' is already defined (line 1)"},
      {"t = 1\n[[t]]\n", "t.toml:2:1: not valid TOML: 't' is already defined (line 1), not as [[t]]"},
      {"a.b = 1\n", "t.toml:1:2: not valid TOML: dotted keys are not supported"},
      {"[a.b]\n", "t.toml:1:3: not valid TOML: dotted table names are not supported"},
      {"a = {x = 1}\n", "inline tables are not supported"},
      {"a = 0x1F\n", "'0x1F' is not a decimal number"},
      {"a = 1979-05-27\n", "looks like a date"},
      {"a = 12:30:00\n", "looks like a date"},
      {"a = 9223372036854775808\n", "is out of the 64-bit integer range"},
      {"a = 1e999\n", "is not a representable number"},
      {"a = 01\n", "has a leading zero"},
      {"a = 1__0\n", "has a misplaced '_'"},
      {"a = 1.\n", "'1.' is not a number"},
      {"a = .5\n", "is not a number"},
      {"a = hello\n", "'hello' is not a value (strings need quotes)"},
      {"a = \"open\n", "t.toml:1:5: not valid TOML: a string that never ends on its line"},
      {"a = \"\"\"open\n", "t.toml:1:5: not valid TOML: a string that never ends"},
      {"a = \"bad \\q\"\n", "unknown escape \\q"},
      {"a = \"\\uD800\"\n", "not a Unicode scalar"},
      {"a = \"\\u12\"\n", "\\u needs 4 hexadecimal digits"},
      {"a = [1, 2\n", "t.toml:1:5: not valid TOML: an array that never ends"},
      {"a = [1 2]\n", "expected ',' or ']' in the array"},
      {"a = 1 b = 2\n", "t.toml:1:7: not valid TOML: expected the end of the line"},
      {"a = 1\rb = 2\n", "a carriage return not followed by a line feed"},
      {std::string("a = \"x\0\"\n", 9), "t.toml:1:7: not valid TOML: control character U+0000"},
      {std::string("# \x01\n", 4), "control character U+0001"},
      {"a = \"\xC3\x28\"\n", "bytes that are not UTF-8"},
      {"a = \"\xED\xA0\x80\"\n", "bytes that are not UTF-8"},  // a surrogate
      {"[ ]\n", "t.toml:1:3: not valid TOML: expected a key"},
      {"[[a]\n", "expected ']]' to close"},
      {"= 1\n", "t.toml:1:1: not valid TOML: expected a key"},
      {"k \"v\"\n", "expected '=' after the key 'k'"},
      {"\"\"\"k\"\"\" = 1\n", "a key cannot be a multi-line string"},
      {"a = " + std::string(40, '[') + std::string(40, ']') + "\n", "arrays nested too deep"},
  };
  for (const Case& c : cases) {
    const std::string e = parse_error(c.text);
    EXPECT_NE(e.find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << e;
  }
}

}  // namespace
}  // namespace pdserve

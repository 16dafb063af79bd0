// Tests of the Jinja engine and chat templates: unit tests of the language subset, limits and
// error reporting, and the golden test that renders every case of
// tests/golden/chat_templates/fixtures.json (made by Python's jinja2,
// tools/reference/gen_chat_template_fixtures.py) and requires byte-identical output.
#include "tokenizer/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>

#include "common/test_paths.h"
#include "tokenizer/jinja.h"

namespace pdserve {
namespace {

using jinja::Dict;
using jinja::RenderOptions;
using jinja::Template;
using jinja::Value;
using Json = nlohmann::ordered_json;

Value to_value(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null: return Value::none();
    case Json::value_t::boolean: return Value::boolean(j.get<bool>());
    case Json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case Json::value_t::number_unsigned: return Value::integer(static_cast<int64_t>(j.get<uint64_t>()));
    case Json::value_t::number_float: return Value::number(j.get<double>());
    case Json::value_t::string: return Value::string(j.get<std::string>());
    case Json::value_t::array: {
      std::vector<Value> items;
      for (const auto& item : j) items.push_back(to_value(item));
      return Value::list(std::move(items));
    }
    case Json::value_t::object: {
      Dict d;
      for (const auto& [k, v] : j.items()) d.set(k, to_value(v));
      return Value::dict(std::move(d));
    }
    default: return Value();
  }
}

Dict to_dict(const Json& j) { return to_value(j).as_dict(); }

// Renders `source` with `vars` (a JSON object), or returns the error as "ERROR: message".
std::string render(std::string_view source, const Json& vars = Json::object(), RenderOptions options = {}) {
  auto t = Template::parse(source);
  if (!t.ok()) return "PARSE ERROR: " + t.status().message();
  auto out = t->render(to_dict(vars), options);
  if (!out.ok()) return "ERROR: " + out.status().message();
  return *out;
}

Status parse_status(std::string_view source) { return Template::parse(source).status(); }

// ---- lexing and whitespace control

TEST(JinjaTest, TextAndExpressions) {
  EXPECT_EQ(render("Hello {{ name }}!", {{"name", "World"}}), "Hello World!");
  EXPECT_EQ(render("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 2 ** 3 ** 2 }}"), "7 9 64");
  EXPECT_EQ(render("{# a comment #}x"), "x");
  EXPECT_EQ(render(""), "");
  EXPECT_EQ(render("{"), "{");
  EXPECT_EQ(render("a } b %} c #}"), "a } b %} c #}");
}

TEST(JinjaTest, TrimBlocksAndLstripBlocks) {
  EXPECT_EQ(render("{% if true %}\nyes\n{% endif %}\nafter"), "yes\nafter");
  EXPECT_EQ(render("  {% if true %}\n  x\n  {% endif %}\n"), "  x\n");
  EXPECT_EQ(render("a  {% if true %}b{% endif %}"), "a  b");  // lstrip only at line starts
  EXPECT_EQ(render("  {{ 'v' }}"), "  v");                    // never before {{
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");   // + keeps the indentation
  EXPECT_EQ(render("{% if true +%}\nx{% endif %}"), "\nx");   // + keeps the newline
}

TEST(JinjaTest, WhitespaceControlDash) {
  EXPECT_EQ(render("a \n {{- 'b' -}} \n c"), "abc");
  EXPECT_EQ(render("a\n{%- if true -%}\n b \n{%- endif %}"), "ab");
  EXPECT_EQ(render("x {#- c -#} y"), "xy");
}

TEST(JinjaTest, TrailingNewlineAndCrLf) {
  EXPECT_EQ(render("text\n"), "text");
  EXPECT_EQ(render("text\n\n"), "text\n");
  EXPECT_EQ(render("a\r\nb\rc\r\n"), "a\nb\nc");
}

TEST(JinjaTest, RawBlock) { EXPECT_EQ(render("{% raw %}{{ x }}{% endraw %}"), "{{ x }}"); }

TEST(JinjaTest, StringLiterals) {
  EXPECT_EQ(render(R"({{ 'it\'s' }} {{ "a\tb" }} {{ '\u00e9\x41' }} {{ 'a' "b" }})"), "it's a\tb éA ab");
  EXPECT_EQ(render(R"({{ '\q' }})"), "\\q");
}

// ---- values and printing

TEST(JinjaTest, PrintsLikePython) {
  EXPECT_EQ(render("{{ none }} {{ true }} {{ 1.0 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ 1e-5 }}"),
            "None True 1.0 1e+20 0.30000000000000004 1e-05");
  EXPECT_EQ(render("{{ [1, 'a', none, {'k': [true]}] }}"), "[1, 'a', None, {'k': [True]}]");
  EXPECT_EQ(render("{{ (1,) }} {{ ('a', 'b') }}"), "(1,) ('a', 'b')");
  EXPECT_EQ(render(R"({{ ["it's", 'say "x"', '\n'] }})"), R"(["it's", 'say "x"', '\n'])");
}

TEST(JinjaTest, UndefinedBehavesLikeJinja) {
  EXPECT_EQ(render("[{{ missing }}][{{ missing|length }}][{{ missing is defined }}]"), "[][0][False]");
  EXPECT_EQ(render("{{ d.missing }}|{{ d['missing'] }}", {{"d", Json::object()}}), "|");
  EXPECT_EQ(render("{{ missing.attr }}"),
            "ERROR: template error at line 1, column 11: 'missing' is undefined");
  EXPECT_EQ(render("{{ missing + 1 }}").rfind("ERROR: ", 0), 0u);
}

TEST(JinjaTest, Operators) {
  EXPECT_EQ(render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 'ab' * 2 }} {{ 'a' ~ 1 ~ none }}"),
            "3 -4 2 3.5 abab a1None");
  EXPECT_EQ(render("{{ none or 'x' }} {{ 0 and 1 }} {{ 1 < 2 < 3 }} {{ 'a' in 'cat' }} {{ 3 not in [1] }}"),
            "x 0 True True True");
  EXPECT_EQ(render("{{ 'y' if false }}|{{ 'a' if false else 'b' }}"), "|b");
  EXPECT_EQ(render("{{ 1 / 0 }}"), "ERROR: template error at line 1, column 4: division by zero");
  EXPECT_EQ(render("{{ 9223372036854775807 + 1 }}").rfind("ERROR: integer overflow", 0), 0u);
}

// ---- control structures

TEST(JinjaTest, LoopVariables) {
  EXPECT_EQ(render("{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
                   "{{ loop.length }}{{ loop.revindex }};{% endfor %}"),
            "10TrueFalse33;21FalseFalse32;32FalseTrue31;");
  EXPECT_EQ(
      render("{% for x in [1, 2, 3, 4] if x > 1 %}{{ x }}/{{ loop.index }}/{{ loop.length }} {% endfor %}"),
      "2/1/3 3/2/3 4/3/3 ");
  EXPECT_EQ(render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('a', 'b') "
                   "}};{% endfor %}"),
            "2a;13b;2a;");
  EXPECT_EQ(render("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }} {% endfor %}"), "a=1 b=2 ");
  EXPECT_EQ(
      render("{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}"
             "{% endif %}{{ x }}{% endfor %}"),
      "013");
}

TEST(JinjaTest, Scoping) {
  EXPECT_EQ(render("{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = 5 %}{{ x }}{% endfor %}{{ x }}"),
            "15151");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}{% endfor "
                   "%}{{ ns.n }}"),
            "6");
  EXPECT_EQ(render("{% macro m(a, b='d') %}{{ a }}{{ b }}{% endmacro %}{{ m(1) }}{{ m(2, b=3) }}"), "1d23");
  EXPECT_EQ(render("{% set x %}inner{% endset %}[{{ x }}]"), "[inner]");
  EXPECT_EQ(render("{% set x = 'bad' %}{% set x.y = 1 %}").rfind("ERROR: ", 0), 0u);
}

// ---- filters, tests, methods

TEST(JinjaTest, Filters) {
  EXPECT_EQ(render("{{ '  a  '|trim }}|{{ 'hello world'|title }}|{{ 'aBC'|capitalize }}|{{ 'x'|upper }}"),
            "a|Hello World|Abc|X");
  EXPECT_EQ(render("{{ [3, 1, 2]|sort|join(',') }} {{ [1, 2]|first }} {{ [1, 2]|last }} {{ 'abc'|length }}"),
            "1,2,3 1 2 3");
  EXPECT_EQ(render("{{ missing|default('d') }} {{ ''|d('e', true) }} {{ '3.7'|float }} {{ '42'|int + 1 }}"),
            "d e 3.7 43");
  EXPECT_EQ(render("{{ [1, 2, 3, 4]|select('even')|list }} {{ ['a']|map('upper')|list }}"), "[2, 4] ['A']");
  EXPECT_EQ(render("{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(' ') }}",
                   {{"msgs", Json::parse(R"([{"role":"user","content":"a"},{"role":"bot","content":"b"},
                                             {"role":"user","content":"c"}])")}}),
            "a c");
  EXPECT_EQ(render("{{ {'b': 1, 'a': [1, 'x', none]}|tojson }}"), R"({"b": 1, "a": [1, "x", null]})");
  EXPECT_EQ(render("{{ {'a': 1}|tojson(indent=2) }}"), "{\n  \"a\": 1\n}");
  EXPECT_EQ(render("{{ 'é'|tojson }}"), "\"é\"");
  EXPECT_EQ(render("{{ 'a\\nb'|indent(2, true) }}"), "  a\n  b");
  EXPECT_EQ(render("{{ 2.5|round }} {{ 3.14159|round(2) }} {{ -3|abs }}"), "2.0 3.14 3");
}

TEST(JinjaTest, Tests) {
  EXPECT_EQ(
      render("{{ none is none }}{{ 'a' is string }}{{ {} is mapping }}{{ [] is iterable }}{{ 1 is number }}"
             "{{ true is boolean }}{{ 3 is odd }}{{ x is not defined }}"),
      "TrueTrueTrueTrueTrueTrueTrueTrue");
}

TEST(JinjaTest, StringDictAndListMethods) {
  EXPECT_EQ(
      render("{{ ' a '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'abc'.startswith('ab') }}|{{ 'x'.upper() }}"),
      "a|['a', 'b']|True|X");
  EXPECT_EQ(render("{{ d.get('a') }} {{ d.get('z', 0) }} {{ d.keys()|list }} {{ d.items()|list }}",
                   {{"d", {{"a", 1}}}}),
            "1 0 ['a'] [('a', 1)]");
  EXPECT_EQ(render("{{ [1, 2, 1].count(1) }}"), "2");
}

TEST(JinjaTest, RaiseExceptionIsAStatusWithTheMessage) {
  auto t = Template::parse("before{{ raise_exception('Roles must alternate') }}after");
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  auto out = t->render({});
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(out.status().message(), "Roles must alternate");
}

TEST(JinjaTest, StrftimeNowUsesTheGivenClock) {
  RenderOptions options;
  options.now = std::tm{};
  options.now->tm_year = 2024 - 1900;
  options.now->tm_mon = 6;
  options.now->tm_mday = 26;
  EXPECT_EQ(render("{{ strftime_now('%d %b %Y %A') }}", Json::object(), options), "26 Jul 2024 Friday");
}

// ---- parse-time errors: named construct, line and column

TEST(JinjaTest, ParseErrorsNameTheConstructAndPosition) {
  Status s = parse_status("line one\n{% for x in y %}\nno end");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'endfor'"), std::string::npos) << s.message();

  s = parse_status("{{ x|groupby('a') }}");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_EQ(s.message(), "unsupported template construct at line 1, column 6: the filter 'groupby'");

  s = parse_status("ok\n  {{ x|nosuchfilter }}");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "template syntax error at line 2, column 8: No filter named 'nosuchfilter'.");

  s = parse_status("{% if x is nosuchtest %}{% endif %}");
  EXPECT_NE(s.message().find("No test named 'nosuchtest'"), std::string::npos);

  s = parse_status("{% include 'other.jinja' %}");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("'include'"), std::string::npos);

  s = parse_status("{% extends 'base' %}");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);

  s = parse_status("{{ 'a'.swapcase() }}");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("swapcase"), std::string::npos);

  s = parse_status("{% for x in y recursive %}{% endfor %}");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);

  s = parse_status("{% frobnicate %}");
  EXPECT_EQ(s.message(), "template syntax error at line 1, column 4: Encountered unknown tag 'frobnicate'.");

  s = parse_status("{% break %}");
  EXPECT_NE(s.message().find("outside of a loop"), std::string::npos);

  s = parse_status("{{ (1 + 2 }}");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);

  s = parse_status("{{ 'unterminated }}");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);

  s = parse_status("{# never closed");
  EXPECT_NE(s.message().find("Missing end of comment tag"), std::string::npos);

  s = parse_status("{{ cycler('a') }}");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
}

// ---- limits and robustness

TEST(JinjaTest, LimitsAreStatuses) {
  RenderOptions options;
  options.max_steps = 10000;
  auto out = render("{% for i in range(100000) %}{{ i }}{% endfor %}", Json::object(), options);
  EXPECT_EQ(out.rfind("ERROR: template render exceeded its budget", 0), 0u) << out.substr(0, 200);

  options = {};
  options.max_output_bytes = 1000;
  out = render("{% for i in range(1000) %}xx{% endfor %}", Json::object(), options);
  EXPECT_EQ(out.rfind("ERROR: template render exceeded its size limit", 0), 0u) << out.substr(0, 200);
  out = render("{{ 'x' * 100000 }}", Json::object(), options);
  EXPECT_EQ(out.rfind("ERROR: template render exceeded its size limit", 0), 0u) << out.substr(0, 200);

  // Quadratic string building is paid for by the step budget even when the output is small.
  out = render(
      "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ 'xxxxxxxxxx' %}"
      "{% endfor %}{{ ns.s|length }}");
  EXPECT_EQ(out.rfind("ERROR: template render exceeded its budget", 0), 0u) << out.substr(0, 200);

  out = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_EQ(out.rfind("ERROR: template macro calls nested deeper", 0), 0u) << out.substr(0, 200);

  out = render("{{ range(200000)|list|length }}");
  EXPECT_NE(out.find("Range too big"), std::string::npos);

  EXPECT_EQ(parse_status("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(parse_status("{{ " + std::string(5000, '-') + "1 }}").code(), StatusCode::kOutOfRange);
  std::string long_chain = "{{ 1";
  for (int i = 0; i < 100000; ++i) long_chain += " + 1";
  EXPECT_EQ(parse_status(long_chain + " }}").code(), StatusCode::kOutOfRange);
  std::string filters = "{{ 'x'";
  for (int i = 0; i < 100000; ++i) filters += "|trim";
  EXPECT_EQ(parse_status(filters + " }}").code(), StatusCode::kOutOfRange);
  std::string attrs = "{{ x";
  for (int i = 0; i < 100000; ++i) attrs += ".a";
  EXPECT_EQ(parse_status(attrs + " }}").code(), StatusCode::kOutOfRange);
  std::string conds = "{{ 1";
  for (int i = 0; i < 100000; ++i) conds += " if 1";
  EXPECT_EQ(parse_status(conds + " }}").code(), StatusCode::kOutOfRange);
  std::string nested;
  for (int i = 0; i < 1000; ++i) nested += "{% if true %}";
  EXPECT_EQ(parse_status(nested).code(), StatusCode::kOutOfRange);

  // A namespace that contains itself must not recurse forever when printed.
  out = render("{% set ns = namespace() %}{% set ns.self = ns %}{{ ns }}");
  EXPECT_EQ(out.rfind("ERROR: ", 0), 0u);
  out = render(
      "{% set ns = namespace(v=[]) %}{% for i in range(1000) %}{% set ns.v = [ns.v] %}{% endfor %}"
      "{{ ns.v|tojson }}");
  EXPECT_EQ(out.rfind("ERROR: ", 0), 0u);
}

TEST(JinjaTest, RandomTemplatesNeverCrash) {
  const std::vector<std::string> pieces = {
      "{{",       "}}",  "{%",     "%}",          "{#",   "#}",       "-",        "+",    " ",      "\n",
      "x",        "'s'", "\"",     "(",           ")",    "[",        "]",        "{",    "}",      "|",
      ".",        ",",   ":",      "1",           "2.5",  "for",      "in",       "if",   "else",   "endif",
      "endfor",   "set", "=",      "==",          "is",   "not",      "and",      "or",   "~",      "*",
      "**",       "/",   "//",     "%",           "loop", "messages", "range(3)", "trim", "tojson", "macro",
      "endmacro", "raw", "endraw", "namespace()", "\xff", "é",        "\\"};
  std::mt19937 rng(12345);
  const Json vars = {{"messages", Json::parse(R"([{"role":"user","content":"hi"}])")}, {"x", 3}};
  for (int iter = 0; iter < 3000; ++iter) {
    std::string source;
    const int n = static_cast<int>(rng() % 30);
    for (int i = 0; i < n; ++i) source += pieces[rng() % pieces.size()];
    auto t = Template::parse(source);
    if (!t.ok()) continue;
    RenderOptions options;
    options.max_steps = 100000;
    (void)t->render(to_dict(vars), options);
  }
  SUCCEED();
}

// ---- ChatTemplate API

TEST(ChatTemplateTest, RendersMessagesAndTools) {
  auto t = ChatTemplate::parse(
      "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.tool_calls is defined %}"
      "{{ m.tool_calls|tojson }}{% endif %}{% if m.name is defined %}({{ m.name }}){% endif %}{% endfor %}"
      "{% if tools is not none %}[{{ tools|length }} tools]{% endif %}{% if add_generation_prompt "
      "%}<assistant>{% endif %}"
      "{{ date_string }}");
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  ChatTemplateInputs in;
  in.bos_token = "<s>";
  in.messages.push_back({.role = "user", .content = "hi"});
  ChatMessage call;
  call.role = "assistant";
  call.content_value = Value::none();
  Dict function;
  function.set("name", Value::string("f"));
  function.set("arguments", Value::dict(Dict()));
  Dict tool_call;
  tool_call.set("function", Value::dict(function));
  call.tool_calls = Value::list({Value::dict(tool_call)});
  in.messages.push_back(call);
  in.messages.push_back({.role = "tool", .content = "42", .name = "f"});
  in.extra_variables.set("date_string", Value::string("today"));
  auto out = t->render(in);
  ASSERT_TRUE(out.ok()) << out.status().to_string();
  EXPECT_EQ(*out,
            "<s><user>hi<assistant>None[{\"function\": {\"name\": \"f\", \"arguments\": {}}}]<tool>42(f)"
            "<assistant>today");
  in.tools = Value::list({Value::dict(function)});
  in.add_generation_prompt = false;
  out = t->render(in);
  ASSERT_TRUE(out.ok());
  EXPECT_NE(out->find("[1 tools]"), std::string::npos);
  EXPECT_EQ(out->find("<assistant>today"), std::string::npos);
}

TEST(ChatTemplateTest, SmolLm2TemplateFromTheDefaultModel) {
  std::ifstream f(pdserve::testing::source_dir() +
                  "/tests/golden/chat_templates/smollm2-135m-instruct.jinja");
  std::stringstream ss;
  ss << f.rdbuf();
  auto t = ChatTemplate::parse(ss.str());
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  ChatTemplateInputs in;
  in.messages.push_back({.role = "user", .content = "Hello"});
  auto out = t->render(in);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(
      *out,
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
}

// ---- golden fixtures rendered by Python's jinja2

std::tm parse_now(const std::string& iso) {
  std::tm tm{};
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, s = 0;
  EXPECT_EQ(std::sscanf(iso.c_str(), "%d-%d-%dT%d:%d:%d", &y, &mo, &d, &h, &mi, &s), 6) << iso;
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = s;
  return tm;
}

// The ChatTemplateInputs that produce exactly `vars`, when they can.
std::optional<ChatTemplateInputs> to_chat_inputs(const Json& vars) {
  ChatTemplateInputs in;
  for (const auto& [key, value] : vars.items()) {
    if (key == "messages") {
      for (const auto& m : value) {
        ChatMessage msg;
        std::vector<std::string> keys;
        for (const auto& [k, v] : m.items()) keys.push_back(k);
        std::vector<std::string> expected_order;
        for (const char* k : {"role", "content", "name", "tool_calls", "tool_call_id"}) {
          if (m.contains(k)) expected_order.push_back(k);
        }
        if (keys != expected_order || !m.contains("role")) return std::nullopt;
        msg.role = m["role"].get<std::string>();
        if (!m.contains("content")) {
          msg.content_value = Value();  // no "content" key at all
        } else if (m["content"].is_string()) {
          msg.content = m["content"].get<std::string>();
        } else {
          msg.content_value = to_value(m["content"]);
        }
        if (m.contains("name")) msg.name = m["name"].get<std::string>();
        if (m.contains("tool_calls")) msg.tool_calls = to_value(m["tool_calls"]);
        if (m.contains("tool_call_id")) msg.tool_call_id = m["tool_call_id"].get<std::string>();
        in.messages.push_back(std::move(msg));
      }
    } else if (key == "tools") {
      if (!value.is_null()) in.tools = to_value(value);
    } else if (key == "documents") {
      if (!value.is_null()) return std::nullopt;
    } else if (key == "add_generation_prompt") {
      in.add_generation_prompt = value.get<bool>();
    } else if (key == "bos_token") {
      in.bos_token = value.get<std::string>();
    } else if (key == "eos_token") {
      in.eos_token = value.get<std::string>();
    } else {
      in.extra_variables.set(key, to_value(value));
    }
  }
  return in;
}

TEST(ChatTemplateGoldenTest, MatchesPythonJinja2) {
  const std::string dir = pdserve::testing::source_dir() + "/tests/golden/chat_templates/";
  std::ifstream f(dir + "fixtures.json");
  ASSERT_TRUE(f.good()) << "missing " << dir << "fixtures.json";
  const Json doc = Json::parse(f);
  const Json& cases = doc["cases"];
  ASSERT_GE(cases.size(), 40u);
  std::map<std::string, std::optional<ChatTemplate>> templates;
  int num_chat = 0;
  int num_chat_api = 0;
  for (const Json& c : cases) {
    const std::string name = c["name"].get<std::string>();
    SCOPED_TRACE(name);
    std::string source;
    if (c.contains("template")) {
      std::ifstream tf(dir + c["template"].get<std::string>());
      ASSERT_TRUE(tf.good()) << c["template"];
      std::stringstream ss;
      ss << tf.rdbuf();
      source = ss.str();
    } else {
      source = c["source"].get<std::string>();
    }
    auto parsed = ChatTemplate::parse(source);
    if (!parsed.ok()) {
      ADD_FAILURE() << name << ": " << parsed.status().to_string();
      continue;
    }
    RenderOptions options;
    options.now = parse_now(c["now"].get<std::string>());
    const Dict vars = to_dict(c["context"]);
    auto out = parsed->render_variables(vars, options);
    if (c.contains("expected")) {
      if (!out.ok()) {
        ADD_FAILURE() << name << ": " << out.status().to_string();
        continue;
      }
      EXPECT_EQ(*out, c["expected"].get<std::string>()) << name;
    } else {
      const Json& err = c["error"];
      if (out.ok()) {
        ADD_FAILURE() << name << ": rendered " << *out << " but jinja2 raised " << err.dump();
        continue;
      }
      if (err["type"] == "TemplateError") {  // raise_exception(): the exact message
        EXPECT_EQ(out.status().message(), err["message"].get<std::string>()) << name;
      }
    }
    if (c.value("chat", false)) {
      ++num_chat;
      // The same conversation through the ChatTemplateInputs API must render the same.
      if (auto in = to_chat_inputs(c["context"])) {
        ++num_chat_api;
        in->options = options;
        auto via_api = parsed->render(*in);
        EXPECT_EQ(via_api.ok(), out.ok()) << name;
        if (via_api.ok() != out.ok()) continue;
        if (out.ok()) {
          EXPECT_EQ(*via_api, *out) << name;
        } else {
          EXPECT_EQ(via_api.status().message(), out.status().message()) << name;
        }
      }
    }
  }
  EXPECT_GE(num_chat, 40);
  EXPECT_EQ(num_chat_api, num_chat);
}

}  // namespace
}  // namespace pdserve

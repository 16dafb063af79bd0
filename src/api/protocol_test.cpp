#include "api/protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace pdserve::api {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// ---- malformed requests, table-driven ----------------------------------------------------------

struct BadCase {
  const char* name;
  Endpoint endpoint;
  std::string body;
  int status;
  const char* message;  // a substring of the error message
  const char* param;    // expected param, "" for null
};

std::ostream& operator<<(std::ostream& os, const BadCase& c) { return os << c.name; }

std::optional<ApiError> parse_error(Endpoint endpoint, std::string_view body) {
  if (endpoint == Endpoint::kChatCompletions) {
    auto r = parse_chat_completion_request(body);
    if (r.ok()) return std::nullopt;
    return r.error();
  }
  auto r = parse_completion_request(body);
  if (r.ok()) return std::nullopt;
  return r.error();
}

constexpr Endpoint kChat = Endpoint::kChatCompletions;
constexpr Endpoint kCompl = Endpoint::kCompletions;
const std::string kMsgs = R"("messages":[{"role":"user","content":"hi"}])";

std::string chat(const std::string& extra) { return "{" + kMsgs + (extra.empty() ? "" : "," + extra) + "}"; }
std::string compl_(const std::string& extra) {
  return R"({"prompt":"hi")" + (extra.empty() ? std::string() : "," + extra) + "}";
}

const BadCase kBadCases[] = {
    {"empty_body", kChat, "", 400, "the request body is empty", ""},
    {"whitespace_body", kChat, "  \n ", 400, "the request body is empty", ""},
    {"truncated_json", kChat, R"({"messages": [)", 400, "not valid JSON", ""},
    {"json_position", kChat, R"({"model": "x",, })", 400, "line 1, column 15", ""},
    {"bare_word", kChat, "hello", 400, "not valid JSON", ""},
    {"trailing_garbage", kChat, chat("") + "x", 400, "not valid JSON", ""},
    {"invalid_utf8", kChat, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}", 400, "UTF-8", ""},
    {"array_body", kChat, "[1,2]", 400, "must be a JSON object, got array", ""},
    {"too_deep", kChat, std::string(100, '[') + std::string(100, ']'), 400, "deeper than 64 levels", ""},
    {"missing_messages", kChat, R"({"model":"m"})", 400, "'messages' is required", "messages"},
    {"messages_not_array", kChat, R"({"messages":"hi"})", 400,
     "'messages' must be an array of message objects, got string", "messages"},
    {"empty_messages", kChat, R"({"messages":[]})", 400, "'messages' must not be empty", "messages"},
    {"message_not_object", kChat, R"({"messages":[42]})", 400,
     "'messages[0]' must be a message object, got integer", "messages[0]"},
    {"missing_role", kChat, R"({"messages":[{"content":"hi"}]})", 400, "'messages[0].role' is required",
     "messages[0].role"},
    {"unknown_role", kChat, R"({"messages":[{"role":"wizard","content":"hi"}]})", 400, "got 'wizard'",
     "messages[0].role"},
    {"role_not_string", kChat, R"({"messages":[{"role":1,"content":"hi"}]})", 400,
     "'messages[0].role' must be a string, got integer", "messages[0].role"},
    {"missing_content", kChat, R"({"messages":[{"role":"user"}]})", 400,
     "'messages[0].content' is required for a message with role 'user'", "messages[0].content"},
    {"content_wrong_type", kChat, R"({"messages":[{"role":"user","content":5}]})", 400,
     "'messages[0].content' must be a string or an array of content parts, got integer",
     "messages[0].content"},
    {"image_part", kChat,
     R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]})", 400,
     "content parts of type 'image_url' are not supported", "messages[0].content[0].type"},
    {"part_without_text", kChat, R"({"messages":[{"role":"user","content":[{"type":"text"}]}]})", 400,
     "'messages[0].content[0].text' is required", "messages[0].content[0].text"},
    {"second_message_bad", kChat,
     R"({"messages":[{"role":"user","content":"a"},{"role":"user","content":null}]})", 400,
     "'messages[1].content' is required", "messages[1].content"},
    {"model_not_string", kChat, chat(R"("model":7)"), 400, "'model' must be a string, got integer", "model"},
    {"stream_not_bool", kChat, chat(R"("stream":"yes")"), 400, "'stream' must be a boolean, got string",
     "stream"},
    {"stream_options_without_stream", kChat, chat(R"("stream_options":{"include_usage":true})"), 400,
     "only allowed when 'stream' is true", "stream_options"},
    {"include_usage_not_bool", kChat, chat(R"("stream":true,"stream_options":{"include_usage":1})"), 400,
     "'stream_options.include_usage' must be a boolean", "stream_options.include_usage"},
    {"temperature_string", kChat, chat(R"("temperature":"hot")"), 400,
     "'temperature' must be a number, got string", "temperature"},
    {"temperature_too_high", kChat, chat(R"("temperature":2.5)"), 400,
     "'temperature' must be at least 0 and at most 2, got 2.5", "temperature"},
    {"top_p_zero", kChat, chat(R"("top_p":0)"), 400, "'top_p' must be greater than 0 and at most 1", "top_p"},
    {"min_p_negative", kChat, chat(R"("min_p":-0.1)"), 400, "'min_p' must be at least 0", "min_p"},
    {"presence_penalty_range", kChat, chat(R"("presence_penalty":3)"), 400,
     "'presence_penalty' must be at least -2", "presence_penalty"},
    {"frequency_penalty_type", kChat, chat(R"("frequency_penalty":[1])"), 400,
     "'frequency_penalty' must be a number, got array", "frequency_penalty"},
    {"max_tokens_zero", kChat, chat(R"("max_tokens":0)"), 400, "'max_tokens' must be at least 1, got 0",
     "max_tokens"},
    {"max_tokens_fraction", kChat, chat(R"("max_tokens":1.5)"), 400, "'max_tokens' must be an integer",
     "max_tokens"},
    {"max_tokens_string", kChat, chat(R"("max_tokens":"10")"), 400,
     "'max_tokens' must be an integer, got string", "max_tokens"},
    {"max_tokens_huge", kChat, chat(R"("max_tokens":99999999999999999999)"), 400, "'max_tokens' must be",
     "max_tokens"},
    {"max_completion_tokens_negative", kChat, chat(R"("max_completion_tokens":-5)"), 400,
     "'max_completion_tokens' must be at least 1, got -5", "max_completion_tokens"},
    {"top_k_below_minus_one", kChat, chat(R"("top_k":-2)"), 400, "'top_k' must be at least -1", "top_k"},
    {"seed_string", kChat, chat(R"("seed":"abc")"), 400, "'seed' must be an integer, got string", "seed"},
    {"stop_number", kChat, chat(R"("stop":5)"), 400,
     "'stop' must be a string or an array of strings, got integer", "stop"},
    {"stop_too_many", kChat, chat(R"("stop":["a","b","c","d","e"])"), 400, "at most 4 strings, got 5",
     "stop"},
    {"stop_element_type", kChat, chat(R"("stop":["a",1])"), 400, "'stop[1]' must be a string, got integer",
     "stop[1]"},
    {"stop_empty", kChat, chat(R"("stop":"")"), 400, "stop strings must not be empty", "stop"},
    {"n_zero", kChat, chat(R"("n":0)"), 400, "'n' must be between 1 and 64, got 0", "n"},
    {"n_too_big", kChat, chat(R"("n":65)"), 400, "'n' must be between 1 and 64", "n"},
    {"logprobs_int_for_chat", kChat, chat(R"("logprobs":3)"), 400,
     "'logprobs' must be a boolean, got integer", "logprobs"},
    {"top_logprobs_range", kChat, chat(R"("logprobs":true,"top_logprobs":21)"), 400,
     "'top_logprobs' must be between 0 and 20, got 21", "top_logprobs"},
    {"top_logprobs_without_logprobs", kChat, chat(R"("top_logprobs":2)"), 400,
     "'top_logprobs' requires 'logprobs' to be true", "top_logprobs"},
    {"tools", kChat, chat(R"("tools":[{"type":"function","function":{"name":"f"}}])"), 400,
     "'tools' is not supported", "tools"},
    {"tool_choice_required", kChat, chat(R"("tool_choice":"required")"), 400,
     "'tool_choice' is not supported", "tool_choice"},
    {"response_format_schema", kChat,
     chat(R"("response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{}}})"), 400,
     "'response_format' is not supported by this server: JSON schemas are not implemented",
     "response_format"},
    {"response_format_object_schema", kChat,
     chat(R"("response_format":{"type":"json_object","schema":{"type":"object"}})"), 400,
     "'schema' with json_object: JSON schemas are not implemented", "response_format"},
    {"response_format_not_object", kChat, chat(R"("response_format":"json")"), 400,
     "'response_format' must be an object, got string", "response_format"},
    {"response_format_no_type", kChat, chat(R"("response_format":{})"), 400,
     "'response_format.type' is required", "response_format.type"},
    {"response_format_unknown", kCompl, compl_(R"("response_format":{"type":"yaml"})"), 400,
     "'response_format.type' must be 'text' or 'json_object', got 'yaml'", "response_format.type"},
    {"response_format_json_ignore_eos", kChat,
     chat(R"("response_format":{"type":"json_object"},"ignore_eos":true)"), 400,
     "'ignore_eos' cannot be combined with 'response_format' json_object", "ignore_eos"},
    {"logit_bias_not_object", kChat, chat(R"("logit_bias":[1,2])"), 400,
     "'logit_bias' must be an object mapping token ids to numbers, got array", "logit_bias"},
    {"logit_bias_key_not_id", kChat, chat(R"("logit_bias":{"hello":1})"), 400,
     "maps token ids (decimal integers up to 2147483647) to biases; got the key \"hello\"", "logit_bias"},
    {"logit_bias_negative_key", kChat, chat(R"("logit_bias":{"-5":1})"), 400, "got the key \"-5\"",
     "logit_bias"},
    {"logit_bias_key_too_big", kChat, chat(R"("logit_bias":{"2147483648":1})"), 400,
     "got the key \"2147483648\"", "logit_bias"},
    {"logit_bias_value_string", kChat, chat(R"("logit_bias":{"5":"1"})"), 400,
     "'logit_bias.5' must be a number, got string", "logit_bias.5"},
    {"logit_bias_value_range", kCompl, compl_(R"("logit_bias":{"5":-100.5})"), 400,
     "'logit_bias.5' must be between -100 and 100, got -100.5", "logit_bias.5"},
    {"logit_bias_twice", kChat, chat(R"("logit_bias":{"7":1,"007":2})"), 400,
     "'logit_bias' names token id 7 twice", "logit_bias"},
    {"user_not_string", kChat, chat(R"("user":{"id":1})"), 400, "'user' must be a string, got object",
     "user"},
    {"metadata_not_object", kChat, chat(R"("metadata":"code")"), 400,
     "'metadata' must be an object of strings", "metadata"},
    {"metadata_value_number", kCompl, compl_(R"("metadata":{"scenario":1})"), 400,
     "'metadata.scenario' must be a string, got integer", "metadata.scenario"},
    {"missing_prompt", kCompl, R"({"model":"m"})", 400, "'prompt' is required", "prompt"},
    {"prompt_number", kCompl, R"({"prompt":42})", 400, "'prompt' must be a string, an array of strings",
     "prompt"},
    {"prompt_empty_array", kCompl, R"({"prompt":[]})", 400, "'prompt' must not be an empty array", "prompt"},
    {"prompt_negative_token", kCompl, R"({"prompt":[1,-2]})", 400, "'prompt[1]' must be at least 0, got -2",
     "prompt[1]"},
    {"prompt_mixed_array", kCompl, R"({"prompt":["a",{"b":1}]})", 400,
     "'prompt[1]' must be a string or an array of token ids, got object", "prompt[1]"},
    {"completion_logprobs_range", kCompl, compl_(R"("logprobs":6)"), 400,
     "'logprobs' must be between 0 and 5, got 6", "logprobs"},
    {"completion_logprobs_bool", kCompl, compl_(R"("logprobs":true)"), 400,
     "'logprobs' must be an integer, got boolean", "logprobs"},
    {"echo_with_logprobs", kCompl, compl_(R"("echo":true,"logprobs":1)"), 400, "'echo' is not supported",
     "echo"},
    {"suffix", kCompl, compl_(R"("suffix":"end")"), 400, "'suffix' is not supported", "suffix"},
    {"best_of", kCompl, compl_(R"("best_of":3)"), 400, "'best_of' is not supported", "best_of"},
    {"too_many_choices", kCompl, R"({"prompt":["a","b","c"],"n":30})", 400,
     "at most 64 choices (prompts × n), got 3 × 30", "n"},
};

class BadRequestTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadRequestTest, IsRejectedWithStatusMessageAndParam) {
  const BadCase& c = GetParam();
  std::optional<ApiError> e = parse_error(c.endpoint, c.body);
  ASSERT_TRUE(e.has_value()) << "accepted: " << c.body;
  EXPECT_EQ(e->http_status, c.status);
  EXPECT_THAT(e->message, HasSubstr(c.message));
  EXPECT_EQ(e->param, c.param);
  EXPECT_EQ(e->type, "invalid_request_error");
  // The error body is valid JSON in OpenAI's shape.
  json body = json::parse(error_body(*e));
  EXPECT_EQ(body["error"]["message"], e->message);
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  if (c.param[0] == '\0') {
    EXPECT_TRUE(body["error"]["param"].is_null());
  } else {
    EXPECT_EQ(body["error"]["param"], c.param);
  }
  EXPECT_FALSE(body["error"]["code"].is_null());
}

INSTANTIATE_TEST_SUITE_P(Malformed, BadRequestTest, ::testing::ValuesIn(kBadCases),
                         [](const ::testing::TestParamInfo<BadCase>& p) {
                           return std::string(p.param.name);
                         });

TEST(BadRequestTableTest, HasAtLeast25Cases) { EXPECT_GE(std::size(kBadCases), 25u); }

// ---- well-formed requests ----------------------------------------------------------------------

TEST(ParseChatTest, AllFields) {
  auto r = parse_chat_completion_request(R"({
    "model": "smol", "stream": true, "stream_options": {"include_usage": true},
    "messages": [
      {"role": "developer", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
      {"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
      {"role": "tool", "content": "42", "tool_call_id": "c1"}
    ],
    "max_tokens": 10, "max_completion_tokens": 20, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
    "seed": -1, "stop": ["x", "y"], "presence_penalty": 0.1, "frequency_penalty": -0.2, "logprobs": true,
    "top_logprobs": 3, "n": 2, "user": "u1", "ignore_eos": true, "unknown_field": {"anything": [1, 2]},
    "metadata": {"team": "a", "scenario": "code"},
    "tool_choice": "none", "response_format": {"type": "text"}, "repetition_penalty": 1.1,
    "logit_bias": {"50256": -100, "12": 2.5, "3": 0}
  })");
  ASSERT_TRUE(r.ok()) << r.error().message;
  const ChatCompletionRequest& c = r.value();
  EXPECT_EQ(c.params.model, "smol");
  EXPECT_TRUE(c.params.stream);
  EXPECT_TRUE(c.params.include_usage);
  EXPECT_EQ(c.params.max_tokens, 20);  // max_completion_tokens wins
  EXPECT_FLOAT_EQ(c.params.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(c.params.sampling.top_p, 0.9f);
  EXPECT_EQ(c.params.sampling.top_k, 40);
  EXPECT_FLOAT_EQ(c.params.sampling.min_p, 0.05f);
  EXPECT_FLOAT_EQ(c.params.sampling.presence_penalty, 0.1f);
  EXPECT_FLOAT_EQ(c.params.sampling.frequency_penalty, -0.2f);
  EXPECT_FLOAT_EQ(c.params.sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(c.params.sampling.top_logprobs, 3);
  EXPECT_EQ(c.params.sampling.logit_bias,
            (std::vector<LogitBias>{{3, 0.0f}, {12, 2.5f}, {50256, -100.0f}}));  // by token id
  EXPECT_EQ(c.params.seed, -1);
  EXPECT_EQ(c.params.stop, (std::vector<std::string>{"x", "y"}));
  EXPECT_TRUE(c.params.logprobs);
  EXPECT_EQ(c.params.n, 2);
  EXPECT_EQ(c.params.user, "u1");
  EXPECT_TRUE(c.params.ignore_eos);
  EXPECT_EQ(c.params.scenario, "code");
  EXPECT_EQ(c.params.response_format, ResponseFormat::kText);
  auto j = parse_completion_request(R"({"prompt": "x", "response_format": {"type": "json_object"}})");
  ASSERT_TRUE(j.ok()) << j.error().message;
  EXPECT_EQ(j.value().params.response_format, ResponseFormat::kJsonObject);
  ASSERT_EQ(c.messages.size(), 4u);
  EXPECT_EQ(c.messages[0].role, "system");
  EXPECT_EQ(c.messages[1].content, "a\nb");
  EXPECT_EQ(c.messages[1].name, "ann");
  ASSERT_TRUE(c.messages[2].content_value.has_value());
  EXPECT_TRUE(c.messages[2].content_value->is_none());
  ASSERT_TRUE(c.messages[2].tool_calls.has_value());
  const jinja::Value& call = c.messages[2].tool_calls->as_list().at(0);
  const jinja::Value* fn = call.as_dict().find("function");
  ASSERT_NE(fn, nullptr);
  const jinja::Value* args = fn->as_dict().find("arguments");
  ASSERT_NE(args, nullptr);
  ASSERT_TRUE(args->is_dict());  // the JSON string became a dict, as transformers expects
  EXPECT_EQ(args->as_dict().find("x")->as_int(), 1);
  EXPECT_EQ(c.messages[3].tool_call_id, "c1");
}

TEST(ParseChatTest, NullsMeanUnset) {
  auto r = parse_chat_completion_request(chat(
      R"("model":null,"temperature":null,"max_tokens":null,"stop":null,"seed":null,"n":null,"stream_options":null)"));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r.value().params.model, "");
  EXPECT_FALSE(r.value().params.max_tokens.has_value());
  EXPECT_FALSE(r.value().params.seed.has_value());
  EXPECT_EQ(r.value().params.n, 1);
  EXPECT_FLOAT_EQ(r.value().params.sampling.temperature, 0.0f);
}

TEST(ParseChatTest, IntegralFloatsAndBigSeedsAreAccepted) {
  auto r = parse_chat_completion_request(chat(R"("max_tokens":5.0,"seed":18446744073709551615,"top_k":-1)"));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r.value().params.max_tokens, 5);
  EXPECT_EQ(static_cast<uint64_t>(*r.value().params.seed), 18446744073709551615u);
  EXPECT_EQ(r.value().params.sampling.top_k, 0);
}

TEST(ParseCompletionTest, PromptForms) {
  auto one = parse_completion_request(R"({"prompt":"hello","echo":true,"logprobs":2})");
  ASSERT_FALSE(one.ok());  // echo + logprobs
  auto text = parse_completion_request(R"({"prompt":"hello","echo":true,"max_tokens":3})");
  ASSERT_TRUE(text.ok());
  EXPECT_TRUE(text.value().echo);
  ASSERT_EQ(text.value().prompts.size(), 1u);
  EXPECT_FALSE(text.value().prompts[0].is_tokens);
  EXPECT_EQ(text.value().prompts[0].text, "hello");

  auto ids = parse_completion_request(R"({"prompt":[1,2,3],"logprobs":0})");
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids.value().prompts.size(), 1u);
  EXPECT_TRUE(ids.value().prompts[0].is_tokens);
  EXPECT_EQ(ids.value().prompts[0].tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_TRUE(ids.value().params.logprobs);
  EXPECT_EQ(ids.value().params.sampling.top_logprobs, 0);

  auto many = parse_completion_request(R"({"prompt":["a",[4,5]],"n":2,"best_of":2})");
  ASSERT_TRUE(many.ok()) << many.error().message;
  ASSERT_EQ(many.value().prompts.size(), 2u);
  EXPECT_EQ(many.value().prompts[0].text, "a");
  EXPECT_EQ(many.value().prompts[1].tokens, (std::vector<int32_t>{4, 5}));
}

TEST(ParseTokenizeTest, ContentOrPrompt) {
  auto a = parse_tokenize_request(R"({"content":"hi","add_special":false})");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a.value().text, "hi");
  EXPECT_FALSE(a.value().add_special);
  auto b = parse_tokenize_request(R"({"prompt":"yo"})");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b.value().text, "yo");
  EXPECT_TRUE(b.value().add_special);
  auto c = parse_tokenize_request(R"({"content":3})");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.error().message, HasSubstr("'content' must be a string, got integer"));
  auto d = parse_tokenize_request(R"({})");
  ASSERT_FALSE(d.ok());
  EXPECT_THAT(d.error().message, HasSubstr("'content' (or 'prompt') is required"));
}

TEST(ParseDetokenizeTest, Tokens) {
  auto a = parse_detokenize_request(R"({"tokens":[1,2]})");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a.value().tokens, (std::vector<int32_t>{1, 2}));
  auto b = parse_detokenize_request(R"({"tokens":"12"})");
  ASSERT_FALSE(b.ok());
  EXPECT_THAT(b.error().message, HasSubstr("'tokens' must be an array of token ids, got string"));
  auto c = parse_detokenize_request(R"({"tokens":[1,"x"]})");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().param, "tokens[1]");
}

// ---- responses ---------------------------------------------------------------------------------

ResponseMeta meta() { return {"chatcmpl-1", 1700000000, "smol"}; }

TEST(ResponseTest, ChatCompletionShape) {
  ChoiceResult c;
  c.index = 0;
  c.text = "Hello";
  c.finish_reason = "stop";
  c.logprobs = true;
  c.token_logprobs = {{"Hel", -0.5f, {{"Hel", -0.5f}, {"Hi", -1.5f}}}, {"lo", -0.25f, {}}};
  std::vector<ChoiceResult> cs = {c};
  json j = json::parse(chat_completion_body(meta(), cs, {7, 2, 4}));
  EXPECT_EQ(j["id"], "chatcmpl-1");
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["created"], 1700000000);
  EXPECT_EQ(j["model"], "smol");
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "Hello");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  const json& lp = j["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(lp.size(), 2u);
  EXPECT_EQ(lp[0]["token"], "Hel");
  EXPECT_DOUBLE_EQ(lp[0]["logprob"].get<double>(), -0.5);
  EXPECT_EQ(lp[0]["bytes"], json::array({72, 101, 108}));
  EXPECT_EQ(lp[0]["top_logprobs"][1]["token"], "Hi");
  EXPECT_TRUE(lp[1]["top_logprobs"].is_array());
  EXPECT_EQ(j["usage"]["prompt_tokens"], 7);
  EXPECT_EQ(j["usage"]["completion_tokens"], 2);
  EXPECT_EQ(j["usage"]["total_tokens"], 9);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
}

TEST(ResponseTest, CompletionShapeWithLogprobsAndOffsets) {
  ChoiceResult c;
  c.text = "Paris.";
  c.finish_reason = "length";
  c.logprobs = true;
  c.text_offset = 10;
  c.token_logprobs = {{" Paris", -0.1f, {{" London", -3.0f}}}, {".", -0.2f, {}}};
  std::vector<ChoiceResult> cs = {c};
  json j = json::parse(completion_body({"cmpl-1", 1, "smol"}, cs, {3, 2, 0}));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "Paris.");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  const json& lp = j["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json::array({" Paris", "."}));
  EXPECT_EQ(lp["text_offset"], json::array({10, 16}));
  EXPECT_EQ(lp["token_logprobs"].size(), 2u);
  EXPECT_TRUE(lp["top_logprobs"][0].contains(" London"));
  EXPECT_TRUE(lp["top_logprobs"][0].contains(" Paris"));
}

TEST(ResponseTest, NoLogprobsIsNull) {
  ChoiceResult c;
  c.text = "x";
  std::vector<ChoiceResult> cs = {c};
  json j = json::parse(chat_completion_body(meta(), cs, {}));
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
}

TEST(ResponseTest, InvalidUtf8PiecesDoNotThrow) {
  ChoiceResult c;
  c.logprobs = true;
  c.token_logprobs = {{"\xe4\xbd", -1.0f, {}}};  // half a character
  std::vector<ChoiceResult> cs = {c};
  json j = json::parse(chat_completion_body(meta(), cs, {}));
  EXPECT_EQ(j["choices"][0]["logprobs"]["content"][0]["bytes"], json::array({0xe4, 0xbd}));
}

TEST(ResponseTest, ChatChunks) {
  ChoiceResult first;
  json a = json::parse(chat_chunk(meta(), first, true, false));
  EXPECT_EQ(a["object"], "chat.completion.chunk");
  EXPECT_EQ(a["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(a["choices"][0]["delta"]["content"], "");
  EXPECT_FALSE(a.contains("usage"));

  ChoiceResult piece;
  piece.text = "Hi";
  json b = json::parse(chat_chunk(meta(), piece, false, true));
  EXPECT_FALSE(b["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(b["choices"][0]["delta"]["content"], "Hi");
  EXPECT_TRUE(b["choices"][0]["finish_reason"].is_null());
  ASSERT_TRUE(b.contains("usage"));
  EXPECT_TRUE(b["usage"].is_null());

  ChoiceResult last;
  last.finish_reason = "stop";
  json c = json::parse(chat_chunk(meta(), last, false, false));
  EXPECT_TRUE(c["choices"][0]["delta"].empty());
  EXPECT_EQ(c["choices"][0]["finish_reason"], "stop");

  json u = json::parse(usage_chunk(meta(), Endpoint::kChatCompletions, {5, 3, 0}));
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["total_tokens"], 8);
}

TEST(ResponseTest, CompletionChunk) {
  ChoiceResult d;
  d.index = 3;
  d.text = " world";
  json j = json::parse(completion_chunk({"cmpl-9", 1, "smol"}, d, false));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["index"], 3);
  EXPECT_EQ(j["choices"][0]["text"], " world");
}

TEST(SseTest, Framing) {
  EXPECT_EQ(sse_data(R"({"a":1})"), "data: {\"a\":1}\n\n");
  EXPECT_EQ(kSseDone, "data: [DONE]\n\n");
  // A chunk's JSON never holds a raw newline, so an event is exactly one data line.
  ChoiceResult d;
  d.text = "line one\nline two\n\n";
  std::string event = sse_data(chat_chunk(meta(), d, false, false));
  EXPECT_EQ(event.find('\n'), event.size() - 2);
}

TEST(ResponseTest, ModelsTokenizeHealth) {
  const std::vector<std::string> names = {"smol"};
  json m = json::parse(models_body(names, 5, 8192));
  EXPECT_EQ(m["object"], "list");
  EXPECT_EQ(m["data"][0]["id"], "smol");
  EXPECT_EQ(m["data"][0]["object"], "model");
  EXPECT_EQ(m["data"][0]["owned_by"], "pdserve");
  EXPECT_EQ(json::parse(model_body("smol", 5, 8192))["id"], "smol");
  std::vector<int32_t> t = {1, 2};
  json k = json::parse(tokenize_body(t, 100));
  EXPECT_EQ(k["tokens"], json::array({1, 2}));
  EXPECT_EQ(k["count"], 2);
  EXPECT_EQ(json::parse(detokenize_body("hi"))["content"], "hi");
  EXPECT_EQ(json::parse(health_body("ok"))["status"], "ok");
}

TEST(ApiErrorTest, StatusMapping) {
  EXPECT_EQ(http_status_for(StatusCode::kInvalidArgument), 400);
  EXPECT_EQ(http_status_for(StatusCode::kUnauthenticated), 401);
  EXPECT_EQ(http_status_for(StatusCode::kNotFound), 404);
  EXPECT_EQ(http_status_for(StatusCode::kResourceExhausted), 429);
  EXPECT_EQ(http_status_for(StatusCode::kUnavailable), 503);
  EXPECT_EQ(http_status_for(StatusCode::kInternal), 500);
  ApiError busy = api_error(resource_exhausted("1024 requests are already waiting"));
  EXPECT_EQ(busy.http_status, 429);
  EXPECT_EQ(busy.type, "rate_limit_error");
  ASSERT_EQ(busy.headers.size(), 1u);
  EXPECT_EQ(busy.headers[0].first, "Retry-After");
  ApiError ctx = api_error(invalid_argument("too long"), "messages", "context_length_exceeded");
  json j = json::parse(error_body(ctx));
  EXPECT_EQ(j["error"]["param"], "messages");
  EXPECT_EQ(j["error"]["code"], "context_length_exceeded");
}

}  // namespace
}  // namespace pdserve::api

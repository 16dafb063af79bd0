#include "api/protocol.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

namespace pdserve::api {

namespace {

using json = nlohmann::json;
// Responses keep their keys in the order written (id, object, created, ...), as OpenAI's do.
using ojson = nlohmann::ordered_json;

// NOTE: token pieces may be part of a UTF-8 character; dumping must not throw on them.
std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

std::string_view kind(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "integer";
    case json::value_t::number_float: return "number";
    case json::value_t::string: return "string";
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    default: return "value";
  }
}

ApiError bad(std::string param, std::string message, std::string code = "invalid_value") {
  ApiError e = http_error(400, std::move(message), std::move(code));
  e.param = std::move(param);
  return e;
}

ApiError wrong_type(const std::string& param, std::string_view expected, const json& got) {
  return bad(param, fmt::format("'{}' must be {}, got {}", param, expected, kind(got)), "invalid_type");
}

ApiError unsupported(const std::string& param, std::string_view what) {
  return bad(param, fmt::format("'{}' is not supported by this server: {}", param, what),
             "unsupported_parameter");
}

// A scan for nesting depth before parsing, so that no parser or destructor recurses deeply.
bool nesting_within(std::string_view s, int max_depth) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return false;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return true;
}

std::optional<ApiError> parse_object(std::string_view body, json* out) {
  if (body.find_first_not_of(" \t\r\n") == std::string_view::npos) {
    return bad("", "the request body is empty; send a JSON object", "invalid_json");
  }
  if (!nesting_within(body, kMaxJsonDepth)) {
    return bad("", fmt::format("the request body nests JSON deeper than {} levels", kMaxJsonDepth),
               "invalid_json");
  }
  try {
    *out = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {
    std::string what = e.what();
    if (size_t p = what.find("] "); what.starts_with("[json.exception") && p != std::string::npos) {
      what.erase(0, p + 2);
    }
    // The parser quotes what it read last, which may be invalid UTF-8: keep the message valid.
    what = json::parse(json(what).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
    return bad("", "the request body is not valid JSON: " + what, "invalid_json");
  }
  if (!out->is_object()) {
    return bad("", fmt::format("the request body must be a JSON object, got {}", kind(*out)), "invalid_json");
  }
  return std::nullopt;
}

// The field, or nullptr when absent or null.
const json* field(const json& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<ApiError> get_bool(const json& o, const char* key, bool* out, const std::string& prefix = {}) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) return wrong_type(prefix + key, "a boolean", *v);
  *out = v->get<bool>();
  return std::nullopt;
}

std::optional<ApiError> get_string(const json& o, const char* key, std::string* out,
                                   const std::string& prefix = {}) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) return wrong_type(prefix + key, "a string", *v);
  *out = v->get<std::string>();
  return std::nullopt;
}

// An integer value (integral floats such as 5.0 count) in [lo, hi].
std::optional<ApiError> to_int(const json& v, const std::string& param, int64_t lo, int64_t hi,
                               int64_t* out) {
  int64_t x = 0;
  bool too_big = false;
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    too_big = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    x = too_big ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
  } else if (v.is_number_float()) {
    double d = v.get<double>();
    if (!(std::floor(d) == d) || std::fabs(d) > 9.0e18) {
      return bad(param, fmt::format("'{}' must be an integer, got {}", param, d), "invalid_type");
    }
    x = static_cast<int64_t>(d);
  } else {
    return wrong_type(param, "an integer", v);
  }
  if (too_big || x < lo || x > hi) {
    std::string shown = v.dump();
    if (hi == std::numeric_limits<int32_t>::max()) {
      return bad(param, fmt::format("'{}' must be at least {}, got {}", param, lo, shown));
    }
    return bad(param, fmt::format("'{}' must be between {} and {}, got {}", param, lo, hi, shown));
  }
  *out = x;
  return std::nullopt;
}

std::optional<ApiError> get_int(const json& o, const char* key, int64_t lo, int64_t hi,
                                std::optional<int64_t>* out) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  int64_t x = 0;
  if (auto e = to_int(*v, key, lo, hi, &x)) return e;
  *out = x;
  return std::nullopt;
}

// A number in [lo, hi] (lo_open: in (lo, hi]).
std::optional<ApiError> get_number(const json& o, const char* key, double lo, double hi, bool lo_open,
                                   float* out) {
  const json* v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) return wrong_type(key, "a number", *v);
  double d = v->get<double>();
  if (!(lo_open ? d > lo : d >= lo) || !(d <= hi)) {
    return bad(key, fmt::format("'{}' must be {} {} and at most {}, got {}", key,
                                lo_open ? "greater than" : "at least", lo, hi, v->dump()));
  }
  *out = static_cast<float>(d);
  return std::nullopt;
}

// JSON → template value, for tool calls and content parts (depth already bounded).
jinja::Value to_jinja(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return jinja::Value::none();
    case json::value_t::boolean: return jinja::Value::boolean(v.get<bool>());
    case json::value_t::number_integer: return jinja::Value::integer(v.get<int64_t>());
    case json::value_t::number_unsigned: {
      uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return jinja::Value::number(static_cast<double>(u));
      }
      return jinja::Value::integer(static_cast<int64_t>(u));
    }
    case json::value_t::number_float: return jinja::Value::number(v.get<double>());
    case json::value_t::string: return jinja::Value::string(v.get<std::string>());
    case json::value_t::array: {
      std::vector<jinja::Value> items;
      items.reserve(v.size());
      for (const auto& x : v) items.push_back(to_jinja(x));
      return jinja::Value::list(std::move(items));
    }
    case json::value_t::object: {
      jinja::Dict d;
      for (const auto& [k, x] : v.items()) d.set(k, to_jinja(x));
      return jinja::Value::dict(std::move(d));
    }
    default: return jinja::Value::none();
  }
}

std::optional<ApiError> parse_stop(const json& o, std::vector<std::string>* out) {
  const json* v = field(o, "stop");
  if (!v) return std::nullopt;
  if (v->is_string()) {
    out->push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > static_cast<size_t>(kMaxStopStrings)) {
      return bad("stop",
                 fmt::format("'stop' may hold at most {} strings, got {}", kMaxStopStrings, v->size()));
    }
    for (size_t i = 0; i < v->size(); ++i) {
      const json& s = (*v)[i];
      if (!s.is_string()) return wrong_type(fmt::format("stop[{}]", i), "a string", s);
      out->push_back(s.get<std::string>());
    }
  } else {
    return wrong_type("stop", "a string or an array of strings", *v);
  }
  for (size_t i = 0; i < out->size(); ++i) {
    if ((*out)[i].empty()) return bad("stop", "stop strings must not be empty");
  }
  return std::nullopt;
}

// Fields that would change the output and that pdserve does not implement.
std::optional<ApiError> reject_unsupported(const json& o) {
  for (const char* key : {"tools", "functions"}) {
    if (const json* v = field(o, key); v && !(v->is_array() && v->empty())) {
      return unsupported(key, "tool and function calling is not implemented");
    }
  }
  for (const char* key : {"tool_choice", "function_call"}) {
    if (const json* v = field(o, key); v && !(v->is_string() && (*v == "none" || *v == "auto"))) {
      return unsupported(key, "tool and function calling is not implemented");
    }
  }
  if (field(o, "audio")) return unsupported("audio", "this server generates text only");
  if (const json* v = field(o, "modalities"); v && *v != json::array({"text"})) {
    return unsupported("modalities", "this server generates text only");
  }
  return std::nullopt;
}

// "logit_bias": token ids (as decimal strings, since JSON keys are strings) to a bias in
// [-100, 100]; sorted by id. Whether the ids are in the vocabulary is the service's to check.
std::optional<ApiError> parse_logit_bias(const json& o, std::vector<LogitBias>* out) {
  const json* m = field(o, "logit_bias");
  if (!m) return std::nullopt;
  if (!m->is_object()) return wrong_type("logit_bias", "an object mapping token ids to numbers", *m);
  out->clear();
  out->reserve(m->size());
  for (const auto& [k, v] : m->items()) {
    int64_t id = -1;
    const bool digits = !k.empty() && k.size() <= 10 &&
                        std::all_of(k.begin(), k.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (digits) std::from_chars(k.data(), k.data() + k.size(), id);
    if (!digits || id > std::numeric_limits<int32_t>::max()) {
      // (The key is shown cut short, and as valid UTF-8 whatever its bytes.)
      const std::string shown = json(k.substr(0, 24)).dump(-1, ' ', false, json::error_handler_t::replace) +
                                (k.size() > 24 ? "..." : "");
      return bad("logit_bias",
                 fmt::format("'logit_bias' maps token ids (decimal integers up to 2147483647) to biases; "
                             "got the key {}",
                             shown));
    }
    const std::string param = "logit_bias." + k;
    if (!v.is_number()) return wrong_type(param, "a number", v);
    const double d = v.get<double>();
    if (!(d >= -kMaxLogitBias && d <= kMaxLogitBias)) {
      return bad(param, fmt::format("'{}' must be between -100 and 100, got {}", param, v.dump()));
    }
    out->push_back({static_cast<int32_t>(id), static_cast<float>(d)});
  }
  if (std::optional<int32_t> twice = sort_logit_bias(*out))
    return bad("logit_bias", fmt::format("'logit_bias' names token id {} twice", *twice));
  return std::nullopt;
}

// "response_format": {"type": "text"} or {"type": "json_object"} (JSON mode); "json_schema" is
// not implemented.
std::optional<ApiError> parse_response_format(const json& o, ResponseFormat* out) {
  const json* v = field(o, "response_format");
  if (!v) return std::nullopt;
  if (!v->is_object()) return wrong_type("response_format", "an object", *v);
  const json* type = field(*v, "type");
  if (!type) return bad("response_format.type", "'response_format.type' is required");
  if (!type->is_string()) return wrong_type("response_format.type", "a string", *type);
  if (*type == "text") {
    *out = ResponseFormat::kText;
  } else if (*type == "json_object") {
    // llama.cpp's server takes a schema here; this server would not follow it.
    for (const char* key : {"schema", "json_schema"}) {
      if (field(*v, key)) {
        return unsupported("response_format",
                           fmt::format("'{}' with json_object: JSON schemas are not "
                                       "implemented; send {{\"type\": \"json_object\"}} alone",
                                       key));
      }
    }
    *out = ResponseFormat::kJsonObject;
  } else if (*type == "json_schema") {
    return unsupported("response_format", "JSON schemas are not implemented; {\"type\": \"json_object\"} is");
  } else {
    return bad("response_format.type",
               fmt::format("'response_format.type' must be 'text' or 'json_object', got '{}'",
                           type->get<std::string>()));
  }
  return std::nullopt;
}

// "metadata": OpenAI's map of up to 16 string pairs (keys up to 64 characters, values up to 512);
// only "scenario" means something here.
std::optional<ApiError> parse_metadata(const json& o, std::string* scenario) {
  const json* m = field(o, "metadata");
  if (!m || m->is_null()) return std::nullopt;
  if (!m->is_object()) return wrong_type("metadata", "an object of strings", *m);
  if (m->size() > 16) return bad("metadata", "'metadata' holds at most 16 keys");
  for (const auto& [k, v] : m->items()) {
    const std::string param = "metadata." + k;
    if (k.size() > 64) return bad("metadata", "a 'metadata' key is longer than 64 characters");
    if (!v.is_string()) return wrong_type(param, "a string", v);
    if (v.get_ref<const std::string&>().size() > 512) {
      return bad(param, fmt::format("'{}' is longer than 512 characters", param));
    }
    if (k == "scenario") *scenario = v.get<std::string>();
  }
  return std::nullopt;
}

std::optional<ApiError> parse_common(const json& o, GenerationParams* p) {
  if (auto e = reject_unsupported(o)) return e;
  if (auto e = get_string(o, "model", &p->model)) return e;
  if (auto e = get_bool(o, "stream", &p->stream)) return e;
  if (const json* so = field(o, "stream_options")) {
    if (!so->is_object()) return wrong_type("stream_options", "an object", *so);
    if (!p->stream) {
      return bad("stream_options", "'stream_options' is only allowed when 'stream' is true");
    }
    if (auto e = get_bool(*so, "include_usage", &p->include_usage, "stream_options.")) return e;
  }
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  std::optional<int64_t> max_tokens;
  std::optional<int64_t> max_completion_tokens;
  if (auto e = get_int(o, "max_tokens", 1, kIntMax, &max_tokens)) return e;
  if (auto e = get_int(o, "max_completion_tokens", 1, kIntMax, &max_completion_tokens)) return e;
  if (max_completion_tokens) {
    p->max_tokens = static_cast<int32_t>(*max_completion_tokens);
  } else if (max_tokens) {
    p->max_tokens = static_cast<int32_t>(*max_tokens);
  }
  SamplingParams& s = p->sampling;
  if (auto e = get_number(o, "temperature", 0, 2, false, &s.temperature)) return e;
  if (auto e = get_number(o, "top_p", 0, 1, true, &s.top_p)) return e;
  if (auto e = get_number(o, "min_p", 0, 1, false, &s.min_p)) return e;
  if (auto e = get_number(o, "presence_penalty", -2, 2, false, &s.presence_penalty)) return e;
  if (auto e = get_number(o, "frequency_penalty", -2, 2, false, &s.frequency_penalty)) return e;
  if (auto e = get_number(o, "repetition_penalty", 0, 10, true, &s.repetition_penalty)) return e;
  if (auto e = parse_logit_bias(o, &s.logit_bias)) return e;
  std::optional<int64_t> top_k;
  if (auto e = get_int(o, "top_k", -1, kIntMax, &top_k)) return e;
  if (top_k) s.top_k = *top_k < 0 ? 0 : static_cast<int32_t>(*top_k);  // -1: off, as vLLM
  if (const json* v = field(o, "seed")) {
    if (v->is_number_unsigned()) {
      p->seed = static_cast<int64_t>(v->get<uint64_t>());  // the bits of a 64-bit seed
    } else {
      int64_t x = 0;
      if (auto e = to_int(*v, "seed", std::numeric_limits<int64_t>::min(),
                          std::numeric_limits<int64_t>::max(), &x)) {
        return e;
      }
      p->seed = x;
    }
  }
  if (auto e = parse_stop(o, &p->stop)) return e;
  std::optional<int64_t> n;
  if (auto e = get_int(o, "n", 1, kMaxChoices, &n)) return e;
  if (n) p->n = static_cast<int32_t>(*n);
  if (auto e = get_string(o, "user", &p->user)) return e;
  if (auto e = get_bool(o, "ignore_eos", &p->ignore_eos)) return e;
  if (auto e = parse_response_format(o, &p->response_format)) return e;
  if (p->response_format == ResponseFormat::kJsonObject && p->ignore_eos) {
    return bad("ignore_eos",
               "'ignore_eos' cannot be combined with 'response_format' json_object: the object's "
               "end is the end of generation");
  }
  if (auto e = parse_metadata(o, &p->scenario)) return e;
  return std::nullopt;
}

std::optional<ApiError> parse_content(const json& m, const std::string& path, ChatMessage* msg) {
  const json* c = field(m, "content");
  const std::string param = path + ".content";
  if (!c) {
    if (msg->role == "assistant" && field(m, "tool_calls")) {
      msg->content_value = jinja::Value::none();
      return std::nullopt;
    }
    return bad(param, fmt::format("'{}' is required for a message with role '{}'", param, msg->role),
               "missing_required_parameter");
  }
  if (c->is_string()) {
    msg->content = c->get<std::string>();
    return std::nullopt;
  }
  if (!c->is_array()) return wrong_type(param, "a string or an array of content parts", *c);
  // NOTE: text parts are joined with "\n" into one string (as vLLM does for templates that take
  // string content, which is what model chat templates expect).
  std::string text;
  for (size_t i = 0; i < c->size(); ++i) {
    const json& part = (*c)[i];
    std::string pp = fmt::format("{}[{}]", param, i);
    if (!part.is_object()) return wrong_type(pp, "a content part object", part);
    const json* type = field(part, "type");
    if (!type || !type->is_string()) {
      return bad(pp + ".type", fmt::format("'{}.type' is required and must be a string", pp),
                 "missing_required_parameter");
    }
    if (*type != "text") {
      return bad(pp + ".type",
                 fmt::format("content parts of type '{}' are not supported: this model takes text only",
                             type->get<std::string>()),
                 "unsupported_parameter");
    }
    const json* t = field(part, "text");
    if (!t) return bad(pp + ".text", fmt::format("'{}.text' is required", pp), "missing_required_parameter");
    if (!t->is_string()) return wrong_type(pp + ".text", "a string", *t);
    if (i > 0) text += '\n';
    text += t->get<std::string>();
  }
  msg->content = std::move(text);
  return std::nullopt;
}

std::optional<ApiError> parse_tool_calls(const json& m, const std::string& path, ChatMessage* msg) {
  const json* tc = field(m, "tool_calls");
  if (!tc) return std::nullopt;
  const std::string param = path + ".tool_calls";
  if (!tc->is_array()) return wrong_type(param, "an array", *tc);
  std::vector<jinja::Value> calls;
  for (size_t i = 0; i < tc->size(); ++i) {
    const json& call = (*tc)[i];
    std::string cp = fmt::format("{}[{}]", param, i);
    if (!call.is_object()) return wrong_type(cp, "an object", call);
    const json* fn = field(call, "function");
    if (!fn || !fn->is_object())
      return bad(cp + ".function", fmt::format("'{}.function' must be an object", cp));
    jinja::Dict f;
    std::string name;
    if (auto e = get_string(*fn, "name", &name, cp + ".function.")) return e;
    f.set("name", jinja::Value::string(name));
    // transformers' convention: arguments is a dict for the template, not a JSON string.
    if (const json* args = field(*fn, "arguments")) {
      if (args->is_string()) {
        const std::string& text = args->get_ref<const std::string&>();
        json parsed;
        if (nesting_within(text, kMaxJsonDepth))
          parsed = json::parse(text, nullptr, /*allow_exceptions=*/false);
        f.set("arguments", parsed.is_object() ? to_jinja(parsed) : jinja::Value::string(text));
      } else {
        f.set("arguments", to_jinja(*args));
      }
    }
    jinja::Dict d;
    std::string id;
    if (auto e = get_string(call, "id", &id, cp + ".")) return e;
    if (!id.empty()) d.set("id", jinja::Value::string(id));
    d.set("type", jinja::Value::string("function"));
    d.set("function", jinja::Value::dict(std::move(f)));
    calls.push_back(jinja::Value::dict(std::move(d)));
  }
  msg->tool_calls = jinja::Value::list(std::move(calls));
  return std::nullopt;
}

std::optional<ApiError> parse_messages(const json& o, std::vector<ChatMessage>* out) {
  const json* ms = field(o, "messages");
  if (!ms) return bad("messages", "'messages' is required", "missing_required_parameter");
  if (!ms->is_array()) return wrong_type("messages", "an array of message objects", *ms);
  if (ms->empty()) return bad("messages", "'messages' must not be empty: send at least one message");
  for (size_t i = 0; i < ms->size(); ++i) {
    const json& m = (*ms)[i];
    std::string path = fmt::format("messages[{}]", i);
    if (!m.is_object()) return wrong_type(path, "a message object", m);
    ChatMessage msg;
    const json* role = field(m, "role");
    if (!role)
      return bad(path + ".role", fmt::format("'{}.role' is required", path), "missing_required_parameter");
    if (!role->is_string()) return wrong_type(path + ".role", "a string", *role);
    msg.role = role->get<std::string>();
    if (msg.role == "developer") msg.role = "system";
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant" && msg.role != "tool") {
      return bad(path + ".role",
                 fmt::format("'{}.role' must be one of system, developer, user, assistant, tool; got '{}'",
                             path, msg.role));
    }
    if (auto e = parse_content(m, path, &msg)) return e;
    if (const json* name = field(m, "name")) {
      if (!name->is_string()) return wrong_type(path + ".name", "a string", *name);
      msg.name = name->get<std::string>();
    }
    if (msg.role == "assistant") {
      if (auto e = parse_tool_calls(m, path, &msg)) return e;
    }
    if (const json* id = field(m, "tool_call_id")) {
      if (!id->is_string()) return wrong_type(path + ".tool_call_id", "a string", *id);
      msg.tool_call_id = id->get<std::string>();
    }
    out->push_back(std::move(msg));
  }
  return std::nullopt;
}

// One prompt of token ids.
std::optional<ApiError> parse_token_ids(const json& a, const std::string& param, std::vector<int32_t>* out) {
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t x = 0;
    if (auto e = to_int(a[i], fmt::format("{}[{}]", param, i), 0, std::numeric_limits<int32_t>::max(), &x))
      return e;
    out->push_back(static_cast<int32_t>(x));
  }
  return std::nullopt;
}

std::optional<ApiError> parse_prompts(const json& o, std::vector<PromptInput>* out) {
  const json* p = field(o, "prompt");
  if (!p) return bad("prompt", "'prompt' is required", "missing_required_parameter");
  constexpr std::string_view kExpected =
      "a string, an array of strings, an array of token ids or an array of those";
  if (p->is_string()) {
    out->push_back({.is_tokens = false, .text = p->get<std::string>(), .tokens = {}});
    return std::nullopt;
  }
  if (!p->is_array()) return wrong_type("prompt", kExpected, *p);
  if (p->empty()) return bad("prompt", "'prompt' must not be an empty array");
  const json& first = (*p)[0];
  if (first.is_number()) {
    PromptInput in;
    in.is_tokens = true;
    if (auto e = parse_token_ids(*p, "prompt", &in.tokens)) return e;
    out->push_back(std::move(in));
    return std::nullopt;
  }
  for (size_t i = 0; i < p->size(); ++i) {
    const json& x = (*p)[i];
    std::string param = fmt::format("prompt[{}]", i);
    if (x.is_string()) {
      out->push_back({.is_tokens = false, .text = x.get<std::string>(), .tokens = {}});
    } else if (x.is_array()) {
      PromptInput in;
      in.is_tokens = true;
      if (auto e = parse_token_ids(x, param, &in.tokens)) return e;
      out->push_back(std::move(in));
    } else {
      return wrong_type(param, "a string or an array of token ids", x);
    }
  }
  return std::nullopt;
}

std::optional<ApiError> check_choices(size_t num_prompts, int32_t n) {
  if (num_prompts * static_cast<size_t>(n) > static_cast<size_t>(kMaxChoices)) {
    return bad("n", fmt::format("a request may ask for at most {} choices (prompts × n), got {} × {}",
                                kMaxChoices, num_prompts, n));
  }
  return std::nullopt;
}

ojson usage_json(const Usage& u) {
  ojson j;
  j["prompt_tokens"] = u.prompt_tokens;
  j["completion_tokens"] = u.completion_tokens;
  j["total_tokens"] = u.prompt_tokens + u.completion_tokens;
  j["prompt_tokens_details"] = {{"cached_tokens", u.cached_tokens}};
  return j;
}

ojson bytes_json(std::string_view s) {
  ojson a = ojson::array();
  for (unsigned char c : s) a.push_back(static_cast<int>(c));
  return a;
}

// NOTE: -inf log-probabilities (impossible tokens among the alternatives) are not JSON; OpenAI
// reports -9999.0 for them.
double finite_logprob(float lp) { return std::isfinite(lp) ? static_cast<double>(lp) : -9999.0; }

ojson chat_logprobs_json(const ChoiceResult& c) {
  if (!c.logprobs) return nullptr;
  ojson content = ojson::array();
  for (const TokenLogprobs& t : c.token_logprobs) {
    ojson e;
    e["token"] = t.token;
    e["logprob"] = finite_logprob(t.logprob);
    e["bytes"] = bytes_json(t.token);
    ojson top = ojson::array();
    for (const LogprobAlternative& a : t.top) {
      top.push_back(
          {{"token", a.token}, {"logprob", finite_logprob(a.logprob)}, {"bytes", bytes_json(a.token)}});
    }
    e["top_logprobs"] = std::move(top);
    content.push_back(std::move(e));
  }
  return {{"content", std::move(content)}, {"refusal", nullptr}};
}

ojson completion_logprobs_json(const ChoiceResult& c) {
  if (!c.logprobs) return nullptr;
  ojson tokens = ojson::array(), logprobs = ojson::array(), top = ojson::array(), offsets = ojson::array();
  int64_t offset = c.text_offset;
  for (const TokenLogprobs& t : c.token_logprobs) {
    tokens.push_back(t.token);
    logprobs.push_back(finite_logprob(t.logprob));
    ojson alternatives = ojson::object();
    alternatives[t.token] = finite_logprob(t.logprob);
    for (const LogprobAlternative& a : t.top) {
      if (!alternatives.contains(a.token)) alternatives[a.token] = finite_logprob(a.logprob);
    }
    top.push_back(std::move(alternatives));
    offsets.push_back(offset);
    offset += static_cast<int64_t>(t.token.size());
  }
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(logprobs)},
          {"top_logprobs", std::move(top)},
          {"text_offset", std::move(offsets)}};
}

ojson finish_json(const ChoiceResult& c) {
  if (c.finish_reason.empty()) return nullptr;
  return c.finish_reason;
}

ojson head(const ResponseMeta& meta, std::string_view object) {
  ojson j;
  j["id"] = meta.id;
  j["object"] = object;
  j["created"] = meta.created;
  j["model"] = meta.model;
  return j;
}

ojson model_json(std::string_view model, int64_t created, int32_t max_context) {
  ojson m;
  m["id"] = model;
  m["object"] = "model";
  m["created"] = created;
  m["owned_by"] = "pdserve";
  m["max_model_len"] = max_context;
  return m;
}

}  // namespace

ApiResult<ChatCompletionRequest> parse_chat_completion_request(std::string_view body) {
  json o;
  if (auto e = parse_object(body, &o)) return *e;
  ChatCompletionRequest r;
  if (auto e = parse_common(o, &r.params)) return *e;
  if (auto e = parse_messages(o, &r.messages)) return *e;
  if (auto e = get_bool(o, "logprobs", &r.params.logprobs)) return *e;
  std::optional<int64_t> top;
  if (auto e = get_int(o, "top_logprobs", 0, kMaxTopLogprobsChat, &top)) return *e;
  if (top) {
    if (!r.params.logprobs) return bad("top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
    r.params.sampling.top_logprobs = static_cast<int32_t>(*top);
  }
  if (auto e = check_choices(1, r.params.n)) return *e;
  return r;
}

ApiResult<CompletionRequest> parse_completion_request(std::string_view body) {
  json o;
  if (auto e = parse_object(body, &o)) return *e;
  CompletionRequest r;
  if (auto e = parse_common(o, &r.params)) return *e;
  if (auto e = parse_prompts(o, &r.prompts)) return *e;
  std::optional<int64_t> logprobs;
  if (auto e = get_int(o, "logprobs", 0, kMaxLogprobsCompletions, &logprobs)) return *e;
  if (logprobs) {
    r.params.logprobs = true;
    r.params.sampling.top_logprobs = static_cast<int32_t>(*logprobs);
  }
  if (auto e = get_bool(o, "echo", &r.echo)) return *e;
  if (r.echo && r.params.logprobs) {
    return unsupported("echo",
                       "echo together with logprobs needs prompt log-probabilities, which are not reported");
  }
  if (const json* v = field(o, "suffix"); v && !(v->is_string() && v->get<std::string>().empty())) {
    return unsupported("suffix", "insertion (fill-in-the-middle) is not implemented");
  }
  std::optional<int64_t> best_of;
  if (auto e = get_int(o, "best_of", 1, kMaxChoices, &best_of)) return *e;
  if (best_of && *best_of != r.params.n) {
    return unsupported("best_of", "best_of other than n is not implemented");
  }
  if (auto e = check_choices(r.prompts.size(), r.params.n)) return *e;
  return r;
}

ApiResult<TokenizeRequest> parse_tokenize_request(std::string_view body) {
  json o;
  if (auto e = parse_object(body, &o)) return *e;
  TokenizeRequest r;
  if (auto e = get_string(o, "model", &r.model)) return *e;
  const char* key = field(o, "content") ? "content" : "prompt";
  const json* text = field(o, key);
  if (!text) return bad("content", "'content' (or 'prompt') is required", "missing_required_parameter");
  if (!text->is_string()) return wrong_type(key, "a string", *text);
  r.text = text->get<std::string>();
  if (auto e = get_bool(o, "add_special", &r.add_special)) return *e;
  if (auto e = get_bool(o, "add_special_tokens", &r.add_special)) return *e;
  if (auto e = get_bool(o, "parse_special", &r.parse_special)) return *e;
  return r;
}

ApiResult<DetokenizeRequest> parse_detokenize_request(std::string_view body) {
  json o;
  if (auto e = parse_object(body, &o)) return *e;
  DetokenizeRequest r;
  if (auto e = get_string(o, "model", &r.model)) return *e;
  const json* t = field(o, "tokens");
  if (!t) return bad("tokens", "'tokens' is required", "missing_required_parameter");
  if (!t->is_array()) return wrong_type("tokens", "an array of token ids", *t);
  if (auto e = parse_token_ids(*t, "tokens", &r.tokens)) return *e;
  return r;
}

std::string chat_completion_body(const ResponseMeta& meta, std::span<const ChoiceResult> choices,
                                 const Usage& usage) {
  ojson j = head(meta, "chat.completion");
  ojson cs = ojson::array();
  for (const ChoiceResult& c : choices) {
    ojson choice;
    choice["index"] = c.index;
    choice["message"] = {{"role", "assistant"}, {"content", c.text}, {"refusal", nullptr}};
    choice["logprobs"] = chat_logprobs_json(c);
    choice["finish_reason"] = finish_json(c);
    cs.push_back(std::move(choice));
  }
  j["choices"] = std::move(cs);
  j["usage"] = usage_json(usage);
  return dump(j);
}

std::string completion_body(const ResponseMeta& meta, std::span<const ChoiceResult> choices,
                            const Usage& usage) {
  ojson j = head(meta, "text_completion");
  ojson cs = ojson::array();
  for (const ChoiceResult& c : choices) {
    ojson choice;
    choice["index"] = c.index;
    choice["text"] = c.text;
    choice["logprobs"] = completion_logprobs_json(c);
    choice["finish_reason"] = finish_json(c);
    cs.push_back(std::move(choice));
  }
  j["choices"] = std::move(cs);
  j["usage"] = usage_json(usage);
  return dump(j);
}

std::string chat_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool with_role,
                       bool include_usage) {
  ojson j = head(meta, "chat.completion.chunk");
  ojson d = ojson::object();
  if (with_role) d["role"] = "assistant";
  if (with_role || !delta.text.empty()) d["content"] = delta.text;
  ojson choice;
  choice["index"] = delta.index;
  choice["delta"] = std::move(d);
  choice["logprobs"] = chat_logprobs_json(delta);
  choice["finish_reason"] = finish_json(delta);
  j["choices"] = ojson::array({std::move(choice)});
  if (include_usage) j["usage"] = nullptr;
  return dump(j);
}

std::string completion_chunk(const ResponseMeta& meta, const ChoiceResult& delta, bool include_usage) {
  ojson j = head(meta, "text_completion");
  ojson choice;
  choice["index"] = delta.index;
  choice["text"] = delta.text;
  choice["logprobs"] = completion_logprobs_json(delta);
  choice["finish_reason"] = finish_json(delta);
  j["choices"] = ojson::array({std::move(choice)});
  if (include_usage) j["usage"] = nullptr;
  return dump(j);
}

std::string usage_chunk(const ResponseMeta& meta, Endpoint endpoint, const Usage& usage) {
  ojson j = head(meta, endpoint == Endpoint::kChatCompletions ? "chat.completion.chunk" : "text_completion");
  j["choices"] = ojson::array();
  j["usage"] = usage_json(usage);
  return dump(j);
}

std::string sse_data(std::string_view payload) {
  std::string s;
  s.reserve(payload.size() + 8);
  s += "data: ";
  s += payload;
  s += "\n\n";
  return s;
}

std::string models_body(std::span<const std::string> models, int64_t created, int32_t max_context) {
  ojson j;
  j["object"] = "list";
  j["data"] = ojson::array();
  for (const std::string& m : models) j["data"].push_back(model_json(m, created, max_context));
  return dump(j);
}

std::string model_body(std::string_view model, int64_t created, int32_t max_context) {
  return dump(model_json(model, created, max_context));
}

std::string tokenize_body(std::span<const int32_t> tokens, int32_t max_context) {
  ojson j;
  j["tokens"] = std::vector<int32_t>(tokens.begin(), tokens.end());
  j["count"] = tokens.size();
  j["max_model_len"] = max_context;
  return dump(j);
}

std::string detokenize_body(std::string_view text) {
  ojson j;
  j["content"] = text;
  return dump(j);
}

std::string health_body(std::string_view status) {
  ojson j;
  j["status"] = status;
  return dump(j);
}

// ---- api_error.h ----------------------------------------------------------------------------

int http_status_for(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return 200;
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
    case StatusCode::kFailedPrecondition:
    case StatusCode::kUnimplemented: return 400;
    case StatusCode::kUnauthenticated: return 401;
    case StatusCode::kNotFound: return 404;
    case StatusCode::kResourceExhausted: return 429;
    case StatusCode::kUnavailable:
    case StatusCode::kCancelled: return 503;
    case StatusCode::kDeadlineExceeded: return 504;
    case StatusCode::kDataLoss:
    case StatusCode::kInternal: return 500;
  }
  return 500;
}

std::string error_type_for(int http_status) {
  switch (http_status) {
    case 401: return "authentication_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable_error";
    default: return http_status >= 500 ? "server_error" : "invalid_request_error";
  }
}

ApiError api_error(const Status& status, std::string param, std::string code) {
  ApiError e = http_error(http_status_for(status.code()), status.message(), std::move(code));
  e.param = std::move(param);
  if (e.http_status == 429) e.headers.emplace_back("Retry-After", "1");
  return e;
}

ApiError http_error(int http_status, std::string message, std::string code) {
  ApiError e;
  e.http_status = http_status;
  e.message = std::move(message);
  e.type = error_type_for(http_status);
  e.code = std::move(code);
  return e;
}

std::string error_body(const ApiError& error) {
  ojson e;
  e["message"] = error.message;
  e["type"] = error.type;
  e["param"] = error.param.empty() ? ojson(nullptr) : ojson(error.param);
  e["code"] = error.code.empty() ? ojson(nullptr) : ojson(error.code);
  ojson j;
  j["error"] = std::move(e);
  return dump(j);
}

}  // namespace pdserve::api

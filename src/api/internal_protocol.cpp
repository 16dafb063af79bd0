#include "api/internal_protocol.h"

#include <fmt/format.h>

#include <limits>
#include <nlohmann/json.hpp>
#include <type_traits>

namespace pdserve::api {

namespace {

using json = nlohmann::json;

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

StatusOr<json> parse_object(std::string_view text, std::string_view what) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return invalid_argument(fmt::format("{}: not valid JSON", what));
  if (!j.is_object()) return invalid_argument(fmt::format("{}: expected a JSON object", what));
  return j;
}

// Typed field readers: a missing field is `fallback` unless required; a wrong type or a value out
// of range is an error naming the field.
class Reader {
 public:
  Reader(const json& j, std::string where) : j_(j), where_(std::move(where)) {}

  template <typename Int>
  Status integer(const char* key, Int& out, Int lo, Int hi, bool required = false) const {
    auto it = j_.find(key);
    if (it == j_.end()) return required ? missing(key) : ok_status();
    if (!it->is_number_integer()) return type(key, "an integer");
    if (it->is_number_unsigned()) {  // nlohmann parses every non-negative integer as unsigned
      const uint64_t v = it->get<uint64_t>();
      if (v > static_cast<uint64_t>(hi)) return range(key);
      if constexpr (std::is_signed_v<Int>) {
        if (static_cast<Int>(v) < lo) return range(key);
      } else {
        if (v < lo) return range(key);
      }
      out = static_cast<Int>(v);
      return ok_status();
    }
    const int64_t v = it->get<int64_t>();  // negative
    if constexpr (std::is_signed_v<Int>) {
      if (v < static_cast<int64_t>(lo) || v > static_cast<int64_t>(hi)) return range(key);
      out = static_cast<Int>(v);
      return ok_status();
    } else {
      return range(key);
    }
  }
  Status number(const char* key, float& out) const {
    auto it = j_.find(key);
    if (it == j_.end()) return ok_status();
    if (!it->is_number()) return type(key, "a number");
    out = it->get<float>();
    return ok_status();
  }
  Status number(const char* key, double& out) const {
    auto it = j_.find(key);
    if (it == j_.end()) return ok_status();
    if (!it->is_number()) return type(key, "a number");
    out = it->get<double>();
    return ok_status();
  }
  Status boolean(const char* key, bool& out) const {
    auto it = j_.find(key);
    if (it == j_.end()) return ok_status();
    if (!it->is_boolean()) return type(key, "true or false");
    out = it->get<bool>();
    return ok_status();
  }
  Status string(const char* key, std::string& out, bool required = false) const {
    auto it = j_.find(key);
    if (it == j_.end()) return required ? missing(key) : ok_status();
    if (!it->is_string()) return type(key, "a string");
    out = it->get<std::string>();
    return ok_status();
  }
  const json* find(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  Status missing(const char* key) const {
    return invalid_argument(fmt::format("{}: '{}' is missing", where_, key));
  }
  Status type(const char* key, const char* expected) const {
    return invalid_argument(fmt::format("{}: '{}' must be {}", where_, key, expected));
  }
  Status range(const char* key) const {
    return invalid_argument(fmt::format("{}: '{}' is out of range", where_, key));
  }

 private:
  const json& j_;
  std::string where_;
};

constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr size_t kMaxPromptTokens = size_t{1} << 24;

json request_json(const EngineRequest& r) {
  const SamplingParams& s = r.sampling;
  json j{{"prompt", r.prompt},
         {"max_tokens", r.max_tokens},
         {"stop", r.stop},
         {"ignore_eos", r.ignore_eos},
         {"logprobs", r.logprobs},
         {"wait_budget_us", r.wait_budget_us},
         {"wait_queue", r.wait_queue},
         {"queue_if_full", r.queue_if_full},
         {"sampling",
          {{"temperature", s.temperature},
           {"top_k", s.top_k},
           {"top_p", s.top_p},
           {"min_p", s.min_p},
           {"repetition_penalty", s.repetition_penalty},
           {"presence_penalty", s.presence_penalty},
           {"frequency_penalty", s.frequency_penalty},
           {"seed", s.seed},
           {"top_logprobs", s.top_logprobs}}}};
  if (r.response_format == ResponseFormat::kJsonObject) j["response_format"] = "json_object";  // absent: text
  if (!s.logit_bias.empty()) {  // [[token, bias], ...], ascending (absent: none, as older peers send)
    json biases = json::array();
    for (const LogitBias& b : s.logit_bias) biases.push_back(json::array({b.token, b.bias}));
    j["sampling"]["logit_bias"] = std::move(biases);
  }
  return j;
}

StatusOr<EngineRequest> request_from(const json& j) {
  if (!j.is_object()) return invalid_argument("request: expected a JSON object");
  Reader r(j, "request");
  EngineRequest out;
  const json* prompt = r.find("prompt");
  if (prompt == nullptr) return r.missing("prompt");
  if (!prompt->is_array() || prompt->size() > kMaxPromptTokens)
    return r.type("prompt", "an array of token ids");
  out.prompt.reserve(prompt->size());
  for (const json& t : *prompt) {
    if (!t.is_number_integer()) return r.type("prompt", "an array of token ids");
    const int64_t v = t.get<int64_t>();
    if (v < 0 || v > kI32Max) return r.range("prompt");
    out.prompt.push_back(static_cast<int32_t>(v));
  }
  PD_RETURN_IF_ERROR(r.integer("max_tokens", out.max_tokens, 0, kI32Max, true));
  PD_RETURN_IF_ERROR(r.boolean("ignore_eos", out.ignore_eos));
  PD_RETURN_IF_ERROR(r.boolean("logprobs", out.logprobs));
  PD_RETURN_IF_ERROR(r.integer("wait_budget_us", out.wait_budget_us, int64_t{-1}, kI64Max));
  PD_RETURN_IF_ERROR(
      r.integer("wait_queue", out.wait_queue, uint64_t{0}, std::numeric_limits<uint64_t>::max()));
  PD_RETURN_IF_ERROR(r.boolean("queue_if_full", out.queue_if_full));
  std::string format = "text";
  PD_RETURN_IF_ERROR(r.string("response_format", format));
  if (format == "json_object") {
    out.response_format = ResponseFormat::kJsonObject;
  } else if (format != "text") {
    return r.type("response_format", "\"text\" or \"json_object\"");
  }
  if (const json* stop = r.find("stop")) {
    if (!stop->is_array() || stop->size() > 64) return r.type("stop", "an array of strings");
    for (const json& s : *stop) {
      if (!s.is_string()) return r.type("stop", "an array of strings");
      out.stop.push_back(s.get<std::string>());
    }
  }
  if (const json* sampling = r.find("sampling")) {
    if (!sampling->is_object()) return r.type("sampling", "an object");
    Reader s(*sampling, "request.sampling");
    SamplingParams& p = out.sampling;
    PD_RETURN_IF_ERROR(s.number("temperature", p.temperature));
    PD_RETURN_IF_ERROR(s.integer("top_k", p.top_k, 0, kI32Max));
    PD_RETURN_IF_ERROR(s.number("top_p", p.top_p));
    PD_RETURN_IF_ERROR(s.number("min_p", p.min_p));
    PD_RETURN_IF_ERROR(s.number("repetition_penalty", p.repetition_penalty));
    PD_RETURN_IF_ERROR(s.number("presence_penalty", p.presence_penalty));
    PD_RETURN_IF_ERROR(s.number("frequency_penalty", p.frequency_penalty));
    PD_RETURN_IF_ERROR(s.integer("seed", p.seed, uint64_t{0}, std::numeric_limits<uint64_t>::max()));
    PD_RETURN_IF_ERROR(s.integer("top_logprobs", p.top_logprobs, 0, 1000));
    if (const json* biases = s.find("logit_bias")) {
      // At most one per token id: the vocabulary bounds them, and validate() checks the order.
      constexpr size_t kMaxBiases = size_t{1} << 24;
      if (!biases->is_array() || biases->size() > kMaxBiases)
        return s.type("logit_bias", "an array of [token id, bias] pairs");
      p.logit_bias.reserve(biases->size());
      for (const json& b : *biases) {
        if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number())
          return s.type("logit_bias", "an array of [token id, bias] pairs");
        const int64_t token = b[0].get<int64_t>();
        if (token < 0 || token > kI32Max) return s.range("logit_bias");
        p.logit_bias.push_back({static_cast<int32_t>(token), b[1].get<float>()});
      }
    }
    // The ranges the public API enforces (a peer's bytes are checked as strictly).
    if (Status valid = p.validate(); !valid.ok()) return valid.with_context("request.sampling");
  }
  return out;
}

json handoff_json(const EngineHandoff& h) {
  return json{
      {"kv", h.kv.to_string()}, {"first_token", h.first_token}, {"num_prompt_tokens", h.num_prompt_tokens}};
}

StatusOr<EngineHandoff> handoff_from(const json& j) {
  if (!j.is_object()) return invalid_argument("handoff: expected a JSON object");
  Reader r(j, "handoff");
  EngineHandoff h;
  std::string kv;
  PD_RETURN_IF_ERROR(r.string("kv", kv, true));
  StatusOr<KvHandle> handle = KvHandle::parse(kv);
  if (!handle.ok()) return handle.status().with_context("handoff.kv");
  h.kv = std::move(*handle);
  PD_RETURN_IF_ERROR(r.integer("first_token", h.first_token, -1, kI32Max, true));
  PD_RETURN_IF_ERROR(r.integer("num_prompt_tokens", h.num_prompt_tokens, 1, kI32Max, true));
  return h;
}

json status_json(const Status& st) {
  json j{{"code", std::string(status_code_name(st.code()))}, {"message", st.message()}};
  if (!st.reason().empty()) j["reason"] = st.reason();
  return j;
}

Status status_from(const json& j) {
  if (!j.is_object()) return internal_error("peer error without a body");
  std::string code, message, reason;
  Reader r(j, "error");
  if (!r.string("code", code).ok() || !r.string("message", message).ok() ||
      !r.string("reason", reason).ok()) {
    return internal_error("peer error with a malformed body");
  }
  for (int c = 1; c <= static_cast<int>(StatusCode::kInternal); ++c) {
    auto sc = static_cast<StatusCode>(c);
    if (status_code_name(sc) == code) return Status(sc, std::move(message)).with_reason(std::move(reason));
  }
  return internal_error(fmt::format("peer error '{}': {}", code, message));
}

json output_json(const EngineOutput& o) {
  json tokens = json::array();
  for (const GeneratedToken& t : o.tokens) {
    json top = json::array();
    for (const TokenLogprob& l : t.top) top.push_back(json::array({l.token, l.logprob}));
    tokens.push_back(json{{"id", t.id}, {"logprob", t.logprob}, {"top", std::move(top)}});
  }
  json j{{"text", o.text}, {"tokens", std::move(tokens)}, {"finished", o.finished}};
  if (o.finished) {
    j["finish_reason"] = o.finish_reason;
    j["prompt_tokens"] = o.prompt_tokens;
    j["completion_tokens"] = o.completion_tokens;
    j["cached_prompt_tokens"] = o.cached_prompt_tokens;
    if (!o.error.ok()) j["error"] = status_json(o.error);
  }
  // An early (layer-wise) handoff comes in an unfinished output.
  if (o.handoff) {
    j["handoff"] = handoff_json(*o.handoff);
    j["cached_prompt_tokens"] = o.cached_prompt_tokens;
  }
  return j;
}

StatusOr<EngineOutput> output_from(const json& j) {
  Reader r(j, "output");
  EngineOutput o;
  PD_RETURN_IF_ERROR(r.string("text", o.text));
  PD_RETURN_IF_ERROR(r.boolean("finished", o.finished));
  if (const json* tokens = r.find("tokens")) {
    if (!tokens->is_array()) return r.type("tokens", "an array");
    for (const json& t : *tokens) {
      if (!t.is_object()) return r.type("tokens", "an array of objects");
      Reader tr(t, "output.tokens[]");
      GeneratedToken g;
      PD_RETURN_IF_ERROR(tr.integer("id", g.id, 0, kI32Max, true));
      PD_RETURN_IF_ERROR(tr.number("logprob", g.logprob));
      if (const json* top = tr.find("top")) {
        if (!top->is_array()) return tr.type("top", "an array");
        for (const json& pair : *top) {
          if (!pair.is_array() || pair.size() != 2 || !pair[0].is_number_integer() || !pair[1].is_number()) {
            return tr.type("top", "an array of [token, logprob] pairs");
          }
          g.top.push_back({pair[0].get<int32_t>(), pair[1].get<float>()});
        }
      }
      o.tokens.push_back(std::move(g));
    }
  }
  if (o.finished) {
    PD_RETURN_IF_ERROR(r.string("finish_reason", o.finish_reason, true));
    PD_RETURN_IF_ERROR(r.integer("prompt_tokens", o.prompt_tokens, 0, kI32Max));
    PD_RETURN_IF_ERROR(r.integer("completion_tokens", o.completion_tokens, 0, kI32Max));
    PD_RETURN_IF_ERROR(r.integer("cached_prompt_tokens", o.cached_prompt_tokens, 0, kI32Max));
    if (const json* e = r.find("error")) o.error = status_from(*e);
    if (o.finish_reason == "error" && o.error.ok())
      o.error = internal_error("the instance failed the request");
  }
  if (const json* h = r.find("handoff")) {
    PD_ASSIGN_OR_RETURN(EngineHandoff handoff, handoff_from(*h));
    o.handoff = std::move(handoff);
    if (!o.finished) {
      PD_RETURN_IF_ERROR(r.integer("cached_prompt_tokens", o.cached_prompt_tokens, 0, kI32Max));
      if (o.handoff->first_token != -1)
        return invalid_argument(
            "output: an unfinished output's handoff must have first_token -1 (layer-wise)");
      if (!o.tokens.empty() || !o.text.empty())
        return invalid_argument("output: an early (layer-wise) handoff carries no tokens or text");
    } else if (o.handoff->first_token < 0) {
      return invalid_argument("output: a final handoff must name its first token");
    }
  }
  return o;
}

json kv_stats_json(const KvCacheStats& k) {
  return json{{"num_blocks_total", k.num_blocks_total},
              {"num_blocks_used", k.num_blocks_used},
              {"num_blocks_free", k.num_blocks_free},
              {"num_blocks_cached_evictable", k.num_blocks_cached_evictable},
              {"num_blocks_cached", k.num_blocks_cached},
              {"num_sequences", k.num_sequences},
              {"prefix_lookups_total", k.prefix_lookups_total},
              {"prefix_queried_tokens_total", k.prefix_queried_tokens_total},
              {"prefix_hit_tokens_total", k.prefix_hit_tokens_total},
              {"prefix_conflicts_total", k.prefix_conflicts_total},
              {"evictions_total", k.evictions_total}};
}

Status kv_stats_from(const json& j, KvCacheStats& k) {
  Reader r(j, "metrics.kv");
  PD_RETURN_IF_ERROR(r.integer("num_blocks_total", k.num_blocks_total, 0, kI32Max));
  PD_RETURN_IF_ERROR(r.integer("num_blocks_used", k.num_blocks_used, 0, kI32Max));
  PD_RETURN_IF_ERROR(r.integer("num_blocks_free", k.num_blocks_free, 0, kI32Max));
  PD_RETURN_IF_ERROR(r.integer("num_blocks_cached_evictable", k.num_blocks_cached_evictable, 0, kI32Max));
  PD_RETURN_IF_ERROR(r.integer("num_blocks_cached", k.num_blocks_cached, 0, kI32Max));
  PD_RETURN_IF_ERROR(r.integer("num_sequences", k.num_sequences, 0, kI32Max));
  PD_RETURN_IF_ERROR(r.integer("prefix_lookups_total", k.prefix_lookups_total, int64_t{0}, kI64Max));
  PD_RETURN_IF_ERROR(
      r.integer("prefix_queried_tokens_total", k.prefix_queried_tokens_total, int64_t{0}, kI64Max));
  PD_RETURN_IF_ERROR(r.integer("prefix_hit_tokens_total", k.prefix_hit_tokens_total, int64_t{0}, kI64Max));
  PD_RETURN_IF_ERROR(r.integer("prefix_conflicts_total", k.prefix_conflicts_total, int64_t{0}, kI64Max));
  PD_RETURN_IF_ERROR(r.integer("evictions_total", k.evictions_total, int64_t{0}, kI64Max));
  return ok_status();
}

// EngineMetrics fields by name, so encoding and decoding cannot drift apart.
template <typename Fn>
void for_each_metric(EngineMetrics& m, Fn&& fn) {
  fn("running", m.running);
  fn("waiting", m.waiting);
  fn("preemptions_total", m.preemptions_total);
  fn("prompt_tokens_total", m.prompt_tokens_total);
  fn("generated_tokens_total", m.generated_tokens_total);
  fn("computed_tokens_total", m.computed_tokens_total);
  fn("nonfinite_logits_total", m.nonfinite_logits_total);
  fn("prefill_slots_in_use", m.prefill_slots_in_use);
  fn("handoffs_outstanding", m.handoffs_outstanding);
  fn("handoffs_total", m.handoffs_total);
  fn("layer_wise_handoffs_total", m.layer_wise_handoffs_total);
  fn("handoff_leases_expired_total", m.handoff_leases_expired_total);
  fn("priority_refusals_total", m.priority_refusals_total);
  fn("decode_pending", m.decode_pending);
  fn("kv_pulls_in_flight", m.kv_pulls_in_flight);
  fn("kv_pulls_failed_total", m.kv_pulls_failed_total);
  fn("kv_pulls_total", m.kv_pulls_total);
  fn("kv_pulled_bytes_total", m.kv_pulled_bytes_total);
  fn("kv_pull_microseconds_total", m.kv_pull_microseconds_total);
  fn("steps_total", m.steps_total);
}

}  // namespace

std::vector<std::string> instance_features() {
  return {std::string(kFeatureLogitBias), std::string(kFeatureJsonObject)};
}

std::vector<std::string_view> features_used(const EngineRequest& r) {
  std::vector<std::string_view> used;
  if (!r.sampling.logit_bias.empty()) used.push_back(kFeatureLogitBias);
  if (r.response_format == ResponseFormat::kJsonObject) used.push_back(kFeatureJsonObject);
  return used;
}

std::string encode_engine_request(const EngineRequest& request) { return dump(request_json(request)); }

StatusOr<EngineRequest> decode_engine_request(std::string_view text) {
  PD_ASSIGN_OR_RETURN(json j, parse_object(text, "request"));
  return request_from(j);
}

std::string encode_handoff_request(const EngineRequest& request, const EngineHandoff& handoff) {
  return dump(json{{"request", request_json(request)}, {"handoff", handoff_json(handoff)}});
}

StatusOr<std::pair<EngineRequest, EngineHandoff>> decode_handoff_request(std::string_view text) {
  PD_ASSIGN_OR_RETURN(json j, parse_object(text, "handoff request"));
  auto r = j.find("request");
  auto h = j.find("handoff");
  if (r == j.end()) return invalid_argument("handoff request: 'request' is missing");
  if (h == j.end()) return invalid_argument("handoff request: 'handoff' is missing");
  PD_ASSIGN_OR_RETURN(EngineRequest request, request_from(*r));
  PD_ASSIGN_OR_RETURN(EngineHandoff handoff, handoff_from(*h));
  return std::make_pair(std::move(request), std::move(handoff));
}

std::string encode_release(const KvBufferRef& kv) {
  return dump(json{{"buffer_id", kv.buffer_id}, {"generation", kv.generation}});
}

StatusOr<KvBufferRef> decode_release(std::string_view text) {
  PD_ASSIGN_OR_RETURN(json j, parse_object(text, "release"));
  Reader r(j, "release");
  KvBufferRef kv;
  PD_RETURN_IF_ERROR(
      r.integer("buffer_id", kv.buffer_id, uint32_t{0}, std::numeric_limits<uint32_t>::max(), true));
  PD_RETURN_IF_ERROR(
      r.integer("generation", kv.generation, uint64_t{0}, std::numeric_limits<uint64_t>::max(), true));
  return kv;
}

std::string encode_instance_stats(const InstanceStats& s) {
  json metrics{{"kv", kv_stats_json(s.metrics.kv)}, {"step_seconds_total", s.metrics.step_seconds_total}};
  EngineMetrics m = s.metrics;
  for_each_metric(m, [&](const char* key, auto& v) { metrics[key] = v; });
  json reasons = json::object();
  for (const auto& [reason, n] : s.metrics.finished_by_reason) reasons[reason] = n;
  metrics["finished_by_reason"] = std::move(reasons);
  return dump(json{{"role", std::string(engine_role_name(s.role))},
                   {"max_context", s.max_context},
                   {"max_sequence_tokens", s.max_sequence_tokens},
                   {"model_fingerprint", s.model_fingerprint},
                   {"transport", s.transport},
                   {"kv_dtype", s.kv_dtype},
                   {"features", s.features},
                   {"metrics", std::move(metrics)}});
}

StatusOr<InstanceStats> decode_instance_stats(std::string_view text) {
  PD_ASSIGN_OR_RETURN(json j, parse_object(text, "stats"));
  Reader r(j, "stats");
  InstanceStats s;
  std::string role;
  PD_RETURN_IF_ERROR(r.string("role", role, true));
  if (role == "prefill") {
    s.role = EngineRole::kPrefill;
  } else if (role == "decode") {
    s.role = EngineRole::kDecode;
  } else if (role == "mixed") {
    s.role = EngineRole::kMixed;
  } else {
    return invalid_argument(fmt::format("stats: unknown role '{}'", role));
  }
  PD_RETURN_IF_ERROR(r.integer("max_context", s.max_context, 1, kI32Max, true));
  PD_RETURN_IF_ERROR(r.integer("max_sequence_tokens", s.max_sequence_tokens, int64_t{1}, kI64Max, true));
  PD_RETURN_IF_ERROR(r.integer("model_fingerprint", s.model_fingerprint, uint64_t{0},
                               std::numeric_limits<uint64_t>::max(), true));
  PD_RETURN_IF_ERROR(r.string("transport", s.transport));
  PD_RETURN_IF_ERROR(r.string("kv_dtype", s.kv_dtype));
  if (const json* features = r.find("features")) {
    if (!features->is_array() || features->size() > 64) return r.type("features", "an array of strings");
    for (const json& f : *features) {
      if (!f.is_string()) return r.type("features", "an array of strings");
      s.features.push_back(f.get<std::string>());
    }
  }
  if (const json* m = r.find("metrics")) {
    if (!m->is_object()) return r.type("metrics", "an object");
    Reader mr(*m, "stats.metrics");
    Status st = ok_status();
    for_each_metric(s.metrics, [&](const char* key, auto& v) {
      using T = std::remove_reference_t<decltype(v)>;
      if (st.ok()) st = mr.integer(key, v, T{0}, std::numeric_limits<T>::max());
    });
    PD_RETURN_IF_ERROR(st);
    PD_RETURN_IF_ERROR(mr.number("step_seconds_total", s.metrics.step_seconds_total));
    if (const json* kv = mr.find("kv")) PD_RETURN_IF_ERROR(kv_stats_from(*kv, s.metrics.kv));
    if (const json* reasons = mr.find("finished_by_reason")) {
      if (!reasons->is_object()) return mr.type("finished_by_reason", "an object");
      for (auto it = reasons->begin(); it != reasons->end(); ++it) {
        if (!it.value().is_number_integer()) return mr.type("finished_by_reason", "an object of counts");
        s.metrics.finished_by_reason[it.key()] = it.value().get<int64_t>();
      }
    }
  }
  return s;
}

std::string encode_stream_event(const StreamEvent& event) {
  if (const auto* pulled = std::get_if<PulledEvent>(&event)) {
    json p{{"ok", pulled->status.ok()}};
    if (!pulled->status.ok()) p["error"] = status_json(pulled->status);
    return dump(json{{"pulled", std::move(p)}});
  }
  return dump(output_json(std::get<EngineOutput>(event)));
}

StatusOr<StreamEvent> decode_stream_event(std::string_view text) {
  PD_ASSIGN_OR_RETURN(json j, parse_object(text, "stream event"));
  if (auto p = j.find("pulled"); p != j.end()) {
    if (!p->is_object()) return invalid_argument("stream event: 'pulled' must be an object");
    PulledEvent e;
    auto ok = p->find("ok");
    if (ok == p->end() || !ok->is_boolean())
      return invalid_argument("stream event: 'pulled.ok' must be true or false");
    if (!ok->get<bool>()) {
      auto err = p->find("error");
      e.status = err == p->end() ? unavailable("the decode could not fetch the KV") : status_from(*err);
      if (e.status.ok()) e.status = unavailable("the decode could not fetch the KV");
    }
    return StreamEvent(std::move(e));
  }
  PD_ASSIGN_OR_RETURN(EngineOutput o, output_from(j));
  return StreamEvent(std::move(o));
}

std::string encode_status(const Status& status) { return dump(json{{"error", status_json(status)}}); }

Status decode_status(std::string_view text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("error")) {
    return internal_error(fmt::format("peer answered without an error body: {}", text.substr(0, 200)));
  }
  return status_from(j["error"]);
}

}  // namespace pdserve::api

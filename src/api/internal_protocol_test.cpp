#include "api/internal_protocol.h"

#include <gtest/gtest.h>

namespace pdserve::api {
namespace {

EngineRequest sample_request() {
  EngineRequest r;
  r.prompt = {1, 2, 30000, 7};
  r.max_tokens = 33;
  r.stop = {"\n\n", "END"};
  r.ignore_eos = true;
  r.logprobs = true;
  r.sampling.temperature = 0.7f;
  r.sampling.top_k = 40;
  r.sampling.top_p = 0.9f;
  r.sampling.min_p = 0.05f;
  r.sampling.repetition_penalty = 1.1f;
  r.sampling.presence_penalty = 0.5f;
  r.sampling.frequency_penalty = -0.25f;
  r.sampling.seed = 18446744073709551557ull;  // beyond int64
  r.sampling.top_logprobs = 3;
  r.sampling.logit_bias = {{0, -100.0f}, {7, 0.25f}, {49151, 100.0f}};
  r.wait_budget_us = 1'234'567;
  r.wait_queue = 0xfedcba9876543211ull;  // beyond int64
  r.queue_if_full = true;
  r.response_format = ResponseFormat::kJsonObject;
  return r;
}

EngineHandoff sample_handoff() {
  EngineHandoff h;
  h.kv.kind = TransportKind::kTcp;
  h.kv.endpoint = "127.0.0.1:4567";
  h.kv.buffer_id = 3;
  h.kv.generation = 99;
  h.kv.bytes = 4160;
  h.first_token = 42;
  h.num_prompt_tokens = 4;
  return h;
}

void expect_same(const EngineRequest& a, const EngineRequest& b) {
  EXPECT_EQ(a.prompt, b.prompt);
  EXPECT_EQ(a.max_tokens, b.max_tokens);
  EXPECT_EQ(a.stop, b.stop);
  EXPECT_EQ(a.ignore_eos, b.ignore_eos);
  EXPECT_EQ(a.logprobs, b.logprobs);
  EXPECT_EQ(a.sampling.temperature, b.sampling.temperature);
  EXPECT_EQ(a.sampling.top_k, b.sampling.top_k);
  EXPECT_EQ(a.sampling.top_p, b.sampling.top_p);
  EXPECT_EQ(a.sampling.min_p, b.sampling.min_p);
  EXPECT_EQ(a.sampling.repetition_penalty, b.sampling.repetition_penalty);
  EXPECT_EQ(a.sampling.presence_penalty, b.sampling.presence_penalty);
  EXPECT_EQ(a.sampling.frequency_penalty, b.sampling.frequency_penalty);
  EXPECT_EQ(a.sampling.seed, b.sampling.seed);
  EXPECT_EQ(a.sampling.top_logprobs, b.sampling.top_logprobs);
  EXPECT_EQ(a.sampling.logit_bias, b.sampling.logit_bias);
  EXPECT_EQ(a.wait_budget_us, b.wait_budget_us);
  EXPECT_EQ(a.wait_queue, b.wait_queue);
  EXPECT_EQ(a.queue_if_full, b.queue_if_full);
  EXPECT_EQ(a.response_format, b.response_format);
}

TEST(InternalProtocol, RequestsAndHandoffsRoundTrip) {
  const EngineRequest r = sample_request();
  auto back = decode_engine_request(encode_engine_request(r));
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  expect_same(r, *back);

  auto h = decode_handoff_request(encode_handoff_request(r, sample_handoff()));
  ASSERT_TRUE(h.ok()) << h.status().to_string();
  expect_same(r, h->first);
  EXPECT_EQ(h->second.kv, sample_handoff().kv);
  EXPECT_EQ(h->second.first_token, 42);
  EXPECT_EQ(h->second.num_prompt_tokens, 4);

  auto kv = decode_release(encode_release({7, 123456789012345ull}));
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->buffer_id, 7u);
  EXPECT_EQ(kv->generation, 123456789012345ull);
}

TEST(InternalProtocol, OutputsAndPulledEventsRoundTrip) {
  EngineOutput o;
  o.text = "Paris \xE2\x9C\x93";
  o.tokens.push_back({12, -0.25f, {{12, -0.25f}, {13, -2.5f}}});
  o.finished = true;
  o.finish_reason = "handoff";
  o.prompt_tokens = 4;
  o.completion_tokens = 1;
  o.cached_prompt_tokens = 16;
  o.handoff = sample_handoff();
  auto e = decode_stream_event(encode_stream_event(StreamEvent(o)));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  const EngineOutput& b = std::get<EngineOutput>(*e);
  EXPECT_EQ(b.text, o.text);
  ASSERT_EQ(b.tokens.size(), 1u);
  EXPECT_EQ(b.tokens[0].id, 12);
  EXPECT_EQ(b.tokens[0].logprob, -0.25f);
  ASSERT_EQ(b.tokens[0].top.size(), 2u);
  EXPECT_EQ(b.tokens[0].top[1].token, 13);
  EXPECT_TRUE(b.finished);
  EXPECT_EQ(b.finish_reason, "handoff");
  EXPECT_EQ(b.cached_prompt_tokens, 16);
  ASSERT_TRUE(b.handoff.has_value());
  EXPECT_EQ(b.handoff->kv, o.handoff->kv);

  // An early (layer-wise) handoff: unfinished, first token -1, with the cached prompt tokens.
  EngineOutput early;
  early.handoff = sample_handoff();
  early.handoff->first_token = -1;
  early.cached_prompt_tokens = 32;
  auto eh = decode_stream_event(encode_stream_event(StreamEvent(early)));
  ASSERT_TRUE(eh.ok()) << eh.status().to_string();
  const EngineOutput& be = std::get<EngineOutput>(*eh);
  EXPECT_FALSE(be.finished);
  ASSERT_TRUE(be.handoff.has_value());
  EXPECT_EQ(be.handoff->first_token, -1);
  EXPECT_EQ(be.cached_prompt_tokens, 32);
  // ... and an unfinished one that names a first token, or carries text, is refused; so is a
  // final one without its first token.
  early.handoff->first_token = 5;
  EXPECT_FALSE(decode_stream_event(encode_stream_event(StreamEvent(early))).ok());
  early.handoff->first_token = -1;
  early.text = "x";
  EXPECT_FALSE(decode_stream_event(encode_stream_event(StreamEvent(early))).ok());
  o.handoff->first_token = -1;
  EXPECT_FALSE(decode_stream_event(encode_stream_event(StreamEvent(o))).ok());

  EngineOutput failed;
  failed.finished = true;
  failed.finish_reason = "error";
  failed.error = Status(StatusCode::kDeadlineExceeded, "too slow");
  auto f = decode_stream_event(encode_stream_event(StreamEvent(failed)));
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(std::get<EngineOutput>(*f).error.code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(std::get<EngineOutput>(*f).error.message(), "too slow");

  for (const Status& st : {ok_status(), data_loss("short body")}) {
    auto p = decode_stream_event(encode_stream_event(StreamEvent(PulledEvent{st})));
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(std::get<PulledEvent>(*p).status.code(), st.code());
  }
}

TEST(InternalProtocol, StatsRoundTrip) {
  InstanceStats s;
  s.role = EngineRole::kDecode;
  s.max_context = 8192;
  s.max_sequence_tokens = 4096;
  s.model_fingerprint = 0xfedcba9876543210ull;
  s.transport = "shm";
  s.kv_dtype = "bf16";
  s.features = instance_features();
  s.metrics.running = 3;
  s.metrics.kv.num_blocks_used = 17;
  s.metrics.handoffs_total = 5;
  s.metrics.step_seconds_total = 1.5;
  s.metrics.finished_by_reason["stop"] = 2;
  auto b = decode_instance_stats(encode_instance_stats(s));
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  EXPECT_EQ(b->role, EngineRole::kDecode);
  EXPECT_EQ(b->max_sequence_tokens, 4096);
  EXPECT_EQ(b->model_fingerprint, s.model_fingerprint);
  EXPECT_EQ(b->transport, "shm");
  EXPECT_EQ(b->kv_dtype, "bf16");
  EXPECT_EQ(b->metrics.running, 3);
  EXPECT_EQ(b->metrics.kv.num_blocks_used, 17);
  EXPECT_EQ(b->metrics.handoffs_total, 5);
  EXPECT_EQ(b->metrics.step_seconds_total, 1.5);
  EXPECT_EQ(b->metrics.finished_by_reason["stop"], 2);
  EXPECT_EQ(b->features, (std::vector<std::string>{"logit_bias", "json_object"}));
  // An older instance's stats name no features.
  auto old = decode_instance_stats(
      R"({"role":"decode","max_context":8,"max_sequence_tokens":8,"model_fingerprint":1})");
  ASSERT_TRUE(old.ok()) << old.status().to_string();
  EXPECT_TRUE(old->features.empty());
  EXPECT_FALSE(
      decode_instance_stats(
          R"({"role":"decode","max_context":8,"max_sequence_tokens":8,"model_fingerprint":1,"features":[1]})")
          .ok());
}

TEST(InternalProtocol, FeaturesUsedNameTheNewerFieldsARequestUses) {
  EngineRequest r;
  EXPECT_TRUE(features_used(r).empty());
  r.sampling.logit_bias = {{3, 1.0f}};
  r.response_format = ResponseFormat::kJsonObject;
  EXPECT_EQ(features_used(r), (std::vector<std::string_view>{kFeatureLogitBias, kFeatureJsonObject}));
}

TEST(InternalProtocol, StatusesRoundTrip) {
  Status st = decode_status(encode_status(resource_exhausted("all 4 prefill slots are held")));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "all 4 prefill slots are held");
  EXPECT_EQ(st.reason(), "");
  // A reason (which case of the code) crosses too, and a context in front keeps it.
  st = decode_status(
      encode_status(resource_exhausted("no room").with_reason("kv_send_room").with_context("p1")));
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(st.message(), "p1: no room");
  EXPECT_EQ(st.reason(), "kv_send_room");
  EXPECT_EQ(decode_status(R"({"error":{"code":"UNAVAILABLE","message":"m","reason":7}})").code(),
            StatusCode::kInternal);
  EXPECT_EQ(decode_status("<html>").code(), StatusCode::kInternal);
  EXPECT_EQ(decode_status(R"({"error":{"code":"NO_SUCH","message":"m"}})").code(), StatusCode::kInternal);
}

struct Malformed {
  const char* name;
  const char* body;
  const char* message;  // a part of the expected error
};

TEST(InternalProtocol, MalformedPeerBytesAreErrorsNamingTheField) {
  const Malformed requests[] = {
      {"not json", "{", "not valid JSON"},
      {"array", "[1]", "expected a JSON object"},
      {"no prompt", R"({"max_tokens":3})", "'prompt' is missing"},
      {"prompt not array", R"({"prompt":"hi","max_tokens":3})", "'prompt' must be an array of token ids"},
      {"negative token", R"({"prompt":[-1],"max_tokens":3})", "'prompt' is out of range"},
      {"huge token", R"({"prompt":[4294967296],"max_tokens":3})", "'prompt' is out of range"},
      {"float token", R"({"prompt":[1.5],"max_tokens":3})", "'prompt' must be an array of token ids"},
      {"no max_tokens", R"({"prompt":[1]})", "'max_tokens' is missing"},
      {"negative max_tokens", R"({"prompt":[1],"max_tokens":-3})", "'max_tokens' is out of range"},
      {"stop not strings", R"({"prompt":[1],"max_tokens":3,"stop":[1]})",
       "'stop' must be an array of strings"},
      {"top_p out of range", R"({"prompt":[1],"max_tokens":3,"sampling":{"temperature":1,"top_p":-0.5}})",
       "top_p -0.5 is outside (0, 1]"},
      {"sampling not object", R"({"prompt":[1],"max_tokens":3,"sampling":1})",
       "'sampling' must be an object"},
      {"temperature string", R"({"prompt":[1],"max_tokens":3,"sampling":{"temperature":"hot"}})",
       "'temperature' must be a number"},
      {"negative seed", R"({"prompt":[1],"max_tokens":3,"sampling":{"seed":-1}})", "'seed' is out of range"},
      {"bias not pairs", R"({"prompt":[1],"max_tokens":3,"sampling":{"logit_bias":{"5":1}}})",
       "'logit_bias' must be an array of [token id, bias] pairs"},
      {"bias triple", R"({"prompt":[1],"max_tokens":3,"sampling":{"logit_bias":[[5,1,2]]}})",
       "'logit_bias' must be an array of [token id, bias] pairs"},
      {"bias negative token", R"({"prompt":[1],"max_tokens":3,"sampling":{"logit_bias":[[-5,1]]}})",
       "'logit_bias' is out of range"},
      {"bias too large", R"({"prompt":[1],"max_tokens":3,"sampling":{"logit_bias":[[5,1e9]]}})",
       "logit_bias 1000000000 for token 5 is outside [-100, 100]"},
      {"bias unordered", R"({"prompt":[1],"max_tokens":3,"sampling":{"logit_bias":[[5,1],[3,1]]}})",
       "not strictly ascending (3 after 5)"},
      {"ignore_eos not bool", R"({"prompt":[1],"max_tokens":3,"ignore_eos":1})",
       "'ignore_eos' must be true or false"},
      {"budget below -1", R"({"prompt":[1],"max_tokens":3,"wait_budget_us":-2})",
       "'wait_budget_us' is out of range"},
      {"negative queue", R"({"prompt":[1],"max_tokens":3,"wait_queue":-1})", "'wait_queue' is out of range"},
      {"unknown format", R"({"prompt":[1],"max_tokens":3,"response_format":"xml"})",
       "'response_format' must be \"text\" or \"json_object\""},
  };
  for (const Malformed& m : requests) {
    auto r = decode_engine_request(m.body);
    ASSERT_FALSE(r.ok()) << m.name;
    EXPECT_NE(r.status().message().find(m.message), std::string::npos)
        << m.name << ": " << r.status().message();
  }
  const Malformed handoffs[] = {
      {"no handoff", R"({"request":{"prompt":[1],"max_tokens":1}})", "'handoff' is missing"},
      {"bad kv handle",
       R"({"request":{"prompt":[1],"max_tokens":1},"handoff":{"kv":"nope","first_token":1,"num_prompt_tokens":1}})",
       "handoff.kv"},
      {"no first token",
       R"({"request":{"prompt":[1],"max_tokens":1},"handoff":{"kv":"x","num_prompt_tokens":1}})",
       "handoff.kv"},
      {"zero prompt tokens",
       R"({"request":{"prompt":[1],"max_tokens":1},"handoff":{"kv":"kv1;tcp;contiguous;1;1;64;127.0.0.1:1","first_token":1,"num_prompt_tokens":0}})",
       "'num_prompt_tokens' is out of range"},
  };
  for (const Malformed& m : handoffs) {
    auto r = decode_handoff_request(m.body);
    ASSERT_FALSE(r.ok()) << m.name;
    EXPECT_NE(r.status().message().find(m.message), std::string::npos)
        << m.name << ": " << r.status().message();
  }
  const Malformed events[] = {
      {"tokens not array", R"({"text":"","tokens":3,"finished":false})", "'tokens' must be an array"},
      {"token without id", R"({"tokens":[{"logprob":0}],"finished":false})", "'id' is missing"},
      {"bad top pair", R"({"tokens":[{"id":1,"top":[[1]]}],"finished":false})", "[token, logprob] pairs"},
      {"final without reason", R"({"finished":true})", "'finish_reason' is missing"},
      {"pulled not object", R"({"pulled":1})", "'pulled' must be an object"},
      {"pulled without ok", R"({"pulled":{}})", "'pulled.ok' must be true or false"},
  };
  for (const Malformed& m : events) {
    auto r = decode_stream_event(m.body);
    ASSERT_FALSE(r.ok()) << m.name;
    EXPECT_NE(r.status().message().find(m.message), std::string::npos)
        << m.name << ": " << r.status().message();
  }
  EXPECT_FALSE(decode_release(R"({"buffer_id":-1,"generation":1})").ok());
  EXPECT_FALSE(decode_instance_stats(
                   R"({"role":"chef","max_context":1,"max_sequence_tokens":1,"model_fingerprint":1})")
                   .ok());
  // A final error output without an error body still carries an error.
  auto e = decode_stream_event(R"({"finished":true,"finish_reason":"error"})");
  ASSERT_TRUE(e.ok());
  EXPECT_FALSE(std::get<EngineOutput>(*e).error.ok());
}

}  // namespace
}  // namespace pdserve::api

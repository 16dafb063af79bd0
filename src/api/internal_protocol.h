// The internal API between a gateway and its instances (docs/decisions/internal-api.md): JSON
// bodies over HTTP/1.1 on the same server stack as the public API.
//
//   POST /internal/v1/submit    an EngineRequest. Try-accept: 429 at once when the instance is
//                               full (a prefill keeps no queue), else 200 and a stream of events.
//   POST /internal/v1/handoff   {"request": EngineRequest, "handoff": EngineHandoff} to a decode:
//                               429 when its pending queue is full, else 200 and a stream.
//   POST /internal/v1/release   {"buffer_id", "generation"}: a prefill frees a handoff's slot.
//   GET  /internal/v1/stats     the instance's role, limits, model fingerprint and EngineMetrics.
// A stream is Server-Sent Events, one JSON object per `data:` line: an EngineOutput, or
// {"pulled": {"ok": bool, "error": ...}} when a decode has (or could not get) the KV — the
// gateway then releases the prefill. Closing the connection cancels the request.
//
// Everything decoded here comes from a peer: every failure is a Status naming the field; a
// message is never trusted to be well formed. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

#include "engine/engine.h"

namespace pdserve::api {

// Request fields an instance of this build acts on that the first internal API did not have (an
// older instance would ignore them and answer something else): its stats name them, and a gateway
// sends a request that uses one only where every instance it may go through names it.
inline constexpr std::string_view kFeatureLogitBias = "logit_bias";
inline constexpr std::string_view kFeatureJsonObject = "json_object";
std::vector<std::string> instance_features();
// Those of kFeature* that `request` uses.
std::vector<std::string_view> features_used(const EngineRequest& request);

// The instance facts a gateway needs.
struct InstanceStats {
  EngineRole role = EngineRole::kMixed;
  int32_t max_context = 0;
  int64_t max_sequence_tokens = 0;
  uint64_t model_fingerprint = 0;
  std::string transport;  // the KV transport's kind ("inproc", "shm", "tcp", "cuda-ipc"), or ""
  // Of the KV it sends and takes: "f16" (the CPU engine, a GPU in fp16), "bf16" (a GPU in bf16); ""
  // when unsaid.
  std::string kv_dtype;
  std::vector<std::string> features;  // instance_features() of its build; empty from older ones
  EngineMetrics metrics;
};

std::string encode_engine_request(const EngineRequest& request);
StatusOr<EngineRequest> decode_engine_request(std::string_view json);

std::string encode_handoff_request(const EngineRequest& request, const EngineHandoff& handoff);
StatusOr<std::pair<EngineRequest, EngineHandoff>> decode_handoff_request(std::string_view json);

std::string encode_release(const KvBufferRef& kv);
StatusOr<KvBufferRef> decode_release(std::string_view json);

std::string encode_instance_stats(const InstanceStats& stats);
StatusOr<InstanceStats> decode_instance_stats(std::string_view json);

// One event of a stream.
struct PulledEvent {
  Status status;  // OK: the KV landed
};
using StreamEvent = std::variant<EngineOutput, PulledEvent>;
std::string encode_stream_event(const StreamEvent& event);
StatusOr<StreamEvent> decode_stream_event(std::string_view json);

// {"error": {"code": "...", "message": "..."}} for a refused call, and back.
std::string encode_status(const Status& status);
Status decode_status(std::string_view json);

}  // namespace pdserve::api

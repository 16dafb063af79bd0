// libFuzzer target: the internal API's decoders (api/internal_protocol.h) — what an instance reads
// from a gateway and a gateway reads from an instance — must return a value or a Status on
// arbitrary bytes, never crash, hang or throw; a decoded value must encode again.
// Build with the `fuzz` preset (clang): tests/fuzz/run_fuzz.sh 60 internal_api_fuzz
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "api/internal_protocol.h"

using namespace pdserve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  if (auto r = api::decode_engine_request(text); r.ok()) (void)api::encode_engine_request(*r);
  if (auto h = api::decode_handoff_request(text); h.ok())
    (void)api::encode_handoff_request(h->first, h->second);
  if (auto kv = api::decode_release(text); kv.ok()) (void)api::encode_release(*kv);
  if (auto s = api::decode_instance_stats(text); s.ok()) (void)api::encode_instance_stats(*s);
  if (auto e = api::decode_stream_event(text); e.ok()) (void)api::encode_stream_event(*e);
  (void)api::decode_status(text);
  return 0;
}

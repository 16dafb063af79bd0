// libFuzzer target: the ucx KV transport's decoders of a peer's active-message headers
// (transfer/ucx_protocol.h) must return a Status, never crash or over-read. The whole input is
// decoded as a request and as a response; whatever decodes must re-encode to the same fixed part.
// Build with the `fuzz` preset (clang); tests/fuzz/run_fuzz.sh runs it.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "transfer/ucx_protocol.h"

using namespace pdserve::transfer_internal::ucx_protocol;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  if (auto req = decode_request(in); req.ok()) {
    const auto again = encode_request(*req);
    if (std::memcmp(again.data(), data, kRequestBytes) != 0) __builtin_trap();
  }
  if (auto resp = decode_response(in); resp.ok()) {
    if (resp->code != 0 && resp->message_bytes > kMaxMessageBytes) __builtin_trap();
    const auto again = encode_response(*resp);
    if (std::memcmp(again.data() + 8, data + 8, kResponseBytes - 8) != 0) __builtin_trap();
  }
  return 0;
}

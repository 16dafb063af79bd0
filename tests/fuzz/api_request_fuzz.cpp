// libFuzzer target: the OpenAI request parsers (chat completions, completions, tokenize,
// detokenize) on arbitrary bytes must return a request or an ApiError, never crash, hang or
// throw; an error's body must serialize. Build with the `fuzz` preset (clang):
//   cmake --preset fuzz && cmake --build build/fuzz --target api_request_fuzz
//   build/fuzz/tests/fuzz/api_request_fuzz -dict=tests/fuzz/api_request.dict tests/fuzz/corpus/api_request
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "api/protocol.h"

namespace {

template <typename T>
void check(const pdserve::api::ApiResult<T>& r) {
  if (!r.ok()) {
    volatile size_t n = pdserve::api::error_body(r.error()).size();
    (void)n;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view body(reinterpret_cast<const char*>(data), size);
  auto chat = pdserve::api::parse_chat_completion_request(body);
  check(chat);
  if (chat.ok()) {
    // Touch what the service touches.
    for (const auto& m : chat.value().messages) {
      volatile size_t n = m.role.size() + m.content.size();
      (void)n;
    }
  }
  check(pdserve::api::parse_completion_request(body));
  check(pdserve::api::parse_tokenize_request(body));
  check(pdserve::api::parse_detokenize_request(body));
  return 0;
}

// libFuzzer target: JSON mode's recognizer (engine/json_constraint.h) against nlohmann-json, an
// independent parser, on arbitrary bytes:
//   - text it takes whole as a complete object, nlohmann parses as an object (but for numbers past
//     a double's range, which nlohmann refuses);
//   - an object nlohmann parses, written back compactly (nesting within the bound), it takes whole;
//   - every prefix it takes still completes by the bytes of kJsonCompletionBytes, tried in order
//     (what JsonVocabulary relies on to never leave a masked draw without a token).
// Build with the `fuzz` preset (clang): tests/fuzz/run_fuzz.sh 60 json_constraint_fuzz
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string_view>

#include "engine/json_constraint.h"

using pdserve::JsonPrefix;

namespace {

int nesting(const nlohmann::json& j) {
  int deepest = 0;
  if (j.is_structured())
    for (const auto& v : j) deepest = std::max(deepest, nesting(v));
  return j.is_structured() ? deepest + 1 : 0;
}

// Closes whatever is open, trying kJsonCompletionBytes in their order at each step.
bool completes(JsonPrefix p) {
  for (int step = 0; step < 16 * pdserve::kMaxJsonDepth + 64; ++step) {
    if (p.complete()) return true;
    bool moved = false;
    for (uint8_t b : pdserve::kJsonCompletionBytes) {
      JsonPrefix next = p;
      if (next.advance(b)) {
        p = next;
        moved = true;
        break;
      }
    }
    if (!moved) return false;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  JsonPrefix p;
  size_t taken = 0;
  while (taken < size) {
    JsonPrefix next = p;
    if (!next.advance(data[taken])) break;
    p = next;
    ++taken;
  }
  if (!completes(p)) std::abort();  // a prefix with no way on: a masked draw would have no token
  if (taken == size && p.complete()) {
    try {
      if (!nlohmann::json::parse(text).is_object()) std::abort();
    } catch (const nlohmann::json::out_of_range&) {
      // A number beyond a double's range (1e999): JSON's grammar allows it, nlohmann does not.
    } catch (...) {
      std::abort();
    }
  }
  const nlohmann::json parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_object() && nesting(parsed) <= pdserve::kMaxJsonDepth) {
    JsonPrefix q;
    const std::string compact = parsed.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
    if (!q.advance(std::string_view(compact)) || !q.complete()) std::abort();
  }
  return 0;
}

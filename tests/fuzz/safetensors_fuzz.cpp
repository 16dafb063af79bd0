// Fuzz target: safetensors headers and tensor tables, and Hugging Face config.json, on arbitrary
// bytes (model/safetensors.h).
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = pdserve::SafetensorsFile::parse(std::span<const uint8_t>(data, size), "fuzz");
  if (f.ok()) {
    for (const auto& t : (*f)->tensors()) {
      // Every view must lie inside the input.
      if (t.bytes > 0 && (t.data < data || t.data + t.bytes > data + size)) __builtin_trap();
    }
  }
  // The same bytes as a Hugging Face config.json.
  auto c = pdserve::model_config_from_hf(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  (void)c;
  return 0;
}

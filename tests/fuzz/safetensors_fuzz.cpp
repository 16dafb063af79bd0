// Fuzz target: safetensors headers and tensor tables (model/safetensors.h) on arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <span>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = pdserve::SafetensorsFile::parse(std::span<const uint8_t>(data, size), "fuzz");
  if (f.ok()) {
    for (const auto& t : (*f)->tensors()) {
      // Every view must lie inside the input.
      if (t.bytes > 0 && (t.data < data || t.data + t.bytes > data + size)) __builtin_trap();
    }
  }
  return 0;
}

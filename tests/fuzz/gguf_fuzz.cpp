// libFuzzer target: GgufFile::parse on arbitrary bytes must return a Status, never crash,
// over-read or allocate without bound. Build with the `fuzz` preset (clang):
//   cmake --preset fuzz && cmake --build build/fuzz --target gguf_fuzz
//   build/fuzz/tests/fuzz/gguf_fuzz -max_total_time=60 tests/fuzz/corpus/gguf
#include <cstddef>
#include <cstdint>

#include "model/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pdserve::GgufLimits limits;
  limits.max_string_bytes = 1 << 16;
  auto f = pdserve::GgufFile::parse(std::span<const uint8_t>(data, size), limits);
  if (f.ok()) {
    // Touch what a loader touches: every tensor's bytes are inside the input.
    volatile uint8_t sink = 0;
    for (const auto& t : (*f)->tensors()) {
      if (t.size_bytes > 0) sink = sink ^ t.data[0] ^ t.data[t.size_bytes - 1];
    }
    for (const auto& [k, v] : (*f)->metadata()) (void)v.to_display(4);
  }
  return 0;
}

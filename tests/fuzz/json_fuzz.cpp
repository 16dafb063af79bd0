// Fuzz target: the JSON reader of model files (common/json_reader.h) on arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/json_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto v = pdserve::parse_json(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  if (v.ok()) (void)v->find("x");
  return 0;
}

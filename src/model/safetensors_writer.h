// Writes safetensors files (tests and tools that make checkpoints): tensors in the order given,
// data back to back after the JSON header. Header-only; not for untrusted input.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "common/status.h"

namespace pdserve {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // "BF16", "F16", "F32", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

// The file's bytes; `header_override` (when not empty) replaces the JSON header, for tests of
// bad headers.
inline std::vector<uint8_t> safetensors_bytes(const std::vector<SafetensorsEntry>& entries,
                                              const std::string& header_override = "") {
  std::string header = "{\"__metadata__\": {\"format\": \"pt\"}";
  uint64_t offset = 0;
  for (const SafetensorsEntry& e : entries) {
    header += ", \"" + e.name + "\": {\"dtype\": \"" + e.dtype + "\", \"shape\": [";
    for (size_t i = 0; i < e.shape.size(); ++i) header += (i ? ", " : "") + std::to_string(e.shape[i]);
    header += "], \"data_offsets\": [" + std::to_string(offset) + ", " +
              std::to_string(offset + e.data.size()) + "]}";
    offset += e.data.size();
  }
  header += "}";
  if (!header_override.empty()) header = header_override;
  std::vector<uint8_t> out(8);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  for (const SafetensorsEntry& e : entries) out.insert(out.end(), e.data.begin(), e.data.end());
  return out;
}

inline Status write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries) {
  const std::vector<uint8_t> bytes = safetensors_bytes(entries);
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) return internal_error("cannot write " + path);
  return ok_status();
}

}  // namespace pdserve

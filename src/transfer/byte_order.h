// Little-endian loads and stores of fixed-width integers, for the wire formats of src/transfer
// (internal). Byte by byte, so they work at any alignment and on any host; stateless.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pdserve::transfer_internal {

template <typename T>
void store_le(uint8_t* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
}

template <typename T>
T load_le(const uint8_t* p) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return static_cast<T>(v);
}

}  // namespace pdserve::transfer_internal

// Device-side helpers the CUDA kernels share: bf16 bits to and from float. Included by .cu files
// only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace pdserve::cuda {

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }

__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Eight bf16 values (16 bytes) to floats.
__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float* out) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = __uint_as_float(w[j] << 16);
    out[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
  }
}

}  // namespace pdserve::cuda

// GGML block formats on the CPU: block layouts, scalar dequantization of every weight type the
// engine computes with, and quantization of activations to 8-bit blocks for integer dot
// products. Stateless functions; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/ggml_types.h"

namespace pdserve::cpu {

inline constexpr int kQ8Block = 32;  // elements per activation block (and per Q4/Q5/Q8 block)
inline constexpr int kQK = 256;      // elements per K-quant super-block

#pragma pack(push, 1)
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// Weight types the CPU kernels compute with.
bool is_supported_weight_type(GgmlType type);
// Types whose matmul runs on 8-bit integer dot products against quantized activations.
bool uses_int8_dot(GgmlType type);

// Bytes of one row of `cols` elements. `cols` must be a multiple of the type's block size.
size_t row_bytes(GgmlType type, int64_t cols);

// Decodes `n` elements (a multiple of the block size) of a supported type into floats.
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n);

// Activations quantized to 8-bit blocks of 32: per block a scale d (rounded to fp16 precision,
// as llama.cpp stores it), s = d·Σq (also fp16-rounded), and the integer Σq.
struct Q8Row {
  int8_t* qs;     // cols values
  float* d;       // cols/32
  float* s;       // cols/32
  int32_t* qsum;  // cols/32
};
void quantize_row_q8(const float* x, int64_t cols, Q8Row out);

}  // namespace pdserve::cpu

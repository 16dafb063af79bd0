// Per-ISA variants of kernels in ops.h (internal to kernels/cpu).
#pragma once

#include "kernels/cpu/ops.h"

namespace pdserve::cpu::detail {
// head_dim must be a multiple of 16.
void attention_head_avx2(const float* q, const PagedKvLayer& kv, std::span<const int32_t> block_table,
                         int32_t num_keys, int32_t kv_head, float scale, float* scores, float* out);
// attention_heads for 1..8 heads (false: not handled here). head_dim a multiple of 16, ≤ 256.
bool attention_heads_avx2(const float* q, int32_t num_heads, const PagedKvLayer& kv,
                          std::span<const int32_t> block_table, int32_t num_keys, int32_t kv_head,
                          float scale, float* scores, float* out);
// quantize_row_q8 with the scalar version's exact results (same products, same rounding).
void quantize_row_q8_avx2(const float* x, int64_t cols, int8_t* qs, float* d, float* s, int32_t* qsum);
}  // namespace pdserve::cpu::detail

// Element-wise and attention kernels on the CPU. Know nothing of requests or models: plain
// arrays, shapes and units in the signatures. Every function computes each output element with a
// fixed sequence of operations (batch invariance, DESIGN.md §4). Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <span>

namespace pdserve::cpu {

// y = x / sqrt(mean(x²) + eps) · w, over n elements (the sum of squares in double, like
// llama.cpp). y may alias x.
void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y);

// x += y, n elements.
void add_inplace(float* x, const float* y, int64_t n);

// out[i] = silu(gate[i]) · up[i], n elements. out may alias gate.
void silu_mul(const float* gate, const float* up, int64_t n, float* out);

// Rotary position embedding tables for one position: cos/sin of each of rope_dim/2 angles.
// theta_i = pos · base^(-2i/rope_dim) / freq_factors[i] (freq_factors may be empty), computed
// with the same recurrence as llama.cpp.
void rope_angles(int32_t pos, int32_t rope_dim, float base, std::span<const float> freq_factors,
                 float* cos_out, float* sin_out);
// Rotates num_heads heads of head_dim values each (the first rope_dim of each head) in place.
// neox: pairs (i, i + rope_dim/2); otherwise adjacent pairs (2i, 2i+1).
void rope_apply(float* x, int32_t num_heads, int32_t head_dim, int32_t rope_dim, bool neox,
                const float* cos_t, const float* sin_t);

// float → IEEE half, n elements.
void f32_to_f16(const float* x, uint16_t* y, int64_t n);

// Paged K/V of one layer: block b of this layer holds block_size token rows of num_kv_heads ×
// head_dim halves for K (at k + b·block_stride) and for V (at v + b·block_stride). A
// block_stride of 0 means the blocks are packed back to back (block_size × token_stride).
struct PagedKvLayer {
  uint16_t* k = nullptr;
  uint16_t* v = nullptr;
  int32_t block_size = 16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t stride = 0;  // halves from one block to the next; 0: block_size × token_stride()
  int64_t token_stride() const { return int64_t{num_kv_heads} * head_dim; }
  int64_t block_stride() const { return stride != 0 ? stride : token_stride() * block_size; }
  // Offset (in halves) of position `pos`, kv head `kv_head`, in a sequence with `block_table`.
  int64_t offset(std::span<const int32_t> block_table, int32_t pos, int32_t kv_head) const {
    return block_table[static_cast<size_t>(pos / block_size)] * block_stride() +
           (pos % block_size) * token_stride() + static_cast<int64_t>(kv_head) * head_dim;
  }
};

// Causal attention of one query head over keys [0, num_keys) of a sequence whose blocks are
// `block_table`: out = softmax(scale · q·Kᵀ) · V for kv head `kv_head`. `scores` is scratch of
// num_keys floats. q and out have head_dim floats; head_dim is a multiple of 16. Every
// instruction set performs the same arithmetic (bitwise identical results).
void attention_head(const float* q, const PagedKvLayer& kv, std::span<const int32_t> block_table,
                    int32_t num_keys, int32_t kv_head, float scale, float* scores, float* out);

// attention_head for num_heads consecutive query heads that share kv head `kv_head` (q and out
// hold num_heads × head_dim floats; scores is scratch of num_heads × num_keys floats). Each head's
// result is bitwise what attention_head gives; K and V rows are read once for all the heads.
void attention_heads(const float* q, int32_t num_heads, const PagedKvLayer& kv,
                     std::span<const int32_t> block_table, int32_t num_keys, int32_t kv_head, float scale,
                     float* scores, float* out);

}  // namespace pdserve::cpu

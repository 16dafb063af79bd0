#include "kernels/cpu/ops.h"

#include <cmath>

#include "common/check.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/fp16.h"
#include "kernels/cpu/ops_simd.h"

namespace pdserve::cpu {

void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
  float mean = static_cast<float>(sum / static_cast<double>(n));
  float scale = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void rope_angles(int32_t pos, int32_t rope_dim, float base, std::span<const float> freq_factors,
                 float* cos_out, float* sin_out) {
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(rope_dim));
  float theta = static_cast<float>(pos);
  for (int32_t i = 0; i < rope_dim / 2; ++i) {
    float ff = freq_factors.empty() ? 1.0f : freq_factors[static_cast<size_t>(i)];
    float t = theta / ff;
    cos_out[i] = std::cos(t);
    sin_out[i] = std::sin(t);
    theta *= theta_scale;
  }
}

void rope_apply(float* x, int32_t num_heads, int32_t head_dim, int32_t rope_dim, bool neox, const float* c,
                const float* s) {
  for (int32_t h = 0; h < num_heads; ++h) {
    float* v = x + static_cast<int64_t>(h) * head_dim;
    for (int32_t i = 0; i < rope_dim / 2; ++i) {
      int32_t a = neox ? i : 2 * i;
      int32_t b = neox ? i + rope_dim / 2 : 2 * i + 1;
      float x0 = v[a], x1 = v[b];
      v[a] = x0 * c[i] - x1 * s[i];
      v[b] = x0 * s[i] + x1 * c[i];
    }
  }
}

void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

namespace {
// The exact arithmetic of attention_head_avx2 in scalar code (eight-lane partial sums, fused
// multiply-adds, the same reduction tree), so every instruction set gives the same bits.
void attention_head_scalar(const float* q, const PagedKvLayer& kv, std::span<const int32_t> block_table,
                           int32_t num_keys, int32_t kv_head, float scale, float* scores, float* out) {
  const int32_t hd = kv.head_dim;
  float max_score = -INFINITY;
  for (int32_t j = 0; j < num_keys; ++j) {
    const uint16_t* k = kv.k + kv.offset(block_table, j, kv_head);
    float s0[8] = {}, s1[8] = {};
    for (int32_t d = 0; d < hd; d += 16) {
      for (int i = 0; i < 8; ++i) {
        s0[i] = std::fma(q[d + i], fp16_to_fp32(k[d + i]), s0[i]);
        s1[i] = std::fma(q[d + 8 + i], fp16_to_fp32(k[d + 8 + i]), s1[i]);
      }
    }
    float v[8], a[4];
    for (int i = 0; i < 8; ++i) v[i] = s0[i] + s1[i];
    for (int i = 0; i < 4; ++i) a[i] = v[i] + v[i + 4];
    scores[j] = ((a[0] + a[2]) + (a[1] + a[3])) * scale;
    max_score = scores[j] > max_score ? scores[j] : max_score;
  }
  float sum = 0.0f;
  for (int32_t j = 0; j < num_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    sum += scores[j];
  }
  for (int32_t d = 0; d < hd; ++d) out[d] = 0.0f;
  for (int32_t j = 0; j < num_keys; ++j) {
    const uint16_t* v = kv.v + kv.offset(block_table, j, kv_head);
    for (int32_t d = 0; d < hd; ++d) out[d] = std::fma(scores[j], fp16_to_fp32(v[d]), out[d]);
  }
  float inv = 1.0f / sum;
  for (int32_t d = 0; d < hd; ++d) out[d] *= inv;
}
}  // namespace

void attention_head(const float* q, const PagedKvLayer& kv, std::span<const int32_t> block_table,
                    int32_t num_keys, int32_t kv_head, float scale, float* scores, float* out) {
  PD_CHECK_MSG(kv.head_dim % 16 == 0, "attention_head: head_dim must be a multiple of 16");
  if (detected_isa() == Isa::kScalar) {
    attention_head_scalar(q, kv, block_table, num_keys, kv_head, scale, scores, out);
  } else {
    detail::attention_head_avx2(q, kv, block_table, num_keys, kv_head, scale, scores, out);
  }
}

void attention_heads(const float* q, int32_t num_heads, const PagedKvLayer& kv,
                     std::span<const int32_t> block_table, int32_t num_keys, int32_t kv_head, float scale,
                     float* scores, float* out) {
  PD_CHECK_MSG(kv.head_dim % 16 == 0 && kv.head_dim <= 256,
               "attention_heads: head_dim must be 16..256, by 16");
  if (detected_isa() != Isa::kScalar &&
      detail::attention_heads_avx2(q, num_heads, kv, block_table, num_keys, kv_head, scale, scores, out)) {
    return;
  }
  const int64_t hd = kv.head_dim;
  for (int32_t h = 0; h < num_heads; ++h) {
    attention_head(q + h * hd, kv, block_table, num_keys, kv_head, scale, scores + int64_t{h} * num_keys,
                   out + h * hd);
  }
}

}  // namespace pdserve::cpu

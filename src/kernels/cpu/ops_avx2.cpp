// AVX2/F16C variants of ops.h kernels.
#include <immintrin.h>

#include <cmath>

#include "kernels/cpu/ops_simd.h"

namespace pdserve::cpu::detail {

namespace {
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 load_h(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
}  // namespace

void attention_head_avx2(const float* q, const PagedKvLayer& kv, std::span<const int32_t> block_table,
                         int32_t num_keys, int32_t kv_head, float scale, float* scores, float* out) {
  const int32_t hd = kv.head_dim;
  float max_score = -INFINITY;
  for (int32_t j = 0; j < num_keys; ++j) {
    const uint16_t* k = kv.k + kv.offset(block_table, j, kv_head);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int32_t d = 0; d < hd; d += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_h(k + d), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load_h(k + d + 8), s1);
    }
    scores[j] = hsum(_mm256_add_ps(s0, s1)) * scale;
    max_score = std::fmax(max_score, scores[j]);
  }
  float sum = 0.0f;
  for (int32_t j = 0; j < num_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    sum += scores[j];
  }
  // head_dim ≤ 256 here: accumulate the output in registers, 8 floats at a time.
  for (int32_t d0 = 0; d0 < hd; d0 += 32) {
    int32_t width = hd - d0 < 32 ? hd - d0 : 32;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int32_t j = 0; j < num_keys; ++j) {
      const uint16_t* v = kv.v + kv.offset(block_table, j, kv_head) + d0;
      __m256 p = _mm256_set1_ps(scores[j]);
      for (int32_t c = 0; c < width / 8; ++c) acc[c] = _mm256_fmadd_ps(p, load_h(v + 8 * c), acc[c]);
    }
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int32_t c = 0; c < width / 8; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], inv));
  }
}

}  // namespace pdserve::cpu::detail

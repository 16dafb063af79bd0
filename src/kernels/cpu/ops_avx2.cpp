// AVX2/F16C variants of ops.h kernels.
#include <immintrin.h>

#include <cmath>

#include "kernels/cpu/fp16.h"
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

void quantize_row_q8_avx2(const float* x, int64_t cols, int8_t* qs, float* d_out, float* s_out,
                          int32_t* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < cols / 32; ++b) {
    const float* xb = x + b * 32;
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const __m256 idv = _mm256_set1_ps(id);
    // Round to nearest even, as std::nearbyint does in the default rounding mode.
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
    __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const int32_t sum = _mm_cvtsi128_si32(s4);
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + b * 32), _mm256_permutevar8x32_epi32(packed, order));
    d_out[b] = fp16_round(d);
    s_out[b] = fp16_round(d * static_cast<float>(sum));
    qsum[b] = sum;
  }
}

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
    max_score = scores[j] > max_score ? scores[j] : max_score;
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

namespace {
// G query heads over one KV head, with exactly attention_head_avx2's arithmetic per head: each
// K and V row is loaded and converted once for all G heads.
template <int G>
void attention_group(const float* q, const PagedKvLayer& kv, std::span<const int32_t> block_table,
                     int32_t num_keys, int32_t kv_head, float scale, float* scores, float* out) {
  const int32_t hd = kv.head_dim;  // a multiple of 16, at most 256
  __m256 kf[32];
  float max_score[G];
  for (int h = 0; h < G; ++h) max_score[h] = -INFINITY;
  for (int32_t j = 0; j < num_keys; ++j) {
    const uint16_t* k = kv.k + kv.offset(block_table, j, kv_head);
    for (int32_t c = 0; c < hd / 8; ++c) kf[c] = load_h(k + 8 * c);
    for (int h = 0; h < G; ++h) {
      const float* qh = q + h * hd;
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      for (int32_t d = 0; d < hd; d += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), kf[d / 8], s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), kf[d / 8 + 1], s1);
      }
      float sc = hsum(_mm256_add_ps(s0, s1)) * scale;
      scores[h * num_keys + j] = sc;
      max_score[h] = sc > max_score[h] ? sc : max_score[h];
    }
  }
  float inv[G];
  for (int h = 0; h < G; ++h) {
    float* sh = scores + h * num_keys;
    float sum = 0.0f;
    for (int32_t j = 0; j < num_keys; ++j) {
      sh[j] = std::exp(sh[j] - max_score[h]);
      sum += sh[j];
    }
    inv[h] = 1.0f / sum;
  }
  // Output columns in passes of C vectors per head, so the G·C accumulators stay in registers.
  constexpr int C = G <= 2 ? 4 : (G <= 4 ? 2 : 1);
  for (int32_t d0 = 0; d0 < hd; d0 += 8 * C) {
    const int cols = hd - d0 < 8 * C ? (hd - d0) / 8 : C;
    __m256 acc[G][C];
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < C; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int32_t j = 0; j < num_keys; ++j) {
      const uint16_t* v = kv.v + kv.offset(block_table, j, kv_head) + d0;
      __m256 vf[C];
      for (int c = 0; c < cols; ++c) vf[c] = load_h(v + 8 * c);
      for (int h = 0; h < G; ++h) {
        __m256 p = _mm256_set1_ps(scores[h * num_keys + j]);
        for (int c = 0; c < cols; ++c) acc[h][c] = _mm256_fmadd_ps(p, vf[c], acc[h][c]);
      }
    }
    for (int h = 0; h < G; ++h) {
      __m256 iv = _mm256_set1_ps(inv[h]);
      for (int c = 0; c < cols; ++c)
        _mm256_storeu_ps(out + h * hd + d0 + 8 * c, _mm256_mul_ps(acc[h][c], iv));
    }
  }
}
}  // namespace

bool attention_heads_avx2(const float* q, int32_t num_heads, const PagedKvLayer& kv,
                          std::span<const int32_t> block_table, int32_t num_keys, int32_t kv_head,
                          float scale, float* scores, float* out) {
  switch (num_heads) {
    case 1: attention_group<1>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 2: attention_group<2>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 3: attention_group<3>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 4: attention_group<4>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 5: attention_group<5>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 6: attention_group<6>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 7: attention_group<7>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    case 8: attention_group<8>(q, kv, block_table, num_keys, kv_head, scale, scores, out); return true;
    default: return false;
  }
}

}  // namespace pdserve::cpu::detail

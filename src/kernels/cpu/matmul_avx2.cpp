// AVX2/FMA kernels over panel-layout weights (panel.h), for CPUs without AVX-512: a panel is
// two halves of 8 rows, one 32-bit lane per row. Each step of 4 elements multiplies the weight
// bytes with 4 broadcast activation bytes by vpmaddubsw + vpmaddwd: unsigned weights for the
// nibble types (no saturation: 2·31·127 < 2^15), and for Q8_0 the |w| · sign(x, w) form. The
// integer block sum is exact and the float steps after it are those of every ISA (matmul.h).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/panel_driver.h"

namespace pdserve::cpu::detail {

namespace {

// Bytes 0xFF where bit i of `bits` is set (i = byte index), else 0.
inline __m256i expand_bits(uint32_t bits) {
  const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2,
                                        2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)), pick);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

template <GgmlType kType, int T>
void panel_tile(const uint8_t* panel, int64_t nb, const Activations& x, int64_t t0, float* y, int64_t ldy,
                int64_t row0, int64_t valid) {
  constexpr PanelLayout L = panel_layout(kType);
  constexpr int kOffset = L.q8 ? 0 : L.offset;  // Q8_0 stays signed here
  const int8_t* xq[T];
  const float* xd[T];
  const float* xs[T];
  const int32_t* xsum[T];
  for (int t = 0; t < T; ++t) {
    xq[t] = x.row_qs(t0 + t);
    xd[t] = x.row_d(t0 + t);
    xs[t] = x.row_s(t0 + t);
    xsum[t] = x.row_qsum(t0 + t);
  }
  __m256 acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = panel + b * L.record;
    for (int h = 0; h < 2; ++h) {
      __m256i w[8];
      if constexpr (L.q8) {
        for (int k = 0; k < 8; ++k)
          w[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + L.quants + 64 * k + 32 * h));
      } else {
        for (int j = 0; j < 4; ++j) {
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + L.quants + 64 * j + 32 * h));
          w[j] = _mm256_and_si256(v, low4);
          w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        if constexpr (L.high >= 0) {
          const __m256i sixteen = _mm256_set1_epi8(16);
          for (int k = 0; k < 8; ++k) {
            uint32_t bits;
            std::memcpy(&bits, rec + L.high + 8 * k + 4 * h, 4);
            w[k] = _mm256_or_si256(w[k], _mm256_and_si256(expand_bits(bits), sixteen));
          }
        }
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16 * h)));
      __m256 mw = _mm256_setzero_ps();
      if constexpr (L.mins >= 0)
        mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + L.mins + 16 * h)));
      for (int t = 0; t < T; ++t) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(xq[t] + b * 32);
        __m256i isum = _mm256_set1_epi32(-kOffset * xsum[t][b]);
        for (int k = 0; k < 8; ++k) {
          __m256i xv = _mm256_set1_epi32(xb[k]);
          __m256i prod;
          if constexpr (L.q8) {
            prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w[k], w[k]), _mm256_sign_epi8(xv, w[k]));
          } else {
            prod = _mm256_maddubs_epi16(w[k], xv);
          }
          isum = _mm256_add_epi32(isum, _mm256_madd_epi16(prod, ones));
        }
        __m256 f = _mm256_cvtepi32_ps(isum);
        acc[h][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xd[t][b])), f, acc[h][t]);
        if constexpr (L.mins >= 0) acc[h][t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[t][b]), acc[h][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    float* out = y + (t0 + t) * ldy + row0;
    if (valid == kPanelRows) {
      _mm256_storeu_ps(out, acc[0][t]);
      _mm256_storeu_ps(out + 8, acc[1][t]);
    } else {
      alignas(32) float tmp[kPanelRows];
      _mm256_store_ps(tmp, acc[0][t]);
      _mm256_store_ps(tmp + 8, acc[1][t]);
      std::copy(tmp, tmp + valid, out);
    }
  }
}

template <GgmlType kType>
void panels_avx2(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  constexpr int kT = 4;
  const int64_t nb = w.cols / 32;
  const size_t stride = panel_stride(kType, w.cols);
  const int64_t tokens = x.rows();
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data + static_cast<size_t>(p) * stride;
    int64_t row0 = p * kPanelRows;
    int64_t valid = std::min<int64_t>(kPanelRows, w.rows - row0);
    for_each_token_tile<kT>(tokens, [&](auto tile, int64_t t) {
      panel_tile<kType, decltype(tile)::value>(panel, nb, x, t, y, ldy, row0, valid);
    });
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace

MatmulPanelsFn panel_kernel_avx2(GgmlType type) {
  return panel_kernel_by_type(type, []<GgmlType kType>() -> MatmulPanelsFn { return panels_avx2<kType>; });
}

float dot_f32_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return hsum(_mm256_add_ps(s0, s1)) + tail;
}

}  // namespace pdserve::cpu::detail

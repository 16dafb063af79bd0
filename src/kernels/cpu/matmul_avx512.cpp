// AVX-512 VNNI kernels over panel-layout weights (panel.h): one 32-bit lane per weight row, so
// a record's 16 scales load as one vector. For each block the 8 steps of 4 elements run
// vpdpbusd of the unpacked weight bytes (unsigned) against 4 activation bytes broadcast to every
// lane; stored offsets (Q4_0: 8, Q5_0: 16, Q8_0: 128 after flipping the sign bit) are removed
// by starting the integer sum at -offset·Σx. The integer block sum is exact, and the float steps
// after it are the ones every ISA's kernel performs (matmul.h), so results match bitwise.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/panel_driver.h"

namespace pdserve::cpu::detail {

namespace {

template <GgmlType kType, int T>
void panel_tile(const uint8_t* panel, int64_t nb, const Activations& x, int64_t t0, float* y, int64_t ldy,
                int64_t row0, __mmask16 store_mask) {
  constexpr PanelLayout L = panel_layout(kType);
  constexpr int kOffset = L.q8 ? 128 : L.offset;
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
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = panel + b * L.record;
    __m512i w[8];
    if constexpr (L.q8) {
      for (int k = 0; k < 8; ++k) {
        w[k] = _mm512_xor_si512(_mm512_loadu_si512(rec + L.quants + 64 * k),
                                _mm512_set1_epi8(static_cast<char>(0x80)));
      }
    } else {
      for (int j = 0; j < 4; ++j) {
        __m512i v = _mm512_loadu_si512(rec + L.quants + 64 * j);
        w[j] = _mm512_and_si512(v, low4);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      if constexpr (L.high >= 0) {
        const __m512i sixteen = _mm512_set1_epi8(16);
        for (int k = 0; k < 8; ++k) {
          __mmask64 hb;
          std::memcpy(&hb, rec + L.high + 8 * k, 8);
          w[k] = _mm512_mask_add_epi8(w[k], hb, w[k], sixteen);
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec)));
    __m512 mw = _mm512_setzero_ps();
    if constexpr (L.mins >= 0)
      mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + L.mins)));
    for (int t = 0; t < T; ++t) {
      const int32_t* xb = reinterpret_cast<const int32_t*>(xq[t] + b * 32);
      __m512i i0 = _mm512_set1_epi32(-kOffset * xsum[t][b]);
      __m512i i1 = _mm512_setzero_si512();
      i0 = _mm512_dpbusd_epi32(i0, w[0], _mm512_set1_epi32(xb[0]));
      i1 = _mm512_dpbusd_epi32(i1, w[4], _mm512_set1_epi32(xb[4]));
      i0 = _mm512_dpbusd_epi32(i0, w[1], _mm512_set1_epi32(xb[1]));
      i1 = _mm512_dpbusd_epi32(i1, w[5], _mm512_set1_epi32(xb[5]));
      i0 = _mm512_dpbusd_epi32(i0, w[2], _mm512_set1_epi32(xb[2]));
      i1 = _mm512_dpbusd_epi32(i1, w[6], _mm512_set1_epi32(xb[6]));
      i0 = _mm512_dpbusd_epi32(i0, w[3], _mm512_set1_epi32(xb[3]));
      i1 = _mm512_dpbusd_epi32(i1, w[7], _mm512_set1_epi32(xb[7]));
      __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(xd[t][b])), f, acc[t]);
      if constexpr (L.mins >= 0) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[t][b]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(y + (t0 + t) * ldy + row0, store_mask, acc[t]);
}

template <GgmlType kType>
void panels_avx512(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  constexpr int kT = 8;
  const int64_t nb = w.cols / 32;
  const size_t stride = panel_stride(kType, w.cols);
  const int64_t tokens = x.rows();
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data + static_cast<size_t>(p) * stride;
    int64_t row0 = p * kPanelRows;
    int64_t valid = std::min<int64_t>(kPanelRows, w.rows - row0);
    auto mask = static_cast<__mmask16>((1u << valid) - 1);
    for_each_token_tile<kT>(tokens, [&](auto tile, int64_t t) {
      panel_tile<kType, decltype(tile)::value>(panel, nb, x, t, y, ldy, row0, mask);
    });
  }
}

}  // namespace

MatmulPanelsFn panel_kernel_avx512(GgmlType type) {
  return panel_kernel_by_type(type, []<GgmlType kType>() -> MatmulPanelsFn { return panels_avx512<kType>; });
}

float dot_f32_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  if (i + 16 <= n) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    i += 16;
  }
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

}  // namespace pdserve::cpu::detail

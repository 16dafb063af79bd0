// AVX-512 VNNI kernels (compiled with AVX-512 flags; called only when the CPU has them).
// Two weight blocks (64 values) per step: weights as unsigned bytes, activations as signed
// bytes, vpdpbusd for the products. Types stored with an offset (Q4_0: 8, Q5_0: 16, Q8_0: 128
// after flipping the sign bit) subtract offset·Σx, which is computed once per token and step.
#include <immintrin.h>

#include <cstring>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu::detail {

namespace {

template <GgmlType kType>
struct Traits;
template <>
struct Traits<GgmlType::kQ4_0> {
  using Block = BlockQ4_0;
  [[maybe_unused]] static constexpr int kOffset = 8;
  [[maybe_unused]] static constexpr bool kMin = false;
};
template <>
struct Traits<GgmlType::kQ4_1> {
  using Block = BlockQ4_1;
  [[maybe_unused]] static constexpr int kOffset = 0;
  [[maybe_unused]] static constexpr bool kMin = true;
};
template <>
struct Traits<GgmlType::kQ5_0> {
  using Block = BlockQ5_0;
  [[maybe_unused]] static constexpr int kOffset = 16;
  [[maybe_unused]] static constexpr bool kMin = false;
};
template <>
struct Traits<GgmlType::kQ5_1> {
  using Block = BlockQ5_1;
  [[maybe_unused]] static constexpr int kOffset = 0;
  [[maybe_unused]] static constexpr bool kMin = true;
};
template <>
struct Traits<GgmlType::kQ8_0> {
  using Block = BlockQ8_0;
  [[maybe_unused]] static constexpr int kOffset = 128;
  [[maybe_unused]] static constexpr bool kMin = false;
};

// Block b of a row as 32 unsigned bytes in element order; its scale and min.
template <GgmlType kType>
inline __m256i unpack(const typename Traits<kType>::Block* blocks, int64_t b, float& d, float& m) {
  const auto& blk = blocks[b];
  d = _cvtsh_ss(blk.d);
  m = 0.0f;
  if constexpr (Traits<kType>::kMin) m = _cvtsh_ss(blk.m);
  if constexpr (kType == GgmlType::kQ8_0) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs));
    return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
  } else {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    __m256i r = _mm256_set_m128i(hi, lo);
    if constexpr (kType == GgmlType::kQ5_0 || kType == GgmlType::kQ5_1) {
      uint32_t qh;
      std::memcpy(&qh, blk.qh, 4);
      r = _mm256_or_si256(r, _mm256_and_si256(_mm256_movm_epi8(qh), _mm256_set1_epi8(0x10)));
    }
    return r;
  }
}

inline __m512 halves(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }

// Computes an R-row × T-token tile. Every accumulator goes through the same operations in the
// same order whatever R and T are, so tiles of any shape give bitwise identical results.
template <GgmlType kType, int R, int T>
inline void tile(const uint8_t* w_rows, size_t rb, const Activations& x, int64_t t0, int64_t nb, float* y,
                 int64_t ldy, int64_t r0) {
  using Tr = Traits<kType>;
  using Block = typename Tr::Block;
  const Block* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = reinterpret_cast<const Block*>(w_rows + static_cast<size_t>(r) * rb);
  const int8_t* xq[T];
  const float* xd[T];
  const float* xs[T];
  for (int t = 0; t < T; ++t) {
    xq[t] = x.row_qs(t0 + t);
    xd[t] = x.row_d(t0 + t);
    xs[t] = x.row_s(t0 + t);
  }
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  __m256 acc_tail[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc_tail[r][t] = _mm256_setzero_ps();

  const __m512i offset = _mm512_set1_epi8(static_cast<char>(Tr::kOffset));
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m512i wv[R];
    __m512 dw[R];
    __m512 mw[R];
    for (int r = 0; r < R; ++r) {
      float d0, m0, d1, m1;
      __m256i w0 = unpack<kType>(rows[r], b, d0, m0);
      __m256i w1 = unpack<kType>(rows[r], b + 1, d1, m1);
      wv[r] = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
      dw[r] = halves(d0, d1);
      if constexpr (Tr::kMin) mw[r] = halves(m0, m1);
    }
    for (int t = 0; t < T; ++t) {
      __m512i xv = _mm512_loadu_si512(xq[t] + b * 32);
      __m512i base = _mm512_setzero_si512();
      if constexpr (Tr::kOffset != 0) {
        base = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, xv));
      }
      __m512 dx = halves(xd[t][b], xd[t][b + 1]);
      __m512 sx;
      if constexpr (Tr::kMin) sx = halves(xs[t][b] * 0.125f, xs[t][b + 1] * 0.125f);
      for (int r = 0; r < R; ++r) {
        __m512i dot = _mm512_dpbusd_epi32(base, wv[r], xv);
        acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], dx), _mm512_cvtepi32_ps(dot), acc[r][t]);
        if constexpr (Tr::kMin) acc[r][t] = _mm512_fmadd_ps(mw[r], sx, acc[r][t]);
      }
    }
  }
  if (b < nb) {  // odd block count: the last block with 256-bit operations
    const __m256i offset256 = _mm256_set1_epi8(static_cast<char>(Tr::kOffset));
    __m256i wv[R];
    float dw[R], mw[R];
    for (int r = 0; r < R; ++r) wv[r] = unpack<kType>(rows[r], b, dw[r], mw[r]);
    for (int t = 0; t < T; ++t) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + b * 32));
      __m256i base = _mm256_setzero_si256();
      if constexpr (Tr::kOffset != 0) {
        base = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset256, xv));
      }
      for (int r = 0; r < R; ++r) {
        __m256i dot = _mm256_dpbusd_epi32(base, wv[r], xv);
        acc_tail[r][t] =
            _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * xd[t][b]), _mm256_cvtepi32_ps(dot), acc_tail[r][t]);
        if constexpr (Tr::kMin) {
          acc_tail[r][t] =
              _mm256_fmadd_ps(_mm256_set1_ps(mw[r]), _mm256_set1_ps(xs[t][b] * 0.125f), acc_tail[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      // The tail accumulator is zero when the block count is even.
      __m512 folded = _mm512_add_ps(acc[r][t], _mm512_zextps256_ps512(acc_tail[r][t]));
      y[(t0 + t) * ldy + r0 + r] = _mm512_reduce_add_ps(folded);
    }
  }
}

template <GgmlType kType, int R>
inline void row_tile(const uint8_t* w_rows, size_t rb, const Activations& x, int64_t nb, float* y, int64_t ldy,
                     int64_t r0) {
  constexpr int kT = 4;
  int64_t t = 0;
  for (; t + kT <= x.rows(); t += kT) tile<kType, R, kT>(w_rows, rb, x, t, nb, y, ldy, r0);
  switch (x.rows() - t) {
    case 1: tile<kType, R, 1>(w_rows, rb, x, t, nb, y, ldy, r0); break;
    case 2: tile<kType, R, 2>(w_rows, rb, x, t, nb, y, ldy, r0); break;
    case 3: tile<kType, R, 3>(w_rows, rb, x, t, nb, y, ldy, r0); break;
    default: break;
  }
}

template <GgmlType kType>
void rows_avx512(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int kR = 4;
  size_t rb = row_bytes(w.type, w.cols);
  int64_t nb = w.cols / 32;
  int64_t r = r0;
  for (; r + kR <= r1; r += kR) row_tile<kType, kR>(w.data + static_cast<size_t>(r) * rb, rb, x, nb, y, ldy, r);
  for (; r < r1; ++r) row_tile<kType, 1>(w.data + static_cast<size_t>(r) * rb, rb, x, nb, y, ldy, r);
}

}  // namespace

MatmulRowsFn int8_kernel_avx512(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return rows_avx512<GgmlType::kQ4_0>;
    case GgmlType::kQ4_1: return rows_avx512<GgmlType::kQ4_1>;
    case GgmlType::kQ5_0: return rows_avx512<GgmlType::kQ5_0>;
    case GgmlType::kQ5_1: return rows_avx512<GgmlType::kQ5_1>;
    case GgmlType::kQ8_0: return rows_avx512<GgmlType::kQ8_0>;
    default: return nullptr;
  }
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

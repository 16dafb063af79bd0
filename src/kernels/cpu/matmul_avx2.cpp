// AVX2/FMA kernels (compiled with AVX2 flags; called only when the CPU has them). One block
// (32 values) per step with vpmaddubsw: unsigned weights for Q4_1/Q5_1, and for the signed
// types the |w| · sign(x, w) form, which cannot saturate.
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
  [[maybe_unused]] static constexpr int kOffset = 0;
  [[maybe_unused]] static constexpr bool kMin = false;
};

inline __m256i bits_to_bytes(uint32_t bits) {
  // Byte j = 0xFF where bit j is set.
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuffle);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

// Block b as 32 bytes in element order: unsigned for types with a min, signed otherwise.
template <GgmlType kType>
inline __m256i unpack(const typename Traits<kType>::Block* blocks, int64_t b, float& d, float& m) {
  const auto& blk = blocks[b];
  d = _cvtsh_ss(blk.d);
  m = 0.0f;
  if constexpr (Traits<kType>::kMin) m = _cvtsh_ss(blk.m);
  if constexpr (kType == GgmlType::kQ8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs));
  } else {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256i r = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
    if constexpr (kType == GgmlType::kQ5_0 || kType == GgmlType::kQ5_1) {
      uint32_t qh;
      std::memcpy(&qh, blk.qh, 4);
      r = _mm256_or_si256(r, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)));
    }
    if constexpr (Traits<kType>::kOffset != 0) r = _mm256_sub_epi8(r, _mm256_set1_epi8(Traits<kType>::kOffset));
    return r;
  }
}

template <GgmlType kType>
inline __m256i dot_bytes(__m256i w, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i p16;
  if constexpr (Traits<kType>::kMin) {
    p16 = _mm256_maddubs_epi16(w, x);
  } else {
    p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  }
  return _mm256_madd_epi16(p16, ones);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// An R-row × T-token tile; every accumulator sees the same operations whatever R and T are.
template <GgmlType kType, int R, int T>
inline void tile(const uint8_t* w_rows, size_t rb, const Activations& x, int64_t t0, int64_t nb, float* y,
                 int64_t ldy, int64_t r0) {
  using Tr = Traits<kType>;
  using Block = typename Tr::Block;
  const Block* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = reinterpret_cast<const Block*>(w_rows + static_cast<size_t>(r) * rb);
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wv[R];
    float dw[R], mw[R];
    for (int r = 0; r < R; ++r) wv[r] = unpack<kType>(rows[r], b, dw[r], mw[r]);
    for (int t = 0; t < T; ++t) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.row_qs(t0 + t) + b * 32));
      float dx = x.row_d(t0 + t)[b];
      for (int r = 0; r < R; ++r) {
        __m256i dot = dot_bytes<kType>(wv[r], xv);
        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), _mm256_cvtepi32_ps(dot), acc[r][t]);
        if constexpr (Tr::kMin) {
          acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(mw[r]), _mm256_set1_ps(x.row_s(t0 + t)[b] * 0.125f),
                                      acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r0 + r] = hsum(acc[r][t]);
}

template <GgmlType kType, int R>
inline void row_tile(const uint8_t* w_rows, size_t rb, const Activations& x, int64_t nb, float* y, int64_t ldy,
                     int64_t r0) {
  constexpr int kT = 3;
  int64_t t = 0;
  for (; t + kT <= x.rows(); t += kT) tile<kType, R, kT>(w_rows, rb, x, t, nb, y, ldy, r0);
  switch (x.rows() - t) {
    case 1: tile<kType, R, 1>(w_rows, rb, x, t, nb, y, ldy, r0); break;
    case 2: tile<kType, R, 2>(w_rows, rb, x, t, nb, y, ldy, r0); break;
    default: break;
  }
}

template <GgmlType kType>
void rows_avx2(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int kR = 4;
  size_t rb = row_bytes(w.type, w.cols);
  int64_t nb = w.cols / 32;
  int64_t r = r0;
  for (; r + kR <= r1; r += kR) row_tile<kType, kR>(w.data + static_cast<size_t>(r) * rb, rb, x, nb, y, ldy, r);
  for (; r < r1; ++r) row_tile<kType, 1>(w.data + static_cast<size_t>(r) * rb, rb, x, nb, y, ldy, r);
}

}  // namespace

MatmulRowsFn int8_kernel_avx2(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return rows_avx2<GgmlType::kQ4_0>;
    case GgmlType::kQ4_1: return rows_avx2<GgmlType::kQ4_1>;
    case GgmlType::kQ5_0: return rows_avx2<GgmlType::kQ5_0>;
    case GgmlType::kQ5_1: return rows_avx2<GgmlType::kQ5_1>;
    case GgmlType::kQ8_0: return rows_avx2<GgmlType::kQ8_0>;
    default: return nullptr;
  }
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

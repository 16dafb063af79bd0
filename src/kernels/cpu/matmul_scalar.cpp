// Portable reference kernels: integer block dot products in plain C++.
#include <cstring>

#include "kernels/cpu/fp16.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu::detail {

namespace {
// Unpacks block b of a weight row into 32 integer values (already offset to their signed range)
// and returns its scale d and min m (0 for symmetric types).
template <GgmlType kType>
inline void unpack_block(const uint8_t* row, int64_t b, int32_t* q, float& d, float& m) {
  if constexpr (kType == GgmlType::kQ4_0) {
    const auto& blk = reinterpret_cast<const BlockQ4_0*>(row)[b];
    d = fp16_to_fp32(blk.d);
    m = 0;
    for (int j = 0; j < 16; ++j) {
      q[j] = (blk.qs[j] & 0xF) - 8;
      q[j + 16] = (blk.qs[j] >> 4) - 8;
    }
  } else if constexpr (kType == GgmlType::kQ4_1) {
    const auto& blk = reinterpret_cast<const BlockQ4_1*>(row)[b];
    d = fp16_to_fp32(blk.d);
    m = fp16_to_fp32(blk.m);
    for (int j = 0; j < 16; ++j) {
      q[j] = blk.qs[j] & 0xF;
      q[j + 16] = blk.qs[j] >> 4;
    }
  } else if constexpr (kType == GgmlType::kQ5_0 || kType == GgmlType::kQ5_1) {
    using Block = std::conditional_t<kType == GgmlType::kQ5_0, BlockQ5_0, BlockQ5_1>;
    const auto& blk = reinterpret_cast<const Block*>(row)[b];
    d = fp16_to_fp32(blk.d);
    int off = 16;
    m = 0;
    if constexpr (kType == GgmlType::kQ5_1) {
      m = fp16_to_fp32(blk.m);
      off = 0;
    }
    uint32_t qh;
    std::memcpy(&qh, blk.qh, 4);
    for (int j = 0; j < 16; ++j) {
      q[j] = ((blk.qs[j] & 0xF) | static_cast<int>(((qh >> j) & 1u) << 4)) - off;
      q[j + 16] = ((blk.qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4)) - off;
    }
  } else {
    static_assert(kType == GgmlType::kQ8_0);
    const auto& blk = reinterpret_cast<const BlockQ8_0*>(row)[b];
    d = fp16_to_fp32(blk.d);
    m = 0;
    for (int j = 0; j < 32; ++j) q[j] = blk.qs[j];
  }
}

template <GgmlType kType>
void rows_scalar(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  size_t rb = row_bytes(w.type, w.cols);
  int64_t nb = w.cols / 32;
  int32_t q[32];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.data + static_cast<size_t>(r) * rb;
    for (int64_t t = 0; t < x.rows(); ++t) {
      const int8_t* xq = x.row_qs(t);
      const float* xd = x.row_d(t);
      const float* xs = x.row_s(t);
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        unpack_block<kType>(row, b, q, d, m);
        int32_t isum = 0;
        for (int j = 0; j < 32; ++j) isum += q[j] * xq[b * 32 + j];
        acc += d * xd[b] * static_cast<float>(isum) + m * xs[b];
      }
      y[t * ldy + r] = acc;
    }
  }
}
}  // namespace

MatmulRowsFn int8_kernel_scalar(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return rows_scalar<GgmlType::kQ4_0>;
    case GgmlType::kQ4_1: return rows_scalar<GgmlType::kQ4_1>;
    case GgmlType::kQ5_0: return rows_scalar<GgmlType::kQ5_0>;
    case GgmlType::kQ5_1: return rows_scalar<GgmlType::kQ5_1>;
    case GgmlType::kQ8_0: return rows_scalar<GgmlType::kQ8_0>;
    default: return nullptr;
  }
}

float dot_f32_scalar(const float* a, const float* b, int64_t n) {
  // Eight running sums, like the vector kernels, so the compiler may keep them in registers.
  float s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

}  // namespace pdserve::cpu::detail

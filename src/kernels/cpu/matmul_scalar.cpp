// Portable kernels over panel-layout weights (panel.h), in plain C++. They perform the same
// exact integer block sums and the same float steps (std::fma) as the SIMD kernels, so all
// instruction sets agree bitwise on the integer-dot types.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/fp16.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/panel_driver.h"

namespace pdserve::cpu::detail {

namespace {

// The stored (unsigned, or signed for Q8_0) value of element e of lane r in a record.
template <GgmlType kType>
inline int32_t element(const uint8_t* rec, int r, int e) {
  constexpr PanelLayout L = panel_layout(kType);
  if constexpr (L.q8) {
    return static_cast<int8_t>(rec[L.quants + 64 * (e / 4) + 4 * r + e % 4]);
  } else {
    uint8_t byte = rec[L.quants + 64 * ((e % 16) / 4) + 4 * r + e % 4];
    int32_t v = e < 16 ? (byte & 0xF) : (byte >> 4);
    if constexpr (L.high >= 0) {
      uint64_t mask;
      std::memcpy(&mask, rec + L.high + 8 * (e / 4), 8);
      v |= static_cast<int32_t>((mask >> (4 * r + e % 4)) & 1u) << 4;
    }
    return v;
  }
}

template <GgmlType kType>
void panels_scalar(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  constexpr PanelLayout L = panel_layout(kType);
  const int64_t nb = w.cols / 32;
  const size_t stride = panel_stride(kType, w.cols);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data + static_cast<size_t>(p) * stride;
    const int64_t row0 = p * kPanelRows;
    const int valid = static_cast<int>(std::min<int64_t>(kPanelRows, w.rows - row0));
    for (int64_t t = 0; t < x.rows(); ++t) {
      const int8_t* xq = x.row_qs(t);
      for (int r = 0; r < valid; ++r) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* rec = panel + b * L.record;
          int32_t isum = -L.offset * x.row_qsum(t)[b];
          for (int e = 0; e < 32; ++e) isum += element<kType>(rec, r, e) * xq[b * 32 + e];
          uint16_t dh;
          std::memcpy(&dh, rec + 2 * r, 2);
          float ds = fp16_to_fp32(dh) * x.row_d(t)[b];
          acc = std::fma(ds, static_cast<float>(isum), acc);
          if constexpr (L.mins >= 0) {
            uint16_t mh;
            std::memcpy(&mh, rec + L.mins + 2 * r, 2);
            acc = std::fma(fp16_to_fp32(mh), x.row_s(t)[b], acc);
          }
        }
        y[t * ldy + row0 + r] = acc;
      }
    }
  }
}
}  // namespace

MatmulPanelsFn panel_kernel_scalar(GgmlType type) {
  return panel_kernel_by_type(type, []<GgmlType kType>() -> MatmulPanelsFn { return panels_scalar<kType>; });
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

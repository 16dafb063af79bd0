#include "kernels/cpu/matmul.h"

#include <algorithm>
#include <vector>

#include "common/check.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu {

void Activations::prepare(const float* x, int64_t rows, int64_t cols, ThreadPool& pool) {
  PD_CHECK(cols % kQ8Block == 0);
  x_ = x;
  rows_ = rows;
  cols_ = cols;
  int64_t nb = cols / kQ8Block;
  qs_.resize(static_cast<size_t>(rows * cols));
  d_.resize(static_cast<size_t>(rows * nb));
  s_.resize(static_cast<size_t>(rows * nb));
  qsum_.resize(static_cast<size_t>(rows * nb));
  pool.run([&](int idx, int n) {
    for (int64_t t = idx; t < rows; t += n) {
      quantize_row_q8(x + t * cols, cols,
                      Q8Row{qs_.data() + t * cols, d_.data() + t * nb, s_.data() + t * nb, qsum_.data() + t * nb});
    }
  });
}

float dot_f32(const float* a, const float* b, int64_t n) {
  switch (detected_isa()) {
    case Isa::kAvx512: return detail::dot_f32_avx512(a, b, n);
    case Isa::kAvx2: return detail::dot_f32_avx2(a, b, n);
    case Isa::kScalar: break;
  }
  return detail::dot_f32_scalar(a, b, n);
}

namespace {
// Rows decoded to float, then float dot products with every token.
void float_rows(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  thread_local AlignedBuffer<float> row;
  row.resize(static_cast<size_t>(w.cols));
  size_t rb = row_bytes(w.type, w.cols);
  for (int64_t r = r0; r < r1; ++r) {
    dequantize_row(w.type, w.data + static_cast<size_t>(r) * rb, row.data(), w.cols);
    for (int64_t t = 0; t < x.rows(); ++t) y[t * ldy + r] = dot_f32(row.data(), x.row_f32(t), w.cols);
  }
}

MatmulRowsFn pick_kernel(GgmlType type) {
  if (!uses_int8_dot(type)) return float_rows;
  MatmulRowsFn fn = nullptr;
  switch (detected_isa()) {
    case Isa::kAvx512: fn = detail::int8_kernel_avx512(type); break;
    case Isa::kAvx2: fn = detail::int8_kernel_avx2(type); break;
    case Isa::kScalar: break;
  }
  return fn ? fn : detail::int8_kernel_scalar(type);
}
}  // namespace

void matmul(const Weights& w, const Activations& x, float* y, int64_t ldy, ThreadPool& pool) {
  PD_CHECK(w.cols == x.cols());
  PD_CHECK_MSG(is_supported_weight_type(w.type), "matmul: unsupported weight type");
  MatmulRowsFn fn = pick_kernel(w.type);
  // Rows are split in chunks of 16 so tiles line up; which thread computes a row never changes
  // its value.
  constexpr int64_t kAlign = 16;
  pool.run([&](int idx, int n) {
    int64_t chunks = (w.rows + kAlign - 1) / kAlign;
    int64_t per = (chunks + n - 1) / n;
    int64_t r0 = std::min(w.rows, idx * per * kAlign);
    int64_t r1 = std::min(w.rows, (idx + 1) * per * kAlign);
    if (r0 < r1) fn(w, x, y, ldy, r0, r1);
  });
}

}  // namespace pdserve::cpu

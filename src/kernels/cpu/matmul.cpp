#include "kernels/cpu/matmul.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/quant.h"

namespace pdserve::cpu {

void Activations::resize(const float* x, int64_t rows, int64_t cols) {
  PD_CHECK(cols % kQ8Block == 0);
  x_ = x;
  rows_ = rows;
  cols_ = cols;
  int64_t nb = cols / kQ8Block;
  qs_.resize(static_cast<size_t>(rows * cols));
  d_.resize(static_cast<size_t>(rows * nb));
  s_.resize(static_cast<size_t>(rows * nb));
  qsum_.resize(static_cast<size_t>(rows * nb));
}

void Activations::quantize(int64_t t) {
  int64_t nb = cols_ / kQ8Block;
  quantize_row_q8(
      x_ + t * cols_, cols_,
      Q8Row{qs_.data() + t * cols_, d_.data() + t * nb, s_.data() + t * nb, qsum_.data() + t * nb});
}

void Activations::prepare(const float* x, int64_t rows, int64_t cols, ThreadPool& pool) {
  resize(x, rows, cols);
  pool.run([&](int idx, int n) {
    for (int64_t t = idx; t < rows; t += n) quantize(t);
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

WeightLayout compute_layout(GgmlType type) {
  return uses_int8_dot(type) ? WeightLayout::kPanels : WeightLayout::kGgml;
}

size_t compute_bytes(GgmlType type, int64_t rows, int64_t cols) {
  return compute_layout(type) == WeightLayout::kPanels ? panel_bytes(type, rows, cols)
                                                       : row_bytes(type, cols) * static_cast<size_t>(rows);
}

Weights to_compute_layout(const Weights& src, uint8_t* dst, ThreadPool& pool) {
  PD_CHECK(src.layout == WeightLayout::kGgml);
  Weights out = src;
  out.data = dst;
  out.layout = compute_layout(src.type);
  if (out.layout == WeightLayout::kPanels) {
    int64_t panels = (src.rows + kPanelRows - 1) / kPanelRows;
    pool.run([&](int idx, int n) {
      int64_t per = (panels + n - 1) / n;
      int64_t p0 = std::min(panels, idx * per), p1 = std::min(panels, (idx + 1) * per);
      if (p0 < p1) pack_panels(src.type, src.data, src.rows, src.cols, p0, p1, dst);
    });
  } else {
    size_t bytes = compute_bytes(src.type, src.rows, src.cols);
    pool.run([&](int idx, int n) {
      size_t per = (bytes + static_cast<size_t>(n) - 1) / static_cast<size_t>(n);
      size_t b0 = std::min(bytes, static_cast<size_t>(idx) * per), b1 = std::min(bytes, b0 + per);
      if (b0 < b1) std::memcpy(dst + b0, src.data + b0, b1 - b0);
    });
  }
  return out;
}

void dequantize_weight_row(const Weights& w, int64_t row, float* out) {
  if (w.layout == WeightLayout::kPanels) {
    dequantize_panel_row(w.type, w.data, w.cols, row, out);
  } else {
    dequantize_row(w.type, w.data + static_cast<size_t>(row) * row_bytes(w.type, w.cols), out, w.cols);
  }
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

MatmulPanelsFn pick_panel_kernel(GgmlType type) {
  MatmulPanelsFn fn = nullptr;
  switch (detected_isa()) {
    case Isa::kAvx512: fn = detail::panel_kernel_avx512(type); break;
    case Isa::kAvx2: fn = detail::panel_kernel_avx2(type); break;
    case Isa::kScalar: break;
  }
  return fn ? fn : detail::panel_kernel_scalar(type);
}

// Splits [0, count) evenly across the pool's threads.
template <typename Fn>
void split(ThreadPool& pool, int64_t count, Fn&& fn) {
  pool.run([&](int idx, int n) {
    int64_t per = (count + n - 1) / n;
    int64_t b0 = std::min(count, idx * per), b1 = std::min(count, (idx + 1) * per);
    if (b0 < b1) fn(b0, b1);
  });
}
}  // namespace

void matmul(const Weights& w, const Activations& x, float* y, int64_t ldy, ThreadPool& pool) {
  MatmulTarget t{&w, y, ldy};
  matmul_many(std::span<const MatmulTarget>(&t, 1), x, pool);
}

void matmul_many(std::span<const MatmulTarget> targets, const Activations& x, ThreadPool& pool) {
  // Work units: panels of 16 rows for panel layouts, rows otherwise; one index space over all
  // targets, split evenly.
  struct Job {
    const MatmulTarget* t = nullptr;
    MatmulPanelsFn fn = nullptr;  // nullptr: the float path
    int64_t first_unit = 0;
    int64_t units = 0;
  };
  constexpr size_t kMaxTargets = 8;
  PD_CHECK(targets.size() <= kMaxTargets);
  Job jobs[kMaxTargets];
  int64_t total = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    const Weights& w = *targets[i].w;
    PD_CHECK(w.cols == x.cols());
    PD_CHECK_MSG(is_supported_weight_type(w.type), "matmul: unsupported weight type");
    PD_CHECK_MSG(w.layout == compute_layout(w.type), "matmul: weights not in their compute layout");
    bool panels = w.layout == WeightLayout::kPanels;
    int64_t units = panels ? (w.rows + kPanelRows - 1) / kPanelRows : w.rows;
    jobs[i] = {&targets[i], panels ? pick_panel_kernel(w.type) : nullptr, total, units};
    total += units;
  }
  split(pool, total, [&](int64_t u0, int64_t u1) {
    for (size_t i = 0; i < targets.size(); ++i) {
      const Job& j = jobs[i];
      int64_t b0 = std::max(u0, j.first_unit) - j.first_unit;
      int64_t b1 = std::min(u1, j.first_unit + j.units) - j.first_unit;
      if (b0 >= b1) continue;
      if (j.fn) {
        j.fn(*j.t->w, x, j.t->y, j.t->ldy, b0, b1);
      } else {
        float_rows(*j.t->w, x, j.t->y, j.t->ldy, b0, b1);
      }
    }
  });
}

}  // namespace pdserve::cpu

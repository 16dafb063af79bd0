// Matrix products of quantized weights with float activations on the CPU.
//
//   y[t·ldy + r] = Σ_k W[r, k] · x[t, k]     for tokens t < x.rows(), weight rows r < w.rows
//
// Weights stay quantized. For Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 they are re-laid out once, at load, in
// panels of 16 rows (panel.h; same size as the file), the activations are quantized once per
// call to 8-bit blocks (Activations::prepare), and the products run on integer dot products.
// For every row r, token t and 32-column block b, every kernel computes the exact integer sum
// isum = Σ w·xq, then acc = fma(d_w·d_x, float(isum), acc) and, for types with a min,
// acc = fma(m_w, s_x, acc), blocks in order — so these types give bitwise identical results on
// every instruction set. Other types (F32, F16, BF16, K-quants) keep the GGML layout and are
// decoded row by row to float; their results differ between instruction sets.
//
// Batch invariance (DESIGN.md §4): every output element is computed by the same sequence of
// operations whatever the number of tokens, the tile it falls in, or the thread that computes
// it, so a token's result is bitwise identical alone or in any batch.
// Thread-safety: an Activations object is written by prepare() and then read concurrently.
#pragma once

#include <cstdint>
#include <span>

#include "common/thread_pool.h"
#include "kernels/cpu/aligned_buffer.h"
#include "kernels/ggml_types.h"

namespace pdserve::cpu {

enum class WeightLayout : uint8_t {
  kGgml,    // rows × row_bytes(type, cols), row-major, as in a GGUF file
  kPanels,  // panel.h (integer-dot types only)
};

struct Weights {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  WeightLayout layout = WeightLayout::kGgml;
};

// The layout matmul() computes with for a type: kPanels for the integer-dot types.
WeightLayout compute_layout(GgmlType type);
// Bytes of rows × cols weights in their compute layout.
size_t compute_bytes(GgmlType type, int64_t rows, int64_t cols);
// Copies GGML-layout `src` into `dst` (compute_bytes of it) in the compute layout, splitting the
// work across the pool; returns the Weights that view `dst`.
Weights to_compute_layout(const Weights& src, uint8_t* dst, ThreadPool& pool);
// Decodes row `row` of weights in either layout into w.cols floats.
void dequantize_weight_row(const Weights& w, int64_t row, float* out);

class Activations {
 public:
  // Keeps a pointer to x (rows × cols floats, row stride cols) and quantizes it.
  void prepare(const float* x, int64_t rows, int64_t cols, ThreadPool& pool);
  // The same, but each row is first produced by make_row(t) (which writes row t of x) inside the
  // same parallel region — fusing an element-wise op (a norm, an activation) with quantization.
  template <typename MakeRow>
  void prepare_rows(float* x, int64_t rows, int64_t cols, ThreadPool& pool, MakeRow&& make_row) {
    resize(x, rows, cols);
    pool.run([&](int idx, int n) {
      for (int64_t t = idx; t < rows; t += n) {
        make_row(t);
        quantize(t);
      }
    });
  }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  const float* row_f32(int64_t t) const { return x_ + t * cols_; }
  const int8_t* row_qs(int64_t t) const { return qs_.data() + t * cols_; }
  const float* row_d(int64_t t) const { return d_.data() + t * (cols_ / 32); }
  const float* row_s(int64_t t) const { return s_.data() + t * (cols_ / 32); }
  const int32_t* row_qsum(int64_t t) const { return qsum_.data() + t * (cols_ / 32); }

 private:
  void resize(const float* x, int64_t rows, int64_t cols);
  void quantize(int64_t t);

  const float* x_ = nullptr;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  AlignedBuffer<int8_t> qs_;
  AlignedBuffer<float> d_;
  AlignedBuffer<float> s_;
  AlignedBuffer<int32_t> qsum_;
};

void matmul(const Weights& w, const Activations& x, float* y, int64_t ldy, ThreadPool& pool);

// Several products of the same activations in one parallel region (e.g. Q, K and V), the work
// split evenly over all of them; each result is the one matmul() gives.
struct MatmulTarget {
  const Weights* w = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
};
void matmul_many(std::span<const MatmulTarget> targets, const Activations& x, ThreadPool& pool);

// The integer-dot kernel of one instruction set: computes panels [panel_begin, panel_end) (16
// rows each) of panel-layout weights for all tokens.
using MatmulPanelsFn = void (*)(const Weights& w, const Activations& x, float* y, int64_t ldy,
                                int64_t panel_begin, int64_t panel_end);

namespace detail {
// Per-ISA entry points (defined in matmul_scalar.cpp, matmul_avx2.cpp, matmul_avx512.cpp);
// nullptr for types without an integer-dot kernel.
MatmulPanelsFn panel_kernel_scalar(GgmlType type);
MatmulPanelsFn panel_kernel_avx2(GgmlType type);
MatmulPanelsFn panel_kernel_avx512(GgmlType type);
// Dot products of float vectors, one per ISA; fixed summation order for a given n.
float dot_f32_scalar(const float* a, const float* b, int64_t n);
float dot_f32_avx2(const float* a, const float* b, int64_t n);
float dot_f32_avx512(const float* a, const float* b, int64_t n);
}  // namespace detail

// The float dot product of the active instruction set.
float dot_f32(const float* a, const float* b, int64_t n);

}  // namespace pdserve::cpu

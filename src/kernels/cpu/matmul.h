// Matrix products of quantized weights with float activations on the CPU.
//
//   y[t·ldy + r] = Σ_k W[r, k] · x[t, k]     for tokens t < x.rows(), weight rows r < w.rows
//
// Weights stay in their GGML block format. For Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 the activations are
// quantized once to 8-bit blocks (Activations::prepare) and the products run on integer dot
// products, as llama.cpp does; other types are decoded row by row to float.
//
// Batch invariance (DESIGN.md §4): every output element is computed by the same sequence of
// operations whatever the number of tokens, the tile it falls in, or the thread that computes
// it, so a token's result is bitwise identical alone or in any batch. Results differ between
// instruction sets (scalar, AVX2, AVX-512), which are chosen once per process.
// Thread-safety: an Activations object is written by prepare() and then read concurrently.
#pragma once

#include <cstdint>

#include "common/thread_pool.h"
#include "kernels/cpu/aligned_buffer.h"
#include "kernels/ggml_types.h"

namespace pdserve::cpu {

struct Weights {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;  // rows × row_bytes(type, cols), row-major
  int64_t rows = 0;
  int64_t cols = 0;
};

class Activations {
 public:
  // Keeps a pointer to x (rows × cols floats, row stride cols) and quantizes it.
  void prepare(const float* x, int64_t rows, int64_t cols, ThreadPool& pool);
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  const float* row_f32(int64_t t) const { return x_ + t * cols_; }
  const int8_t* row_qs(int64_t t) const { return qs_.data() + t * cols_; }
  const float* row_d(int64_t t) const { return d_.data() + t * (cols_ / 32); }
  const float* row_s(int64_t t) const { return s_.data() + t * (cols_ / 32); }
  const int32_t* row_qsum(int64_t t) const { return qsum_.data() + t * (cols_ / 32); }

 private:
  const float* x_ = nullptr;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  AlignedBuffer<int8_t> qs_;
  AlignedBuffer<float> d_;
  AlignedBuffer<float> s_;
  AlignedBuffer<int32_t> qsum_;
};

void matmul(const Weights& w, const Activations& x, float* y, int64_t ldy, ThreadPool& pool);

// The kernel of one instruction set: computes rows [row_begin, row_end) for all tokens.
using MatmulRowsFn = void (*)(const Weights& w, const Activations& x, float* y, int64_t ldy, int64_t row_begin,
                              int64_t row_end);

namespace detail {
// Per-ISA entry points (defined in matmul_scalar.cpp, matmul_avx2.cpp, matmul_avx512.cpp);
// nullptr where the ISA has no kernel for the type (the float path is used then).
MatmulRowsFn int8_kernel_scalar(GgmlType type);
MatmulRowsFn int8_kernel_avx2(GgmlType type);
MatmulRowsFn int8_kernel_avx512(GgmlType type);
// Dot products of float vectors, one per ISA; fixed summation order for a given n.
float dot_f32_scalar(const float* a, const float* b, int64_t n);
float dot_f32_avx2(const float* a, const float* b, int64_t n);
float dot_f32_avx512(const float* a, const float* b, int64_t n);
}  // namespace detail

// The float dot product of the active instruction set.
float dot_f32(const float* a, const float* b, int64_t n);

}  // namespace pdserve::cpu

// Matrix products of the CUDA backend through cuBLAS: bf16 or fp16 inputs (Dtype), float
// accumulation.
// Thread-safety: one Blas per thread (it owns a cuBLAS handle and its workspace).
#pragma once

#include <cstdint>
#include <memory>

#include "common/status.h"
#include "kernels/cuda/runtime.h"

namespace pdserve::cuda {

class Blas {
 public:
  // A handle on the current device with a workspace of its own (so that products can be
  // captured in CUDA graphs).
  static StatusOr<Blas> create();
  Blas(Blas&&) noexcept;
  Blas& operator=(Blas&&) noexcept;
  ~Blas();

  // y[m][n] = x[m][k] · w[n][k]ᵀ, all row-major (w as checkpoints store a linear layer's weight);
  // x and w in `dtype`, y in it too (matmul) or float (matmul_f32). Rows of x are ldx values apart
  // (0: k), rows of y ldy apart (0: n).
  Status matmul(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, uint16_t* y,
                StreamHandle stream, int64_t ldx = 0, int64_t ldy = 0, Dtype dtype = Dtype::kBf16);
  Status matmul_f32(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y,
                    StreamHandle stream, int64_t ldx = 0, int64_t ldy = 0, Dtype dtype = Dtype::kBf16);
  // y[m][n] += x[m][k] · w[n][k]ᵀ in float (y read in the product's epilogue: a residual stream
  // takes an output projection with no pass of its own). Each sum rounded once, as y + (x · wᵀ).
  Status matmul_f32_add(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y,
                        StreamHandle stream, Dtype dtype = Dtype::kBf16);

 private:
  struct State;
  explicit Blas(std::unique_ptr<State> state);
  Status run(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, void* y, bool f32_out,
             bool accumulate, StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype);
  std::unique_ptr<State> state_;
};

}  // namespace pdserve::cuda

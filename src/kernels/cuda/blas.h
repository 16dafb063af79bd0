// Matrix products of the CUDA backend through cuBLAS: bf16 or fp16 inputs (Dtype), float
// accumulation.
//
// Algorithms: by default cuBLAS's own choice (cublasGemmEx). While tuning is on (set_tuning), a
// product of at most kTuneMaxRows rows whose shape has not been tuned, called outside a CUDA
// graph's capture, first times on its own operands (into a scratch output of at most 64 MiB, with
// a buffer twice L2's size written before each timed call; it waits for the GPU) cuBLAS's choice
// and the candidates of cuBLASLt's heuristic for pointers aligned as its own, and keeps the fastest
// for its shape, alignment and every row count of its bucket (powers of two and the halves
// between: 1, 2, 3, 4, 6, 8, 12, 16, 24, ...): a cuBLASLt candidate only where it beats cuBLAS's
// choice by the policy's margin and is valid for that row count. A tuning that cannot be made
// (too large, no memory for its buffers) keeps cuBLAS's choice for good. Every later product of
// that shape and bucket takes the choice, tuning on or off — so a product's last bits can differ
// before and after its bucket was tuned, and from one start (or one Blas) to the next where
// candidates are close.
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

  static constexpr int64_t kTuneMaxRows = 1024;  // larger products keep cuBLAS's choice
  // Tuning on or off (see above). A cuBLASLt candidate replaces cuBLAS's choice only when it takes
  // at most (1 − min_gain) of its time (tests pass a large negative min_gain to take cuBLASLt's
  // fastest candidate whatever cuBLAS's time).
  void set_tuning(bool on, double min_gain = 0.03);
  // The bucket of a row count: the row counts that share a tuned choice.
  static int64_t tuning_bucket(int64_t m);
  // The (shape, bucket) pairs tuned so far, and the (shape, row count) pairs that run a cuBLASLt
  // candidate.
  int64_t tuned_buckets() const;
  int64_t lt_plans() const;

 private:
  struct State;
  explicit Blas(std::unique_ptr<State> state);
  Status run(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, void* y, bool f32_out,
             bool accumulate, StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype);
  std::unique_ptr<State> state_;
};

// Whether models tune their decode steps' products (process-wide; on unless the environment sets
// PDSERVE_CUDA_TUNE_PRODUCTS=0, for results that do not depend on timings, or a benchmark turns it
// off): the first decode step of each bucket of batch sizes runs with Blas::set_tuning on.
void set_product_tuning(bool on);
bool product_tuning();

}  // namespace pdserve::cuda

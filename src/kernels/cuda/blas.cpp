#include "kernels/cuda/blas.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <climits>

namespace pdserve::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

Status from_cublas(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return ok_status();
  std::string message = fmt::format("{}: {}", what, cublasGetStatusString(st));
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return resource_exhausted(std::move(message));
  if (st == CUBLAS_STATUS_INVALID_VALUE || st == CUBLAS_STATUS_NOT_SUPPORTED)
    return invalid_argument(std::move(message));
  if (st == CUBLAS_STATUS_NOT_INITIALIZED) return unavailable(std::move(message));
  return internal_error(std::move(message));
}

}  // namespace

struct Blas::State {
  cublasHandle_t handle = nullptr;
  DeviceBuffer workspace;
  ~State() {
    if (handle != nullptr) cublasDestroy(handle);
  }
};

Blas::Blas(std::unique_ptr<State> state) : state_(std::move(state)) {}
Blas::Blas(Blas&&) noexcept = default;
Blas& Blas::operator=(Blas&&) noexcept = default;
Blas::~Blas() = default;

StatusOr<Blas> Blas::create() {
  auto state = std::make_unique<State>();
  PD_RETURN_IF_ERROR(from_cublas(cublasCreate(&state->handle), "cublasCreate"));
  auto workspace = DeviceBuffer::allocate(kWorkspaceBytes);
  if (!workspace.ok()) return workspace.status();
  state->workspace = std::move(*workspace);
  PD_RETURN_IF_ERROR(from_cublas(cublasSetWorkspace(state->handle, state->workspace.data(), kWorkspaceBytes),
                                 "cublasSetWorkspace"));
  return Blas(std::move(state));
}

Status Blas::matmul(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, uint16_t* y,
                    StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype) {
  return run(x, w, m, n, k, y, false, false, stream, ldx, ldy, dtype);
}

Status Blas::matmul_f32(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y,
                        StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype) {
  return run(x, w, m, n, k, y, true, false, stream, ldx, ldy, dtype);
}

Status Blas::matmul_f32_add(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, float* y,
                            StreamHandle stream, Dtype dtype) {
  return run(x, w, m, n, k, y, true, true, stream, 0, 0, dtype);
}

Status Blas::run(const uint16_t* x, const uint16_t* w, int64_t m, int64_t n, int64_t k, void* y, bool f32_out,
                 bool accumulate, StreamHandle stream, int64_t ldx, int64_t ldy, Dtype dtype) {
  if (m == 0 || n == 0) return ok_status();
  if (ldx == 0) ldx = k;
  if (ldy == 0) ldy = n;
  if (m < 0 || n < 0 || k <= 0 || ldx < k || ldy < n || m > INT_MAX || n > INT_MAX || k > INT_MAX ||
      ldx > INT_MAX || ldy > INT_MAX)
    return invalid_argument(fmt::format("matmul: bad shape m={} n={} k={} ldx={} ldy={}", m, n, k, ldx, ldy));
  PD_RETURN_IF_ERROR(from_cublas(cublasSetStream(state_->handle, stream), "cublasSetStream"));
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  // cuBLAS is column-major: a row-major y[m][n] is yᵀ[n][m] column-major, and
  // yᵀ = w · xᵀ, with w (k×n column-major = w[n][k] row-major) transposed.
  const cudaDataType_t in = dtype == Dtype::kF16 ? CUDA_R_16F : CUDA_R_16BF;
  return from_cublas(
      cublasGemmEx(state_->handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                   static_cast<int>(k), &alpha, w, in, static_cast<int>(k), x, in, static_cast<int>(ldx),
                   &beta, y, f32_out ? CUDA_R_32F : in, static_cast<int>(ldy), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

}  // namespace pdserve::cuda

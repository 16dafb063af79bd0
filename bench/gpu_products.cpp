// pdserve_gpu_bench --products-only: the model's matrix products as cuBLAS runs them
// (cublasGemmEx with its default algorithm, what cuda::Blas calls) against the fastest of the
// candidates cuBLASLt's heuristic offers for the same product, at decode and prefill row counts.
// Each product reads weights from a set of copies larger than L2, one after another, as a forward
// pass does (a weight is never in L2 when its product starts).
#include "gpu_products.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cuda/ops.h"

namespace pdserve::bench {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "pdserve_gpu_bench: %s: %s\n", what, cudaGetErrorString(e));
  std::exit(1);
}

void check_ok(const Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "pdserve_gpu_bench: %s: %s\n", what, s.message().c_str());
  std::exit(1);
}

void check_cublas(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  std::fprintf(stderr, "pdserve_gpu_bench: %s: %s\n", what, cublasGetStatusString(s));
  std::exit(1);
}

struct Product {
  const char* name;
  int64_t n, k;
  bool accumulate;  // an output projection: y += the product (beta 1)
};

// Median of `reps` timings of `work` (each one call), after `warmup` calls.
template <typename F>
double median_us(cudaStream_t stream, int warmup, int reps, F&& work) {
  for (int i = 0; i < warmup; ++i) work(i);
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
    work(warmup + i);
    check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    us.push_back(ms * 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace

std::string products_section(bool f16, bool quick, double copy_gbps, double gemm_tflops) {
  const Product products[] = {
      {"qkv", 6144, 4096, false},
      {"o", 4096, 4096, true},
      {"gate_up", 28672, 4096, false},
      {"down", 4096, 14336, true},
  };
  const std::vector<int64_t> rows_list =
      quick ? std::vector<int64_t>{16, 256} : std::vector<int64_t>{16, 64, 128, 256, 384, 512, 1024, 4096};
  const int64_t max_rows = rows_list.back();
  const cudaDataType_t in = f16 ? CUDA_R_16F : CUDA_R_16BF;
  constexpr size_t kWorkspace = size_t{32} << 20;
  constexpr int kCandidates = 16;
  const int reps = quick ? 5 : 30;

  cudaStream_t stream;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  const cuda::Dtype dtype = f16 ? cuda::Dtype::kF16 : cuda::Dtype::kBf16;
  // Random values: a product's speed depends on its data (the power it draws).
  uint64_t seed = 1;
  auto fill = [&](void* p, int64_t values) {
    check_ok(cuda::fill_uniform(static_cast<uint16_t*>(p), values, 0.0f, 1.0f, seed++, dtype, stream),
             "fill_uniform");
  };
  cublasHandle_t blas;
  check_cublas(cublasCreate(&blas), "cublasCreate");
  cublasLtHandle_t lt;
  check_cublas(cublasLtCreate(&lt), "cublasLtCreate");
  void* workspace = nullptr;
  check_cuda(cudaMalloc(&workspace, kWorkspace), "cudaMalloc");
  check_cublas(cublasSetWorkspace(blas, workspace, kWorkspace), "cublasSetWorkspace");
  check_cublas(cublasSetStream(blas, stream), "cublasSetStream");

  std::string rows_json = "[";
  std::printf(
      "products: cublasGemmEx (default algorithm) against the fastest of cuBLASLt's first %d candidates\n",
      kCandidates);
  for (const Product& p : products) {
    // Enough weight copies to exceed L2 twice over (50 MiB on an H100/H200), read in turn.
    const size_t weight_bytes = static_cast<size_t>(p.n * p.k * 2);
    const int copies = static_cast<int>(std::max<size_t>(1, (size_t{256} << 20) / weight_bytes + 1));
    std::vector<void*> weights(static_cast<size_t>(copies));
    for (void*& w : weights) {
      check_cuda(cudaMalloc(&w, weight_bytes), "cudaMalloc");
      fill(w, p.n * p.k);
    }
    void* x = nullptr;
    void* y = nullptr;
    check_cuda(cudaMalloc(&x, static_cast<size_t>(max_rows * p.k * 2)), "cudaMalloc");
    fill(x, max_rows * p.k);
    check_cuda(cudaMalloc(&y, static_cast<size_t>(max_rows * p.n * 4)), "cudaMalloc");
    check_cuda(cudaMemset(y, 0, static_cast<size_t>(max_rows * p.n * 4)), "cudaMemset");
    const float alpha = 1.0f, beta = p.accumulate ? 1.0f : 0.0f;
    for (const int64_t m : rows_list) {
      // As cuda::Blas: column-major yᵀ[n][m] = wᵀ · xᵀ, w stored k × n column-major (transposed).
      const double default_us = median_us(stream, 3, reps, [&](int i) {
        check_cublas(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(p.n), static_cast<int>(m),
                                  static_cast<int>(p.k), &alpha, weights[static_cast<size_t>(i % copies)], in,
                                  static_cast<int>(p.k), x, in, static_cast<int>(p.k), &beta, y, CUDA_R_32F,
                                  static_cast<int>(p.n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx");
      });
      cublasLtMatmulDesc_t desc;
      check_cublas(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                   "cublasLtMatmulDescCreate");
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)),
                   "transa");
      check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)),
                   "transb");
      cublasLtMatrixLayout_t a_layout, b_layout, c_layout;
      check_cublas(cublasLtMatrixLayoutCreate(&a_layout, in, static_cast<uint64_t>(p.k),
                                              static_cast<uint64_t>(p.n), p.k),
                   "layout");
      check_cublas(cublasLtMatrixLayoutCreate(&b_layout, in, static_cast<uint64_t>(p.k),
                                              static_cast<uint64_t>(m), p.k),
                   "layout");
      check_cublas(cublasLtMatrixLayoutCreate(&c_layout, CUDA_R_32F, static_cast<uint64_t>(p.n),
                                              static_cast<uint64_t>(m), p.n),
                   "layout");
      cublasLtMatmulPreference_t pref;
      check_cublas(cublasLtMatmulPreferenceCreate(&pref), "preference");
      check_cublas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                        &kWorkspace, sizeof(kWorkspace)),
                   "preference workspace");
      cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
      int found = 0;
      check_cublas(cublasLtMatmulAlgoGetHeuristic(lt, desc, a_layout, b_layout, c_layout, c_layout, pref,
                                                  kCandidates, results, &found),
                   "cublasLtMatmulAlgoGetHeuristic");
      double first_us = 0, best_us = 0;
      int best = -1;
      for (int c = 0; c < found; ++c) {
        if (results[c].state != CUBLAS_STATUS_SUCCESS) continue;
        const double us = median_us(stream, 2, reps, [&](int i) {
          check_cublas(cublasLtMatmul(lt, desc, &alpha, weights[static_cast<size_t>(i % copies)], a_layout, x,
                                      b_layout, &beta, y, c_layout, y, c_layout, &results[c].algo, workspace,
                                      kWorkspace, stream),
                       "cublasLtMatmul");
        });
        if (c == 0) first_us = us;
        if (best < 0 || us < best_us) {
          best = c;
          best_us = us;
        }
      }
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(a_layout);
      cublasLtMatrixLayoutDestroy(b_layout);
      cublasLtMatrixLayoutDestroy(c_layout);
      cublasLtMatmulDescDestroy(desc);
      // The bound: the weights (and the rows in and out) read once at the copy bandwidth, or the
      // arithmetic at the measured rate, whichever is longer.
      const double bytes =
          static_cast<double>(weight_bytes) + 2.0 * m * p.k + (p.accumulate ? 8.0 : 4.0) * m * p.n;
      const double floor_us =
          std::max(bytes / (copy_gbps * 1e9), 2.0 * m * p.n * p.k / (gemm_tflops * 1e12)) * 1e6;
      std::printf(
          "product %-7s %4ld rows (n %5ld, k %5ld): default %8.1f us (%3.0f%% of bound); cuBLASLt first "
          "%8.1f us, "
          "best %8.1f us (candidate %d of %d, %3.0f%% of bound); bound %.1f us\n",
          p.name, static_cast<long>(m), static_cast<long>(p.n), static_cast<long>(p.k), default_us,
          100.0 * floor_us / default_us, first_us, best_us, best, found, 100.0 * floor_us / best_us,
          floor_us);
      rows_json += fmt::format(
          "{}{{\"product\": \"{}\", \"rows\": {}, \"n\": {}, \"k\": {}, \"default_us\": {:.2f}, "
          "\"lt_first_us\": {:.2f}, \"lt_best_us\": {:.2f}, \"lt_best_index\": {}, \"lt_candidates\": {}, "
          "\"bound_us\": {:.2f}}}",
          rows_json.size() > 1 ? ", " : "", p.name, m, p.n, p.k, default_us, first_us, best_us, best, found,
          floor_us);
    }
    for (void* w : weights) cudaFree(w);
    cudaFree(x);
    cudaFree(y);
  }
  cudaFree(workspace);
  cublasLtDestroy(lt);
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
  return rows_json + "]";
}

}  // namespace pdserve::bench

// Matrix–vector products for a few rows (small decode batches), bandwidth-bound on the weights.
// A warp takes R weight rows at a time and walks K in 16-byte pieces (8 values a lane), D pieces
// of every row loaded before any is used so that enough bytes are in flight to cover the memory
// latency; each lane holds the matching activations of each of the M rows, and the partial sums
// are folded across the warp at the end. The grid is persistent (a few CTAs per SM, each warp
// taking row groups in turn), so the per-CTA prologue is paid once per CTA: with norm weights the
// activations are the float residual rows normalised on the fly, and each CTA first computes the
// M inverse norms — no separate norm kernel runs. For the MLP's gate|up product a warp takes a
// gate row and its up row and writes silu(gate) · up, so no SwiGLU kernel runs either. Launched
// programmatically (device_util.cuh), so that a kernel starts while the one ahead of it finishes.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/gemv_tuning.h"
#include "kernels/cuda/ops.h"

namespace pdserve::cuda {
namespace {

constexpr int kWarps = 4;

// Activation row m's 8 values at k as the product sees them: the row xb, or (kNorm) the float row x
// times its inverse norm (*inv) and the norm weights, rounded to T as rms_norm rounds.
template <typename T, bool kNorm>
__device__ __forceinline__ void activations(const GemvArgs& a, int m, int64_t k, const float* inv_of_row,
                                            float* xv) {
  if constexpr (kNorm) {
    const float4 x0 = *reinterpret_cast<const float4*>(a.x + m * a.k + k);
    const float4 x1 = *reinterpret_cast<const float4*>(a.x + m * a.k + k + 4);
    const float4 w0 = __ldg(reinterpret_cast<const float4*>(a.norm_w + k));
    const float4 w1 = __ldg(reinterpret_cast<const float4*>(a.norm_w + k + 4));
    const float inv = *inv_of_row;
    xv[0] = T::round(x0.x * inv * w0.x);
    xv[1] = T::round(x0.y * inv * w0.y);
    xv[2] = T::round(x0.z * inv * w0.z);
    xv[3] = T::round(x0.w * inv * w0.w);
    xv[4] = T::round(x1.x * inv * w1.x);
    xv[5] = T::round(x1.y * inv * w1.y);
    xv[6] = T::round(x1.z * inv * w1.z);
    xv[7] = T::round(x1.w * inv * w1.w);
  } else {
    T::x8_to_float(*reinterpret_cast<const uint4*>(a.xb + m * a.k + k), xv);
  }
}

// Row group g's weight rows: R consecutive rows, or with kSwiGlu the R/2 gate rows g·R/2 ... and
// their up rows (n further on).
template <int R, bool kSwiGlu>
__device__ __forceinline__ int64_t weight_row(const GemvArgs& a, int64_t g, int r) {
  if constexpr (kSwiGlu) return g * (R / 2) + r % (R / 2) + (r < R / 2 ? 0 : a.n);
  return g * R + r;
}
template <int R, bool kSwiGlu>
__device__ __forceinline__ bool has_row(const GemvArgs& a, int64_t g, int r) {
  if constexpr (kSwiGlu) return g * (R / 2) + r % (R / 2) < a.n;
  return g * R + r < a.n;
}

template <typename T, int M, bool kNorm, int R, int D, bool kSwiGlu>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(GemvArgs a) {
  static_assert(!kSwiGlu || R % 2 == 0, "a SwiGLU row group is gate rows and their up rows");
  constexpr int kPairs = R / 2 > 0 ? R / 2 : 1;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t K = a.k;
  const int64_t groups = kSwiGlu ? (a.n + kPairs - 1) / kPairs : (a.n + R - 1) / R;
  grid_dependency_wait();
  allow_dependents();
  __shared__ float s_inv[M];
  if constexpr (kNorm) {
    // Warp w computes the inverse norm of rows w, w + kWarps, ...
    for (int m = warp; m < M; m += kWarps) {
      const float4* row = reinterpret_cast<const float4*>(a.x + m * K);
      float sum = 0;
      for (int64_t i = lane; i < K / 4; i += 32) {
        const float4 v = row[i];
        sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) s_inv[m] = rsqrtf(sum / static_cast<float>(K) + a.eps);
    }
    __syncthreads();
  }
  for (int64_t g = int64_t{blockIdx.x} * kWarps + warp; g < groups; g += int64_t{gridDim.x} * kWarps) {
    float acc[M][R] = {};
#pragma unroll 2
    for (int64_t k0 = int64_t{lane} * 8; k0 < K; k0 += 256 * D) {
      uint4 wraw[D][R];
#pragma unroll
      for (int h = 0; h < D; ++h) {
        const int64_t k = k0 + h * 256;
#pragma unroll
        for (int r = 0; r < R; ++r)
          wraw[h][r] =
              k < K && has_row<R, kSwiGlu>(a, g, r)
                  ? __ldg(reinterpret_cast<const uint4*>(a.w + weight_row<R, kSwiGlu>(a, g, r) * K + k))
                  : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int h = 0; h < D; ++h) {
        const int64_t k = k0 + h * 256;
        if (k >= K) break;
        float xv[M][8];
#pragma unroll
        for (int m = 0; m < M; ++m) activations<T, kNorm>(a, m, k, s_inv + m, xv[m]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wv[8];
          T::x8_to_float(wraw[h][r], wv);
#pragma unroll
          for (int m = 0; m < M; ++m) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][r] += xv[m][j] * wv[j];
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[m][r];
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        acc[m][r] = v;
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if constexpr (kSwiGlu) {
#pragma unroll
          for (int r = 0; r < R / 2; ++r) {
            if (!has_row<R, kSwiGlu>(a, g, r)) continue;
            const float gate = acc[m][r];
            a.swiglu_out[m * a.n + g * (R / 2) + r] =
                T::from_float(gate / (1.0f + expf(-gate)) * acc[m][r + R / 2]);
          }
        } else {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (!has_row<R, kSwiGlu>(a, g, r)) continue;
            float* y = a.y + m * a.ldy + g * R + r;
            *y = a.accumulate ? *y + acc[m][r] : acc[m][r];
          }
        }
      }
    }
  }
}

// Split-K form for one activation row, for rows of K = 2048·P (P ≤ 8): a CTA of kSplitWarps warps
// takes R rows, warp w the K range [w·256·P, (w+1)·256·P) of each, every lane P 16-byte pieces of
// each row — all R·P loads issued before anything is used, and before waiting for the kernel
// ahead (weights are not written by any kernel of the step), so one memory latency covers a
// CTA's whole share. The warps' partial sums meet in shared memory. Where a warp walking whole
// rows has too long a chain of dependent rounds (the short rows of the attention projections).
constexpr int kSplitWarps = 8;

template <typename T, bool kNorm, int R, int P>
__global__ void __launch_bounds__(kSplitWarps * 32) gemv_split_k_kernel(GemvArgs a) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t K = a.k;
  const int64_t n0 = int64_t{blockIdx.x} * R;
  const int64_t k_first = int64_t{warp} * P * 256 + lane * 8;  // piece p: k_first + 256·p
  uint4 wraw[R][P];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int p = 0; p < P; ++p)
      wraw[r][p] = n0 + r < a.n
                       ? __ldg(reinterpret_cast<const uint4*>(a.w + (n0 + r) * K + k_first + 256 * p))
                       : make_uint4(0, 0, 0, 0);
  }
  grid_dependency_wait();
  allow_dependents();
  __shared__ float s_part[kSplitWarps][R > kSplitWarps ? R : kSplitWarps];
  float inv = 1.0f;
  if constexpr (kNorm) {
    float sum = 0;
    const float4* row = reinterpret_cast<const float4*>(a.x);
    for (int64_t i = threadIdx.x; i < K / 4; i += kSplitWarps * 32) {
      const float4 v = row[i];
      sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) s_part[warp][0] = sum;
    __syncthreads();
    float total = 0;
#pragma unroll
    for (int w = 0; w < kSplitWarps; ++w) total += s_part[w][0];
    inv = rsqrtf(total / static_cast<float>(K) + a.eps);
    __syncthreads();  // s_part is reused below
  }
  float acc[R] = {};
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t k = k_first + 256 * p;
    float xv[8];
    activations<T, kNorm>(a, 0, k, &inv, xv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float wv[8];
      T::x8_to_float(wraw[r][p], wv);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r] += xv[j] * wv[j];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) s_part[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < R && n0 + threadIdx.x < a.n) {
    float total = 0;
#pragma unroll
    for (int w = 0; w < kSplitWarps; ++w) total += s_part[w][threadIdx.x];
    float* y = a.y + n0 + threadIdx.x;
    *y = a.accumulate ? *y + total : total;
  }
}

template <typename T, int R, int P>
Status launch_split_k_rows(const GemvArgs& a, StreamHandle stream) {
  const dim3 grid(static_cast<unsigned>((a.n + R - 1) / R)), block(kSplitWarps * 32);
  if (a.norm_w != nullptr) {
    prefer_l1_cache<gemv_split_k_kernel<T, true, R, P>>();
    return launch_programmatic("gemv", gemv_split_k_kernel<T, true, R, P>, grid, block, 0, stream, a);
  }
  prefer_l1_cache<gemv_split_k_kernel<T, false, R, P>>();
  return launch_programmatic("gemv", gemv_split_k_kernel<T, false, R, P>, grid, block, 0, stream, a);
}

// rows: rows per CTA (1, 2, 4, 8 or 16, at most 32 pieces in flight a lane), or 0 for the default
// (16 pieces a lane).
template <typename T, int P>
Status launch_split_k(const GemvArgs& a, int rows, StreamHandle stream) {
  constexpr int kDefault = P <= 1 ? 16 : (P <= 2 ? 8 : (P <= 4 ? 4 : 2));
  switch (rows == 0 ? kDefault : rows) {
    case 1: return launch_split_k_rows<T, 1, P>(a, stream);
    case 2: return launch_split_k_rows<T, 2, P>(a, stream);
    case 4: return launch_split_k_rows<T, (P <= 8 ? 4 : 2), P>(a, stream);
    case 8:
      if constexpr (8 * P <= 32) return launch_split_k_rows<T, 8, P>(a, stream);
      break;
    case 16:
      if constexpr (16 * P <= 32) return launch_split_k_rows<T, 16, P>(a, stream);
      break;
    default: break;
  }
  return invalid_argument("gemv: no split-K form with that many rows a CTA");
}

// The split-K form where K allows it (a multiple of 2048, at most 16384); else false.
bool split_k_fits(const GemvArgs& a) {
  return a.m == 1 && a.k % 2048 == 0 && a.k <= 16384 && a.swiglu_out == nullptr;
}

template <typename T>
Status dispatch_split_k(const GemvArgs& a, int rows, StreamHandle stream) {
  switch (a.k / 2048) {
    case 1: return launch_split_k<T, 1>(a, rows, stream);
    case 2: return launch_split_k<T, 2>(a, rows, stream);
    case 3: return launch_split_k<T, 3>(a, rows, stream);
    case 4: return launch_split_k<T, 4>(a, rows, stream);
    case 5: return launch_split_k<T, 5>(a, rows, stream);
    case 6: return launch_split_k<T, 6>(a, rows, stream);
    case 7: return launch_split_k<T, 7>(a, rows, stream);
    default: return launch_split_k<T, 8>(a, rows, stream);
  }
}

template <typename T, int M, int R, int D>
Status launch(const GemvArgs& a, int ctas_per_sm, StreamHandle stream) {
  constexpr int kPairs = R / 2 > 0 ? R / 2 : 1;
  const int64_t groups = a.swiglu_out != nullptr ? (a.n + kPairs - 1) / kPairs : (a.n + R - 1) / R;
  const int64_t needed = (groups + kWarps - 1) / kWarps;
  // ctas_per_sm 0: one CTA for every kWarps row groups (no warp takes a second group).
  const unsigned grid = static_cast<unsigned>(
      ctas_per_sm == 0 ? needed
                       : std::min<int64_t>(needed, int64_t{current_multiprocessors()} * ctas_per_sm));
  const dim3 block(kWarps * 32);
  if (a.swiglu_out != nullptr) {
    if constexpr (R % 2 == 0) {
      if constexpr (M == 1)
        prefer_l1_cache<gemv_kernel<T, M, true, R, D, true>>();  // measured at one row only
      return launch_programmatic("gemv", gemv_kernel<T, M, true, R, D, true>, grid, block, 0, stream, a);
    }
    return invalid_argument("gemv: SwiGLU takes an even number of rows a warp");
  }
  if (a.norm_w != nullptr) {
    if constexpr (M == 1)
      prefer_l1_cache<gemv_kernel<T, M, true, R, D, false>>();  // measured at one row only
    return launch_programmatic("gemv", gemv_kernel<T, M, true, R, D, false>, grid, block, 0, stream, a);
  }
  if constexpr (M == 1) prefer_l1_cache<gemv_kernel<T, M, false, R, D, false>>();  // measured at one row only
  return launch_programmatic("gemv", gemv_kernel<T, M, false, R, D, false>, grid, block, 0, stream, a);
}

// One activation row with another shape of work per warp (rows × pieces in flight).
template <typename T>
Status launch_one_row(const GemvArgs& a, int rows_per_warp, int depth, int ctas_per_sm, StreamHandle stream) {
  if (rows_per_warp == 1 && depth == 2) return launch<T, 1, 1, 2>(a, ctas_per_sm, stream);
  if (rows_per_warp == 1 && depth == 4) return launch<T, 1, 1, 4>(a, ctas_per_sm, stream);
  if (rows_per_warp == 2 && depth == 1) return launch<T, 1, 2, 1>(a, ctas_per_sm, stream);
  if (rows_per_warp == 2 && depth == 2) return launch<T, 1, 2, 2>(a, ctas_per_sm, stream);
  if (rows_per_warp == 4 && depth == 1) return launch<T, 1, 4, 1>(a, ctas_per_sm, stream);
  if (rows_per_warp == 4 && depth == 2) return launch<T, 1, 4, 2>(a, ctas_per_sm, stream);
  return invalid_argument("gemv: no such shape of work per warp");
}

// The configuration every M uses unless GemvArgs asks for another (pdserve_gpu_bench's gemv tuning,
// docs/perf/gpu-kernel-notes.md).
constexpr int kRows = 2;
constexpr int kDepth = 1;
constexpr int kCtasPerSm = 0;

Status check(const GemvArgs& a) {
  if (a.m < 0 || a.m > kGemvMaxRows) return invalid_argument("gemv: 1 to 8 rows");
  if (a.k <= 0 || a.k % 8 != 0) return invalid_argument("gemv: K must be a positive multiple of 8");
  if ((a.norm_w != nullptr) != (a.x != nullptr) || (a.x == nullptr) == (a.xb == nullptr))
    return invalid_argument("gemv: give float rows with norm weights, or 16-bit rows");
  if (a.swiglu_out != nullptr && (a.norm_w == nullptr || a.y != nullptr || a.accumulate))
    return invalid_argument("gemv: SwiGLU output takes normalised rows and no float output");
  if (a.swiglu_out == nullptr && a.y == nullptr) return invalid_argument("gemv: no output");
  if (a.swiglu_out != nullptr && (a.split_k || a.rows_per_warp % 2 != 0))
    return invalid_argument("gemv: SwiGLU output takes an even number of rows a warp, no split-K");
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(a.x) || !aligned(a.xb) || !aligned(a.norm_w) || !aligned(a.w))
    return invalid_argument("gemv: x, w and the norm weights must be 16-byte aligned");
  return ok_status();
}

std::atomic<int64_t> g_gemv_max_rows{kDefaultGemvMaxRows};

}  // namespace

void set_gemv_max_rows(int64_t rows) {
  g_gemv_max_rows.store(std::clamp<int64_t>(rows, 0, kGemvMaxRows), std::memory_order_relaxed);
}

int64_t gemv_max_rows() { return g_gemv_max_rows.load(std::memory_order_relaxed); }

Status gemv(const GemvArgs& args, StreamHandle stream) {
  if (args.m == 0 || args.n == 0) return ok_status();
  PD_RETURN_IF_ERROR(check(args));
  GemvArgs a = args;
  if (a.ldy == 0) a.ldy = a.n;
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.split_k && split_k_fits(a)) return dispatch_split_k<T>(a, a.split_k_rows, stream);
    if (a.m == 1 && (a.rows_per_warp != 0 || a.depth != 0))
      return launch_one_row<T>(a, a.rows_per_warp != 0 ? a.rows_per_warp : kRows,
                               a.depth != 0 ? a.depth : kDepth, kCtasPerSm, stream);
    switch (a.m) {
      case 1: return launch<T, 1, kRows, kDepth>(a, kCtasPerSm, stream);
      case 2: return launch<T, 2, kRows, kDepth>(a, kCtasPerSm, stream);
      case 3: return launch<T, 3, kRows, kDepth>(a, kCtasPerSm, stream);
      case 4: return launch<T, 4, kRows, kDepth>(a, kCtasPerSm, stream);
      case 5: return launch<T, 5, kRows, kDepth>(a, kCtasPerSm, stream);
      case 6: return launch<T, 6, kRows, kDepth>(a, kCtasPerSm, stream);
      case 7: return launch<T, 7, kRows, kDepth>(a, kCtasPerSm, stream);
      default: return launch<T, 8, kRows, kDepth>(a, kCtasPerSm, stream);
    }
  });
}

Status gemv_variant(const GemvArgs& args, int rows_per_warp, int depth, int ctas_per_sm,
                    StreamHandle stream) {
  if (args.m != 1) return unimplemented("gemv_variant: one row only");
  PD_RETURN_IF_ERROR(check(args));
  GemvArgs a = args;
  if (a.ldy == 0) a.ldy = a.n;
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (rows_per_warp == 0) {
      if (!split_k_fits(a))
        return unimplemented("gemv_variant: split-K wants K a multiple of 2048, at most 16384");
      return dispatch_split_k<T>(a, depth, stream);
    }
    return launch_one_row<T>(a, rows_per_warp, depth, ctas_per_sm, stream);
  });
}

}  // namespace pdserve::cuda

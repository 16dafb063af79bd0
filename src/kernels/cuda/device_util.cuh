// Helpers the CUDA kernels share: 16-bit floats (bf16, fp16) to and from float, and programmatic
// dependent launch. Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "kernels/cuda/runtime.h"

namespace pdserve::cuda {

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }

__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Eight bf16 values (16 bytes) to floats.
__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float* out) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = __uint_as_float(w[j] << 16);
    out[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
  }
}

// The 16-bit formats as kernels' template arguments (Dtype): conversions of raw bits.
struct Bf16 {
  static constexpr bool kF16 = false;
  __device__ static __forceinline__ float to_float(uint16_t b) { return bf16_bits_to_float(b); }
  __device__ static __forceinline__ uint16_t from_float(float f) { return float_to_bf16_bits(f); }
  // Eight values (16 bytes) to floats.
  __device__ static __forceinline__ void x8_to_float(const uint4& raw, float* out) {
    bf16x8_to_float(raw, out);
  }
  // f rounded to this format, as float.
  __device__ static __forceinline__ float round(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }
};

struct F16 {
  static constexpr bool kF16 = true;
  __device__ static __forceinline__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
  __device__ static __forceinline__ void x8_to_float(const uint4& raw, float* out) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      __half2 h;
      memcpy(&h, &w[j], 4);
      const float2 f = __half22float2(h);
      out[2 * j] = f.x;
      out[2 * j + 1] = f.y;
    }
  }
  __device__ static __forceinline__ float round(float f) { return __half2float(__float2half_rn(f)); }
};

// Two values of format T, lo in the low half; four (8 bytes).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return uint32_t{T::from_float(lo)} | (uint32_t{T::from_float(hi)} << 16);
}
template <typename T>
__device__ __forceinline__ uint2 pack4(float a, float b, float c, float d) {
  return make_uint2(pack2<T>(a, b), pack2<T>(c, d));
}

// fn(Bf16{}) or fn(F16{}): a launch written once for both formats.
template <typename Fn>
decltype(auto) with_dtype(Dtype dtype, Fn&& fn) {
  if (dtype == Dtype::kF16) return fn(F16{});
  return fn(Bf16{});
}

// Whether this CTA is the last of `expected` to arrive at `counter` (every thread of the CTA gets the
// answer; call it from all of them, after the CTA's results are written). The writes of the CTAs
// before are visible to the last one, which leaves the counter zero for the next use. The
// "last CTA merges the splits" pattern of the kernels that split a reduction over CTAs.
__device__ __forceinline__ bool last_cta_to_finish(int32_t* counter, int32_t expected) {
  __shared__ bool s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    s_last = atomicAdd(counter, 1) == expected - 1;
    if (s_last) *counter = 0;
  }
  __syncthreads();
  if (s_last) __threadfence();
  return s_last;
}

// ---- programmatic dependent launch ---------------------------------------------------------------
// A kernel started by launch_programmatic() may begin while the kernel ahead of it in the stream is
// still running. Before grid_dependency_wait() it may only read memory that no kernel of the step
// writes (weights); the wait returns once every earlier kernel has ended and its writes are
// visible. allow_dependents() lets the next programmatic kernel begin; the kernels here call it
// right after their wait, so at most one kernel runs ahead. Both are no-ops in a kernel launched
// the ordinary way.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the kernel ahead of it when
// programmatic_launch() is on. `what` names the operation in an error.
template <typename... Params, typename... Args>
Status launch_programmatic(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                           StreamHandle stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = programmatic_launch() ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return internal_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
  return check_last_error(what);
}

// Asks for kKernel's on-chip memory as L1 cache rather than shared memory (the largest L1 the SM
// offers), once per device; a hint, ignored where the driver cannot follow it. For kernels with next
// to no shared memory whose CTAs all read the same small inputs: the matrix-vector products of
// small decode batches, whose activation rows then stay in L1 (docs/perf/gpu-kernel-notes.md).
template <auto kKernel>
void prefer_l1_cache() {
  static std::array<std::atomic<bool>, 64> done{};
  const int device = current_device();
  if (device < 0 || device >= 64 || done[static_cast<size_t>(device)].load(std::memory_order_acquire)) return;
  if (cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxL1) != cudaSuccess)
    (void)cudaGetLastError();
  done[static_cast<size_t>(device)].store(true, std::memory_order_release);
}

}  // namespace pdserve::cuda

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/gumbel.h"
#include "kernels/truncation.h"

namespace pdserve::cuda {
namespace {

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  float total = 0;
  for (int w = 0; w < warps; ++w) total += partial[w];  // same order in every thread
  __syncthreads();  // partial[] may be reused by the caller's next block_sum
  return total;
}

int norm_threads(int64_t n) { return n >= 1024 ? 512 : (n >= 256 ? 256 : 128); }

// The norms, vectorised: one row per CTA, each thread keeping its (at most kNormVec) float4s of the
// row in registers, so every load is in flight before the reduction waits and the row is read
// once. Rows of n % 4 == 0 values, n <= 4 · kNormVec · 1024; the scalar kernel below does the rest.
constexpr int kNormVec = 8;

template <typename T>
__global__ void norm_vec_kernel(const float* __restrict__ x, const float* __restrict__ w, float eps,
                                int64_t n, uint16_t* __restrict__ y) {
  const int64_t nvec = n / 4;
  // The norm's weights before the kernel ahead has ended: no kernel of a step writes them.
  const float4* wr = reinterpret_cast<const float4*>(w);
  float4 wv[kNormVec];
#pragma unroll
  for (int k = 0; k < kNormVec; ++k) {
    const int64_t i = threadIdx.x + int64_t{k} * blockDim.x;
    if (i < nvec) wv[k] = wr[i];
  }
  grid_dependency_wait();
  allow_dependents();
  const float4* xr = reinterpret_cast<const float4*>(x + blockIdx.x * n);
  float4 v[kNormVec];
#pragma unroll
  for (int k = 0; k < kNormVec; ++k) {  // every load in flight before the first use
    const int64_t i = threadIdx.x + int64_t{k} * blockDim.x;
    if (i < nvec) v[k] = xr[i];
  }
  float sum = 0;
#pragma unroll
  for (int k = 0; k < kNormVec; ++k) {
    const int64_t i = threadIdx.x + int64_t{k} * blockDim.x;
    if (i < nvec) sum += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  }
  const float inv = rsqrtf(block_sum(sum) / static_cast<float>(n) + eps);
  uint2* yr = reinterpret_cast<uint2*>(y + blockIdx.x * n);
#pragma unroll
  for (int k = 0; k < kNormVec; ++k) {
    const int64_t i = threadIdx.x + int64_t{k} * blockDim.x;
    if (i < nvec)
      yr[i] = pack4<T>(v[k].x * inv * wv[k].x, v[k].y * inv * wv[k].y, v[k].z * inv * wv[k].z,
                       v[k].w * inv * wv[k].w);
  }
}

// Threads for norm_vec_kernel over rows of n, or 0 where it cannot take them.
int norm_vec_threads(int64_t n, const void* x, const void* w, const void* y) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (n % 4 != 0 || n / 4 > int64_t{kNormVec} * 1024 || !aligned(x) || !aligned(w) || !aligned(y)) return 0;
  const int64_t per_thread = (n / 4 + kNormVec - 1) / kNormVec;
  return static_cast<int>(std::max<int64_t>(32, (per_thread + 31) / 32 * 32));
}

template <typename T>
__global__ void rms_norm_kernel(const float* x, const float* w, float eps, int64_t n, uint16_t* y) {
  grid_dependency_wait();
  allow_dependents();
  const float* xr = x + blockIdx.x * n;
  uint16_t* yr = y + blockIdx.x * n;
  float sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i] * xr[i];
  const float inv = rsqrtf(block_sum(sum) / static_cast<float>(n) + eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = T::from_float(xr[i] * inv * w[i]);
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Four values a thread, row blockIdx.y: n % 4 == 0, gate_up 16-byte and out 8-byte aligned.
template <typename T>
__global__ void silu_mul_vec_kernel(const float* __restrict__ gate_up, int64_t n,
                                    uint16_t* __restrict__ out) {
  grid_dependency_wait();
  allow_dependents();
  const int64_t i = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) * 4;
  if (i >= n) return;
  const float* row = gate_up + blockIdx.y * 2 * n;
  const float4 g = *reinterpret_cast<const float4*>(row + i);
  const float4 u = *reinterpret_cast<const float4*>(row + n + i);
  *reinterpret_cast<uint2*>(out + blockIdx.y * n + i) =
      pack4<T>(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z), silu_times(g.w, u.w));
}

template <typename T>
__global__ void silu_mul_kernel(const float* gate_up, int64_t rows, int64_t n, uint16_t* out) {
  grid_dependency_wait();
  allow_dependents();
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= rows * n) return;
  const int64_t r = idx / n;
  const int64_t i = idx % n;
  const float g = gate_up[r * 2 * n + i];
  const float u = gate_up[r * 2 * n + n + i];
  out[idx] = T::from_float(silu_times(g, u));
}

// One CTA per row (blockIdx.x) and group of heads of q|k|v (blockIdx.y), a multiple of
// blockDim.x / (head_dim / 2) heads: every thread keeps one pair index j < head_dim/2 over the
// heads it takes in turn, so it computes the rotation's cosine and sine once (every head of a row
// turns by the same angles), and does so before waiting for the kernel ahead (positions and
// inv_freq are no kernel's output). For q and k heads, pair j < rope_dim/2 is a rotation pair; the
// rest copy dims rope_dim + 2(j - rope_dim/2) and the next one. kAdjacent: the two values of every
// pair are next to each other and 8-byte aligned in qkv and bias and 4-byte aligned at their
// destination (not neox), so each pair is one load and one store.
template <typename T, bool kAdjacent>
__global__ void rope_qkv_kernel(RopeQkvArgs a, int32_t heads_per_cta) {
  const int64_t r = blockIdx.x;
  const int32_t hd = a.kv.head_dim;
  const int32_t pairs = hd / 2;
  const int32_t half = a.rope_dim / 2;
  const int32_t j = static_cast<int32_t>(threadIdx.x) % pairs;
  float c = 1.0f, s = 0.0f;
  if (j < half) sincosf(static_cast<float>(a.positions[r]) * a.inv_freq[j], &s, &c);
  grid_dependency_wait();
  allow_dependents();
  const int32_t heads = a.num_heads + 2 * a.kv.num_kv_heads;
  const int32_t h_end = min(heads, static_cast<int32_t>(blockIdx.y + 1) * heads_per_cta);
  const int32_t heads_per_pass = static_cast<int32_t>(blockDim.x) / pairs;
  // The row's K and V: head kvh of slot s at ((s / bs · kv heads + kvh) · bs + s % bs) · head_dim.
  const int64_t slot = a.slots[r];
  const int64_t kv_row =
      slot / a.kv.block_size * a.kv.num_kv_heads * a.kv.block_size + slot % a.kv.block_size;
  const float* row = a.qkv + r * a.ld;
  for (int32_t h =
           static_cast<int32_t>(blockIdx.y) * heads_per_cta + static_cast<int32_t>(threadIdx.x) / pairs;
       h < h_end; h += heads_per_pass) {
    const bool is_v = h >= a.num_heads + a.kv.num_kv_heads;
    const bool rotate = !is_v && j < half;
    int32_t ia, ib;
    if (rotate) {
      ia = a.neox ? j : 2 * j;
      ib = a.neox ? j + half : 2 * j + 1;
    } else {
      ia = (is_v ? 0 : a.rope_dim) + 2 * (is_v ? j : j - half);
      ib = ia + 1;
    }
    const int64_t col = int64_t{h} * hd;
    float x0, x1;
    if constexpr (kAdjacent) {
      const float2 v = *reinterpret_cast<const float2*>(row + col + ia);
      x0 = v.x;
      x1 = v.y;
      if (a.bias != nullptr) {
        const float2 b = *reinterpret_cast<const float2*>(a.bias + col + ia);
        x0 += b.x;
        x1 += b.y;
      }
    } else {
      x0 = row[col + ia];
      x1 = row[col + ib];
      if (a.bias != nullptr) {
        x0 += a.bias[col + ia];
        x1 += a.bias[col + ib];
      }
    }
    if (rotate) {
      // The roundings spelled out (the compiler picks which product an FMA takes in otherwise):
      // those the kernel before this form compiled to (its SASS), so the model's outputs keep their bits.
      const float y0 = __fmaf_rn(x0, c, -__fmul_rn(x1, s));
      const float y1 = __fmaf_rn(x0, s, __fmul_rn(x1, c));
      x0 = y0;
      x1 = y1;
    }
    uint16_t* dst;
    if (h < a.num_heads) {
      dst = a.q_out + r * a.num_heads * hd + col;
    } else {
      const int32_t kvh = is_v ? h - a.num_heads - a.kv.num_kv_heads : h - a.num_heads;
      dst = (is_v ? a.kv.v : a.kv.k) + (kv_row + int64_t{kvh} * a.kv.block_size) * hd;
    }
    if constexpr (kAdjacent) {
      *reinterpret_cast<uint32_t*>(dst + ia) = pack2<T>(x0, x1);
    } else {
      dst[ia] = T::from_float(x0);
      dst[ib] = T::from_float(x1);
    }
  }
}

template <typename T>
__global__ void embedding_kernel(const uint16_t* table, int64_t vocab, const int32_t* tokens, int64_t n,
                                 float* out) {
  const int32_t token = tokens[blockIdx.x];
  float* row = out + blockIdx.x * n;
  const bool valid = token >= 0 && token < vocab;
  const uint16_t* src = table + (valid ? token : 0) * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) row[i] = valid ? T::to_float(src[i]) : nan_value();
}

// argmax in two steps: many CTAs per row fold their slice into one 64-bit key per row with
// atomicMax — kernels/truncation.h's order_key(): the value in order-preserving bits above the
// complement of its index, so the largest value wins and, among equals, the lowest index, whatever
// order the CTAs run in — then the keys become indices. NaN counts as -inf; -0 and +0 are equal
// (as on the host).
constexpr int kArgmaxSlice = 4096;

__global__ void gumbel_kernel(float* logits, int64_t vocab, const SampleDraw* __restrict__ draws) {
  const SampleDraw d = draws[blockIdx.y];
  if (!(d.temperature > 0.0f)) return;
  float* row = logits + static_cast<int64_t>(blockIdx.y) * vocab;
  const float inv_t = 1.0f / d.temperature;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < vocab;
       i += int64_t{gridDim.x} * blockDim.x)
    row[i] = gumbel_key(row[i], inv_t, d.seed, d.counter, static_cast<uint32_t>(i));
}

// A row's 16 bytes of argmax workspace: the best key so far and the slices done.
struct ArgmaxSlot {
  unsigned long long key;
  unsigned int done;
  unsigned int unused;
};
static_assert(sizeof(ArgmaxSlot) == 16);

// One CTA a slice of a row: the largest order_key() of the slice into the row's key (atomicMax);
// the last CTA of the row to finish (counted in `done`) writes the index and leaves the slot zero
// for the next call. One launch, overlapping the kernel ahead until it waits.
__global__ void argmax_kernel(const float* __restrict__ logits, int64_t vocab, ArgmaxSlot* slots,
                              int32_t* out) {
  grid_dependency_wait();
  allow_dependents();
  const float* row = logits + blockIdx.y * vocab;
  const int64_t begin = int64_t{blockIdx.x} * kArgmaxSlice;
  const int64_t end = min(vocab, begin + kArgmaxSlice);
  uint64_t best = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    best = max(best, order_key(row[i], static_cast<uint32_t>(i)));
  for (int off = 16; off > 0; off /= 2)
    best = max(best, static_cast<uint64_t>(__shfl_xor_sync(0xffffffffu, best, off)));
  ArgmaxSlot* slot = slots + blockIdx.y;
  if (threadIdx.x % 32 == 0) {
    atomicMax(&slot->key, static_cast<unsigned long long>(best));
    __threadfence();
  }
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(&slot->done, 1u) == gridDim.x - 1) {
    __threadfence();
    const unsigned long long key = atomicExch(&slot->key, 0ull);
    slot->done = 0;
    out[blockIdx.y] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
  }
}

// Truncated sampling (kernels/truncation.h). A row is shared by a cluster of CTAs (up to 8,
// fewer as the rows grow, so that the batch fills the GPU), each CTA a slice; their partial
// results meet in the shared memory of the cluster's first CTA. The kept candidates are those
// whose order_key() is at least a threshold key, the largest of:
//   - top-k: the k-th largest key, by radix selection over the 64-bit keys (8 passes of 8 bits,
//     a histogram of counts per pass);
//   - top-p: the key where the weight summed from the top first reaches the target, by the same
//     selection over histograms of weights (integers: the sums are exact in any order);
//   - min-p: the keys above the largest one (after the first candidate) that weighs less than
//     min_p_weight(), which is where the host's walk down the order stops.
// Then the largest Gumbel key among the kept, ties to the lower id. Every pass reads the slice
// again (from L2 after the first); the passes are bound by arithmetic, hence the clusters.
constexpr int kSampleThreads = 1024;
constexpr int kSampleMaxCluster = 8;

struct SampleShared {
  unsigned long long mass[256];  // this CTA's histogram of a pass
  unsigned int count[256];
  unsigned long long total_mass[256];  // the cluster's (first CTA only)
  unsigned int total_count[256];
  unsigned long long u64[32];                  // one value per warp (cluster_reduce)
  unsigned long long part[kSampleMaxCluster];  // one value per CTA (first CTA only)
  unsigned long long result;
  unsigned long long chosen;  // the selection's prefix so far
  unsigned long long need;    // the rank or weight still to find below it
  int unique;                 // the chosen bucket holds one element
};

enum class Reduce { kMax, kMin, kSum };

template <typename T>
__device__ __forceinline__ T combine(Reduce op, T a, T b) {
  if constexpr (std::is_same_v<T, float>) return fmaxf(a, b);  // floats: only the maximum (NaN dropped)
  return op == Reduce::kMax ? max(a, b) : op == Reduce::kMin ? min(a, b) : a + b;
}

// Clusters and distributed shared memory exist from compute capability 9.0 on.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// `v` reduced over the whole cluster (T: uint64_t, or float for a maximum); every thread of every
// CTA gets the result. The CTAs' partial results meet in the first CTA's shared memory.
template <typename T>
__device__ T cluster_reduce(Reduce op, T v, SampleShared& sh) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  T* warp_part = reinterpret_cast<T*>(sh.u64);
  T* cta_part = reinterpret_cast<T*>(sh.part);
  for (int off = 16; off > 0; off /= 2)
    v = combine(op, v, static_cast<T>(__shfl_xor_sync(0xffffffffu, v, off)));
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = warp_part[0];
    for (int w = 1; w < kSampleThreads / 32; ++w) r = combine(op, r, warp_part[w]);
    cluster.map_shared_rank(cta_part, 0)[cluster.block_rank()] = r;
  }
  cluster.sync();
  if (threadIdx.x == 0) {
    const T* parts = cluster.map_shared_rank(cta_part, 0);
    T r = parts[0];
    for (unsigned k = 1; k < cluster.num_blocks(); ++k) r = combine(op, r, parts[k]);
    *reinterpret_cast<T*>(&sh.result) = r;
  }
  cluster.sync();  // the parts are read before any CTA writes them again
  return *reinterpret_cast<const T*>(&sh.result);
}

// Calls f(logit, index, valid) for every element of this CTA's slice of a row, each thread the
// same number of times (so warp-wide intrinsics inside f see whole warps): two float4 loads in
// flight per thread where the slice is 16-byte aligned, then the tail one element a thread.
template <typename F>
__device__ __forceinline__ void for_each_logit(const float* __restrict__ row, int64_t begin, int64_t end,
                                               F&& f) {
  int64_t done = begin;
  if (reinterpret_cast<uintptr_t>(row + begin) % 16 == 0) {
    const int64_t n4 = (end - begin) / 4;
    const auto* row4 = reinterpret_cast<const float4*>(row + begin);
    for (int64_t b = 0; b < n4; b += 2 * kSampleThreads) {
      const int64_t i0 = b + threadIdx.x, i1 = i0 + kSampleThreads;
      const float4 a = i0 < n4 ? row4[i0] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float4 c = i1 < n4 ? row4[i1] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const int64_t j0 = begin + 4 * i0, j1 = begin + 4 * i1;
      f(a.x, j0, i0 < n4);
      f(a.y, j0 + 1, i0 < n4);
      f(a.z, j0 + 2, i0 < n4);
      f(a.w, j0 + 3, i0 < n4);
      f(c.x, j1, i1 < n4);
      f(c.y, j1 + 1, i1 < n4);
      f(c.z, j1 + 2, i1 < n4);
      f(c.w, j1 + 3, i1 < n4);
    }
    done = begin + 4 * n4;
  }
  for (int64_t b = done; b < end; b += kSampleThreads) {
    const int64_t i = b + threadIdx.x;
    f(i < end ? row[i] : 0.0f, i, i < end);
  }
}

// Radix selection over the row's keys. By count (weights == false): the key of rank `need`
// (1 = the largest). By weight: the largest key whose prefix of the order, it included, weighs at
// least `need`. `need` must be reachable (at most the row's count or weight). The lanes of a warp
// that fall in one bucket add to it once (warp-aggregated: the first passes put most of the row
// into a few buckets); once the chosen bucket holds one element, one last pass finds its key.
__device__ uint64_t select_key(const float* row, int64_t begin, int64_t end, bool weights, uint64_t need,
                               float top, float inv_t, SampleShared& sh) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const bool first = cluster.block_rank() == 0;
  if (weights && need == 0) {  // nothing weighs (no finite logit): the prefix of one, as on the host
    weights = false;
    need = 1;
  }
  if (threadIdx.x == 0) {
    sh.chosen = 0;
    sh.need = need;
    sh.unique = 0;
  }
  __syncthreads();
  for (int shift = 56; shift >= 0; shift -= 8) {
    const uint64_t prefix = sh.chosen;
    const uint64_t high_mask = shift == 56 ? 0 : ~uint64_t{0} << (shift + 8);
    if (sh.unique) {  // one element left in the bucket: its whole key
      uint64_t key = 0;
      for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
        const uint64_t k = order_key(l, static_cast<uint32_t>(i));
        if (valid && (k & high_mask) == prefix) key = k;
      });
      return cluster_reduce(Reduce::kMax, key, sh);
    }
    for (int d = threadIdx.x; d < 256; d += kSampleThreads) {
      sh.mass[d] = 0;
      sh.count[d] = 0;
    }
    __syncthreads();
    for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
      int digit = -1;
      uint64_t w = 0;
      const uint64_t key = order_key(l, static_cast<uint32_t>(i));
      if (valid && (key & high_mask) == prefix) {
        digit = static_cast<int>((key >> shift) & 255);
        if (weights) w = truncation_weight(l, top, inv_t);
      }
      const unsigned active = __ballot_sync(0xffffffffu, digit >= 0);
      if (digit >= 0) {
        const unsigned peers = __match_any_sync(active, digit);
        const bool leader = static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1;
        if (weights) {  // w ≤ 2^40: 24 low and 17 high bits, each summed in 32 bits over ≤ 32 lanes
          const unsigned lo = __reduce_add_sync(peers, static_cast<unsigned>(w & 0xFFFFFFu));
          const unsigned hi = __reduce_add_sync(peers, static_cast<unsigned>(w >> 24));
          const uint64_t sum = (static_cast<uint64_t>(hi) << 24) + lo;
          if (leader && sum != 0) atomicAdd(&sh.mass[digit], static_cast<unsigned long long>(sum));
        }
        if (leader) atomicAdd(&sh.count[digit], static_cast<unsigned>(__popc(peers)));
      }
    });
    cluster.sync();  // every CTA's histogram is complete
    if (first) {
      for (int d = threadIdx.x; d < 256; d += kSampleThreads) {
        uint64_t m = 0;
        unsigned c = 0;
        for (unsigned k = 0; k < cluster.num_blocks(); ++k) {
          m += cluster.map_shared_rank(sh.mass, k)[d];
          c += cluster.map_shared_rank(sh.count, k)[d];
        }
        sh.total_mass[d] = m;
        sh.total_count[d] = c;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        uint64_t left = sh.need;
        int digit = 0;
        for (int d = 255; d >= 0; --d) {
          const uint64_t here = weights ? sh.total_mass[d] : sh.total_count[d];
          if (here >= left) {
            digit = d;
            break;
          }
          left -= here;
        }
        sh.chosen = prefix | (static_cast<uint64_t>(digit) << shift);
        sh.need = left;
        sh.unique = sh.total_count[digit] == 1;
      }
    }
    cluster.sync();  // the first CTA has chosen; the histograms may be cleared again
    if (!first && threadIdx.x == 0) {
      SampleShared* lead = cluster.map_shared_rank(&sh, 0);
      sh.chosen = lead->chosen;
      sh.unique = lead->unique;
    }
    cluster.sync();  // every CTA has read the choice before the first CTA makes the next
  }
  return sh.chosen;
}

#endif  // clusters

__global__ void __launch_bounds__(kSampleThreads)
    sample_truncated_kernel(const float* __restrict__ logits, int64_t vocab,
                            const SampleDraw* __restrict__ draws, int32_t* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need Hopper; sample_truncated refuses older GPUs before launching
#else
  namespace cg = cooperative_groups;
  __shared__ SampleShared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned cluster_size = cluster.num_blocks();
  const int64_t r = blockIdx.x / cluster_size;
  const SampleDraw d = draws[r];
  const float* row = logits + r * vocab;
  // This CTA's slice, a multiple of 4 elements long (float4 loads stay aligned).
  const int64_t per = ((vocab + cluster_size - 1) / cluster_size + 3) / 4 * 4;
  const int64_t begin = min(vocab, per * cluster.block_rank()), end = min(vocab, begin + per);
  const bool writer = cluster.block_rank() == 0 && threadIdx.x == 0;
  cluster.sync();  // every CTA of the cluster has started before any writes to another's shared memory
  const auto token_of = [](uint64_t key) {
    return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
  };
  if (!(d.temperature > 0.0f)) {  // greedy: the largest key
    uint64_t best = 0;
    for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
      if (valid) best = max(best, order_key(l, static_cast<uint32_t>(i)));
    });
    best = cluster_reduce(Reduce::kMax, best, sh);
    if (writer) out[r] = token_of(best);
    return;
  }
  float top = -INFINITY;  // fmaxf drops NaN
  uint64_t top_key = 0;   // the first candidate, which every limit keeps
  for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
    if (!valid) return;
    top = fmaxf(top, l);
    top_key = max(top_key, order_key(l, static_cast<uint32_t>(i)));
  });
  top = cluster_reduce(Reduce::kMax, top, sh);
  top_key = cluster_reduce(Reduce::kMax, top_key, sh);
  const float inv_t = 1.0f / d.temperature;

  uint64_t threshold = 0;  // keep the keys at or above it
  if (d.top_k > 0 && d.top_k < vocab)
    threshold = select_key(row, begin, end, false, static_cast<uint64_t>(d.top_k), top, inv_t, sh);
  if (d.top_p < 1.0f) {
    uint64_t total = 0;
    for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
      if (valid && order_key(l, static_cast<uint32_t>(i)) >= threshold)
        total += truncation_weight(l, top, inv_t);
    });
    total = cluster_reduce(Reduce::kSum, total, sh);
    threshold =
        max(threshold, select_key(row, begin, end, true, top_p_target(total, d.top_p), top, inv_t, sh));
  }
  if (d.min_p > 0.0f) {
    // The host walks the order from the second candidate and stops at the first that weighs less
    // than `least`: keep the keys above the largest such key (the weight is not strictly monotone
    // in the logit, so "every key whose weight reaches least" would not be the same set).
    const uint64_t least = min_p_weight(d.min_p);
    uint64_t cut = 0;
    for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
      const uint64_t k = order_key(l, static_cast<uint32_t>(i));
      if (valid && k < top_key && truncation_weight(l, top, inv_t) < least) cut = max(cut, k);
    });
    threshold = max(threshold, cluster_reduce(Reduce::kMax, cut, sh) + 1);
  }
  // The draw: the largest (Gumbel key, lower id) among the kept, packed as one 64-bit key.
  uint64_t best = 0;
  for_each_logit(row, begin, end, [&](float l, int64_t i, bool valid) {
    if (!valid || order_key(l, static_cast<uint32_t>(i)) < threshold) return;
    const float g = gumbel_key(l, inv_t, d.seed, d.counter, static_cast<uint32_t>(i));
    best = max(best, order_key(g, static_cast<uint32_t>(i)));
  });
  best = cluster_reduce(Reduce::kMax, best, sh);
  if (writer) out[r] = token_of(best);
#endif
}

__global__ void gather_rows_kernel(const uint16_t* in, int64_t n, const int32_t* index, uint16_t* out) {
  grid_dependency_wait();
  allow_dependents();
  const uint16_t* src = in + int64_t{index[blockIdx.x]} * n;
  uint16_t* dst = out + blockIdx.x * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// A counter-based generator (splitmix64 of seed and index): any element, in any order.
__device__ __forceinline__ float uniform_at(uint64_t seed, int64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(i) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
}

template <typename T>
__global__ void fill_uniform_kernel(uint16_t* x, int64_t n, float mean, float scale, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    x[i] = T::from_float(mean + scale * uniform_at(seed, i));
}

__global__ void fill_uniform_f32_kernel(float* x, int64_t n, float mean, float scale, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    x[i] = mean + scale * uniform_at(seed, i);
}

// One thread per 16-byte piece of the wire: (layer, K|V, token, 8 values of a row).
template <bool kToWire>
__global__ void move_kv_kernel(PagedKvCache c, const int32_t* __restrict__ table, int64_t tokens,
                               uint16_t* __restrict__ wire) {
  const int64_t pieces_per_row = int64_t{c.num_kv_heads} * c.head_dim / 8;
  const int64_t total = 2 * int64_t{c.num_layers} * tokens * pieces_per_row;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t piece = i % pieces_per_row;
    const int64_t t = i / pieces_per_row % tokens;
    const int64_t kv = i / pieces_per_row / tokens % 2;
    const int64_t layer = i / pieces_per_row / tokens / 2;
    const int64_t head = piece * 8 / c.head_dim;
    const int64_t dim = piece * 8 % c.head_dim;
    const int64_t cache_off =
        layer * c.layer_stride + kv * c.v_offset +
        ((int64_t{table[t / c.block_size]} * c.num_kv_heads + head) * c.block_size + t % c.block_size) *
            c.head_dim +
        dim;
    uint4* cache_p = reinterpret_cast<uint4*>(c.base + cache_off);
    uint4* wire_p = reinterpret_cast<uint4*>(wire + i * 8);
    if constexpr (kToWire) {
      *wire_p = *cache_p;
    } else {
      *cache_p = *wire_p;
    }
  }
}

Status check_move_kv(const PagedKvCache& c, const void* wire) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (c.head_dim <= 0 || c.head_dim % 8 != 0 || c.block_size <= 0 || c.num_kv_heads <= 0 || c.num_layers <= 0)
    return invalid_argument("KV move: head_dim must be a positive multiple of 8, the other sizes positive");
  if (!aligned(c.base) || !aligned(wire) || c.layer_stride % 8 != 0 || c.v_offset % 8 != 0)
    return invalid_argument("KV move: the cache and the wire buffer must be 16-byte aligned");
  return ok_status();
}

__global__ void write_kv_kernel(const uint16_t* k_rows, const uint16_t* v_rows, int64_t row_stride,
                                const int32_t* slots, int64_t tokens, PagedKv kv) {
  const int64_t width = int64_t{kv.num_kv_heads} * kv.head_dim;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (idx >= tokens * width) return;
  const int64_t t = idx / width;
  const int64_t i = idx % width;
  const int64_t slot = slots[t];
  const int64_t head = i / kv.head_dim;
  const int64_t dst =
      ((slot / kv.block_size * kv.num_kv_heads + head) * kv.block_size + slot % kv.block_size) * kv.head_dim +
      i % kv.head_dim;
  kv.k[dst] = k_rows[t * row_stride + i];
  kv.v[dst] = v_rows[t * row_stride + i];
}

// ---- decode attention ---------------------------------------------------------------------------
// Grid (kv head, sequence, split). A CTA takes the G query heads of one kv head over one split of
// `partition` keys. Each key row is read by HEAD_DIM/8 lanes (16 bytes each, a "lane group"), and
// each lane group walks its own keys (group, group + kGroups, ...) with an online softmax: K and V
// rows of kUnroll keys are loaded together, so every load of a round is in flight at once, and
// the group keeps a running max, sum and weighted V sum per head. The groups' states are then
// merged through shared memory in a fixed order. With several splits, each CTA leaves its state in
// the workspace and the last CTA of a (sequence, kv head) to finish — counted in split_counters —
// merges them (max, sum and weighted outputs) and resets the counter. The partition shrinks (512
// down to 64 keys) until the grid fills the GPU twice over, so a single long sequence still spreads
// over every SM.
constexpr int kAttnThreads = 128;
constexpr int kUnroll = 4;
constexpr int kMaxPartition = 512;
constexpr int kMinPartition = 64;
// Grids of at most this many CTAs per SM take the single-pass kernel (its loads all in flight: it
// wins where latency rules), larger ones the two-pass kernel below (fewer registers, more CTAs an
// SM: it wins where throughput rules); docs/perf/gpu-kernel-notes.md.
constexpr int kSinglePassMaxWaves = 4;

template <int HEAD_DIM, int GMAX>
constexpr size_t decode_attention_smem_bytes() {
  return sizeof(float) * (kAttnThreads / (HEAD_DIM / 8)) * GMAX * (HEAD_DIM + 2);
}

template <typename T, int HEAD_DIM, int GMAX>
__global__ void __launch_bounds__(kAttnThreads)
    decode_attention_single_pass_kernel(DecodeAttentionArgs a, int32_t partition, int32_t num_splits,
                                        float* ws_acc, float* ws_ml) {
  constexpr int kLanes = HEAD_DIM / 8;  // threads per key row
  constexpr int kGroups = kAttnThreads / kLanes;
  extern __shared__ float smem[];
  float* g_acc = smem;                             // [kGroups][GMAX][HEAD_DIM]
  float* g_ml = smem + kGroups * GMAX * HEAD_DIM;  // [kGroups][GMAX][2]: max, sum
  grid_dependency_wait();
  allow_dependents();

  const int kv_head = blockIdx.x;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int num_kv_heads = a.kv.num_kv_heads;
  const int G = a.num_heads / num_kv_heads;
  const int seq_len = a.seq_lens[seq];
  const int start = split * partition;
  const int n = max(0, min(start + partition, seq_len) - start);
  const bool overlong = seq_len > a.max_seq_len;  // max_seq_len was not an upper bound
  // Splits this sequence fills; with none (no keys at all) split 0 writes the zero output itself.
  const int used = min(num_splits, (seq_len + partition - 1) / partition);
  const bool direct = num_splits == 1 || used == 0;
  if (n == 0 && !(direct && split == 0)) return;  // past the end of a shorter sequence
  // An overlong sequence (NaN out) reads no keys: its table row need not cover them.
  const int keys = overlong ? 0 : n;
  const int64_t q_stride = a.q_stride != 0 ? a.q_stride : int64_t{a.num_heads} * HEAD_DIM;
  const int lane_in_row = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const int bs = a.kv.block_size;
  const int32_t* table = a.block_tables + int64_t{seq} * a.max_blocks_per_seq;
  // Row r of block b for this kv head: ((b·num_kv_heads + kv_head)·bs + r)·HEAD_DIM.
  const int64_t block_stride = int64_t{num_kv_heads} * bs * HEAD_DIM;
  const int64_t head_offset = int64_t{kv_head} * bs * HEAD_DIM + lane_in_row * 8;

  // This thread's 8 values of each query head, pre-scaled.
  float q[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
      const uint16_t* qh = a.q + seq * q_stride + int64_t{kv_head * G + g} * HEAD_DIM + lane_in_row * 8;
      T::x8_to_float(*reinterpret_cast<const uint4*>(qh), q[g]);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[g][j] *= a.scale;
    }
  }

  float run_max[GMAX], run_sum[GMAX], acc[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    run_max[g] = -INFINITY;
    run_sum[g] = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0;
  }
  // Every lane runs the same trip count (the shuffles need it).
  for (int base = 0; base < keys; base += kGroups * kUnroll) {
    uint4 kraw[kUnroll], vraw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kGroups + group;
      kraw[u] = vraw[u] = make_uint4(0, 0, 0, 0);
      if (t < keys) {
        const int pos = start + t;
        const int64_t off = table[pos / bs] * block_stride + head_offset + (pos % bs) * HEAD_DIM;
        kraw[u] = *reinterpret_cast<const uint4*>(a.kv.k + off);
        vraw[u] = *reinterpret_cast<const uint4*>(a.kv.v + off);
      }
    }
    float score[kUnroll][GMAX];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      T::x8_to_float(kraw[u], kf);
      const bool valid = base + u * kGroups + group < keys;
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float dot = 0;
        if (g < G) {
#pragma unroll
          for (int j = 0; j < 8; ++j) dot += q[g][j] * kf[j];
#pragma unroll
          for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        }
        score[u][g] = valid ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < G) {
        float m = run_max[g];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) m = fmaxf(m, score[u][g]);
        // Nothing valid yet in this group (m still -inf): nothing to rescale.
        const float correction = m == run_max[g] ? 1.0f : __expf(run_max[g] - m);
        run_max[g] = m;
        run_sum[g] *= correction;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] *= correction;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const float p = score[u][g] == -INFINITY ? 0.0f : __expf(score[u][g] - m);
          run_sum[g] += p;
          float vf[8];
          T::x8_to_float(vraw[u], vf);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[g][j] += p * vf[j];
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
#pragma unroll
      for (int j = 0; j < 8; ++j) g_acc[(group * GMAX + g) * HEAD_DIM + lane_in_row * 8 + j] = acc[g][j];
      if (lane_in_row == 0) {
        g_ml[(group * GMAX + g) * 2] = run_max[g];
        g_ml[(group * GMAX + g) * 2 + 1] = run_sum[g];
      }
    }
  }
  __syncthreads();

  // The groups' states merged, in group order, per (head, dim).
  for (int e = threadIdx.x; e < G * HEAD_DIM; e += kAttnThreads) {
    const int g = e / HEAD_DIM;
    const int d = e % HEAD_DIM;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kGroups; ++w) m = fmaxf(m, g_ml[(w * GMAX + g) * 2]);
    float sum = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kGroups; ++w) {
      const float gm = g_ml[(w * GMAX + g) * 2];
      const float scale = gm == -INFINITY ? 0.0f : __expf(gm - m);
      sum += g_ml[(w * GMAX + g) * 2 + 1] * scale;
      total += g_acc[(w * GMAX + g) * HEAD_DIM + d] * scale;
    }
    const int head = kv_head * G + g;
    if (direct) {
      const float o = overlong ? nan_value() : (n == 0 ? 0.0f : total / sum);
      a.out[(int64_t{seq} * a.num_heads + head) * HEAD_DIM + d] = T::from_float(o);
    } else {
      const int64_t part = (int64_t{seq} * a.num_heads + head) * num_splits + split;
      ws_acc[part * HEAD_DIM + d] = total;
      if (d == 0) {
        ws_ml[part * 2] = m;
        ws_ml[part * 2 + 1] = sum;
      }
    }
  }
  if (direct) return;

  // The last split to finish merges them all: warp w takes heads w, w + 4, ...; each lane 4 dims.
  if (!last_cta_to_finish(a.split_counters + int64_t{seq} * num_kv_heads + kv_head, used)) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int g = warp; g < G; g += kAttnThreads / 32) {
    const int head = kv_head * G + g;
    const int64_t first = (int64_t{seq} * a.num_heads + head) * num_splits;
    const float* ml = ws_ml + first * 2;
    float m = -INFINITY;
    for (int sp = lane; sp < used; sp += 32) m = fmaxf(m, __ldcg(ml + sp * 2));
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float sum = 0;
    for (int sp = lane; sp < used; sp += 32) sum += __ldcg(ml + sp * 2 + 1) * __expf(__ldcg(ml + sp * 2) - m);
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane * 4 < HEAD_DIM) {
      float4 o = make_float4(0, 0, 0, 0);
      // 16 splits' loads in flight at a time: a long sequence has 64 (batch 1 × 4k), and by 4 the
      // merge was a chain of 16 round trips to L2 (gpu-kernel-notes.md).
#pragma unroll 16
      for (int sp = 0; sp < used; ++sp) {
        const float w = __expf(__ldcg(ml + sp * 2) - m);
        const float4 part = __ldcg(reinterpret_cast<const float4*>(ws_acc + (first + sp) * HEAD_DIM) + lane);
        o.x += w * part.x;
        o.y += w * part.y;
        o.z += w * part.z;
        o.w += w * part.w;
      }
      // Divided, as the one-split form does: a sequence whose keys fit one split gets the same bits
      // whether or not the call splits (a captured graph sizes its split by the table's width).
      if (overlong) sum = nan_value();
      uint2* dst = reinterpret_cast<uint2*>(a.out + (int64_t{seq} * a.num_heads + head) * HEAD_DIM) + lane;
      *dst = pack4<T>(o.x / sum, o.y / sum, o.z / sum, o.w / sum);
    }
  }
}

// The two-pass form, for grids of more than kSinglePassMaxWaves CTAs an SM, where the single pass
// loses: scores of the split into shared memory, the split's softmax, then V rows weighted the
// same way and reduced across the CTA in a fixed order; a second kernel merges the splits.
// NOTE: its set-up repeats the single-pass kernel's. A version sharing it through a helper (and
// reading no keys of overlong sequences, as the single pass does) ran a third slower at batch
// 16 × 4k, cause not found; so an overlong sequence's CTAs still read past its table row here
// (the output is NaN either way).
template <typename T, int HEAD_DIM, int GMAX>
__global__ void __launch_bounds__(kAttnThreads)
    decode_attention_two_pass_kernel(DecodeAttentionArgs a, int32_t partition, int32_t num_splits,
                                     float* ws_acc, float* ws_ml) {
  constexpr int kLanes = HEAD_DIM / 8;  // threads per key row
  constexpr int kGroups = kAttnThreads / kLanes;
  constexpr int kWarps = kAttnThreads / 32;
  extern __shared__ float smem[];
  float* scores = smem;                     // [GMAX][partition]
  float* reduce = smem + GMAX * partition;  // [kWarps][GMAX][HEAD_DIM]
  __shared__ float s_max[GMAX], s_sum[GMAX];
  grid_dependency_wait();
  allow_dependents();

  const int kv_head = blockIdx.x;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int num_kv_heads = a.kv.num_kv_heads;
  const int G = a.num_heads / num_kv_heads;
  const int seq_len = a.seq_lens[seq];
  const int start = split * partition;
  const int n = max(0, min(start + partition, seq_len) - start);
  const bool overlong = seq_len > a.max_seq_len;  // max_seq_len was not an upper bound
  // A split past the end of a shorter sequence has nothing to do (the merge skips it).
  if (n == 0 && num_splits > 1) return;
  const int64_t q_stride = a.q_stride != 0 ? a.q_stride : int64_t{a.num_heads} * HEAD_DIM;
  const int lane_in_row = threadIdx.x % kLanes;
  const int group = threadIdx.x / kLanes;
  const int bs = a.kv.block_size;
  const int32_t* table = a.block_tables + int64_t{seq} * a.max_blocks_per_seq;
  // Row r of block b for this kv head: ((b·num_kv_heads + kv_head)·bs + r)·HEAD_DIM.
  const int64_t block_stride = int64_t{num_kv_heads} * bs * HEAD_DIM;
  const uint16_t* k_base = a.kv.k + int64_t{kv_head} * bs * HEAD_DIM + lane_in_row * 8;
  const uint16_t* v_base = a.kv.v + int64_t{kv_head} * bs * HEAD_DIM + lane_in_row * 8;

  // This thread's 8 values of each query head, pre-scaled.
  float q[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < G) {
      const uint16_t* qh = a.q + seq * q_stride + int64_t{kv_head * G + g} * HEAD_DIM + lane_in_row * 8;
      T::x8_to_float(*reinterpret_cast<const uint4*>(qh), q[g]);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[g][j] *= a.scale;
    }
  }

  // This lane's 16 bytes of the kUnroll key rows base + u·kGroups + group (zeros past the split).
  auto load_rows = [&](const uint16_t* rows, int base, uint4* raw) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kGroups + group;
      raw[u] = make_uint4(0, 0, 0, 0);
      if (t < n) {
        const int pos = start + t;
        raw[u] =
            *reinterpret_cast<const uint4*>(rows + table[pos / bs] * block_stride + (pos % bs) * HEAD_DIM);
      }
    }
  };

  // 1. Scores of the split's keys. Every lane runs the same trip count (shuffles need it).
  for (int base = 0; base < n; base += kGroups * kUnroll) {
    uint4 raw[kUnroll];
    load_rows(k_base, base, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kGroups + group;
      float kf[8];
      T::x8_to_float(raw[u], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
          float dot = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) dot += q[g][j] * kf[j];
#pragma unroll
          for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          if (lane_in_row == 0 && t < n) scores[g * partition + t] = dot;
        }
      }
    }
  }
  __syncthreads();

  // 2. Softmax of the split per head: warp w takes heads w, w + kWarps, ...
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int g = warp; g < G; g += kWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, scores[g * partition + t]);
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float sum = 0;
    for (int t = lane; t < n; t += 32) {
      const float p = expf(scores[g * partition + t] - m);
      scores[g * partition + t] = p;
      sum += p;
    }
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      s_max[g] = m;
      s_sum[g] = sum;
    }
  }
  __syncthreads();

  // 3. Weighted V rows: each thread sums its 8 dims over the keys of its group.
  float acc[GMAX][8] = {};
  for (int base = 0; base < n; base += kGroups * kUnroll) {
    uint4 raw[kUnroll];
    load_rows(v_base, base, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kGroups + group;
      if (t < n) {
        float vf[8];
        T::x8_to_float(raw[u], vf);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g < G) {
            const float p = scores[g * partition + t];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] += p * vf[j];
          }
        }
      }
    }
  }
  // Groups of one warp first (shuffles), then the warps through shared memory.
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int off = 16; off >= kLanes; off /= 2) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], off);
    }
  }
  if (lane < kLanes) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < G) {
#pragma unroll
        for (int j = 0; j < 8; ++j) reduce[(warp * GMAX + g) * HEAD_DIM + lane * 8 + j] = acc[g][j];
      }
    }
  }
  __syncthreads();

  for (int e = threadIdx.x; e < G * HEAD_DIM; e += kAttnThreads) {
    const int g = e / HEAD_DIM;
    const int d = e % HEAD_DIM;
    float total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += reduce[(w * GMAX + g) * HEAD_DIM + d];
    const int head = kv_head * G + g;
    if (num_splits == 1) {
      const float o = overlong ? nan_value() : (n == 0 ? 0.0f : total / s_sum[g]);
      a.out[(int64_t{seq} * a.num_heads + head) * HEAD_DIM + d] = T::from_float(o);
    } else {
      const int64_t part = (int64_t{seq} * a.num_heads + head) * num_splits + split;
      ws_acc[part * HEAD_DIM + d] = total;
      if (d == 0) {
        ws_ml[part * 2] = s_max[g];
        ws_ml[part * 2 + 1] = s_sum[g];
      }
    }
  }
}

template <typename T, int HEAD_DIM>
__global__ void decode_attention_merge_kernel(DecodeAttentionArgs a, int32_t partition, int32_t num_splits,
                                              const float* ws_acc, const float* ws_ml) {
  grid_dependency_wait();
  allow_dependents();
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int d = threadIdx.x;
  const int seq_len = a.seq_lens[seq];
  const int used = min(num_splits, (seq_len + partition - 1) / partition);
  const int64_t base = (int64_t{seq} * a.num_heads + head) * num_splits;
  float m = -INFINITY;
  for (int s = 0; s < used; ++s) m = fmaxf(m, ws_ml[(base + s) * 2]);
  float l = 0, o = 0;
  for (int s = 0; s < used; ++s) {
    const float w = expf(ws_ml[(base + s) * 2] - m);
    l += ws_ml[(base + s) * 2 + 1] * w;
    o += ws_acc[(base + s) * HEAD_DIM + d] * w;
  }
  float result = used == 0 ? 0.0f : o / l;
  if (seq_len > a.max_seq_len) result = nan_value();
  a.out[(int64_t{seq} * a.num_heads + head) * HEAD_DIM + d] = T::from_float(result);
}

struct SplitPlan {
  int32_t partition = kMaxPartition;
  int32_t splits = 1;
};

std::atomic<double> g_split_ctas_per_sm{2.0};

// The largest partition whose grid still has g_split_ctas_per_sm CTAs an SM (at least
// kMinPartition keys).
SplitPlan plan_splits(int32_t num_seqs, int32_t num_kv_heads, int32_t max_seq_len) {
  const double want_ctas = g_split_ctas_per_sm.load(std::memory_order_relaxed) * current_multiprocessors();
  SplitPlan p;
  const int32_t len = std::max(1, max_seq_len);
  for (;;) {
    p.splits = (len + p.partition - 1) / p.partition;
    if (p.partition <= kMinPartition ||
        static_cast<double>(int64_t{num_seqs} * num_kv_heads * p.splits) >= want_ctas)
      break;
    p.partition /= 2;
  }
  return p;
}

template <typename T, int HEAD_DIM, int GMAX>
Status launch_decode_attention(const DecodeAttentionArgs& a, SplitPlan plan, float* ws_acc, float* ws_ml,
                               StreamHandle stream) {
  const dim3 grid(static_cast<unsigned>(a.kv.num_kv_heads), static_cast<unsigned>(a.num_seqs),
                  static_cast<unsigned>(plan.splits));
  if (int64_t{a.num_seqs} * a.kv.num_kv_heads * plan.splits <=
      kSinglePassMaxWaves * int64_t{current_multiprocessors()})
    return launch_programmatic("decode_attention", decode_attention_single_pass_kernel<T, HEAD_DIM, GMAX>,
                               grid, dim3(kAttnThreads), decode_attention_smem_bytes<HEAD_DIM, GMAX>(),
                               stream, a, plan.partition, plan.splits, ws_acc, ws_ml);
  const size_t smem = sizeof(float) * (GMAX * plan.partition + (kAttnThreads / 32) * GMAX * HEAD_DIM);
  PD_RETURN_IF_ERROR(
      launch_programmatic("decode_attention", decode_attention_two_pass_kernel<T, HEAD_DIM, GMAX>, grid,
                          dim3(kAttnThreads), smem, stream, a, plan.partition, plan.splits, ws_acc, ws_ml));
  if (plan.splits == 1) return ok_status();
  // An ordinary launch: programmatic, it made batch-16 decode graphs slower (gpu-kernel-notes.md).
  const dim3 merge_grid(static_cast<unsigned>(a.num_heads), static_cast<unsigned>(a.num_seqs));
  decode_attention_merge_kernel<T, HEAD_DIM>
      <<<merge_grid, HEAD_DIM, 0, stream>>>(a, plan.partition, plan.splits, ws_acc, ws_ml);
  return check_last_error("decode_attention merge");
}

template <typename T, int HEAD_DIM>
Status dispatch_group(const DecodeAttentionArgs& a, int32_t group, SplitPlan plan, float* ws_acc,
                      float* ws_ml, StreamHandle stream) {
  if (group == 1) return launch_decode_attention<T, HEAD_DIM, 1>(a, plan, ws_acc, ws_ml, stream);
  if (group == 2) return launch_decode_attention<T, HEAD_DIM, 2>(a, plan, ws_acc, ws_ml, stream);
  if (group <= 4) return launch_decode_attention<T, HEAD_DIM, 4>(a, plan, ws_acc, ws_ml, stream);
  return launch_decode_attention<T, HEAD_DIM, 8>(a, plan, ws_acc, ws_ml, stream);
}

unsigned blocks_for(int64_t total, int threads) {
  return static_cast<unsigned>((total + threads - 1) / threads);
}

}  // namespace

bool kernels_built_for_current_device() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, rms_norm_kernel<Bf16>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

Status rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t n, uint16_t* y,
                StreamHandle stream, Dtype dtype) {
  if (rows <= 0 || n <= 0) return rows == 0 ? ok_status() : invalid_argument("rms_norm: empty row");
  const dim3 grid(static_cast<unsigned>(rows));
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (const int threads = norm_vec_threads(n, x, w, y); threads > 0)
      return launch_programmatic("rms_norm", norm_vec_kernel<T>, grid, dim3(threads), 0, stream, x, w, eps, n,
                                 y);
    return launch_programmatic("rms_norm", rms_norm_kernel<T>, grid, dim3(norm_threads(n)), 0, stream, x, w,
                               eps, n, y);
  });
}

Status silu_mul(const float* gate_up, int64_t rows, int64_t n, uint16_t* out, StreamHandle stream,
                Dtype dtype) {
  if (rows * n <= 0) return ok_status();
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (n % 4 == 0 && rows <= 65535 && reinterpret_cast<uintptr_t>(gate_up) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(out) % 8 == 0)
      return launch_programmatic("silu_mul", silu_mul_vec_kernel<T>,
                                 dim3(blocks_for(n / 4, 256), static_cast<unsigned>(rows)), dim3(256), 0,
                                 stream, gate_up, n, out);
    return launch_programmatic("silu_mul", silu_mul_kernel<T>, dim3(blocks_for(rows * n, 256)), dim3(256), 0,
                               stream, gate_up, rows, n, out);
  });
}

Status rope_qkv(const RopeQkvArgs& a, StreamHandle stream) {
  const int32_t hd = a.kv.head_dim;
  if (hd <= 0 || hd % 2 != 0 || a.rope_dim < 0 || a.rope_dim % 2 != 0 || a.rope_dim > hd)
    return invalid_argument("rope_qkv: head_dim must be even and rope_dim even and at most head_dim");
  const int32_t heads = a.num_heads + 2 * a.kv.num_kv_heads;
  if (a.rows <= 0 || heads <= 0) return ok_status();
  if (a.rows > INT_MAX) return invalid_argument("rope_qkv: more than 2^31 - 1 rows");
  // Threads: a multiple of head_dim / 2 (each keeps one pair index), about 256. A few rows (decode
  // steps): one head a thread, so a row spreads over heads / (threads / pairs) CTAs; many rows: four,
  // the angles computed once for four heads.
  const int32_t pairs = hd / 2;
  const int32_t threads = pairs * std::max(1, 256 / pairs);
  if (threads > 1024) return invalid_argument("rope_qkv: head_dim above 2048");
  const int32_t heads_per_cta = threads / pairs * (a.rows < 256 ? 1 : 4);
  const unsigned groups = static_cast<unsigned>((heads + heads_per_cta - 1) / heads_per_cta);
  if (groups > 65535) return invalid_argument("rope_qkv: too many heads");
  auto aligned = [](const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  const bool adjacent = !a.neox && a.ld % 2 == 0 && aligned(a.qkv, 8) && aligned(a.bias, 8) &&
                        aligned(a.q_out, 4) && aligned(a.kv.k, 4) && aligned(a.kv.v, 4);
  const dim3 grid(static_cast<unsigned>(a.rows), groups);
  return with_dtype(a.kv.dtype, [&](auto t) {
    using T = decltype(t);
    if (adjacent)
      return launch_programmatic("rope_qkv", rope_qkv_kernel<T, true>, grid, dim3(threads), 0, stream, a,
                                 heads_per_cta);
    return launch_programmatic("rope_qkv", rope_qkv_kernel<T, false>, grid, dim3(threads), 0, stream, a,
                               heads_per_cta);
  });
}

Status embedding(const uint16_t* table, int64_t vocab, const int32_t* tokens, int64_t rows, int64_t n,
                 float* out, StreamHandle stream, Dtype dtype) {
  if (rows <= 0) return ok_status();
  with_dtype(dtype, [&](auto t) {
    embedding_kernel<decltype(t)>
        <<<static_cast<unsigned>(rows), 256, 0, stream>>>(table, vocab, tokens, n, out);
  });
  return check_last_error("embedding");
}

size_t argmax_workspace_bytes(int64_t rows) {
  return static_cast<size_t>(std::max<int64_t>(rows, 0)) * sizeof(ArgmaxSlot);
}

Status argmax(const float* logits, int64_t rows, int64_t vocab, void* workspace, size_t workspace_bytes,
              int32_t* out, StreamHandle stream) {
  if (rows <= 0) return ok_status();
  if (vocab <= 0 || vocab > INT32_MAX) return invalid_argument("argmax: vocabulary size out of range");
  if (rows > 65535) return invalid_argument("argmax: more than 65535 rows");
  if (workspace_bytes < argmax_workspace_bytes(rows)) return invalid_argument("argmax: workspace too small");
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(ArgmaxSlot) != 0)
    return invalid_argument("argmax: workspace not 8-byte aligned");
  const dim3 grid(static_cast<unsigned>((vocab + kArgmaxSlice - 1) / kArgmaxSlice),
                  static_cast<unsigned>(rows));
  return launch_programmatic("argmax", argmax_kernel, grid, dim3(256), 0, stream, logits, vocab,
                             static_cast<ArgmaxSlot*>(workspace), out);
}

__global__ void mark_unusable_kernel(const float* __restrict__ values, int64_t rows, int64_t vocab,
                                     int32_t* tokens) {
  const int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int32_t t = tokens[r];
  if (t < 0 || t >= vocab) return;
  if (!(values[r * vocab + t] > -INFINITY)) tokens[r] = -1;  // NaN or -inf
}

Status mark_unusable_draws(const float* values, int64_t rows, int64_t vocab, int32_t* tokens,
                           StreamHandle stream) {
  if (rows <= 0) return ok_status();
  if (vocab <= 0 || vocab > INT32_MAX)
    return invalid_argument("mark_unusable_draws: vocabulary size out of range");
  const int threads = 128;
  mark_unusable_kernel<<<static_cast<unsigned>((rows + threads - 1) / threads), threads, 0, stream>>>(
      values, rows, vocab, tokens);
  return check_last_error("mark_unusable_draws");
}

Status gumbel_perturb(float* logits, int64_t rows, int64_t vocab, const SampleDraw* draws,
                      StreamHandle stream) {
  if (rows <= 0) return ok_status();
  if (vocab <= 0 || vocab > INT32_MAX)
    return invalid_argument("gumbel_perturb: vocabulary size out of range");
  if (rows > 65535) return invalid_argument("gumbel_perturb: more than 65535 rows");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((vocab + 1023) / 1024, 64)),
                  static_cast<unsigned>(rows));
  gumbel_kernel<<<grid, 256, 0, stream>>>(logits, vocab, draws);
  return check_last_error("gumbel_perturb");
}

Status sample_truncated(const float* logits, int64_t rows, int64_t vocab, const SampleDraw* draws,
                        int32_t* out, StreamHandle stream) {
  if (rows <= 0) return ok_status();
  if (vocab <= 0 || vocab >= (int64_t{1} << 22))
    return invalid_argument("sample_truncated: vocabulary size out of range (up to 2^22 - 1 tokens)");
  if (rows > 65535) return invalid_argument("sample_truncated: more than 65535 rows");
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) {
    (void)cudaGetLastError();
    return unimplemented(
        "sample_truncated: top-k, top-p and min-p draws on the GPU need compute capability 9.0 "
        "(Hopper) or newer");
  }
  // A cluster of CTAs per row while the batch leaves SMs idle (132 on an H100), one CTA from 67
  // rows; smaller where the GPU cannot place that many CTAs together (a MIG slice, a busy GPU).
  unsigned cluster = rows <= 16 ? 8 : rows <= 33 ? 4 : rows <= 66 ? 2 : 1;
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(kSampleThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  for (;; cluster /= 2) {
    attribute[0].val.clusterDim.x = cluster;
    config.gridDim = dim3(static_cast<unsigned>(rows) * cluster);
    int fits = 0;
    if (cluster == 1 ||
        (cudaOccupancyMaxActiveClusters(&fits, sample_truncated_kernel, &config) == cudaSuccess && fits > 0))
      break;
    (void)cudaGetLastError();
  }
  const cudaError_t err = cudaLaunchKernelEx(&config, sample_truncated_kernel, logits, vocab, draws, out);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return internal_error(std::string("sample_truncated: ") + cudaGetErrorString(err));
  }
  return check_last_error("sample_truncated");
}

Status gather_rows(const uint16_t* in, int64_t n, const int32_t* index, int64_t rows, uint16_t* out,
                   StreamHandle stream) {
  if (rows <= 0) return ok_status();
  return launch_programmatic("gather_rows", gather_rows_kernel, dim3(static_cast<unsigned>(rows)), dim3(256),
                             0, stream, in, n, index, out);
}

Status fill_uniform(uint16_t* x, int64_t n, float mean, float scale, uint64_t seed, Dtype dtype,
                    StreamHandle stream) {
  if (n <= 0) return ok_status();
  with_dtype(dtype, [&](auto t) {
    fill_uniform_kernel<decltype(t)>
        <<<std::min<unsigned>(blocks_for(n, 256), 65535u), 256, 0, stream>>>(x, n, mean, scale, seed);
  });
  return check_last_error("fill_uniform");
}

Status fill_uniform_f32(float* x, int64_t n, float mean, float scale, uint64_t seed, StreamHandle stream) {
  if (n <= 0) return ok_status();
  fill_uniform_f32_kernel<<<std::min<unsigned>(blocks_for(n, 256), 65535u), 256, 0, stream>>>(x, n, mean,
                                                                                              scale, seed);
  return check_last_error("fill_uniform_f32");
}

Status gather_kv(const PagedKvCache& cache, const int32_t* block_table, int64_t tokens, uint16_t* wire,
                 StreamHandle stream) {
  if (tokens <= 0) return ok_status();
  PD_RETURN_IF_ERROR(check_move_kv(cache, wire));
  const int64_t pieces = cache.bytes(tokens) / 16;
  move_kv_kernel<true><<<std::min<unsigned>(blocks_for(pieces, 256), 8192u), 256, 0, stream>>>(
      cache, block_table, tokens, wire);
  return check_last_error("gather_kv");
}

Status scatter_kv(const uint16_t* wire, const PagedKvCache& cache, const int32_t* block_table, int64_t tokens,
                  StreamHandle stream) {
  if (tokens <= 0) return ok_status();
  PD_RETURN_IF_ERROR(check_move_kv(cache, wire));
  const int64_t pieces = cache.bytes(tokens) / 16;
  move_kv_kernel<false><<<std::min<unsigned>(blocks_for(pieces, 256), 8192u), 256, 0, stream>>>(
      cache, block_table, tokens, const_cast<uint16_t*>(wire));
  return check_last_error("scatter_kv");
}

Status write_kv(const uint16_t* k_rows, const uint16_t* v_rows, int64_t row_stride, const int32_t* slots,
                int64_t tokens, const PagedKv& kv, StreamHandle stream) {
  const int64_t total = tokens * kv.num_kv_heads * kv.head_dim;
  if (total <= 0) return ok_status();
  write_kv_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(k_rows, v_rows, row_stride, slots, tokens, kv);
  return check_last_error("write_kv");
}

void set_decode_split_ctas_per_sm(double ctas_per_sm) {
  g_split_ctas_per_sm.store(ctas_per_sm, std::memory_order_relaxed);
}

size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& a) {
  const SplitPlan plan = plan_splits(a.num_seqs, a.kv.num_kv_heads, a.max_seq_len);
  if (plan.splits == 1) return 0;
  return sizeof(float) * static_cast<size_t>(a.num_seqs) * a.num_heads * plan.splits * (a.kv.head_dim + 2);
}

Status decode_attention(const DecodeAttentionArgs& a, void* workspace, size_t workspace_bytes,
                        StreamHandle stream) {
  if (a.num_seqs == 0) return ok_status();
  const PagedKv& kv = a.kv;
  if (kv.num_kv_heads <= 0 || a.num_heads % kv.num_kv_heads != 0)
    return invalid_argument("decode_attention: num_heads must be a positive multiple of num_kv_heads");
  const int32_t group = a.num_heads / kv.num_kv_heads;
  if (group > 8) return unimplemented("decode_attention: more than 8 query heads per kv head");
  if (kv.head_dim != 64 && kv.head_dim != 128)
    return unimplemented("decode_attention: head_dim must be 64 or 128");
  if (kv.block_size <= 0) return invalid_argument("decode_attention: block_size must be positive");
  if (a.num_seqs > 65535) return invalid_argument("decode_attention: more than 65535 queries in one call");
  const int64_t q_stride = a.q_stride != 0 ? a.q_stride : int64_t{a.num_heads} * kv.head_dim;
  if (q_stride % 8 != 0 || reinterpret_cast<uintptr_t>(a.q) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(kv.k) % 16 != 0 || reinterpret_cast<uintptr_t>(kv.v) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(a.out) % 8 != 0)
    return invalid_argument(
        "decode_attention: q, k and v must be 16-byte aligned (q_stride a multiple of 8), out 8-byte "
        "aligned");
  const SplitPlan plan = plan_splits(a.num_seqs, kv.num_kv_heads, a.max_seq_len);
  if (workspace_bytes < decode_attention_workspace_bytes(a))
    return invalid_argument("decode_attention: workspace smaller than decode_attention_workspace_bytes()");
  if (plan.splits > 1 && a.split_counters == nullptr)
    return invalid_argument("decode_attention: these shapes split the keys and need split_counters");
  float* ws_acc = static_cast<float*>(workspace);
  float* ws_ml = ws_acc == nullptr
                     ? nullptr
                     : ws_acc + static_cast<size_t>(a.num_seqs) * a.num_heads * plan.splits * kv.head_dim;
  return with_dtype(kv.dtype, [&](auto t) {
    using T = decltype(t);
    if (kv.head_dim == 64) return dispatch_group<T, 64>(a, group, plan, ws_acc, ws_ml, stream);
    return dispatch_group<T, 128>(a, group, plan, ws_acc, ws_ml, stream);
  });
}

}  // namespace pdserve::cuda

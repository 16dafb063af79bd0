// Prefill attention on tensor cores (FlashAttention-2 style) over the paged KV cache.
//
// A CTA of 4 warps takes 64 query rows of one chunk and one kv head — rows are (token, query head
// of the kv head's group) pairs, so grouped heads share every K/V tile — and walks the chunk's
// keys in tiles of 64: K and V tiles are gathered from the cache blocks into shared memory with
// cp.async (two stages, so the next tile loads while this one is used), S = Q·Kᵀ and O += P·V run
// as mma.sync m16n8k16 (bf16 or fp16 in, float accumulation), and the softmax is kept online per row in
// registers. Each warp owns 16 rows. Causal: row (token t) sees keys [0, first_position + t].
// On sm_90 GPUs at head_dim 128 the general form runs on warpgroup MMA instead
// (prefill_attention_sm90a.cu); the decode forms stay here. Shared device code: attention_tiles.cuh.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>

#include "kernels/cuda/attention_tiles.cuh"
#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/ops.h"
#ifdef PDSERVE_CUDA_SM90A
#include "kernels/cuda/prefill_attention_sm90a.h"
#endif

namespace pdserve::cuda {
namespace {

using namespace attention_tiles;  // NOLINT(google-build-using-namespace): this file's own tiles

template <typename T, int HEAD_DIM, bool kPow2Blocks>
__global__ void __launch_bounds__(kThreads) prefill_attention_kernel(PrefillAttentionArgs a) {
  grid_dependency_wait();
  allow_dependents();
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* k_tiles = smem;                         // [2][kKeys][HEAD_DIM], swizzled
  uint16_t* v_tiles = smem + 2 * kKeys * HEAD_DIM;  // [2][kKeys][HEAD_DIM], swizzled

  const int chunk = blockIdx.z;
  const int kv_head = blockIdx.y;
  const ChunkRows<HEAD_DIM> cr(a, chunk, kv_head);
  const int group = cr.group;
  const int rows = cr.rows;
  const int row0 = blockIdx.x * kRows;
  if (row0 >= rows) return;
  const int first_pos = a.chunk_first_pos[chunk];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // Keys this CTA needs: up to the last row's limit.
  const int last_row = min(rows, row0 + kRows) - 1;
  const int keys_end = first_pos + last_row / group + 1;
  const int num_tiles = (keys_end + kKeys - 1) / kKeys;

  const KeyTileCopier<HEAD_DIM, kPow2Blocks> copier(a, chunk, kv_head);
  auto load_tile = [&](int tile, int stage) {
    copier.copy(k_tiles + stage * kKeys * HEAD_DIM, v_tiles + stage * kKeys * HEAD_DIM, tile * kKeys,
                keys_end);
    cp_async_commit();
  };
  load_tile(0, 0);

  // This warp's 16 rows: lane holds rows r_lo = lane/4 and r_hi = lane/4 + 8 of them.
  const int wrow = row0 + warp * kRowsPerWarp;
  const int r_lo = wrow + lane / 4;
  const int r_hi = r_lo + 8;
  // Keys each row sees (0 for padding rows past the chunk).
  const int limit_lo = r_lo < rows ? first_pos + r_lo / group + 1 : 0;
  const int limit_hi = r_hi < rows ? first_pos + r_hi / group + 1 : 0;
  const bool warp_active = wrow < rows;
  // Keys its rows see: from its first row's limit (no mask below) to its last row's (none past).
  const int full_keys = first_pos + wrow / group + 1;
  const int warp_keys = warp_active ? first_pos + (min(rows, wrow + kRowsPerWarp) - 1) / group + 1 : 0;

  WarpAttention<T, HEAD_DIM> w;
  w.load_q(cr.q(r_lo), cr.q(r_hi), lane);
  const float scale_log2 = a.scale * 1.4426950408889634f;  // exp(x) = exp2(x · log2 e)

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < num_tiles) {
      load_tile(tile + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kt = k_tiles + stage * kKeys * HEAD_DIM;
    const uint16_t* vt = v_tiles + stage * kKeys * HEAD_DIM;
    // A warp whose 16 rows are all past the chunk (decode tokens: a group's few rows), or whose
    // rows see none of the tile's keys (causal), only helps load it: all masked, the tile would
    // change nothing.
    if (tile * kKeys < warp_keys)
      w.template tile<kKeys>(kt, vt, tile * kKeys, limit_lo, limit_hi, full_keys, scale_log2, lane);
    __syncthreads();  // the stage is refilled two tiles from now
  }

  w.finish();
  w.store(cr.out(r_lo), cr.out(r_hi), lane);
}

// ---- decode: one query token per chunk ---------------------------------------------------------
// A chunk of one token has at most a group's worth of rows (≤ 16): one warp's fragment. Then all 4
// warps take those rows, each over its own 16-key tile of every 64 keys (so each warp streams a
// quarter of the sequence, two rounds of 4 tiles in flight), and merge their softmax states at the
// end through shared memory. 16-key tiles keep a CTA at 64 KiB of shared memory (head_dim 128), so three
// share an SM (32-key tiles, one CTA an SM: batch 64 × 4k 561 µs; 16-key: 358 µs).
constexpr int kDecodeKeys = 16;  // keys per warp tile
constexpr int kRoundKeys = kWarps * kDecodeKeys;

// Keys [key_begin, key_end) of one (chunk, kv head) pair — key_begin a multiple of kRoundKeys — by
// the CTA's 4 warps, their states merged. With `part_acc` null the rows' outputs are written;
// otherwise the rows' states for a later merge: part_acc[r][d], the weighted V relative to the base
// part_ml[r][0], and the sum of weights part_ml[r][1]. Uses all of `smem`; returns without a
// barrier after its last read of it.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void decode_pair_keys(const PrefillAttentionArgs& a, int chunk, int kv_head,
                                                 int key_begin, int key_end, uint16_t* smem, float* part_acc,
                                                 float* part_ml) {
  constexpr int kDimTiles = HEAD_DIM / 8;
  constexpr int kTileValues = kDecodeKeys * HEAD_DIM;     // one warp's K (or V) tile
  constexpr int kStageValues = 2 * kWarps * kTileValues;  // K then V, for the 4 warps
  static_assert(kRoundKeys == kKeys, "a round is one copier tile: the 4 warps' tiles in a row");
  const int group = a.num_heads / a.kv.num_kv_heads;
  const int q_start = a.chunk_q_start[chunk];
  const int64_t q_stride = a.q_stride != 0 ? a.q_stride : int64_t{a.num_heads} * HEAD_DIM;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int rounds = (key_end - key_begin + kRoundKeys - 1) / kRoundKeys;

  // A round's K rows are the 4 warps' 16-key tiles one after another (warp w's tile: rows 16w..),
  // then its V rows: one copier tile each. The block size is a power of two (decode_form).
  const KeyTileCopier<HEAD_DIM, true> copier(a, chunk, kv_head);
  auto load_round = [&](int round, int stage) {
    uint16_t* base = smem + stage * kStageValues;
    copier.copy(base, base + kWarps * kTileValues, key_begin + round * kRoundKeys, key_end);
    cp_async_commit();
  };
  load_round(0, 0);

  const int r_lo = lane / 4, r_hi = r_lo + 8;
  WarpAttention<T, HEAD_DIM> w;
  {
    auto q_ptr = [&](int r) -> const uint16_t* {
      return r < group ? a.q + int64_t{q_start} * q_stride + int64_t{kv_head * group + r} * HEAD_DIM
                       : nullptr;
    };
    w.load_q(q_ptr(r_lo), q_ptr(r_hi), lane);
  }
  const int limit_lo = r_lo < group ? key_end : 0;
  const int limit_hi = r_hi < group ? key_end : 0;
  const float scale_log2 = a.scale * 1.4426950408889634f;

  for (int round = 0; round < rounds; ++round) {
    const int stage = round & 1;
    if (round + 1 < rounds) {
      load_round(round + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kt = smem + stage * kStageValues + warp * kTileValues;
    const uint16_t* vt = smem + stage * kStageValues + (kWarps + warp) * kTileValues;
    const int tile_key0 = key_begin + round * kRoundKeys + warp * kDecodeKeys;
    if (tile_key0 < key_end)
      w.template tile<kDecodeKeys>(kt, vt, tile_key0, limit_lo, limit_hi, key_end, scale_log2, lane);
    __syncthreads();  // the stage is refilled two rounds from now
  }

  // Merge the 4 warps' states through shared memory: per row its max and sum of weights, then each
  // warp's factor; per row and dim the weighted V (rows kOStride floats apart, so that the lanes'
  // 8-byte stores of a fragment fall in distinct banks).
  constexpr int kOStride = HEAD_DIM + 8;
  w.finish();
  float* fs = reinterpret_cast<float*>(smem);
  float* s_m = fs;                    // [kWarps][16]: max, then the warp's factor
  float* s_l = fs + kWarps * 16;      // [kWarps][16]: sum of weights; then [0] the row's sum, [1] its base
  float* s_o = fs + 2 * kWarps * 16;  // [kWarps][16][kOStride]
  if (lane % 4 == 0) {
    s_m[warp * 16 + r_lo] = w.m_lo;
    s_m[warp * 16 + r_hi] = w.m_hi;
    s_l[warp * 16 + r_lo] = w.l_lo;
    s_l[warp * 16 + r_hi] = w.l_hi;
  }
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) {
    const int d = t * 8 + (lane % 4) * 2;
    *reinterpret_cast<float2*>(s_o + (warp * 16 + r_lo) * kOStride + d) = make_float2(w.o[t][0], w.o[t][1]);
    *reinterpret_cast<float2*>(s_o + (warp * 16 + r_hi) * kOStride + d) = make_float2(w.o[t][2], w.o[t][3]);
  }
  __syncthreads();
  if (threadIdx.x < group) {
    const int r = threadIdx.x;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_m[w * 16 + r]);
    const float base = m == -INFINITY ? 0.0f : m;
    float l = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(s_m[w * 16 + r] - base);
      l += s_l[w * 16 + r] * f;
      s_m[w * 16 + r] = f;
    }
    s_l[r] = l;
    s_l[16 + r] = base;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < group * HEAD_DIM; e += kThreads) {
    const int r = e / HEAD_DIM;
    const int d = e % HEAD_DIM;
    float acc = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += s_o[(w * 16 + r) * kOStride + d] * s_m[w * 16 + r];
    const float l = s_l[r];
    if (part_acc == nullptr) {
      const int64_t row = int64_t{q_start} * a.num_heads + kv_head * group + r;
      const float v = l > 0 ? acc / l : 0.0f;
      a.out[row * HEAD_DIM + d] = T::from_float(v);
    } else {
      part_acc[r * HEAD_DIM + d] = acc;
      if (d == 0) {
        part_ml[r * 2] = s_l[16 + r];
        part_ml[r * 2 + 1] = l;
      }
    }
  }
}

// One CTA per (chunk, kv head) pair: grid (1, num_kv_heads, num_chunks).
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) decode_attention_tc_kernel(PrefillAttentionArgs a) {
  grid_dependency_wait();
  allow_dependents();
  extern __shared__ __align__(128) uint16_t smem[];
  const int chunk = blockIdx.z;
  if (a.chunk_len[chunk] == 0) return;  // nothing to attend for (uniform per CTA)
  decode_pair_keys<T, HEAD_DIM>(a, chunk, static_cast<int>(blockIdx.y), 0, a.chunk_first_pos[chunk] + 1, smem,
                                nullptr, nullptr);
}

// Exclusive prefix sum of v over the CTA's threads; *total gets the sum of all. scratch: kWarps ints
// of shared memory, free again when it returns.
__device__ __forceinline__ int cta_exclusive_sum(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int t = scratch[w];
    if (w < warp) before += t;
    sum += t;
  }
  __syncthreads();
  *total = sum;
  return before + incl - v;
}

// The balanced decode form. The keys of every (chunk, kv head) pair, in rounds of kRoundKeys and
// pairs in order (chunk-major), are one sequence of work units that the CTAs of one wave of the GPU
// share evenly: CTA c takes units [c·U/n, (c+1)·U/n) of U, with n the grid, or fewer CTAs where each
// would get less than min_units. So no CTA waits on a last, mostly idle wave, whatever the batch. A
// pair that lies across CTAs is computed in parts, each CTA writing its rows' state to the
// workspace (2 parts a CTA: a part that ends its range, one that starts it), and the last of them to
// finish merges the parts, a warp per query row, in an order fixed by the parts' CTAs and the
// lanes — the bits depend on the batch's lengths and the grid, not on which CTA ends first. The grid depends
// on the GPU only, so a captured graph and an eager launch of the same batch agree bit for bit.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 3)
    decode_attention_balanced_kernel(PrefillAttentionArgs a, int min_units) {
  grid_dependency_wait();
  allow_dependents();
  extern __shared__ __align__(128) uint16_t smem[];
  const int heads = a.kv.num_kv_heads;
  const int group = a.num_heads / heads;
  auto units_of = [&](int c) -> int {
    return c < a.num_chunks && a.chunk_len[c] != 0 ? a.chunk_first_pos[c] / kRoundKeys + 1 : 0;
  };
  // Before the first tile: a few ints of shared memory for the sums.
  int* scratch = reinterpret_cast<int*>(smem);
  int* found = scratch + kWarps;  // [0] the chunk, [1] its pairs' first unit (low), [2] (high)

  int mine = 0;
  for (int c = threadIdx.x; c < a.num_chunks; c += kThreads) mine += units_of(c);
  int sum = 0;
  (void)cta_exclusive_sum(mine, scratch, &sum);
  const int64_t total = int64_t{sum} * heads;
  const int64_t ctas = min(static_cast<int64_t>(gridDim.x), max(int64_t{1}, total / min_units));
  const int64_t cta = blockIdx.x;
  if (total == 0 || cta >= ctas) return;
  const int64_t begin = cta * total / ctas, end = (cta + 1) * total / ctas;

  // The chunk whose pairs hold unit `begin`.
  if (threadIdx.x == 0) found[0] = -1;
  for (int base = 0, carry = 0; base < a.num_chunks; base += kThreads) {
    const int u = units_of(base + static_cast<int>(threadIdx.x));
    int batch = 0;
    const int before = carry + cta_exclusive_sum(u, scratch, &batch);  // its barriers order found[0]
    const int64_t lo = int64_t{before} * heads;
    if (u > 0 && lo <= begin && begin < lo + int64_t{u} * heads) {
      found[0] = base + static_cast<int>(threadIdx.x);
      found[1] = static_cast<int>(lo & 0x7fffffff);
      found[2] = static_cast<int>(lo >> 31);
    }
    __syncthreads();
    if (found[0] >= 0) break;
    carry += batch;
  }
  int chunk = found[0];
  int64_t region = (int64_t{found[2]} << 31) | found[1];  // the first unit of the chunk's pairs
  __syncthreads();  // everyone has read `found` before the tiles overwrite it

  float* ws_acc = static_cast<float*>(a.workspace);
  float* ws_ml = ws_acc + int64_t{gridDim.x} * 2 * group * HEAD_DIM;
  for (int64_t unit = begin;;) {
    const int units = units_of(chunk);
    const int kv_head = static_cast<int>((unit - region) / units);
    const int off = static_cast<int>((unit - region) % units);
    const int64_t pair_first = unit - off;
    const int64_t seg_end = min(end, pair_first + units);
    const int key_end =
        min(a.chunk_first_pos[chunk] + 1, static_cast<int>(seg_end - pair_first) * kRoundKeys);
    if (off == 0 && seg_end == pair_first + units) {
      decode_pair_keys<T, HEAD_DIM>(a, chunk, kv_head, 0, key_end, smem, nullptr, nullptr);
    } else {
      const int64_t part = (cta * 2 + (pair_first > begin ? 1 : 0)) * group;
      decode_pair_keys<T, HEAD_DIM>(a, chunk, kv_head, off * kRoundKeys, key_end, smem,
                                    ws_acc + part * HEAD_DIM, ws_ml + part * 2);
      // The CTAs holding the pair's first and last units; the last of them to finish merges.
      const int64_t first_cta = ((pair_first + 1) * ctas - 1) / total;
      const int64_t last_cta = ((pair_first + units) * ctas - 1) / total;
      if (last_cta_to_finish(a.split_counters + int64_t{chunk} * heads + kv_head,
                             static_cast<int32_t>(last_cta - first_cta + 1))) {
        const int q_start = a.chunk_q_start[chunk];
        const int parts = static_cast<int>(last_cta - first_cta + 1);
        // CTA k's part of the pair: slot 1 of the first CTA where the pair starts inside its range,
        // else slot 0 (in every later CTA the pair, begun before its range, is its first segment).
        const int first_slot = pair_first > first_cta * total / ctas ? 1 : 0;
        auto part_of = [&](int i, int r) -> int64_t {
          return ((first_cta + i) * 2 + (i == 0 ? first_slot : 0)) * group + r;
        };
        // Warp w merges rows w, w + kWarps, ...: the parts' maxima and sums over its lanes, then
        // each lane kDims dims of the weighted V with 16 parts' loads in flight (a pair can lie
        // across dozens of CTAs when the batch is small).
        constexpr int kDims = HEAD_DIM / 32;
        const int lane = threadIdx.x % 32;
        for (int r = static_cast<int>(threadIdx.x) / 32; r < group; r += kWarps) {
          float m = -INFINITY;
          for (int i = lane; i < parts; i += 32) m = fmaxf(m, __ldcg(ws_ml + part_of(i, r) * 2));
#pragma unroll
          for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
          float l = 0;
          for (int i = lane; i < parts; i += 32) {
            const int64_t p = part_of(i, r);
            l += __ldcg(ws_ml + p * 2 + 1) * exp2f(__ldcg(ws_ml + p * 2) - m);
          }
#pragma unroll
          for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
          float acc[kDims] = {};
#pragma unroll 16
          for (int i = 0; i < parts; ++i) {
            const int64_t p = part_of(i, r);
            const float f = exp2f(__ldcg(ws_ml + p * 2) - m);
            const float* src = ws_acc + p * HEAD_DIM + lane * kDims;
            if constexpr (kDims == 4) {
              const float4 v = __ldcg(reinterpret_cast<const float4*>(src));
              acc[0] += v.x * f;
              acc[1] += v.y * f;
              acc[2] += v.z * f;
              acc[3] += v.w * f;
            } else {
              const float2 v = __ldcg(reinterpret_cast<const float2*>(src));
              acc[0] += v.x * f;
              acc[1] += v.y * f;
            }
          }
          uint16_t* dst =
              a.out + (int64_t{q_start} * a.num_heads + kv_head * group + r) * HEAD_DIM + lane * kDims;
#pragma unroll
          for (int j = 0; j < kDims; ++j) dst[j] = T::from_float(l > 0 ? acc[j] / l : 0.0f);
        }
      }
    }
    unit = seg_end;
    if (unit >= end) break;
    __syncthreads();                                // the next pair's tiles overwrite shared memory
    if (unit == region + int64_t{units} * heads) {  // on to the next chunk with keys
      region = unit;
      do ++chunk;
      while (units_of(chunk) == 0);
    }
  }
}

template <int HEAD_DIM>
constexpr size_t decode_smem_bytes() {
  return sizeof(uint16_t) * 2 * 2 * kWarps * kDecodeKeys * HEAD_DIM;  // two stages of K and V tiles
}

template <int HEAD_DIM>
constexpr size_t smem_bytes() {
  return sizeof(uint16_t) * 4 * kKeys * HEAD_DIM;  // K and V, two stages
}

// The shared-memory opt-in is a setting of each device's context: made once per device (by
// prepare_prefill_attention() before any graph capture, or at the first launch).
template <typename T, int HEAD_DIM>
bool opt_in_kernels() {
  const int decode_smem = static_cast<int>(decode_smem_bytes<HEAD_DIM>());
  const int prefill_smem = static_cast<int>(smem_bytes<HEAD_DIM>());
  return cudaFuncSetAttribute(prefill_attention_kernel<T, HEAD_DIM, true>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, prefill_smem) == cudaSuccess &&
         cudaFuncSetAttribute(prefill_attention_kernel<T, HEAD_DIM, false>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, prefill_smem) == cudaSuccess &&
         cudaFuncSetAttribute(decode_attention_tc_kernel<T, HEAD_DIM>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, decode_smem) == cudaSuccess &&
         cudaFuncSetAttribute(decode_attention_balanced_kernel<T, HEAD_DIM>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, decode_smem) == cudaSuccess;
}

template <int HEAD_DIM>
Status opt_in() {
  static std::array<std::atomic<bool>, 64> done{};
  const int device = current_device();
  if (device < 64 && done[static_cast<size_t>(device)].load(std::memory_order_acquire)) return ok_status();
  if (!opt_in_kernels<Bf16, HEAD_DIM>() || !opt_in_kernels<F16, HEAD_DIM>()) {
    (void)cudaGetLastError();
    return internal_error("prefill_attention: cannot reserve shared memory");
  }
  if (device < 64) done[static_cast<size_t>(device)].store(true, std::memory_order_release);
  return ok_status();
}

// The balanced decode form's grid: the CTAs the current device holds at once (0 where unknown).
template <typename T, int HEAD_DIM>
int64_t balanced_ctas() {
  static std::array<std::atomic<int>, 64> per_sm{};
  const int device = current_device();
  int n = device < 64 ? per_sm[static_cast<size_t>(device)].load(std::memory_order_acquire) : 0;
  if (n == 0) {
    if (!opt_in<HEAD_DIM>().ok() || cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                        &n, decode_attention_balanced_kernel<T, HEAD_DIM>, kThreads,
                                        decode_smem_bytes<HEAD_DIM>()) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    if (device < 64) per_sm[static_cast<size_t>(device)].store(n, std::memory_order_release);
  }
  return int64_t{n} * current_multiprocessors();
}

// NOTE: the decode form handles up to 16 rows, but groups above 8 are not tested: they take the
// general form, as do block sizes that are not powers of two.
bool decode_form(const PrefillAttentionArgs& a) {
  return a.max_chunk_len == 1 && a.kv.num_kv_heads > 0 && a.num_heads / a.kv.num_kv_heads <= 8 &&
         a.kv.block_size > 0 && (a.kv.block_size & (a.kv.block_size - 1)) == 0;
}

std::atomic<int32_t> g_decode_balance_keys{kDefaultDecodeBalanceKeys};
std::atomic<bool> g_prefill_wgmma{true};

// Whether the general form runs on Hopper's warpgroup MMA (prefill_attention_sm90a.cu) here, for
// heads of head_dim values (64 or 128; on a single tile of keys it gives this file's bits).
bool wgmma_form(int32_t head_dim) {
#ifdef PDSERVE_CUDA_SM90A
  return (head_dim == 64 || head_dim == 128) && g_prefill_wgmma.load(std::memory_order_relaxed) &&
         sm90a::prefill_attention_runs_here();
#else
  (void)head_dim;
  return false;
#endif
}
std::atomic<double> g_decode_tc_pairs_per_sm{kDefaultDecodeTensorCorePairsPerSm};

// The balanced form's grid for these shapes; 0 where the decode form is not balanced.
int64_t balanced_grid(const PrefillAttentionArgs& a) {
  if (!decode_form(a) || g_decode_balance_keys.load(std::memory_order_relaxed) <= 0) return 0;
  return with_dtype(a.kv.dtype, [&](auto t) {
    using T = decltype(t);
    return a.kv.head_dim == 64 ? balanced_ctas<T, 64>() : balanced_ctas<T, 128>();
  });
}

size_t balanced_workspace_bytes(const PrefillAttentionArgs& a, int64_t grid) {
  // Two parts a CTA, a group of rows each: weighted V, then (base, sum).
  return sizeof(float) * static_cast<size_t>(grid) * 2 *
         static_cast<size_t>(a.num_heads / a.kv.num_kv_heads) * static_cast<size_t>(a.kv.head_dim + 2);
}

template <typename T, int HEAD_DIM>
Status launch(const PrefillAttentionArgs& a, StreamHandle stream) {
  constexpr size_t smem = smem_bytes<HEAD_DIM>();
  PD_RETURN_IF_ERROR(opt_in<HEAD_DIM>());
  const int group = a.num_heads / a.kv.num_kv_heads;
  if (decode_form(a)) {
    const int32_t keys = g_decode_balance_keys.load(std::memory_order_relaxed);  // read once
    const int64_t grid = keys > 0 ? balanced_grid(a) : 0;
    if (grid > 0 && a.workspace != nullptr && a.split_counters != nullptr &&
        a.workspace_bytes >= balanced_workspace_bytes(a, grid)) {
      const int min_units =
          static_cast<int>(std::max<int64_t>(1, (int64_t{keys} + kRoundKeys - 1) / kRoundKeys));
      return launch_programmatic("prefill_attention (decode, balanced)",
                                 decode_attention_balanced_kernel<T, HEAD_DIM>,
                                 dim3(static_cast<unsigned>(grid)), dim3(kThreads),
                                 decode_smem_bytes<HEAD_DIM>(), stream, a, min_units);
    }
    const dim3 grid1(1, static_cast<unsigned>(a.kv.num_kv_heads), static_cast<unsigned>(a.num_chunks));
    return launch_programmatic("prefill_attention (decode)", decode_attention_tc_kernel<T, HEAD_DIM>, grid1,
                               dim3(kThreads), decode_smem_bytes<HEAD_DIM>(), stream, a);
  }
#ifdef PDSERVE_CUDA_SM90A
  if (wgmma_form(HEAD_DIM)) return sm90a::prefill_attention(a, stream);
#endif
  const dim3 grid(static_cast<unsigned>((int64_t{a.max_chunk_len} * group + kRows - 1) / kRows),
                  static_cast<unsigned>(a.kv.num_kv_heads), static_cast<unsigned>(a.num_chunks));
  if ((a.kv.block_size & (a.kv.block_size - 1)) == 0)
    return launch_programmatic("prefill_attention", prefill_attention_kernel<T, HEAD_DIM, true>, grid,
                               dim3(kThreads), smem, stream, a);
  return launch_programmatic("prefill_attention", prefill_attention_kernel<T, HEAD_DIM, false>, grid,
                             dim3(kThreads), smem, stream, a);
}

}  // namespace

void set_decode_balance_keys(int32_t min_keys) {
  g_decode_balance_keys.store(min_keys, std::memory_order_relaxed);
}

bool decode_step_uses_tensor_cores(int64_t pairs, int32_t max_keys, int32_t block_size) {
  if (max_keys > 8192 || block_size <= 0 || (block_size & (block_size - 1)) != 0) return false;
  // One CTA a pair: only where the pairs fill the GPU twice over.
  const double per_sm = g_decode_balance_keys.load(std::memory_order_relaxed) > 0
                            ? g_decode_tc_pairs_per_sm.load(std::memory_order_relaxed)
                            : 2.0;
  return static_cast<double>(pairs) >= per_sm * current_multiprocessors();
}

void set_decode_tensor_core_pairs_per_sm(double pairs_per_sm) {
  g_decode_tc_pairs_per_sm.store(pairs_per_sm, std::memory_order_relaxed);
}

size_t prefill_attention_workspace_bytes(const PrefillAttentionArgs& a) {
  if (a.kv.num_kv_heads <= 0 || (a.kv.head_dim != 64 && a.kv.head_dim != 128)) return 0;
  const int64_t grid = balanced_grid(a);
  return grid > 0 ? balanced_workspace_bytes(a, grid) : 0;
}

void set_prefill_attention_wgmma(bool allowed) { g_prefill_wgmma.store(allowed, std::memory_order_relaxed); }

bool prefill_attention_uses_wgmma(int32_t head_dim) { return wgmma_form(head_dim); }

Status prepare_prefill_attention() {
  PD_RETURN_IF_ERROR(opt_in<64>());
  PD_RETURN_IF_ERROR(opt_in<128>());
  (void)wgmma_form(128);  // its per-device settings, before any capture
  return ok_status();
}

Status prefill_attention(const PrefillAttentionArgs& a, StreamHandle stream) {
  if (a.num_chunks == 0 || a.max_chunk_len == 0) return ok_status();
  const PagedKv& kv = a.kv;
  if (kv.num_kv_heads <= 0 || a.num_heads % kv.num_kv_heads != 0)
    return invalid_argument("prefill_attention: num_heads must be a positive multiple of num_kv_heads");
  if (kv.head_dim != 64 && kv.head_dim != 128)
    return unimplemented("prefill_attention: head_dim must be 64 or 128");
  if (kv.block_size <= 0) return invalid_argument("prefill_attention: block_size must be positive");
  if (a.num_chunks > 65535) return invalid_argument("prefill_attention: more than 65535 chunks in one call");
  const int64_t q_stride = a.q_stride != 0 ? a.q_stride : int64_t{a.num_heads} * kv.head_dim;
  if (q_stride % 2 != 0 || reinterpret_cast<uintptr_t>(a.q) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(a.out) % 4 != 0 || reinterpret_cast<uintptr_t>(kv.k) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(kv.v) % 16 != 0 || reinterpret_cast<uintptr_t>(a.workspace) % 16 != 0)
    return invalid_argument(
        "prefill_attention: q and out must be 4-byte aligned, k, v and the workspace 16-byte aligned");
  return with_dtype(kv.dtype, [&](auto t) {
    using T = decltype(t);
    if (kv.head_dim == 64) return launch<T, 64>(a, stream);
    return launch<T, 128>(a, stream);
  });
}

}  // namespace pdserve::cuda

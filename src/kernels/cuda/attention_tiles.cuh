// Device code shared by the attention kernels on tensor cores (internal to src/kernels/cuda):
// prefill_attention.cu (mma.sync, every GPU from sm_80) and prefill_attention_sm90a.cu (Hopper's
// warpgroup MMA). The tile shapes, the asynchronous copies, one warp's online-softmax state and
// the copier that gathers K/V tiles from the paged cache.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/device_util.cuh"
#include "kernels/cuda/ops.h"

namespace pdserve::cuda::attention_tiles {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 16;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per CTA
constexpr int kKeys = 64;                     // keys per tile

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, asynchronously; with `valid` false the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix from a shared-memory address (smem_addr).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 2^x in one instruction; results below 2^-126 flush to zero (softmax weights that small do not
// matter), -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// d += a · b for one m16n8k16 tile (T: bf16 or fp16 in, float accumulators).
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (T::kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Shared-memory tiles: a row of HEAD_DIM values is HEAD_DIM/8 chunks of 16 bytes; chunk c of row r is
// stored at chunk c ^ (r % 8), so the 8 rows an ldmatrix reads fall in 8 different bank groups.

// One warp's part of attention: 16 query rows (lane holds rows lane/4, "lo", and lane/4 + 8, "hi"),
// their Q fragments, and the online softmax state (m, l in the log2 domain; O in registers).
template <typename T, int HEAD_DIM>
struct WarpAttention {
  static constexpr int kSteps = HEAD_DIM / 16;    // k-steps of Q·Kᵀ
  static constexpr int kDimTiles = HEAD_DIM / 8;  // n-tiles of O
  uint32_t qf[kSteps][4];
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0, l_hi = 0;
  float o[kDimTiles][4];

  // Q fragments (A operand, 16 × HEAD_DIM) straight from global memory; a null row reads zeros.
  __device__ __forceinline__ void load_q(const uint16_t* q_lo, const uint16_t* q_hi, int lane) {
    const int col = (lane % 4) * 2;
    auto ld = [](const uint16_t* p, int c) {
      return p != nullptr ? *reinterpret_cast<const uint32_t*>(p + c) : 0u;
    };
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      qf[s][0] = ld(q_lo, s * 16 + col);
      qf[s][1] = ld(q_hi, s * 16 + col);
      qf[s][2] = ld(q_lo, s * 16 + col + 8);
      qf[s][3] = ld(q_hi, s * 16 + col + 8);
    }
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0;
  }

  // The online softmax of a tile's S (16 rows × KEYS keys, the mma fragment layout, the first key
  // `key_base`): keys at or past a row's limit masked where the tile reaches past `full_keys`
  // (see tile()), S becomes the weights P, l is rescaled to the rows' new maxima, and O's factors
  // for them are returned in corr_lo and corr_hi (rescale_o(); before this tile's P·V). Both prefill
  // kernels scale S by a multiply of its own, so that on a single tile they give the same bits
  // (scaling inside the exponent's FMA instead, one rounding less, changed the model's parity
  // figures: docs/perf/gpu-kernel-notes.md, ninth round).
  template <int KEYS>
  __device__ __forceinline__ void softmax(float (&s)[KEYS / 8][4], int key_base, int limit_lo, int limit_hi,
                                          int full_keys, float scale_log2, int lane, float& corr_lo,
                                          float& corr_hi) {
    // Mask (a tile that reaches past full_keys), then the online softmax of rows lo and hi.
    float tmax_lo = -INFINITY, tmax_hi = -INFINITY;
    if (key_base + KEYS > full_keys) {
      const int key0 = key_base + (lane % 4) * 2;
#pragma unroll
      for (int n = 0; n < KEYS / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = key0 + n * 8 + e;
          s[n][e] = key < limit_lo ? s[n][e] * scale_log2 : -INFINITY;
          s[n][2 + e] = key < limit_hi ? s[n][2 + e] * scale_log2 : -INFINITY;
          tmax_lo = fmaxf(tmax_lo, s[n][e]);
          tmax_hi = fmaxf(tmax_hi, s[n][2 + e]);
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < KEYS / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[n][e] *= scale_log2;
          s[n][2 + e] *= scale_log2;
          tmax_lo = fmaxf(tmax_lo, s[n][e]);
          tmax_hi = fmaxf(tmax_hi, s[n][2 + e]);
        }
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      tmax_lo = fmaxf(tmax_lo, __shfl_xor_sync(0xffffffffu, tmax_lo, off));
      tmax_hi = fmaxf(tmax_hi, __shfl_xor_sync(0xffffffffu, tmax_hi, off));
    }
    const float new_lo = fmaxf(m_lo, tmax_lo), new_hi = fmaxf(m_hi, tmax_hi);
    // A row with no visible key yet keeps m = -inf; its base is 0 so nothing becomes NaN.
    const float base_lo = new_lo == -INFINITY ? 0.0f : new_lo;
    const float base_hi = new_hi == -INFINITY ? 0.0f : new_hi;
    corr_lo = fast_exp2(m_lo - base_lo);
    corr_hi = fast_exp2(m_hi - base_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    float sum_lo = 0, sum_hi = 0;
#pragma unroll
    for (int n = 0; n < KEYS / 8; ++n) {
      s[n][0] = fast_exp2(s[n][0] - base_lo);
      s[n][1] = fast_exp2(s[n][1] - base_lo);
      s[n][2] = fast_exp2(s[n][2] - base_hi);
      s[n][3] = fast_exp2(s[n][3] - base_hi);
      sum_lo += s[n][0] + s[n][1];
      sum_hi += s[n][2] + s[n][3];
    }
    l_lo = l_lo * corr_lo + sum_lo;  // per-thread partial sums; finish() folds the quad
    l_hi = l_hi * corr_hi + sum_hi;
  }

  // O *= the rows' factors; nothing where every row of the warp keeps its maximum (a factor of 1:
  // the same bits), as most tiles of a long prompt do.
  __device__ __forceinline__ void rescale_o(float corr_lo, float corr_hi) {
    if (__all_sync(0xffffffffu, corr_lo == 1.0f && corr_hi == 1.0f)) return;
#pragma unroll
    for (int t = 0; t < kDimTiles; ++t) {
      o[t][0] *= corr_lo;
      o[t][1] *= corr_lo;
      o[t][2] *= corr_hi;
      o[t][3] *= corr_hi;
    }
  }

  // One tile of KEYS keys from shared memory (kt, vt: KEYS swizzled rows), the first being key
  // `key_base`: S = Q·Kᵀ, keys at or past a row's limit masked, the online softmax, O += P·V.
  // `full_keys` (the same in the whole warp): every row whose output is kept sees the keys below
  // it, so a tile below it is not masked (rows whose output is dropped then see keys past their
  // limit).
  template <int KEYS>
  __device__ __forceinline__ void tile(const uint16_t* kt, const uint16_t* vt, int key_base, int limit_lo,
                                       int limit_hi, int full_keys, float scale_log2, int lane) {
    // Fragment addresses. In every fragment a lane reads rows with row % 8 == lane % 8, so the
    // swizzle is an XOR of the step on a per-lane offset, and each ldmatrix an immediate offset
    // from one of a few addresses. K: keys n2·16 + (0..7 | 8..15) × dims ks·16 + (0..7 | 8..15),
    // chunk 2·ks + (mat & 1), at byte n2·16·kRowBytes + (k_off ^ (ks << 5)). V: keys kk·16 + (0..7
    // | 8..15) × dims d2·16 + (0..7 | 8..15), chunk 2·d2 + (mat >> 1), at kk·16·kRowBytes + (v_off
    // ^ (d2 << 5)). (The XOR stays within the chunk bits, 4 up to 6 or 7, below the row's.)
    constexpr uint32_t kRowBytes = HEAD_DIM * 2;
    const uint32_t l7 = lane & 7, mat = lane >> 3;
    const uint32_t k_off = ((mat >> 1) * 8 + l7) * kRowBytes + (((mat & 1) ^ l7) << 4);
    const uint32_t v_off = ((mat & 1) * 8 + l7) * kRowBytes + (((mat >> 1) ^ l7) << 4);
    const uint32_t k_smem = smem_addr(kt), v_smem = smem_addr(vt);
    // S: 16 rows × KEYS keys as n-tiles of 8 keys. Four 8×8 matrices per ldmatrix.
    float s[KEYS / 8][4];
#pragma unroll
    for (int n = 0; n < KEYS / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const uint32_t k_at = k_smem + (k_off ^ (static_cast<uint32_t>(ks) << 5));
#pragma unroll
      for (int n2 = 0; n2 < KEYS / 16; ++n2) {
        uint32_t b[4];
        ldmatrix_x4(b, k_at + n2 * 16 * kRowBytes);
        mma16816<T>(s[2 * n2], qf[ks], b[0], b[1]);
        mma16816<T>(s[2 * n2 + 1], qf[ks], b[2], b[3]);
      }
    }
    float corr_lo, corr_hi;
    softmax<KEYS>(s, key_base, limit_lo, limit_hi, full_keys, scale_log2, lane, corr_lo, corr_hi);
    rescale_o(corr_lo, corr_hi);
    // O += P · V: P as the A operand (16 rows × 16 keys per k-step, from two S n-tiles); V through
    // transposed ldmatrix: keys kk·16 + (0..7 | 8..15) × dims d2·16 + (0..7 | 8..15).
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; ++kk) {
      uint32_t p[4];
      p[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      p[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      p[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int d2 = 0; d2 < kDimTiles / 2; ++d2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_smem + (v_off ^ (static_cast<uint32_t>(d2) << 5)) + kk * 16 * kRowBytes);
        mma16816<T>(o[2 * d2], p, b[0], b[1]);
        mma16816<T>(o[2 * d2 + 1], p, b[2], b[3]);
      }
    }
  }

  // Writes rows lo and hi of O / l in 16 bits at out_lo and out_hi (null: not written), after
  // finish().
  __device__ __forceinline__ void store(uint16_t* out_lo, uint16_t* out_hi, int lane) const {
    auto one = [&](uint16_t* out, int half, float l) {
      if (out == nullptr) return;
      out += (lane % 4) * 2;
      const float inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
      for (int t = 0; t < kDimTiles; ++t)
        *reinterpret_cast<uint32_t*>(out + t * 8) = pack2<T>(o[t][2 * half] * inv, o[t][2 * half + 1] * inv);
    };
    one(out_lo, 0, l_lo);
    one(out_hi, 1, l_hi);
  }

  // Folds each row's l over the quad of lanes that hold it (after the last tile).
  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
      l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
  }
};

// The query rows of one (chunk, kv head) pair: row r is the chunk's token r / group with the query
// head kv_head · group + r % group; rows at or past `rows` are padding (null pointers).
template <int HEAD_DIM>
struct ChunkRows {
  const uint16_t* q_base;
  uint16_t* out_base;
  int num_heads, kv_head, group, rows, q_start;
  int64_t q_stride;

  // Copies what it needs from the arguments (no reference to the kernel's parameter space).
  __device__ __forceinline__ ChunkRows(const PrefillAttentionArgs& a, int chunk, int head)
      : q_base(a.q), out_base(a.out), num_heads(a.num_heads), kv_head(head) {
    group = a.num_heads / a.kv.num_kv_heads;
    rows = a.chunk_len[chunk] * group;
    q_start = a.chunk_q_start[chunk];
    q_stride = a.q_stride != 0 ? a.q_stride : int64_t{a.num_heads} * HEAD_DIM;
  }
  __device__ __forceinline__ const uint16_t* q(int r) const {
    return r < rows ? q_base + int64_t{q_start + r / group} * q_stride +
                          int64_t{kv_head * group + r % group} * HEAD_DIM
                    : nullptr;
  }
  __device__ __forceinline__ uint16_t* out(int r) const {
    return r < rows ? out_base +
                          (int64_t{q_start + r / group} * num_heads + kv_head * group + r % group) * HEAD_DIM
                    : nullptr;
  }
};

// Copies kTileKeys (default kKeys) consecutive key rows, by kCopyThreads threads, of one (chunk, kv
// head) pair's K and V from the paged cache into shared memory as swizzled tiles (cp.async; the caller
// commits them, or has them arrive on a barrier); keys at or past key_end are zero-filled. Thread t
// copies 16-byte chunk t % kChunks of rows r0 = t / kChunks, r0 + kRowStep, ...: all with the same
// row % 8, so the same swizzled chunk. kPow2Blocks: the block size is a
// power of two (a key's block and row by shift and mask, not a division). The tiles are
// [kTileKeys][HEAD_DIM] (chunk c of row r at c ^ (r % 8), for ldmatrix), or with kHalves
// [HEAD_DIM / 64][kTileKeys][64]: 128-byte rows, chunk c of row r at c ^ (r % 8) — the 128-byte
// swizzle of Hopper's warpgroup MMA, whose tiles must start at 1024-byte boundaries. The two are
// the same at head_dim 64.
template <int HEAD_DIM, bool kPow2Blocks, bool kHalves = false, int kTileKeys = kKeys,
          int kCopyThreads = kThreads>
struct KeyTileCopier {
  static constexpr int kChunks = HEAD_DIM / 8;
  static constexpr int kRowValues = kHalves ? 64 : HEAD_DIM;  // a row of a tile, in values
  static constexpr int kRowStep = kCopyThreads / kChunks;
  static_assert(kRowStep % 8 == 0 && kTileKeys % kRowStep == 0, "a thread's rows must share row % 8");
  const int32_t* table;
  const uint16_t* k_at;
  const uint16_t* v_at;
  int64_t block_stride;
  int bs, bs_shift, r0, swizzled;

  // `thread`: this thread's index among the copying ones (by default threadIdx.x: the CTA's first).
  __device__ __forceinline__ KeyTileCopier(const PrefillAttentionArgs& a, int chunk, int kv_head,
                                           int thread = -1) {
    if (thread < 0) thread = static_cast<int>(threadIdx.x);
    const int c = thread % kChunks;
    bs = a.kv.block_size;
    bs_shift = __ffs(bs) - 1;  // used with kPow2Blocks only
    r0 = thread / kChunks;
    swizzled = kHalves ? (c / 8) * kTileKeys * 64 + ((c % 8) ^ (r0 & 7)) * 8 : (c ^ (r0 & 7)) * 8;
    table = a.block_tables + int64_t{chunk} * a.max_blocks_per_seq;
    const int64_t head_block = int64_t{bs} * HEAD_DIM;  // one head's rows of a block
    block_stride = int64_t{a.kv.num_kv_heads} * head_block;
    k_at = a.kv.k + int64_t{kv_head} * head_block + c * 8;
    v_at = a.kv.v + int64_t{kv_head} * head_block + c * 8;
  }

  __device__ __forceinline__ void copy(uint16_t* k_tile, uint16_t* v_tile, int key0, int key_end) const {
#pragma unroll
    for (int i = 0; i < kTileKeys / kRowStep; ++i) {
      const int row = r0 + i * kRowStep;
      const int key = key0 + row;
      const bool valid = key < key_end;
      const int block = kPow2Blocks ? key >> bs_shift : key / bs;
      const int in_block = kPow2Blocks ? key & (bs - 1) : key - block * bs;
      const int64_t off = valid ? table[block] * block_stride + int64_t{in_block} * HEAD_DIM : 0;
      const int at = row * kRowValues + swizzled;
      cp_async16(k_tile + at, k_at + off, valid);
      cp_async16(v_tile + at, v_at + off, valid);
    }
  }
};

}  // namespace pdserve::cuda::attention_tiles

// Kernels of the CUDA backend. Know nothing of requests or models: device pointers, shapes and
// units in the signatures. 16-bit values travel as their raw bits (uint16_t), bf16 unless a
// `Dtype` (runtime.h) says fp16; the residual stream and norm weights are float. Every op is enqueued on
// `stream` and returns at once; the Status reports a launch that could not be made (bad shape, bad
// configuration), while a fault during execution shows at the next synchronisation. Includes no CUDA header.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "kernels/cuda/runtime.h"

namespace pdserve::cuda {

// Whether this build holds code the current device can run (false: built for other GPUs).
bool kernels_built_for_current_device();

// y[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, for `rows` rows of n floats; y in `dtype`. It may
// read w before the kernel ahead of it in the stream has ended (device_util.cuh): that kernel must
// not write w.
Status rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t n, uint16_t* y,
                StreamHandle stream, Dtype dtype = Dtype::kBf16);

// out[r][i] = silu(gate_up[r][i]) · gate_up[r][n + i] in `dtype`: float rows of 2n (gate, then up)
// to rows of n.
Status silu_mul(const float* gate_up, int64_t rows, int64_t n, uint16_t* out, StreamHandle stream,
                Dtype dtype = Dtype::kBf16);

// out[r] = table[tokens[r]] (rows of n values in `dtype`) widened to float. Token ids outside
// [0, vocab) give rows of NaN, so a bad id cannot read outside the table and does not pass unnoticed.
Status embedding(const uint16_t* table, int64_t vocab, const int32_t* tokens, int64_t rows, int64_t n,
                 float* out, StreamHandle stream, Dtype dtype = Dtype::kBf16);

// out[r] = in[index[r]], rows of n 16-bit values.
Status gather_rows(const uint16_t* in, int64_t n, const int32_t* index, int64_t rows, uint16_t* out,
                   StreamHandle stream);

// Pseudo-random values, uniform in [mean - scale, mean + scale], the same for the same seed
// (synthetic weights and benchmark inputs, made on the GPU).
Status fill_uniform(uint16_t* x, int64_t n, float mean, float scale, uint64_t seed, Dtype dtype,
                    StreamHandle stream);
inline Status fill_uniform_bf16(uint16_t* x, int64_t n, float mean, float scale, uint64_t seed,
                                StreamHandle stream) {
  return fill_uniform(x, n, mean, scale, seed, Dtype::kBf16, stream);
}
Status fill_uniform_f32(float* x, int64_t n, float mean, float scale, uint64_t seed, StreamHandle stream);

// out[r] = the index of the largest of vocab logits in row r (the lowest index among equals).
// `workspace` holds argmax_workspace_bytes(rows) bytes of device memory (8-byte aligned), zero
// before the first call (zero-fill it once when allocating; every call leaves it zero; the bytes
// of fewer rows are a prefix of those of more). Calls running at the same time need their own.
size_t argmax_workspace_bytes(int64_t rows);
Status argmax(const float* logits, int64_t rows, int64_t vocab, void* workspace, size_t workspace_bytes,
              int32_t* out, StreamHandle stream);

// One row's draw (device memory, one per row): temperature 0 keeps the row as it is (greedy).
// top_k, top_p and min_p truncate it (kernels/truncation.h; sample_truncated only).
struct SampleDraw {
  float temperature = 0.0f;
  uint64_t seed = 0;
  uint64_t counter = 0;
  int32_t top_k = 0;   // 0: off
  float top_p = 1.0f;  // 1: off
  float min_p = 0.0f;  // 0: off
};
// Gumbel-max sampling (kernels/gumbel.h): replaces each logit of a row whose temperature is > 0
// by gumbel_key(), so that argmax() then draws from softmax(logits / T). In place.
Status gumbel_perturb(float* logits, int64_t rows, int64_t vocab, const SampleDraw* draws,
                      StreamHandle stream);
// out[r] = row r's token as kernels/truncation.h defines it: a Gumbel-max draw among the
// candidates top-k, top-p and min-p keep (the same bits as the host Sampler's, up to logf's last
// bit), or the argmax where the temperature is 0. A cluster of up to 8 CTAs per row; the logits
// are left as they are. Up to 2^22 - 1 tokens a row; UNIMPLEMENTED before compute capability 9.0.
Status sample_truncated(const float* logits, int64_t rows, int64_t vocab, const SampleDraw* draws,
                        int32_t* out, StreamHandle stream);

// After a draw (argmax, gumbel_perturb + argmax, or sample_truncated) over `values` (the logits, or
// the Gumbel keys gumbel_perturb left in their place): tokens[r] becomes -1 where the value at the
// drawn token is NaN or -inf, which happens only when no token of the row had a usable value (NaN
// ranks lowest): the forward pass overflowed or the weights hold NaN. Tokens outside [0, vocab) are
// left as they are.
Status mark_unusable_draws(const float* values, int64_t rows, int64_t vocab, int32_t* tokens,
                           StreamHandle stream);

// One layer's paged KV cache, heads outermost within a block: block b, kv head h, row r (of
// block_size) holds head_dim values (`dtype`) at k + ((b·num_kv_heads + h)·block_size + r)·head_dim,
// and the same for V; the attention kernels read their queries and write their outputs in the same
// format. One head's rows of a block are contiguous, so decode attention, which reads
// one kv head per CTA, streams whole block_size·head_dim runs.
struct PagedKv {
  uint16_t* k = nullptr;
  uint16_t* v = nullptr;
  int32_t block_size = 16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  Dtype dtype = Dtype::kBf16;
};

// Writes the K and V rows of `tokens` tokens (k_rows/v_rows: row r at r·row_stride, num_kv_heads
// × head_dim values) to cache slots slots[r] = block · block_size + row in block.
Status write_kv(const uint16_t* k_rows, const uint16_t* v_rows, int64_t row_stride, const int32_t* slots,
                int64_t tokens, const PagedKv& kv, StreamHandle stream);

// A whole paged KV cache: layer l's K blocks at base + l·layer_stride, its V blocks v_offset values
// further, each laid out as PagedKv says ([block][kv head][row][head_dim], 16-bit values: moved as
// bits, whichever format).
struct PagedKvCache {
  uint16_t* base = nullptr;
  int32_t num_layers = 0;
  int64_t layer_stride = 0;  // values
  int64_t v_offset = 0;      // values
  int32_t block_size = 16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t row_values() const { return int64_t{num_kv_heads} * head_dim; }
  // Bytes of `tokens` tokens' K and V, all layers: what one request's KV is on the wire.
  int64_t bytes(int64_t tokens) const { return 2 * int64_t{num_layers} * tokens * row_values() * 2; }
};

// The KV of one sequence's first `tokens` tokens, whose blocks are block_table (device memory),
// between the paged cache and one contiguous buffer in the wire order of the KV transfer (layer by
// layer, K then V, token rows of num_kv_heads × head_dim; docs/decisions/kv-wire.md).
// gather_kv fills `wire` from the cache; scatter_kv writes the cache from `wire`, which may be
// another GPU's memory (peer access) — the RecvScatter of a transfer. 16-byte aligned buffers,
// head_dim a multiple of 8.
Status gather_kv(const PagedKvCache& cache, const int32_t* block_table, int64_t tokens, uint16_t* wire,
                 StreamHandle stream);
Status scatter_kv(const uint16_t* wire, const PagedKvCache& cache, const int32_t* block_table, int64_t tokens,
                  StreamHandle stream);

// Rotary embedding and the KV-cache write of one layer, fused. Row r of qkv (float, ld values
// apart) holds the projections q | k | v (num_heads, then 2 × kv.num_kv_heads heads of
// kv.head_dim), to which bias (that many floats) is added when not null. q and k are rotated by
// angles positions[r] · inv_freq[i], i < rope_dim/2 (inv_freq in device memory; values past
// rope_dim in a head are kept); neox: pairs (i, i + rope_dim/2), otherwise (2i, 2i+1). q goes to
// q_out (rows of num_heads × head_dim), k and v to cache slot slots[r] (see write_kv), in kv.dtype.
struct RopeQkvArgs {
  const float* qkv = nullptr;
  int64_t ld = 0;
  const float* bias = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* slots = nullptr;
  int64_t rows = 0;
  int32_t num_heads = 0;
  int32_t rope_dim = 0;
  bool neox = true;
  const float* inv_freq = nullptr;
  uint16_t* q_out = nullptr;
  PagedKv kv;
};
Status rope_qkv(const RopeQkvArgs& args, StreamHandle stream);

// Decode attention, one query token per sequence, split over the keys (flash-decoding):
// out[s][h] = softmax(scale · q[s][h]·Kᵀ) · V over the seq_lens[s] keys of sequence s, whose
// blocks are block_tables[s·max_blocks_per_seq ...]. q and out are [num_seqs][num_heads][head_dim]
// in kv.dtype (q rows q_stride values apart, out rows packed; q, k and v 16-byte aligned, out 8-byte).
// num_heads is a multiple of num_kv_heads, at most 8 query heads per kv head; head_dim is 64 or 128.
// `workspace` holds decode_attention_workspace_bytes(args) bytes of device memory; where that is not 0 (the
// keys are split), split_counters holds num_seqs × num_kv_heads int32 that are zero before the first call
// (zero-fill them once when allocating; every call leaves them zero). Calls running at the same
// time need their own counters. A sequence longer than max_seq_len gets NaN outputs.
struct DecodeAttentionArgs {
  const uint16_t* q = nullptr;
  int64_t q_stride = 0;  // values from one sequence's q to the next; 0: num_heads × head_dim
  int32_t num_seqs = 0;
  int32_t num_heads = 0;
  PagedKv kv;
  const int32_t* block_tables = nullptr;
  int32_t max_blocks_per_seq = 0;
  const int32_t* seq_lens = nullptr;
  int32_t max_seq_len = 0;  // an upper bound of seq_lens (sizes the split)
  float scale = 1.0f;
  uint16_t* out = nullptr;
  int32_t* split_counters = nullptr;
};
// Workspace for these shapes (pointers in `args` are not read); 0 when one split suffices.
size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& args);
// The CTAs an SM decode_attention's split aims at (default 2): the largest partition of a
// sequence's keys (at least 64) whose grid still has this many CTAs an SM. Process-wide, read
// when a launch is made or captured (and by decode_attention_workspace_bytes); pdserve_gpu_bench
// compares.
void set_decode_split_ctas_per_sm(double ctas_per_sm);
Status decode_attention(const DecodeAttentionArgs& args, void* workspace, size_t workspace_bytes,
                        StreamHandle stream);

// Matrix–vector products for 1 to kGemvMaxRows rows (small decode batches), bandwidth-bound on w:
// y[m][n] = x'[m] · w[n]ᵀ with w [n][k] and x' either the rows `xb` ([m][k]) or, with `norm_w`, the
// float rows `x` normalised as rms_norm does (rounded the same way), so no separate norm runs; w,
// xb and swiglu_out in `dtype`. With `accumulate`, y += the product (an output projection's residual add).
// y is float, rows ldy apart (0: n). k a multiple of 8; x, xb, w, norm_w 16-byte aligned.
// With `swiglu_out` instead of y, w holds 2n rows (gate rows, then up rows) and the result is
// swiglu_out[m][i] = silu(gate) · up, as silu_mul computes it from the float products.
// With one activation row, rows_per_warp × depth (1 × 2, 1 × 4, 2 × 1, 2 × 2, 4 × 1, 4 × 2; 0:
// the default 2 × 1) is the work a warp has in flight: weight rows × 16-byte pieces of each (with
// SwiGLU an even number of rows: gate rows and their up rows); which is fastest depends on the
// matrix's shape (pdserve_gpu_bench's gemv section measures them).
constexpr int64_t kGemvMaxRows = 8;
// The most rows a model step sends through gemv rather than cuBLAS (0 to kGemvMaxRows; default
// kDefaultGemvMaxRows). Process-wide, read when a step is launched or captured; pdserve_gpu_bench
// --gemv-max-rows compares. One row by default: on an H200 decode steps of 2 to 8 sequences ran at
// 32-63 % of the floor through gemv and at 74-77 % through cuBLAS (docs/perf/gpu.md), while one
// row is fastest through gemv.
constexpr int64_t kDefaultGemvMaxRows = 1;
void set_gemv_max_rows(int64_t rows);
int64_t gemv_max_rows();
struct GemvArgs {
  const float* x = nullptr;
  const float* norm_w = nullptr;
  float eps = 1e-5f;
  const uint16_t* xb = nullptr;
  const uint16_t* w = nullptr;
  int64_t m = 0, n = 0, k = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
  uint16_t* swiglu_out = nullptr;
  Dtype dtype = Dtype::kBf16;
  int rows_per_warp = 0, depth = 0;  // one activation row only; more rows take the default
  // One activation row and K a multiple of 2048 (at most 16384): each row's K split over the 8
  // warps of a CTA instead (rows_per_warp and depth then unused); otherwise ignored. Not with
  // swiglu_out.
  bool split_k = false;
  // Rows a CTA of the split-K form takes: 1, 2, 4, 8 (K ≤ 8192) or 16 (K ≤ 4096); 0: 16 pieces a
  // lane (16, 8, 4 or 2 rows by K).
  int split_k_rows = 0;
};
Status gemv(const GemvArgs& args, StreamHandle stream);

// Prefill attention on tensor cores, causal, over the paged cache (FlashAttention-2 style): for
// each chunk c, its chunk_len[c] query tokens (rows chunk_q_start[c]... of q and out, in
// kv.dtype, [token][num_heads][head_dim], q rows q_stride values apart) attend to the keys of positions
// [0, chunk_first_pos[c] + t] — the cached prefix and the chunk's own tokens up to themselves,
// all already written to the cache — through block table row c (max_blocks_per_seq wide).
// head_dim 64 or 128; any number of query heads per kv head. Per-chunk arrays in device memory.
struct PrefillAttentionArgs {
  const uint16_t* q = nullptr;
  int64_t q_stride = 0;  // 0: num_heads × head_dim
  int32_t num_heads = 0;
  PagedKv kv;
  int32_t num_chunks = 0;
  const int32_t* chunk_q_start = nullptr;
  const int32_t* chunk_len = nullptr;
  const int32_t* chunk_first_pos = nullptr;
  const int32_t* block_tables = nullptr;
  int32_t max_blocks_per_seq = 0;
  int32_t max_chunk_len = 0;  // the longest chunk_len (sizes the grid)
  float scale = 1.0f;
  uint16_t* out = nullptr;
  // Decode steps (every chunk one token): given prefill_attention_workspace_bytes(args) bytes of
  // `workspace` (16-byte aligned) and split_counters (num_chunks × num_kv_heads int32, zero before the first
  // call, left zero by every call, as decode_attention's), the keys of all (chunk, kv head) pairs are shared
  // evenly by the CTAs one wave of the GPU holds, a pair's keys split between CTAs where they fall, so that
  // the batch ends together instead of in a mostly idle last wave. The result's bits then depend on the
  // batch's lengths and the GPU, not on the order CTAs finish in.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int32_t* split_counters = nullptr;
};
// Workspace for these shapes (pointers in `args` are not read; the current device's size counts);
// 0 where the decode form is not balanced.
size_t prefill_attention_workspace_bytes(const PrefillAttentionArgs& args);
// The least work a CTA of the balanced decode form takes, in keys (rounded up to whole 64-key
// rounds, a pair's last round counting whole however few keys it has; default
// kDefaultDecodeBalanceKeys: one round, so that even one sequence spreads over the GPU), which
// bounds its grid for short batches; 0: not balanced, one CTA per (chunk, kv head) pair.
// Process-wide, read when a launch is made or captured; pdserve_gpu_bench compares.
constexpr int32_t kDefaultDecodeBalanceKeys = 64;
void set_decode_balance_keys(int32_t min_keys);
Status prefill_attention(const PrefillAttentionArgs& args, StreamHandle stream);
// Whether a decode step (one query token a sequence) with `pairs` (sequence, kv head) pairs, at
// most `max_keys` keys a sequence and blocks of `block_size` tokens is faster through
// prefill_attention's decode form (given its workspace) than through decode_attention on the
// current device: from `pairs_per_sm` pairs an SM where the form is balanced (default
// kDefaultDecodeTensorCorePairsPerSm: always, down to one sequence; set by
// set_decode_tensor_core_pairs_per_sm; process-wide, for pdserve_gpu_bench), from 2 where it is
// not (set_decode_balance_keys(0)); up to 8192 keys (not measured beyond); block sizes that are
// powers of two (others leave the decode form for the general one).
bool decode_step_uses_tensor_cores(int64_t pairs, int32_t max_keys, int32_t block_size);
constexpr double kDefaultDecodeTensorCorePairsPerSm = 0.0;
void set_decode_tensor_core_pairs_per_sm(double pairs_per_sm);
// The general form (chunks of more than one token) runs on Hopper's warpgroup MMA where the build
// and the device have it (sm_90: H100, H200), on mma.sync elsewhere; `allowed` false: mma.sync
// everywhere. Process-wide, read at each launch or capture; for
// pdserve_gpu_bench and the tests.
void set_prefill_attention_wgmma(bool allowed);
// Whether the general form for heads of `head_dim` runs on warpgroup MMA on the current device.
bool prefill_attention_uses_wgmma(int32_t head_dim);
// Makes the current device's per-kernel settings prefill_attention needs (call it before capturing
// a CUDA graph that may contain it; a first launch otherwise does it).
Status prepare_prefill_attention();

}  // namespace pdserve::cuda

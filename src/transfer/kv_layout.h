// KV layouts for the transfer layer: what a model's KV cache looks like (KvLayout), where one
// instance keeps it (PagedKvView), and the copies between paged memory and the block-free wire
// body — gather on the prefill side, RecvScatter on the decode side.
//
// Paged memory is block-major, as in model/kv_storage.h: block b is the range
// [base + b * block_bytes, + block_bytes); inside it, for layer l = 0 .. L-1, block_size token
// rows of K, then block_size rows of V; a row is kv_width values of the KV dtype. Position p of a
// sequence lives in block block_table[p / block_size], row p % block_size.
//
// The wire body of num_tokens tokens is laid out layer by layer, K then V, token rows in order:
// layer l's K is the contiguous run of bytes [(2l) * T * R, (2l + 1) * T * R) and its V follows
// (T = num_tokens, R = row bytes). It depends on no block size, so prefill and decode may page
// their KV differently (docs/decisions/kv-wire.md).
//
// Plain data and free functions; one process-wide setting (set_kv_copy_threads). The copies read
// and write the memory the views name and are as thread-safe as that memory is (concurrent copies
// into disjoint blocks are fine). Views do not own memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "common/check.h"
#include "common/status.h"

namespace pdserve {

// The element type of K and V rows. The numeric values are the wire encoding.
enum class KvDtype : uint8_t {
  kF16 = 1,   // IEEE half: the CPU engine's KV cache
  kF32 = 2,   // reserved for KV caches kept in fp32
  kBF16 = 3,  // bfloat16: the CUDA backend's KV cache
};

std::string_view kv_dtype_name(KvDtype dtype);  // "f16", "f32", "unknown"
// Bytes per value; 0 for a value outside the enum (from a peer).
size_t kv_dtype_bytes(KvDtype dtype);

// Limits every KV layout obeys (a layout from a peer beyond them is refused). With them,
// token_bytes() < 2^30 and body_bytes(num_tokens) < 2^61 for any int32 num_tokens: no overflow.
inline constexpr int32_t kMaxKvLayers = 1024;
inline constexpr int32_t kMaxKvWidth = 65536;

// The shape of one model's KV cache, which both sides of a transfer must agree on.
struct KvLayout {
  uint64_t model_fingerprint = 0;  // identifies the model weights; equal on prefill and decode
  KvDtype dtype = KvDtype::kF16;
  int32_t num_layers = 0;
  int32_t kv_width = 0;  // values per token row of K (and of V): num_kv_heads * head_dim

  // Meaningful for a validated layout (an unknown dtype has 0-byte rows).
  size_t row_bytes() const { return static_cast<size_t>(kv_width) * kv_dtype_bytes(dtype); }
  // K and V rows of one token over all layers.
  size_t token_bytes() const { return 2 * static_cast<size_t>(num_layers) * row_bytes(); }
  // One layer's K and V rows of num_tokens tokens: the wire body's per-layer part.
  uint64_t layer_body_bytes(int32_t num_tokens) const {
    PD_CHECK(num_tokens >= 0);
    return 2 * static_cast<uint64_t>(num_tokens) * row_bytes();
  }
  // The whole wire body of num_tokens tokens. Cannot overflow for a valid layout (see limits).
  uint64_t body_bytes(int32_t num_tokens) const {
    PD_CHECK(num_tokens >= 0);
    return static_cast<uint64_t>(num_tokens) * token_bytes();
  }
  // body_bytes() for values that came from a peer: validates the layout and the count first.
  StatusOr<uint64_t> checked_body_bytes(int64_t num_tokens) const;
  // Fields within their limits, dtype known.
  Status validate() const;

  bool operator==(const KvLayout&) const = default;
};

// Where a paged KV cache's bytes are.
enum class KvMemory : uint8_t {
  kHost,  // host memory, block-major (above); every transport moves it
  kCuda,  // a GPU's memory in the CUDA backend's layout (below); only the cuda-ipc transport moves it
};

// One instance's paged KV memory. Does not own the memory; blocks may be larger than their rows
// need (padding at the end of a block is never read or written).
//
// kCuda views describe the CUDA backend's layout instead (kernels/cuda/ops.h PagedKvCache): layer
// l's K blocks start at base + l * layer_bytes and its V blocks v_offset_bytes further; each of
// those blocks (block_bytes apart) is [kv head][row][head_dim]: num_kv_heads planes of block_size
// rows. The host-memory copies below refuse such views.
struct PagedKvView {
  uint8_t* base = nullptr;
  size_t block_bytes = 0;  // stride between blocks
  int32_t num_blocks = 0;
  int32_t block_size = 0;  // tokens per block
  KvLayout layout;
  KvMemory memory = KvMemory::kHost;
  // kCuda only.
  int32_t cuda_device = 0;
  int32_t num_kv_heads = 0;     // layout.kv_width = num_kv_heads * head_dim
  uint64_t layer_bytes = 0;     // stride between layers
  uint64_t v_offset_bytes = 0;  // from a layer's K blocks to its V blocks
  // The CUDA stream (cudaStream_t) that writes this cache (null: the legacy default stream): a
  // layer-wise send from it reads a layer after the work queued there so far (send_kv_layer).
  void* cuda_stream = nullptr;

  // Bytes the rows of one block occupy: 2 * num_layers * block_size * row_bytes.
  size_t used_block_bytes() const {
    return 2 * static_cast<size_t>(layout.num_layers) * static_cast<size_t>(block_size) * layout.row_bytes();
  }
  // Layout valid, block_size >= 1, block_bytes >= used_block_bytes(), base set when there are
  // blocks, and the whole range addressable (kCuda: the layer, K/V and block strides hold their
  // rows, heads divide kv_width into multiples of 8 values).
  Status validate() const;
  // OK for host memory; otherwise FAILED_PRECONDITION naming `what` and the transport to use.
  Status require_host(std::string_view what) const;

 private:
  Status validate_cuda() const;
};

// Checks that the first ceil(num_tokens / block_size) entries of block_table exist and name
// blocks of `view` (each in [0, num_blocks)), and that the view is valid. num_tokens may come
// from a peer: every failure is a Status naming the entry and the limit.
Status check_kv_block_table(const PagedKvView& view, std::span<const int32_t> block_table,
                            int32_t num_tokens);

// Calls fn(uint8_t* view_bytes, uint64_t range_offset, size_t len) for the maximal runs of wire
// body bytes [body_offset, body_offset + num_bytes) of a sequence's num_tokens tokens that are
// contiguous in `view` as well, in wire order; range_offset counts from body_offset. A run never
// crosses a block or a (layer, K/V) boundary. Requires check_kv_block_table() to have passed and
// the range to lie within layout.body_bytes(num_tokens) (PD_CHECK).
template <typename Fn>
void for_each_kv_run(const PagedKvView& view, std::span<const int32_t> block_table, int32_t num_tokens,
                     uint64_t body_offset, uint64_t num_bytes, Fn&& fn) {
  const uint64_t row = view.layout.row_bytes();
  const uint64_t part = static_cast<uint64_t>(num_tokens) * row;  // one layer's K (or V)
  const uint64_t block_size = static_cast<uint64_t>(view.block_size);
  PD_CHECK(num_bytes <= view.layout.body_bytes(num_tokens) &&
           body_offset <= view.layout.body_bytes(num_tokens) - num_bytes);
  uint64_t pos = body_offset;
  const uint64_t end = body_offset + num_bytes;
  while (pos < end) {
    const uint64_t part_idx = pos / part;  // 2 * layer + (0 for K, 1 for V)
    const uint64_t in_part = pos - part_idx * part;
    const uint64_t token = in_part / row;
    const uint64_t in_row = in_part - token * row;
    const uint64_t block_idx = token / block_size;
    const uint64_t block_row = token - block_idx * block_size;
    uint64_t run = (block_size - block_row) * row - in_row;  // to the end of this block's rows
    if (run > part - in_part) run = part - in_part;          // the last block may be partial
    if (run > end - pos) run = end - pos;
    uint8_t* p = view.base + static_cast<uint64_t>(block_table[block_idx]) * view.block_bytes +
                 (part_idx * block_size + block_row) * row + in_row;
    fn(p, pos - body_offset, static_cast<size_t>(run));
    pos += run;
  }
}

// Threads a gather or scatter of at least 32 MiB is split over, the calling one included (parts of
// at least 8 MiB): 0 (the default) for up to 4, as the hardware allows; 1: never split. A copy that
// cannot start a thread does that part itself. The parts write disjoint blocks only if the block
// table names each block once (as every caller's does). Process-wide; pdserve_transfer_bench
// compares.
void set_kv_copy_threads(int threads);
// The threads a gather or scatter of `bytes` is split over now, and the bytes of each part (a
// multiple of 64; the last part may be shorter).
int kv_copy_threads_for(uint64_t bytes);
uint64_t kv_copy_part_bytes(uint64_t bytes);

// Gather (prefill side): copies the KV of tokens [0, num_tokens) into `out` in wire order.
// out.size() must be layout.body_bytes(num_tokens).
Status gather_kv(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                 std::span<uint8_t> out);
// One layer's part of the wire body (K then V); out.size() must be layout.layer_body_bytes().
Status gather_kv_layer(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                       int32_t layer_idx, std::span<uint8_t> out);
// Any byte range [body_offset, body_offset + out.size()) of the wire body.
Status gather_kv_range(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                       uint64_t body_offset, std::span<uint8_t> out);

// RecvScatter (decode side): writes a wire body of num_tokens tokens into the blocks of `dst`
// named by block_table (any block size, any block order). body.size() must be
// layout.body_bytes(num_tokens) of dst's layout.
Status scatter_kv(std::span<const uint8_t> body, int32_t num_tokens, const PagedKvView& dst,
                  std::span<const int32_t> block_table);
// One layer's part of the wire body (as produced by gather_kv_layer).
Status scatter_kv_layer(std::span<const uint8_t> layer_body, int32_t layer_idx, int32_t num_tokens,
                        const PagedKvView& dst, std::span<const int32_t> block_table);
// Any byte range of the wire body, starting at body_offset (chunks as they arrive).
Status scatter_kv_range(std::span<const uint8_t> bytes, uint64_t body_offset, int32_t num_tokens,
                        const PagedKvView& dst, std::span<const int32_t> block_table);

}  // namespace pdserve

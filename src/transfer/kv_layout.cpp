#include "transfer/kv_layout.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace pdserve {

std::string_view kv_dtype_name(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kF16: return "f16";
    case KvDtype::kF32: return "f32";
    case KvDtype::kBF16: return "bf16";
  }
  return "unknown";
}

size_t kv_dtype_bytes(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kF16: return 2;
    case KvDtype::kF32: return 4;
    case KvDtype::kBF16: return 2;
  }
  return 0;
}

Status KvLayout::validate() const {
  if (kv_dtype_bytes(dtype) == 0)
    return invalid_argument(
        fmt::format("KV dtype {} is unknown (f16 = 1, f32 = 2, bf16 = 3)", static_cast<int>(dtype)));
  if (num_layers < 1 || num_layers > kMaxKvLayers)
    return out_of_range(fmt::format("KV num_layers {} is outside [1, {}]", num_layers, kMaxKvLayers));
  if (kv_width < 1 || kv_width > kMaxKvWidth)
    return out_of_range(fmt::format("KV kv_width {} is outside [1, {}]", kv_width, kMaxKvWidth));
  return ok_status();
}

StatusOr<uint64_t> KvLayout::checked_body_bytes(int64_t num_tokens) const {
  PD_RETURN_IF_ERROR(validate());
  if (num_tokens < 0 || num_tokens > std::numeric_limits<int32_t>::max())
    return out_of_range(
        fmt::format("KV num_tokens {} is outside [0, {}]", num_tokens, std::numeric_limits<int32_t>::max()));
  return body_bytes(static_cast<int32_t>(num_tokens));
}

Status PagedKvView::validate() const {
  PD_RETURN_IF_ERROR(layout.validate());
  if (block_size < 1) return invalid_argument(fmt::format("KV view block_size {} must be >= 1", block_size));
  if (num_blocks < 0) return invalid_argument(fmt::format("KV view num_blocks {} is negative", num_blocks));
  // used_block_bytes() < 2 * 1024 * 2^31 * 2^18 could overflow 64 bits only beyond these limits.
  if (block_size > (1 << 24))
    return out_of_range(fmt::format("KV view block_size {} exceeds {}", block_size, 1 << 24));
  if (memory == KvMemory::kCuda) return validate_cuda();
  if (memory != KvMemory::kHost)
    return invalid_argument(fmt::format("KV view memory kind {} is unknown", static_cast<int>(memory)));
  if (block_bytes < used_block_bytes())
    return invalid_argument(
        fmt::format("KV view block_bytes {} < {} needed by {} layers x {} tokens x 2 x {} bytes", block_bytes,
                    used_block_bytes(), layout.num_layers, block_size, layout.row_bytes()));
  if (num_blocks > 0 && base == nullptr) return invalid_argument("KV view has blocks but no base address");
  if (num_blocks > 0 && block_bytes > std::numeric_limits<size_t>::max() / static_cast<size_t>(num_blocks))
    return out_of_range("KV view num_blocks x block_bytes overflows the address space");
  return ok_status();
}

Status PagedKvView::validate_cuda() const {
  if (cuda_device < 0)
    return invalid_argument(fmt::format("KV view CUDA device {} is negative", cuda_device));
  if (num_kv_heads < 1 || layout.kv_width % num_kv_heads != 0 || (layout.kv_width / num_kv_heads) % 8 != 0)
    return invalid_argument(
        fmt::format("KV view of {} KV heads for rows of {} values: each head needs a "
                    "multiple of 8 values",
                    num_kv_heads, layout.kv_width));
  if (layout.dtype != KvDtype::kBF16 && layout.dtype != KvDtype::kF16)
    return invalid_argument(
        fmt::format("a KV view in GPU memory holds bf16 or f16, not {}", kv_dtype_name(layout.dtype)));
  const uint64_t rows = static_cast<uint64_t>(block_size) * layout.row_bytes();
  if (block_bytes < rows)
    return invalid_argument(
        fmt::format("KV view block_bytes {} < the {} bytes of a block's rows", block_bytes, rows));
  if (num_blocks > 0 && base == nullptr) return invalid_argument("KV view has blocks but no base address");
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || block_bytes % 16 != 0 || layer_bytes % 16 != 0 ||
      v_offset_bytes % 16 != 0)
    return invalid_argument("a KV view in GPU memory needs 16-byte aligned base and strides");
  // block_bytes, layer_bytes and v_offset_bytes are local values; the products stay far below 2^64
  // for any cache that fits a GPU, but are checked anyway.
  const uint64_t region = static_cast<uint64_t>(num_blocks) * block_bytes;
  if (num_blocks > 0 && region / static_cast<uint64_t>(num_blocks) != block_bytes)
    return out_of_range("KV view num_blocks x block_bytes overflows");
  if (v_offset_bytes < region || layer_bytes < v_offset_bytes || layer_bytes - v_offset_bytes < region)
    return invalid_argument(
        fmt::format("KV view strides overlap: {} blocks of {} bytes, V at +{}, layers {} apart", num_blocks,
                    block_bytes, v_offset_bytes, layer_bytes));
  return ok_status();
}

Status PagedKvView::require_host(std::string_view what) const {
  if (memory == KvMemory::kHost) return ok_status();
  return failed_precondition(
      fmt::format("{} moves KV caches in host memory; this one is on GPU {} (use the cuda-ipc transport)",
                  what, cuda_device));
}

Status check_kv_block_table(const PagedKvView& view, std::span<const int32_t> block_table,
                            int32_t num_tokens) {
  PD_RETURN_IF_ERROR(view.validate());
  if (num_tokens < 0) return invalid_argument(fmt::format("num_tokens {} is negative", num_tokens));
  const int64_t needed = (static_cast<int64_t>(num_tokens) + view.block_size - 1) / view.block_size;
  if (static_cast<int64_t>(block_table.size()) < needed)
    return out_of_range(fmt::format("{} tokens need {} blocks of {} tokens, the block table has {}",
                                    num_tokens, needed, view.block_size, block_table.size()));
  for (int64_t i = 0; i < needed; ++i) {
    const int32_t b = block_table[static_cast<size_t>(i)];
    if (b < 0 || b >= view.num_blocks)
      return out_of_range(
          fmt::format("block table entry {} names block {}, outside [0, {})", i, b, view.num_blocks));
  }
  return ok_status();
}

namespace {

Status check_range(const KvLayout& layout, int32_t num_tokens, uint64_t body_offset, uint64_t num_bytes) {
  const uint64_t body = layout.body_bytes(num_tokens);
  if (num_bytes > body || body_offset > body - num_bytes)
    return out_of_range(fmt::format("KV byte range [{}, +{}) exceeds the {}-byte body of {} tokens",
                                    body_offset, num_bytes, body, num_tokens));
  return ok_status();
}

Status check_layer(const KvLayout& layout, int32_t layer_idx) {
  if (layer_idx < 0 || layer_idx >= layout.num_layers)
    return out_of_range(fmt::format("layer {} is outside [0, {})", layer_idx, layout.num_layers));
  return ok_status();
}

Status check_size(std::string_view what, uint64_t got, uint64_t expected) {
  if (got != expected)
    return invalid_argument(fmt::format("{} is {} bytes, expected {}", what, got, expected));
  return ok_status();
}

// NOTE: a gather or scatter of at least this many bytes uses non-temporal (cache-bypassing)
// stores. Such KV does not stay in the caches anyway, and streaming stores skip the read for
// ownership of every destination line: 256 MiB scatters went from 6.9 to 10.5 GB/s on the 2-vCPU
// benchmark VM (docs/perf/pd.md), like glibc's memcpy above its own non-temporal threshold.
constexpr uint64_t kStreamingCopyMinBytes = uint64_t{32} << 20;
// Streams are copied in chunks of at most this many bytes, four chunks interleaved: four
// concurrent sequential streams keep the memory system busier than one (glibc's large memcpy
// interleaves four pages for the same reason); measured best among 4, 8 and 16 KiB.
constexpr size_t kStreamChunkBytes = 8192;

struct CopyStream {
  uint8_t* dst;
  const uint8_t* src;
  size_t bytes;
};

// Copies up to four streams, 64 bytes of each in turn, with non-temporal stores for the 16-byte
// aligned part of each destination. The caller ends a sequence of these with stream_fence().
void copy_streams(CopyStream* s, int count) {
#if defined(__SSE2__)
  for (int i = 0; i < count; ++i) {
    size_t head = (16 - reinterpret_cast<uintptr_t>(s[i].dst) % 16) % 16;
    if (head > s[i].bytes) head = s[i].bytes;
    std::memcpy(s[i].dst, s[i].src, head);
    s[i].dst += head;
    s[i].src += head;
    s[i].bytes -= head;
  }
  for (bool more = true; more;) {
    more = false;
    for (int i = 0; i < count; ++i) {
      if (s[i].bytes < 64) continue;
      const auto* src = reinterpret_cast<const __m128i*>(s[i].src);
      auto* dst = reinterpret_cast<__m128i*>(s[i].dst);
      const __m128i a = _mm_loadu_si128(src);
      const __m128i b = _mm_loadu_si128(src + 1);
      const __m128i c = _mm_loadu_si128(src + 2);
      const __m128i d = _mm_loadu_si128(src + 3);
      _mm_stream_si128(dst, a);
      _mm_stream_si128(dst + 1, b);
      _mm_stream_si128(dst + 2, c);
      _mm_stream_si128(dst + 3, d);
      s[i].dst += 64;
      s[i].src += 64;
      s[i].bytes -= 64;
      more = true;
    }
  }
#endif
  for (int i = 0; i < count; ++i) std::memcpy(s[i].dst, s[i].src, s[i].bytes);
}

void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Copies the wire range [offset, offset + bytes) between `flat` and the view's blocks (kToView:
// scatter, else gather); `streaming`: with non-temporal stores (a part of a large copy).
template <bool kToView>
void copy_runs(const PagedKvView& view, std::span<const int32_t> table, int32_t num_tokens, uint64_t offset,
               uint64_t bytes, uint8_t* flat, bool streaming) {
  if (!streaming) {
    for_each_kv_run(view, table, num_tokens, offset, bytes, [flat](uint8_t* p, uint64_t off, size_t len) {
      if constexpr (kToView) {
        std::memcpy(p, flat + off, len);
      } else {
        std::memcpy(flat + off, p, len);
      }
    });
    return;
  }
  CopyStream batch[4];
  int count = 0;
  for_each_kv_run(view, table, num_tokens, offset, bytes, [&](uint8_t* p, uint64_t off, size_t len) {
    for (size_t done = 0; done < len;) {
      const size_t n = std::min(kStreamChunkBytes, len - done);
      if constexpr (kToView) {
        batch[count++] = {p + done, flat + off + done, n};
      } else {
        batch[count++] = {flat + off + done, p + done, n};
      }
      if (count == 4) {
        copy_streams(batch, count);
        count = 0;
      }
      done += n;
    }
  });
  copy_streams(batch, count);
  stream_fence();
}

// Splitting a copy over threads: from this size, in parts of at least kCopyPartMinBytes (a split
// copy is at least kStreamingCopyMinBytes, so every part streams).
// Measured on the 2-vCPU benchmark VM: docs/perf/pd.md.
constexpr uint64_t kParallelCopyMinBytes = uint64_t{32} << 20;
constexpr uint64_t kCopyPartMinBytes = uint64_t{8} << 20;
constexpr int kMaxCopyThreads = 4;
std::atomic<int> g_copy_threads{0};

int copy_threads() {
  const int set = g_copy_threads.load(std::memory_order_relaxed);
  if (set > 0) return set;
  static const int hardware =
      std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, kMaxCopyThreads);
  return hardware;
}

}  // namespace

int kv_copy_threads_for(uint64_t bytes) {
  if (bytes < kParallelCopyMinBytes) return 1;
  return static_cast<int>(
      std::min<uint64_t>(static_cast<uint64_t>(copy_threads()), bytes / kCopyPartMinBytes));
}

uint64_t kv_copy_part_bytes(uint64_t bytes) {
  const uint64_t threads = static_cast<uint64_t>(kv_copy_threads_for(bytes));
  return ((bytes + threads - 1) / threads + 63) / 64 * 64;  // at most `threads` parts
}

namespace {

// copy_runs over [offset, offset + bytes), large ranges in parts on several threads (each part a
// wire range of its own, so any split point is fine; 64-byte multiples keep the streams aligned).
template <bool kToView>
void copy_runs_split(const PagedKvView& view, std::span<const int32_t> table, int32_t num_tokens,
                     uint64_t offset, uint64_t bytes, uint8_t* flat) {
  const bool streaming = bytes >= kStreamingCopyMinBytes;
  const uint64_t threads = static_cast<uint64_t>(kv_copy_threads_for(bytes));
  if (threads <= 1) {
    copy_runs<kToView>(view, table, num_tokens, offset, bytes, flat, streaming);
    return;
  }
  const uint64_t part = kv_copy_part_bytes(bytes);
  std::vector<std::thread> helpers;
  helpers.reserve(threads);
  std::vector<uint64_t> left;  // starts of the parts no thread took
  left.reserve(threads);
  for (uint64_t start = part; start < bytes; start += part) {
    const uint64_t len = std::min(part, bytes - start);
    try {
      helpers.emplace_back([&view, table, num_tokens, offset, start, len, flat] {
        copy_runs<kToView>(view, table, num_tokens, offset + start, len, flat + start, true);
      });
    } catch (...) {  // no thread (std::system_error, or no memory for one): this thread copies it
      left.push_back(start);
    }
  }
  copy_runs<kToView>(view, table, num_tokens, offset, std::min(part, bytes), flat, true);
  for (const uint64_t start : left)
    copy_runs<kToView>(view, table, num_tokens, offset + start, std::min(part, bytes - start), flat + start,
                       true);
  for (std::thread& t : helpers) t.join();
}

}  // namespace

void set_kv_copy_threads(int threads) {
  g_copy_threads.store(std::max(0, threads), std::memory_order_relaxed);
}

Status gather_kv_range(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                       uint64_t body_offset, std::span<uint8_t> out) {
  PD_RETURN_IF_ERROR(src.require_host("gather_kv"));
  PD_RETURN_IF_ERROR(check_kv_block_table(src, block_table, num_tokens));
  PD_RETURN_IF_ERROR(check_range(src.layout, num_tokens, body_offset, out.size()));
  copy_runs_split<false>(src, block_table, num_tokens, body_offset, out.size(), out.data());
  return ok_status();
}

Status gather_kv(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                 std::span<uint8_t> out) {
  PD_RETURN_IF_ERROR(src.layout.validate());
  if (num_tokens < 0) return invalid_argument(fmt::format("num_tokens {} is negative", num_tokens));
  PD_RETURN_IF_ERROR(check_size("gather output", out.size(), src.layout.body_bytes(num_tokens)));
  return gather_kv_range(src, block_table, num_tokens, 0, out);
}

Status gather_kv_layer(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                       int32_t layer_idx, std::span<uint8_t> out) {
  PD_RETURN_IF_ERROR(src.layout.validate());
  PD_RETURN_IF_ERROR(check_layer(src.layout, layer_idx));
  if (num_tokens < 0) return invalid_argument(fmt::format("num_tokens {} is negative", num_tokens));
  const uint64_t layer_bytes = src.layout.layer_body_bytes(num_tokens);
  PD_RETURN_IF_ERROR(check_size("layer gather output", out.size(), layer_bytes));
  return gather_kv_range(src, block_table, num_tokens, static_cast<uint64_t>(layer_idx) * layer_bytes, out);
}

Status scatter_kv_range(std::span<const uint8_t> bytes, uint64_t body_offset, int32_t num_tokens,
                        const PagedKvView& dst, std::span<const int32_t> block_table) {
  PD_RETURN_IF_ERROR(dst.require_host("scatter_kv"));
  PD_RETURN_IF_ERROR(check_kv_block_table(dst, block_table, num_tokens));
  PD_RETURN_IF_ERROR(check_range(dst.layout, num_tokens, body_offset, bytes.size()));
  // NOTE: copy_runs only reads from `flat` when scattering.
  copy_runs_split<true>(dst, block_table, num_tokens, body_offset, bytes.size(),
                        const_cast<uint8_t*>(bytes.data()));
  return ok_status();
}

Status scatter_kv(std::span<const uint8_t> body, int32_t num_tokens, const PagedKvView& dst,
                  std::span<const int32_t> block_table) {
  PD_RETURN_IF_ERROR(dst.layout.validate());
  if (num_tokens < 0) return invalid_argument(fmt::format("num_tokens {} is negative", num_tokens));
  PD_RETURN_IF_ERROR(check_size("KV body", body.size(), dst.layout.body_bytes(num_tokens)));
  return scatter_kv_range(body, 0, num_tokens, dst, block_table);
}

Status scatter_kv_layer(std::span<const uint8_t> layer_body, int32_t layer_idx, int32_t num_tokens,
                        const PagedKvView& dst, std::span<const int32_t> block_table) {
  PD_RETURN_IF_ERROR(dst.layout.validate());
  PD_RETURN_IF_ERROR(check_layer(dst.layout, layer_idx));
  if (num_tokens < 0) return invalid_argument(fmt::format("num_tokens {} is negative", num_tokens));
  const uint64_t layer_bytes = dst.layout.layer_body_bytes(num_tokens);
  PD_RETURN_IF_ERROR(check_size("KV layer body", layer_body.size(), layer_bytes));
  return scatter_kv_range(layer_body, static_cast<uint64_t>(layer_idx) * layer_bytes, num_tokens, dst,
                          block_table);
}

}  // namespace pdserve

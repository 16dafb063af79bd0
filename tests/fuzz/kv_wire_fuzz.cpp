// libFuzzer target: the KV transfer layer's parsers of peer bytes must return a Status, never
// crash, over-read or allocate without bound. One input feeds three of them:
//   - KvHandle::parse on the whole input as text (what arrives in a handoff message);
//   - decode_kv_wire_header on its first 64 bytes (checksum fixed up first when the next byte's
//     top bit is set, to reach the field checks); a header that decodes must re-encode to the
//     same bytes, and then the rest of the input (after one byte that picks the decode's block
//     size) is RecvScattered as the start of its body into a small paged view with a fragmented
//     block table, and gathered back unchanged;
//   - check_kv_block_table with a table and a token count read from the input.
// Build with the `fuzz` preset (clang); tests/fuzz/run_fuzz.sh runs it with seeds written by
// kv_wire_seeds.
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "transfer/kv_layout.h"
#include "transfer/kv_transport.h"
#include "transfer/kv_wire.h"

namespace {

using namespace pdserve;

// Largest body scattered per input: keeps memory per run small.
constexpr uint64_t kMaxBodyBytes = uint64_t{1} << 20;

void fuzz_handle(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  StatusOr<KvHandle> h = KvHandle::parse(text);
  if (!h.ok()) return;
  StatusOr<KvHandle> again = KvHandle::parse(h->to_string());
  if (!again.ok() || !(*again == *h)) __builtin_trap();
}

void fuzz_header_and_scatter(const uint8_t* data, size_t size) {
  // With the top bit of the byte after the header set, the header checksum is fixed up first, so
  // mutated fields reach the field checks behind it instead of all failing at the checksum.
  std::array<uint8_t, kKvWireHeaderBytes> fixed;
  if (size > kKvWireHeaderBytes && (data[kKvWireHeaderBytes] & 0x80)) {
    std::memcpy(fixed.data(), data, fixed.size());
    std::memset(fixed.data() + 36, 0, 4);
    const uint32_t sum = XXH32(fixed.data(), fixed.size(), 0);
    for (int i = 0; i < 4; ++i) fixed[36 + i] = static_cast<uint8_t>(sum >> (8 * i));
    if (!decode_kv_wire_header(fixed).ok()) return;
    std::vector<uint8_t> copy(data, data + size);
    std::memcpy(copy.data(), fixed.data(), fixed.size());
    copy[kKvWireHeaderBytes] &= 0x7f;
    fuzz_header_and_scatter(copy.data(), copy.size());
    return;
  }
  StatusOr<KvWireHeader> header = decode_kv_wire_header({data, size});
  if (!header.ok()) return;
  const auto encoded = encode_kv_wire_header(*header);
  if (std::memcmp(encoded.data(), data, kKvWireHeaderBytes) != 0) __builtin_trap();
  if (!check_compatible(*header, header->layout).ok()) __builtin_trap();

  const KvLayout& layout = header->layout;
  if (header->body_bytes > kMaxBodyBytes) return;
  // Even an empty body allocates blocks: keep them small for wide layouts.
  if (layout.token_bytes() > kMaxBodyBytes) return;
  std::span<const uint8_t> rest(data + kKvWireHeaderBytes, size - kKvWireHeaderBytes);
  int32_t block_size = rest.empty() ? 1 : rest[0] % 32 + 1;
  if (layout.token_bytes() * static_cast<uint64_t>(block_size) > kMaxBodyBytes) block_size = 1;
  if (!rest.empty()) rest = rest.subspan(1);

  PagedKvView view;
  view.layout = layout;
  view.block_size = block_size;
  view.num_blocks = (header->num_tokens + block_size - 1) / block_size + 2;
  view.block_bytes = view.used_block_bytes();
  std::vector<uint8_t> memory(view.block_bytes * static_cast<size_t>(view.num_blocks), 0);
  view.base = memory.data();
  // A fragmented table: blocks in reverse order, skipping block 0.
  std::vector<int32_t> table;
  for (int32_t b = view.num_blocks - 1; b >= 1; --b) table.push_back(b);

  const std::span<const uint8_t> body = rest.first(std::min<size_t>(rest.size(), header->body_bytes));
  if (body.size() == header->body_bytes) (void)verify_kv_body_checksum(*header, body);
  if (!scatter_kv_range(body, 0, header->num_tokens, view, table).ok()) __builtin_trap();
  std::vector<uint8_t> back(body.size());
  if (!gather_kv_range(view, table, header->num_tokens, 0, back).ok()) __builtin_trap();
  if (!std::equal(back.begin(), back.end(), body.begin())) __builtin_trap();
}

void fuzz_block_table(const uint8_t* data, size_t size) {
  if (size < 4) return;
  int32_t num_tokens = 0;
  std::memcpy(&num_tokens, data, 4);
  std::vector<int32_t> table((size - 4) / 4);
  if (!table.empty()) std::memcpy(table.data(), data + 4, table.size() * 4);
  static std::vector<uint8_t> memory;
  PagedKvView view;
  view.layout = KvLayout{1, KvDtype::kF16, 2, 4};
  view.block_size = 4;
  view.num_blocks = 64;
  view.block_bytes = view.used_block_bytes();
  memory.resize(view.block_bytes * 64);
  view.base = memory.data();
  if (!check_kv_block_table(view, table, num_tokens).ok()) return;
  // Valid: every token's rows are inside the view; write and read one row of each layer part.
  std::vector<uint8_t> row(view.layout.row_bytes(), 0x5a);
  if (num_tokens > 0) {
    if (!scatter_kv_range(row, view.layout.body_bytes(num_tokens) - row.size(), num_tokens, view, table).ok())
      __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz_handle(data, size);
  fuzz_header_and_scatter(data, size);
  fuzz_block_table(data, size);
  return 0;
}

// KV cache memory budget: parses the `--kv-cache-memory` value and turns it into a number of KV
// blocks. Pure functions; thread-safe.
//
// Accepted forms (surrounding spaces ignored, units case-insensitive, a space allowed before the
// unit):
//   bytes:     "1073741824"; with a unit "2GiB", "512 MiB", "1.5GiB".
//              KiB MiB GiB TiB and the single letters K M G T are powers of 1024;
//              KB MB GB TB are powers of 1000; B is bytes.
//   fraction:  of the memory available for the KV cache: "0.5" (a number with a decimal point and
//              no unit, in (0, 1]) or "50%" (in (0, 100]).
// A plain integer is bytes, so "1" is one byte and "1.0" is all of the available memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace pdserve {

struct KvMemoryBudget {
  enum class Kind { kBytes, kFraction };
  Kind kind = Kind::kBytes;
  uint64_t bytes = 0;   // kBytes: > 0
  double fraction = 0;  // kFraction: in (0, 1]
};

// Errors (kInvalidArgument, or kOutOfRange for sizes beyond 2^64 - 1) quote the text and say
// what is expected.
StatusOr<KvMemoryBudget> parse_kv_memory_budget(std::string_view text);

// Bytes of one KV block: K and V, for every layer, of block_size tokens. Errors on non-positive
// arguments and on overflow.
StatusOr<uint64_t> kv_bytes_per_block(int32_t num_layers, int32_t num_kv_heads, int32_t head_dim,
                                      int32_t block_size, int32_t bytes_per_element);

// The number of whole blocks of bytes_per_block that fit in the budget. available_bytes is the
// memory the KV cache may use (what is left after weights and activations); nullopt when unknown,
// which a fraction cannot do without. Errors: kFailedPrecondition (a fraction, nothing known to
// be available), kResourceExhausted (more bytes than available, or less than one block),
// kOutOfRange (more than 2^31 - 1 blocks), kInvalidArgument (bytes_per_block is 0).
StatusOr<int32_t> kv_blocks_for_budget(const KvMemoryBudget& budget, uint64_t bytes_per_block,
                                       std::optional<uint64_t> available_bytes);
// Both steps at once, for a flag value.
StatusOr<int32_t> kv_blocks_for_budget(std::string_view text, uint64_t bytes_per_block,
                                       std::optional<uint64_t> available_bytes);

// "512 B", "1.50 KiB", "2.00 GiB": for messages and logs.
std::string format_bytes(uint64_t bytes);

}  // namespace pdserve

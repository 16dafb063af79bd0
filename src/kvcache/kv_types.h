// Identifiers shared by the kvcache module and its users (scheduler, engine). Plain aliases; no
// state, no thread-safety concerns.
#pragma once

#include <cstdint>

namespace pdserve {

// Index of a KV block in an instance's KV storage, in [0, num_blocks).
using BlockId = int32_t;
// One sequence per request on an instance; the caller (the engine) picks the ids.
using SequenceId = int64_t;
// A vocabulary index, as produced by the tokenizer.
using TokenId = int32_t;

inline constexpr BlockId kNoBlock = -1;
// Tokens per KV block unless configured otherwise.
inline constexpr int32_t kDefaultBlockSize = 16;

}  // namespace pdserve

// PrefixIndex: prefix caching — finds the cached KV blocks that already hold a prompt's leading
// full blocks.
//
// A full block is named by a hash chain: hash(block i) = H(hash(block i-1), token ids of block i),
// with hash(block -1) = kRootPrefixHash, so a hash stands for the whole prefix up to the end of
// its block. Only full blocks are indexed: a partial block's content still changes, so it is never
// shared.
//
// A hash is a key, never proof. Each entry keeps its block's token ids and the id of the entry
// before it in its chain; a lookup accepts an entry only if both equal what it has verified so
// far, so (by induction from the empty prefix) every block of a match holds exactly the query's
// prefix. A hash collision is a miss, never a wrong reuse. NOTE: an entry whose predecessor was
// evicted can no longer be matched (its parent id is gone); it stays until evicted or until a
// commit of the same hash replaces it.
//
// Memory: a copy of every indexed block's token ids, num_blocks × block_size × 4 bytes reserved up
// front (1 MiB for 16384 blocks of 16 tokens), plus one hash-map node per indexed block.
//
// The index knows nothing of reference counts; KvCacheManager keeps it and the BlockPool in step
// (a block is in the index iff the pool marks it cached). Metadata only. Not thread-safe: owned by
// the engine thread.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "kvcache/kv_types.h"

namespace pdserve {

// The hash of a full block given the hash of the block before it. Must be deterministic; need not
// be collision-free (tests inject weak ones).
using BlockHashFn = uint64_t (*)(uint64_t parent_hash, std::span<const TokenId> block_tokens);

// The default: XXH3-64 of the token ids' bytes, seeded with the parent hash.
uint64_t xxh3_block_hash(uint64_t parent_hash, std::span<const TokenId> block_tokens);

inline constexpr uint64_t kRootPrefixHash = 0x70647365727665ull;  // "pdserve"

// Names a verified prefix that ends at a block boundary: the chain hash and the index entry that
// held its last block when it was verified (0 for the empty prefix).
struct PrefixLink {
  uint64_t hash = kRootPrefixHash;
  uint64_t entry_id = 0;
};

// The most leading full blocks of a prompt that may be taken from the cache: NOTE at least one
// prompt token must be left to compute, since the forward pass needs it to produce the logits of
// the next token. So a prompt of n tokens matches at most (n - 1) / block_size blocks: a prompt of
// exactly k full blocks reuses at most k - 1 of them.
inline int32_t max_prefix_blocks(int32_t num_prompt_tokens, int32_t block_size) {
  return num_prompt_tokens > 0 ? (num_prompt_tokens - 1) / block_size : 0;
}

class PrefixIndex {
 public:
  // hash_fn nullptr: xxh3_block_hash.
  PrefixIndex(int32_t num_blocks, int32_t block_size, BlockHashFn hash_fn = nullptr);

  struct Match {
    std::vector<BlockId> blocks;  // blocks[i] holds tokens [i * block_size, (i + 1) * block_size)
    PrefixLink last;              // link of the last matched block (root if none)
    bool conflict = false;        // the walk stopped at an entry whose hash matched but not content
  };
  // The longest chain of indexed blocks equal to the leading full blocks of `tokens`, at most
  // max_blocks long. No side effects.
  Match match(std::span<const TokenId> tokens, int32_t max_blocks) const;

  struct InsertResult {
    PrefixLink link;              // link of this block's prefix, the parent for the next block
    bool inserted = false;        // false: an identical prefix was indexed already (duplicate)
    BlockId existing = kNoBlock;  // duplicate: the block that holds it
    BlockId replaced = kNoBlock;  // an entry with the same hash but other content, now dropped
  };
  // Indexes `block`, which holds the full block `block_tokens` following the prefix `parent`.
  // If the exact prefix is indexed already, indexes nothing (inserted = false). If another entry
  // has the same hash (a collision, or an entry orphaned by its parent's eviction), the new one
  // replaces it; the caller must unmark the replaced block. PD_CHECKs `block` is not indexed.
  InsertResult insert(BlockId block, const PrefixLink& parent, std::span<const TokenId> block_tokens);
  // Forgets an indexed block (evicted). PD_CHECKs it is indexed.
  void erase(BlockId block);

  bool contains(BlockId block) const;
  int32_t size() const { return static_cast<int32_t>(by_hash_.size()); }
  int32_t block_size() const { return block_size_; }
  uint64_t hash(uint64_t parent_hash, std::span<const TokenId> block_tokens) const {
    return hash_fn_(parent_hash, block_tokens);
  }

  // Checks that the hash map and the per-block entries agree; O(capacity), for tests.
  Status validate() const;

 private:
  struct Entry {
    uint64_t hash = 0;
    uint64_t id = 0;  // 0: the block is not indexed
    uint64_t parent_id = 0;
  };
  std::span<const TokenId> tokens_of(BlockId block) const;

  int32_t block_size_;
  BlockHashFn hash_fn_;
  std::vector<Entry> entries_;   // by block
  std::vector<TokenId> tokens_;  // block b's token ids at [b * block_size, (b + 1) * block_size)
  std::unordered_map<uint64_t, BlockId> by_hash_;
  uint64_t next_id_ = 1;
};

}  // namespace pdserve

// KvCacheManager: the KV block tables of an instance's sequences, over one BlockPool and one
// PrefixIndex (prefix caching).
//
// A sequence's block table maps its positions to blocks: position p lives in block
// table[p / block_size] at row p % block_size. allocate_for() creates a sequence for a prompt,
// reusing cached blocks for its leading full blocks (at most max_prefix_blocks(), so at least one
// prompt token is left to compute); append_slots() grows a table for more tokens;
// commit_full_blocks() publishes blocks the sequence has filled (KV written) to the prefix index;
// free() drops the sequence's references — cached blocks stay reusable in the LRU until
// allocation needs their room. Shared blocks are always full and never written again, so no
// copy-on-write is needed.
//
// Metadata only: it never touches KV memory. Not thread-safe: owned by the engine thread. Not
// copyable or movable (the pool holds a pointer back to it).
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_types.h"
#include "kvcache/prefix_index.h"

namespace pdserve {

struct KvCacheConfig {
  int32_t num_blocks = 0;
  int32_t block_size = kDefaultBlockSize;  // tokens per block
  bool enable_prefix_caching = true;
  BlockHashFn block_hash = nullptr;  // nullptr: xxh3_block_hash (tests inject weak ones)
};

// A snapshot for metrics (gauges and counters); plain data.
struct KvCacheStats {
  int32_t num_blocks_total = 0;
  int32_t num_blocks_used = 0;              // referenced by at least one sequence
  int32_t num_blocks_free = 0;              // allocatable now: free-listed plus evictable
  int32_t num_blocks_cached_evictable = 0;  // unreferenced cached blocks (part of num_blocks_free)
  int32_t num_blocks_cached = 0;            // blocks in the prefix index, used or not
  int32_t num_sequences = 0;
  int64_t prefix_lookups_total = 0;         // successful allocate_for() calls
  int64_t prefix_queried_tokens_total = 0;  // their prompt tokens
  int64_t prefix_hit_tokens_total = 0;      // of those, tokens taken from cached blocks
  int64_t prefix_conflicts_total = 0;       // lookups that stopped at a hash match with other content
  int64_t evictions_total = 0;              // cached blocks evicted to make room
};

struct SequenceAllocation {
  // Leading prompt tokens whose KV the table's first blocks already hold: prefill starts here.
  // A multiple of block_size, and less than the prompt length.
  int32_t num_cached_tokens = 0;
  // The new table; valid until the sequence's next append_slots() or free().
  std::span<const BlockId> block_table;
};

class KvCacheManager final : private BlockEvictionListener {
 public:
  explicit KvCacheManager(const KvCacheConfig& config);
  KvCacheManager(const KvCacheManager&) = delete;
  KvCacheManager& operator=(const KvCacheManager&) = delete;

  // Creates sequence `seq` with room for `prompt_tokens`, its leading full blocks reused from the
  // prefix cache where possible. All or nothing. Errors: kInvalidArgument for an empty prompt;
  // kResourceExhausted when too few blocks are free now (retry after others finish);
  // kOutOfRange when the prompt needs more blocks than the whole cache has (never fits). Counts
  // toward the prefix statistics only when it succeeds. PD_CHECKs that `seq` is new.
  // use_prefix_cache = false allocates fresh blocks only (KV that arrives from elsewhere is
  // written into every block, and cached blocks may be shared with running sequences).
  StatusOr<SequenceAllocation> allocate_for(SequenceId seq, std::span<const TokenId> prompt_tokens,
                                            bool use_prefix_cache = true);

  // Grows the table of `seq` by room for num_tokens more tokens. All or nothing; errors as for
  // allocate_for().
  Status append_slots(SequenceId seq, int32_t num_tokens);
  // Blocks append_slots(seq, num_tokens) would allocate.
  int32_t blocks_needed_to_append(SequenceId seq, int32_t num_tokens) const;

  // Publishes the full blocks of `seq` that are not yet in the prefix index. `tokens` are the
  // sequence's token ids from position 0 whose KV has been written (the caller's contract); only
  // the full blocks among them are committed, so calling it after every step is cheap.
  // PD_CHECKs that `tokens` fits in the table. A no-op without prefix caching.
  void commit_full_blocks(SequenceId seq, std::span<const TokenId> tokens);

  // Drops the sequence and its references: cached blocks become evictable, others free.
  // `uncache`: its cached blocks that no other sequence holds leave the prefix index first, and so
  // become free (for KV that is suspect: the sequence's forward pass gave no usable logits).
  // PD_CHECKs that `seq` exists.
  void free(SequenceId seq, bool uncache = false);

  // Tokens of `prompt_tokens` that allocate_for() would take from the cache now; no side effects.
  int32_t count_cached_tokens(std::span<const TokenId> prompt_tokens) const;

  bool can_allocate(int32_t num_blocks) const { return num_blocks <= pool_.num_free_blocks(); }
  int32_t blocks_for_tokens(int32_t num_tokens) const {
    return static_cast<int32_t>((int64_t{num_tokens} + block_size_ - 1) / block_size_);
  }

  bool contains(SequenceId seq) const { return sequences_.contains(seq); }
  std::span<const BlockId> block_table(SequenceId seq) const;
  // Token positions the table of `seq` has room for (prompt plus appended slots).
  int32_t num_slots(SequenceId seq) const;

  int32_t block_size() const { return block_size_; }
  int32_t num_sequences() const { return static_cast<int32_t>(sequences_.size()); }
  const BlockPool& block_pool() const { return pool_; }
  KvCacheStats stats() const;

  // Checks the pool, the index and the tables against each other (every reference is a table
  // entry, cached = indexed, tables sized to their slots); O(blocks + table entries), for tests.
  Status validate() const;

 private:
  struct Sequence {
    std::vector<BlockId> blocks;
    int32_t num_slots = 0;
    int32_t num_committed_blocks = 0;  // leading blocks whose prefix is known to the index
    PrefixLink last_committed;         // link of block num_committed_blocks - 1
  };

  void on_evict(BlockId block) override;
  Sequence& get(SequenceId seq);
  const Sequence& get(SequenceId seq) const;
  Status check_fits(int32_t blocks_needed, int32_t blocks_reclaimable, int32_t total_blocks_of_sequence,
                    int32_t num_tokens, const char* what) const;

  int32_t block_size_;
  bool prefix_caching_;
  BlockPool pool_;
  PrefixIndex index_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  int64_t lookups_ = 0;
  int64_t queried_tokens_ = 0;
  int64_t hit_tokens_ = 0;
  int64_t conflicts_ = 0;
};

}  // namespace pdserve

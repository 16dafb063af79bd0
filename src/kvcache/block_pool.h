// BlockPool: the free list and reference counts of an instance's fixed-size KV blocks.
//
// Metadata only: it never touches KV memory. A block is in exactly one of three states:
//   used       — referenced by at least one sequence (ref count > 0);
//   evictable  — unreferenced but marked cached (its KV is indexed for prefix reuse); kept in an
//                LRU list, oldest release first;
//   free       — unreferenced and not cached; kept in a free list.
// Evictable blocks count as free for allocation: allocate() takes free blocks first, then evicts
// the least recently released evictable blocks, telling the eviction listener (the prefix index
// must forget them) before handing them out. Every operation is O(1) per block.
//
// Not thread-safe: owned by the engine thread. The listener, if any, must outlive the pool.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "common/status.h"
#include "kvcache/kv_types.h"

namespace pdserve {

// Told about each cached block that allocate() evicts, before the block is reused.
class BlockEvictionListener {
 public:
  virtual void on_evict(BlockId block) = 0;

 protected:
  ~BlockEvictionListener() = default;
};

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  void set_eviction_listener(BlockEvictionListener* listener) { listener_ = listener; }

  // num_blocks blocks, each with one reference; nullopt (and nothing allocated, nothing evicted)
  // when fewer than num_blocks are free or evictable.
  std::optional<std::vector<BlockId>> allocate(int32_t num_blocks);
  // One more reference to a used or evictable block (an evictable block leaves the LRU list).
  // PD_CHECKs that the block is not free: its content is gone.
  void add_ref(BlockId block);
  // Drops one reference each; a block reaching zero becomes evictable if cached, else free.
  void release(BlockId block);
  void release(std::span<const BlockId> blocks);

  // Marks a used block as holding indexed (reusable) content: released, it stays evictable.
  void mark_cached(BlockId block);
  // Forgets that a cached block holds reusable content; if unreferenced it becomes free.
  void unmark_cached(BlockId block);

  int32_t capacity() const { return static_cast<int32_t>(ref_counts_.size()); }
  // Blocks allocate() can hand out now: free plus evictable. Always capacity() - num_used_blocks().
  int32_t num_free_blocks() const { return capacity() - num_used_; }
  // Blocks referenced by at least one sequence.
  int32_t num_used_blocks() const { return num_used_; }
  // Unreferenced cached blocks (a subset of num_free_blocks()).
  int32_t num_evictable_blocks() const { return num_evictable_; }
  // Blocks marked cached, used or not.
  int32_t num_cached_blocks() const { return num_cached_; }
  // Cached blocks allocate() has evicted since construction.
  int64_t num_evictions() const { return num_evictions_; }

  int32_t ref_count(BlockId block) const;
  bool is_cached(BlockId block) const;

  // Checks every invariant (each block in exactly one state and one list, counters in step);
  // O(capacity), for tests and debugging.
  Status validate() const;

 private:
  void check_block(BlockId block) const;
  void lru_push_back(BlockId block);
  void lru_remove(BlockId block);

  std::vector<int32_t> ref_counts_;  // by block
  std::vector<uint8_t> cached_;      // by block: 1 if marked cached
  std::vector<BlockId> free_list_;   // free blocks; allocate() pops from the back
  // Intrusive doubly linked LRU list of evictable blocks (head: released longest ago).
  std::vector<BlockId> lru_prev_;
  std::vector<BlockId> lru_next_;
  BlockId lru_head_ = kNoBlock;
  BlockId lru_tail_ = kNoBlock;
  int32_t num_used_ = 0;
  int32_t num_evictable_ = 0;
  int32_t num_cached_ = 0;
  int64_t num_evictions_ = 0;
  BlockEvictionListener* listener_ = nullptr;
};

}  // namespace pdserve

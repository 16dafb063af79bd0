#include "kvcache/block_pool.h"

#include <fmt/format.h>

namespace pdserve {

BlockPool::BlockPool(int32_t num_blocks)
    : ref_counts_(static_cast<size_t>(num_blocks >= 0 ? num_blocks : 0), 0),
      cached_(ref_counts_.size(), 0),
      lru_prev_(ref_counts_.size(), kNoBlock),
      lru_next_(ref_counts_.size(), kNoBlock) {
  PD_CHECK_MSG(num_blocks >= 0, "BlockPool needs a non-negative number of blocks");
  // NOTE: filled in reverse so that a fresh pool hands out blocks 0, 1, 2, ... (deterministic
  // tables make tests and logs easier to read).
  free_list_.reserve(ref_counts_.size());
  for (BlockId b = num_blocks - 1; b >= 0; --b) free_list_.push_back(b);
}

void BlockPool::check_block(BlockId block) const {
  PD_CHECK_MSG(block >= 0 && block < capacity(), "block id out of range");
}

std::optional<std::vector<BlockId>> BlockPool::allocate(int32_t num_blocks) {
  PD_CHECK_MSG(num_blocks >= 0, "allocate() of a negative number of blocks");
  if (num_blocks > num_free_blocks()) return std::nullopt;
  std::vector<BlockId> blocks;
  blocks.reserve(static_cast<size_t>(num_blocks));
  for (int32_t i = 0; i < num_blocks; ++i) {
    BlockId b;
    if (!free_list_.empty()) {
      b = free_list_.back();
      free_list_.pop_back();
    } else {
      b = lru_head_;
      PD_CHECK(b != kNoBlock);
      lru_remove(b);
      cached_[b] = 0;
      --num_cached_;
      ++num_evictions_;
      if (listener_ != nullptr) listener_->on_evict(b);
    }
    ref_counts_[b] = 1;
    ++num_used_;
    blocks.push_back(b);
  }
  return blocks;
}

void BlockPool::add_ref(BlockId block) {
  check_block(block);
  if (ref_counts_[block] == 0) {
    PD_CHECK_MSG(cached_[block] != 0, "add_ref() on a free block");
    lru_remove(block);
    ++num_used_;
  }
  ++ref_counts_[block];
}

void BlockPool::release(BlockId block) {
  check_block(block);
  PD_CHECK_MSG(ref_counts_[block] > 0, "release() of an unreferenced block");
  if (--ref_counts_[block] > 0) return;
  --num_used_;
  if (cached_[block] != 0) {
    lru_push_back(block);
  } else {
    free_list_.push_back(block);
  }
}

void BlockPool::release(std::span<const BlockId> blocks) {
  for (BlockId b : blocks) release(b);
}

void BlockPool::mark_cached(BlockId block) {
  check_block(block);
  PD_CHECK_MSG(ref_counts_[block] > 0, "mark_cached() of an unreferenced block");
  PD_CHECK_MSG(cached_[block] == 0, "mark_cached() of a block already cached");
  cached_[block] = 1;
  ++num_cached_;
}

void BlockPool::unmark_cached(BlockId block) {
  check_block(block);
  PD_CHECK_MSG(cached_[block] != 0, "unmark_cached() of a block that is not cached");
  cached_[block] = 0;
  --num_cached_;
  if (ref_counts_[block] == 0) {
    lru_remove(block);
    free_list_.push_back(block);
  }
}

int32_t BlockPool::ref_count(BlockId block) const {
  check_block(block);
  return ref_counts_[block];
}

bool BlockPool::is_cached(BlockId block) const {
  check_block(block);
  return cached_[block] != 0;
}

void BlockPool::lru_push_back(BlockId block) {
  lru_prev_[block] = lru_tail_;
  lru_next_[block] = kNoBlock;
  if (lru_tail_ != kNoBlock) {
    lru_next_[lru_tail_] = block;
  } else {
    lru_head_ = block;
  }
  lru_tail_ = block;
  ++num_evictable_;
}

void BlockPool::lru_remove(BlockId block) {
  BlockId prev = lru_prev_[block];
  BlockId next = lru_next_[block];
  if (prev != kNoBlock) {
    lru_next_[prev] = next;
  } else {
    lru_head_ = next;
  }
  if (next != kNoBlock) {
    lru_prev_[next] = prev;
  } else {
    lru_tail_ = prev;
  }
  lru_prev_[block] = kNoBlock;
  lru_next_[block] = kNoBlock;
  --num_evictable_;
}

Status BlockPool::validate() const {
  const int32_t n = capacity();
  // Where each block was found: 0 nowhere, 1 free list, 2 LRU list.
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  for (BlockId b : free_list_) {
    if (b < 0 || b >= n) return internal_error(fmt::format("free list holds invalid block {}", b));
    if (seen[b] != 0) return internal_error(fmt::format("block {} is twice in the free list", b));
    if (ref_counts_[b] != 0)
      return internal_error(fmt::format("free block {} has {} references", b, ref_counts_[b]));
    if (cached_[b] != 0) return internal_error(fmt::format("free block {} is marked cached", b));
    seen[b] = 1;
  }
  int32_t lru_length = 0;
  BlockId prev = kNoBlock;
  for (BlockId b = lru_head_; b != kNoBlock; b = lru_next_[b]) {
    if (b < 0 || b >= n) return internal_error(fmt::format("LRU list holds invalid block {}", b));
    if (seen[b] != 0) {
      return internal_error(fmt::format("block {} is in the LRU list and {}", b,
                                        seen[b] == 1 ? "the free list" : "again in the LRU list"));
    }
    if (lru_prev_[b] != prev) return internal_error(fmt::format("LRU back link of block {} is broken", b));
    if (ref_counts_[b] != 0) {
      return internal_error(fmt::format("evictable block {} has {} references", b, ref_counts_[b]));
    }
    if (cached_[b] == 0) return internal_error(fmt::format("evictable block {} is not cached", b));
    seen[b] = 2;
    prev = b;
    if (++lru_length > n) return internal_error("LRU list has a cycle");
  }
  if (prev != lru_tail_) return internal_error("LRU tail does not end the list");
  if (lru_length != num_evictable_) {
    return internal_error(fmt::format("LRU list has {} blocks, counter says {}", lru_length, num_evictable_));
  }
  int32_t used = 0;
  int32_t cached = 0;
  for (BlockId b = 0; b < n; ++b) {
    if (ref_counts_[b] < 0) return internal_error(fmt::format("block {} has a negative ref count", b));
    if (ref_counts_[b] > 0) {
      if (seen[b] != 0) return internal_error(fmt::format("used block {} is also in a free list", b));
      ++used;
    } else if (seen[b] == 0) {
      return internal_error(fmt::format("unreferenced block {} is in neither the free nor the LRU list", b));
    }
    if (cached_[b] != 0) ++cached;
  }
  if (used != num_used_)
    return internal_error(fmt::format("{} blocks used, counter says {}", used, num_used_));
  if (cached != num_cached_) {
    return internal_error(fmt::format("{} blocks cached, counter says {}", cached, num_cached_));
  }
  if (static_cast<int64_t>(free_list_.size()) + num_evictable_ + num_used_ != n) {
    return internal_error("free + evictable + used blocks do not add up to the capacity");
  }
  return ok_status();
}

}  // namespace pdserve

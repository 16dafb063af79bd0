#include "kvcache/kv_cache_manager.h"

#include <fmt/format.h>

#include <limits>

namespace pdserve {

KvCacheManager::KvCacheManager(const KvCacheConfig& config)
    : block_size_(config.block_size),
      prefix_caching_(config.enable_prefix_caching),
      pool_(config.num_blocks),
      // NOTE: without prefix caching the index stays empty, so it reserves no token storage.
      index_(config.enable_prefix_caching ? config.num_blocks : 0,
             config.block_size > 0 ? config.block_size : 1, config.block_hash) {
  PD_CHECK_MSG(config.block_size > 0, "KV block size must be positive");
  pool_.set_eviction_listener(this);
}

void KvCacheManager::on_evict(BlockId block) { index_.erase(block); }

KvCacheManager::Sequence& KvCacheManager::get(SequenceId seq) {
  auto it = sequences_.find(seq);
  PD_CHECK_MSG(it != sequences_.end(), "unknown sequence id");
  return it->second;
}

const KvCacheManager::Sequence& KvCacheManager::get(SequenceId seq) const {
  auto it = sequences_.find(seq);
  PD_CHECK_MSG(it != sequences_.end(), "unknown sequence id");
  return it->second;
}

std::span<const BlockId> KvCacheManager::block_table(SequenceId seq) const { return get(seq).blocks; }

int32_t KvCacheManager::num_slots(SequenceId seq) const { return get(seq).num_slots; }

Status KvCacheManager::check_fits(int32_t blocks_needed, int32_t blocks_reclaimable,
                                  int32_t total_blocks_of_sequence, int32_t num_tokens,
                                  const char* what) const {
  if (total_blocks_of_sequence > pool_.capacity()) {
    return out_of_range(
        fmt::format("{} of {} tokens needs {} KV blocks of {} tokens, but the KV cache has only {} "
                    "blocks in all",
                    what, num_tokens, total_blocks_of_sequence, block_size_, pool_.capacity()));
  }
  if (blocks_needed > blocks_reclaimable) {
    return resource_exhausted(fmt::format("{} of {} tokens needs {} more KV blocks but only {} are free",
                                          what, num_tokens, blocks_needed, blocks_reclaimable));
  }
  return ok_status();
}

StatusOr<SequenceAllocation> KvCacheManager::allocate_for(SequenceId seq,
                                                          std::span<const TokenId> prompt_tokens,
                                                          bool use_prefix_cache) {
  PD_CHECK_MSG(!contains(seq), "allocate_for() of a sequence that already exists");
  if (prompt_tokens.empty()) return invalid_argument("cannot allocate KV blocks for an empty prompt");
  if (prompt_tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return out_of_range(fmt::format("a prompt of {} tokens is too long", prompt_tokens.size()));
  }
  const int32_t num_tokens = static_cast<int32_t>(prompt_tokens.size());
  const int32_t total_blocks = blocks_for_tokens(num_tokens);

  PrefixIndex::Match match;
  if (prefix_caching_ && use_prefix_cache)
    match = index_.match(prompt_tokens, max_prefix_blocks(num_tokens, block_size_));
  const int32_t num_hit_blocks = static_cast<int32_t>(match.blocks.size());
  // Evictable hit blocks stop being reclaimable once referenced: count them out before checking.
  int32_t num_revived = 0;
  for (BlockId b : match.blocks) num_revived += pool_.ref_count(b) == 0 ? 1 : 0;
  PD_RETURN_IF_ERROR(check_fits(total_blocks - num_hit_blocks, pool_.num_free_blocks() - num_revived,
                                total_blocks, num_tokens, "a prompt"));

  // NOTE: take the hit blocks' references first, so allocate() cannot evict them.
  for (BlockId b : match.blocks) pool_.add_ref(b);
  std::optional<std::vector<BlockId>> fresh = pool_.allocate(total_blocks - num_hit_blocks);
  PD_CHECK(fresh.has_value());

  Sequence s;
  s.blocks = std::move(match.blocks);
  s.blocks.insert(s.blocks.end(), fresh->begin(), fresh->end());
  s.num_slots = num_tokens;
  s.num_committed_blocks = num_hit_blocks;
  s.last_committed = match.last;
  auto [it, inserted] = sequences_.emplace(seq, std::move(s));
  PD_CHECK(inserted);

  if (!use_prefix_cache) return SequenceAllocation{0, it->second.blocks};
  ++lookups_;
  queried_tokens_ += num_tokens;
  hit_tokens_ += static_cast<int64_t>(num_hit_blocks) * block_size_;
  conflicts_ += match.conflict ? 1 : 0;
  return SequenceAllocation{num_hit_blocks * block_size_, it->second.blocks};
}

int32_t KvCacheManager::blocks_needed_to_append(SequenceId seq, int32_t num_tokens) const {
  PD_CHECK_MSG(num_tokens >= 0, "negative number of tokens to append");
  const Sequence& s = get(seq);
  const int64_t slots = int64_t{s.num_slots} + num_tokens;
  const int64_t blocks = (slots + block_size_ - 1) / block_size_;
  return static_cast<int32_t>(
      std::min<int64_t>(blocks - static_cast<int64_t>(s.blocks.size()), std::numeric_limits<int32_t>::max()));
}

Status KvCacheManager::append_slots(SequenceId seq, int32_t num_tokens) {
  PD_CHECK_MSG(num_tokens >= 0, "negative number of tokens to append");
  Sequence& s = get(seq);
  if (num_tokens > std::numeric_limits<int32_t>::max() - s.num_slots) {
    return out_of_range(
        fmt::format("a sequence of {} tokens cannot grow by {} more", s.num_slots, num_tokens));
  }
  const int32_t new_slots = s.num_slots + num_tokens;
  const int32_t total_blocks = blocks_for_tokens(new_slots);
  const int32_t needed = total_blocks - static_cast<int32_t>(s.blocks.size());
  PD_RETURN_IF_ERROR(check_fits(needed, pool_.num_free_blocks(), total_blocks, new_slots, "a sequence"));
  if (needed > 0) {
    std::optional<std::vector<BlockId>> fresh = pool_.allocate(needed);
    PD_CHECK(fresh.has_value());
    s.blocks.insert(s.blocks.end(), fresh->begin(), fresh->end());
  }
  s.num_slots = new_slots;
  return ok_status();
}

void KvCacheManager::commit_full_blocks(SequenceId seq, std::span<const TokenId> tokens) {
  Sequence& s = get(seq);
  PD_CHECK_MSG(tokens.size() <= static_cast<size_t>(s.num_slots),
               "commit_full_blocks() beyond the sequence's slots");
  if (!prefix_caching_) return;
  const size_t bs = static_cast<size_t>(block_size_);
  const int32_t num_full = static_cast<int32_t>(tokens.size() / bs);
  for (int32_t i = s.num_committed_blocks; i < num_full; ++i) {
    const BlockId b = s.blocks[static_cast<size_t>(i)];
    PrefixIndex::InsertResult r =
        index_.insert(b, s.last_committed, tokens.subspan(static_cast<size_t>(i) * bs, bs));
    if (r.replaced != kNoBlock) pool_.unmark_cached(r.replaced);
    // A duplicate (another block holds the same prefix) stays uncached: it is freed, not kept,
    // when released. Later blocks still chain on the existing entry.
    if (r.inserted) pool_.mark_cached(b);
    s.last_committed = r.link;
    s.num_committed_blocks = i + 1;
  }
}

void KvCacheManager::free(SequenceId seq, bool uncache) {
  auto it = sequences_.find(seq);
  PD_CHECK_MSG(it != sequences_.end(), "free() of an unknown sequence id");
  if (uncache) {
    for (BlockId b : it->second.blocks) {
      if (pool_.ref_count(b) == 1 && pool_.is_cached(b)) {
        index_.erase(b);
        pool_.unmark_cached(b);
      }
    }
  }
  // NOTE: release the last block first, so a chain's later blocks enter the LRU list before (and
  // so are evicted before) its earlier ones: evicting an early block makes all later ones
  // unreachable anyway.
  const std::vector<BlockId>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) pool_.release(*b);
  sequences_.erase(it);
}

int32_t KvCacheManager::count_cached_tokens(std::span<const TokenId> prompt_tokens) const {
  if (!prefix_caching_ || prompt_tokens.empty()) return 0;
  const int32_t num_tokens =
      static_cast<int32_t>(std::min<size_t>(prompt_tokens.size(), std::numeric_limits<int32_t>::max()));
  PrefixIndex::Match m = index_.match(prompt_tokens, max_prefix_blocks(num_tokens, block_size_));
  return static_cast<int32_t>(m.blocks.size()) * block_size_;
}

KvCacheStats KvCacheManager::stats() const {
  KvCacheStats st;
  st.num_blocks_total = pool_.capacity();
  st.num_blocks_used = pool_.num_used_blocks();
  st.num_blocks_free = pool_.num_free_blocks();
  st.num_blocks_cached_evictable = pool_.num_evictable_blocks();
  st.num_blocks_cached = pool_.num_cached_blocks();
  st.num_sequences = num_sequences();
  st.prefix_lookups_total = lookups_;
  st.prefix_queried_tokens_total = queried_tokens_;
  st.prefix_hit_tokens_total = hit_tokens_;
  st.prefix_conflicts_total = conflicts_;
  st.evictions_total = pool_.num_evictions();
  return st;
}

Status KvCacheManager::validate() const {
  PD_RETURN_IF_ERROR(pool_.validate());
  if (prefix_caching_) PD_RETURN_IF_ERROR(index_.validate());
  std::vector<int32_t> refs(static_cast<size_t>(pool_.capacity()), 0);
  for (const auto& [id, s] : sequences_) {
    if (static_cast<int32_t>(s.blocks.size()) != blocks_for_tokens(s.num_slots)) {
      return internal_error(
          fmt::format("sequence {} has {} blocks for {} slots", id, s.blocks.size(), s.num_slots));
    }
    if (s.num_committed_blocks > static_cast<int32_t>(s.blocks.size()) ||
        int64_t{s.num_committed_blocks} * block_size_ > s.num_slots) {
      return internal_error(fmt::format("sequence {} has {} committed blocks", id, s.num_committed_blocks));
    }
    for (BlockId b : s.blocks) {
      if (b < 0 || b >= pool_.capacity())
        return internal_error(fmt::format("sequence {} holds invalid block {}", id, b));
      ++refs[b];
    }
  }
  for (const auto& [id, s] : sequences_) {
    // Blocks a sequence may still write must be its alone.
    for (size_t i = static_cast<size_t>(s.num_committed_blocks); i < s.blocks.size(); ++i) {
      if (refs[s.blocks[i]] != 1) {
        return internal_error(fmt::format("sequence {} writes block {}, which is shared", id, s.blocks[i]));
      }
    }
  }
  for (BlockId b = 0; b < pool_.capacity(); ++b) {
    if (refs[b] != pool_.ref_count(b)) {
      return internal_error(
          fmt::format("block {} is in {} tables but has {} references", b, refs[b], pool_.ref_count(b)));
    }
    const bool indexed = prefix_caching_ && index_.contains(b);
    if (indexed != pool_.is_cached(b)) {
      return internal_error(fmt::format("block {} is {}indexed but {}cached", b, indexed ? "" : "not ",
                                        pool_.is_cached(b) ? "" : "not "));
    }
  }
  return ok_status();
}

}  // namespace pdserve

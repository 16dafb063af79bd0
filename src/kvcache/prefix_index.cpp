#include "kvcache/prefix_index.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>

namespace pdserve {

uint64_t xxh3_block_hash(uint64_t parent_hash, std::span<const TokenId> block_tokens) {
  // NOTE: hashes the in-memory bytes of the token ids, so hashes agree only between hosts of the
  // same byte order (all supported ones are little-endian).
  return XXH3_64bits_withSeed(block_tokens.data(), block_tokens.size_bytes(), parent_hash);
}

PrefixIndex::PrefixIndex(int32_t num_blocks, int32_t block_size, BlockHashFn hash_fn)
    : block_size_(block_size),
      hash_fn_(hash_fn != nullptr ? hash_fn : &xxh3_block_hash),
      entries_(static_cast<size_t>(num_blocks >= 0 ? num_blocks : 0)),
      tokens_(entries_.size() * static_cast<size_t>(block_size > 0 ? block_size : 0)) {
  PD_CHECK_MSG(num_blocks >= 0, "PrefixIndex needs a non-negative number of blocks");
  PD_CHECK_MSG(block_size > 0, "PrefixIndex needs a positive block size");
}

std::span<const TokenId> PrefixIndex::tokens_of(BlockId block) const {
  return std::span<const TokenId>(tokens_).subspan(static_cast<size_t>(block) * block_size_,
                                                   static_cast<size_t>(block_size_));
}

bool PrefixIndex::contains(BlockId block) const {
  PD_CHECK_MSG(block >= 0 && static_cast<size_t>(block) < entries_.size(), "block id out of range");
  return entries_[block].id != 0;
}

PrefixIndex::Match PrefixIndex::match(std::span<const TokenId> tokens, int32_t max_blocks) const {
  Match m;
  const size_t bs = static_cast<size_t>(block_size_);
  const size_t limit = std::min(static_cast<size_t>(std::max(max_blocks, 0)), tokens.size() / bs);
  for (size_t i = 0; i < limit; ++i) {
    std::span<const TokenId> block_tokens = tokens.subspan(i * bs, bs);
    const uint64_t h = hash_fn_(m.last.hash, block_tokens);
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    const Entry& e = entries_[it->second];
    if (e.parent_id != m.last.entry_id || !std::ranges::equal(block_tokens, tokens_of(it->second))) {
      m.conflict = true;
      break;
    }
    m.blocks.push_back(it->second);
    m.last = {h, e.id};
  }
  return m;
}

PrefixIndex::InsertResult PrefixIndex::insert(BlockId block, const PrefixLink& parent,
                                              std::span<const TokenId> block_tokens) {
  PD_CHECK_MSG(!contains(block), "insert() of a block that is already indexed");
  PD_CHECK_MSG(block_tokens.size() == static_cast<size_t>(block_size_),
               "insert() needs one full block of tokens");
  InsertResult r;
  const uint64_t h = hash_fn_(parent.hash, block_tokens);
  auto it = by_hash_.find(h);
  if (it != by_hash_.end()) {
    const BlockId other = it->second;
    const Entry& e = entries_[other];
    if (e.parent_id == parent.entry_id && std::ranges::equal(block_tokens, tokens_of(other))) {
      r.link = {h, e.id};
      r.existing = other;
      return r;
    }
    r.replaced = other;
    entries_[other] = Entry{};
    it->second = block;
  } else {
    by_hash_.emplace(h, block);
  }
  Entry& e = entries_[block];
  e.hash = h;
  e.id = next_id_++;
  e.parent_id = parent.entry_id;
  std::ranges::copy(block_tokens, tokens_.begin() + static_cast<ptrdiff_t>(block) * block_size_);
  r.link = {h, e.id};
  r.inserted = true;
  return r;
}

void PrefixIndex::erase(BlockId block) {
  PD_CHECK_MSG(contains(block), "erase() of a block that is not indexed");
  auto it = by_hash_.find(entries_[block].hash);
  PD_CHECK(it != by_hash_.end() && it->second == block);
  by_hash_.erase(it);
  entries_[block] = Entry{};
}

Status PrefixIndex::validate() const {
  for (const auto& [h, block] : by_hash_) {
    if (block < 0 || static_cast<size_t>(block) >= entries_.size()) {
      return internal_error(fmt::format("hash {:#x} maps to invalid block {}", h, block));
    }
    const Entry& e = entries_[block];
    if (e.id == 0)
      return internal_error(fmt::format("hash {:#x} maps to block {}, which has no entry", h, block));
    if (e.hash != h)
      return internal_error(fmt::format("block {} is indexed under a hash not its own", block));
    if (e.id >= next_id_ || e.parent_id >= e.id) {
      return internal_error(
          fmt::format("block {} has entry id {} after parent {}", block, e.id, e.parent_id));
    }
  }
  size_t num_entries = 0;
  for (const Entry& e : entries_) num_entries += e.id != 0 ? 1 : 0;
  if (num_entries != by_hash_.size()) {
    return internal_error(
        fmt::format("{} blocks have entries but {} hashes are indexed", num_entries, by_hash_.size()));
  }
  return ok_status();
}

}  // namespace pdserve

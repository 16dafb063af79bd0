#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "kvcache/block_pool.h"
#include "kvcache/budget.h"
#include "kvcache/kv_cache_manager.h"
#include "kvcache/prefix_index.h"

namespace pdserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// count tokens: start, start + 1, ...
std::vector<TokenId> iota_tokens(int32_t count, TokenId start) {
  std::vector<TokenId> t(static_cast<size_t>(count));
  std::iota(t.begin(), t.end(), start);
  return t;
}

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<BlockId> to_vector(std::span<const BlockId> s) { return {s.begin(), s.end()}; }

// Every block hashes alike: each lookup past an indexed block is a collision.
uint64_t constant_hash(uint64_t, std::span<const TokenId>) { return 42; }
// Ignores the parent: equal blocks after different prefixes collide.
uint64_t tokens_only_hash(uint64_t, std::span<const TokenId> tokens) {
  uint64_t h = 0;
  for (TokenId t : tokens) h = h * 1000003u + static_cast<uint64_t>(t);
  return h;
}
// Few distinct values: frequent collisions of every kind.
uint64_t weak_hash(uint64_t parent, std::span<const TokenId> tokens) {
  uint64_t h = parent % 5;
  for (TokenId t : tokens) h += static_cast<uint64_t>(t);
  return h % 8;
}

struct RecordingListener : BlockEvictionListener {
  void on_evict(BlockId block) override { evicted.push_back(block); }
  std::vector<BlockId> evicted;
};

#define EXPECT_VALID(x)                       \
  do {                                        \
    Status st_ = (x).validate();              \
    EXPECT_TRUE(st_.ok()) << st_.to_string(); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// BlockPool

TEST(BlockPool, FreshPoolIsAllFreeAndHandsOutBlocksInOrder) {
  BlockPool pool(8);
  EXPECT_EQ(pool.capacity(), 8);
  EXPECT_EQ(pool.num_free_blocks(), 8);
  EXPECT_EQ(pool.num_used_blocks(), 0);
  auto blocks = pool.allocate(3);
  ASSERT_TRUE(blocks.has_value());
  EXPECT_THAT(*blocks, ElementsAre(0, 1, 2));
  EXPECT_EQ(pool.num_free_blocks(), 5);
  EXPECT_EQ(pool.num_used_blocks(), 3);
  for (BlockId b : *blocks) EXPECT_EQ(pool.ref_count(b), 1);
  EXPECT_VALID(pool);
  pool.release(*blocks);
  EXPECT_EQ(pool.num_free_blocks(), 8);
  EXPECT_EQ(pool.num_used_blocks(), 0);
  EXPECT_VALID(pool);
}

TEST(BlockPool, AllocationIsAllOrNothing) {
  BlockPool pool(4);
  auto first = pool.allocate(3);
  ASSERT_TRUE(first.has_value());
  EXPECT_FALSE(pool.allocate(2).has_value());
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_EQ(pool.num_used_blocks(), 3);
  auto none = pool.allocate(0);
  ASSERT_TRUE(none.has_value());
  EXPECT_TRUE(none->empty());
  auto last = pool.allocate(1);
  ASSERT_TRUE(last.has_value());
  EXPECT_FALSE(pool.allocate(1).has_value());
  EXPECT_VALID(pool);
  BlockPool empty(0);
  EXPECT_FALSE(empty.allocate(1).has_value());
  EXPECT_VALID(empty);
}

TEST(BlockPool, ReferencesAreCounted) {
  BlockPool pool(2);
  BlockId b = pool.allocate(1)->front();
  pool.add_ref(b);
  pool.add_ref(b);
  EXPECT_EQ(pool.ref_count(b), 3);
  pool.release(b);
  pool.release(b);
  EXPECT_EQ(pool.ref_count(b), 1);
  EXPECT_EQ(pool.num_used_blocks(), 1);
  pool.release(b);
  EXPECT_EQ(pool.ref_count(b), 0);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_VALID(pool);
}

TEST(BlockPool, EvictsUnreferencedCachedBlocksLeastRecentlyReleasedFirst) {
  BlockPool pool(4);
  RecordingListener listener;
  pool.set_eviction_listener(&listener);
  auto blocks = *pool.allocate(4);
  ASSERT_THAT(blocks, ElementsAre(0, 1, 2, 3));
  for (BlockId b : {0, 1, 2}) pool.mark_cached(b);
  EXPECT_EQ(pool.num_cached_blocks(), 3);
  for (BlockId b : {2, 0, 1, 3}) pool.release(b);
  EXPECT_EQ(pool.num_evictable_blocks(), 3);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  EXPECT_EQ(pool.num_used_blocks(), 0);
  EXPECT_VALID(pool);

  // The truly free block first, then the LRU head.
  EXPECT_THAT(*pool.allocate(2), ElementsAre(3, 2));
  EXPECT_THAT(listener.evicted, ElementsAre(2));
  EXPECT_FALSE(pool.is_cached(2));
  EXPECT_THAT(*pool.allocate(2), ElementsAre(0, 1));
  EXPECT_THAT(listener.evicted, ElementsAre(2, 0, 1));
  EXPECT_EQ(pool.num_evictions(), 3);
  EXPECT_EQ(pool.num_cached_blocks(), 0);
  EXPECT_VALID(pool);
}

TEST(BlockPool, AddRefRevivesAnEvictableBlock) {
  BlockPool pool(2);
  RecordingListener listener;
  pool.set_eviction_listener(&listener);
  auto blocks = *pool.allocate(2);
  pool.mark_cached(blocks[0]);
  pool.release(blocks);
  EXPECT_EQ(pool.num_evictable_blocks(), 1);
  pool.add_ref(blocks[0]);
  EXPECT_EQ(pool.num_evictable_blocks(), 0);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_THAT(*pool.allocate(1), ElementsAre(blocks[1]));
  EXPECT_FALSE(pool.allocate(1).has_value());
  EXPECT_TRUE(listener.evicted.empty());
  EXPECT_TRUE(pool.is_cached(blocks[0]));
  EXPECT_VALID(pool);
}

TEST(BlockPool, UnmarkCachedFreesAnUnreferencedBlock) {
  BlockPool pool(2);
  auto blocks = *pool.allocate(2);
  pool.mark_cached(blocks[0]);
  pool.mark_cached(blocks[1]);
  pool.release(blocks[0]);
  pool.unmark_cached(blocks[0]);  // evictable → free
  pool.unmark_cached(blocks[1]);  // used: stays used, freed on release
  EXPECT_EQ(pool.num_evictable_blocks(), 0);
  EXPECT_EQ(pool.num_cached_blocks(), 0);
  EXPECT_VALID(pool);
  pool.release(blocks[1]);
  EXPECT_EQ(pool.num_evictable_blocks(), 0);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_VALID(pool);
}

TEST(BlockPoolDeathTest, MisuseIsAProgrammerError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  BlockPool pool(2);
  EXPECT_DEATH(pool.release(0), "unreferenced");
  EXPECT_DEATH(pool.add_ref(1), "free block");
  EXPECT_DEATH(pool.mark_cached(1), "unreferenced");
  EXPECT_DEATH(pool.ref_count(2), "out of range");
}

// ---------------------------------------------------------------------------------------------
// PrefixIndex

TEST(PrefixIndex, MatchesTheLongestChainOfFullBlocks) {
  PrefixIndex index(8, 4);
  auto tokens = iota_tokens(10, 100);
  auto r0 = index.insert(5, PrefixLink{}, std::span(tokens).subspan(0, 4));
  ASSERT_TRUE(r0.inserted);
  auto r1 = index.insert(6, r0.link, std::span(tokens).subspan(4, 4));
  ASSERT_TRUE(r1.inserted);
  EXPECT_EQ(index.size(), 2);
  EXPECT_VALID(index);

  auto m = index.match(tokens, 8);
  EXPECT_THAT(m.blocks, ElementsAre(5, 6));
  EXPECT_EQ(m.last.hash, r1.link.hash);
  EXPECT_EQ(m.last.entry_id, r1.link.entry_id);
  EXPECT_FALSE(m.conflict);
  EXPECT_THAT(index.match(tokens, 1).blocks, ElementsAre(5));
  EXPECT_TRUE(index.match(tokens, 0).blocks.empty());
  // Fewer than two full blocks of query: only one can match.
  EXPECT_THAT(index.match(std::span(tokens).subspan(0, 7), 8).blocks, ElementsAre(5));

  auto diverged = tokens;
  diverged[5] = 7;
  EXPECT_THAT(index.match(diverged, 8).blocks, ElementsAre(5));
  diverged[0] = 7;
  EXPECT_TRUE(index.match(diverged, 8).blocks.empty());

  index.erase(5);
  EXPECT_FALSE(index.contains(5));
  EXPECT_TRUE(index.match(tokens, 8).blocks.empty());
  EXPECT_VALID(index);
}

TEST(PrefixIndex, HashCollisionIsAMissNeverAWrongReuse) {
  PrefixIndex index(4, 2, &constant_hash);
  std::vector<TokenId> a = {1, 2};
  std::vector<TokenId> b = {3, 4};
  ASSERT_TRUE(index.insert(0, PrefixLink{}, a).inserted);
  auto m = index.match(b, 1);
  EXPECT_TRUE(m.blocks.empty());
  EXPECT_TRUE(m.conflict);
  // Committing the colliding block replaces the old entry; the caller unmarks the old block.
  auto r = index.insert(1, PrefixLink{}, b);
  EXPECT_TRUE(r.inserted);
  EXPECT_EQ(r.replaced, 0);
  EXPECT_FALSE(index.contains(0));
  EXPECT_TRUE(index.match(a, 1).blocks.empty());
  EXPECT_THAT(index.match(b, 1).blocks, ElementsAre(1));
  EXPECT_VALID(index);
}

TEST(PrefixIndex, TheWholePrefixIsVerifiedNotJustTheBlock) {
  PrefixIndex index(4, 2, &tokens_only_hash);
  std::vector<TokenId> x_z = {1, 1, 9, 9};
  std::vector<TokenId> y_z = {2, 2, 9, 9};
  auto rx = index.insert(0, PrefixLink{}, std::span(x_z).subspan(0, 2));
  index.insert(1, rx.link, std::span(x_z).subspan(2, 2));
  index.insert(2, PrefixLink{}, std::span(y_z).subspan(0, 2));
  // Block "9 9" hashes alike after either prefix, but its KV was computed after "1 1".
  auto m = index.match(y_z, 2);
  EXPECT_THAT(m.blocks, ElementsAre(2));
  EXPECT_TRUE(m.conflict);
  EXPECT_THAT(index.match(x_z, 2).blocks, ElementsAre(0, 1));
}

TEST(PrefixIndex, AnIdenticalPrefixIsADuplicate) {
  PrefixIndex index(4, 2);
  std::vector<TokenId> a = {1, 2};
  auto first = index.insert(0, PrefixLink{}, a);
  auto second = index.insert(1, PrefixLink{}, a);
  EXPECT_FALSE(second.inserted);
  EXPECT_EQ(second.existing, 0);
  EXPECT_EQ(second.replaced, kNoBlock);
  EXPECT_EQ(second.link.hash, first.link.hash);
  EXPECT_EQ(second.link.entry_id, first.link.entry_id);
  EXPECT_FALSE(index.contains(1));
  EXPECT_EQ(index.size(), 1);
}

TEST(PrefixIndex, DefaultHashChainsOnTheParent) {
  std::vector<TokenId> t = {1, 2, 3, 4};
  EXPECT_EQ(xxh3_block_hash(7, t), xxh3_block_hash(7, t));
  EXPECT_NE(xxh3_block_hash(7, t), xxh3_block_hash(8, t));
  std::vector<TokenId> u = {1, 2, 3, 5};
  EXPECT_NE(xxh3_block_hash(7, t), xxh3_block_hash(7, u));
}

TEST(PrefixIndex, AtLeastOneTokenIsLeftToCompute) {
  EXPECT_EQ(max_prefix_blocks(0, 16), 0);
  EXPECT_EQ(max_prefix_blocks(1, 16), 0);
  EXPECT_EQ(max_prefix_blocks(16, 16), 0);
  EXPECT_EQ(max_prefix_blocks(17, 16), 1);
  EXPECT_EQ(max_prefix_blocks(32, 16), 1);
  EXPECT_EQ(max_prefix_blocks(33, 16), 2);
}

// ---------------------------------------------------------------------------------------------
// KvCacheManager

KvCacheConfig small_config(int32_t num_blocks, int32_t block_size = 4) {
  KvCacheConfig c;
  c.num_blocks = num_blocks;
  c.block_size = block_size;
  return c;
}

TEST(KvCacheManager, DefaultBlockSizeIs16) { EXPECT_EQ(KvCacheConfig{}.block_size, 16); }

TEST(KvCacheManager, AllocatesATableCoveringThePrompt) {
  KvCacheManager kv(small_config(16));
  auto prompt = iota_tokens(10, 0);
  auto a = kv.allocate_for(1, prompt);
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  EXPECT_EQ(a->num_cached_tokens, 0);
  EXPECT_THAT(to_vector(a->block_table), ElementsAre(0, 1, 2));
  EXPECT_EQ(kv.num_slots(1), 10);
  EXPECT_TRUE(kv.contains(1));
  EXPECT_EQ(kv.stats().num_blocks_used, 3);
  EXPECT_EQ(kv.stats().num_blocks_free, 13);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, SequencesSharingLeadingBlocksShareThem) {
  KvCacheManager kv(small_config(16));
  auto p1 = iota_tokens(10, 0);  // two full blocks and a partial one
  ASSERT_TRUE(kv.allocate_for(1, p1).ok());
  kv.commit_full_blocks(1, p1);
  EXPECT_EQ(kv.stats().num_blocks_cached, 2);

  auto p2 = concat(iota_tokens(8, 0), iota_tokens(5, 50));
  auto a2 = kv.allocate_for(2, p2);
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(a2->num_cached_tokens, 8);
  auto t1 = to_vector(kv.block_table(1));
  auto t2 = to_vector(kv.block_table(2));
  ASSERT_EQ(t2.size(), 4u);
  EXPECT_EQ(t2[0], t1[0]);
  EXPECT_EQ(t2[1], t1[1]);
  EXPECT_NE(t2[2], t1[2]);
  EXPECT_EQ(kv.block_pool().ref_count(t1[0]), 2);
  EXPECT_EQ(kv.block_pool().ref_count(t1[1]), 2);
  EXPECT_EQ(kv.block_pool().ref_count(t1[2]), 1);
  EXPECT_EQ(kv.stats().num_blocks_used, 5);
  EXPECT_VALID(kv);

  kv.free(1);
  EXPECT_EQ(kv.block_pool().ref_count(t1[0]), 1);
  EXPECT_EQ(kv.block_pool().ref_count(t1[2]), 0);
  EXPECT_VALID(kv);

  KvCacheStats st = kv.stats();
  EXPECT_EQ(st.prefix_lookups_total, 2);
  EXPECT_EQ(st.prefix_queried_tokens_total, 23);
  EXPECT_EQ(st.prefix_hit_tokens_total, 8);
  EXPECT_EQ(st.num_sequences, 1);
}

// free() with `uncache` takes the sequence's cached blocks out of the prefix index, except those
// another sequence holds: its KV is suspect, so no later prompt reuses it.
TEST(KvCacheManager, UncachingAFreedSequenceKeepsOnlyTheBlocksOthersHold) {
  for (const bool uncache : {false, true}) {
    KvCacheManager kv(small_config(16));
    auto p1 = iota_tokens(13, 0);  // three full blocks and a partial one
    ASSERT_TRUE(kv.allocate_for(1, p1).ok());
    kv.commit_full_blocks(1, p1);
    auto p2 = concat(iota_tokens(4, 0), iota_tokens(5, 50));  // shares the first block
    auto a2 = kv.allocate_for(2, p2);
    ASSERT_TRUE(a2.ok());
    EXPECT_EQ(a2->num_cached_tokens, 4);
    EXPECT_EQ(kv.stats().num_blocks_cached, 3);
    kv.free(1, uncache);
    EXPECT_VALID(kv);
    const KvCacheStats st = kv.stats();
    EXPECT_EQ(st.num_blocks_cached, uncache ? 1 : 3) << uncache;  // 1: the block sequence 2 holds
    EXPECT_EQ(st.num_blocks_cached_evictable, uncache ? 0 : 2) << uncache;
    EXPECT_EQ(st.num_blocks_free, 16 - 3);  // free-listed or evictable, the same room either way
    EXPECT_EQ(kv.count_cached_tokens(p1), uncache ? 4 : 12) << uncache;
    kv.free(2);
    EXPECT_VALID(kv);
    EXPECT_EQ(kv.count_cached_tokens(p1), uncache ? 4 : 12) << uncache;
  }
}

TEST(KvCacheManager, APartialLastBlockIsNeverShared) {
  KvCacheManager kv(small_config(16));
  auto p = iota_tokens(6, 0);
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  kv.commit_full_blocks(1, p);
  EXPECT_EQ(kv.stats().num_blocks_cached, 1);
  auto a2 = kv.allocate_for(2, p);
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(a2->num_cached_tokens, 4);
  EXPECT_EQ(kv.block_table(2)[0], kv.block_table(1)[0]);
  EXPECT_NE(kv.block_table(2)[1], kv.block_table(1)[1]);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, AtLeastOnePromptTokenIsLeftToCompute) {
  KvCacheManager kv(small_config(16));
  auto p = iota_tokens(8, 0);  // exactly two full blocks
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  kv.commit_full_blocks(1, p);
  EXPECT_EQ(kv.stats().num_blocks_cached, 2);
  EXPECT_EQ(kv.count_cached_tokens(p), 4);
  auto a2 = kv.allocate_for(2, p);
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(a2->num_cached_tokens, 4);
  auto longer = concat(p, {99});
  EXPECT_EQ(kv.count_cached_tokens(longer), 8);
  auto a3 = kv.allocate_for(3, longer);
  ASSERT_TRUE(a3.ok());
  EXPECT_EQ(a3->num_cached_tokens, 8);
  EXPECT_EQ(kv.count_cached_tokens(std::vector<TokenId>{0}), 0);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, AppendSlotsGrowsTheTableAllOrNothing) {
  KvCacheManager kv(small_config(4));
  ASSERT_TRUE(kv.allocate_for(1, iota_tokens(5, 0)).ok());
  EXPECT_EQ(kv.block_table(1).size(), 2u);
  EXPECT_EQ(kv.blocks_needed_to_append(1, 3), 0);
  ASSERT_TRUE(kv.append_slots(1, 3).ok());
  EXPECT_EQ(kv.block_table(1).size(), 2u);
  EXPECT_EQ(kv.num_slots(1), 8);
  EXPECT_EQ(kv.blocks_needed_to_append(1, 1), 1);
  ASSERT_TRUE(kv.append_slots(1, 1).ok());
  EXPECT_EQ(kv.block_table(1).size(), 3u);
  ASSERT_TRUE(kv.append_slots(1, 0).ok());

  ASSERT_TRUE(kv.allocate_for(2, iota_tokens(1, 0)).ok());
  EXPECT_FALSE(kv.can_allocate(1));
  Status full = kv.append_slots(1, 4);
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted) << full.to_string();
  EXPECT_THAT(full.message(), HasSubstr("needs 1 more KV blocks but only 0 are free"));
  EXPECT_EQ(kv.block_table(1).size(), 3u);
  EXPECT_EQ(kv.num_slots(1), 9);
  Status never = kv.append_slots(1, 100);
  EXPECT_EQ(never.code(), StatusCode::kOutOfRange) << never.to_string();
  EXPECT_THAT(never.message(), HasSubstr("only 4 blocks in all"));
  EXPECT_EQ(kv.num_slots(1), 9);
  EXPECT_VALID(kv);

  kv.free(2);
  EXPECT_TRUE(kv.can_allocate(1));
  EXPECT_TRUE(kv.append_slots(1, 3).ok());
  EXPECT_EQ(kv.block_table(1).size(), 3u);
  EXPECT_TRUE(kv.append_slots(1, 4).ok());
  EXPECT_EQ(kv.block_table(1).size(), 4u);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, AFailedAllocationChangesNothing) {
  KvCacheManager kv(small_config(4));
  auto shared = iota_tokens(9, 0);
  ASSERT_TRUE(kv.allocate_for(1, shared).ok());
  kv.commit_full_blocks(1, shared);
  kv.free(1);  // two cached evictable blocks, one free
  ASSERT_TRUE(kv.allocate_for(2, iota_tokens(1, 500)).ok());
  const KvCacheStats before = kv.stats();
  EXPECT_EQ(before.num_blocks_cached_evictable, 2);

  // Would hit both cached blocks and need two fresh ones: three blocks are free, but taking the
  // two hits out of the LRU leaves only one.
  auto wants_too_much = concat(shared, iota_tokens(4, 100));
  auto r = kv.allocate_for(3, wants_too_much);
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().to_string();
  EXPECT_FALSE(kv.contains(3));
  const KvCacheStats after = kv.stats();
  EXPECT_EQ(after.num_blocks_free, before.num_blocks_free);
  EXPECT_EQ(after.num_blocks_cached_evictable, before.num_blocks_cached_evictable);
  EXPECT_EQ(after.prefix_lookups_total, before.prefix_lookups_total);
  EXPECT_EQ(after.evictions_total, 0);
  EXPECT_EQ(kv.count_cached_tokens(shared), 8);

  auto never = kv.allocate_for(4, iota_tokens(17, 0));
  EXPECT_EQ(never.status().code(), StatusCode::kOutOfRange) << never.status().to_string();
  EXPECT_THAT(never.status().message(), HasSubstr("a prompt of 17 tokens needs 5 KV blocks of 4 tokens"));
  auto empty = kv.allocate_for(5, std::vector<TokenId>{});
  EXPECT_EQ(empty.status().code(), StatusCode::kInvalidArgument);
  EXPECT_VALID(kv);

  // What fits does succeed, reusing the cached blocks.
  auto fits = kv.allocate_for(6, concat(shared, iota_tokens(2, 100)));
  ASSERT_TRUE(fits.ok()) << fits.status().to_string();
  EXPECT_EQ(fits->num_cached_tokens, 8);
  EXPECT_EQ(kv.stats().num_blocks_free, 0);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, FreeAfterUseReturnsThePoolToFullyFree) {
  for (bool prefix_caching : {true, false}) {
    KvCacheConfig c = small_config(32);
    c.enable_prefix_caching = prefix_caching;
    KvCacheManager kv(c);
    auto base = iota_tokens(12, 0);
    for (SequenceId s = 0; s < 5; ++s) {
      auto p = concat(base, iota_tokens(static_cast<int32_t>(s) + 1, 100 * static_cast<TokenId>(s + 1)));
      ASSERT_TRUE(kv.allocate_for(s, p).ok());
      kv.commit_full_blocks(s, p);
      ASSERT_TRUE(kv.append_slots(s, 5).ok());
      EXPECT_VALID(kv);
    }
    for (SequenceId s = 0; s < 5; ++s) kv.free(s);
    KvCacheStats st = kv.stats();
    EXPECT_EQ(st.num_blocks_used, 0);
    EXPECT_EQ(st.num_blocks_free, st.num_blocks_total);
    EXPECT_EQ(st.num_sequences, 0);
    if (prefix_caching) {
      EXPECT_GT(st.num_blocks_cached_evictable, 0);
      EXPECT_GT(st.prefix_hit_tokens_total, 0);
    } else {
      EXPECT_EQ(st.num_blocks_cached_evictable, 0);
      EXPECT_EQ(st.prefix_hit_tokens_total, 0);
    }
    EXPECT_EQ(st.num_blocks_cached, st.num_blocks_cached_evictable);
    EXPECT_VALID(kv);
    // Every block can be handed out again.
    ASSERT_TRUE(kv.allocate_for(99, iota_tokens(32 * 4, 7000)).ok());
    EXPECT_EQ(kv.stats().num_blocks_free, 0);
    EXPECT_EQ(kv.stats().num_blocks_cached, 0);
    EXPECT_VALID(kv);
  }
}

TEST(KvCacheManager, EvictsTheLeastRecentlyFreedSequenceFirst) {
  KvCacheManager kv(small_config(6));
  std::vector<std::vector<TokenId>> prompts = {iota_tokens(5, 100), iota_tokens(5, 200), iota_tokens(5, 300)};
  for (SequenceId s = 0; s < 3; ++s) {
    ASSERT_TRUE(kv.allocate_for(s, prompts[s]).ok());
    kv.commit_full_blocks(s, prompts[s]);
    kv.free(s);
  }
  EXPECT_EQ(kv.stats().num_blocks_cached_evictable, 3);
  // A hit on sequence 0's block makes it the most recently used.
  ASSERT_TRUE(kv.allocate_for(10, prompts[0]).ok());
  kv.free(10);
  // Three free blocks, then one eviction: sequence 1's block, released longest ago.
  ASSERT_TRUE(kv.allocate_for(11, iota_tokens(13, 900)).ok());
  EXPECT_EQ(kv.stats().evictions_total, 1);
  EXPECT_EQ(kv.count_cached_tokens(prompts[0]), 4);
  EXPECT_EQ(kv.count_cached_tokens(prompts[1]), 0);
  EXPECT_EQ(kv.count_cached_tokens(prompts[2]), 4);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, EvictsTheTailOfAChainBeforeItsHead) {
  KvCacheManager kv(small_config(4));
  auto p = iota_tokens(13, 0);  // three full blocks and one token
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  kv.commit_full_blocks(1, p);
  kv.free(1);
  EXPECT_EQ(kv.count_cached_tokens(p), 12);
  ASSERT_TRUE(kv.allocate_for(2, iota_tokens(8, 500)).ok());  // the free block plus one eviction
  EXPECT_EQ(kv.stats().evictions_total, 1);
  EXPECT_EQ(kv.count_cached_tokens(p), 8);
  kv.free(2);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, ADuplicateBlockIsNotCachedTwiceAndChainsStillLink) {
  KvCacheManager kv(small_config(16));
  auto p = iota_tokens(9, 0);
  // Both compute the same prompt before either commits.
  ASSERT_EQ(kv.allocate_for(1, p)->num_cached_tokens, 0);
  ASSERT_EQ(kv.allocate_for(2, p)->num_cached_tokens, 0);
  kv.commit_full_blocks(1, p);
  kv.commit_full_blocks(2, p);
  EXPECT_EQ(kv.stats().num_blocks_cached, 2);
  EXPECT_FALSE(kv.block_pool().is_cached(kv.block_table(2)[0]));
  EXPECT_VALID(kv);

  // Sequence 2 decodes on: its third block follows sequence 1's cached second block.
  auto generated = concat(p, {50, 51, 52, 53});
  ASSERT_TRUE(kv.append_slots(2, 4).ok());
  kv.commit_full_blocks(2, generated);
  EXPECT_EQ(kv.stats().num_blocks_cached, 3);
  auto t1 = to_vector(kv.block_table(1));
  auto t2 = to_vector(kv.block_table(2));
  kv.free(1);
  kv.free(2);
  EXPECT_EQ(kv.stats().num_blocks_cached_evictable, 3);
  EXPECT_VALID(kv);

  auto a3 = kv.allocate_for(3, concat(generated, {60}));
  ASSERT_TRUE(a3.ok());
  EXPECT_EQ(a3->num_cached_tokens, 12);
  auto t3 = to_vector(a3->block_table);
  EXPECT_EQ(t3[0], t1[0]);
  EXPECT_EQ(t3[1], t1[1]);
  EXPECT_EQ(t3[2], t2[2]);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, CommitIsIncremental) {
  KvCacheManager kv(small_config(8));
  auto p = iota_tokens(3, 0);
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  kv.commit_full_blocks(1, p);
  EXPECT_EQ(kv.stats().num_blocks_cached, 0);
  std::vector<TokenId> tokens = p;
  for (TokenId t = 10; t < 20; ++t) {
    ASSERT_TRUE(kv.append_slots(1, 1).ok());
    tokens.push_back(t);
    kv.commit_full_blocks(1, tokens);
    EXPECT_EQ(kv.stats().num_blocks_cached, static_cast<int32_t>(tokens.size()) / 4);
    EXPECT_VALID(kv);
  }
  EXPECT_EQ(kv.count_cached_tokens(concat(tokens, {1})), 12);
}

TEST(KvCacheManager, CollisionsNeverReuseTheWrongBlocks) {
  KvCacheConfig c = small_config(16);
  c.block_hash = &constant_hash;
  KvCacheManager kv(c);
  auto p = iota_tokens(9, 0);
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  kv.commit_full_blocks(1, p);  // the second block's entry replaces the first's
  EXPECT_EQ(kv.stats().num_blocks_cached, 1);
  EXPECT_VALID(kv);
  auto a2 = kv.allocate_for(2, p);
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(a2->num_cached_tokens, 0);
  EXPECT_EQ(kv.stats().prefix_conflicts_total, 1);
  auto other = iota_tokens(9, 1000);
  auto a3 = kv.allocate_for(3, other);
  ASSERT_TRUE(a3.ok());
  EXPECT_EQ(a3->num_cached_tokens, 0);
  EXPECT_VALID(kv);
}

TEST(KvCacheManager, WithoutPrefixCachingNothingIsShared) {
  KvCacheConfig c = small_config(8);
  c.enable_prefix_caching = false;
  KvCacheManager kv(c);
  auto p = iota_tokens(9, 0);
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  kv.commit_full_blocks(1, p);
  auto a2 = kv.allocate_for(2, p);
  ASSERT_TRUE(a2.ok());
  EXPECT_EQ(a2->num_cached_tokens, 0);
  EXPECT_EQ(kv.stats().num_blocks_cached, 0);
  EXPECT_EQ(kv.count_cached_tokens(p), 0);
  kv.free(1);
  kv.free(2);
  EXPECT_EQ(kv.stats().num_blocks_cached_evictable, 0);
  EXPECT_VALID(kv);
}

TEST(KvCacheManagerDeathTest, MisuseIsAProgrammerError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  KvCacheManager kv(small_config(8));
  auto p = iota_tokens(5, 0);
  ASSERT_TRUE(kv.allocate_for(1, p).ok());
  EXPECT_DEATH((void)kv.allocate_for(1, p), "already exists");
  EXPECT_DEATH(kv.free(2), "unknown sequence");
  EXPECT_DEATH(kv.commit_full_blocks(1, iota_tokens(9, 0)), "beyond the sequence's slots");
}

// Many sequences allocate, grow, commit and free at random; after every step the invariants hold
// and every block taken from the cache holds exactly the KV of the prefix it stands for.
class KvCacheStress : public ::testing::TestWithParam<BlockHashFn> {};

TEST_P(KvCacheStress, InvariantsHoldAndHitsAreExact) {
  constexpr int32_t kNumBlocks = 48;
  constexpr int32_t kBlockSize = 4;
  KvCacheConfig c = small_config(kNumBlocks, kBlockSize);
  c.block_hash = GetParam();
  KvCacheManager kv(c);
  std::mt19937 rng(20240817);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };

  // What each block's KV would be: the tokens from position 0 to the end of what was written.
  std::vector<std::vector<TokenId>> content(kNumBlocks);
  struct Live {
    std::vector<TokenId> tokens;  // written (KV computed)
  };
  std::map<SequenceId, Live> live;
  std::vector<std::vector<TokenId>> system_prompts;
  for (int i = 0; i < 4; ++i) {
    std::vector<TokenId> sp(static_cast<size_t>(uniform(0, 11)));
    for (TokenId& t : sp) t = uniform(0, 2);
    system_prompts.push_back(sp);
  }
  auto write = [&](SequenceId seq, size_t from_position) {
    const auto& tokens = live[seq].tokens;
    auto table = kv.block_table(seq);
    for (size_t i = from_position / kBlockSize; i * kBlockSize < tokens.size(); ++i) {
      ASSERT_EQ(kv.block_pool().ref_count(table[i]), 1) << "writing a shared block";
      const size_t end = std::min(tokens.size(), (i + 1) * kBlockSize);
      content[table[i]].assign(tokens.begin(), tokens.begin() + static_cast<ptrdiff_t>(end));
    }
  };

  SequenceId next_seq = 0;
  int64_t hits = 0;
  int num_failures = 0;
  for (int step = 0; step < 4000; ++step) {
    const int op = uniform(0, 9);
    if (op < 4 || live.empty()) {
      std::vector<TokenId> prompt = system_prompts[static_cast<size_t>(uniform(0, 3))];
      for (int n = uniform(1, 10); n > 0; --n) prompt.push_back(uniform(0, 2));
      const int32_t expected_hit = kv.count_cached_tokens(prompt);
      const KvCacheStats before = kv.stats();
      const SequenceId seq = next_seq++;
      auto a = kv.allocate_for(seq, prompt);
      if (!a.ok()) {
        ASSERT_EQ(a.status().code(), StatusCode::kResourceExhausted) << a.status().to_string();
        const KvCacheStats after = kv.stats();
        ASSERT_EQ(after.num_blocks_free, before.num_blocks_free);
        ASSERT_EQ(after.num_blocks_cached, before.num_blocks_cached);
        ASSERT_EQ(after.num_blocks_cached_evictable, before.num_blocks_cached_evictable);
        ASSERT_FALSE(kv.contains(seq));
        ++num_failures;
      } else {
        ASSERT_EQ(a->num_cached_tokens, expected_hit);
        ASSERT_LT(a->num_cached_tokens, static_cast<int32_t>(prompt.size()));
        hits += a->num_cached_tokens;
        for (int32_t i = 0; i < a->num_cached_tokens / kBlockSize; ++i) {
          const auto& held = content[a->block_table[i]];
          ASSERT_TRUE(held.size() == static_cast<size_t>((i + 1) * kBlockSize) &&
                      std::equal(held.begin(), held.end(), prompt.begin()))
              << "block " << i << " of sequence " << seq << " reused with the wrong content";
        }
        live[seq].tokens = prompt;
        write(seq, static_cast<size_t>(a->num_cached_tokens));
        if (uniform(0, 4) > 0) kv.commit_full_blocks(seq, prompt);
      }
    } else if (op < 8) {
      auto it = std::next(live.begin(), uniform(0, static_cast<int>(live.size()) - 1));
      const int32_t n = uniform(1, 6);
      Status st = kv.append_slots(it->first, n);
      if (!st.ok()) {
        ASSERT_TRUE(st.code() == StatusCode::kResourceExhausted || st.code() == StatusCode::kOutOfRange)
            << st.to_string();
        ASSERT_EQ(kv.num_slots(it->first), static_cast<int32_t>(it->second.tokens.size()));
        ++num_failures;
      } else {
        const size_t from = it->second.tokens.size();
        for (int32_t i = 0; i < n; ++i) it->second.tokens.push_back(uniform(0, 2));
        write(it->first, from);
        if (uniform(0, 4) > 0) kv.commit_full_blocks(it->first, it->second.tokens);
      }
    } else {
      auto it = std::next(live.begin(), uniform(0, static_cast<int>(live.size()) - 1));
      kv.free(it->first);
      live.erase(it);
    }

    Status valid = kv.validate();
    ASSERT_TRUE(valid.ok()) << "step " << step << ": " << valid.to_string();
    const KvCacheStats st = kv.stats();
    ASSERT_EQ(st.num_blocks_free + st.num_blocks_used, kNumBlocks);
    ASSERT_LE(st.num_blocks_cached_evictable, st.num_blocks_free);
    int64_t table_entries = 0;
    int64_t refs = 0;
    for (const auto& [seq, l] : live) {
      table_entries += static_cast<int64_t>(kv.block_table(seq).size());
      ASSERT_EQ(kv.num_slots(seq), static_cast<int32_t>(l.tokens.size()));
    }
    for (BlockId b = 0; b < kNumBlocks; ++b) refs += kv.block_pool().ref_count(b);
    ASSERT_EQ(refs, table_entries);
    ASSERT_EQ(st.num_sequences, static_cast<int32_t>(live.size()));
  }
  // The workload must exercise hits, evictions and pressure, or the test proves little.
  EXPECT_GT(hits, 0);
  EXPECT_GT(kv.stats().evictions_total, 0);
  EXPECT_GT(num_failures, 0);
  if (GetParam() == &weak_hash) {
    EXPECT_GT(kv.stats().prefix_conflicts_total, 0);
  }

  for (const auto& [seq, l] : live) kv.free(seq);
  EXPECT_EQ(kv.stats().num_blocks_free, kNumBlocks);
  EXPECT_VALID(kv);
}

INSTANTIATE_TEST_SUITE_P(Hashes, KvCacheStress, ::testing::Values(&xxh3_block_hash, &weak_hash),
                         [](const auto& p) { return p.index == 0 ? "xxh3" : "weak"; });

// ---------------------------------------------------------------------------------------------
// Memory budget

TEST(KvMemoryBudget, ParsesSizes) {
  struct Case {
    const char* text;
    uint64_t bytes;
  };
  for (const Case& c : std::vector<Case>{{"1073741824", 1073741824ull},
                                         {"2GiB", 2ull << 30},
                                         {"512MiB", 512ull << 20},
                                         {" 512 mib ", 512ull << 20},
                                         {"1.5GiB", 3ull << 29},
                                         {"4g", 4ull << 30},
                                         {"64K", 64ull << 10},
                                         {"1TiB", 1ull << 40},
                                         {"3KB", 3000},
                                         {"2GB", 2000000000ull},
                                         {"100B", 100},
                                         {"1", 1},
                                         {"18446744073709551615", 18446744073709551615ull}}) {
    auto b = parse_kv_memory_budget(c.text);
    ASSERT_TRUE(b.ok()) << c.text << ": " << b.status().to_string();
    EXPECT_EQ(b->kind, KvMemoryBudget::Kind::kBytes) << c.text;
    EXPECT_EQ(b->bytes, c.bytes) << c.text;
  }
}

TEST(KvMemoryBudget, ParsesFractions) {
  struct Case {
    const char* text;
    double fraction;
  };
  for (const Case& c : std::vector<Case>{{"0.5", 0.5},
                                         {".25", 0.25},
                                         {"1.0", 1.0},
                                         {"1.", 1.0},
                                         {"50%", 0.5},
                                         {"100%", 1.0},
                                         {"12.5 %", 0.125}}) {
    auto b = parse_kv_memory_budget(c.text);
    ASSERT_TRUE(b.ok()) << c.text << ": " << b.status().to_string();
    EXPECT_EQ(b->kind, KvMemoryBudget::Kind::kFraction) << c.text;
    EXPECT_DOUBLE_EQ(b->fraction, c.fraction) << c.text;
  }
}

TEST(KvMemoryBudget, RejectsBadInputWithAClearMessage) {
  struct Case {
    const char* text;
    StatusCode code;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {"", StatusCode::kInvalidArgument, "KV cache memory is empty; expected a size like 2GiB"},
           {"   ", StatusCode::kInvalidArgument, "is empty"},
           {"abc", StatusCode::kInvalidArgument, "'abc' is not a number"},
           {".", StatusCode::kInvalidArgument, "'.' is not a number"},
           {"nan", StatusCode::kInvalidArgument, "is not a number"},
           {"-1GiB", StatusCode::kInvalidArgument, "'-1GiB' must be positive"},
           {"0", StatusCode::kInvalidArgument, "'0' is zero bytes"},
           {"0GiB", StatusCode::kInvalidArgument, "is zero bytes"},
           {"0.0", StatusCode::kInvalidArgument, "'0.0' must be greater than zero"},
           {"0%", StatusCode::kInvalidArgument, "must be greater than zero"},
           {"1.5", StatusCode::kInvalidArgument,
            "a fraction must be in (0, 1]; a size needs a unit, like 1.5GiB"},
           {"150%", StatusCode::kInvalidArgument, "a percentage must be in (0%, 100%]"},
           {"2GiBs", StatusCode::kInvalidArgument, "'2GiBs' has an unknown unit 'GiBs'; use B, KiB"},
           {"1e9", StatusCode::kInvalidArgument, "unknown unit 'e9'"},
           {"1.2.3", StatusCode::kInvalidArgument, "unknown unit '.3'"},
           {"18446744073709551616", StatusCode::kOutOfRange, "is too large"},
           {"20000000000GiB", StatusCode::kOutOfRange, "is too large"},
           {"16777216.5TiB", StatusCode::kOutOfRange, "is too large"},
       }) {
    auto b = parse_kv_memory_budget(c.text);
    ASSERT_FALSE(b.ok()) << "'" << c.text << "' parsed";
    EXPECT_EQ(b.status().code(), c.code) << c.text << ": " << b.status().to_string();
    EXPECT_THAT(b.status().message(), HasSubstr(c.message)) << c.text;
  }
}

TEST(KvMemoryBudget, TurnsABudgetIntoBlocks) {
  // SmolLM2-135M-like geometry: 30 layers, 3 KV heads of 64, fp16, 16 tokens per block.
  auto per_block = kv_bytes_per_block(30, 3, 64, 16, 2);
  ASSERT_TRUE(per_block.ok());
  EXPECT_EQ(*per_block, 2ull * 30 * 3 * 64 * 16 * 2);

  auto from_bytes = kv_blocks_for_budget("1GiB", *per_block, std::nullopt);
  ASSERT_TRUE(from_bytes.ok()) << from_bytes.status().to_string();
  EXPECT_EQ(*from_bytes, static_cast<int32_t>((1ull << 30) / *per_block));

  auto from_fraction = kv_blocks_for_budget("0.5", 1000, uint64_t{10000});
  ASSERT_TRUE(from_fraction.ok());
  EXPECT_EQ(*from_fraction, 5);
  auto rounded_down = kv_blocks_for_budget("2500B", 1000, uint64_t{10000});
  ASSERT_TRUE(rounded_down.ok());
  EXPECT_EQ(*rounded_down, 2);

  auto unknown = kv_blocks_for_budget("0.5", 1000, std::nullopt);
  EXPECT_EQ(unknown.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(unknown.status().message(), HasSubstr("available memory is unknown"));

  auto too_big = kv_blocks_for_budget("2GiB", 1000, uint64_t{1} << 30);
  EXPECT_EQ(too_big.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(too_big.status().message(),
              HasSubstr("KV cache memory of 2.00 GiB is more than the 1.00 GiB available"));

  auto too_small = kv_blocks_for_budget("512", 1024, std::nullopt);
  EXPECT_EQ(too_small.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(too_small.status().message(),
              HasSubstr("512 B holds no KV block of 1.00 KiB; give at least 1.00 KiB"));

  auto too_many = kv_blocks_for_budget("1TiB", 16, std::nullopt);
  EXPECT_EQ(too_many.status().code(), StatusCode::kOutOfRange);
  EXPECT_THAT(too_many.status().message(), HasSubstr("more than the 2147483647 supported"));

  auto bad_text = kv_blocks_for_budget("lots", 16, std::nullopt);
  EXPECT_EQ(bad_text.status().code(), StatusCode::kInvalidArgument);

  EXPECT_EQ(kv_blocks_for_budget("1GiB", 0, std::nullopt).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(kv_bytes_per_block(0, 3, 64, 16, 2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(kv_bytes_per_block(1 << 30, 1 << 30, 1 << 30, 16, 2).status().code(), StatusCode::kOutOfRange);
}

TEST(KvMemoryBudget, FormatsBytes) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(1536), "1.50 KiB");
  EXPECT_EQ(format_bytes(2ull << 30), "2.00 GiB");
}

}  // namespace
}  // namespace pdserve

#include "transfer/kv_layout.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "transfer/transfer_test_util.h"

namespace pdserve {
namespace {

using testing::blocks_for;
using ::testing::HasSubstr;
using testing::random_table;
using testing::reference_body;
using testing::test_layout;
using testing::TestKv;

TEST(KvLayoutTest, Sizes) {
  const KvLayout l = test_layout(1, 30, 192);
  EXPECT_EQ(l.row_bytes(), 384u);
  EXPECT_EQ(l.token_bytes(), 2u * 30 * 384);
  EXPECT_EQ(l.body_bytes(10), 10u * 2 * 30 * 384);
  EXPECT_EQ(l.layer_body_bytes(10), 10u * 2 * 384);
  KvLayout f32 = l;
  f32.dtype = KvDtype::kF32;
  EXPECT_EQ(f32.row_bytes(), 768u);
  EXPECT_EQ(*l.checked_body_bytes(7), l.body_bytes(7));
}

TEST(KvLayoutTest, ValidateNamesTheField) {
  KvLayout l = test_layout();
  EXPECT_TRUE(l.validate().ok());
  l.num_layers = 0;
  EXPECT_THAT(l.validate().message(), HasSubstr("num_layers 0"));
  l = test_layout();
  l.kv_width = kMaxKvWidth + 1;
  EXPECT_THAT(l.validate().message(), HasSubstr("kv_width 65537"));
  l = test_layout();
  l.dtype = static_cast<KvDtype>(9);
  EXPECT_THAT(l.validate().message(), HasSubstr("dtype 9"));
  EXPECT_FALSE(l.checked_body_bytes(1).ok());
  EXPECT_FALSE(test_layout().checked_body_bytes(-1).ok());
  EXPECT_FALSE(test_layout().checked_body_bytes(int64_t{1} << 40).ok());
}

TEST(KvLayoutTest, ViewValidate) {
  TestKv kv(test_layout(), 16, 4);
  EXPECT_TRUE(kv.view.validate().ok());
  PagedKvView v = kv.view;
  v.block_bytes -= 1;
  EXPECT_THAT(v.validate().message(), HasSubstr("block_bytes"));
  v = kv.view;
  v.block_size = 0;
  EXPECT_THAT(v.validate().message(), HasSubstr("block_size 0"));
  v = kv.view;
  v.base = nullptr;
  EXPECT_THAT(v.validate().message(), HasSubstr("no base"));
}

TEST(KvLayoutTest, GatherMatchesRowByRowOracle) {
  std::mt19937 rng(1);
  for (int32_t bs : {1, 4, 16}) {
    for (int32_t tokens : {0, 1, 15, 16, 17, 50}) {
      TestKv kv(test_layout(), bs, blocks_for(64, bs) + 3, /*pad_bytes=*/bs == 4 ? 32 : 0);
      kv.fill_random(rng);
      const auto table = random_table(rng, kv.view.num_blocks, blocks_for(tokens, bs));
      std::vector<uint8_t> body(kv.view.layout.body_bytes(tokens));
      ASSERT_TRUE(gather_kv(kv.view, table, tokens, body).ok());
      EXPECT_EQ(body, reference_body(kv, table, tokens))
          << "block size " << bs << ", " << tokens << " tokens";
    }
  }
}

// Prefill and decode page differently: 16 → 4, 16 → 64, 16 → 1, 5 → 7, with fragmented tables
// and token counts that are not multiples of either block size.
TEST(KvLayoutTest, ScatterRoundTripsBetweenBlockSizes) {
  std::mt19937 rng(2);
  const std::vector<std::pair<int32_t, int32_t>> sizes = {{16, 4}, {16, 64}, {16, 1}, {5, 7}, {64, 16}};
  for (auto [src_bs, dst_bs] : sizes) {
    for (int32_t tokens : {1, 37, 100, 129}) {
      const KvLayout layout = test_layout(7, 4, 12);
      TestKv src(layout, src_bs, blocks_for(130, src_bs) + 2);
      src.fill_random(rng);
      const auto src_table = random_table(rng, src.view.num_blocks, blocks_for(tokens, src_bs));
      std::vector<uint8_t> body(layout.body_bytes(tokens));
      ASSERT_TRUE(gather_kv(src.view, src_table, tokens, body).ok());

      TestKv dst(layout, dst_bs, blocks_for(130, dst_bs) + 5, 0, 0xAB);
      // The table may be longer than needed (room for generated tokens).
      const auto dst_table = random_table(rng, dst.view.num_blocks, blocks_for(tokens, dst_bs) + 1);
      ASSERT_TRUE(scatter_kv(body, tokens, dst.view, dst_table).ok());
      for (int32_t l = 0; l < layout.num_layers; ++l)
        for (int32_t part = 0; part < 2; ++part)
          for (int32_t t = 0; t < tokens; ++t)
            ASSERT_EQ(0, std::memcmp(src.row(src_table, l, part, t), dst.row(dst_table, l, part, t),
                                     layout.row_bytes()))
                << src_bs << " -> " << dst_bs << ", " << tokens << " tokens, layer " << l << " part " << part
                << " token " << t;

      // Nothing outside the sequence's rows was written.
      std::vector<bool> owned(static_cast<size_t>(dst.view.num_blocks), false);
      for (int32_t i = 0; i < blocks_for(tokens, dst_bs); ++i)
        owned[static_cast<size_t>(dst_table[i])] = true;
      for (int32_t b = 0; b < dst.view.num_blocks; ++b) {
        if (owned[static_cast<size_t>(b)]) continue;
        const uint8_t* p = dst.view.base + static_cast<size_t>(b) * dst.view.block_bytes;
        ASSERT_TRUE(std::all_of(p, p + dst.view.block_bytes, [](uint8_t x) { return x == 0xAB; }))
            << "block " << b;
      }
      const int32_t last_rows = tokens % dst_bs;
      if (last_rows != 0) {
        const int32_t last = dst_table[static_cast<size_t>(blocks_for(tokens, dst_bs) - 1)];
        for (int32_t l = 0; l < layout.num_layers; ++l)
          for (int32_t part = 0; part < 2; ++part) {
            const uint8_t* p = dst.view.base + static_cast<size_t>(last) * dst.view.block_bytes +
                               ((2 * l + part) * dst_bs + last_rows) * layout.row_bytes();
            const size_t n = static_cast<size_t>(dst_bs - last_rows) * layout.row_bytes();
            ASSERT_TRUE(std::all_of(p, p + n, [](uint8_t x) { return x == 0xAB; }));
          }
      }

      // And the decode's gather gives back the same body.
      std::vector<uint8_t> again(body.size());
      ASSERT_TRUE(gather_kv(dst.view, dst_table, tokens, again).ok());
      EXPECT_EQ(again, body);
    }
  }
}

TEST(KvLayoutTest, LayerAndRangePiecesAssembleTheSameBlocks) {
  std::mt19937 rng(3);
  const KvLayout layout = test_layout(7, 5, 6, KvDtype::kF32);
  const int32_t tokens = 45;
  TestKv src(layout, 8, 10);
  src.fill_random(rng);
  const auto src_table = random_table(rng, 10, blocks_for(tokens, 8));
  const std::vector<uint8_t> body = reference_body(src, src_table, tokens);

  // Layer by layer.
  TestKv by_layer(layout, 3, 20);
  const auto table1 = random_table(rng, 20, blocks_for(tokens, 3));
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    std::vector<uint8_t> part(layout.layer_body_bytes(tokens));
    ASSERT_TRUE(gather_kv_layer(src.view, src_table, tokens, l, part).ok());
    EXPECT_TRUE(std::equal(part.begin(), part.end(), body.begin() + static_cast<ptrdiff_t>(l * part.size())));
    ASSERT_TRUE(scatter_kv_layer(part, l, tokens, by_layer.view, table1).ok());
  }
  std::vector<uint8_t> out(body.size());
  ASSERT_TRUE(gather_kv(by_layer.view, table1, tokens, out).ok());
  EXPECT_EQ(out, body);

  // In chunks of random sizes, as bytes arrive from a socket (chunks split rows too).
  TestKv by_chunk(layout, 16, 4);
  const auto table2 = random_table(rng, 4, blocks_for(tokens, 16));
  std::uniform_int_distribution<size_t> chunk(1, 1000);
  for (size_t off = 0; off < body.size();) {
    const size_t n = std::min(chunk(rng), body.size() - off);
    ASSERT_TRUE(scatter_kv_range({body.data() + off, n}, off, tokens, by_chunk.view, table2).ok());
    std::vector<uint8_t> back(n);
    ASSERT_TRUE(gather_kv_range(by_chunk.view, table2, tokens, off, back).ok());
    ASSERT_TRUE(std::equal(back.begin(), back.end(), body.begin() + static_cast<ptrdiff_t>(off)));
    off += n;
  }
  ASSERT_TRUE(gather_kv(by_chunk.view, table2, tokens, out).ok());
  EXPECT_EQ(out, body);
}

// Copies of 32 MiB and more take the streaming-store path, split over threads: odd row sizes, a
// misaligned flat buffer, different block sizes and any number of parts must still round-trip
// exactly.
TEST(KvLayoutTest, LargeCopiesRoundTrip) {
  std::mt19937 rng(4);
  const KvLayout layout = test_layout(9, 40, 7);  // 14-byte rows: nothing is 16-byte aligned
  const int32_t tokens = 31000;                   // a 34.7 MB body
  TestKv src(layout, 5, blocks_for(tokens, 5) + 3);
  src.fill_random(rng);
  const auto src_table = random_table(rng, src.view.num_blocks, blocks_for(tokens, 5));
  const uint64_t body_bytes = layout.body_bytes(tokens);
  ASSERT_GE(body_bytes, uint64_t{32} << 20);
  const std::vector<uint8_t> expected = reference_body(src, src_table, tokens);
  struct RestoreThreads {
    ~RestoreThreads() { set_kv_copy_threads(0); }
  } restore;
  for (const int threads : {1, 2, 3, 4}) {
    SCOPED_TRACE(::testing::Message() << threads << " threads");
    set_kv_copy_threads(threads);
    ASSERT_EQ(kv_copy_threads_for(body_bytes), threads);
    const uint64_t part = kv_copy_part_bytes(body_bytes);
    ASSERT_EQ(part % 64, 0u);
    ASSERT_EQ((body_bytes + part - 1) / part, static_cast<uint64_t>(threads)) << "parts";
    std::vector<uint8_t> storage(body_bytes + 1);
    const std::span<uint8_t> body(storage.data() + 1, body_bytes);  // misaligned on purpose
    ASSERT_TRUE(gather_kv(src.view, src_table, tokens, body).ok());
    ASSERT_TRUE(std::equal(body.begin(), body.end(), expected.begin()));

    TestKv dst(layout, 16, blocks_for(tokens, 16) + 2);
    const auto dst_table = random_table(rng, dst.view.num_blocks, blocks_for(tokens, 16));
    ASSERT_TRUE(scatter_kv(body, tokens, dst.view, dst_table).ok());
    // Read back in 1 MiB pieces (the plain memcpy path).
    std::vector<uint8_t> piece(1 << 20);
    for (uint64_t off = 0; off < body_bytes; off += piece.size()) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(piece.size(), body_bytes - off));
      ASSERT_TRUE(gather_kv_range(dst.view, dst_table, tokens, off, {piece.data(), n}).ok());
      ASSERT_TRUE(std::equal(piece.begin(), piece.begin() + static_cast<ptrdiff_t>(n),
                             expected.begin() + static_cast<ptrdiff_t>(off)))
          << "at body offset " << off;
    }
  }
}

TEST(KvLayoutTest, BadTablesAndSizesAreStatuses) {
  TestKv kv(test_layout(), 4, 8);
  const std::vector<int32_t> table = {3, 1, 7};
  std::vector<uint8_t> body(kv.view.layout.body_bytes(12));

  EXPECT_TRUE(scatter_kv(body, 12, kv.view, table).ok());
  std::vector<uint8_t> big(kv.view.layout.body_bytes(13));
  EXPECT_THAT(scatter_kv(big, 13, kv.view, table).message(), HasSubstr("need 4 blocks"));
  EXPECT_THAT(gather_kv(kv.view, table, 13, big).message(), HasSubstr("the block table has 3"));
  EXPECT_THAT(scatter_kv(big, 12, kv.view, table).message(), HasSubstr("expected"));
  const std::vector<int32_t> bad_high = {3, 8, 1};
  EXPECT_THAT(scatter_kv(body, 12, kv.view, bad_high).message(), HasSubstr("entry 1 names block 8"));
  const std::vector<int32_t> bad_negative = {-1, 2, 1};
  EXPECT_THAT(scatter_kv(body, 12, kv.view, bad_negative).message(), HasSubstr("block -1"));
  EXPECT_THAT(scatter_kv({}, -1, kv.view, table).message(), HasSubstr("negative"));
  std::vector<uint8_t> layer(kv.view.layout.layer_body_bytes(12));
  EXPECT_THAT(scatter_kv_layer(layer, 3, 12, kv.view, table).message(), HasSubstr("layer 3"));
  EXPECT_THAT(scatter_kv_layer(layer, -1, 12, kv.view, table).message(), HasSubstr("layer -1"));
  EXPECT_THAT(scatter_kv_range(layer, body.size() - 10, 12, kv.view, table).message(), HasSubstr("exceeds"));
  EXPECT_THAT(gather_kv_range(kv.view, table, 12, UINT64_MAX - 2, layer).message(), HasSubstr("exceeds"));
  PagedKvView broken = kv.view;
  broken.block_bytes = 1;
  EXPECT_THAT(scatter_kv(body, 12, broken, table).message(), HasSubstr("block_bytes"));
}

}  // namespace
}  // namespace pdserve

// Test helpers for src/transfer (tests only): paged KV memory owned by a vector, random
// contents and fragmented block tables, and an independent, row-by-row oracle of the wire body.
// Not thread-safe; plain values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "transfer/kv_layout.h"

namespace pdserve::testing {

inline KvLayout test_layout(uint64_t fingerprint = 0xfeedf00d12345678ull, int32_t num_layers = 3,
                            int32_t kv_width = 8, KvDtype dtype = KvDtype::kF16) {
  return KvLayout{fingerprint, dtype, num_layers, kv_width};
}

// A paged KV region of num_blocks blocks (block_bytes = used + pad_bytes), filled with `fill`.
struct TestKv {
  std::vector<uint8_t> memory;
  PagedKvView view;

  TestKv(const KvLayout& layout, int32_t block_size, int32_t num_blocks, size_t pad_bytes = 0,
         uint8_t fill = 0) {
    view.layout = layout;
    view.block_size = block_size;
    view.num_blocks = num_blocks;
    view.block_bytes = view.used_block_bytes() + pad_bytes;
    memory.assign(view.block_bytes * static_cast<size_t>(num_blocks), fill);
    view.base = memory.data();
  }
  TestKv(const TestKv&) = delete;
  TestKv& operator=(const TestKv&) = delete;

  void fill_random(std::mt19937& rng) {
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : memory) b = static_cast<uint8_t>(byte(rng));
  }
  // Row `token` (a position of the sequence) of layer l, K (kv = 0) or V (kv = 1).
  const uint8_t* row(const std::vector<int32_t>& table, int32_t layer, int32_t kv, int32_t token) const {
    const size_t r = view.layout.row_bytes();
    const size_t bs = static_cast<size_t>(view.block_size);
    const size_t block = static_cast<size_t>(table[static_cast<size_t>(token) / bs]);
    return view.base + block * view.block_bytes +
           ((2 * static_cast<size_t>(layer) + kv) * bs + token % bs) * r;
  }
};

// `count` distinct blocks of [0, num_blocks) in random order (a fragmented block table).
inline std::vector<int32_t> random_table(std::mt19937& rng, int32_t num_blocks, int32_t count) {
  std::vector<int32_t> all(static_cast<size_t>(num_blocks));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(count));
  return all;
}

inline int32_t blocks_for(int32_t num_tokens, int32_t block_size) {
  return (num_tokens + block_size - 1) / block_size;
}

// The wire body, row by row (independent of for_each_kv_run).
inline std::vector<uint8_t> reference_body(const TestKv& kv, const std::vector<int32_t>& table,
                                           int32_t num_tokens) {
  const size_t r = kv.view.layout.row_bytes();
  std::vector<uint8_t> body;
  body.reserve(kv.view.layout.body_bytes(num_tokens));
  for (int32_t l = 0; l < kv.view.layout.num_layers; ++l)
    for (int32_t part = 0; part < 2; ++part)
      for (int32_t t = 0; t < num_tokens; ++t) {
        const uint8_t* p = kv.row(table, l, part, t);
        body.insert(body.end(), p, p + r);
      }
  return body;
}

}  // namespace pdserve::testing

// KvStorage: the memory of a paged KV cache for one model on the CPU. Block-major: block b is
// one contiguous range holding, for every layer in order, block_size token rows of K and then of
// V (IEEE half, num_kv_heads × head_dim per row). So a sequence touches only the memory of its
// own blocks (the buffer is lazily zeroed), and a block moves between instances as one range.
// Which block belongs to which sequence is decided elsewhere (kvcache/ keeps that metadata);
// this only owns bytes. Not thread-safe: written by the engine thread's forward pass.
#pragma once

#include <cstdint>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/page_buffer.h"
#include "model/model_config.h"

namespace pdserve {

class KvStorage {
 public:
  KvStorage(const ModelConfig& config, int32_t num_blocks, int32_t block_size)
      : num_blocks_(num_blocks),
        block_size_(block_size),
        num_kv_heads_(config.num_kv_heads),
        head_dim_(config.head_dim),
        rows_halves_(static_cast<int64_t>(block_size) * config.kv_dim()),
        block_halves_(2 * rows_halves_ * config.num_layers),
        data_(static_cast<size_t>(block_halves_) * static_cast<size_t>(num_blocks) * sizeof(uint16_t)) {}

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  size_t bytes() const { return data_.size(); }
  // Bytes of one block (all layers, K and V).
  size_t block_bytes() const { return static_cast<size_t>(block_halves_) * sizeof(uint16_t); }
  uint8_t* block_data(int32_t block) { return data_.data() + static_cast<size_t>(block) * block_bytes(); }

  cpu::PagedKvLayer layer(int32_t layer_idx) {
    auto* base = reinterpret_cast<uint16_t*>(data_.data()) + 2 * rows_halves_ * layer_idx;
    return {base, base + rows_halves_, block_size_, num_kv_heads_, head_dim_, block_halves_};
  }

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int32_t num_kv_heads_;
  int32_t head_dim_;
  int64_t rows_halves_;   // one layer's K (or V) rows of one block
  int64_t block_halves_;  // one block, all layers, K and V
  cpu::PageBuffer data_;  // lazily zero, huge pages
};

}  // namespace pdserve

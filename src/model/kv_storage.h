// KvStorage: the memory of a paged KV cache for one model on the CPU — for every layer,
// num_blocks blocks of block_size token rows of K and of V (IEEE half). Which block belongs to
// which sequence is decided elsewhere (kvcache/ keeps that metadata); this only owns bytes.
// Not thread-safe: written by the engine thread's forward pass.
#pragma once

#include <cstdint>
#include <vector>

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
        elements_(static_cast<size_t>(config.num_layers) * num_blocks * block_size * config.kv_dim()),
        k_(elements_ * sizeof(uint16_t)),
        v_(elements_ * sizeof(uint16_t)) {}

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  size_t bytes() const { return k_.size() + v_.size(); }

  cpu::PagedKvLayer layer(int32_t layer_idx) {
    size_t per_layer = static_cast<size_t>(num_blocks_) * block_size_ * num_kv_heads_ * head_dim_;
    return {reinterpret_cast<uint16_t*>(k_.data()) + layer_idx * per_layer,
            reinterpret_cast<uint16_t*>(v_.data()) + layer_idx * per_layer, block_size_, num_kv_heads_,
            head_dim_};
  }

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int32_t num_kv_heads_;
  int32_t head_dim_;
  size_t elements_;
  cpu::PageBuffer k_;  // lazily zero, huge pages: only the blocks in use become resident
  cpu::PageBuffer v_;
};

}  // namespace pdserve

// LlamaModel: the Llama-family forward pass (llama, qwen2) on the CPU over a paged KV cache.
//
// One call runs a batch of sequence chunks — prefill chunks of any length and single decode
// tokens mixed — and returns logits for the chunks that ask for them. Weights are views into
// the GgufFile's memory map (still quantized). Batch invariance: a token's logits do not depend
// on the other chunks in the batch or on how its prompt was chunked.
// Thread-safety: forward() is called from one thread at a time (it uses internal scratch); the
// model's weights are immutable.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/page_buffer.h"
#include "model/gguf.h"
#include "model/kv_storage.h"
#include "model/model_config.h"

namespace pdserve {

struct SequenceChunk {
  int32_t first_position = 0;            // tokens of this sequence already in the KV cache
  int32_t num_tokens = 0;                // tokens of this chunk, consecutive in ForwardBatch::tokens
  std::span<const int32_t> block_table;  // covers positions [0, first_position + num_tokens)
  bool want_logits = false;              // logits of the chunk's last token
};

struct ForwardBatch {
  std::span<const int32_t> tokens;  // all chunks' tokens, chunk after chunk
  std::vector<SequenceChunk> chunks;
  // Called on the forward pass's thread once layer l's KV is written for every chunk, where the
  // executor reports layers (ModelExecutor::reports_layers); a layer-wise KV send hooks in here.
  std::function<void(int32_t layer)> after_layer;
};

class LlamaModel {
 public:
  // Validates the tensors against the config (names, shapes, supported types) and keeps `file`.
  static StatusOr<std::unique_ptr<LlamaModel>> load(std::shared_ptr<const GgufFile> file);

  const ModelConfig& config() const { return config_; }
  const GgufFile& file() const { return *file_; }
  uint64_t fingerprint() const { return fingerprint_; }  // GgufFile::fingerprint(), taken at load

  // Runs the batch; writes vocab_size floats per chunk with want_logits, in chunk order, to
  // `logits` (which must hold that many rows). Thread-safe: concurrent calls (engines of
  // several roles sharing the weights in one process) run one at a time.
  Status forward(const ForwardBatch& batch, KvStorage& kv, ThreadPool& pool, float* logits);

 private:
  struct Layer {
    const float* attn_norm = nullptr;
    const float* ffn_norm = nullptr;
    cpu::Weights wq, wk, wv, wo, w_gate, w_up, w_down;
    const float* bq = nullptr;
    const float* bk = nullptr;
    const float* bv = nullptr;
  };

  LlamaModel() = default;
  // Moves every weight matrix out of the file mapping into weights_, in its compute layout.
  void to_compute_layout();

  ModelConfig config_;
  std::shared_ptr<const GgufFile> file_;
  uint64_t fingerprint_ = 0;
  cpu::Weights token_embd_;
  cpu::Weights output_;
  const float* output_norm_ = nullptr;
  std::vector<float> rope_freq_factors_;
  std::vector<Layer> layers_;
  cpu::PageBuffer weights_;  // the matrices above point here

  std::mutex forward_mu_;  // one forward pass at a time: the scratch below is shared
  // Scratch, resized per call; guarded by forward_mu_.
  cpu::AlignedBuffer<float> x_, xn_, q_, k_, v_, attn_, gate_, up_, tmp_, scores_, rope_cos_, rope_sin_;
  cpu::AlignedBuffer<float> final_;
  cpu::Activations acts_;
};

}  // namespace pdserve

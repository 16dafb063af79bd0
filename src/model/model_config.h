// ModelConfig: the hyperparameters of a Llama-family model (architectures `llama` and `qwen2`)
// read from GGUF metadata, with validation. Plain data; no thread-safety concerns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/gguf.h"

namespace pdserve {

enum class RopeOrdering {
  kNormal,  // rotate adjacent pairs (x[2i], x[2i+1]) — GGUF `llama` (weights are permuted)
  kNeox,    // rotate halves (x[i], x[i + d/2]) — `qwen2`
};

struct RopeScaling {
  // Llama 3.x frequency scaling ("llama3" rope type); factor 0 means none.
  float factor = 0.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int32_t original_context_length = 8192;
};

// The sizes a model file gives (GGUF metadata, a Hugging Face config.json), each already within
// its own range; ModelConfig::set_shape() checks how they fit together.
struct ModelShape {
  int64_t layers = 0;
  int64_t hidden = 0;
  int64_t ffn = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t rope_dim = 0;
  int64_t context = 0;
};

struct ModelConfig {
  std::string architecture;  // "llama" or "qwen2"
  std::string name;
  int32_t num_layers = 0;
  int32_t hidden_size = 0;  // d_model
  int32_t ffn_size = 0;     // SwiGLU inner width
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;  // rope applies to the first rope_dim of each head
  int32_t rope_dim = 0;
  int32_t vocab_size = 0;
  int32_t context_length = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeOrdering rope_ordering = RopeOrdering::kNormal;
  RopeScaling rope_scaling;
  bool has_qkv_bias = false;     // qwen2
  bool tied_embeddings = false;  // no output.weight: the LM head reuses token_embd

  int32_t q_dim() const { return num_heads * head_dim; }
  int32_t kv_dim() const { return num_kv_heads * head_dim; }
  // K and V for every layer, at `bytes_per_element` (2 for an f16 cache).
  int64_t kv_bytes_per_token(int32_t bytes_per_element) const {
    return int64_t{2} * num_layers * kv_dim() * bytes_per_element;
  }

  // Sets the size fields from `shape` once they fit together: heads a multiple of kv heads, an
  // even rope_dim within the head. INVALID_ARGUMENT says which does not (the caller adds where).
  Status set_shape(const ModelShape& shape);

  static StatusOr<ModelConfig> from_gguf(const GgufFile& file);
};

// Llama 3 frequency scaling as divisors of each of the rope_dim/2 rotary frequencies (for a file
// that carries the scaling parameters but no rope_freqs tensor).
std::vector<float> llama3_freq_factors(const ModelConfig& c);

// The fingerprint of a synthetic model ("synthetic:llama-3.1-8b" with weights from `seed`, a
// vocabulary of vocab_size): what its instances report, and what a gateway serving that name
// expects of them.
uint64_t synthetic_model_fingerprint(std::string_view name, uint64_t seed, int32_t vocab_size);

}  // namespace pdserve

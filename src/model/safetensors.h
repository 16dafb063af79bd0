// Hugging Face checkpoints: safetensors files and the directory around them.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each
// tensor's name to {"dtype", "shape", "data_offsets": [begin, end]} (byte offsets into the data
// that follows the header; an optional "__metadata__" entry is ignored), then the data. The file
// is untrusted: a bad length, JSON, dtype, shape or offset is a Status naming the file, the tensor
// and the problem — never a crash, an over-read or a huge allocation. Tensors are read-only views
// into a memory map.
//
// A checkpoint directory holds config.json (the architecture) and either model.safetensors or
// model.safetensors.index.json with the shards its "weight_map" names. Architectures: LlamaForCausalLM
// ("llama") and Qwen2ForCausalLM ("qwen2"); Hugging Face's rotary embedding rotates halves (NeoX
// ordering). What pdserve does not compute (another activation, MLP or output biases, a sliding
// window, rope scaling other than llama3) is refused, never silently dropped; rope_theta and its
// scaling are also read from "rope_parameters" (transformers 5). Headers are read up to 16 MB.
// Immutable after opening; share freely across threads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "model/model_config.h"

namespace pdserve {

enum class SafetensorsDtype { kF32, kF16, kBF16, kOther };

struct SafetensorsTensor {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kOther;
  std::string dtype_name;  // as written ("BF16", "I64", ...)
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // no alignment promised: copy it out (memcpy), never cast it
  size_t bytes = 0;
  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  static StatusOr<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  // Parses bytes that outlive the result (tests, fuzzing). `source` names them in errors.
  static StatusOr<std::unique_ptr<SafetensorsFile>> parse(std::span<const uint8_t> bytes, std::string source);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const SafetensorsTensor* find(std::string_view name) const;
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // The JSON header's bytes and the data section (for fingerprints).
  std::string_view header() const { return header_; }
  std::string_view data() const { return data_; }

 private:
  SafetensorsFile() = default;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::string_view header_;
  std::string_view data_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
};

// The ModelConfig a Hugging Face config.json describes (its text; `source` names it in errors).
StatusOr<ModelConfig> model_config_from_hf(std::string_view config_json, std::string_view source);

class HfCheckpoint {
 public:
  // Opens dir/config.json and the safetensors shards.
  static StatusOr<std::unique_ptr<HfCheckpoint>> open(const std::string& dir);
  const ModelConfig& config() const { return config_; }
  // A tensor by its Hugging Face name ("model.layers.0.self_attn.q_proj.weight"), or nullptr.
  const SafetensorsTensor* find(std::string_view name) const;
  // Every tensor of every shard, shard by shard.
  std::vector<const SafetensorsTensor*> tensors() const;
  // Elements of the parameters in the shards (biases included; not rotary `inv_freq` buffers,
  // nor a stored `lm_head.weight` of a model whose output head is tied to its embedding).
  int64_t num_parameters() const;
  // Of config.json, every shard's header (and the first and last 64 KiB of its data) and the
  // tokenizer files present (tokenizer.json, tokenizer_config.json, chat_template.*).
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  HfCheckpoint() = default;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  uint64_t fingerprint_ = 0;
};

}  // namespace pdserve

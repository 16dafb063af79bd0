// Test support: the default model (or any llama-family GGUF) written out as a Hugging Face
// checkpoint directory, for the tests of pdserve's readers of such directories, or as a bf16 GGUF
// (the GPU tests' CPU reference). Not part of
// pdserve: tests and the make_hf_checkpoint tool link it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"
#include "model/gguf.h"
#include "model/model_config.h"

namespace pdserve {

struct HfCheckpointOptions {
  // The matrices' dtype: "BF16", "F16" or "F32". They hold the same bf16-rounded values in each (F32
  // exactly; F16 exactly except where a value is below F16's normal range).
  std::string dtype = "BF16";
  // A Qwen2 checkpoint ("model_type": "qwen2"): the same weights plus q, k and v biases, uniform in
  // ±bias_scale from bias_seed (qwen2_gguf gives the same model as a GGUF).
  bool qwen2 = false;
  uint64_t bias_seed = 1;
  float bias_scale = 0.2f;
};

// The GGUF's weights as a two-shard checkpoint in `dir`: every weight dequantized and rounded to
// bf16 (as CudaLlamaModel::load_gguf does), q and k rows put back in Hugging Face's order (GGUF's
// llama permutes them so that adjacent pairs rotate), norms in F32; the shard index and a
// config.json made from the metadata. Overwrites what is there.
Status write_hf_checkpoint(const GgufFile& model, const ModelConfig& config, const std::string& dir,
                           const HfCheckpointOptions& options = {});

// The Qwen2 checkpoint of write_hf_checkpoint (options.qwen2) as a GGUF the CPU engine runs: the
// bf16_gguf weights, q and k rows in Hugging Face's order (qwen2 rotates halves, as Hugging Face
// does), the same biases in F32, "qwen2." metadata.
StatusOr<std::unique_ptr<GgufFile>> qwen2_gguf(const GgufFile& model, const ModelConfig& config,
                                               const HfCheckpointOptions& options);

// The GGUF with every tensor that is not F32 dequantized and rounded to bf16 (as
// CudaLlamaModel::load_gguf does), the F32 tensors and the metadata as they are (general.file_type
// set to bf16): for a model whose F32 tensors are its norms (the default model's are), the weights
// the GPU computes with, in a file the CPU engine runs. (The GPU would round F32 matrices to bf16
// too; this keeps them F32.)
// `scale`, where given, multiplies each such tensor's values (by its name) before the rounding.
using TensorScale = std::function<float(std::string_view tensor_name)>;
StatusOr<std::unique_ptr<GgufFile>> bf16_gguf(const GgufFile& model, const TensorScale& scale = nullptr);
// The same with the tensors that are not F32 rounded to F16 instead (general.file_type F16): the
// weights an fp16 GPU model of the file computes with.
StatusOr<std::unique_ptr<GgufFile>> f16_gguf(const GgufFile& model, const TensorScale& scale = nullptr);

// The GGUF's byte-level BPE vocabulary as tokenizer.json and tokenizer_config.json in `dir`, in
// the form `transformers` saves SmolLM2's (and a config.json with vocab_size and the BOS/EOS ids
// when `dir` has none). `variant` picks the pre-tokenizer: "smollm2" (the model's own, Digits +
// ByteLevel, merges as "a b"), or one of the byte-level variants of
// tests/golden/data/tokenizer_variants.json — "bpe_gpt2", "bpe_llama_bpe" (with a BOS template),
// "bpe_qwen2" (with an NFC normalizer) — written with merges as pairs, as newer files are.
Status write_hf_tokenizer(const GgufFile& model, const std::string& variant, const std::string& dir);

}  // namespace pdserve

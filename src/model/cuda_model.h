// CudaLlamaModel: the Llama-family forward pass (llama, qwen2) on one NVIDIA GPU, in bf16 or fp16
// (weights, activations entering products, KV cache) with float accumulation and a float residual
// stream, over a paged KV cache in device memory.
//
// The same contract as LlamaModel::forward: one call runs a batch of sequence chunks (prefill
// chunks of any length and single decode tokens mixed) and returns logits for the chunks that
// ask for them. Weights come from a GGUF file (every supported type dequantized at load), a
// Hugging Face checkpoint, or are synthetic: the shapes of a published model with
// seeded random values made on the GPU (benchmarks; no file needed). Not batch-invariant: the
// kernels chosen (cuBLAS algorithms, matrix-vector kernels for up to 8 rows, the attention
// form for wide decode batches) depend on the batch, so logits differ in the last bits between
// batch compositions.
// Thread-safety: one thread at a time (forward() uses the model's scratch and stream).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "kernels/cuda/ops.h"
#include "model/executor.h"
#include "model/gguf.h"
#include "model/llama_model.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace pdserve {

struct CudaModelOptions {
  int device = 0;
  int32_t num_blocks = 0;  // KV cache blocks (each block_size tokens of every layer)
  int32_t block_size = 16;
  bool cuda_graphs = true;  // replay decode steps (one token per sequence) as CUDA graphs
  // The number format on the GPU; unset: fp16 for a Hugging Face checkpoint of fp16 tensors, else
  // bf16 (a GGUF's F16 matrices are most often a bf16-trained model's export). bf16 has float's
  // range; fp16 rounds 8 times finer but holds values up to 65504 only: weights beyond it are
  // refused at load, activations beyond it become infinite.
  std::optional<cuda::Dtype> dtype;
};

class CudaLlamaModel final : public ModelExecutor {
 public:
  // Dequantizes every weight of `file` to the model's format and uploads it; allocates the KV cache.
  static StatusOr<std::unique_ptr<CudaLlamaModel>> load_gguf(const GgufFile& file,
                                                             const CudaModelOptions& options);
  // A Hugging Face checkpoint's weights (bf16, fp16 or fp32 safetensors), in the model's format
  // (stored values copied as they are where the formats match, else rounded).
  static StatusOr<std::unique_ptr<CudaLlamaModel>> load_hf(const HfCheckpoint& checkpoint,
                                                           const CudaModelOptions& options);
  // "synthetic:llama-3.1-8b", "synthetic:qwen2.5-7b", "synthetic:smollm2-1.7b": that model's
  // shapes, random weights from `seed` (bf16 unless options.dtype says fp16); vocab_size > 0 replaces the
  // published vocabulary's size (to serve it with another model's tokenizer).
  static StatusOr<std::unique_ptr<CudaLlamaModel>> synthetic(std::string_view name,
                                                             const CudaModelOptions& options, uint64_t seed,
                                                             int32_t vocab_size = 0);
  // The config of a synthetic model name (errors list the names there are), with vocab_size as
  // synthetic() takes it.
  static StatusOr<ModelConfig> synthetic_config(std::string_view name, int32_t vocab_size = 0);

  ~CudaLlamaModel() override;

  const ModelConfig& config() const override { return config_; }
  // The GGUF file's or the checkpoint's fingerprint, or one made of a synthetic model's name and
  // seed.
  uint64_t fingerprint() const override { return fingerprint_; }
  KvStorage* host_kv() override { return nullptr; }
  std::optional<DeviceKv> device_kv() override;
  size_t kv_bytes() const override;
  std::string device() const override { return device_; }
  int32_t num_blocks() const { return options_.num_blocks; }
  // The number format of the weights, activations and KV cache.
  cuda::Dtype dtype() const { return dtype_; }
  int32_t block_size() const { return options_.block_size; }
  // Bytes of every weight read by one forward pass (the LM head once).
  size_t weight_bytes() const { return weight_bytes_; }
  // Bytes of K and V of one token, all layers.
  size_t kv_bytes_per_token() const;

  // Runs the batch; writes vocab_size floats per chunk with want_logits, in chunk order, to
  // `logits` (host memory, that many rows). Returns after the logits are there.
  Status forward(const ForwardBatch& batch, float* logits) override;
  // forward(), then the greedy choice of each logits row on the GPU: one token id per row (host
  // memory); only the ids leave the GPU.
  Status forward_argmax(const ForwardBatch& batch, int32_t* next_tokens);
  // forward(), then each row's token drawn on the GPU (ModelExecutor::forward_draw): Gumbel-max
  // for rows with a temperature, argmax for the others; only the ids leave the GPU, and the
  // logits of the `host` rows.
  Status forward_draw(const ForwardBatch& batch, std::span<const RowDraw> draws, int32_t* next_tokens,
                      const HostLogitRows& host = {}) override;
  bool draws_on_device() const override { return true; }
  std::string_view number_format() const override { return cuda::dtype_name(dtype_); }
  // after_layer(l) once layer l's K/V writes are queued (a batch with after_layer is never a graph).
  bool reports_layers() const override { return true; }
  // Turns the replay of decode steps as CUDA graphs on or off (CudaModelOptions::cuda_graphs).
  void set_cuda_graphs(bool on) { options_.cuda_graphs = on; }
  // Fills the whole KV cache with random values (benchmarks that start from a long context).
  Status randomize_kv(uint64_t seed);
  // Tunes the matrix products of decode steps (cuda::Blas::set_tuning) of every bucket of batch
  // sizes up to `max_batch` (at most 512, and at most num_blocks) now, at load, so that no step
  // while serving pays for it (about 0.1 s a bucket on an 8B model): a step of one token per
  // sequence at position 0 of blocks 0, 1, …, whose KV it overwrites — call it before any request
  // is served. Does nothing where product tuning is off (cuda::set_product_tuning); the buckets
  // tuned since load are tuned_decode_buckets().
  Status tune_decode_steps(int32_t max_batch);
  int64_t tuned_decode_buckets() const;

 private:
  struct Impl;
  explicit CudaLlamaModel(std::unique_ptr<Impl> impl, ModelConfig config, CudaModelOptions options);
  static constexpr int64_t kMaxGraphBatch = 512;
  static constexpr size_t kMaxGraphs = 64;  // kept at once; more shapes start the cache over
  // What one pass enqueues: tokens, logits rows, block-table width, and the longest sequence the
  // attention plans for.
  struct Shape {
    int64_t tokens = 0;
    int32_t chunks = 0;
    int32_t max_chunk = 0;  // tokens of the longest chunk
    int32_t num_logits = 0;
    int32_t width = 0;
    int32_t max_len = 0;
  };
  // Validates and uploads the batch, then enqueues the pass (or replays its graph); *rows gets the
  // number of logits rows (left in Impl::logits).
  Status run(const ForwardBatch& batch, int32_t* rows);
  // Grows the scratch buffers for `shape` (dropping captured graphs if any buffer moves).
  Status reserve(const Shape& shape, size_t meta_bytes);
  cuda::DecodeAttentionArgs attention_args(const Shape& shape, int32_t layer) const;
  // Enqueues every kernel of the pass; no synchronous call of its own (it may be captured).
  // after_layer(l) (if any; never while capturing) once layer l's K/V writes are queued.
  Status enqueue(const Shape& shape, const std::function<void(int32_t)>& after_layer = {});
  struct WeightSource;
  // Every weight, through one format's source.
  Status upload_weights(const WeightSource& source);
  static StatusOr<std::unique_ptr<CudaLlamaModel>> create(const ModelConfig& config,
                                                          const CudaModelOptions& options, cuda::Dtype dtype);

  std::unique_ptr<Impl> impl_;
  ModelConfig config_;
  CudaModelOptions options_;
  size_t weight_bytes_ = 0;
  uint64_t fingerprint_ = 0;
  std::string device_;
  cuda::Dtype dtype_ = cuda::Dtype::kBf16;
};

}  // namespace pdserve

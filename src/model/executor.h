// ModelExecutor: one backend's forward pass with the KV cache memory it runs over — the seam
// where the device is chosen (at start-up, in one place: `--device`). The engine holds one and
// never asks which backend it is. CpuExecutor is the CPU engine (LlamaModel + KvStorage + a
// thread pool); the CUDA backend's CudaLlamaModel (model/cuda_model.h) is the other.
// Thread-safety: forward() from one thread at a time.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"
#include "common/thread_pool.h"
#include "model/kv_storage.h"
#include "model/llama_model.h"
#include "model/model_config.h"

namespace pdserve {

// A KV cache in a GPU's memory, as the CUDA backend lays it out (kernels/cuda/ops.h
// PagedKvCache): layer l's K blocks at base + l * layer_bytes, its V blocks v_offset_bytes
// further, each block [kv head][row][head_dim] of bf16 or fp16 values.
struct DeviceKv {
  int32_t device = 0;
  bool fp16 = false;  // the values' format: fp16, else bf16
  uint8_t* base = nullptr;
  uint64_t layer_bytes = 0;
  uint64_t v_offset_bytes = 0;
  // The CUDA stream (cudaStream_t) the forward pass writes the cache on: after_layer(l) is called
  // once layer l's K/V writes are queued there.
  void* stream = nullptr;
};

// One row's draw for ModelExecutor::forward_draw.
struct RowDraw {
  float temperature = 0.0f;  // 0: greedy
  uint64_t seed = 0;
  uint64_t counter = 0;  // the request's draws so far
  int32_t top_k = 0;     // kernels/truncation.h's limits: 0, 1 and 0 are off
  float top_p = 1.0f;
  float min_p = 0.0f;
};

// Rows of a forward_draw whose logits the host needs (penalties, log-probabilities): copied to
// `logits` (rows.size() × vocab_size floats, in the order of `rows`, as forward() writes them); the
// backend's draws for them are made greedy and left for the host to replace.
struct HostLogitRows {
  std::span<const int32_t> rows;  // logits rows (chunks with want_logits, counted in order)
  float* logits = nullptr;
};

class ModelExecutor {
 public:
  virtual ~ModelExecutor() = default;
  virtual const ModelConfig& config() const = 0;
  // Of the weights' source (the GGUF file), so instances can check they run the same model.
  virtual uint64_t fingerprint() const = 0;
  // Runs the batch over the executor's KV cache (block ids index it); writes vocab_size floats
  // per chunk with want_logits, in chunk order, to `logits` (host memory).
  virtual Status forward(const ForwardBatch& batch, float* logits) = 0;
  // forward(), then one token per logits row chosen where the logits are, to `next_tokens` (host
  // memory), as draws[row] says: temperature 0, the greedy choice (the lowest id among equal
  // maxima; NaN ranks lowest); else a Gumbel-max draw from softmax(logits / temperature) keyed by
  // (seed, counter) as kernels/gumbel.h defines it, among the candidates top_k, top_p and min_p
  // keep (kernels/truncation.h), which the host Sampler makes alike. -1 for a row where no token
  // had a usable logit (all NaN or -inf: the forward pass overflowed). Only where
  // draws_on_device() (a GPU: only token ids cross to the host, and the logits of `host` rows);
  // UNIMPLEMENTED else.
  virtual Status forward_draw(const ForwardBatch& /*batch*/, std::span<const RowDraw> /*draws*/,
                              int32_t* /*next_tokens*/, const HostLogitRows& /*host*/ = {}) {
    return unimplemented("this backend samples on the host: call forward()");
  }
  virtual bool draws_on_device() const { return false; }
  // The 16-bit format a GPU model computes in ("bf16" or "fp16"); empty on the CPU.
  virtual std::string_view number_format() const { return {}; }
  // Whether forward() calls ForwardBatch::after_layer after each layer (the CPU engine, once the
  // layer has run; a GPU, once the layer's K/V writes are queued on DeviceKv::stream).
  virtual bool reports_layers() const { return false; }
  // The KV cache as host memory, which the host KV transports read and write; nullptr where it
  // lives on a GPU.
  virtual KvStorage* host_kv() = 0;
  // The KV cache in GPU memory (the cuda-ipc transport moves it); none for host memory.
  virtual std::optional<DeviceKv> device_kv() { return std::nullopt; }
  virtual size_t kv_bytes() const = 0;
  // "cpu", "cuda:0 (NVIDIA H200)": for logs.
  virtual std::string device() const = 0;
};

class CpuExecutor final : public ModelExecutor {
 public:
  // The model and the pool must outlive the executor; the pool is used only inside forward(),
  // which runs one at a time per model, so executors of one process may share it.
  CpuExecutor(LlamaModel& model, ThreadPool& pool, int32_t num_blocks, int32_t block_size)
      : model_(model), pool_(pool), kv_(model.config(), num_blocks, block_size) {}
  const ModelConfig& config() const override { return model_.config(); }
  uint64_t fingerprint() const override { return model_.fingerprint(); }
  Status forward(const ForwardBatch& batch, float* logits) override {
    return model_.forward(batch, kv_, pool_, logits);
  }
  bool reports_layers() const override { return true; }
  KvStorage* host_kv() override { return &kv_; }
  size_t kv_bytes() const override { return kv_.bytes(); }
  std::string device() const override { return "cpu"; }

 private:
  LlamaModel& model_;
  ThreadPool& pool_;
  KvStorage kv_;
};

}  // namespace pdserve

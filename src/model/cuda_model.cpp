#include "model/cuda_model.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <span>

#include "common/log.h"
#include "kernels/cpu/fp16.h"
#include "kernels/cpu/quant.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"

namespace pdserve {
namespace {

using cuda::DeviceBuffer;

// Published shapes (their config.json files), for synthetic models.
struct SyntheticShape {
  std::string_view name;
  ModelConfig config;
};

ModelConfig shape(std::string arch, std::string name, int32_t layers, int32_t hidden, int32_t ffn,
                  int32_t heads, int32_t kv_heads, int32_t head_dim, int32_t vocab, float eps, float theta,
                  bool bias, bool tied, RopeOrdering ordering) {
  ModelConfig c;
  c.architecture = std::move(arch);
  c.name = std::move(name);
  c.num_layers = layers;
  c.hidden_size = hidden;
  c.ffn_size = ffn;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.rope_dim = head_dim;
  c.vocab_size = vocab;
  c.context_length = 32768;
  c.rms_norm_eps = eps;
  c.rope_theta = theta;
  c.has_qkv_bias = bias;
  c.tied_embeddings = tied;
  c.rope_ordering = ordering;
  return c;
}

std::vector<SyntheticShape> synthetic_shapes() {
  ModelConfig llama = shape("llama", "synthetic:llama-3.1-8b", 32, 4096, 14336, 32, 8, 128, 128256, 1e-5f,
                            500000.0f, false, false, RopeOrdering::kNeox);
  llama.rope_scaling.factor = 8.0f;
  llama.rope_scaling.low_freq_factor = 1.0f;
  llama.rope_scaling.high_freq_factor = 4.0f;
  llama.rope_scaling.original_context_length = 8192;
  return {
      {"synthetic:llama-3.1-8b", llama},
      {"synthetic:qwen2.5-7b", shape("qwen2", "synthetic:qwen2.5-7b", 28, 3584, 18944, 28, 4, 128, 152064,
                                     1e-6f, 1000000.0f, true, false, RopeOrdering::kNeox)},
      {"synthetic:smollm2-1.7b", shape("llama", "synthetic:smollm2-1.7b", 24, 2048, 8192, 32, 32, 64, 49152,
                                       1e-5f, 130000.0f, false, true, RopeOrdering::kNeox)},
  };
}

// The rotary frequencies as the CPU engine computes its angles: base^(-2i/d) / factor[i].
std::vector<float> inverse_frequencies(const ModelConfig& c, const std::vector<float>& factors) {
  std::vector<float> out(static_cast<size_t>(c.rope_dim / 2));
  for (int32_t i = 0; i < c.rope_dim / 2; ++i) {
    double f = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / c.rope_dim);
    if (!factors.empty()) f /= factors[static_cast<size_t>(i)];
    out[static_cast<size_t>(i)] = static_cast<float>(f);
  }
  return out;
}

// A weight bound for fp16: refused where a value is beyond its range (it would become infinite).
Status check_fp16_range(const std::string& name, std::span<const float> values) {
  for (float v : values) {
    if (std::isfinite(v) && std::abs(v) > 65504.0f)
      return invalid_argument(fmt::format(
          "tensor '{}' holds {}, beyond fp16's range (±65504): run this model in bf16 (--dtype bf16)", name,
          v));
  }
  return ok_status();
}

#define PD_ASSIGN_BUFFER(lhs, bytes)                               \
  do {                                                             \
    auto pd_buf_ = ::pdserve::cuda::DeviceBuffer::allocate(bytes); \
    if (!pd_buf_.ok()) return pd_buf_.status();                    \
    (lhs) = std::move(*pd_buf_);                                   \
  } while (0)

}  // namespace

struct CudaLlamaModel::Impl {
  struct Layer {
    DeviceBuffer attn_norm, ffn_norm;  // float [d]
    DeviceBuffer wqkv;                 // 16-bit (dtype) [q + 2kv][d]
    DeviceBuffer bqkv;                 // float [q + 2kv] (qwen2), else empty
    DeviceBuffer wo;                   // 16-bit [d][q]
    DeviceBuffer w_gate_up;            // 16-bit [2 ffn][d]: gate rows, then up rows
    DeviceBuffer w_down;               // 16-bit [d][ffn]
  };
  cuda::Dtype dtype = cuda::Dtype::kBf16;  // of the weights, the activations products read, the KV
  std::vector<Layer> layers;
  DeviceBuffer embd;    // 16-bit [vocab][d]
  DeviceBuffer output;  // 16-bit [vocab][d]; empty when tied to embd
  DeviceBuffer output_norm, inv_freq;
  DeviceBuffer kv;              // [layer][K, V][block][kv head][row][head_dim] 16-bit
  int64_t kv_layer_values = 0;  // values of one layer's K (or V)

  std::optional<cuda::Stream> stream;
  std::optional<cuda::Blas> blas;

  // Scratch, grown as batches grow.
  int64_t capacity_tokens = 0;  // rows every token buffer holds (0 while one is missing)
  int64_t capacity_logits = 0;
  int64_t capacity_tokens_target = 0;  // what they were last grown to
  int64_t capacity_logits_target = 0;
  DeviceBuffer x, xn, qkv, q, attn, gate_up, hidden, final_rows, logits, argmax, meta, workspace, draws;
  DeviceBuffer split_counters;         // decode attention's, int32 per (sequence, kv head), kept zero
  cuda::PinnedHostBuffer drawn;        // the drawn token ids land here, so their copy is enqueued too
  cuda::PinnedHostBuffer host_logits;  // forward_draw's host rows, on their way to the caller
  int64_t argmax_rows = 0;             // rows `argmax` has room for

  std::map<std::pair<int64_t, int32_t>, cuda::Graph> graphs;  // (batch size, table width)
  // The buckets of decode batch sizes (cuda::Blas::tuning_bucket) whose products have been tuned.
  std::set<int64_t> tuned_buckets;

  const uint16_t* lm_head() const {
    return output.data() != nullptr ? output.as<uint16_t>() : embd.as<uint16_t>();
  }
  cuda::PagedKv layer_kv(const ModelConfig& c, int32_t layer, int32_t block_size) const {
    uint16_t* k = kv.as<uint16_t>() + 2 * kv_layer_values * layer;
    return {k, k + kv_layer_values, block_size, c.num_kv_heads, c.head_dim, dtype};
  }
};

CudaLlamaModel::CudaLlamaModel(std::unique_ptr<Impl> impl, ModelConfig config, CudaModelOptions options)
    : impl_(std::move(impl)), config_(std::move(config)), options_(options) {}

CudaLlamaModel::~CudaLlamaModel() = default;

size_t CudaLlamaModel::kv_bytes() const { return impl_->kv.bytes(); }

std::optional<DeviceKv> CudaLlamaModel::device_kv() {
  const uint64_t part = static_cast<uint64_t>(impl_->kv_layer_values) * sizeof(uint16_t);
  return DeviceKv{options_.device,     dtype_ == cuda::Dtype::kF16, impl_->kv.as<uint8_t>(), 2 * part, part,
                  impl_->stream->get()};
}

size_t CudaLlamaModel::kv_bytes_per_token() const {
  return static_cast<size_t>(config_.kv_bytes_per_token(static_cast<int32_t>(sizeof(uint16_t))));
}

StatusOr<ModelConfig> CudaLlamaModel::synthetic_config(std::string_view name, int32_t vocab_size) {
  if (vocab_size < 0) return invalid_argument(fmt::format("vocabulary size {} is negative", vocab_size));
  std::string names;
  for (const SyntheticShape& s : synthetic_shapes()) {
    if (s.name == name) {
      ModelConfig c = s.config;
      if (vocab_size > 0) c.vocab_size = vocab_size;
      return c;
    }
    names += (names.empty() ? "" : ", ") + std::string(s.name);
  }
  return not_found(fmt::format("no synthetic model '{}'; there are: {}", name, names));
}

StatusOr<std::unique_ptr<CudaLlamaModel>> CudaLlamaModel::create(const ModelConfig& c,
                                                                 const CudaModelOptions& options,
                                                                 cuda::Dtype dtype) {
  if (cuda::device_count() == 0) return unavailable("no CUDA device: " + cuda::no_device_reason());
  if (options.device < 0 || options.device >= cuda::device_count())
    return invalid_argument(
        fmt::format("--device cuda:{}: there are {} GPUs", options.device, cuda::device_count()));
  if (options.num_blocks <= 0 || options.block_size <= 0)
    return invalid_argument("the GPU KV cache needs a positive number of blocks and block size");
  if (c.head_dim != 64 && c.head_dim != 128)
    return unimplemented(fmt::format("the CUDA backend runs head_dim 64 or 128, not {}", c.head_dim));
  if (c.num_heads % c.num_kv_heads != 0 || c.num_heads / c.num_kv_heads > 8)
    return unimplemented("the CUDA backend runs at most 8 query heads per kv head");
  PD_RETURN_IF_ERROR(cuda::set_device(options.device));
  auto impl = std::make_unique<Impl>();
  impl->dtype = dtype;
  auto stream = cuda::Stream::create();
  if (!stream.ok()) return stream.status();
  impl->stream.emplace(std::move(*stream));
  auto blas = cuda::Blas::create();
  if (!blas.ok()) return blas.status();
  impl->blas.emplace(std::move(*blas));
  auto info = cuda::device_info(options.device);
  if (!info.ok()) return info.status();
  // The kernels use sm_80 instructions (cp.async, ldmatrix, mma) and are built for
  // CMAKE_CUDA_ARCHITECTURES (sm_90 by default; newer GPUs run its PTX).
  if (info->compute_major < 8 || !cuda::kernels_built_for_current_device())
    return unimplemented(fmt::format(
        "GPU {} is {} (sm_{}{}), which this build's CUDA kernels do not run on: they need sm_80 or newer and "
        "a build for it (-DCMAKE_CUDA_ARCHITECTURES={}{})",
        options.device, info->name, info->compute_major, info->compute_minor, info->compute_major,
        info->compute_minor));
  PD_RETURN_IF_ERROR(cuda::prepare_prefill_attention());

  const int64_t d = c.hidden_size, qkv = c.q_dim() + 2 * int64_t{c.kv_dim()}, ffn = c.ffn_size;
  impl->layers.resize(static_cast<size_t>(c.num_layers));
  for (Impl::Layer& l : impl->layers) {
    PD_ASSIGN_BUFFER(l.attn_norm, d * 4);
    PD_ASSIGN_BUFFER(l.ffn_norm, d * 4);
    PD_ASSIGN_BUFFER(l.wqkv, qkv * d * 2);
    if (c.has_qkv_bias) PD_ASSIGN_BUFFER(l.bqkv, qkv * 4);
    PD_ASSIGN_BUFFER(l.wo, d * c.q_dim() * 2);
    PD_ASSIGN_BUFFER(l.w_gate_up, 2 * ffn * d * 2);
    PD_ASSIGN_BUFFER(l.w_down, d * ffn * 2);
  }
  PD_ASSIGN_BUFFER(impl->embd, int64_t{c.vocab_size} * d * 2);
  if (!c.tied_embeddings) PD_ASSIGN_BUFFER(impl->output, int64_t{c.vocab_size} * d * 2);
  PD_ASSIGN_BUFFER(impl->output_norm, d * 4);
  PD_ASSIGN_BUFFER(impl->inv_freq, int64_t{c.rope_dim / 2} * 4);
  impl->kv_layer_values = int64_t{options.num_blocks} * options.block_size * c.kv_dim();
  auto kv = DeviceBuffer::allocate(static_cast<size_t>(2 * impl->kv_layer_values * c.num_layers) * 2);
  if (!kv.ok())
    return kv.status().with_context(
        fmt::format("GPU KV cache of {} blocks × {} tokens", options.num_blocks, options.block_size));
  impl->kv = std::move(*kv);

  std::unique_ptr<CudaLlamaModel> m(new CudaLlamaModel(std::move(impl), c, options));
  m->device_ = fmt::format("cuda:{} ({})", options.device, info->name);
  m->dtype_ = dtype;
  m->weight_bytes_ =
      static_cast<size_t>(c.num_layers) * static_cast<size_t>(qkv * d + d * c.q_dim() + 3 * ffn * d) * 2 +
      static_cast<size_t>(c.vocab_size) * static_cast<size_t>(d) * 2;
  return m;
}

StatusOr<std::unique_ptr<CudaLlamaModel>> CudaLlamaModel::synthetic(std::string_view name,
                                                                    const CudaModelOptions& options,
                                                                    uint64_t seed, int32_t vocab_size) {
  PD_ASSIGN_OR_RETURN(ModelConfig c, synthetic_config(name, vocab_size));
  const cuda::Dtype dtype = options.dtype.value_or(cuda::Dtype::kBf16);
  PD_ASSIGN_OR_RETURN(std::unique_ptr<CudaLlamaModel> m, create(c, options, dtype));
  m->fingerprint_ = synthetic_model_fingerprint(name, seed, c.vocab_size);
  Impl& im = *m->impl_;
  cuda::StreamHandle s = im.stream->get();
  const int64_t d = c.hidden_size;
  // Small weights keep activations in range through every layer (values only matter for speed).
  const float w_scale = 1.0f / std::sqrt(static_cast<float>(d));
  uint64_t n = 0;
  auto bf16 = [&](DeviceBuffer& b, float scale) {
    return cuda::fill_uniform(b.as<uint16_t>(), static_cast<int64_t>(b.bytes() / 2), 0.0f, scale, seed + ++n,
                              dtype, s);
  };
  auto f32 = [&](DeviceBuffer& b, float mean, float scale) {
    return cuda::fill_uniform_f32(b.as<float>(), static_cast<int64_t>(b.bytes() / 4), mean, scale, seed + ++n,
                                  s);
  };
  for (Impl::Layer& l : im.layers) {
    PD_RETURN_IF_ERROR(f32(l.attn_norm, 1.0f, 0.1f));
    PD_RETURN_IF_ERROR(f32(l.ffn_norm, 1.0f, 0.1f));
    PD_RETURN_IF_ERROR(bf16(l.wqkv, w_scale));
    if (l.bqkv.data() != nullptr) PD_RETURN_IF_ERROR(f32(l.bqkv, 0.0f, 0.1f));
    PD_RETURN_IF_ERROR(bf16(l.wo, w_scale));
    PD_RETURN_IF_ERROR(bf16(l.w_gate_up, w_scale));
    PD_RETURN_IF_ERROR(bf16(l.w_down, 1.0f / std::sqrt(static_cast<float>(c.ffn_size))));
  }
  PD_RETURN_IF_ERROR(bf16(im.embd, 1.0f));
  if (im.output.data() != nullptr) PD_RETURN_IF_ERROR(bf16(im.output, w_scale));
  PD_RETURN_IF_ERROR(f32(im.output_norm, 1.0f, 0.1f));
  const std::vector<float> inv =
      inverse_frequencies(c, c.rope_scaling.factor > 0 ? llama3_freq_factors(c) : std::vector<float>{});
  PD_RETURN_IF_ERROR(cuda::copy_to_device(im.inv_freq.data(), inv.data(), inv.size() * 4));
  // NOTE: cudaMemcpy from pageable memory may return before its DMA lands, and the model's
  // stream does not wait for the legacy stream: wait for the whole device once here.
  PD_RETURN_IF_ERROR(cuda::synchronize());
  return m;
}

// How one checkpoint format hands over its tensors: a matrix [rows][cols] as bf16 rows into a
// buffer at row `at`, a vector of floats at `at`, and the names of every weight (layer weights
// after the layer's prefix, "{}" standing for its index).
struct CudaLlamaModel::WeightSource {
  std::function<Status(const std::string& name, int64_t rows, int64_t cols, DeviceBuffer& dst, int64_t at)>
      matrix;
  std::function<Status(const std::string& name, int64_t n, DeviceBuffer& dst, int64_t at)> vector;
  std::string layer_prefix;
  // attn_norm, ffn_norm, q, k, v, q bias, k bias, v bias, o, gate, up, down; embeddings, LM head,
  // output norm.
  std::array<std::string, 15> names;
};

Status CudaLlamaModel::upload_weights(const WeightSource& src) {
  const ModelConfig& c = config_;
  Impl& im = *impl_;
  const int64_t d = c.hidden_size, q = c.q_dim(), kvd = c.kv_dim(), ffn = c.ffn_size;
  const auto& n = src.names;
  for (int32_t i = 0; i < c.num_layers; ++i) {
    Impl::Layer& l = im.layers[static_cast<size_t>(i)];
    const std::string p = fmt::format(fmt::runtime(src.layer_prefix), i);
    PD_RETURN_IF_ERROR(src.vector(p + n[0], d, l.attn_norm, 0));
    PD_RETURN_IF_ERROR(src.vector(p + n[1], d, l.ffn_norm, 0));
    PD_RETURN_IF_ERROR(src.matrix(p + n[2], q, d, l.wqkv, 0));
    PD_RETURN_IF_ERROR(src.matrix(p + n[3], kvd, d, l.wqkv, q));
    PD_RETURN_IF_ERROR(src.matrix(p + n[4], kvd, d, l.wqkv, q + kvd));
    if (c.has_qkv_bias) {
      PD_RETURN_IF_ERROR(src.vector(p + n[5], q, l.bqkv, 0));
      PD_RETURN_IF_ERROR(src.vector(p + n[6], kvd, l.bqkv, q));
      PD_RETURN_IF_ERROR(src.vector(p + n[7], kvd, l.bqkv, q + kvd));
    }
    PD_RETURN_IF_ERROR(src.matrix(p + n[8], d, q, l.wo, 0));
    PD_RETURN_IF_ERROR(src.matrix(p + n[9], ffn, d, l.w_gate_up, 0));
    PD_RETURN_IF_ERROR(src.matrix(p + n[10], ffn, d, l.w_gate_up, ffn));
    PD_RETURN_IF_ERROR(src.matrix(p + n[11], d, ffn, l.w_down, 0));
  }
  PD_RETURN_IF_ERROR(src.matrix(n[12], c.vocab_size, d, im.embd, 0));
  if (!c.tied_embeddings) PD_RETURN_IF_ERROR(src.matrix(n[13], c.vocab_size, d, im.output, 0));
  return src.vector(n[14], d, im.output_norm, 0);
}

StatusOr<std::unique_ptr<CudaLlamaModel>> CudaLlamaModel::load_gguf(const GgufFile& f,
                                                                    const CudaModelOptions& options) {
  PD_ASSIGN_OR_RETURN(ModelConfig c, ModelConfig::from_gguf(f));
  // bf16 unless asked otherwise: a GGUF's F16 matrices are most often the export of a model trained
  // in bf16, whose activations may leave fp16's range.
  const cuda::Dtype dtype = options.dtype.value_or(cuda::Dtype::kBf16);
  PD_ASSIGN_OR_RETURN(std::unique_ptr<CudaLlamaModel> m, create(c, options, dtype));
  m->fingerprint_ = f.fingerprint();
  Impl& im = *m->impl_;
  const auto to_16 = dtype == cuda::Dtype::kF16 ? cpu::fp32_to_fp16 : cpu::fp32_to_bf16;

  // Rows of a 2-D weight [rows][cols] (GGML dims {cols, rows}) in the model's format into `dst` at
  // row `at`.
  std::vector<float> row_f;
  std::vector<uint16_t> staging;
  WeightSource src;
  src.matrix = [&](const std::string& name, int64_t rows, int64_t cols, DeviceBuffer& dst,
                   int64_t at) -> Status {
    const GgufTensorInfo* t = f.find_tensor(name);
    if (t == nullptr) return invalid_argument(fmt::format("model file has no tensor '{}'", name));
    if (t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows)
      return invalid_argument(fmt::format("tensor '{}' is not [{}, {}]", name, cols, rows));
    if (!cpu::is_supported_weight_type(t->type))
      return unimplemented(fmt::format("tensor '{}' has type {}, which pdserve cannot dequantize", name,
                                       ggml_type_name(t->type)));
    const size_t rb = cpu::row_bytes(t->type, cols);
    row_f.resize(static_cast<size_t>(cols));
    staging.resize(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r) {
      cpu::dequantize_row(t->type, t->data + static_cast<size_t>(r) * rb, row_f.data(), cols);
      for (int64_t i = 0; i < cols; ++i)
        staging[static_cast<size_t>(r * cols + i)] = to_16(row_f[static_cast<size_t>(i)]);
      if (dtype == cuda::Dtype::kF16) PD_RETURN_IF_ERROR(check_fp16_range(name, row_f));
    }
    return cuda::copy_to_device(dst.as<uint16_t>() + at * cols, staging.data(), staging.size() * 2);
  };
  src.vector = [&](const std::string& name, int64_t n, DeviceBuffer& dst, int64_t at) -> Status {
    const GgufTensorInfo* t = f.find_tensor(name);
    if (t == nullptr) return invalid_argument(fmt::format("model file has no tensor '{}'", name));
    if (t->type != GgmlType::kF32 || t->num_elements() != n)
      return invalid_argument(fmt::format("tensor '{}' is not F32 of {} values", name, n));
    return cuda::copy_to_device(dst.as<float>() + at, t->data, static_cast<size_t>(n) * 4);
  };

  src.layer_prefix = "blk.{}.";
  src.names = {"attn_norm.weight",   "ffn_norm.weight", "attn_q.weight",     "attn_k.weight",
               "attn_v.weight",      "attn_q.bias",     "attn_k.bias",       "attn_v.bias",
               "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",     "ffn_down.weight",
               "token_embd.weight",  "output.weight",   "output_norm.weight"};
  PD_RETURN_IF_ERROR(m->upload_weights(src));
  std::vector<float> factors;
  if (f.find_tensor("rope_freqs.weight") != nullptr) {
    const GgufTensorInfo* t = f.find_tensor("rope_freqs.weight");
    if (t->type != GgmlType::kF32 || t->num_elements() != c.rope_dim / 2)
      return invalid_argument("tensor 'rope_freqs.weight' is not F32 of rope_dim/2 values");
    const auto* ff = reinterpret_cast<const float*>(t->data);
    factors.assign(ff, ff + c.rope_dim / 2);
  } else if (c.rope_scaling.factor > 0) {
    factors = llama3_freq_factors(c);
  }
  const std::vector<float> inv = inverse_frequencies(c, factors);
  PD_RETURN_IF_ERROR(cuda::copy_to_device(im.inv_freq.data(), inv.data(), inv.size() * 4));
  PD_RETURN_IF_ERROR(cuda::synchronize());  // see synthetic(): every upload has landed
  return m;
}

StatusOr<std::unique_ptr<CudaLlamaModel>> CudaLlamaModel::load_hf(const HfCheckpoint& ck,
                                                                  const CudaModelOptions& options) {
  const ModelConfig& c = ck.config();
  // fp16 for a checkpoint of fp16 tensors (its first query projection says), unless asked otherwise.
  const SafetensorsTensor* first = ck.find("model.layers.0.self_attn.q_proj.weight");
  const cuda::Dtype dtype = options.dtype.value_or(
      first != nullptr && first->dtype == SafetensorsDtype::kF16 ? cuda::Dtype::kF16 : cuda::Dtype::kBf16);
  const SafetensorsDtype native =
      dtype == cuda::Dtype::kF16 ? SafetensorsDtype::kF16 : SafetensorsDtype::kBF16;
  const auto to_16 = dtype == cuda::Dtype::kF16 ? cpu::fp32_to_fp16 : cpu::fp32_to_bf16;
  PD_ASSIGN_OR_RETURN(std::unique_ptr<CudaLlamaModel> m, create(c, options, dtype));
  m->fingerprint_ = ck.fingerprint();
  Impl& im = *m->impl_;

  auto tensor = [&](const std::string& name,
                    std::vector<int64_t> shape) -> StatusOr<const SafetensorsTensor*> {
    const SafetensorsTensor* t = ck.find(name);
    if (t == nullptr) return invalid_argument(fmt::format("checkpoint has no tensor '{}'", name));
    if (t->shape != shape)
      return invalid_argument(fmt::format("tensor '{}' has shape [{}], expected [{}]", name,
                                          fmt::join(t->shape, ", "), fmt::join(shape, ", ")));
    if (t->dtype == SafetensorsDtype::kOther)
      return unimplemented(
          fmt::format("tensor '{}' is {}; pdserve reads BF16, F16 and F32", name, t->dtype_name));
    return t;
  };
  auto to_float = [](const SafetensorsTensor& t, int64_t i) {
    uint16_t h;
    float f;
    switch (t.dtype) {
      case SafetensorsDtype::kBF16: std::memcpy(&h, t.data + i * 2, 2); return cpu::bf16_to_fp32(h);
      case SafetensorsDtype::kF16: std::memcpy(&h, t.data + i * 2, 2); return cpu::fp16_to_fp32(h);
      default: std::memcpy(&f, t.data + i * 4, 4); return f;
    }
  };
  std::vector<uint16_t> staging;
  std::vector<float> row_f;
  WeightSource src;
  src.matrix = [&](const std::string& name, int64_t rows, int64_t cols, DeviceBuffer& dst,
                   int64_t at) -> Status {
    PD_ASSIGN_OR_RETURN(const SafetensorsTensor* t, tensor(name, {rows, cols}));
    uint16_t* out = dst.as<uint16_t>() + at * cols;
    if (t->dtype == native) return cuda::copy_to_device(out, t->data, t->bytes);
    staging.resize(static_cast<size_t>(rows * cols));
    row_f.resize(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {  // a row at a time, as load_gguf converts
      for (int64_t i = 0; i < cols; ++i) row_f[static_cast<size_t>(i)] = to_float(*t, r * cols + i);
      if (dtype == cuda::Dtype::kF16) PD_RETURN_IF_ERROR(check_fp16_range(name, row_f));
      for (int64_t i = 0; i < cols; ++i)
        staging[static_cast<size_t>(r * cols + i)] = to_16(row_f[static_cast<size_t>(i)]);
    }
    return cuda::copy_to_device(out, staging.data(), staging.size() * 2);
  };
  std::vector<float> floats;
  src.vector = [&](const std::string& name, int64_t n, DeviceBuffer& dst, int64_t at) -> Status {
    PD_ASSIGN_OR_RETURN(const SafetensorsTensor* t, tensor(name, {n}));
    floats.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) floats[static_cast<size_t>(i)] = to_float(*t, i);
    return cuda::copy_to_device(dst.as<float>() + at, floats.data(), floats.size() * 4);
  };
  src.layer_prefix = "model.layers.{}.";
  src.names = {"input_layernorm.weight",    "post_attention_layernorm.weight",
               "self_attn.q_proj.weight",   "self_attn.k_proj.weight",
               "self_attn.v_proj.weight",   "self_attn.q_proj.bias",
               "self_attn.k_proj.bias",     "self_attn.v_proj.bias",
               "self_attn.o_proj.weight",   "mlp.gate_proj.weight",
               "mlp.up_proj.weight",        "mlp.down_proj.weight",
               "model.embed_tokens.weight", "lm_head.weight",
               "model.norm.weight"};
  PD_RETURN_IF_ERROR(m->upload_weights(src));
  const std::vector<float> inv =
      inverse_frequencies(c, c.rope_scaling.factor > 0 ? llama3_freq_factors(c) : std::vector<float>{});
  PD_RETURN_IF_ERROR(cuda::copy_to_device(im.inv_freq.data(), inv.data(), inv.size() * 4));
  PD_RETURN_IF_ERROR(cuda::synchronize());  // see synthetic(): every upload has landed
  return m;
}

Status CudaLlamaModel::randomize_kv(uint64_t seed) {
  PD_RETURN_IF_ERROR(cuda::set_device(options_.device));
  PD_RETURN_IF_ERROR(cuda::fill_uniform(impl_->kv.as<uint16_t>(), static_cast<int64_t>(impl_->kv.bytes() / 2),
                                        0.0f, 1.0f, seed, dtype_, impl_->stream->get()));
  return impl_->stream->synchronize();
}

Status CudaLlamaModel::forward(const ForwardBatch& batch, float* logits) {
  int32_t rows = 0;
  PD_RETURN_IF_ERROR(run(batch, &rows));
  PD_RETURN_IF_ERROR(impl_->stream->synchronize());
  if (rows == 0) return ok_status();
  return cuda::copy_to_host(logits, impl_->logits.data(), static_cast<size_t>(rows) * config_.vocab_size * 4);
}

Status CudaLlamaModel::tune_decode_steps(int32_t max_batch) {
  if (!cuda::product_tuning()) return ok_status();
  const auto started = std::chrono::steady_clock::now();
  // run() tunes decode steps a graph could replay; the engine runs none of more sequences than blocks.
  const int64_t top =
      std::min<int64_t>({max_batch, cuda::Blas::kTuneMaxRows, kMaxGraphBatch, options_.num_blocks});
  std::vector<int32_t> tokens, next, blocks;
  int32_t steps = 0;
  // run() tunes the first decode step of each bucket; a bucket's smallest batch is the bucket itself.
  for (int64_t n = 1; n <= top; ++n) {
    if (cuda::Blas::tuning_bucket(n) != n || impl_->tuned_buckets.contains(n)) continue;
    tokens.assign(static_cast<size_t>(n), 0);
    next.resize(static_cast<size_t>(n));
    blocks.resize(static_cast<size_t>(n));
    std::iota(blocks.begin(), blocks.end(), 0);  // n <= num_blocks
    ForwardBatch batch;
    batch.tokens = tokens;
    for (int64_t i = 0; i < n; ++i)
      batch.chunks.push_back({0, 1, std::span<const int32_t>(&blocks[static_cast<size_t>(i)], 1), true});
    PD_RETURN_IF_ERROR(
        forward_argmax(batch, next.data())
            .with_context(fmt::format("tuning the products of a decode step of {} sequences", n)));
    ++steps;
  }
  if (steps > 0) {
    PD_LOG_INFO("tuned the matrix products of decode steps of 1 to {} sequences ({} sizes) in {:.2f} s", top,
                steps, std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
  return ok_status();
}

int64_t CudaLlamaModel::tuned_decode_buckets() const {
  return static_cast<int64_t>(impl_->tuned_buckets.size());
}

Status CudaLlamaModel::forward_argmax(const ForwardBatch& batch, int32_t* next_tokens) {
  return forward_draw(batch, {}, next_tokens);
}

Status CudaLlamaModel::forward_draw(const ForwardBatch& batch, std::span<const RowDraw> draws_in,
                                    int32_t* next_tokens, const HostLogitRows& host) {
  size_t want = 0;
  for (const SequenceChunk& ch : batch.chunks) want += ch.want_logits ? 1 : 0;
  if (!draws_in.empty() && draws_in.size() != want)
    return invalid_argument(
        fmt::format("forward_draw: {} draws for {} rows of logits", draws_in.size(), want));
  for (int32_t r : host.rows) {
    if (r < 0 || static_cast<size_t>(r) >= want || host.logits == nullptr)
      return invalid_argument(fmt::format("forward_draw: host row {} of {} rows of logits", r, want));
  }
  // The host draws its rows: greedy here, so that no draw perturbs their logits before they leave.
  std::vector<RowDraw> adjusted;
  if (!host.rows.empty() && !draws_in.empty()) {
    adjusted.assign(draws_in.begin(), draws_in.end());
    for (int32_t r : host.rows) adjusted[static_cast<size_t>(r)] = RowDraw{};
  }
  const std::span<const RowDraw> draws = adjusted.empty() ? draws_in : std::span<const RowDraw>(adjusted);
  // The draws go up first, on the model's stream: from pageable memory a copy waits for the
  // stream, which after the forward pass would idle the host until the pass is done.
  const bool tempered =
      std::any_of(draws.begin(), draws.end(), [](const RowDraw& d) { return d.temperature > 0.0f; });
  // Top-k, top-p or min-p on a tempered row: one kernel draws every row (a cluster of CTAs each); otherwise
  // Gumbel keys over whole rows, then the many-CTA argmax.
  const bool truncated = std::any_of(draws.begin(), draws.end(), [](const RowDraw& d) {
    return d.temperature > 0.0f && (d.top_k > 0 || d.top_p < 1.0f || d.min_p > 0.0f);
  });
  if (tempered) {
    std::vector<cuda::SampleDraw> d(draws.size());
    for (size_t i = 0; i < draws.size(); ++i) {
      const RowDraw& r = draws[i];
      d[i] = {r.temperature, r.seed, r.counter, r.top_k, r.top_p, r.min_p};
    }
    const size_t bytes = d.size() * sizeof(cuda::SampleDraw);
    if (bytes > impl_->draws.bytes())
      PD_ASSIGN_BUFFER(impl_->draws, std::max(bytes, 2 * impl_->draws.bytes()));
    PD_RETURN_IF_ERROR(
        cuda::copy_to_device_async(impl_->draws.data(), d.data(), bytes, impl_->stream->get()));
  }
  int32_t rows = 0;
  PD_RETURN_IF_ERROR(run(batch, &rows));
  const size_t row_bytes = static_cast<size_t>(config_.vocab_size) * 4;
  if (rows > 0 && !host.rows.empty()) {
    // The host rows' logits, into page-locked memory before any draw on the stream.
    const size_t bytes = host.rows.size() * row_bytes;
    if (bytes > impl_->host_logits.bytes()) {
      auto staging =
          cuda::PinnedHostBuffer::allocate(std::max<size_t>(bytes, 2 * impl_->host_logits.bytes()));
      if (!staging.ok()) return staging.status();
      impl_->host_logits = std::move(*staging);
    }
    for (size_t j = 0; j < host.rows.size(); ++j)
      PD_RETURN_IF_ERROR(cuda::copy_to_host_async(
          impl_->host_logits.data() + j * row_bytes,
          impl_->logits.as<uint8_t>() + static_cast<size_t>(host.rows[j]) * row_bytes, row_bytes,
          impl_->stream->get()));
  }
  if (rows > 0) {
    // argmax's workspace for argmax_rows rows (zero between calls), then the drawn token ids.
    if (rows > impl_->argmax_rows) {  // grown geometrically: batches grow by ones
      const int64_t cap = std::max<int64_t>(rows, 2 * impl_->argmax_rows);
      impl_->argmax_rows = 0;
      const size_t slots = cuda::argmax_workspace_bytes(cap);
      PD_ASSIGN_BUFFER(impl_->argmax, slots + static_cast<size_t>(cap) * 4);
      PD_RETURN_IF_ERROR(cuda::fill_bytes(impl_->argmax.data(), 0, slots, impl_->stream->get()));
      impl_->argmax_rows = cap;
    }
    const size_t ws = cuda::argmax_workspace_bytes(impl_->argmax_rows);
    int32_t* tokens = impl_->argmax.as<int32_t>() + ws / 4;
    if (truncated) {
      PD_RETURN_IF_ERROR(cuda::sample_truncated(impl_->logits.as<float>(), rows, config_.vocab_size,
                                                impl_->draws.as<cuda::SampleDraw>(), tokens,
                                                impl_->stream->get()));
    } else {
      if (tempered)
        PD_RETURN_IF_ERROR(cuda::gumbel_perturb(impl_->logits.as<float>(), rows, config_.vocab_size,
                                                impl_->draws.as<cuda::SampleDraw>(), impl_->stream->get()));
      PD_RETURN_IF_ERROR(cuda::argmax(impl_->logits.as<float>(), rows, config_.vocab_size,
                                      impl_->argmax.data(), ws, tokens, impl_->stream->get()));
    }
    // A row whose logits were all NaN (an overflow) drew a token all the same: -1 says so.
    PD_RETURN_IF_ERROR(cuda::mark_unusable_draws(impl_->logits.as<float>(), rows, config_.vocab_size, tokens,
                                                 impl_->stream->get()));
    // Into page-locked memory behind the draw on the stream: one wait for both, no second round trip.
    const size_t bytes = static_cast<size_t>(rows) * 4;
    if (bytes > impl_->drawn.bytes()) {
      auto drawn = cuda::PinnedHostBuffer::allocate(std::max<size_t>(bytes, 2 * impl_->drawn.bytes()));
      if (!drawn.ok()) return drawn.status();
      impl_->drawn = std::move(*drawn);
    }
    PD_RETURN_IF_ERROR(cuda::copy_to_host_async(impl_->drawn.data(), tokens, bytes, impl_->stream->get()));
  }
  PD_RETURN_IF_ERROR(impl_->stream->synchronize());
  if (rows > 0) std::memcpy(next_tokens, impl_->drawn.data(), static_cast<size_t>(rows) * 4);
  if (rows > 0 && !host.rows.empty())
    std::memcpy(host.logits, impl_->host_logits.data(), host.rows.size() * row_bytes);
  return ok_status();
}

Status CudaLlamaModel::run(const ForwardBatch& batch, int32_t* rows_out) {
  *rows_out = 0;
  const ModelConfig& c = config_;
  Impl& im = *impl_;
  const int64_t T = static_cast<int64_t>(batch.tokens.size());
  if (T == 0) return ok_status();
  const int32_t bs = options_.block_size;

  // Validation, and whether this is a decode batch that a CUDA graph can replay: one token per
  // sequence, every one with logits.
  int32_t need_max = 1, max_len = 1, max_chunk = 1, num_logits = 0;
  bool decode_step = T <= kMaxGraphBatch;  // a graph could replay it (when graphs are on)
  int64_t t = 0;
  for (const SequenceChunk& ch : batch.chunks) {
    if (ch.num_tokens <= 0 || t + ch.num_tokens > T)
      return invalid_argument("forward: chunks do not cover the batch");
    const int64_t need_blocks = (int64_t{ch.first_position} + ch.num_tokens + bs - 1) / bs;
    if (ch.first_position < 0 || static_cast<int64_t>(ch.block_table.size()) < need_blocks)
      return invalid_argument("forward: a chunk's block table does not cover its positions");
    for (int32_t b : ch.block_table.first(static_cast<size_t>(need_blocks))) {
      if (b < 0 || b >= options_.num_blocks)
        return invalid_argument(
            fmt::format("forward: block {} outside the GPU KV cache ({} blocks)", b, options_.num_blocks));
    }
    for (int32_t i = 0; i < ch.num_tokens; ++i) {
      const int32_t tok = batch.tokens[static_cast<size_t>(t + i)];
      if (tok < 0 || tok >= c.vocab_size)
        return invalid_argument(
            fmt::format("forward: token id {} outside the vocabulary (size {})", tok, c.vocab_size));
    }
    t += ch.num_tokens;
    need_max = std::max(need_max, static_cast<int32_t>(need_blocks));
    max_len = std::max(max_len, ch.first_position + ch.num_tokens);
    max_chunk = std::max(max_chunk, ch.num_tokens);
    num_logits += ch.want_logits ? 1 : 0;
    decode_step = decode_step && ch.num_tokens == 1 && ch.want_logits;
  }
  // A graph replays kernels, not the host's calls between them.
  decode_step = decode_step && !batch.after_layer;
  const bool graphable = options_.cuda_graphs && decode_step;
  if (t != T) return invalid_argument("forward: chunks do not cover the batch");

  // A graph is kept per (batch size, table width); widths are powers of two, and the attention's
  // split plan is made for the longest sequence the width allows.
  Shape shape;
  shape.tokens = T;
  shape.chunks = static_cast<int32_t>(batch.chunks.size());
  shape.max_chunk = max_chunk;
  shape.num_logits = num_logits;
  shape.width =
      graphable ? std::max<int32_t>(16, static_cast<int32_t>(std::bit_ceil(static_cast<uint32_t>(need_max))))
                : need_max;
  shape.max_len = graphable ? shape.width * bs : max_len;

  // Per token: id, position, cache slot; one logits row per chunk asking; per chunk: keys it
  // attends to (for decode), first token, tokens, first position, and its block table.
  const int64_t C = shape.chunks;
  std::vector<int32_t> meta(static_cast<size_t>(4 * T + C * (4 + shape.width)), 0);
  int32_t* tokens = meta.data();
  int32_t* positions = tokens + T;
  int32_t* slots = positions + T;
  int32_t* logit_rows = slots + T;
  int32_t* seq_lens = logit_rows + T;
  int32_t* q_start = seq_lens + C;
  int32_t* lens = q_start + C;
  int32_t* firsts = lens + C;
  int32_t* tables = firsts + C;
  t = 0;
  int32_t row = 0;
  for (int64_t ci = 0; ci < C; ++ci) {
    const SequenceChunk& ch = batch.chunks[static_cast<size_t>(ci)];
    const int64_t need_blocks = (int64_t{ch.first_position} + ch.num_tokens + bs - 1) / bs;
    seq_lens[ci] = ch.first_position + ch.num_tokens;
    q_start[ci] = static_cast<int32_t>(t);
    lens[ci] = ch.num_tokens;
    firsts[ci] = ch.first_position;
    std::copy(ch.block_table.begin(), ch.block_table.begin() + need_blocks, tables + ci * shape.width);
    for (int32_t i = 0; i < ch.num_tokens; ++i, ++t) {
      const int32_t pos = ch.first_position + i;
      tokens[t] = batch.tokens[static_cast<size_t>(t)];
      positions[t] = pos;
      slots[t] = ch.block_table[static_cast<size_t>(pos / bs)] * bs + pos % bs;
    }
    if (ch.want_logits) logit_rows[row++] = static_cast<int32_t>(t - 1);
  }

  PD_RETURN_IF_ERROR(cuda::set_device(options_.device));
  PD_RETURN_IF_ERROR(reserve(shape, meta.size() * 4));
  cuda::StreamHandle s = im.stream->get();
  PD_RETURN_IF_ERROR(cuda::copy_to_device_async(im.meta.data(), meta.data(), meta.size() * 4, s));
  *rows_out = num_logits;
  // The first decode step of each bucket of batch sizes tunes its products' algorithms
  // (cuda::Blas::set_tuning: each product timed on its own operands), launched one by one: a graph's
  // capture cannot wait for timings. Later steps of the bucket, graphs included, take the choices.
  if (decode_step && cuda::product_tuning() && im.tuned_buckets.insert(cuda::Blas::tuning_bucket(T)).second) {
    im.blas->set_tuning(true);
    const Status enqueued = enqueue(shape, batch.after_layer);
    im.blas->set_tuning(false);
    return enqueued;
  }
  if (!graphable) return enqueue(shape, batch.after_layer);
  const auto key = std::make_pair(T, shape.width);
  auto it = im.graphs.find(key);
  if (it == im.graphs.end()) {
    PD_RETURN_IF_ERROR(cuda::Graph::begin_capture(s));
    Status enqueued = enqueue(shape);
    auto graph = cuda::Graph::end_capture(s);
    PD_RETURN_IF_ERROR(enqueued);
    if (!graph.ok()) return graph.status();
    if (im.graphs.size() >= kMaxGraphs) im.graphs.clear();  // many shapes seen: start over
    it = im.graphs.emplace(key, std::move(*graph)).first;
  }
  return it->second.launch(s);
}

Status CudaLlamaModel::reserve(const Shape& shape, size_t meta_bytes) {
  const ModelConfig& c = config_;
  Impl& im = *impl_;
  const int64_t T = shape.tokens, d = c.hidden_size, q = c.q_dim(), qkv = q + 2 * int64_t{c.kv_dim()};
  const int64_t ffn = c.ffn_size, V = c.vocab_size;
  // Captured graphs hold these pointers: before any buffer moves, they all go (also when an
  // allocation below fails half-way, which frees some buffers already). Buffers grow by half again
  // at least, so a batch growing one row at a time does not reallocate at every step.
  cuda::PrefillAttentionArgs split_shape;  // the decode form may split its keys too
  split_shape.num_heads = c.num_heads;
  split_shape.kv = im.layer_kv(c, 0, options_.block_size);
  split_shape.num_chunks = shape.chunks;
  split_shape.max_chunk_len = shape.max_chunk;
  const size_t ws = std::max(cuda::decode_attention_workspace_bytes(attention_args(shape, 0)),
                             cuda::prefill_attention_workspace_bytes(split_shape));
  const bool grow_tokens = T > im.capacity_tokens, grow_logits = shape.num_logits > im.capacity_logits;
  if (grow_tokens || grow_logits || meta_bytes > im.meta.bytes() || ws > im.workspace.bytes())
    im.graphs.clear();
  auto grown = [](int64_t need, int64_t have) { return std::max(need, have + have / 2); };
  if (grow_tokens) {
    im.capacity_tokens = 0;  // until every buffer below is there
    const int64_t n = grown(T, im.capacity_tokens_target);
    PD_ASSIGN_BUFFER(im.x, n * d * 4);
    PD_ASSIGN_BUFFER(im.xn, n * d * 2);
    PD_ASSIGN_BUFFER(im.qkv, n * qkv * 4);
    PD_ASSIGN_BUFFER(im.q, n * q * 2);
    PD_ASSIGN_BUFFER(im.attn, n * q * 2);
    PD_ASSIGN_BUFFER(im.gate_up, n * 2 * ffn * 4);
    PD_ASSIGN_BUFFER(im.hidden, n * ffn * 2);
    PD_ASSIGN_BUFFER(im.split_counters, n * c.num_kv_heads * 4);
    PD_RETURN_IF_ERROR(
        cuda::fill_bytes(im.split_counters.data(), 0, im.split_counters.bytes(), im.stream->get()));
    im.capacity_tokens = im.capacity_tokens_target = n;
  }
  if (grow_logits) {
    im.capacity_logits = 0;
    const int64_t n = grown(shape.num_logits, im.capacity_logits_target);
    PD_ASSIGN_BUFFER(im.final_rows, n * d * 2);
    PD_ASSIGN_BUFFER(im.logits, n * V * 4);
    im.capacity_logits = im.capacity_logits_target = n;
  }
  if (meta_bytes > im.meta.bytes()) PD_ASSIGN_BUFFER(im.meta, std::max(meta_bytes, im.meta.bytes() * 3 / 2));
  if (ws > im.workspace.bytes()) PD_ASSIGN_BUFFER(im.workspace, std::max(ws, im.workspace.bytes() * 3 / 2));
  return ok_status();
}

cuda::DecodeAttentionArgs CudaLlamaModel::attention_args(const Shape& shape, int32_t layer) const {
  const ModelConfig& c = config_;
  const Impl& im = *impl_;
  const int64_t T = shape.tokens;
  const int32_t* meta = im.meta.as<int32_t>();
  cuda::DecodeAttentionArgs a;
  a.q = im.q.as<uint16_t>();
  a.num_heads = c.num_heads;
  a.kv = im.layer_kv(c, layer, options_.block_size);
  const int64_t C = shape.chunks;
  a.num_seqs = static_cast<int32_t>(C);
  a.seq_lens = meta == nullptr ? nullptr : meta + 4 * T;
  a.block_tables = meta == nullptr ? nullptr : meta + 4 * T + 4 * C;
  a.max_blocks_per_seq = shape.width;
  a.max_seq_len = shape.max_len;
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  a.out = im.attn.as<uint16_t>();
  a.split_counters = im.split_counters.as<int32_t>();
  return a;
}

Status CudaLlamaModel::enqueue(const Shape& shape, const std::function<void(int32_t)>& after_layer) {
  const ModelConfig& c = config_;
  Impl& im = *impl_;
  cuda::StreamHandle s = im.stream->get();
  const int64_t T = shape.tokens, d = c.hidden_size, q = c.q_dim(), qkv = q + 2 * int64_t{c.kv_dim()};
  const int64_t ffn = c.ffn_size, V = c.vocab_size;
  const cuda::Dtype dt = im.dtype;
  const int32_t* d_tokens = im.meta.as<int32_t>();
  const int32_t* d_logit_rows = d_tokens + 3 * T;
  const int64_t C = shape.chunks;
  // Every chunk one token: the tensor-core kernel's decode form (a CTA's 4 warps streaming
  // interleaved 16-key tiles; all pairs' keys shared evenly by one wave of CTAs), or the split-KV
  // decode kernel where that form does not apply (block sizes that are not powers of two, more than
  // 8192 keys; docs/perf/gpu-kernel-notes.md). Prefill chunks, with any decode tokens beside them:
  // the tensor-core kernel.
  const bool wide =
      cuda::decode_step_uses_tensor_cores(C * c.num_kv_heads, shape.max_len, options_.block_size);
  const bool decode_only = shape.max_chunk == 1 && !wide;
  cuda::PrefillAttentionArgs prefill;
  prefill.q = im.q.as<uint16_t>();
  prefill.num_heads = c.num_heads;
  prefill.num_chunks = static_cast<int32_t>(C);
  prefill.chunk_q_start = d_tokens + 4 * T + C;
  prefill.chunk_len = d_tokens + 4 * T + 2 * C;
  prefill.chunk_first_pos = d_tokens + 4 * T + 3 * C;
  prefill.block_tables = d_tokens + 4 * T + 4 * C;
  prefill.max_blocks_per_seq = shape.width;
  prefill.max_chunk_len = shape.max_chunk;
  prefill.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  prefill.out = im.attn.as<uint16_t>();
  prefill.workspace = im.workspace.data();
  prefill.workspace_bytes = im.workspace.bytes();
  prefill.split_counters = im.split_counters.as<int32_t>();

  float* x = im.x.as<float>();
  uint16_t* xn = im.xn.as<uint16_t>();
  float* qkv_rows = im.qkv.as<float>();
  cuda::Blas& blas = *im.blas;
  cuda::DecodeAttentionArgs attn = attention_args(shape, 0);
  cuda::RopeQkvArgs rope;
  rope.qkv = qkv_rows;
  rope.ld = qkv;
  rope.positions = d_tokens + T;
  rope.slots = d_tokens + 2 * T;
  rope.rows = T;
  rope.num_heads = c.num_heads;
  rope.rope_dim = c.rope_dim;
  rope.neox = c.rope_ordering == RopeOrdering::kNeox;
  rope.inv_freq = im.inv_freq.as<float>();
  rope.q_out = im.q.as<uint16_t>();
  PD_RETURN_IF_ERROR(cuda::embedding(im.embd.as<uint16_t>(), V, d_tokens, T, d, x, s, dt));
  // A few rows (small decode batches): matrix-vector kernels that normalise their input on the
  // fly; otherwise cuBLAS products between norm kernels. Products write float either way, so each
  // activation is rounded to the model's format once, where a product reads it.
  const bool few_rows = T <= cuda::gemv_max_rows();
  auto product = [&](const float* normed_from, const float* norm_w, const uint16_t* in, const uint16_t* w,
                     int64_t n, int64_t k, float* out, bool accumulate) -> Status {
    if (few_rows) {
      cuda::GemvArgs g;
      g.x = normed_from;
      g.norm_w = norm_w;
      g.eps = c.rms_norm_eps;
      g.xb = normed_from != nullptr ? nullptr : in;
      g.w = w;
      g.m = T;
      g.n = n;
      g.k = k;
      g.y = out;
      g.accumulate = accumulate;
      g.dtype = dt;
      // One row: the split-K form where K allows it, else the work per warp measured fastest for
      // each projection on an H200 (qkv 4 rows × 2 pieces; o and down 1 row × 2 pieces:
      // docs/perf/gpu-kernel-notes.md).
      if (T == 1) {
        g.split_k = true;
        g.rows_per_warp = n == qkv ? 4 : 1;
        g.depth = 2;
      }
      return cuda::gemv(g, s);
    }
    return accumulate ? blas.matmul_f32_add(in, w, T, n, k, out, s, dt)
                      : blas.matmul_f32(in, w, T, n, k, out, s, 0, 0, dt);
  };
  // An output projection (o, down) adds into the residual stream x as it is written (cuBLAS: in
  // the product's epilogue, each sum rounded once as a separate add would), then (cuBLAS rows) the
  // next norm reads x once.
  auto project_out = [&](const uint16_t* in, const uint16_t* w, int64_t k,
                         const float* next_norm_w) -> Status {
    PD_RETURN_IF_ERROR(product(nullptr, nullptr, in, w, d, k, x, true));
    return few_rows ? ok_status() : cuda::rms_norm(x, next_norm_w, c.rms_norm_eps, T, d, xn, s, dt);
  };
  if (!few_rows)
    PD_RETURN_IF_ERROR(
        cuda::rms_norm(x, im.layers[0].attn_norm.as<float>(), c.rms_norm_eps, T, d, xn, s, dt));
  for (int32_t li = 0; li < c.num_layers; ++li) {
    const Impl::Layer& L = im.layers[static_cast<size_t>(li)];
    PD_RETURN_IF_ERROR(
        product(x, L.attn_norm.as<float>(), xn, L.wqkv.as<uint16_t>(), qkv, d, qkv_rows, false));
    attn.kv = im.layer_kv(c, li, options_.block_size);
    rope.bias = L.bqkv.data() != nullptr ? L.bqkv.as<float>() : nullptr;
    rope.kv = attn.kv;
    PD_RETURN_IF_ERROR(cuda::rope_qkv(rope, s));
    if (after_layer) after_layer(li);  // this layer's K/V are written once the work queued so far has run
    if (decode_only) {
      PD_RETURN_IF_ERROR(cuda::decode_attention(attn, im.workspace.data(), im.workspace.bytes(), s));
    } else {
      prefill.kv = attn.kv;
      PD_RETURN_IF_ERROR(cuda::prefill_attention(prefill, s));
    }
    PD_RETURN_IF_ERROR(project_out(im.attn.as<uint16_t>(), L.wo.as<uint16_t>(), q, L.ffn_norm.as<float>()));
    if (few_rows) {
      // gate|up and SwiGLU in one kernel.
      cuda::GemvArgs g;
      g.x = x;
      g.norm_w = L.ffn_norm.as<float>();
      g.eps = c.rms_norm_eps;
      g.w = L.w_gate_up.as<uint16_t>();
      g.m = T;
      g.n = ffn;
      g.k = d;
      g.swiglu_out = im.hidden.as<uint16_t>();
      g.dtype = dt;
      if (T == 1) {  // 2 gate and 2 up rows × 2 pieces a warp: measured fastest on an H200
        g.rows_per_warp = 4;
        g.depth = 2;
      }
      PD_RETURN_IF_ERROR(cuda::gemv(g, s));
    } else {
      PD_RETURN_IF_ERROR(product(x, L.ffn_norm.as<float>(), xn, L.w_gate_up.as<uint16_t>(), 2 * ffn, d,
                                 im.gate_up.as<float>(), false));
      PD_RETURN_IF_ERROR(cuda::silu_mul(im.gate_up.as<float>(), T, ffn, im.hidden.as<uint16_t>(), s, dt));
    }
    const float* next_norm = li + 1 < c.num_layers
                                 ? im.layers[static_cast<size_t>(li) + 1].attn_norm.as<float>()
                                 : im.output_norm.as<float>();
    PD_RETURN_IF_ERROR(project_out(im.hidden.as<uint16_t>(), L.w_down.as<uint16_t>(), ffn, next_norm));
  }
  if (shape.num_logits == 0) return ok_status();
  if (T == 1 && shape.num_logits == 1) {
    // One sequence's decode step: the LM head as a matrix–vector product that normalises its input
    // itself, so neither the final norm nor the gather of rows runs, and it starts while the kernel
    // ahead ends; 4 rows × 2 pieces a warp (gate|up's shape with the norm: 86–89 % of the copy
    // bandwidth, cuBLAS 81–86 %, in two runs). The step: −9 µs (gpu-kernel-notes.md). Not for 2 to 8
    // rows: every CTA would normalise all of them again, over 16 k CTAs (unmeasured).
    cuda::GemvArgs g;
    g.x = x;
    g.norm_w = im.output_norm.as<float>();
    g.eps = c.rms_norm_eps;
    g.w = im.lm_head();
    g.m = 1;
    g.n = V;
    g.k = d;
    g.y = im.logits.as<float>();
    g.rows_per_warp = 4;
    g.depth = 2;
    g.dtype = dt;
    return cuda::gemv(g, s);
  }
  if (few_rows)
    PD_RETURN_IF_ERROR(cuda::rms_norm(x, im.output_norm.as<float>(), c.rms_norm_eps, T, d, xn, s, dt));
  PD_RETURN_IF_ERROR(
      cuda::gather_rows(xn, d, d_logit_rows, shape.num_logits, im.final_rows.as<uint16_t>(), s));
  return blas.matmul_f32(im.final_rows.as<uint16_t>(), im.lm_head(), shape.num_logits, V, d,
                         im.logits.as<float>(), s, 0, 0, dt);
}

}  // namespace pdserve

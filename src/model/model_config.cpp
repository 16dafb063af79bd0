#include "model/model_config.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cmath>

namespace pdserve {

namespace {
Status positive(const char* what, int64_t v, int64_t max) {
  if (v <= 0 || v > max)
    return invalid_argument(fmt::format("model metadata: {} = {} is out of range (1..{})", what, v, max));
  return ok_status();
}
}  // namespace

StatusOr<ModelConfig> ModelConfig::from_gguf(const GgufFile& f) {
  ModelConfig c;
  PD_ASSIGN_OR_RETURN(c.architecture, f.get_string("general.architecture"));
  if (c.architecture != "llama" && c.architecture != "qwen2") {
    return unimplemented(
        fmt::format("model architecture '{}' is not supported (supported: llama, qwen2)", c.architecture));
  }
  auto name = f.get_string("general.name");
  c.name = name.ok() ? *name : c.architecture;
  const std::string a = c.architecture + ".";
  PD_ASSIGN_OR_RETURN(int64_t layers, f.get_int(a + "block_count"));
  PD_ASSIGN_OR_RETURN(int64_t hidden, f.get_int(a + "embedding_length"));
  PD_ASSIGN_OR_RETURN(int64_t ffn, f.get_int(a + "feed_forward_length"));
  PD_ASSIGN_OR_RETURN(int64_t heads, f.get_int(a + "attention.head_count"));
  PD_ASSIGN_OR_RETURN(int64_t kv_heads, f.get_int_or(a + "attention.head_count_kv", heads));
  PD_ASSIGN_OR_RETURN(int64_t ctx, f.get_int_or(a + "context_length", 2048));
  PD_RETURN_IF_ERROR(positive("block_count", layers, 1024));
  PD_RETURN_IF_ERROR(positive("embedding_length", hidden, 1 << 17));
  PD_RETURN_IF_ERROR(positive("feed_forward_length", ffn, 1 << 19));
  PD_RETURN_IF_ERROR(positive("attention.head_count", heads, 1024));
  PD_RETURN_IF_ERROR(positive("attention.head_count_kv", kv_heads, heads));
  PD_RETURN_IF_ERROR(positive("context_length", ctx, 1 << 24));
  int64_t head_dim = hidden / heads;
  PD_ASSIGN_OR_RETURN(int64_t key_len, f.get_int_or(a + "attention.key_length", head_dim));
  head_dim = key_len;
  PD_RETURN_IF_ERROR(positive("attention.key_length", head_dim, 1024));
  if (head_dim % 16 != 0 || head_dim > 256) {
    return unimplemented(
        fmt::format("model metadata: head dimension {} is not a multiple of 16 up to 256, which the CPU "
                    "attention kernel needs",
                    head_dim));
  }
  PD_ASSIGN_OR_RETURN(int64_t rope_dim, f.get_int_or(a + "rope.dimension_count", head_dim));
  PD_RETURN_IF_ERROR(c.set_shape({layers, hidden, ffn, heads, kv_heads, head_dim, rope_dim, ctx})
                         .with_context("model metadata"));
  PD_ASSIGN_OR_RETURN(double eps, f.get_float_or(a + "attention.layer_norm_rms_epsilon", 1e-5));
  PD_ASSIGN_OR_RETURN(double theta, f.get_float_or(a + "rope.freq_base", 10000.0));
  if (!(eps > 0 && eps < 1))
    return invalid_argument(fmt::format("model metadata: rms epsilon {} is out of range", eps));
  if (!(theta > 0))
    return invalid_argument(fmt::format("model metadata: rope.freq_base {} is out of range", theta));

  c.rms_norm_eps = static_cast<float>(eps);
  c.rope_theta = static_cast<float>(theta);
  c.rope_ordering = c.architecture == "qwen2" ? RopeOrdering::kNeox : RopeOrdering::kNormal;
  c.has_qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;

  // Llama 3.x frequency scaling.
  auto scaling_type = f.get_string(a + "rope.scaling.type");
  PD_ASSIGN_OR_RETURN(double factor, f.get_float_or(a + "rope.scaling.factor", 0.0));
  bool has_freqs_tensor = f.find_tensor("rope_freqs.weight") != nullptr;
  if ((scaling_type.ok() && *scaling_type == "llama3") || (has_freqs_tensor && factor > 0)) {
    c.rope_scaling.factor = static_cast<float>(factor);
    PD_ASSIGN_OR_RETURN(double lo, f.get_float_or(a + "rope.scaling.low_freq_factor", 1.0));
    PD_ASSIGN_OR_RETURN(double hi, f.get_float_or(a + "rope.scaling.high_freq_factor", 4.0));
    PD_ASSIGN_OR_RETURN(int64_t orig, f.get_int_or(a + "rope.scaling.original_context_length", 8192));
    c.rope_scaling.low_freq_factor = static_cast<float>(lo);
    c.rope_scaling.high_freq_factor = static_cast<float>(hi);
    c.rope_scaling.original_context_length = static_cast<int32_t>(orig);
  }

  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  if (!embd || embd->dims.size() != 2) return invalid_argument("model has no 2-D tensor 'token_embd.weight'");
  if (embd->dims[0] != hidden) {
    return invalid_argument(
        fmt::format("token_embd.weight has rows of {} but embedding_length is {}", embd->dims[0], hidden));
  }
  c.vocab_size = static_cast<int32_t>(embd->dims[1]);
  return c;
}

Status ModelConfig::set_shape(const ModelShape& s) {
  if (s.kv_heads <= 0 || s.heads % s.kv_heads != 0)
    return invalid_argument(
        fmt::format("{} attention heads are not a multiple of {} KV heads", s.heads, s.kv_heads));
  if (s.rope_dim <= 0 || s.rope_dim > s.head_dim || s.rope_dim % 2 != 0)
    return invalid_argument(
        fmt::format("a rotary dimension of {} is invalid for heads of {} values", s.rope_dim, s.head_dim));
  num_layers = static_cast<int32_t>(s.layers);
  hidden_size = static_cast<int32_t>(s.hidden);
  ffn_size = static_cast<int32_t>(s.ffn);
  num_heads = static_cast<int32_t>(s.heads);
  num_kv_heads = static_cast<int32_t>(s.kv_heads);
  head_dim = static_cast<int32_t>(s.head_dim);
  rope_dim = static_cast<int32_t>(s.rope_dim);
  context_length = static_cast<int32_t>(s.context);
  return ok_status();
}

std::vector<float> llama3_freq_factors(const ModelConfig& c) {
  std::vector<float> out(static_cast<size_t>(c.rope_dim / 2));
  const RopeScaling& s = c.rope_scaling;
  const double low_wavelen = s.original_context_length / s.low_freq_factor;
  const double high_wavelen = s.original_context_length / s.high_freq_factor;
  for (int32_t i = 0; i < c.rope_dim / 2; ++i) {
    double freq = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / c.rope_dim);
    double wavelen = 2 * M_PI / freq;
    double new_freq;
    if (wavelen < high_wavelen) {
      new_freq = freq;
    } else if (wavelen > low_wavelen) {
      new_freq = freq / s.factor;
    } else {
      double smooth = (s.original_context_length / wavelen - s.low_freq_factor) /
                      (s.high_freq_factor - s.low_freq_factor);
      new_freq = (1 - smooth) * freq / s.factor + smooth * freq;
    }
    out[static_cast<size_t>(i)] = static_cast<float>(freq / new_freq);
  }
  return out;
}

uint64_t synthetic_model_fingerprint(std::string_view name, uint64_t seed, int32_t vocab_size) {
  const uint64_t h = XXH3_64bits_withSeed(name.data(), name.size(), seed);
  return XXH3_64bits_withSeed(&vocab_size, sizeof vocab_size, h);
}

}  // namespace pdserve

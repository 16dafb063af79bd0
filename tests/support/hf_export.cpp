#include "tests/support/hf_export.h"

#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "kernels/cpu/fp16.h"
#include "kernels/cpu/quant.h"
#include "model/gguf_writer.h"
#include "model/safetensors_writer.h"

namespace pdserve {

using nlohmann::json;

namespace {

constexpr uint32_t kFileTypeBf16 = 32;  // llama.cpp's LLAMA_FTYPE_MOSTLY_BF16
constexpr uint32_t kFileTypeF16 = 1;    // LLAMA_FTYPE_MOSTLY_F16

// A GGUF tensor's rows dequantized and rounded to bf16 (as CudaLlamaModel::load_gguf does); with
// unpermute_heads > 0, q or k rows put back in Hugging Face's order (GGUF's llama permutes them so
// that adjacent pairs rotate: GGUF row h·hd + 2j + s is Hugging Face's row h·hd + s·hd/2 + j).
std::vector<uint8_t> bf16_rows(const GgufTensorInfo& t, int32_t unpermute_heads, bool fp16 = false,
                               float scale = 1.0f) {
  const int64_t cols = t.dims[0], rows = t.num_elements() / cols;
  std::vector<float> row(static_cast<size_t>(cols));
  std::vector<uint8_t> out(static_cast<size_t>(rows * cols) * 2);
  const size_t rb = cpu::row_bytes(t.type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::dequantize_row(t.type, t.data + static_cast<size_t>(r) * rb, row.data(), cols);
    int64_t dst = r;
    if (unpermute_heads > 0) {
      const int64_t hd = rows / unpermute_heads, h = r / hd, i = r % hd;
      dst = h * hd + (i % 2) * (hd / 2) + i / 2;
    }
    for (int64_t k = 0; k < cols; ++k) {
      const float f = row[static_cast<size_t>(k)] * scale;
      const uint16_t b = fp16 ? cpu::fp32_to_fp16(f) : cpu::fp32_to_bf16(f);
      std::memcpy(out.data() + (dst * cols + k) * 2, &b, 2);
    }
  }
  return out;
}

// bf16 values (raw bits) in `dtype`: "BF16" as they are, "F32" exactly, "F16" rounded to nearest.
std::vector<uint8_t> bf16_as(const std::vector<uint8_t>& bf16, const std::string& dtype) {
  if (dtype == "BF16") return bf16;
  const size_t n = bf16.size() / 2, width = dtype == "F32" ? 4 : 2;
  std::vector<uint8_t> out(n * width);
  for (size_t i = 0; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, bf16.data() + 2 * i, 2);
    const float f = cpu::bf16_to_fp32(b);
    if (width == 4) {
      std::memcpy(out.data() + 4 * i, &f, 4);
    } else {
      const uint16_t h = cpu::fp32_to_fp16(f);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

// Layer `layer`'s q (which 0), k (1) or v (2) bias of n values, in Hugging Face's row order.
std::vector<float> qkv_bias(const HfCheckpointOptions& o, int32_t layer, int which, int64_t n) {
  std::mt19937_64 rng(o.bias_seed * 1000003 + static_cast<uint64_t>(layer) * 3 +
                      static_cast<uint64_t>(which));
  std::uniform_real_distribution<float> u(-o.bias_scale, o.bias_scale);
  std::vector<float> b(static_cast<size_t>(n));
  for (float& x : b) x = u(rng);
  return b;
}

std::vector<uint8_t> float_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

}  // namespace

Status write_hf_checkpoint(const GgufFile& f, const ModelConfig& c, const std::string& out_dir,
                           const HfCheckpointOptions& options) {
  if (options.dtype != "BF16" && options.dtype != "F16" && options.dtype != "F32")
    return invalid_argument("a checkpoint's dtype is BF16, F16 or F32, not " + options.dtype);
  const std::filesystem::path dir(out_dir);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return internal_error(fmt::format("cannot make '{}': {}", out_dir, ec.message()));
  std::string missing;
  auto matrix = [&](const std::string& name, int32_t unpermute_heads) {
    const GgufTensorInfo* t = f.find_tensor(name);
    if (t == nullptr) {
      missing = name;
      return SafetensorsEntry{};
    }
    const int64_t cols = t->dims[0], rows = t->dims[1];
    return SafetensorsEntry{
        "", options.dtype, {rows, cols}, bf16_as(bf16_rows(*t, unpermute_heads), options.dtype)};
  };
  auto vector = [&](const std::string& name) {
    const GgufTensorInfo* t = f.find_tensor(name);
    if (t == nullptr) {
      missing = name;
      return SafetensorsEntry{};
    }
    return SafetensorsEntry{
        "", "F32", {t->num_elements()}, std::vector<uint8_t>(t->data, t->data + t->size_bytes)};
  };
  auto named = [](SafetensorsEntry e, std::string name) {
    e.name = std::move(name);
    return e;
  };
  std::vector<SafetensorsEntry> shard[2];
  std::string weight_map;
  auto add = [&](int s, SafetensorsEntry e) {
    weight_map += fmt::format("{}\"{}\": \"model-0000{}-of-00002.safetensors\"",
                              weight_map.empty() ? "" : ", ", e.name, s + 1);
    shard[s].push_back(std::move(e));
  };
  add(0, named(matrix("token_embd.weight", 0), "model.embed_tokens.weight"));
  add(1, named(vector("output_norm.weight"), "model.norm.weight"));
  if (!c.tied_embeddings) add(1, named(matrix("output.weight", 0), "lm_head.weight"));
  for (int32_t i = 0; i < c.num_layers; ++i) {
    const int s = i < c.num_layers / 2 ? 0 : 1;
    const std::string g = fmt::format("blk.{}.", i), h = fmt::format("model.layers.{}.", i);
    add(s, named(vector(g + "attn_norm.weight"), h + "input_layernorm.weight"));
    add(s, named(vector(g + "ffn_norm.weight"), h + "post_attention_layernorm.weight"));
    add(s, named(matrix(g + "attn_q.weight", c.num_heads), h + "self_attn.q_proj.weight"));
    add(s, named(matrix(g + "attn_k.weight", c.num_kv_heads), h + "self_attn.k_proj.weight"));
    add(s, named(matrix(g + "attn_v.weight", 0), h + "self_attn.v_proj.weight"));
    if (options.qwen2) {
      const int64_t widths[3] = {c.q_dim(), c.kv_dim(), c.kv_dim()};
      const char* names[3] = {"q_proj", "k_proj", "v_proj"};
      for (int w = 0; w < 3; ++w)
        add(s, SafetensorsEntry{fmt::format("{}self_attn.{}.bias", h, names[w]),
                                "F32",
                                {widths[w]},
                                float_bytes(qkv_bias(options, i, w, widths[w]))});
    }
    add(s, named(matrix(g + "attn_output.weight", 0), h + "self_attn.o_proj.weight"));
    add(s, named(matrix(g + "ffn_gate.weight", 0), h + "mlp.gate_proj.weight"));
    add(s, named(matrix(g + "ffn_up.weight", 0), h + "mlp.up_proj.weight"));
    add(s, named(matrix(g + "ffn_down.weight", 0), h + "mlp.down_proj.weight"));
  }
  if (!missing.empty()) return invalid_argument("the GGUF has no tensor " + missing);
  for (int s = 0; s < 2; ++s)
    PD_RETURN_IF_ERROR(write_safetensors(
        (dir / fmt::format("model-0000{}-of-00002.safetensors", s + 1)).string(), shard[s]));
  std::ofstream(dir / "model.safetensors.index.json") << "{\"weight_map\": {" << weight_map << "}}";
  std::ofstream(dir / "config.json") << fmt::format(
      R"({{"model_type": "{}", "hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {},
          "num_attention_heads": {}, "num_key_value_heads": {}, "vocab_size": {}, "rms_norm_eps": {},
          "rope_theta": {}, "max_position_embeddings": {}, "tie_word_embeddings": {}}})",
      options.qwen2 ? "qwen2" : "llama", c.hidden_size, c.ffn_size, c.num_layers, c.num_heads, c.num_kv_heads,
      c.vocab_size, c.rms_norm_eps, c.rope_theta, c.context_length, c.tied_embeddings ? "true" : "false");
  return ok_status();
}

namespace {

// The GGUF with its tensors that are not F32 as bf16 (bf16_rows) and general.file_type bf16, or
// with `fp16` as F16 (rounded from the same dequantized values); with
// `qwen2` (the model's config), as the qwen2 architecture: "qwen2." metadata, q and k rows in
// Hugging Face's order (qwen2 rotates halves, as Hugging Face does).
GgufWriter bf16_copy(const GgufFile& model, const ModelConfig* qwen2, bool fp16 = false,
                     const TensorScale& scale = nullptr) {
  GgufWriter w(3, model.alignment());
  for (const auto& [key, value] : model.metadata()) {
    if (key == "general.file_type") {
      w.add_u32(key, fp16 ? kFileTypeF16 : kFileTypeBf16);
    } else if (qwen2 != nullptr && key == "general.architecture") {
      w.add_string(key, "qwen2");
    } else if (qwen2 != nullptr && key.starts_with("llama.")) {
      w.add("qwen2." + key.substr(6), value);
    } else {
      w.add(key, value);
    }
  }
  for (const GgufTensorInfo& t : model.tensors()) {
    if (t.type == GgmlType::kF32) {
      w.add_tensor(t.name, t.type, t.dims, std::vector<uint8_t>(t.data, t.data + t.size_bytes));
      continue;
    }
    int32_t heads = 0;
    if (qwen2 != nullptr && t.name.ends_with(".attn_q.weight")) heads = qwen2->num_heads;
    if (qwen2 != nullptr && t.name.ends_with(".attn_k.weight")) heads = qwen2->num_kv_heads;
    w.add_tensor(t.name, fp16 ? GgmlType::kF16 : GgmlType::kBF16, t.dims,
                 bf16_rows(t, heads, fp16, scale ? scale(t.name) : 1.0f));
  }
  return w;
}

}  // namespace

StatusOr<std::unique_ptr<GgufFile>> bf16_gguf(const GgufFile& model, const TensorScale& scale) {
  return GgufFile::parse_owned(bf16_copy(model, nullptr, /*fp16=*/false, scale).finish());
}

StatusOr<std::unique_ptr<GgufFile>> f16_gguf(const GgufFile& model, const TensorScale& scale) {
  return GgufFile::parse_owned(bf16_copy(model, nullptr, /*fp16=*/true, scale).finish());
}

StatusOr<std::unique_ptr<GgufFile>> qwen2_gguf(const GgufFile& model, const ModelConfig& c,
                                               const HfCheckpointOptions& options) {
  GgufWriter w = bf16_copy(model, &c);
  const int64_t widths[3] = {c.q_dim(), c.kv_dim(), c.kv_dim()};
  const char* names[3] = {"attn_q", "attn_k", "attn_v"};
  for (int32_t i = 0; i < c.num_layers; ++i) {
    for (int which = 0; which < 3; ++which)
      w.add_tensor(fmt::format("blk.{}.{}.bias", i, names[which]), GgmlType::kF32, {widths[which]},
                   float_bytes(qkv_bias(options, i, which, widths[which])));
  }
  return GgufFile::parse_owned(w.finish());
}

Status write_hf_tokenizer(const GgufFile& model, const std::string& variant, const std::string& out) {
  const std::filesystem::path dir(out);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return internal_error(fmt::format("cannot make '{}': {}", out, ec.message()));
  const GgufValue* token_values = model.find("tokenizer.ggml.tokens");
  const GgufValue* type_values = model.find("tokenizer.ggml.token_type");
  const GgufValue* merge_values = model.find("tokenizer.ggml.merges");
  if (token_values == nullptr || type_values == nullptr || merge_values == nullptr ||
      token_values->as_array() == nullptr || type_values->as_array() == nullptr ||
      merge_values->as_array() == nullptr)
    return invalid_argument("the GGUF has no byte-level BPE vocabulary (tokens, token types and merges)");
  if (variant != "smollm2" && variant != "bpe_gpt2" && variant != "bpe_llama_bpe" && variant != "bpe_qwen2")
    return invalid_argument("unknown tokenizer variant '" + variant + "'");
  const auto& tokens = token_values->as_array()->items;
  const auto& types = type_values->as_array()->items;
  const auto& merges = merge_values->as_array()->items;
  json vocab = json::object();
  json added = json::array();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string& text = std::get<std::string>(tokens[i].value);
    vocab[text] = i;
    if (std::get<int64_t>(types[i].value) == 3) {
      added.push_back({{"id", i},
                       {"content", text},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
    }
  }
  json merge_list = json::array();
  for (const auto& m : merges) {
    const std::string& text = std::get<std::string>(m.value);
    if (variant == "smollm2") {
      merge_list.push_back(text);  // the older form; the variants use pairs, as newer files do
    } else {
      const size_t space = text.find(' ', 1);
      merge_list.push_back(json::array({text.substr(0, space), text.substr(space + 1)}));
    }
  }
  const json byte_level_regex = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  const json byte_level_plain = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
  const auto split = [](const std::string& digits) {
    return json{{"type", "Split"},
                {"pattern",
                 {{"Regex", "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" + digits +
                                "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
                {"behavior", "Isolated"},
                {"invert", false}};
  };
  json pre;
  json normalizer = nullptr;
  json post = {
      {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  if (variant == "smollm2") {
    pre = {{"type", "Sequence"},
           {"pretokenizers",
            json::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level_regex})}};
  } else if (variant == "bpe_gpt2") {
    pre = byte_level_regex;
  } else if (variant == "bpe_llama_bpe") {
    pre = {{"type", "Sequence"}, {"pretokenizers", json::array({split("{1,3}"), byte_level_plain})}};
    // llama-bpe adds BOS (the fixture's GGUF leaves add_bos_token out, llama.cpp's default for it).
    post = {{"type", "TemplateProcessing"},
            {"single", json::array({{{"SpecialToken", {{"id", "<|im_start|>"}, {"type_id", 0}}}},
                                    {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
            {"pair", json::array()},
            {"special_tokens",
             {{"<|im_start|>", {{"id", "<|im_start|>"}, {"ids", {1}}, {"tokens", {"<|im_start|>"}}}}}}};
  } else if (variant == "bpe_qwen2") {
    pre = {{"type", "Sequence"}, {"pretokenizers", json::array({split(""), byte_level_plain})}};
    normalizer = {{"type", "NFC"}};
  }
  const json tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", normalizer},
      {"pre_tokenizer", pre},
      {"post_processor", post},
      {"decoder",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"vocab", vocab},
        {"merges", merge_list}}}};
  json config = {{"add_prefix_space", false},
                 {"bos_token", "<|im_start|>"},
                 {"clean_up_tokenization_spaces", variant == "bpe_gpt2" || variant == "bpe_llama_bpe"},
                 {"eos_token", "<|im_end|>"},
                 {"model_max_length", 8192},
                 {"pad_token", "<|im_end|>"},
                 {"tokenizer_class", "GPT2Tokenizer"},
                 {"unk_token", "<|endoftext|>"},
                 {"vocab_size", tokens.size()}};
  if (auto tmpl = model.get_string("tokenizer.chat_template"); tmpl.ok()) config["chat_template"] = *tmpl;
  std::ofstream(dir / "tokenizer.json") << tokenizer.dump();
  std::ofstream(dir / "tokenizer_config.json") << config.dump(2);
  if (!std::filesystem::exists(dir / "config.json"))
    std::ofstream(dir / "config.json")
        << json{{"vocab_size", tokens.size()}, {"bos_token_id", 1}, {"eos_token_id", 2}}.dump();
  return ok_status();
}

}  // namespace pdserve

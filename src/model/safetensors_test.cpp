#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "model/safetensors_writer.h"

namespace pdserve {
namespace {

std::vector<uint8_t> bytes_of(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

TEST(Safetensors, ReadsTensorsAndTheirBytes) {
  const std::vector<SafetensorsEntry> entries = {
      {"a.weight", "F32", {2, 3}, bytes_of({1, 2, 3, 4, 5, 6})},
      {"b", "BF16", {4}, {0x80, 0x3F, 0x00, 0x40, 0x40, 0x40, 0x80, 0x40}},
      {"ids", "I64", {1}, std::vector<uint8_t>(8, 0)},
  };
  const std::vector<uint8_t> file = safetensors_bytes(entries);
  auto f = SafetensorsFile::parse(file, "t.safetensors");
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  ASSERT_EQ((*f)->tensors().size(), 3u);
  const SafetensorsTensor* a = (*f)->find("a.weight");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, SafetensorsDtype::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->num_elements(), 6);
  float v[6];
  std::memcpy(v, a->data, sizeof v);
  EXPECT_EQ(v[5], 6.0f);
  EXPECT_EQ((*f)->find("b")->dtype, SafetensorsDtype::kBF16);
  EXPECT_EQ((*f)->find("ids")->dtype, SafetensorsDtype::kOther);
  EXPECT_EQ((*f)->find("ids")->dtype_name, "I64");
  EXPECT_EQ((*f)->find("missing"), nullptr);
}

TEST(Safetensors, RefusesMalformedFilesWithTheReason) {
  const std::vector<SafetensorsEntry> one = {{"w", "F32", {2}, bytes_of({1, 2})}};
  struct Case {
    std::string header;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"[1, 2]", "not a JSON object"},
      {"{\"w\": 5}", "not an object"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2]}}", "data_offsets"},
      {"{\"w\": {\"dtype\": \"Q4\", \"shape\": [2], \"data_offsets\": [0, 8]}}", "unknown dtype 'Q4'"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}", "8 bytes for 3 elements"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 800]}}", "ends at byte 800"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 0]}}", "ordered"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [-2], \"data_offsets\": [0, 8]}}", "non-negative"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 8]}}",
       "more elements than the file has bytes"},
      {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}", "not valid JSON"},
  };
  for (const Case& c : cases) {
    auto f = SafetensorsFile::parse(safetensors_bytes(one, c.header), "bad.safetensors");
    ASSERT_FALSE(f.ok()) << c.header;
    EXPECT_NE(f.status().message().find(c.says), std::string::npos)
        << c.header << ": " << f.status().message();
    EXPECT_NE(f.status().message().find("bad.safetensors"), std::string::npos) << f.status().message();
  }
  const std::vector<uint8_t> tiny = {1, 2, 3};
  EXPECT_FALSE(SafetensorsFile::parse(tiny, "tiny").ok());
  std::vector<uint8_t> huge_length = safetensors_bytes(one);
  huge_length[6] = 0xFF;  // a header length far past the file
  auto f = SafetensorsFile::parse(huge_length, "len");
  ASSERT_FALSE(f.ok());
  EXPECT_NE(f.status().message().find("does not fit"), std::string::npos) << f.status().message();
}

constexpr const char* kLlama31Config = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
  "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
  "max_position_embeddings": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";

TEST(HfConfig, ReadsLlamaAndQwen2Configs) {
  auto c = model_config_from_hf(kLlama31Config, "config.json");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->architecture, "llama");
  EXPECT_EQ(c->num_layers, 32);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->ffn_size, 14336);
  EXPECT_EQ(c->num_heads, 32);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->context_length, 131072);
  EXPECT_FLOAT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->rope_ordering, RopeOrdering::kNeox);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.original_context_length, 8192);
  EXPECT_FALSE(c->has_qkv_bias);
  EXPECT_FALSE(c->tied_embeddings);

  auto q = model_config_from_hf(R"({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
      "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
      "tie_word_embeddings": false, "rope_scaling": null})",
                                "qwen.json");
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_TRUE(q->has_qkv_bias);
  EXPECT_EQ(q->head_dim, 128);
  EXPECT_EQ(q->rope_scaling.factor, 0.0f);

  auto gemma = model_config_from_hf(R"({"model_type": "gemma2"})", "g.json");
  EXPECT_EQ(gemma.status().code(), StatusCode::kUnimplemented);
  auto missing = model_config_from_hf(R"({"model_type": "llama", "hidden_size": 64})", "m.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("\"num_hidden_layers\" is missing"), std::string::npos)
      << missing.status().message();
  auto bad = model_config_from_hf(R"({"model_type": "llama", "num_hidden_layers": -1})", "b.json");
  EXPECT_NE(bad.status().message().find("integer from 1"), std::string::npos) << bad.status().message();
}

TEST(HfConfig, RefusesWhatPdserveDoesNotComputeAndReadsTransformers5) {
  const std::string base = R"("model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100)";
  auto with = [&](const std::string& more) {
    return model_config_from_hf("{" + base + ", " + more + "}", "c.json");
  };
  for (const char* more : {R"("mlp_bias": true)", R"("attention_bias": true)", R"("hidden_act": "gelu")",
                           R"("use_sliding_window": true)", R"("rope_scaling": {"rope_type": "yarn"})"}) {
    auto c = with(more);
    EXPECT_EQ(c.status().code(), StatusCode::kUnimplemented) << more << ": " << c.status().to_string();
  }
  for (const char* more :
       {R"("rms_norm_eps": 1e300)", R"("rope_theta": -1)",
        R"("rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 1e10})",
        R"("rope_scaling": {"rope_type": "llama3", "factor": 1e-320})"}) {
    auto c = with(more);
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << more << ": " << c.status().to_string();
  }
  auto v5 = with(R"("hidden_act": "silu", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})");
  ASSERT_TRUE(v5.ok()) << v5.status().to_string();
  EXPECT_FLOAT_EQ(v5->rope_theta, 500000.0f);
  EXPECT_FLOAT_EQ(v5->rope_scaling.factor, 8.0f);
  auto plain = with(R"("rope_scaling": {"rope_type": "default"})");
  ASSERT_TRUE(plain.ok()) << plain.status().to_string();
  EXPECT_EQ(plain->rope_scaling.factor, 0.0f);
}

// Stored buffers and a stored copy of a tied head are not parameters.
TEST(HfCheckpoint, CountsParametersOnly) {
  for (bool tied : {true, false}) {
    const auto dir = std::filesystem::temp_directory_path() /
                     ("pdserve_hf_params_" + std::to_string(::getpid()) + (tied ? "_tied" : "_untied"));
    std::filesystem::create_directories(dir);
    std::string config = kLlama31Config;
    const std::string untied = R"("tie_word_embeddings": false)";
    ASSERT_NE(config.find(untied), std::string::npos);
    if (tied) config.replace(config.find(untied), untied.size(), R"("tie_word_embeddings": true)");
    std::ofstream(dir / "config.json") << config;
    ASSERT_TRUE(
        write_safetensors((dir / "model.safetensors").string(),
                          {{"model.embed_tokens.weight", "F32", {2, 3}, bytes_of({1, 2, 3, 4, 5, 6})},
                           {"lm_head.weight", "F32", {2, 3}, bytes_of({1, 2, 3, 4, 5, 6})},
                           {"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {2}, bytes_of({1, 2})},
                           {"model.norm.weight", "F32", {3}, bytes_of({1, 1, 1})}})
            .ok());
    auto ck = HfCheckpoint::open(dir.string());
    ASSERT_TRUE(ck.ok()) << ck.status().to_string();
    EXPECT_EQ((*ck)->num_parameters(), tied ? 9 : 15) << (tied ? "tied" : "untied");
    std::filesystem::remove_all(dir);
  }
}

TEST(HfCheckpoint, OpensShardsThroughTheIndex) {
  const auto dir = std::filesystem::temp_directory_path() / ("pdserve_hf_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream(dir / "config.json") << kLlama31Config;
    std::ofstream(dir / "model.safetensors.index.json")
        << R"({"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
              "y": "model-00002-of-00002.safetensors"}})";
  }
  ASSERT_TRUE(write_safetensors((dir / "model-00001-of-00002.safetensors").string(),
                                {{"x", "F32", {1}, bytes_of({7})}})
                  .ok());
  ASSERT_TRUE(write_safetensors((dir / "model-00002-of-00002.safetensors").string(),
                                {{"y", "F32", {2}, bytes_of({8, 9})}})
                  .ok());
  auto ck = HfCheckpoint::open(dir.string());
  ASSERT_TRUE(ck.ok()) << ck.status().to_string();
  EXPECT_EQ((*ck)->config().num_layers, 32);
  ASSERT_NE((*ck)->find("y"), nullptr);
  EXPECT_EQ((*ck)->find("y")->num_elements(), 2);
  EXPECT_EQ((*ck)->num_parameters(), 3);  // from the shards, not from config.json's shapes
  ASSERT_NE((*ck)->find("x"), nullptr);
  EXPECT_NE((*ck)->fingerprint(), 0u);

  // Different data under the same headers: another fingerprint.
  const uint64_t first = (*ck)->fingerprint();
  ASSERT_TRUE(write_safetensors((dir / "model-00002-of-00002.safetensors").string(),
                                {{"y", "F32", {2}, bytes_of({8, 10})}})
                  .ok());
  auto changed = HfCheckpoint::open(dir.string());
  ASSERT_TRUE(changed.ok());
  EXPECT_NE((*changed)->fingerprint(), first);

  std::ofstream(dir / "model.safetensors.index.json") << R"({"weight_map": {"x": "../etc/passwd"}})";
  auto escaped = HfCheckpoint::open(dir.string());
  ASSERT_FALSE(escaped.ok());
  EXPECT_NE(escaped.status().message().find("bad shard file"), std::string::npos)
      << escaped.status().message();

  // config.json must be a small regular file (a device would be read forever).
  std::filesystem::remove(dir / "config.json");
  std::filesystem::create_symlink("/dev/zero", dir / "config.json");
  auto device = HfCheckpoint::open(dir.string());
  ASSERT_FALSE(device.ok());
  EXPECT_NE(device.status().message().find("not a regular file"), std::string::npos)
      << device.status().message();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace pdserve

// The test support's exports of the default model (hf_export.h), on the CPU: the F16 and F32
// checkpoints hold the BF16 checkpoint's values, and the Qwen2 GGUF twin computes the llama model
// it came from once its biases are zero — so that the GPU tests built on them (cuda_model_test)
// compare pdserve with what these files mean, not with a mistake of the export.
#include "tests/support/hf_export.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "common/test_paths.h"
#include "kernels/cpu/fp16.h"
#include "model/llama_model.h"
#include "model/safetensors.h"

namespace pdserve {
namespace {

std::shared_ptr<const GgufFile> default_model() {
  auto f = GgufFile::open(pdserve::testing::default_model_path());
  EXPECT_TRUE(f.ok()) << f.status().to_string() << " — run scripts/fetch_model.sh";
  return f.ok() ? std::shared_ptr<const GgufFile>(std::move(f).value()) : nullptr;
}

float value_at(const SafetensorsTensor& t, int64_t i) {
  if (t.dtype == SafetensorsDtype::kF32) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return t.dtype == SafetensorsDtype::kBF16 ? cpu::bf16_to_fp32(h) : cpu::fp16_to_fp32(h);
}

TEST(HfExport, F16AndF32CheckpointsHoldTheBf16Values) {
  auto file = default_model();
  ASSERT_NE(file, nullptr);
  auto config = ModelConfig::from_gguf(*file);
  ASSERT_TRUE(config.ok());
  const auto root =
      std::filesystem::temp_directory_path() / ("pdserve_hf_export_" + std::to_string(::getpid()));
  std::unique_ptr<HfCheckpoint> ck[3];
  const char* dtypes[3] = {"BF16", "F16", "F32"};
  for (int d = 0; d < 3; ++d) {
    HfCheckpointOptions o;
    o.dtype = dtypes[d];
    const std::string dir = (root / dtypes[d]).string();
    ASSERT_TRUE(write_hf_checkpoint(*file, *config, dir, o).ok());
    auto opened = HfCheckpoint::open(dir);
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    ck[d] = std::move(opened).value();
  }
  // Every tensor: cuda_model_test expects the F16 checkpoint's logits bit for bit, which holds
  // only if every value is exact in F16 — as this model's are (checked here; a value could fail
  // only below F16's normal range, within its subnormal step).
  int64_t total_inexact = 0;
  for (const SafetensorsTensor* any : ck[0]->tensors()) {
    const std::string& name = any->name;
    SCOPED_TRACE(name);
    const SafetensorsTensor* t[3] = {any, ck[1]->find(name), ck[2]->find(name)};
    ASSERT_TRUE(t[0] && t[1] && t[2]);
    const int64_t n = t[0]->num_elements();
    int64_t f16_inexact = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float want = value_at(*t[0], i);
      ASSERT_EQ(value_at(*t[2], i), want) << "F32, element " << i;
      const float f16 = value_at(*t[1], i);
      if (f16 != want) {
        ++f16_inexact;
        // Only below F16's normal range, and within its subnormal step.
        ASSERT_LT(std::abs(want), 6.2e-5f) << "F16, element " << i;
        ASSERT_LE(std::abs(f16 - want), 3e-8f) << "F16, element " << i;
      }
    }
    if (t[0]->dtype != SafetensorsDtype::kF32) {
      EXPECT_EQ(t[1]->dtype, SafetensorsDtype::kF16);
    }
    total_inexact += f16_inexact;
  }
  EXPECT_EQ(total_inexact, 0);
  std::filesystem::remove_all(root);
}

// Logits of the last prompt token.
std::vector<float> last_logits(LlamaModel& m, const std::vector<int32_t>& prompt, ThreadPool& pool) {
  constexpr int32_t kBlock = 16;
  const int32_t blocks = static_cast<int32_t>((prompt.size() + kBlock - 1) / kBlock);
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  std::iota(table.begin(), table.end(), 0);
  KvStorage kv(m.config(), blocks, kBlock);
  ForwardBatch b;
  b.tokens = prompt;
  b.chunks.push_back({0, static_cast<int32_t>(prompt.size()), table, true});
  std::vector<float> logits(static_cast<size_t>(m.config().vocab_size));
  EXPECT_TRUE(m.forward(b, kv, pool, logits.data()).ok());
  return logits;
}

double centered_max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double mean = 0;
  for (size_t i = 0; i < a.size(); ++i) mean += double{a[i]} - b[i];
  mean /= static_cast<double>(a.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(double{a[i]} - b[i] - mean));
  return worst;
}

TEST(HfExport, TheQwen2TwinIsTheLlamaModelWhenItsBiasesAreZero) {
  auto file = default_model();
  ASSERT_NE(file, nullptr);
  auto config = ModelConfig::from_gguf(*file);
  ASSERT_TRUE(config.ok());
  auto bf16 = bf16_gguf(*file);
  ASSERT_TRUE(bf16.ok());
  auto llama = LlamaModel::load(std::shared_ptr<const GgufFile>(std::move(bf16).value()));
  ASSERT_TRUE(llama.ok());
  HfCheckpointOptions zero;
  zero.qwen2 = true;
  zero.bias_scale = 0.0f;
  HfCheckpointOptions biased = zero;
  biased.bias_scale = HfCheckpointOptions{}.bias_scale;  // what the GPU test uses
  auto twin0 = qwen2_gguf(*file, *config, zero);
  auto twin1 = qwen2_gguf(*file, *config, biased);
  ASSERT_TRUE(twin0.ok() && twin1.ok());
  auto q0 = LlamaModel::load(std::shared_ptr<const GgufFile>(std::move(twin0).value()));
  auto q1 = LlamaModel::load(std::shared_ptr<const GgufFile>(std::move(twin1).value()));
  ASSERT_TRUE(q0.ok()) << q0.status().to_string();
  ASSERT_TRUE(q1.ok()) << q1.status().to_string();
  EXPECT_EQ((*q0)->config().architecture, "qwen2");
  EXPECT_EQ((*q0)->config().rope_ordering, RopeOrdering::kNeox);
  EXPECT_TRUE((*q0)->config().has_qkv_bias);
  ThreadPool pool(0);
  std::ifstream in(pdserve::testing::source_dir() + "/tests/golden/data/model_smollm2.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json fx = nlohmann::json::parse(in);
  for (int i : {3, 14}) {
    const auto prompt = fx["cases"][i]["tokens"].get<std::vector<int32_t>>();
    const std::vector<float> want = last_logits(**llama, prompt, pool);
    const double same = centered_max_diff(last_logits(**q0, prompt, pool), want);
    const double moved = centered_max_diff(last_logits(**q1, prompt, pool), want);
    std::printf("qwen2 twin vs llama, %zu tokens: zero biases %.5f, biases within %.1f %.3f\n", prompt.size(),
                same, static_cast<double>(biased.bias_scale), moved);
    // The same model with the head dimensions in another order (rounding only); wrong q/k rows or a
    // wrong rotation move logits by whole units.
    EXPECT_LE(same, 0.02);
    EXPECT_GE(moved, 1.0);  // the biases are computed
  }
}

}  // namespace
}  // namespace pdserve

// Experiment: how many greedy continuations of the default model (dequantized to bf16) change on
// the CPU engine when a GPU's bf16 roundings are emulated: of K/V ("kv"), of the activations that
// enter matrix products ("act"), of queries ("q"), or all three. The emulation is
// bf16_rounding.patch (PD_EMU read by the patched forward pass); run bf16_rounding.sh.
// Usage: bf16_rounding MODEL.gguf tests/golden/data/model_smollm2.json
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "common/thread_pool.h"
#include "model/gguf.h"
#include "model/kv_storage.h"
#include "model/llama_model.h"
#include "tests/support/hf_export.h"

using namespace pdserve;
constexpr int32_t kBlock = 16;
constexpr size_t kGen = 64;

std::vector<int32_t> greedy(LlamaModel& m, ThreadPool& pool, std::vector<int32_t> seq,
                            std::vector<double>* gaps) {
  const int32_t vocab = m.config().vocab_size;
  const int32_t blocks = static_cast<int32_t>((seq.size() + kGen + kBlock) / kBlock);
  std::vector<int32_t> table(blocks);
  std::iota(table.begin(), table.end(), 1);
  KvStorage kv(m.config(), blocks + 1, kBlock);
  std::vector<float> logits(vocab);
  std::vector<int32_t> out;
  int32_t cached = 0;
  while (out.size() < kGen) {
    ForwardBatch b;
    b.tokens = std::span<const int32_t>(seq).subspan(cached);
    b.chunks.push_back({cached, static_cast<int32_t>(seq.size()) - cached, table, true});
    Status st = m.forward(b, kv, pool, logits.data());
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.to_string().c_str());
      std::exit(1);
    }
    cached = seq.size();
    std::vector<float> s = logits;
    std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<>());
    gaps->push_back(s[0] - s[1]);
    int32_t tok = std::max_element(logits.begin(), logits.end()) - logits.begin();
    out.push_back(tok);
    seq.push_back(tok);
  }
  return out;
}

int main(int argc, char** argv) {
  auto file = GgufFile::open(argv[1]);
  auto bf16 = bf16_gguf(**file);
  auto m = LlamaModel::load(std::shared_ptr<const GgufFile>(std::move(bf16).value()));
  if (!m.ok()) {
    std::fprintf(stderr, "%s\n", m.status().to_string().c_str());
    return 1;
  }
  ThreadPool pool(0);
  std::ifstream in(argv[2]);
  auto fx = nlohmann::json::parse(in);
  const char* modes[] = {"", "kv", "act", "q", "kv,act,q"};
  std::vector<std::vector<std::vector<int32_t>>> res(5);
  std::vector<std::vector<std::vector<double>>> gaps(5);
  for (int mi = 0; mi < 5; ++mi) {
    setenv("PD_EMU", modes[mi], 1);
    int cases = 0;
    for (const auto& c : fx["cases"]) {
      if (cases++ == 20) break;
      std::vector<double> g;
      res[mi].push_back(greedy(**m, pool, c["tokens"].get<std::vector<int32_t>>(), &g));
      gaps[mi].push_back(g);
    }
  }
  for (int mi = 1; mi < 5; ++mi) {
    int equal = 0;
    std::printf("mode %-10s:", modes[mi]);
    for (size_t c = 0; c < res[0].size(); ++c) {
      size_t i = 0;
      while (i < kGen && res[0][c][i] == res[mi][c][i]) ++i;
      if (i == kGen)
        ++equal;
      else
        std::printf(" c%zu@%zu(gap %.4f)", c + 1, i, gaps[0][c][i]);
    }
    std::printf("  => %d/20 equal to plain\n", equal);
  }
}

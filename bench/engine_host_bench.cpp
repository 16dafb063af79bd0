// pdserve_engine_host_bench: the engine's own host work per decode step — scheduling, choosing
// tokens, detokenizing and handing outputs to the request sinks — with a backend that costs
// nothing: it answers every step at once with token ids, as a GPU does through
// forward_draw, or with a row of logits for the host sampler. What the engine thread spends
// here bounds the step rate of a fast GPU at that batch size.
//
//   pdserve_engine_host_bench [--model GGUF] [--batch 16,64,192] [--steps N] [--reps N] [--logits]
//                             [--logprobs-rows N]
//
// Prints one JSON object per batch size: median microseconds of host work per step and per
// sequence (each of --reps rounds runs --batch sequences for --steps decode steps).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/gguf.h"
#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

namespace pdserve {
namespace {

using Clock = std::chrono::steady_clock;

// A backend with no cost: each row's token is a fixed ordinary word piece, so detokenization does
// real work. With logits, a row of zeros but for that token.
class NullExecutor final : public ModelExecutor {
 public:
  NullExecutor(ModelConfig config, int32_t token, bool greedy_on_device)
      : config_(std::move(config)), token_(token), on_device_(greedy_on_device) {}
  const ModelConfig& config() const override { return config_; }
  uint64_t fingerprint() const override { return 1; }
  Status forward(const ForwardBatch& batch, float* logits) override {
    size_t row = 0;
    for (const SequenceChunk& c : batch.chunks) {
      if (c.want_logits) fill_row(logits + row++ * static_cast<size_t>(config_.vocab_size));
    }
    return ok_status();
  }
  Status forward_draw(const ForwardBatch&, std::span<const RowDraw> draws, int32_t* next_tokens,
                      const HostLogitRows& host) override {
    for (size_t row = 0; row < draws.size(); ++row) next_tokens[row] = token_;
    for (size_t j = 0; j < host.rows.size(); ++j)
      fill_row(host.logits + j * static_cast<size_t>(config_.vocab_size));
    return ok_status();
  }
  bool draws_on_device() const override { return on_device_; }
  KvStorage* host_kv() override { return nullptr; }
  size_t kv_bytes() const override { return 0; }
  std::string device() const override { return "null backend"; }

 private:
  // A row of zeros but for the token.
  void fill_row(float* r) const {
    std::fill(r, r + config_.vocab_size, 0.0f);
    r[token_] = 10.0f;
  }

  ModelConfig config_;
  int32_t token_;
  bool on_device_;
};

int run(int argc, char** argv) {
  CLI::App app{"Host work of the engine per decode step, with a backend that costs nothing"};
  std::string model = PDSERVE_DEFAULT_MODEL;
  std::vector<int> batches = {16, 64, 192};
  int steps = 64;
  int reps = 5;
  bool logits = false;
  int logprobs_rows = 0;
  app.add_option("--model", model, "GGUF file for the tokenizer and shapes")->capture_default_str();
  app.add_option("--batch", batches, "Batch sizes")->delimiter(',')->capture_default_str();
  app.add_option("--steps", steps, "Decode steps per round")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--reps", reps, "Rounds (the median is reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_flag("--logits", logits,
               "Copy a row of logits per sequence and sample on the host (as the CPU engine)");
  app.add_option("--logprobs-rows", logprobs_rows,
                 "Sequences of each batch that ask for log-probabilities (their logits come to the host)")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto file = GgufFile::open(model);
  if (!file.ok()) {
    fmt::print(stderr, "error: {}\n", file.status().message());
    return 1;
  }
  auto config = ModelConfig::from_gguf(**file);
  auto tok = Tokenizer::from_gguf(**file);
  if (!config.ok() || !tok.ok()) {
    fmt::print(stderr, "error: cannot read the model's config or tokenizer\n");
    return 1;
  }
  const std::vector<int32_t> word = tok->encode(" the", false, false);
  const int32_t token = word.empty() ? 1 : word.front();
  const std::vector<int32_t> prompt = tok->encode("Once upon a time, in a small village,", true, false);

  for (int batch : batches) {
    std::vector<double> per_step_us;
    for (int r = 0; r < reps; ++r) {
      EngineOptions o;
      o.block_size = 16;
      o.num_blocks = batch * ((static_cast<int32_t>(prompt.size()) + steps + 2) / 16 + 2);
      o.max_running = batch;
      o.step_token_budget = std::max<int32_t>(batch * static_cast<int32_t>(prompt.size()), 512);
      Engine engine(std::make_unique<NullExecutor>(*config, token, !logits), *tok, o);
      std::mutex mu;
      std::condition_variable cv;
      int done = 0;
      const auto t0 = Clock::now();
      for (int i = 0; i < batch; ++i) {
        EngineRequest req;
        req.prompt = prompt;
        req.max_tokens = steps;
        req.ignore_eos = true;
        req.logprobs = i < logprobs_rows;
        auto h = engine.submit(std::move(req), [&](EngineOutput&& out) {
          if (out.finish_reason.empty()) return;
          std::lock_guard lock(mu);
          ++done;
          cv.notify_one();
        });
        if (!h.ok()) {
          fmt::print(stderr, "error: {}\n", h.status().message());
          return 1;
        }
      }
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return done == batch; });
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
      // `steps` engine steps: the prefill step (which samples the first token) and steps - 1 decodes.
      per_step_us.push_back(us / steps);
    }
    std::sort(per_step_us.begin(), per_step_us.end());
    const double med = per_step_us[per_step_us.size() / 2];
    fmt::print(
        "{{\"batch\": {}, \"steps\": {}, \"sampling\": \"{}\", \"logprobs_rows\": {}, "
        "\"host_us_per_step\": {:.1f}, \"host_us_per_sequence\": {:.2f}}}\n",
        batch, steps, logits ? "host, from logits" : "token ids from the backend",
        std::min(logprobs_rows, batch), med, med / batch);
  }
  return 0;
}

}  // namespace
}  // namespace pdserve

int main(int argc, char** argv) { return pdserve::run(argc, argv); }

// For tests: the default model, its tokenizer and a 2-thread pool, loaded once per test binary
// and kept for its lifetime; and a collector of one request's outputs.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/test_paths.h"
#include "common/thread_pool.h"
#include "engine/engine.h"
#include "model/llama_model.h"
#include "tokenizer/tokenizer.h"

namespace pdserve::testing {

struct TestModel {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<ThreadPool> pool;
};

// nullptr (with a test failure recorded) when the model cannot be loaded.
inline const TestModel* default_test_model() {
  static const TestModel* loaded = []() -> const TestModel* {
    auto file = GgufFile::open(pdserve::testing::default_model_path());
    if (!file.ok()) {
      ADD_FAILURE() << file.status().to_string() << " — run scripts/fetch_model.sh";
      return nullptr;
    }
    std::shared_ptr<const GgufFile> shared(std::move(file).value());
    auto tok = Tokenizer::from_gguf(*shared);
    auto model = LlamaModel::load(shared);
    if (!tok.ok() || !model.ok()) {
      ADD_FAILURE() << (tok.ok() ? model.status().to_string() : tok.status().to_string());
      return nullptr;
    }
    auto* m = new TestModel{std::move(model).value(), std::make_unique<Tokenizer>(std::move(tok).value()),
                            std::make_unique<ThreadPool>(2)};
    return m;
  }();
  return loaded;
}

// Everything one request streamed.
struct Result {
  std::string text;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;  // of the tokens (0 where the request did not ask for them)
  std::string finish_reason;
  Status error;
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_prompt_tokens = 0;
  int outputs = 0;
};

// Collects one request's outputs (from any thread); wait() returns them after the final one.
class Collector {
 public:
  OutputSink sink() {
    return [this](EngineOutput&& o) {
      std::lock_guard<std::mutex> lock(mu_);
      r_.text += o.text;
      for (const auto& t : o.tokens) {
        r_.tokens.push_back(t.id);
        r_.logprobs.push_back(t.logprob);  // 0 where not asked
      }
      ++r_.outputs;
      if (o.finished) {
        r_.finish_reason = o.finish_reason;
        r_.error = o.error;
        r_.prompt_tokens = o.prompt_tokens;
        r_.completion_tokens = o.completion_tokens;
        r_.cached_prompt_tokens = o.cached_prompt_tokens;
        done_.set_value();
      }
    };
  }
  Result wait() {
    done_future_.wait();
    std::lock_guard<std::mutex> lock(mu_);
    return r_;
  }
  // Whether the final output came within `timeout` (wait() then returns at once).
  bool finished_within(std::chrono::milliseconds timeout) {
    return done_future_.wait_for(timeout) == std::future_status::ready;
  }

 private:
  std::mutex mu_;
  Result r_;
  std::promise<void> done_;
  std::shared_future<void> done_future_ = done_.get_future().share();
};

}  // namespace pdserve::testing

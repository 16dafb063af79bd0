// For tests: the default model, its tokenizer and a 2-thread pool, loaded once per test binary
// and kept for its lifetime.
#pragma once

#include <gtest/gtest.h>

#include <memory>

#include "common/thread_pool.h"
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
    auto file = GgufFile::open(PDSERVE_DEFAULT_MODEL);
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

}  // namespace pdserve::testing

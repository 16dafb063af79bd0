#include "engine/generator.h"

#include <gtest/gtest.h>

#include "engine/test_model.h"

namespace pdserve {
namespace {

class GeneratorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const testing::TestModel* m = testing::default_test_model();
    ASSERT_NE(m, nullptr);
    model_ = m->model.get();
    tokenizer_ = m->tokenizer.get();
    pool_ = m->pool.get();
  }

  std::pair<std::string, GenerateStats> run(const GenerateRequest& req, int32_t chunk = 512) {
    Generator g(*model_, *tokenizer_, *pool_, 512, chunk);
    std::string out;
    auto stats = g.generate(req, [&](std::string_view piece) {
      out += piece;
      return true;
    });
    EXPECT_TRUE(stats.ok()) << stats.status().to_string();
    return {out, stats.ok() ? *stats : GenerateStats{}};
  }

  static LlamaModel* model_;
  static Tokenizer* tokenizer_;
  static ThreadPool* pool_;
};
LlamaModel* GeneratorTest::model_ = nullptr;
Tokenizer* GeneratorTest::tokenizer_ = nullptr;
ThreadPool* GeneratorTest::pool_ = nullptr;

TEST_F(GeneratorTest, GreedyIsDeterministicAndChunkInvariant) {
  GenerateRequest req;
  req.prompt = tokenizer_->encode("The capital of France is", true, false);
  req.max_tokens = 12;
  auto [a, sa] = run(req);
  auto [b, sb] = run(req, 3);
  EXPECT_EQ(a, b);
  EXPECT_EQ(sa.generated_tokens, 12);
  EXPECT_EQ(sa.finish_reason, "length");
  EXPECT_NE(a.find("Paris"), std::string::npos) << a;
}

TEST_F(GeneratorTest, JsonModeAnswersOneObject) {
  GenerateRequest req;
  req.prompt = tokenizer_->encode("A cat described as a JSON object:", true, false);
  req.max_tokens = 200;
  req.response_format = ResponseFormat::kJsonObject;
  auto [text, stats] = run(req);
  JsonPrefix p;
  EXPECT_TRUE(p.advance(std::string_view(text))) << text;
  EXPECT_TRUE(p.complete()) << text;
  EXPECT_EQ(stats.finish_reason, "stop") << text;
  req.ignore_eos = true;
  Generator g(*model_, *tokenizer_, *pool_, 512);
  auto refused = g.generate(req, [](std::string_view) { return true; });
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("ignore_eos cannot be combined with JSON mode"),
            std::string::npos);
}

TEST_F(GeneratorTest, StopStringEndsGenerationBeforeIt) {
  GenerateRequest req;
  req.prompt = tokenizer_->encode("The capital of France is", true, false);
  req.max_tokens = 12;
  auto [full, s0] = run(req);
  size_t at = full.find("Paris");
  ASSERT_NE(at, std::string::npos);
  req.stop = {"Paris"};
  auto [cut, s1] = run(req);
  EXPECT_EQ(cut, full.substr(0, at));
  EXPECT_EQ(s1.finish_reason, "stop");
}

TEST_F(GeneratorTest, SeededSamplingReproduces) {
  GenerateRequest req;
  req.prompt = tokenizer_->encode("Once upon a time", true, false);
  req.max_tokens = 16;
  req.sampling.temperature = 0.9f;
  req.sampling.top_p = 0.95f;
  req.sampling.seed = 1234;
  EXPECT_EQ(run(req).first, run(req).first);
}

TEST_F(GeneratorTest, RejectsPromptsBeyondTheContext) {
  Generator g(*model_, *tokenizer_, *pool_, 32);
  GenerateRequest req;
  req.prompt.assign(30, 100);
  req.max_tokens = 8;
  auto s = g.generate(req, [](std::string_view) { return true; });
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("exceeds the context of 32"), std::string::npos);
}

}  // namespace
}  // namespace pdserve

#include "gateway/scenario_router.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "engine/test_model.h"

namespace pdserve {
namespace {

// A prefill that answers every request at once, on a thread of its own, with one token and the
// text of its tag, finishing "stop" (no handoff): enough to see which group a request reached.
class TaggedPrefill : public Instance {
 public:
  explicit TaggedPrefill(std::string tag) : tag_(std::move(tag)), thread_([this] { loop(); }) {}
  ~TaggedPrefill() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  EngineRole role() const override { return EngineRole::kPrefill; }
  int32_t max_context() const override { return 1000; }
  int64_t max_sequence_tokens() const override { return 1000; }
  Status validate(const EngineRequest& r) const override { return check_request_limits(r, 1000); }
  StatusOr<std::shared_ptr<RequestHandle>> submit(EngineRequest, OutputSink sink,
                                                  std::shared_ptr<RequestHandle> handle) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.push_back(std::move(sink));
    }
    cv_.notify_all();
    return handle ? handle : std::make_shared<RequestHandle>();
  }
  using GenerationBackend::submit;
  StatusOr<std::shared_ptr<RequestHandle>> submit_handoff(EngineRequest, const EngineHandoff&, OutputSink,
                                                          PulledCallback,
                                                          std::shared_ptr<RequestHandle>) override {
    return unimplemented("a prefill");
  }
  Status release_handoff(const KvBufferRef&) override { return ok_status(); }
  EngineMetrics metrics() const override { return {}; }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || !pending_.empty(); });
      if (pending_.empty()) return;
      OutputSink sink = std::move(pending_.front());
      pending_.pop_front();
      lock.unlock();
      EngineOutput out;
      out.text = tag_;
      out.tokens.push_back({.id = 1});
      out.finished = true;
      out.finish_reason = "stop";
      out.completion_tokens = 1;
      sink(std::move(out));
      lock.lock();
    }
  }

  std::string tag_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<OutputSink> pending_;
  bool stop_ = false;
  std::thread thread_;
};

// A decode the tests never reach (their prefills finish every request themselves).
class IdleDecode : public TaggedPrefill {
 public:
  IdleDecode() : TaggedPrefill("decode") {}
  EngineRole role() const override { return EngineRole::kDecode; }
};

class ScenarioRouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<ScenarioGroup> groups;
    const std::vector<ScenarioConfig> configs = {
        {.name = "chat", .models = {"chat-model"}, .system_prompt_prefixes = {"You are a"}},
        {.name = "code",
         .models = {"code-model"},
         .system_prompt_prefixes = {"You are a coding", "#!"},
         .ttft_budget_ms = 5000},
        {.name = "batch"},
    };
    for (const ScenarioConfig& c : configs) {
      prefills_.push_back(std::make_unique<TaggedPrefill>(c.name));
      decodes_.push_back(std::make_unique<IdleDecode>());
      RouterOptions ro;
      ro.scenario = c.name;
      ro.ttft_budget_ms = c.ttft_budget_ms;
      groups.push_back(
          {.config = c,
           .router = std::make_unique<Router>(std::vector<Instance*>{prefills_.back().get()},
                                              std::vector<Instance*>{decodes_.back().get()}, ro)});
    }
    router_ = std::make_unique<ScenarioRouter>(std::move(groups), "batch");
  }
  void TearDown() override { router_->stop(); }

  std::string label(api::ScenarioHints h) {
    StatusOr<std::string> s = router_->label(h);
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    return s.ok() ? *s : "";
  }

  // Which group's prefill answered a request labelled `scenario`.
  std::string served_by(const std::string& scenario) {
    EngineRequest r;
    r.prompt = {1, 2, 3};
    r.max_tokens = 4;
    r.scenario = scenario;
    testing::Collector c;
    auto h = router_->submit(std::move(r), c.sink());
    EXPECT_TRUE(h.ok()) << h.status().to_string();
    if (!h.ok()) return "";
    return c.wait().text;
  }

  std::vector<std::unique_ptr<TaggedPrefill>> prefills_;
  std::vector<std::unique_ptr<TaggedPrefill>> decodes_;
  std::unique_ptr<ScenarioRouter> router_;
};

TEST_F(ScenarioRouterTest, LabelsByHeaderThenMetadataThenModelThenSystemPromptThenDefault) {
  EXPECT_EQ(label({.header = "code", .metadata = "chat", .model = "chat-model"}), "code");
  EXPECT_EQ(label({.metadata = "chat", .model = "code-model"}), "chat");
  EXPECT_EQ(label({.model = "code-model", .system_prompt = "You are a helpful assistant"}), "code");
  EXPECT_EQ(label({.model = "base", .system_prompt = "You are a helpful assistant"}), "chat");
  // The longest matching prefix wins: "You are a coding" (code) over "You are a" (chat).
  EXPECT_EQ(label({.system_prompt = "You are a coding assistant."}), "code");
  EXPECT_EQ(label({.system_prompt = "#!/bin/sh\necho"}), "code");
  EXPECT_EQ(label({.system_prompt = "Summarize:"}), "batch");
  EXPECT_EQ(label({}), "batch");
}

TEST_F(ScenarioRouterTest, AnUnknownScenarioInTheHeaderIsAClientErrorNamingTheKnownOnes) {
  StatusOr<std::string> s = router_->label({.header = "nope", .metadata = "chat"});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("'nope'"), std::string::npos) << s.status().message();
  EXPECT_NE(s.status().message().find("chat, code, batch"), std::string::npos) << s.status().message();
  // metadata is the client's own field too: a value naming no scenario is ignored.
  EXPECT_EQ(label({.metadata = "nope", .model = "code-model"}), "code");
  EXPECT_EQ(label({.metadata = "nope"}), "batch");
  EngineRequest r;
  r.prompt = {1};
  r.scenario = "nope";
  EXPECT_EQ(router_->validate(r).code(), StatusCode::kInvalidArgument);
  testing::Collector c;
  EXPECT_EQ(router_->submit(r, c.sink()).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(ScenarioRouterTest, EachScenarioGoesToItsOwnGroupAndIsCounted) {
  EXPECT_EQ(served_by("chat"), "chat");
  EXPECT_EQ(served_by("code"), "code");
  EXPECT_EQ(served_by("code"), "code");
  EXPECT_EQ(served_by(""), "batch");  // unlabelled: the default scenario
  EngineMetrics m = router_->metrics();
  ASSERT_EQ(m.scenarios.size(), 3u);
  std::map<std::string, int64_t> requests;
  for (const auto& s : m.scenarios) requests[s.name] = s.requests_total;
  EXPECT_EQ(requests["chat"], 1);
  EXPECT_EQ(requests["code"], 2);
  EXPECT_EQ(requests["batch"], 1);
  EXPECT_EQ(m.finished_by_reason.size(), 0u);  // the fakes report no engine figures
  std::vector<std::string> models = router_->model_names();
  EXPECT_EQ(models, (std::vector<std::string>{"chat-model", "code-model"}));
}

}  // namespace
}  // namespace pdserve

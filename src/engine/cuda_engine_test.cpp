// The engine on a GPU in the prefill and decode roles, as `pdserve instance --device cuda` runs
// it: a layer-wise prefill, whose KV leaves through a page-locked host send pool (shm, tcp) while
// its forward pass runs, continued by a decode engine, gives the greedy tokens of one mixed GPU
// engine; so does the same prefill sending its KV whole; and four requests at once, their KV
// leaving layer by layer interleaved, land intact. Skips, saying why, where no GPU is.
#include <gtest/gtest.h>

#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/test_paths.h"
#include "engine/engine.h"
#include "kernels/cuda/runtime.h"
#include "model/cuda_model.h"
#include "model/gguf.h"
#include "tokenizer/tokenizer.h"
#include "transfer/cuda_transports.h"

namespace pdserve {
namespace {

constexpr int32_t kBlocks = 256;
constexpr int32_t kMaxTokens = 24;
const char* const kPrompts[] = {
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "1, 1, 2, 3, 5, 8,",
};

class CudaEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (cuda::device_count() == 0) return;
    auto file = GgufFile::open(pdserve::testing::default_model_path());
    ASSERT_TRUE(file.ok()) << file.status().to_string() << " — run scripts/fetch_model.sh";
    file_ = std::shared_ptr<const GgufFile>(std::move(file).value());
    auto tok = Tokenizer::from_gguf(*file_);
    ASSERT_TRUE(tok.ok()) << tok.status().to_string();
    tokenizer_ = new Tokenizer(std::move(tok).value());
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
    file_.reset();
  }
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device here (" << cuda::no_device_reason() << ")";
    ASSERT_NE(tokenizer_, nullptr);
  }

  static std::unique_ptr<ModelExecutor> gpu_model(int device) {
    auto m = CudaLlamaModel::load_gguf(*file_, CudaModelOptions{device, kBlocks, kDefaultBlockSize});
    EXPECT_TRUE(m.ok()) << m.status().to_string();
    return m.ok() ? std::unique_ptr<ModelExecutor>(std::move(m).value()) : nullptr;
  }
  static EngineOptions options(EngineRole role) {
    EngineOptions o;
    o.num_blocks = kBlocks;
    o.role = role;
    o.prefix_caching = false;  // every request computes its whole prompt, as in the mixed engine
    return o;
  }
  static EngineRequest request(const std::string& prompt) {
    EngineRequest r;
    r.prompt = tokenizer_->encode(prompt, true, false);
    r.max_tokens = kMaxTokens;
    r.ignore_eos = true;
    return r;
  }

  // A prefill engine on GPU 0 sending its KV through a page-locked host pool of `kind`, and a decode
  // engine (on GPU 1 where there is one) pulling it.
  struct Pair {
    KvTransport sender, receiver;
    std::unique_ptr<Engine> prefill, decode;
  };
  static Pair pair(TransportKind kind, bool layer_wise) {
    Pair p;
    KvTransportOptions so;
    so.receive = false;
    so.cuda_device = 0;
    so.pool_capacity_bytes = 64 << 20;
    auto sender = make_cuda_staged_transport(kind, so);
    EXPECT_TRUE(sender.ok()) << sender.status().to_string();
    if (!sender.ok()) return p;
    EXPECT_TRUE(sender->pool->supports_layer_wise());
    const int decode_device = cuda::device_count() > 1 ? 1 : 0;
    KvTransportOptions ro;
    ro.send = false;
    ro.cuda_device = decode_device;
    auto receiver = make_cuda_staged_transport(kind, ro);
    EXPECT_TRUE(receiver.ok()) << receiver.status().to_string();
    if (!receiver.ok()) return p;
    p.sender = std::move(*sender);
    p.receiver = std::move(*receiver);
    EngineOptions po = options(EngineRole::kPrefill);
    po.kv_send = p.sender.pool.get();
    po.layer_wise_kv = layer_wise;
    p.prefill = std::make_unique<Engine>(gpu_model(0), *tokenizer_, po);
    EngineOptions dopt = options(EngineRole::kDecode);
    dopt.kv_puller = p.receiver.puller.get();
    p.decode = std::make_unique<Engine>(gpu_model(decode_device), *tokenizer_, dopt);
    return p;
  }

  static inline std::shared_ptr<const GgufFile> file_;
  static inline Tokenizer* tokenizer_ = nullptr;
};

// One request's tokens as a client would see them, and how it ended.
struct Stream {
  std::mutex mu;
  std::vector<int32_t> tokens;
  std::promise<std::string> done;  // the finish reason (the error's message after it)
  void add(const EngineOutput& o) {
    std::lock_guard lock(mu);
    for (const GeneratedToken& t : o.tokens) tokens.push_back(t.id);
  }
};

std::vector<int32_t> run_mixed(Engine& e, const EngineRequest& r) {
  Stream s;
  auto h = e.submit(r, [&](EngineOutput&& o) {
    s.add(o);
    if (o.finished) s.done.set_value(o.finish_reason + " " + o.error.message());
  });
  EXPECT_TRUE(h.ok()) << h.status().to_string();
  EXPECT_EQ(s.done.get_future().get(), "length ");
  return s.tokens;
}

// Through a prefill and a decode engine, as a gateway does: the decode takes the handoff (an
// early one, while the prefill's pass runs, when the KV leaves layer by layer), the prefill's
// buffer is released once the decode has the KV. Returns the client's tokens; *layer_wise says
// whether the handoff came early.
std::vector<int32_t> run_disaggregated(Engine& prefill, Engine& decode, const EngineRequest& r,
                                       bool* layer_wise) {
  Stream s;
  std::promise<void> pulled, prefill_done;
  std::mutex mu;
  bool handed = false;
  auto hand_to_decode = [&](const EngineHandoff& h) {
    auto sink = [&](EngineOutput&& o) {
      s.add(o);
      if (o.finished) s.done.set_value(o.finish_reason + " " + o.error.message());
    };
    auto on_pulled = [&, kv = h.kv.ref()](const Status& st) {
      EXPECT_TRUE(st.ok()) << st.to_string();
      EXPECT_TRUE(prefill.release_handoff(kv).ok());
      pulled.set_value();
    };
    auto accepted = decode.submit_handoff(r, h, sink, on_pulled, std::make_shared<RequestHandle>());
    EXPECT_TRUE(accepted.ok()) << accepted.status().to_string();
  };
  auto on_prefill_output = [&](const EngineOutput& o) {
    s.add(o);
    if (!o.handoff) {
      if (o.finished) s.done.set_value(o.finish_reason + " (prefill) " + o.error.message());
      return;
    }
    std::lock_guard lock(mu);
    if (!handed) {  // the early handoff, or the only one
      handed = true;
      *layer_wise = !o.finished;
      EXPECT_EQ(o.handoff->first_token < 0, !o.finished);
      hand_to_decode(*o.handoff);
    }
  };
  auto h = prefill.submit(r, [&](EngineOutput&& o) {
    on_prefill_output(o);
    if (o.finished) prefill_done.set_value();  // the last call: nothing here is used after it
  });
  EXPECT_TRUE(h.ok()) << h.status().to_string();
  EXPECT_EQ(s.done.get_future().get(), "length ");
  pulled.get_future().wait();
  prefill_done.get_future().wait();
  return s.tokens;
}

TEST_F(CudaEngineTest, LayerWiseHandoffThroughPageLockedHostPoolsEqualsTheMixedEngine) {
  std::vector<std::vector<int32_t>> want;
  {
    Engine mixed(gpu_model(0), *tokenizer_, options(EngineRole::kMixed));
    for (const char* p : kPrompts) want.push_back(run_mixed(mixed, request(p)));
  }
  for (TransportKind kind : {TransportKind::kShm, TransportKind::kTcp}) {
    for (bool layer_wise : {true, false}) {
      SCOPED_TRACE(std::string(transport_kind_name(kind)) + (layer_wise ? ", layer-wise" : ", whole"));
      Pair p = pair(kind, layer_wise);
      ASSERT_TRUE(p.prefill && p.decode);
      for (size_t i = 0; i < std::size(kPrompts); ++i) {
        SCOPED_TRACE(kPrompts[i]);
        bool early = false;
        EXPECT_EQ(run_disaggregated(*p.prefill, *p.decode, request(kPrompts[i]), &early), want[i]);
        EXPECT_EQ(early, layer_wise);
      }
      EXPECT_EQ(p.prefill->metrics().layer_wise_handoffs_total, layer_wise ? std::ssize(kPrompts) : 0);
      EXPECT_EQ(p.decode->metrics().kv_pulls_failed_total, 0);
    }
  }
}

// The four requests at once: the prefill runs them in one batch, whose layers leave interleaved
// (one send each per layer, on one copy stream), the decode pulls them on its four lanes and runs
// them in one batch. The GPU is not batch-invariant, so the tokens may part from the mixed
// engine's (one request at a time) where the last bits tip a near tie; a KV landed wrong or in the
// wrong sequence's blocks would change the continuation from its first decoded token on. So: each
// continuation equal to the mixed engine's over its first kAgreeAtLeast tokens, and at least three
// of the four over all of them.
TEST_F(CudaEngineTest, ConcurrentLayerWiseHandoffsLandIntact) {
  constexpr size_t kAgreeAtLeast = 8;
  std::vector<std::vector<int32_t>> want;
  {
    Engine mixed(gpu_model(0), *tokenizer_, options(EngineRole::kMixed));
    for (const char* p : kPrompts) want.push_back(run_mixed(mixed, request(p)));
  }
  for (TransportKind kind : {TransportKind::kShm, TransportKind::kTcp}) {
    SCOPED_TRACE(transport_kind_name(kind));
    Pair p = pair(kind, /*layer_wise=*/true);
    ASSERT_TRUE(p.prefill && p.decode);
    std::vector<std::future<std::vector<int32_t>>> runs;
    std::vector<char> early(std::size(kPrompts), 0);
    for (size_t i = 0; i < std::size(kPrompts); ++i) {
      runs.push_back(std::async(std::launch::async, [&, i] {
        bool e = false;
        auto tokens = run_disaggregated(*p.prefill, *p.decode, request(kPrompts[i]), &e);
        early[i] = e ? 1 : 0;
        return tokens;
      }));
    }
    int equal = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      const std::vector<int32_t> got = runs[i].get();
      size_t common = 0;
      while (common < got.size() && common < want[i].size() && got[common] == want[i][common]) ++common;
      std::printf("%s, request %zu: %zu of %zu tokens in common with the mixed engine\n",
                  std::string(transport_kind_name(kind)).c_str(), i, common, want[i].size());
      EXPECT_GE(common, kAgreeAtLeast) << kPrompts[i];
      EXPECT_EQ(got.size(), want[i].size()) << kPrompts[i];
      equal += got == want[i] ? 1 : 0;
      EXPECT_TRUE(early[i]) << kPrompts[i] << ": the handoff came only after the prefill's pass";
    }
    EXPECT_GE(equal, 3);
    EXPECT_EQ(p.prefill->metrics().layer_wise_handoffs_total, std::ssize(kPrompts));
    EXPECT_EQ(p.decode->metrics().kv_pulls_failed_total, 0);
  }
}

}  // namespace
}  // namespace pdserve

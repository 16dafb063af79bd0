// The KV transports of GPU caches on real GPUs: random KV published from one paged cache and
// pulled into another with a fragmented block table, compared in wire order (gather_kv of both
// sides, itself checked against a host reference in cuda_kernels_test) — cuda-ipc within a GPU,
// across GPUs where there are two and across processes (this binary started again as the
// prefill), and shm and tcp staged through host memory. Skips without a GPU.
#include "transfer/cuda_transports.h"

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "transfer/transfer_test_util.h"

namespace pdserve {
namespace {

using ::testing::HasSubstr;

constexpr int32_t kLayers = 3;
constexpr int32_t kKvHeads = 2;
constexpr int32_t kHeadDim = 64;
constexpr int32_t kBlockSize = 16;
constexpr int32_t kBlocks = 24;
constexpr uint64_t kFingerprint = 0x1234;
constexpr const char* kChildEnv = "PDSERVE_CUDA_IPC_TEST_CHILD";

// A paged KV cache of the CUDA backend's layout on one GPU, and its view.
struct DeviceCache {
  cuda::DeviceBuffer memory;
  PagedKvView view;
  cuda::PagedKvCache kernel;

  static DeviceCache make(int device, uint64_t seed) {
    EXPECT_TRUE(cuda::set_device(device).ok());
    DeviceCache c;
    const int64_t row = int64_t{kKvHeads} * kHeadDim;
    const int64_t part = int64_t{kBlocks} * kBlockSize * row;  // one layer's K (or V), values
    auto m = cuda::DeviceBuffer::allocate(static_cast<size_t>(2 * part * kLayers) * 2);
    EXPECT_TRUE(m.ok());
    c.memory = std::move(*m);
    EXPECT_TRUE(
        cuda::fill_uniform_bf16(c.memory.as<uint16_t>(), 2 * part * kLayers, 0.0f, 1.0f, seed, nullptr).ok());
    EXPECT_TRUE(cuda::synchronize().ok());
    c.view.base = c.memory.as<uint8_t>();
    c.view.block_bytes = static_cast<size_t>(kBlockSize * row * 2);
    c.view.num_blocks = kBlocks;
    c.view.block_size = kBlockSize;
    c.view.layout = KvLayout{kFingerprint, KvDtype::kBF16, kLayers, kKvHeads * kHeadDim};
    c.view.memory = KvMemory::kCuda;
    c.view.cuda_device = device;
    c.view.num_kv_heads = kKvHeads;
    c.view.layer_bytes = static_cast<uint64_t>(2 * part * 2);
    c.view.v_offset_bytes = static_cast<uint64_t>(part * 2);
    c.kernel =
        cuda::PagedKvCache{c.memory.as<uint16_t>(), kLayers, 2 * part, part, kBlockSize, kKvHeads, kHeadDim};
    return c;
  }

  // All of the cache's values, on the host.
  std::vector<uint16_t> all() const {
    EXPECT_TRUE(cuda::set_device(view.cuda_device).ok());
    std::vector<uint16_t> out(memory.bytes() / 2);
    EXPECT_TRUE(cuda::copy_to_host(out.data(), memory.data(), memory.bytes()).ok());
    return out;
  }

  // Puts back values read by all().
  void fill(const std::vector<uint16_t>& values) const {
    EXPECT_TRUE(cuda::set_device(view.cuda_device).ok());
    ASSERT_EQ(values.size() * 2, memory.bytes());
    EXPECT_TRUE(cuda::copy_to_device(memory.data(), values.data(), memory.bytes()).ok());
  }

  // Whether value i of all() holds one of the first `tokens` tokens of a sequence with `table`.
  static std::vector<bool> used(const std::vector<int32_t>& table, int32_t tokens) {
    const int64_t part = int64_t{kBlocks} * kBlockSize * kKvHeads * kHeadDim;
    std::vector<bool> mask(static_cast<size_t>(2 * part * kLayers), false);
    for (int64_t kv = 0; kv < 2 * kLayers; ++kv)
      for (int32_t t = 0; t < tokens; ++t)
        for (int32_t h = 0; h < kKvHeads; ++h) {
          const int64_t at =
              kv * part +
              ((int64_t{table[t / kBlockSize]} * kKvHeads + h) * kBlockSize + t % kBlockSize) * kHeadDim;
          std::fill(mask.begin() + at, mask.begin() + at + kHeadDim, true);
        }
    return mask;
  }

  // The first `tokens` tokens named by `table`, in wire order, on the host.
  std::vector<uint16_t> wire(const std::vector<int32_t>& table, int32_t tokens) const {
    EXPECT_TRUE(cuda::set_device(view.cuda_device).ok());
    const auto values = static_cast<size_t>(kernel.bytes(tokens) / 2);
    auto w = cuda::DeviceBuffer::allocate(values * 2);
    auto t = cuda::DeviceBuffer::allocate(table.size() * sizeof(int32_t));
    EXPECT_TRUE(w.ok() && t.ok());
    EXPECT_TRUE(cuda::copy_to_device(t->data(), table.data(), table.size() * sizeof(int32_t)).ok());
    EXPECT_TRUE(cuda::gather_kv(kernel, t->as<int32_t>(), tokens, w->as<uint16_t>(), nullptr).ok());
    std::vector<uint16_t> out(values);
    EXPECT_TRUE(cuda::copy_to_host(out.data(), w->data(), values * 2).ok());
    return out;
  }
};

std::vector<int32_t> shuffled_blocks(uint64_t seed) {
  std::vector<int32_t> t(kBlocks);
  std::iota(t.begin(), t.end(), 0);
  std::shuffle(t.begin(), t.end(), std::mt19937_64(seed));
  return t;
}

KvTransportOptions options(int device) {
  KvTransportOptions o;
  o.cuda_device = device;
  o.pool_capacity_bytes = 8 << 20;
  o.max_buffers = 4;
  return o;
}

class CudaIpc : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device here (" << cuda::no_device_reason() << ")";
  }
};

using MakeTransport = std::function<StatusOr<KvTransport>(const KvTransportOptions&)>;

// Publishes 150 tokens (a partial last block) from GPU `src`, pulls them into GPU `dst` (`pulls`
// times, each into a cleared cache).
void round_trip(int src_device, int dst_device, const MakeTransport& make = make_cuda_ipc_transport,
                int pulls = 1) {
  DeviceCache src = DeviceCache::make(src_device, 1);
  DeviceCache dst = DeviceCache::make(dst_device, 2);
  KvTransportOptions so = options(src_device);
  so.receive = false;
  KvTransportOptions ro = options(dst_device);
  ro.send = false;
  StatusOr<KvTransport> sender = make(so);
  StatusOr<KvTransport> receiver = make(ro);
  ASSERT_TRUE(sender.ok()) << sender.status().message();
  ASSERT_TRUE(receiver.ok()) << receiver.status().message();
  const int32_t tokens = 150;
  const std::vector<int32_t> src_table = shuffled_blocks(3);
  const std::vector<int32_t> dst_table = shuffled_blocks(4);
  ASSERT_TRUE(cuda::set_device(src_device).ok());
  StatusOr<KvHandle> h = publish_kv(*sender->pool, src.view, src_table, tokens);
  ASSERT_TRUE(h.ok()) << h.status().message();
  // The handle travels as text.
  StatusOr<KvHandle> parsed = KvHandle::parse(h->to_string());
  ASSERT_TRUE(parsed.ok()) << parsed.status().message();
  const std::vector<uint16_t> before = dst.all();
  for (int pull = 0; pull < pulls; ++pull) {
    if (pull > 0) dst.fill(before);
    TransferState st = receiver->puller->pull(*parsed, KvScatterTarget{dst.view, dst_table, tokens});
    ASSERT_EQ(st.phase, TransferPhase::kDone) << st.error.message() << " (pull " << pull << ")";
    EXPECT_EQ(st.num_tokens, tokens);
    EXPECT_EQ(dst.wire(dst_table, tokens), src.wire(src_table, tokens)) << "pull " << pull;
  }
  // Nothing else was written: the 14 unused blocks and the last block's rows past token 150.
  const std::vector<uint16_t> after = dst.all();
  const std::vector<bool> mask = DeviceCache::used(dst_table, tokens);
  size_t changed_elsewhere = 0;
  for (size_t i = 0; i < after.size(); ++i) changed_elsewhere += !mask[i] && after[i] != before[i];
  EXPECT_EQ(changed_elsewhere, 0u);
  ASSERT_TRUE(sender->pool->release(h->ref()).ok());
  // A released buffer cannot be pulled again.
  TransferState again = receiver->puller->pull(*parsed, KvScatterTarget{dst.view, dst_table, tokens});
  ASSERT_EQ(again.phase, TransferPhase::kFailed);
}

TEST_F(CudaIpc, RoundTripOnOneGpu) { round_trip(0, 0); }

TEST_F(CudaIpc, RoundTripBetweenGpus) {
  if (cuda::device_count() < 2) GTEST_SKIP() << "one GPU here; this needs two";
  round_trip(0, 1);
}

TEST_F(CudaIpc, StagedThroughHostMemoryOverShmTcpAndUcx) {
  const int dst = cuda::device_count() > 1 ? 1 : 0;
  std::vector<TransportKind> kinds = {TransportKind::kShm, TransportKind::kTcp};
  if (ucx_transport_built()) kinds.push_back(TransportKind::kUcx);
  for (TransportKind kind : kinds) {
    // The send pool page-locked (the default) and pageable; the decode's stage kept between pulls
    // (the default) and freed after each (keep 0 bytes: the second of the two pulls takes a new one).
    const struct {
      bool locked;
      uint64_t keep;
    } variants[] = {{true, KvTransportOptions{}.host_stage_keep_bytes},
                    {false, KvTransportOptions{}.host_stage_keep_bytes},
                    {true, 0}};
    for (const auto& v : variants) {
      SCOPED_TRACE(fmt::format("{}, page-locked {}, stage kept up to {} bytes", transport_kind_name(kind),
                               v.locked, v.keep));
      round_trip(
          0, dst,
          [kind, v](const KvTransportOptions& o) {
            KvTransportOptions with = o;
            with.page_lock_host_stage = v.locked;
            with.host_stage_keep_bytes = v.keep;
            return make_cuda_staged_transport(kind, with);
          },
          2);
    }
  }
}

// Layer by layer from a GPU cache while it is being written: each layer's copy waits for the work
// queued on the cache's writer stream (milliseconds of it before the layer's last write, which a
// copy that did not wait would miss), lands in the page-locked host pool, and the decode's pull
// gets every layer and the first token published after them.
TEST_F(CudaIpc, LayerWiseFromAGpuCacheWhileItsWriterRuns) {
  const int dst_device = cuda::device_count() > 1 ? 1 : 0;
  for (TransportKind kind : {TransportKind::kShm, TransportKind::kTcp}) {
    SCOPED_TRACE(std::string(transport_kind_name(kind)));
    DeviceCache src = DeviceCache::make(0, 21);
    KvTransportOptions so = options(0);
    so.receive = false;
    KvTransportOptions ro = options(dst_device);
    ro.send = false;
    StatusOr<KvTransport> sender = make_cuda_staged_transport(kind, so);
    StatusOr<KvTransport> receiver = make_cuda_staged_transport(kind, ro);
    ASSERT_TRUE(sender.ok()) << sender.status().message();
    ASSERT_TRUE(receiver.ok()) << receiver.status().message();
    ASSERT_TRUE(sender->pool->supports_layer_wise());
    // Two sequences of one pass, their layers sent in turn (sharing the pool's scratch and table),
    // each pulled at once, before any layer is there, into a cache of its own.
    struct Seq {
      int32_t tokens;
      std::vector<int32_t> src_table, dst_table;
      DeviceCache dst;
      StatusOr<LayerWiseSend> send = unavailable("not begun");
      StatusOr<TransferId> pull = unavailable("not submitted");
    };
    Seq seqs[] = {{150, shuffled_blocks(23), shuffled_blocks(24), DeviceCache::make(dst_device, 22)},
                  {90, shuffled_blocks(25), shuffled_blocks(26), DeviceCache::make(dst_device, 27)}};
    for (Seq& q : seqs) {
      q.send = begin_layer_wise_kv(*sender->pool, src.view.layout, q.tokens);
      ASSERT_TRUE(q.send.ok()) << q.send.status().message();
      q.pull = receiver->puller->submit(q.send->handle, KvScatterTarget{q.dst.view, q.dst_table, q.tokens});
      ASSERT_TRUE(q.pull.ok()) << q.pull.status().message();
    }

    ASSERT_TRUE(cuda::set_device(0).ok());
    StatusOr<cuda::Stream> writer = cuda::Stream::create();
    ASSERT_TRUE(writer.ok());
    PagedKvView view = src.view;
    view.cuda_stream = writer->get();
    // Before each layer's last write, a few milliseconds of other work on the writer: a copy that
    // did not wait for the writer would read the layer's old values.
    StatusOr<cuda::DeviceBuffer> busy = cuda::DeviceBuffer::allocate(size_t{256} << 20);
    ASSERT_TRUE(busy.ok());
    const int64_t layer_values = static_cast<int64_t>(src.memory.bytes() / 2) / kLayers;
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int i = 0; i < 20; ++i)
        ASSERT_TRUE(
            cuda::fill_bytes(busy->data(), static_cast<uint8_t>(i), busy->bytes(), writer->get()).ok());
      // Layers l and after (never a layer sent): layer l's values are final.
      const int64_t n = (kLayers - l) * layer_values;
      ASSERT_TRUE(cuda::fill_uniform_bf16(src.memory.as<uint16_t>() + l * layer_values, n, 0.0f, 1.0f, 77 + l,
                                          writer->get())
                      .ok());
      for (Seq& q : seqs) ASSERT_TRUE(send_kv_layer(*sender->pool, *q.send, view, q.src_table, l).ok());
    }
    int32_t first_token = 4242;
    for (Seq& q : seqs) {
      ASSERT_TRUE(sender->pool->publish_progress(q.send->handle.ref(), kLayers, first_token).ok());
      TransferState st = receiver->puller->wait(*q.pull);
      ASSERT_EQ(st.phase, TransferPhase::kDone) << st.error.message();
      EXPECT_EQ(st.first_token, first_token++);
      ASSERT_TRUE(writer->synchronize().ok());
      EXPECT_EQ(q.dst.wire(q.dst_table, q.tokens), src.wire(q.src_table, q.tokens)) << q.tokens << " tokens";
      ASSERT_TRUE(sender->pool->release(q.send->handle.ref()).ok());
    }
  }
  // Into pageable memory a layer's copy would hold up the thread queuing the forward pass: such a
  // pool sends the KV whole.
  KvTransportOptions pageable = options(0);
  pageable.page_lock_host_stage = false;
  StatusOr<KvTransport> t = make_cuda_staged_transport(TransportKind::kTcp, pageable);
  ASSERT_TRUE(t.ok()) << t.status().message();
  EXPECT_FALSE(t->pool->supports_layer_wise());
}

// A pull waiting on a layer-wise prefill that sends nothing gives up when cancelled: the cancel
// reaches the host puller under the stage (shm watches for it), well before the 30 s I/O timeout.
TEST_F(CudaIpc, CancellingAStagedPullThatWaitsOnALayerWisePrefillEndsIt) {
  DeviceCache dst = DeviceCache::make(0, 31);
  KvTransportOptions so = options(0);
  so.receive = false;
  KvTransportOptions ro = options(0);
  ro.send = false;
  ro.io_timeout_ms = 30'000;
  StatusOr<KvTransport> sender = make_cuda_staged_transport(TransportKind::kShm, so);
  StatusOr<KvTransport> receiver = make_cuda_staged_transport(TransportKind::kShm, ro);
  ASSERT_TRUE(sender.ok()) << sender.status().message();
  ASSERT_TRUE(receiver.ok()) << receiver.status().message();
  const int32_t tokens = 64;
  const std::vector<int32_t> table = shuffled_blocks(32);
  StatusOr<LayerWiseSend> send = begin_layer_wise_kv(*sender->pool, dst.view.layout, tokens);
  ASSERT_TRUE(send.ok()) << send.status().message();
  StatusOr<TransferId> pull =
      receiver->puller->submit(send->handle, KvScatterTarget{dst.view, table, tokens});
  ASSERT_TRUE(pull.ok()) << pull.status().message();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(receiver->puller->poll(*pull).phase, TransferPhase::kPending);
  const auto cancelled_at = std::chrono::steady_clock::now();
  receiver->puller->cancel(*pull);
  TransferState st = receiver->puller->wait(*pull);
  const auto took = std::chrono::steady_clock::now() - cancelled_at;
  EXPECT_EQ(st.phase, TransferPhase::kFailed);
  EXPECT_EQ(st.error.code(), StatusCode::kCancelled) << st.error.to_string();
  EXPECT_LT(took, std::chrono::seconds(5)) << "the cancel did not reach the host puller";
  ASSERT_TRUE(sender->pool->release(send->handle.ref()).ok());
}

TEST_F(CudaIpc, RefusesMismatchesAndHostMemory) {
  DeviceCache src = DeviceCache::make(0, 5);
  DeviceCache dst = DeviceCache::make(0, 6);
  StatusOr<KvTransport> t = make_cuda_ipc_transport(options(0));
  ASSERT_TRUE(t.ok()) << t.status().message();
  const std::vector<int32_t> table = shuffled_blocks(7);
  StatusOr<KvHandle> h = publish_kv(*t->pool, src.view, table, 40);
  ASSERT_TRUE(h.ok()) << h.status().message();

  // Another model: found by the header, which is checked beside the scatter; the scatter wrote
  // nothing outside the target's blocks.
  const std::vector<bool> mask = DeviceCache::used(table, 40);
  const std::vector<uint16_t> before = dst.all();
  PagedKvView other = dst.view;
  other.layout.model_fingerprint = 99;
  TransferState st = t->puller->pull(*h, KvScatterTarget{other, table, 40});
  ASSERT_EQ(st.phase, TransferPhase::kFailed);
  EXPECT_THAT(st.error.message(), HasSubstr("fingerprint"));
  {
    const std::vector<uint16_t> after = dst.all();
    size_t outside = 0;
    for (size_t i = 0; i < after.size(); ++i) outside += !mask[i] && after[i] != before[i];
    EXPECT_EQ(outside, 0u) << "a refused pull wrote outside its target's blocks";
  }
  // Another token count than the decode expects: refused before anything lands.
  {
    const std::vector<uint16_t> snapshot = dst.all();
    st = t->puller->pull(*h, KvScatterTarget{dst.view, table, 39});
    ASSERT_EQ(st.phase, TransferPhase::kFailed);
    EXPECT_THAT(st.error.message(), HasSubstr("expects 39"));
    EXPECT_EQ(dst.all(), snapshot) << "a pull refused on its size wrote into the target";
  }
  // A stale generation.
  KvHandle stale = *h;
  stale.generation += 1000;
  st = t->puller->pull(stale, KvScatterTarget{dst.view, table, 40});
  ASSERT_EQ(st.phase, TransferPhase::kFailed);
  EXPECT_THAT(st.error.message(), HasSubstr("stale"));
  // A block table too short for the tokens.
  st = t->puller->pull(*h, KvScatterTarget{dst.view, std::span<const int32_t>(table).first(2), 40});
  ASSERT_EQ(st.phase, TransferPhase::kFailed);
  EXPECT_THAT(st.error.message(), HasSubstr("block table"));
  // Host memory is not this transport's.
  std::vector<uint8_t> host(dst.memory.bytes());
  PagedKvView host_view{host.data(),
                        2 * dst.view.layout.num_layers * kBlockSize * dst.view.layout.row_bytes(), kBlocks,
                        kBlockSize, dst.view.layout};
  host_view.layout.dtype = KvDtype::kBF16;
  st = t->puller->pull(*h, KvScatterTarget{host_view, table, 40});
  ASSERT_EQ(st.phase, TransferPhase::kFailed);
  EXPECT_THAT(st.error.message(), HasSubstr("host memory"));
  EXPECT_FALSE(publish_kv(*t->pool, host_view, table, 40).ok());
  // The good pull still works after all of that.
  st = t->puller->pull(*h, KvScatterTarget{dst.view, table, 40});
  ASSERT_EQ(st.phase, TransferPhase::kDone) << st.error.message();
  EXPECT_EQ(dst.wire(table, 40), src.wire(table, 40));
  // The other transports refuse GPU memory with the reason.
  StatusOr<KvTransport> shm = make_transport(TransportKind::kShm, KvTransportOptions{});
  ASSERT_TRUE(shm.ok());
  StatusOr<KvHandle> bad = publish_kv(*shm->pool, src.view, table, 40);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("cuda-ipc"));
}

// A pool sized with kv_send_buffer_bytes holds that many messages, the lead included (a size whose
// lead crosses a page).
TEST_F(CudaIpc, APoolSizedByKvSendBufferBytesHoldsItsMessages) {
  const uint64_t message = 16 * 4096 - 100;
  KvTransportOptions o = options(0);
  o.pool_capacity_bytes = 3 * kv_send_buffer_bytes(message);
  o.max_buffers = 3;
  StatusOr<KvTransport> t = make_cuda_ipc_transport(o);
  ASSERT_TRUE(t.ok()) << t.status().message();
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(t->pool->acquire(message).ok()) << "message " << i;
  EXPECT_EQ(t->pool->acquire(10).status().code(), StatusCode::kInvalidArgument) << "shorter than a header";
}

// Across processes: this binary, started again with kChildEnv set, is the prefill; it prints
// its handle, then waits for a line on stdin before it exits (its pool must outlive the pull).
TEST_F(CudaIpc, RoundTripBetweenProcesses) {
  const int dst_device = cuda::device_count() > 1 ? 1 : 0;
  testing::SpawnedPrefill child(kChildEnv, "1", "CudaIpcChild.Prefill");
  ASSERT_FALSE(child.handle.empty()) << "the prefill process printed no handle";
  StatusOr<KvHandle> h = KvHandle::parse(child.handle);
  ASSERT_TRUE(h.ok()) << h.status().message();
  DeviceCache dst = DeviceCache::make(dst_device, 8);
  KvTransportOptions ro = options(dst_device);
  ro.send = false;
  StatusOr<KvTransport> receiver = make_cuda_ipc_transport(ro);
  ASSERT_TRUE(receiver.ok()) << receiver.status().message();
  const std::vector<int32_t> dst_table = shuffled_blocks(9);
  TransferState st = receiver->puller->pull(*h, KvScatterTarget{dst.view, dst_table, 150});
  ASSERT_EQ(st.phase, TransferPhase::kDone) << st.error.message();
  // The child's cache: the same seed and table, made again here on the child's GPU.
  DeviceCache expected = DeviceCache::make(0, 1);
  EXPECT_EQ(dst.wire(dst_table, 150), expected.wire(shuffled_blocks(3), 150));
  EXPECT_EQ(child.finish(), 0) << "the prefill process failed";
}

TEST(CudaIpcChild, Prefill) {
  if (std::getenv(kChildEnv) == nullptr) GTEST_SKIP() << "the prefill half of RoundTripBetweenProcesses";
  DeviceCache src = DeviceCache::make(0, 1);
  KvTransportOptions so = options(0);
  so.receive = false;
  StatusOr<KvTransport> sender = make_cuda_ipc_transport(so);
  ASSERT_TRUE(sender.ok()) << sender.status().message();
  StatusOr<KvHandle> h = publish_kv(*sender->pool, src.view, shuffled_blocks(3), 150);
  ASSERT_TRUE(h.ok()) << h.status().message();
  std::printf("HANDLE %s\n", h->to_string().c_str());
  std::fflush(stdout);
  char line[16];
  ASSERT_NE(std::fgets(line, sizeof line, stdin), nullptr);
}

}  // namespace
}  // namespace pdserve

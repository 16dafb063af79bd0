// inproc: prefill and decode in one process. The pool's buffers are private memory; a pull finds
// the pool through a process-wide registry (endpoint "inproc/<n>"), pins the buffer and scatters
// straight from it. The registry holds weak references: a pool destroyed during a pull stays
// alive until the pull unpins it.
#include <fmt/format.h>

#include <charconv>
#include <mutex>
#include <unordered_map>

#include "transfer/memory.h"
#include "transfer/pull_common.h"
#include "transfer/transports.h"

namespace pdserve::transfer_internal {
namespace {

struct InprocShared {
  AnonymousMemory memory;
  std::unique_ptr<SendPoolCore> core;
};

class Registry {
 public:
  uint64_t add(std::weak_ptr<InprocShared> pool) {
    std::lock_guard lock(mu_);
    const uint64_t n = next_++;
    pools_[n] = std::move(pool);
    return n;
  }
  void remove(uint64_t n) {
    std::lock_guard lock(mu_);
    pools_.erase(n);
  }
  std::shared_ptr<InprocShared> find(uint64_t n) {
    std::lock_guard lock(mu_);
    auto it = pools_.find(n);
    return it == pools_.end() ? nullptr : it->second.lock();
  }

 private:
  std::mutex mu_;
  uint64_t next_ = 1;                                                // guarded by mu_
  std::unordered_map<uint64_t, std::weak_ptr<InprocShared>> pools_;  // guarded by mu_
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: pools may outlive static destruction order
  return *r;
}

class InprocSendPool final : public KvSendPool {
 public:
  InprocSendPool(std::shared_ptr<InprocShared> shared)
      : shared_(std::move(shared)),
        number_(registry().add(shared_)),
        endpoint_(fmt::format("inproc/{}", number_)) {}
  ~InprocSendPool() override { registry().remove(number_); }

  TransportKind kind() const override { return TransportKind::kInproc; }
  std::string endpoint() const override { return endpoint_; }

  StatusOr<KvSendBuffer> acquire(uint64_t bytes) override {
    PD_ASSIGN_OR_RETURN(SendPoolCore::Acquired a, shared_->core->acquire(bytes));
    KvSendBuffer b;
    b.ref = a.ref;
    b.bytes = a.bytes;
    b.handle = KvHandle{TransportKind::kInproc,
                        KvTransferMode::kContiguous,
                        endpoint_,
                        a.ref.buffer_id,
                        a.ref.generation,
                        bytes};
    return b;
  }
  Status commit(KvBufferRef ref) override { return shared_->core->commit(ref); }
  StatusOr<KvHandle> expose_paged(const PagedKvView&, std::span<const int32_t>, int32_t, uint32_t) override {
    return unimplemented("the inproc transport has no block-fixed mode (it exists for shm and tcp only)");
  }
  Status release(KvBufferRef ref) override { return shared_->core->release(ref); }
  bool supports_layer_wise() const override { return true; }
  Status publish_progress(KvBufferRef ref, int32_t layers_ready, int32_t first_token) override {
    return shared_->core->set_progress(ref, layers_ready, first_token);
  }
  int32_t reclaim_expired() override { return shared_->core->reclaim_expired(); }
  KvSendPoolStats stats() const override { return shared_->core->stats(); }

 private:
  std::shared_ptr<InprocShared> shared_;
  uint64_t number_;
  std::string endpoint_;
};

class InprocPuller final : public QueuedPuller {
 public:
  explicit InprocPuller(const KvTransportOptions& options)
      : QueuedPuller(TransportKind::kInproc, KvMemory::kHost, kHostPullThreads),
        io_timeout_ms_(options.io_timeout_ms) {}
  ~InprocPuller() override { stop(); }

 protected:
  StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) override {
    if (handle.mode != KvTransferMode::kContiguous)
      return unimplemented("the inproc transport has no block-fixed mode");
    constexpr std::string_view kPrefix = "inproc/";
    const std::string_view ep = handle.endpoint;
    uint64_t n = 0;
    const bool parsed =
        ep.starts_with(kPrefix) &&
        std::from_chars(ep.data() + kPrefix.size(), ep.data() + ep.size(), n).ptr == ep.data() + ep.size();
    if (!parsed) return invalid_argument(fmt::format("bad inproc endpoint '{}'", ep));
    std::shared_ptr<InprocShared> pool = registry().find(n);
    if (!pool) return unavailable(fmt::format("inproc KV pool {} is gone (its prefill shut down)", ep));
    PD_ASSIGN_OR_RETURN(PinnedBuffer pinned, pool->core->pin(handle.ref(), KvTransferMode::kContiguous));
    StatusOr<PullResult> result = scatter(pinned.bytes, handle, target, *pool->core);
    pool->core->unpin(handle.buffer_id);
    return result;
  }

 private:
  StatusOr<PullResult> scatter(std::span<const uint8_t> bytes, const KvHandle& handle,
                               const KvScatterTarget& target, SendPoolCore& core) {
    PD_ASSIGN_OR_RETURN(KvWireHeader header, decode_kv_wire_header(bytes));
    PD_RETURN_IF_ERROR(check_header_for_pull(header, handle, target, bytes.size(), /*layer_wise_ok=*/true));
    const auto body = bytes.subspan(kKvWireHeaderBytes);
    if (header.flags & kKvWireLayerWise) {
      auto wait = [&](int32_t layers, bool need_token) -> StatusOr<LayerProgress> {
        PD_ASSIGN_OR_RETURN(SendPoolCore::Progress p, core.wait_progress(handle.ref(), layers, need_token,
                                                                         io_timeout_ms_, cancel_flag()));
        return LayerProgress{p.layers_ready, p.first_token};
      };
      PD_ASSIGN_OR_RETURN(int32_t first_token, scatter_layer_wise(body, header, target, wait));
      return PullResult{header.num_tokens, bytes.size(), first_token};
    }
    PD_RETURN_IF_ERROR(verify_kv_body_checksum(header, body));
    PD_RETURN_IF_ERROR(scatter_reporting(body, 0, header.num_tokens, target));
    return PullResult{header.num_tokens, bytes.size()};
  }

  const int64_t io_timeout_ms_;
};

}  // namespace

StatusOr<std::unique_ptr<KvSendPool>> make_inproc_pool(const KvTransportOptions& options) {
  auto shared = std::make_shared<InprocShared>();
  PD_ASSIGN_OR_RETURN(shared->memory,
                      AnonymousMemory::create(options.pool_capacity_bytes, options.prefault_pool));
  shared->core = std::make_unique<SendPoolCore>(core_config(options), shared->memory.data());
  return std::unique_ptr<KvSendPool>(std::make_unique<InprocSendPool>(std::move(shared)));
}

StatusOr<std::unique_ptr<KvPuller>> make_inproc_puller(const KvTransportOptions& options) {
  return std::unique_ptr<KvPuller>(std::make_unique<InprocPuller>(options));
}

}  // namespace pdserve::transfer_internal

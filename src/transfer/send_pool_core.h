// SendPoolCore (internal to src/transfer): the bookkeeping every KvSendPool shares — a fixed
// number of buffer slots, first-fit allocation of their bytes from one pre-reserved range,
// generations, leases, and pins by local readers (the tcp server, the inproc puller).
//
// A slot's life: free → acquire → writing → commit → committed → release or lease expiry →
// released / expired → (reused by a later acquire, with a new generation). A block-fixed
// exposure (expose_paged) has no bytes in the range; it is committed at once. The lease counts
// from the commit and again from each layer-wise progress; a buffer being written has none.
//
// While pinned, a slot's bytes are neither reused nor freed: release() waits until the pins are
// gone, and a lease expiry only marks the slot and returns its bytes at the last unpin.
// The shm pool mirrors each slot change into its segment through a SlotListener, called with
// the lock held.
//
// Thread-safe (one mutex). The core does not own the memory it hands out spans into.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "transfer/kv_layout.h"
#include "transfer/kv_transport.h"
#include "transfer/kv_wire.h"

namespace pdserve::transfer_internal {

// Values are shared with the shm segment's slot records.
enum class SlotState : uint32_t { kFree = 0, kWriting = 1, kCommitted = 2, kReleased = 3, kExpired = 4 };

// A block-fixed exposure: the prefill's paged KV of one sequence, and its wire header.
struct PagedSource {
  PagedKvView view;
  std::vector<int32_t> block_table;
  int32_t num_tokens = 0;
  std::array<uint8_t, kKvWireHeaderBytes> header{};
};

// What a pin hands a local reader; valid until unpin().
struct PinnedBuffer {
  KvTransferMode mode = KvTransferMode::kContiguous;
  std::span<const uint8_t> bytes;      // kContiguous: header + body
  const PagedSource* paged = nullptr;  // kBlockFixed
};

struct SlotSnapshot {
  SlotState state = SlotState::kFree;
  uint64_t generation = 0;
  KvTransferMode mode = KvTransferMode::kContiguous;
  uint64_t offset = 0;
  uint64_t bytes = 0;
  // A layer-wise buffer's progress (publish_progress): layers written, and the first token (-1: not yet).
  int32_t layers_ready = 0;
  int32_t first_token = -1;
};

using SlotListener = std::function<void(uint32_t buffer_id, const SlotSnapshot& slot)>;

class SendPoolCore {
 public:
  struct Config {
    uint64_t capacity_bytes = 0;
    int32_t max_buffers = 0;
    int64_t lease_ms = 0;
    KvClockMs clock_ms;  // nullptr: steady clock
    // Each message starts this far into its page-aligned buffer (at most kKvSendBufferLeadMax):
    // offsets, sizes and spans, the listener's included, are the message's.
    uint64_t message_lead = 0;
    // KvTransportOptions::pool_region_bytes (0: plain first-fit).
    uint64_t region_bytes = 0;
  };
  // `data` holds capacity_bytes (may be null when the capacity is 0).
  SendPoolCore(const Config& config, uint8_t* data, SlotListener listener = nullptr);

  struct Acquired {
    KvBufferRef ref;
    uint64_t offset = 0;  // of the bytes within the pool's range
    std::span<uint8_t> bytes;
  };
  StatusOr<Acquired> acquire(uint64_t bytes);
  Status commit(KvBufferRef ref);
  StatusOr<KvBufferRef> expose_paged(std::unique_ptr<PagedSource> source, uint64_t wire_bytes);
  Status release(KvBufferRef ref);
  int32_t reclaim_expired();

  // Pins a committed buffer of this mode and generation for reading; the error says why not
  // (unknown id, stale generation, released, lease expired, not committed, other mode).
  StatusOr<PinnedBuffer> pin(KvBufferRef ref, KvTransferMode mode);
  void unpin(uint32_t buffer_id);

  // A committed buffer's layer-wise progress (KvSendPool::publish_progress): layers_ready never
  // goes down; a first_token >= 0 sets the token. Wakes wait_progress().
  Status set_progress(KvBufferRef ref, int32_t layers_ready, int32_t first_token);
  struct Progress {
    int32_t layers_ready = 0;
    int32_t first_token = -1;
  };
  // Waits until the buffer has at least `layers` layers ready (and its first token, if
  // need_first_token). Fails when the buffer is released, reclaimed or reused meanwhile, when
  // `cancelled` becomes true (CANCELLED; checked every few milliseconds), or when no progress
  // comes within timeout_ms (DEADLINE_EXCEEDED).
  StatusOr<Progress> wait_progress(KvBufferRef ref, int32_t layers, bool need_first_token, int64_t timeout_ms,
                                   const std::atomic<bool>* cancelled = nullptr);

  // Pulls the pool saw (tcp, shm block-fixed), for stats.
  void count_pull(bool ok);
  KvSendPoolStats stats() const;
  uint64_t capacity_bytes() const { return config_.capacity_bytes; }
  int32_t max_buffers() const { return config_.max_buffers; }

 private:
  struct Slot {
    SlotState state = SlotState::kFree;
    uint64_t generation = 0;
    KvTransferMode mode = KvTransferMode::kContiguous;
    uint64_t offset = 0;        // of the message: its range starts message_lead before
    uint64_t bytes = 0;         // as asked for (wire bytes for an exposure)
    uint64_t reserved = 0;      // of the range, page-rounded; 0 when none
    int64_t lease_from_ms = 0;  // a committed buffer's lease counts from here
    int32_t pins = 0;
    int32_t layers_ready = 0;
    int32_t first_token = -1;
    std::unique_ptr<PagedSource> paged;
  };

  int64_t now_ms() const;
  // The slot for ref, or an error naming why it is not that buffer any more. Lock held.
  StatusOr<Slot*> find_locked(KvBufferRef ref, std::string_view action);
  bool expired_locked(const Slot& slot, int64_t now) const;
  void expire_locked(uint32_t id, Slot& slot);
  // Gives the slot's bytes back once no pin holds them. Lock held.
  void free_storage_locked(Slot& slot);
  // A buffer no larger than a region starts at the first region wholly free, or when none is at
  // the first free place that does not cross a region's boundary; a larger one (or any, without
  // regions) at the first free range that holds it.
  std::optional<uint64_t> allocate_locked(uint64_t bytes);
  // Takes [offset, offset + bytes) out of the free range `it` that holds it.
  void carve_locked(std::map<uint64_t, uint64_t>::iterator it, uint64_t offset, uint64_t bytes);
  void deallocate_locked(uint64_t offset, uint64_t bytes);
  int32_t pick_slot_locked() const;
  void notify_locked(uint32_t id, const Slot& slot);

  const Config config_;
  const uint64_t region_bytes_;  // config_.region_bytes in whole pages; 0: no regions
  uint8_t* const data_;
  const SlotListener listener_;

  mutable std::mutex mu_;
  std::condition_variable unpinned_;
  std::condition_variable progress_;          // a layer-wise buffer moved on, or left the committed state
  std::vector<Slot> slots_;                   // guarded by mu_
  std::map<uint64_t, uint64_t> free_ranges_;  // offset → bytes; guarded by mu_
  uint64_t next_generation_;                  // guarded by mu_
  uint64_t bytes_in_use_ = 0;                 // guarded by mu_
  KvSendPoolStats counters_;                  // the *_total fields; guarded by mu_
};

// A KvSendPool over a SendPoolCore: acquire (the handle names kind() and endpoint()), commit,
// release, reclaim and stats forward to core_, which the derived pool makes. The pools of shm,
// tcp, ucx and cuda-ipc are; each adds its memory, its server and expose_paged.
class CoreSendPool : public KvSendPool {
 public:
  StatusOr<KvSendBuffer> acquire(uint64_t bytes) override {
    PD_ASSIGN_OR_RETURN(SendPoolCore::Acquired a, core_->acquire(bytes));
    return KvSendBuffer{
        a.ref, a.bytes,
        KvHandle{kind(), KvTransferMode::kContiguous, endpoint(), a.ref.buffer_id, a.ref.generation, bytes}};
  }
  Status commit(KvBufferRef ref) override { return core_->commit(ref); }
  Status release(KvBufferRef ref) override { return core_->release(ref); }
  Status publish_progress(KvBufferRef ref, int32_t layers_ready, int32_t first_token) override {
    if (!supports_layer_wise()) return KvSendPool::publish_progress(ref, layers_ready, first_token);
    return core_->set_progress(ref, layers_ready, first_token);
  }
  int32_t reclaim_expired() override { return core_->reclaim_expired(); }
  KvSendPoolStats stats() const override { return core_->stats(); }

 protected:
  std::unique_ptr<SendPoolCore> core_;
};

}  // namespace pdserve::transfer_internal

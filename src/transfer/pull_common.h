// Shared by the pullers (internal to src/transfer): QueuedPuller, the submit/poll/wait machinery
// around one progress thread that runs the transport's pulls one after another, and the checks
// every pull makes on a peer's header before it writes into the target.
//
// Thread-safety: QueuedPuller's public methods are thread-safe; run_pull() runs on the progress
// thread only. A derived class must call stop() first thing in its destructor, so the thread is
// gone before the members run_pull() uses.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/status.h"
#include "transfer/kv_transport.h"

namespace pdserve::transfer_internal {

struct PullResult {
  int32_t num_tokens = 0;
  uint64_t bytes = 0;
};

class QueuedPuller : public KvPuller {
 public:
  // `memory`: where the targets it writes must be (a host transport's pulls land in host memory;
  // the GPU transports' in a GPU's).
  explicit QueuedPuller(TransportKind kind, KvMemory memory = KvMemory::kHost);
  ~QueuedPuller() override;

  TransportKind kind() const override { return kind_; }
  StatusOr<TransferId> submit(const KvHandle& handle, const KvScatterTarget& target) override;
  TransferState poll(TransferId id) override;
  TransferState wait(TransferId id) override;
  KvPullerStats stats() const override;

 protected:
  // One pull, on the progress thread: fetch, validate, scatter.
  virtual StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) = 0;
  // Fails the queued pulls (CANCELLED), lets the running one finish, joins the thread. Idempotent.
  void stop();

 private:
  struct Job {
    TransferId id;
    KvHandle handle;
    KvScatterTarget target;
  };
  void loop();
  TransferState take_finished_locked(TransferId id);

  const TransportKind kind_;
  const KvMemory memory_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Job> queue_;                                 // guarded by mu_
  std::unordered_map<TransferId, TransferState> states_;  // guarded by mu_
  TransferId next_id_ = 1;                                // guarded by mu_
  bool stopping_ = false;                                 // guarded by mu_
  KvPullerStats stats_;                                   // guarded by mu_
  std::thread thread_;
};

// The checks between a peer's decoded header and the pull: the generation the handle names, the
// local layout (check_compatible), the expected token count, room in the block table, and the
// total size against the handle (and against what the sender says it holds, when it says).
Status check_header_for_pull(const KvWireHeader& header, const KvHandle& handle,
                             const KvScatterTarget& target, uint64_t sender_bytes);

// XXH3-64 of the wire body as it lies scattered in `view` (for the body checksum after a
// scatter that went straight into the blocks).
uint64_t scattered_body_checksum(const PagedKvView& view, std::span<const int32_t> block_table,
                                 int32_t num_tokens);

// A Status for a peer's error report: the code if it is one we know (INTERNAL otherwise), the
// message prefixed with where it came from.
Status peer_status(uint32_t code, std::string_view message, std::string_view peer);

}  // namespace pdserve::transfer_internal

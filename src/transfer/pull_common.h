// Shared by the pullers (internal to src/transfer): QueuedPuller, the submit/poll/wait machinery
// around progress threads that run the transport's pulls in arrival order (one thread: one after
// another; several: that many at once, so a pull waiting on a layer-wise prefill does not hold up
// the others), and the checks every pull makes on a peer's header (before it writes into the target;
// cuda-ipc after, its size checks before).
//
// Thread-safety: QueuedPuller's public methods are thread-safe; run_pull() runs on the progress
// threads only, concurrently when there are several (it must then be thread-safe). A derived class
// must call stop() first thing in its destructor, so the threads are gone before the members
// run_pull() uses.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "transfer/kv_transport.h"

namespace pdserve::transfer_internal {

struct PullResult {
  int32_t num_tokens = 0;
  uint64_t bytes = 0;
  int32_t first_token = -1;  // a layer-wise buffer's
};

// Pulls the host transports (inproc, shm, tcp) run at once: a few, so that pulls waiting on
// layer-wise prefills do not hold up the others.
inline constexpr int32_t kHostPullThreads = 4;

class QueuedPuller : public KvPuller {
 public:
  // `memory`: where the targets it writes must be (a host transport's pulls land in host memory;
  // the GPU transports' in a GPU's).
  // `threads`: pulls run at once (run_pull() must be thread-safe when more than one).
  explicit QueuedPuller(TransportKind kind, KvMemory memory = KvMemory::kHost, int32_t threads = 1);
  ~QueuedPuller() override;

  TransportKind kind() const override { return kind_; }
  StatusOr<TransferId> submit(const KvHandle& handle, const KvScatterTarget& target) override;
  TransferState poll(TransferId id) override;
  TransferState wait(TransferId id) override;
  KvPullerStats stats() const override;
  void cancel(TransferId id) override;
  uint64_t add_done_listener(std::function<void()> fn) override;
  void remove_done_listener(uint64_t id) override;

 protected:
  // Set while the pull running on this thread has been cancelled (waits for a layer-wise prefill
  // check it). Only from run_pull().
  static const std::atomic<bool>* cancel_flag() { return current_cancel_; }
  // When the pull running on this thread was submitted (for accounts of where its time went). Only
  // from run_pull().
  static std::chrono::steady_clock::time_point submitted_at() { return current_submitted_; }
  // One pull, on the progress thread: fetch, validate, scatter.
  virtual StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) = 0;
  // Called after a running pull's cancel flag is set (cancel(), stop()), with the puller's lock
  // held: a transport whose pulls block in I/O wakes the one with that flag (tcp shuts its socket
  // down). Must be quick and must not call into the puller.
  virtual void interrupt(const std::atomic<bool>* /*cancel*/) {}
  // Fails the queued pulls (CANCELLED), cancels the running ones (a pull waiting on a layer-wise
  // prefill gives up; others may finish, except over tcp, where interrupt() ends them), joins the
  // threads. Idempotent.
  void stop();

 private:
  struct Job {
    TransferId id;
    KvHandle handle;
    KvScatterTarget target;
    std::chrono::steady_clock::time_point submitted;
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
  // The pulls running now and their threads' cancel flags; guarded by mu_.
  std::unordered_map<TransferId, std::atomic<bool>*> running_;
  std::unordered_map<uint64_t, std::function<void()>> listeners_;  // guarded by mu_
  uint64_t next_listener_ = 1;                                     // guarded by mu_
  static thread_local const std::atomic<bool>* current_cancel_;
  static thread_local std::chrono::steady_clock::time_point current_submitted_;
  bool stopping_ = false;  // guarded by mu_
  KvPullerStats stats_;    // guarded by mu_
  std::vector<std::thread> threads_;
};

// The checks between a peer's decoded header and the pull: the generation the handle names, the
// local layout (check_compatible), the expected token count, room in the block table, and the
// total size against the handle (and against what the sender says it holds, when it says), and
// that a layer-wise header reaches a puller that follows progress (`layer_wise_ok`).
// Of those, the checks on the token count alone (cuda-ipc makes them from the message's size before
// its header has arrived): the expected count, and room in the block table. `what` begins the
// message ("KV header has").
Status check_tokens_for_pull(int32_t num_tokens, const KvScatterTarget& target, std::string_view what);

Status check_header_for_pull(const KvWireHeader& header, const KvHandle& handle,
                             const KvScatterTarget& target, uint64_t sender_bytes,
                             bool layer_wise_ok = false);

// A layer-wise buffer's progress as its sender published it.
struct LayerProgress {
  int32_t layers_ready = 0;
  int32_t first_token = -1;
};
// Waits until at least `layers` layers are ready (and the first token, if need_first_token), or
// fails saying why (buffer given up, sender gone, no progress within the I/O timeout, cancelled).
using WaitLayerProgress = std::function<StatusOr<LayerProgress>(int32_t layers, bool need_first_token)>;
// Scatters bytes [body_offset, body_offset + bytes.size()) of a wire body of num_tokens into the
// target; where the target follows the body's progress (on_body_landed), in pieces of whole layers
// of at least `report_bytes` (each piece ends at a multiple of that many whole layers in the body, or
// at the end of `bytes`), reporting the body landed so far after each.
// (32 MiB: a smaller piece would be copied on one thread, without streaming stores: kv_layout.cpp.)
inline constexpr uint64_t kLandedReportBytes = uint64_t{32} << 20;
Status scatter_reporting(std::span<const uint8_t> bytes, uint64_t body_offset, int32_t num_tokens,
                         const KvScatterTarget& target, uint64_t report_bytes = kLandedReportBytes);

// A layer-wise pull from memory its sender fills in place (inproc, shm): scatters the layers of
// `body` as `wait` says they are ready (reporting them as scatter_reporting does), then waits for
// the first token and returns it (checked against vocab limits by the caller).
StatusOr<int32_t> scatter_layer_wise(std::span<const uint8_t> body, const KvWireHeader& header,
                                     const KvScatterTarget& target, const WaitLayerProgress& wait);

// XXH3-64 of the wire body as it lies scattered in `view` (for the body checksum after a
// scatter that went straight into the blocks).
uint64_t scattered_body_checksum(const PagedKvView& view, std::span<const int32_t> block_table,
                                 int32_t num_tokens);

// A Status for a peer's error report: the code if it is one we know (INTERNAL otherwise), the
// message prefixed with where it came from.
Status peer_status(uint32_t code, std::string_view message, std::string_view peer);

}  // namespace pdserve::transfer_internal

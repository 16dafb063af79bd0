#include "transfer/pull_common.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>

#include "common/check.h"

namespace pdserve::transfer_internal {

thread_local const std::atomic<bool>* QueuedPuller::current_cancel_ = nullptr;
thread_local std::chrono::steady_clock::time_point QueuedPuller::current_submitted_;

QueuedPuller::QueuedPuller(TransportKind kind, KvMemory memory, int32_t threads)
    : kind_(kind), memory_(memory) {
  PD_CHECK(threads >= 1);
  for (int32_t i = 0; i < threads; ++i) threads_.emplace_back([this] { loop(); });
}

QueuedPuller::~QueuedPuller() { stop(); }

void QueuedPuller::stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
    for (auto& [id, cancel] : running_) {  // pulls waiting on a layer-wise prefill give up
      cancel->store(true);
      interrupt(cancel);
    }
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

StatusOr<TransferId> QueuedPuller::submit(const KvHandle& handle, const KvScatterTarget& target) {
  if (handle.kind != kind_)
    return invalid_argument(fmt::format("a {} puller cannot pull a {} handle", transport_kind_name(kind_),
                                        transport_kind_name(handle.kind)));
  PD_RETURN_IF_ERROR(target.view.validate().with_context("KV pull target"));
  if (memory_ == KvMemory::kHost)
    PD_RETURN_IF_ERROR(target.view.require_host(fmt::format("the {} transport", transport_kind_name(kind_))));
  else if (target.view.memory != memory_)
    return failed_precondition(
        fmt::format("this {} puller writes KV caches in GPU memory; the target is in host memory (a CPU "
                    "instance uses the "
                    "host transports)",
                    transport_kind_name(kind_)));
  if (target.expected_num_tokens < -1)
    return invalid_argument(fmt::format("expected_num_tokens {} must be >= -1", target.expected_num_tokens));
  std::lock_guard lock(mu_);
  if (stopping_) return failed_precondition("the KV puller is shutting down");
  const TransferId id = next_id_++;
  queue_.push_back(Job{id, handle, target, std::chrono::steady_clock::now()});
  states_[id] = TransferState{};
  ++stats_.pulls_pending;
  work_cv_.notify_one();
  return id;
}

TransferState QueuedPuller::take_finished_locked(TransferId id) {
  auto it = states_.find(id);
  if (it == states_.end()) {
    TransferState s;
    s.phase = TransferPhase::kFailed;
    s.error = not_found(fmt::format("no KV transfer {} (unknown, or already reported)", id));
    return s;
  }
  TransferState s = it->second;
  if (s.phase != TransferPhase::kPending) states_.erase(it);
  return s;
}

TransferState QueuedPuller::poll(TransferId id) {
  std::lock_guard lock(mu_);
  return take_finished_locked(id);
}

TransferState QueuedPuller::wait(TransferId id) {
  std::unique_lock lock(mu_);
  done_cv_.wait(lock, [&] {
    auto it = states_.find(id);
    return it == states_.end() || it->second.phase != TransferPhase::kPending;
  });
  return take_finished_locked(id);
}

void QueuedPuller::cancel(TransferId id) {
  std::lock_guard lock(mu_);
  if (auto r = running_.find(id); r != running_.end()) {
    r->second->store(true);
    interrupt(r->second);
    return;
  }
  auto it = std::find_if(queue_.begin(), queue_.end(), [id](const Job& j) { return j.id == id; });
  if (it == queue_.end()) return;
  queue_.erase(it);
  TransferState& st = states_[id];
  st.phase = TransferPhase::kFailed;
  st.error = Status(StatusCode::kCancelled, "the pull was cancelled before it ran");
  --stats_.pulls_pending;
  ++stats_.pulls_failed_total;
  done_cv_.notify_all();
  for (auto& [lid, fn] : listeners_) fn();
}

uint64_t QueuedPuller::add_done_listener(std::function<void()> fn) {
  std::lock_guard lock(mu_);
  const uint64_t id = next_listener_++;
  listeners_.emplace(id, std::move(fn));
  return id;
}

void QueuedPuller::remove_done_listener(uint64_t id) {
  std::lock_guard lock(mu_);
  listeners_.erase(id);
}

KvPullerStats QueuedPuller::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

void QueuedPuller::loop() {
  std::atomic<bool> cancel{false};
  current_cancel_ = &cancel;
  std::unique_lock lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (stopping_) break;
    Job job = std::move(queue_.front());
    queue_.pop_front();
    cancel.store(false);
    running_[job.id] = &cancel;
    lock.unlock();
    current_submitted_ = job.submitted;
    StatusOr<PullResult> result = run_pull(job.handle, job.target);
    lock.lock();
    running_.erase(job.id);
    TransferState& st = states_[job.id];
    --stats_.pulls_pending;
    if (result.ok()) {
      st.phase = TransferPhase::kDone;
      st.num_tokens = result->num_tokens;
      st.bytes = result->bytes;
      st.first_token = result->first_token;
      ++stats_.pulls_done_total;
      stats_.bytes_total += result->bytes;
    } else {
      st.phase = TransferPhase::kFailed;
      st.error = result.status();
      ++stats_.pulls_failed_total;
    }
    done_cv_.notify_all();
    for (auto& [lid, fn] : listeners_) fn();
  }
  for (Job& job : queue_) {
    TransferState& st = states_[job.id];
    st.phase = TransferPhase::kFailed;
    st.error = Status(StatusCode::kCancelled, "the KV puller shut down before this pull ran");
    --stats_.pulls_pending;
    ++stats_.pulls_failed_total;
  }
  queue_.clear();
  done_cv_.notify_all();
}

Status check_tokens_for_pull(int32_t num_tokens, const KvScatterTarget& target, std::string_view what) {
  if (target.expected_num_tokens >= 0 && num_tokens != target.expected_num_tokens)
    return failed_precondition(
        fmt::format("{} {} tokens, the decode expects {}", what, num_tokens, target.expected_num_tokens));
  return check_kv_block_table(target.view, target.block_table, num_tokens)
      .with_context("the KV does not fit the decode's block table");
}

Status check_header_for_pull(const KvWireHeader& header, const KvHandle& handle,
                             const KvScatterTarget& target, uint64_t sender_bytes, bool layer_wise_ok) {
  if ((header.flags & kKvWireLayerWise) && (!layer_wise_ok || handle.mode != KvTransferMode::kContiguous))
    return unimplemented(
        fmt::format("the KV was sent layer-wise, which the {} transport does not follow{}",
                    transport_kind_name(handle.kind),
                    handle.mode != KvTransferMode::kContiguous ? " in block-fixed mode" : ""));
  if (header.generation != handle.generation)
    return failed_precondition(
        fmt::format("KV header generation {} != handle generation {}: the buffer was reused",
                    header.generation, handle.generation));
  PD_RETURN_IF_ERROR(check_compatible(header, target.view.layout));
  PD_RETURN_IF_ERROR(check_tokens_for_pull(header.num_tokens, target, "KV header has"));
  const uint64_t wire_bytes = kKvWireHeaderBytes + header.body_bytes;
  if (wire_bytes != handle.bytes)
    return data_loss(fmt::format("KV header says {} body bytes ({} with the header), the handle says {}",
                                 header.body_bytes, wire_bytes, handle.bytes));
  if (sender_bytes != wire_bytes)
    return data_loss(
        fmt::format("truncated KV message: the header says {} body bytes ({} with the header), the "
                    "sender holds {}",
                    header.body_bytes, wire_bytes, sender_bytes));
  return ok_status();
}

Status scatter_reporting(std::span<const uint8_t> bytes, uint64_t body_offset, int32_t num_tokens,
                         const KvScatterTarget& target, uint64_t report_bytes) {
  const uint64_t layer = target.view.layout.layer_body_bytes(num_tokens);
  if (!target.on_body_landed || layer == 0)
    return scatter_kv_range(bytes, body_offset, num_tokens, target.view, target.block_table);
  // Pieces end on multiples of `piece` in the body, so that each report ends on a whole layer.
  const uint64_t piece = std::max<uint64_t>(1, (report_bytes + layer - 1) / layer) * layer;
  const uint64_t end = body_offset + bytes.size();
  for (uint64_t at = body_offset; at < end;) {
    const uint64_t next = std::min(end, (at / piece + 1) * piece);
    PD_RETURN_IF_ERROR(scatter_kv_range(bytes.subspan(at - body_offset, next - at), at, num_tokens,
                                        target.view, target.block_table));
    at = next;
    target.on_body_landed(at);
  }
  return ok_status();
}

StatusOr<int32_t> scatter_layer_wise(std::span<const uint8_t> body, const KvWireHeader& header,
                                     const KvScatterTarget& target, const WaitLayerProgress& wait) {
  const int32_t num_layers = header.layout.num_layers;
  const uint64_t layer_bytes = header.layout.layer_body_bytes(header.num_tokens);
  PD_CHECK(body.size() == header.body_bytes);
  int32_t done = 0;
  while (done < num_layers) {
    PD_ASSIGN_OR_RETURN(LayerProgress p, wait(done + 1, false));
    const int32_t ready = std::min(p.layers_ready, num_layers);
    if (ready <= done) return internal_error("layer-wise progress went backwards");
    const uint64_t from = static_cast<uint64_t>(done) * layer_bytes;
    const uint64_t len = static_cast<uint64_t>(ready - done) * layer_bytes;
    PD_RETURN_IF_ERROR(scatter_reporting(body.subspan(from, len), from, header.num_tokens, target));
    done = ready;
  }
  PD_ASSIGN_OR_RETURN(LayerProgress p, wait(num_layers, true));
  return p.first_token;
}

uint64_t scattered_body_checksum(const PagedKvView& view, std::span<const int32_t> block_table,
                                 int32_t num_tokens) {
  XXH3_state_t* state = XXH3_createState();
  PD_CHECK(state != nullptr);
  XXH3_64bits_reset(state);
  for_each_kv_run(view, block_table, num_tokens, 0, view.layout.body_bytes(num_tokens),
                  [state](const uint8_t* p, uint64_t, size_t len) { XXH3_64bits_update(state, p, len); });
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

Status peer_status(uint32_t code, std::string_view message, std::string_view peer) {
  StatusCode c = StatusCode::kInternal;
  if (code >= static_cast<uint32_t>(StatusCode::kInvalidArgument) &&
      code <= static_cast<uint32_t>(StatusCode::kInternal))
    c = static_cast<StatusCode>(code);
  return Status(c, fmt::format("{}: {}", peer, message));
}

}  // namespace pdserve::transfer_internal

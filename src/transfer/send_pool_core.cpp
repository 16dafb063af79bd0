#include "transfer/send_pool_core.h"

#include <fmt/format.h>

#include <chrono>
#include <random>

#include "common/log.h"

namespace pdserve::transfer_internal {
namespace {

constexpr uint64_t kAlignBytes = 4096;

uint64_t align_up(uint64_t v) { return (v + kAlignBytes - 1) / kAlignBytes * kAlignBytes; }

std::string_view state_name(SlotState s) {
  switch (s) {
    case SlotState::kFree: return "free";
    case SlotState::kWriting: return "being written";
    case SlotState::kCommitted: return "committed";
    case SlotState::kReleased: return "released";
    case SlotState::kExpired: return "expired";
  }
  return "?";
}

bool holds_buffer(SlotState s) { return s == SlotState::kWriting || s == SlotState::kCommitted; }

}  // namespace

SendPoolCore::SendPoolCore(const Config& config, uint8_t* data, SlotListener listener)
    : config_(config),
      region_bytes_(align_up(config.region_bytes)),
      data_(data),
      listener_(std::move(listener)) {
  PD_CHECK(config_.max_buffers >= 1);
  PD_CHECK(config_.lease_ms >= 1);
  PD_CHECK(config_.capacity_bytes == 0 || data_ != nullptr);
  PD_CHECK(config_.message_lead <= kKvSendBufferLeadMax);
  slots_.resize(static_cast<size_t>(config_.max_buffers));
  if (config_.capacity_bytes >= kAlignBytes)
    free_ranges_[0] = config_.capacity_bytes / kAlignBytes * kAlignBytes;
  // A random start, so a handle from an earlier pool at the same endpoint is refused too.
  std::random_device rd;
  next_generation_ = ((static_cast<uint64_t>(rd()) << 16) ^ rd()) | 1;
}

int64_t SendPoolCore::now_ms() const {
  if (config_.clock_ms) return config_.clock_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::optional<uint64_t> SendPoolCore::allocate_locked(uint64_t bytes) {
  // NOTE: first-fit alone strands room: with two regions' worth, a small buffer at 0 and a full
  // one after it leave less than a region at the end once the small one goes. Buffers of at most
  // a region that never cross a region's boundary each lie within one, so while fewer buffers than
  // regions are held a whole region is free (the first loop below finds it).
  if (region_bytes_ > 0 && bytes <= region_bytes_) {
    for (auto it = free_ranges_.begin(); it != free_ranges_.end(); ++it) {
      const uint64_t start = (it->first + region_bytes_ - 1) / region_bytes_ * region_bytes_;
      if (start + region_bytes_ > it->first + it->second) continue;
      carve_locked(it, start, bytes);
      return start;
    }
    // No region wholly free (as many buffers held as there are regions): the first place that
    // does not cross into the next region, so that every buffer stays within one.
    for (auto it = free_ranges_.begin(); it != free_ranges_.end(); ++it) {
      const uint64_t end = it->first + it->second;
      uint64_t at = it->first;
      if (at / region_bytes_ != (at + bytes - 1) / region_bytes_)
        at = (at / region_bytes_ + 1) * region_bytes_;
      if (at + bytes > end) continue;
      carve_locked(it, at, bytes);
      return at;
    }
    return std::nullopt;
  }
  for (auto it = free_ranges_.begin(); it != free_ranges_.end(); ++it) {
    if (it->second < bytes) continue;
    const uint64_t offset = it->first;
    carve_locked(it, offset, bytes);
    return offset;
  }
  return std::nullopt;
}

void SendPoolCore::carve_locked(std::map<uint64_t, uint64_t>::iterator it, uint64_t offset, uint64_t bytes) {
  const uint64_t begin = it->first, end = it->first + it->second;
  PD_CHECK(begin <= offset && offset + bytes <= end);
  free_ranges_.erase(it);
  if (offset > begin) free_ranges_[begin] = offset - begin;
  if (offset + bytes < end) free_ranges_[offset + bytes] = end - offset - bytes;
}

void SendPoolCore::deallocate_locked(uint64_t offset, uint64_t bytes) {
  auto next = free_ranges_.lower_bound(offset);
  if (next != free_ranges_.end() && offset + bytes == next->first) {
    bytes += next->second;
    next = free_ranges_.erase(next);
  }
  if (next != free_ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      prev->second += bytes;
      return;
    }
  }
  free_ranges_[offset] = bytes;
}

int32_t SendPoolCore::pick_slot_locked() const {
  // Never-used slots first, then released ones, expired ones last: a stale handle keeps its
  // precise error ("lease expired") as long as possible.
  int32_t best = -1;
  int best_rank = 4;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (holds_buffer(s.state) || s.pins > 0) continue;
    const int rank = s.state == SlotState::kFree ? 0 : s.state == SlotState::kReleased ? 1 : 2;
    if (rank < best_rank) {
      best = static_cast<int32_t>(i);
      best_rank = rank;
    }
  }
  return best;
}

void SendPoolCore::notify_locked(uint32_t id, const Slot& slot) {
  if (!listener_) return;
  listener_(id, SlotSnapshot{slot.state, slot.generation, slot.mode, slot.offset, slot.bytes,
                             slot.layers_ready, slot.first_token});
}

bool SendPoolCore::expired_locked(const Slot& slot, int64_t now) const {
  // A buffer still being written belongs to its writer, which releases it; the lease is for the
  // peers that may never pull (a sender's lease_from_ms moves on at each commit and progress).
  return slot.state == SlotState::kCommitted && now - slot.lease_from_ms >= config_.lease_ms;
}

void SendPoolCore::free_storage_locked(Slot& slot) {
  if (slot.pins > 0) return;  // the last unpin frees it
  if (slot.reserved > 0) {
    deallocate_locked(slot.offset - config_.message_lead, slot.reserved);
    bytes_in_use_ -= slot.reserved;
    slot.reserved = 0;
  }
  slot.paged.reset();
}

void SendPoolCore::expire_locked(uint32_t id, Slot& slot) {
  PD_LOG_WARN("KV send buffer {} (generation {}, {} bytes) reclaimed: not released within its {} ms lease",
              id, slot.generation, slot.bytes, config_.lease_ms);
  slot.state = SlotState::kExpired;
  ++counters_.leases_expired_total;
  free_storage_locked(slot);
  notify_locked(id, slot);
  progress_.notify_all();
}

int32_t SendPoolCore::reclaim_expired() {
  std::lock_guard lock(mu_);
  const int64_t now = now_ms();
  int32_t n = 0;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (expired_locked(slots_[i], now)) {
      expire_locked(static_cast<uint32_t>(i), slots_[i]);
      ++n;
    }
  }
  return n;
}

StatusOr<SendPoolCore::Acquired> SendPoolCore::acquire(uint64_t bytes) {
  if (bytes < kKvWireHeaderBytes)
    return invalid_argument(fmt::format("a KV send buffer needs at least {} bytes (the header), asked for {}",
                                        kKvWireHeaderBytes, bytes));
  if (bytes > config_.capacity_bytes)
    return resource_exhausted(
        fmt::format("a KV send buffer of {} bytes exceeds the pool's capacity of {} bytes", bytes,
                    config_.capacity_bytes));
  std::lock_guard lock(mu_);
  const int64_t now = now_ms();
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (expired_locked(slots_[i], now)) expire_locked(static_cast<uint32_t>(i), slots_[i]);
  }
  const int32_t id = pick_slot_locked();
  if (id < 0)
    return resource_exhausted(fmt::format("all {} KV send buffers are in use", config_.max_buffers));
  const uint64_t reserved = align_up(config_.message_lead + bytes);
  const std::optional<uint64_t> offset = allocate_locked(reserved);
  if (!offset)
    return resource_exhausted(fmt::format("no room for a {}-byte KV send buffer: {} of {} bytes in use",
                                          bytes, bytes_in_use_, config_.capacity_bytes))
        .with_reason(std::string(kSendPoolNoRoom));
  Slot& s = slots_[static_cast<size_t>(id)];
  s.state = SlotState::kWriting;
  s.generation = next_generation_++;
  s.mode = KvTransferMode::kContiguous;
  s.offset = *offset + config_.message_lead;
  s.bytes = bytes;
  s.reserved = reserved;
  s.lease_from_ms = now;
  s.layers_ready = 0;
  s.first_token = -1;
  bytes_in_use_ += reserved;
  ++counters_.acquired_total;
  notify_locked(static_cast<uint32_t>(id), s);
  return Acquired{{static_cast<uint32_t>(id), s.generation}, s.offset, {data_ + s.offset, bytes}};
}

StatusOr<KvBufferRef> SendPoolCore::expose_paged(std::unique_ptr<PagedSource> source, uint64_t wire_bytes) {
  std::lock_guard lock(mu_);
  const int64_t now = now_ms();
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (expired_locked(slots_[i], now)) expire_locked(static_cast<uint32_t>(i), slots_[i]);
  }
  const int32_t id = pick_slot_locked();
  if (id < 0)
    return resource_exhausted(fmt::format("all {} KV send buffers are in use", config_.max_buffers));
  Slot& s = slots_[static_cast<size_t>(id)];
  s.state = SlotState::kCommitted;
  s.generation = next_generation_++;
  s.mode = KvTransferMode::kBlockFixed;
  s.offset = 0;
  s.bytes = wire_bytes;
  s.reserved = 0;
  s.lease_from_ms = now;
  s.layers_ready = 0;
  s.first_token = -1;
  // The header names the exposure's generation (a stale-buffer guard on the wire too).
  StatusOr<KvWireHeader> header = decode_kv_wire_header(source->header);
  PD_CHECK(header.ok());
  header->generation = s.generation;
  encode_kv_wire_header(*header, source->header);
  s.paged = std::move(source);
  ++counters_.acquired_total;
  notify_locked(static_cast<uint32_t>(id), s);
  return KvBufferRef{static_cast<uint32_t>(id), s.generation};
}

StatusOr<SendPoolCore::Slot*> SendPoolCore::find_locked(KvBufferRef ref, std::string_view action) {
  if (ref.buffer_id >= slots_.size())
    return not_found(fmt::format("cannot {} KV buffer {}: the pool has buffers 0..{}", action, ref.buffer_id,
                                 slots_.size() - 1));
  Slot& s = slots_[ref.buffer_id];
  if (s.generation != ref.generation)
    return not_found(
        fmt::format("cannot {} KV buffer {}: stale handle (generation {}, the buffer is at generation {}: it "
                    "was released and "
                    "reused)",
                    action, ref.buffer_id, ref.generation, s.generation));
  if (expired_locked(s, now_ms())) expire_locked(ref.buffer_id, s);
  if (s.state == SlotState::kExpired)
    return Status(
        StatusCode::kDeadlineExceeded,
        fmt::format("cannot {} KV buffer {} generation {}: lease expired (not released within {} ms, "
                    "reclaimed by the prefill's pool)",
                    action, ref.buffer_id, ref.generation, config_.lease_ms));
  if (s.state == SlotState::kReleased || s.state == SlotState::kFree)
    return not_found(fmt::format("cannot {} KV buffer {} generation {}: already released", action,
                                 ref.buffer_id, ref.generation));
  return &s;
}

Status SendPoolCore::commit(KvBufferRef ref) {
  std::lock_guard lock(mu_);
  PD_ASSIGN_OR_RETURN(Slot * s, find_locked(ref, "commit"));
  if (s->state != SlotState::kWriting)
    return failed_precondition(
        fmt::format("KV buffer {} is {}, not being written", ref.buffer_id, state_name(s->state)));
  s->state = SlotState::kCommitted;
  s->lease_from_ms = now_ms();
  notify_locked(ref.buffer_id, *s);
  return ok_status();
}

Status SendPoolCore::release(KvBufferRef ref) {
  std::unique_lock lock(mu_);
  PD_ASSIGN_OR_RETURN(Slot * s, find_locked(ref, "release"));
  s->state = SlotState::kReleased;
  ++counters_.released_total;
  notify_locked(ref.buffer_id, *s);
  progress_.notify_all();  // layer-wise readers waiting on it give up (and unpin)
  // A local reader still sending from it finishes first (bounded by its I/O timeout).
  unpinned_.wait(lock, [s] { return s->pins == 0; });
  free_storage_locked(*s);
  return ok_status();
}

StatusOr<PinnedBuffer> SendPoolCore::pin(KvBufferRef ref, KvTransferMode mode) {
  std::lock_guard lock(mu_);
  PD_ASSIGN_OR_RETURN(Slot * s, find_locked(ref, "pull"));
  if (s->state != SlotState::kCommitted)
    return failed_precondition(fmt::format("cannot pull KV buffer {}: it is {}, not committed yet",
                                           ref.buffer_id, state_name(s->state)));
  if (s->mode != mode)
    return invalid_argument(fmt::format("cannot pull KV buffer {} as {}: it was published as {}",
                                        ref.buffer_id, transfer_mode_name(mode),
                                        transfer_mode_name(s->mode)));
  ++s->pins;
  PinnedBuffer p;
  p.mode = s->mode;
  if (s->mode == KvTransferMode::kContiguous) {
    p.bytes = {data_ + s->offset, s->bytes};
  } else {
    p.paged = s->paged.get();
  }
  return p;
}

void SendPoolCore::unpin(uint32_t buffer_id) {
  std::lock_guard lock(mu_);
  PD_CHECK(buffer_id < slots_.size());
  Slot& s = slots_[buffer_id];
  PD_CHECK(s.pins > 0);
  if (--s.pins == 0) {
    if (!holds_buffer(s.state)) free_storage_locked(s);
    unpinned_.notify_all();
  }
}

Status SendPoolCore::set_progress(KvBufferRef ref, int32_t layers_ready, int32_t first_token) {
  std::lock_guard lock(mu_);
  PD_ASSIGN_OR_RETURN(Slot * s, find_locked(ref, "publish progress of"));
  if (s->state != SlotState::kCommitted || s->mode != KvTransferMode::kContiguous)
    return failed_precondition(
        fmt::format("KV buffer {} is {}: progress is for a committed contiguous buffer", ref.buffer_id,
                    state_name(s->state)));
  if (layers_ready < s->layers_ready)
    return invalid_argument(fmt::format("KV buffer {}: {} layers ready, fewer than the {} published before",
                                        ref.buffer_id, layers_ready, s->layers_ready));
  s->layers_ready = layers_ready;
  if (first_token >= 0) s->first_token = first_token;
  s->lease_from_ms = now_ms();  // its writer is alive: the lease counts from here
  notify_locked(ref.buffer_id, *s);
  progress_.notify_all();
  return ok_status();
}

StatusOr<SendPoolCore::Progress> SendPoolCore::wait_progress(KvBufferRef ref, int32_t layers,
                                                             bool need_first_token, int64_t timeout_ms,
                                                             const std::atomic<bool>* cancelled) {
  std::unique_lock lock(mu_);
  using Clock = std::chrono::steady_clock;
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  int32_t seen = -1;
  for (;;) {
    PD_ASSIGN_OR_RETURN(Slot * s, find_locked(ref, "pull"));
    if (s->state != SlotState::kCommitted)
      return failed_precondition(
          fmt::format("KV buffer {} is {}: its prefill gave it up before it was complete", ref.buffer_id,
                      state_name(s->state)));
    if (s->layers_ready >= layers && (!need_first_token || s->first_token >= 0))
      return Progress{s->layers_ready, s->first_token};
    if (s->layers_ready != seen) {  // the timeout counts from the latest progress
      seen = s->layers_ready;
      deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    }
    if (cancelled && cancelled->load()) return Status(StatusCode::kCancelled, "the pull was cancelled");
    const auto now = Clock::now();
    if (now >= deadline)
      return Status(StatusCode::kDeadlineExceeded,
                    fmt::format("KV buffer {}: the prefill published no progress for {} ms ({} layers ready, "
                                "waiting for {}{})",
                                ref.buffer_id, timeout_ms, s->layers_ready, layers,
                                need_first_token ? " and the first token" : ""));
    progress_.wait_until(lock, std::min(deadline, now + std::chrono::milliseconds(5)));
  }
}

void SendPoolCore::count_pull(bool ok) {
  std::lock_guard lock(mu_);
  if (ok) {
    ++counters_.pulls_served_total;
  } else {
    ++counters_.pull_errors_total;
  }
}

KvSendPoolStats SendPoolCore::stats() const {
  std::lock_guard lock(mu_);
  KvSendPoolStats st = counters_;
  st.capacity_bytes = config_.capacity_bytes;
  st.max_buffers = config_.max_buffers;
  st.bytes_in_use = bytes_in_use_;
  st.buffers_in_use = 0;
  for (const Slot& s : slots_) st.buffers_in_use += holds_buffer(s.state) ? 1 : 0;
  return st;
}

}  // namespace pdserve::transfer_internal

namespace pdserve {

uint64_t kv_send_buffer_bytes(uint64_t message_bytes) {
  return transfer_internal::align_up(message_bytes + kKvSendBufferLeadMax);
}

}  // namespace pdserve

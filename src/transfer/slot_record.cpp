#include "transfer/slot_record.h"

#include <fmt/format.h>

namespace pdserve::transfer_internal {

std::string_view slot_state_name(uint32_t state) {
  switch (static_cast<SlotState>(state)) {
    case SlotState::kFree: return "free";
    case SlotState::kWriting: return "being written";
    case SlotState::kCommitted: return "committed";
    case SlotState::kReleased: return "released";
    case SlotState::kExpired: return "expired";
  }
  return "in an unknown state";
}

void write_slot_record(uint8_t* record, const SlotSnapshot& slot) {
  auto state = field<uint32_t>(record, kRecState);
  if (slot.state != SlotState::kCommitted) {
    state.store(static_cast<uint32_t>(slot.state), std::memory_order_relaxed);
    seqlock_fence(std::memory_order_release);
  }
  field<uint64_t>(record, kRecGeneration).store(slot.generation, std::memory_order_relaxed);
  field<uint32_t>(record, kRecMode).store(static_cast<uint32_t>(slot.mode), std::memory_order_relaxed);
  field<uint64_t>(record, kRecOffset).store(slot.offset, std::memory_order_relaxed);
  field<uint64_t>(record, kRecBytes).store(slot.bytes, std::memory_order_relaxed);
  // Progress: the token first, then the layer count, each after what it vouches for.
  field<int32_t>(record, kRecFirstToken).store(slot.first_token, std::memory_order_release);
  field<int32_t>(record, kRecLayersReady).store(slot.layers_ready, std::memory_order_release);
  if (slot.state == SlotState::kCommitted)
    state.store(static_cast<uint32_t>(slot.state), std::memory_order_release);
}

Status check_slot_record(const uint8_t* record, const KvHandle& handle, KvTransferMode mode, uint64_t* offset,
                         uint64_t* bytes) {
  const uint32_t state = field<uint32_t>(record, kRecState).load(std::memory_order_acquire);
  const uint64_t generation = field<uint64_t>(record, kRecGeneration).load(std::memory_order_acquire);
  if (generation != handle.generation)
    return not_found(
        fmt::format("stale handle: KV buffer {} is at generation {}, the handle has {} (it was "
                    "released and reused)",
                    handle.buffer_id, generation, handle.generation));
  if (state == static_cast<uint32_t>(SlotState::kExpired))
    return Status(StatusCode::kDeadlineExceeded,
                  fmt::format("KV buffer {} generation {}: lease expired (reclaimed by the prefill's pool)",
                              handle.buffer_id, handle.generation));
  if (state != static_cast<uint32_t>(SlotState::kCommitted))
    return failed_precondition(fmt::format("KV buffer {} generation {} is {}", handle.buffer_id,
                                           handle.generation, slot_state_name(state)));
  const uint32_t rec_mode = field<uint32_t>(record, kRecMode).load(std::memory_order_relaxed);
  if (rec_mode != static_cast<uint32_t>(mode))
    return invalid_argument(fmt::format("KV buffer {} was published as mode {}, the handle asks {}",
                                        handle.buffer_id, rec_mode, transfer_mode_name(mode)));
  *offset = field<uint64_t>(record, kRecOffset).load(std::memory_order_relaxed);
  *bytes = field<uint64_t>(record, kRecBytes).load(std::memory_order_relaxed);
  return ok_status();
}

SlotProgress read_slot_progress(const uint8_t* record) {
  SlotProgress p;
  p.layers_ready = field<int32_t>(record, kRecLayersReady).load(std::memory_order_acquire);
  p.first_token = field<int32_t>(record, kRecFirstToken).load(std::memory_order_acquire);
  return p;
}

Status check_slot_unchanged(const uint8_t* record, const KvHandle& handle) {
  seqlock_fence(std::memory_order_acquire);
  const uint32_t state = field<uint32_t>(record, kRecState).load(std::memory_order_relaxed);
  const uint64_t generation = field<uint64_t>(record, kRecGeneration).load(std::memory_order_relaxed);
  if (state != static_cast<uint32_t>(SlotState::kCommitted) || generation != handle.generation)
    return failed_precondition(fmt::format(
        "KV buffer {} generation {} was {} while the decode read it (now generation {}): the "
        "KV in the target is unusable",
        handle.buffer_id, handle.generation,
        state == static_cast<uint32_t>(SlotState::kExpired) ? "reclaimed (lease expired)" : "released",
        generation));
  return ok_status();
}

}  // namespace pdserve::transfer_internal

// Slot records in shared memory (internal to src/transfer): how a pool whose buffers another
// process reads (shm, cuda-ipc) publishes each buffer's state, and how that reader checks a
// handle against it before and after it reads the buffer — a seqlock, since the prefill may
// release, reclaim or reuse a buffer while a decode reads it.
//
// A record is 64 little-endian bytes: u64 generation, u32 state (SlotState), u32 mode
// (KvTransferMode), u64 offset and u64 bytes of the buffer in the pool's range, then a layer-wise
// buffer's progress: i32 layers ready and i32 first token (-1: not yet); the rest is zero. The
// pool writes it (write_slot_record, from its SlotListener); readers only load.
// NOTE: records of pools older than the progress fields read as 0 layers ready, which only a
// layer-wise pull waits on, and those pools never send layer-wise.
// Thread-safe: atomic accesses to shared memory.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/status.h"
#include "transfer/kv_transport.h"
#include "transfer/send_pool_core.h"

namespace pdserve::transfer_internal {

inline constexpr uint64_t kSlotRecordBytes = 64;
inline constexpr size_t kRecGeneration = 0, kRecState = 8, kRecMode = 12, kRecOffset = 16, kRecBytes = 24,
                        kRecLayersReady = 32, kRecFirstToken = 36;

// Atomic views of fields in shared memory. Loads from a read-only mapping are plain loads.
template <typename T>
std::atomic_ref<T> field(const uint8_t* base, size_t offset) {
  return std::atomic_ref<T>(*reinterpret_cast<T*>(const_cast<uint8_t*>(base + offset)));
}

// Fences of the seqlock over slot records. NOTE: ThreadSanitizer does not model fences (GCC
// refuses them under -fsanitize=thread); there a compiler barrier stands in, which is enough on
// x86-64 (stores are not reordered with stores, nor loads with loads). The records are shared
// with other processes, which TSan does not see anyway.
inline void seqlock_fence(std::memory_order order) {
#if defined(__SANITIZE_THREAD__)
  std::atomic_signal_fence(order);
#else
  std::atomic_thread_fence(order);
#endif
}

std::string_view slot_state_name(uint32_t state);

// Mirrors a slot change into its record: a buffer leaving the committed state has its state
// written first, one entering it last, so a reader's final check sees any change.
void write_slot_record(uint8_t* record, const SlotSnapshot& slot);

// Why the record is not the committed buffer of this mode the handle names (stale generation,
// lease expired, not committed, other mode); on success its offset and size.
Status check_slot_record(const uint8_t* record, const KvHandle& handle, KvTransferMode mode, uint64_t* offset,
                         uint64_t* bytes);

// A layer-wise buffer's progress as the record says (acquire: the layers it counts are readable).
struct SlotProgress {
  int32_t layers_ready = 0;
  int32_t first_token = -1;
};
SlotProgress read_slot_progress(const uint8_t* record);

// After the read: fails if the buffer was released, reclaimed or reused meanwhile (the data read
// is then unusable).
Status check_slot_unchanged(const uint8_t* record, const KvHandle& handle);

}  // namespace pdserve::transfer_internal

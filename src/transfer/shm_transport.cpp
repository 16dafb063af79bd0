// shm: the pool's buffers live in one shared-memory file; the decode maps it once and scatters
// straight from it.
//
// Segment layout (little-endian; regions page-aligned; the decode validates all of it):
//   [0, 128)              segment header: magic "PDKS", version 1, max_buffers, num_channels,
//                         table/mailbox/data offsets and sizes, channel stride and slot size
//   [128, ctrl)           slot records, 64 bytes per buffer, written by the prefill only:
//                         u64 generation, u32 state (SlotState), u32 mode, u64 offset, u64 bytes
//   [ctrl, data_offset)   mailbox, writable by decodes: a u32 doorbell, then the block-fixed
//                         channels (128-byte header + a slot for one (block, layer) piece)
//   [data_offset, end)    the buffers' bytes
// The decode maps the whole file read-only and only the mailbox read-write.
//
// Contiguous pull, seqlock style: read the record (state committed, generation = the handle's),
// validate offset and size against the segment, decode and check the header, scatter, then read
// the record again; if the buffer was released, reclaimed or reused meanwhile the pull fails
// (the target's contents are then unusable). A layer-wise buffer is committed before its body is
// written: the puller scatters each layer once the record's progress counts it (polling the
// record, backing off to 1 ms), gives up when the buffer leaves the committed state, when the
// segment's path no longer names it (a memfd segment's owner has exited) or when no progress
// comes within the I/O timeout, and takes the first token from the record at the end. The prefill writes a
// record's state before its other fields when a buffer leaves the committed state, and after them when it
// enters it.
//
// Block-fixed pull (the baseline): a decode claims a channel (CAS owner 0 → its pid; a dead
// owner's channel is taken over), writes buffer id and generation, bumps the channel's
// request_seq and the doorbell. The pool's server thread answers message by message in the
// channel's slot — the header, then each (block, layer) piece — bumping ready_seq; the decode
// scatters each and bumps ack_seq (or answers abort). Waits spin briefly, then sleep on a futex
// in the shared page (FUTEX_WAIT without the private flag works across processes). Each message
// names the request it answers (reply_to), so a late message of an abandoned pull is never
// taken for the next one's.
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <thread>
#include <unordered_map>

#include "common/log.h"
#include "transfer/byte_order.h"
#include "transfer/memory.h"
#include "transfer/net.h"
#include "transfer/pull_common.h"
#include "transfer/slot_record.h"
#include "transfer/transports.h"

namespace pdserve::transfer_internal {
namespace {

constexpr uint32_t kSegmentMagic = 0x534B4450;  // "PDKS"
constexpr uint32_t kSegmentVersion = 1;
constexpr uint64_t kPageBytes = 4096;
constexpr uint64_t kSegmentHeaderBytes = 128;
constexpr uint64_t kMailboxHeaderBytes = 64;
constexpr uint64_t kChannelHeaderBytes = 128;
constexpr uint32_t kMaxSegmentBuffers = 1 << 20;
constexpr uint32_t kMaxSegmentChannels = 1024;
constexpr uint32_t kMaxMessageBytes = 1024;

// Segment header offsets.
constexpr size_t kSegMagic = 0, kSegVersion = 4, kSegMaxBuffers = 8, kSegNumChannels = 12,
                 kSegTableOffset = 16, kSegMailboxOffset = 24, kSegMailboxBytes = 32, kSegDataOffset = 40,
                 kSegDataBytes = 48, kSegChannelStride = 56, kSegSlotBytes = 64, kSegTotalBytes = 72;
// Channel header offsets.
constexpr size_t kChOwner = 0, kChRequestSeq = 4, kChReadySeq = 8, kChAckSeq = 12, kChBufferId = 16,
                 kChAckCode = 20, kChGeneration = 24, kChMsgKind = 32, kChMsgBytes = 36, kChBlockIdx = 40,
                 kChLayer = 44, kChBlockSize = 48, kChStatusCode = 52, kChReplyTo = 56;

enum MsgKind : uint32_t { kMsgHeader = 1, kMsgPiece = 2, kMsgError = 3 };
constexpr uint32_t kAckGo = 1;
constexpr uint32_t kAckAbort = 2;

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

void futex_wait(const uint8_t* word, uint32_t expected, int64_t timeout_ms) {
  timespec ts{static_cast<time_t>(timeout_ms / 1000), static_cast<long>((timeout_ms % 1000) * 1000000)};
  ::syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake(const uint8_t* word) { ::syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

using Clock = std::chrono::steady_clock;

// Waits until the u32 at `word` equals `target`: spins a little (the peer usually answers within
// microseconds on another core), then sleeps on the futex. False when the deadline passes first.
bool wait_for_u32(const uint8_t* word, uint32_t target, Clock::time_point deadline,
                  const std::atomic<bool>* stop = nullptr) {
  auto a = field<uint32_t>(word, 0);
  for (int i = 0; i < 2000; ++i) {
    if (a.load(std::memory_order_acquire) == target) return true;
    cpu_relax();
  }
  for (;;) {
    const uint32_t v = a.load(std::memory_order_acquire);
    if (v == target) return true;
    if (stop && stop->load()) return false;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    futex_wait(word, v, std::min<int64_t>(left, 100));
  }
}

void bump_and_wake(uint8_t* word, uint32_t value) {
  field<uint32_t>(word, 0).store(value, std::memory_order_release);
  futex_wake(word);
}

struct SegmentGeometry {
  uint32_t max_buffers = 0;
  uint32_t num_channels = 0;
  uint64_t table_offset = 0;
  uint64_t mailbox_offset = 0;
  uint64_t mailbox_bytes = 0;
  uint64_t data_offset = 0;
  uint64_t data_bytes = 0;
  uint64_t channel_stride = 0;
  uint64_t slot_bytes = 0;
  uint64_t total_bytes = 0;

  uint64_t record(uint32_t id) const { return table_offset + uint64_t{id} * kSlotRecordBytes; }
  // Offset of channel c from the start of the mailbox.
  uint64_t channel(uint32_t c) const { return kMailboxHeaderBytes + uint64_t{c} * channel_stride; }
};

void write_geometry(uint8_t* p, const SegmentGeometry& g) {
  store_le<uint32_t>(p + kSegMagic, kSegmentMagic);
  store_le<uint32_t>(p + kSegVersion, kSegmentVersion);
  store_le<uint32_t>(p + kSegMaxBuffers, g.max_buffers);
  store_le<uint32_t>(p + kSegNumChannels, g.num_channels);
  store_le<uint64_t>(p + kSegTableOffset, g.table_offset);
  store_le<uint64_t>(p + kSegMailboxOffset, g.mailbox_offset);
  store_le<uint64_t>(p + kSegMailboxBytes, g.mailbox_bytes);
  store_le<uint64_t>(p + kSegDataOffset, g.data_offset);
  store_le<uint64_t>(p + kSegDataBytes, g.data_bytes);
  store_le<uint64_t>(p + kSegChannelStride, g.channel_stride);
  store_le<uint64_t>(p + kSegSlotBytes, g.slot_bytes);
  store_le<uint64_t>(p + kSegTotalBytes, g.total_bytes);
}

// Reads and checks a peer's segment header against the file's real size.
StatusOr<SegmentGeometry> read_geometry(const uint8_t* p, uint64_t file_bytes) {
  if (load_le<uint32_t>(p + kSegMagic) != kSegmentMagic)
    return data_loss(fmt::format("not a KV segment: magic 0x{:08x}, expected 0x{:08x}",
                                 load_le<uint32_t>(p + kSegMagic), kSegmentMagic));
  if (load_le<uint32_t>(p + kSegVersion) != kSegmentVersion)
    return unimplemented(fmt::format("KV segment version {} is not supported (this build speaks {})",
                                     load_le<uint32_t>(p + kSegVersion), kSegmentVersion));
  SegmentGeometry g;
  g.max_buffers = load_le<uint32_t>(p + kSegMaxBuffers);
  g.num_channels = load_le<uint32_t>(p + kSegNumChannels);
  g.table_offset = load_le<uint64_t>(p + kSegTableOffset);
  g.mailbox_offset = load_le<uint64_t>(p + kSegMailboxOffset);
  g.mailbox_bytes = load_le<uint64_t>(p + kSegMailboxBytes);
  g.data_offset = load_le<uint64_t>(p + kSegDataOffset);
  g.data_bytes = load_le<uint64_t>(p + kSegDataBytes);
  g.channel_stride = load_le<uint64_t>(p + kSegChannelStride);
  g.slot_bytes = load_le<uint64_t>(p + kSegSlotBytes);
  g.total_bytes = load_le<uint64_t>(p + kSegTotalBytes);
  auto bad = [&](std::string_view why) {
    return data_loss(fmt::format("corrupt KV segment header: {} (file of {} bytes)", why, file_bytes));
  };
  if (g.total_bytes != file_bytes) return bad(fmt::format("total size {}", g.total_bytes));
  if (g.max_buffers < 1 || g.max_buffers > kMaxSegmentBuffers)
    return bad(fmt::format("max_buffers {}", g.max_buffers));
  if (g.num_channels > kMaxSegmentChannels) return bad(fmt::format("num_channels {}", g.num_channels));
  if (g.table_offset != kSegmentHeaderBytes) return bad(fmt::format("table offset {}", g.table_offset));
  if (g.mailbox_offset % kPageBytes != 0 || g.data_offset % kPageBytes != 0) return bad("unaligned region");
  if (g.mailbox_offset < g.table_offset + uint64_t{g.max_buffers} * kSlotRecordBytes)
    return bad("mailbox overlaps the slot records");
  if (g.slot_bytes > (uint64_t{1} << 32) || g.channel_stride % 64 != 0 ||
      g.channel_stride < kChannelHeaderBytes + g.slot_bytes)
    return bad(fmt::format("channel stride {} for slots of {} bytes", g.channel_stride, g.slot_bytes));
  if (g.mailbox_bytes < kMailboxHeaderBytes + uint64_t{g.num_channels} * g.channel_stride ||
      g.mailbox_bytes > file_bytes || g.mailbox_offset > file_bytes - g.mailbox_bytes ||
      g.mailbox_bytes % kPageBytes != 0)
    return bad(fmt::format("mailbox [{}, +{})", g.mailbox_offset, g.mailbox_bytes));
  if (g.data_offset < g.mailbox_offset + g.mailbox_bytes || g.data_bytes > file_bytes ||
      g.data_offset > file_bytes - g.data_bytes)
    return bad(fmt::format("data region [{}, +{})", g.data_offset, g.data_bytes));
  return g;
}

class ShmSendPool final : public CoreSendPool {
 public:
  static StatusOr<std::unique_ptr<KvSendPool>> create(const KvTransportOptions& options) {
    if (options.max_buffers < 1 || static_cast<uint32_t>(options.max_buffers) > kMaxSegmentBuffers)
      return invalid_argument(
          fmt::format("max_buffers {} is outside [1, {}]", options.max_buffers, kMaxSegmentBuffers));
    if (options.shm_block_fixed_channels < 0 ||
        static_cast<uint32_t>(options.shm_block_fixed_channels) > kMaxSegmentChannels)
      return invalid_argument(fmt::format("shm_block_fixed_channels {} is outside [0, {}]",
                                          options.shm_block_fixed_channels, kMaxSegmentChannels));
    if (options.shm_block_fixed_slot_bytes > (uint64_t{1} << 32))
      return invalid_argument("shm_block_fixed_slot_bytes exceeds 4 GiB");
    SegmentGeometry g;
    g.max_buffers = static_cast<uint32_t>(options.max_buffers);
    g.num_channels = static_cast<uint32_t>(options.shm_block_fixed_channels);
    g.table_offset = kSegmentHeaderBytes;
    g.mailbox_offset = round_up(kSegmentHeaderBytes + uint64_t{g.max_buffers} * kSlotRecordBytes, kPageBytes);
    g.slot_bytes = options.shm_block_fixed_slot_bytes;
    g.channel_stride = round_up(kChannelHeaderBytes + g.slot_bytes, 64);
    g.mailbox_bytes = round_up(kMailboxHeaderBytes + uint64_t{g.num_channels} * g.channel_stride, kPageBytes);
    g.data_offset = g.mailbox_offset + g.mailbox_bytes;
    g.data_bytes = round_up(options.pool_capacity_bytes, kPageBytes);
    g.total_bytes = g.data_offset + g.data_bytes;

    auto pool = std::unique_ptr<ShmSendPool>(new ShmSendPool(options, g));
    PD_ASSIGN_OR_RETURN(pool->segment_, SharedSegment::create(g.total_bytes, options.shm_backing, false));
    uint8_t* base = pool->segment_.data();
    if (options.prefault_pool) prefault_pages(base, g.total_bytes);
    write_geometry(base, g);
    pool->core_ = std::make_unique<SendPoolCore>(
        core_config(options), base + g.data_offset,
        [p = pool.get()](uint32_t id, const SlotSnapshot& s) { p->mirror(id, s); });
    if (g.num_channels > 0) pool->server_ = std::thread([p = pool.get()] { p->serve_loop(); });
    return std::unique_ptr<KvSendPool>(std::move(pool));
  }

  ~ShmSendPool() override {
    stop_.store(true);
    if (server_.joinable()) {
      uint8_t* doorbell = segment_.data() + geometry_.mailbox_offset;
      field<uint32_t>(doorbell, 0).fetch_add(1, std::memory_order_release);
      futex_wake(doorbell);
      server_.join();
    }
  }

  TransportKind kind() const override { return TransportKind::kShm; }
  std::span<uint8_t> host_memory() const override { return {segment_.data(), segment_.size()}; }
  std::string endpoint() const override { return segment_.path(); }
  bool supports_layer_wise() const override { return true; }

  StatusOr<KvHandle> expose_paged(const PagedKvView& view, std::span<const int32_t> block_table,
                                  int32_t num_tokens, uint32_t flags) override {
    if (geometry_.num_channels == 0)
      return failed_precondition("this shm pool has no block-fixed channels (shm_block_fixed_channels = 0)");
    const uint64_t piece = 2 * static_cast<uint64_t>(view.block_size) * view.layout.row_bytes();
    if (piece > geometry_.slot_bytes)
      return invalid_argument(
          fmt::format("a (block, layer) piece of {} bytes exceeds the block-fixed slot of {} bytes "
                      "(raise shm_block_fixed_slot_bytes)",
                      piece, geometry_.slot_bytes));
    PD_ASSIGN_OR_RETURN(std::unique_ptr<PagedSource> source,
                        make_paged_source(view, block_table, num_tokens, flags));
    const uint64_t bytes = kKvWireHeaderBytes + view.layout.body_bytes(num_tokens);
    PD_ASSIGN_OR_RETURN(KvBufferRef ref, core_->expose_paged(std::move(source), bytes));
    return KvHandle{TransportKind::kShm, KvTransferMode::kBlockFixed,
                    segment_.path(),     ref.buffer_id,
                    ref.generation,      bytes};
  }

 private:
  ShmSendPool(const KvTransportOptions& options, const SegmentGeometry& g)
      : geometry_(g), io_timeout_ms_(options.io_timeout_ms), served_(g.num_channels, 0) {}

  // Called by the core, under its lock, on every slot change.
  void mirror(uint32_t id, const SlotSnapshot& s) {
    write_slot_record(segment_.data() + geometry_.record(id), s);
  }

  uint8_t* channel(uint32_t c) const {
    return segment_.data() + geometry_.mailbox_offset + geometry_.channel(c);
  }

  void serve_loop() {
    const uint8_t* doorbell = segment_.data() + geometry_.mailbox_offset;
    auto bell = field<uint32_t>(doorbell, 0);
    while (!stop_.load()) {
      const uint32_t seen = bell.load(std::memory_order_acquire);
      for (uint32_t c = 0; c < geometry_.num_channels && !stop_.load(); ++c) {
        const uint32_t req = field<uint32_t>(channel(c), kChRequestSeq).load(std::memory_order_acquire);
        if (req != served_[c]) {
          served_[c] = req;
          serve_channel(c, req);
        }
      }
      futex_wait(doorbell, seen, 1000);
    }
  }

  // Puts a message into the channel and waits for the decode's ack (unless `no_ack`).
  // False when the decode aborted or went silent.
  bool post(uint8_t* ch, uint32_t* ready, bool no_ack) {
    ++*ready;
    bump_and_wake(ch + kChReadySeq, *ready);
    if (no_ack) return true;
    const auto deadline = Clock::now() + std::chrono::milliseconds(io_timeout_ms_);
    if (!wait_for_u32(ch + kChAckSeq, *ready, deadline, &stop_)) return false;
    return field<uint32_t>(ch, kChAckCode).load(std::memory_order_relaxed) == kAckGo;
  }

  void serve_channel(uint32_t c, uint32_t req) {
    uint8_t* ch = channel(c);
    uint8_t* slot = ch + kChannelHeaderBytes;
    uint32_t ready = field<uint32_t>(ch, kChReadySeq).load(std::memory_order_relaxed);
    const KvBufferRef ref{field<uint32_t>(ch, kChBufferId).load(std::memory_order_relaxed),
                          field<uint64_t>(ch, kChGeneration).load(std::memory_order_relaxed)};
    field<uint32_t>(ch, kChReplyTo).store(req, std::memory_order_relaxed);
    StatusOr<PinnedBuffer> pinned = core_->pin(ref, KvTransferMode::kBlockFixed);
    if (!pinned.ok()) {
      core_->count_pull(false);
      const std::string msg =
          pinned.status().message().substr(0, std::min<uint64_t>(kMaxMessageBytes, geometry_.slot_bytes));
      std::memcpy(slot, msg.data(), msg.size());
      field<uint32_t>(ch, kChMsgKind).store(kMsgError, std::memory_order_relaxed);
      field<uint32_t>(ch, kChMsgBytes).store(static_cast<uint32_t>(msg.size()), std::memory_order_relaxed);
      field<uint32_t>(ch, kChStatusCode)
          .store(static_cast<uint32_t>(pinned.status().code()), std::memory_order_relaxed);
      post(ch, &ready, true);
      return;
    }
    const PagedSource& src = *pinned->paged;
    const PagedKvView& v = src.view;
    const uint64_t row = v.layout.row_bytes();
    const uint64_t bs = static_cast<uint64_t>(v.block_size);
    std::memcpy(slot, src.header.data(), kKvWireHeaderBytes);
    field<uint32_t>(ch, kChMsgKind).store(kMsgHeader, std::memory_order_relaxed);
    field<uint32_t>(ch, kChMsgBytes).store(kKvWireHeaderBytes, std::memory_order_relaxed);
    field<uint32_t>(ch, kChBlockSize).store(static_cast<uint32_t>(bs), std::memory_order_relaxed);
    bool ok = post(ch, &ready, false);
    const uint64_t tokens = static_cast<uint64_t>(src.num_tokens);
    const uint64_t num_blocks = (tokens + bs - 1) / bs;
    for (uint64_t b = 0; ok && b < num_blocks; ++b) {
      const uint64_t n = std::min(bs, tokens - b * bs);
      const uint8_t* block = v.base + static_cast<uint64_t>(src.block_table[b]) * v.block_bytes;
      for (int32_t l = 0; ok && l < v.layout.num_layers; ++l) {
        const uint8_t* k = block + 2 * static_cast<uint64_t>(l) * bs * row;
        std::memcpy(slot, k, n * row);
        std::memcpy(slot + n * row, k + bs * row, n * row);
        field<uint32_t>(ch, kChMsgKind).store(kMsgPiece, std::memory_order_relaxed);
        field<uint32_t>(ch, kChMsgBytes).store(static_cast<uint32_t>(2 * n * row), std::memory_order_relaxed);
        field<uint32_t>(ch, kChBlockIdx).store(static_cast<uint32_t>(b), std::memory_order_relaxed);
        field<uint32_t>(ch, kChLayer).store(static_cast<uint32_t>(l), std::memory_order_relaxed);
        ok = post(ch, &ready, false);
      }
    }
    core_->unpin(ref.buffer_id);
    core_->count_pull(ok);
  }

  const SegmentGeometry geometry_;
  const int64_t io_timeout_ms_;
  SharedSegment segment_;
  std::atomic<bool> stop_{false};
  std::vector<uint32_t> served_;  // last request_seq served per channel; server thread only
  std::thread server_;
};

// One mapped peer segment (decode side).
struct MappedSegment {
  PeerSegment file;            // the whole file, read-only
  uint8_t* mailbox = nullptr;  // the mailbox, read-write
  SegmentGeometry geometry;
  const uint8_t* base() const { return file.data(); }

  MappedSegment() = default;
  MappedSegment(const MappedSegment&) = delete;
  MappedSegment& operator=(const MappedSegment&) = delete;
  ~MappedSegment() {
    if (mailbox) ::munmap(mailbox, geometry.mailbox_bytes);
  }
};

class ShmPuller final : public QueuedPuller {
 public:
  explicit ShmPuller(const KvTransportOptions& options)
      : QueuedPuller(TransportKind::kShm, KvMemory::kHost, kHostPullThreads),
        io_timeout_ms_(options.io_timeout_ms) {}
  ~ShmPuller() override { stop(); }

 protected:
  StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) override {
    PD_ASSIGN_OR_RETURN(std::shared_ptr<const MappedSegment> seg, map_segment(handle.endpoint));
    const std::string peer = fmt::format("prefill segment {}", handle.endpoint);
    StatusOr<PullResult> r = handle.mode == KvTransferMode::kContiguous
                                 ? pull_contiguous(*seg, handle, target)
                                 : pull_block_fixed(*seg, handle, target);
    if (!r.ok()) return r.status().with_context(peer);
    return r;
  }

 private:
  // The segment at `path`, mapped once and shared by the pulls that read it (a mapping dropped
  // here stays until the last of them ends).
  StatusOr<std::shared_ptr<const MappedSegment>> map_segment(const std::string& path) {
    std::lock_guard lock(segments_mu_);
    auto it = segments_.find(path);
    if (it != segments_.end() && it->second->file.same_file(path))
      return std::shared_ptr<const MappedSegment>(it->second);
    if (it != segments_.end()) segments_.erase(it);  // gone, or another file at this path now
    // Drop the mappings of prefills that have gone (their paths vanished or were reused), so a
    // long-lived decode does not keep every segment it ever pulled from.
    std::erase_if(segments_, [](const auto& kv) { return !kv.second->file.same_file(kv.first); });

    auto seg = std::make_shared<MappedSegment>();
    PD_ASSIGN_OR_RETURN(seg->file, PeerSegment::open(path, kPageBytes));
    PD_ASSIGN_OR_RETURN(seg->geometry, read_geometry(seg->base(), seg->file.size()));
    void* rw = ::mmap(nullptr, seg->geometry.mailbox_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                      seg->file.fd(), static_cast<off_t>(seg->geometry.mailbox_offset));
    if (rw == MAP_FAILED)
      return unavailable(
          fmt::format("cannot map the mailbox of KV segment {}: {}", path, std::strerror(errno)));
    seg->mailbox = static_cast<uint8_t*>(rw);
    segments_[path] = seg;
    return std::shared_ptr<const MappedSegment>(std::move(seg));
  }

  // Reads a slot record and says why it is not the committed buffer the handle names.
  static Status check_record(const MappedSegment& seg, const KvHandle& handle, KvTransferMode mode,
                             uint64_t* offset, uint64_t* bytes) {
    const SegmentGeometry& g = seg.geometry;
    if (handle.buffer_id >= g.max_buffers)
      return not_found(
          fmt::format("KV buffer {} does not exist (the segment has {})", handle.buffer_id, g.max_buffers));
    return check_slot_record(seg.base() + g.record(handle.buffer_id), handle, mode, offset, bytes);
  }

  static Status check_unchanged(const MappedSegment& seg, const KvHandle& handle) {
    return check_slot_unchanged(seg.base() + seg.geometry.record(handle.buffer_id), handle);
  }

  StatusOr<PullResult> pull_contiguous(const MappedSegment& seg, const KvHandle& handle,
                                       const KvScatterTarget& target) {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    PD_RETURN_IF_ERROR(check_record(seg, handle, KvTransferMode::kContiguous, &offset, &bytes));
    const SegmentGeometry& g = seg.geometry;
    if (bytes < kKvWireHeaderBytes || bytes > g.data_bytes || offset > g.data_bytes - bytes)
      return data_loss(fmt::format("KV buffer {} record [{}, +{}) lies outside the {}-byte data region",
                                   handle.buffer_id, offset, bytes, g.data_bytes));
    const std::span<const uint8_t> message(seg.base() + g.data_offset + offset, bytes);
    PD_ASSIGN_OR_RETURN(KvWireHeader header, decode_kv_wire_header(message));
    PD_RETURN_IF_ERROR(check_header_for_pull(header, handle, target, bytes, /*layer_wise_ok=*/true));
    const auto body = message.subspan(kKvWireHeaderBytes);
    if (header.flags & kKvWireLayerWise) {
      auto wait = [&](int32_t layers, bool need_token) {
        return wait_progress(seg, handle, layers, need_token);
      };
      PD_ASSIGN_OR_RETURN(int32_t first_token, scatter_layer_wise(body, header, target, wait));
      PD_RETURN_IF_ERROR(check_unchanged(seg, handle));
      return PullResult{header.num_tokens, bytes, first_token};
    }
    PD_RETURN_IF_ERROR(verify_kv_body_checksum(header, body));
    PD_RETURN_IF_ERROR(scatter_reporting(body, 0, header.num_tokens, target));
    PD_RETURN_IF_ERROR(check_unchanged(seg, handle));
    return PullResult{header.num_tokens, bytes};
  }

  // Polls a layer-wise buffer's record until it counts `layers` layers (and the first token).
  StatusOr<LayerProgress> wait_progress(const MappedSegment& seg, const KvHandle& handle, int32_t layers,
                                        bool need_token) {
    const uint8_t* record = seg.base() + seg.geometry.record(handle.buffer_id);
    auto deadline = Clock::now() + std::chrono::milliseconds(io_timeout_ms_);
    int32_t seen = -1;
    int64_t sleep_us = 20;
    for (int polls = 0;; ++polls) {
      PD_RETURN_IF_ERROR(check_unchanged(seg, handle));
      const SlotProgress p = read_slot_progress(record);
      if (p.layers_ready >= layers && (!need_token || p.first_token >= 0))
        return LayerProgress{p.layers_ready, p.first_token};
      if (p.layers_ready != seen) {  // the timeout counts from the latest progress
        seen = p.layers_ready;
        deadline = Clock::now() + std::chrono::milliseconds(io_timeout_ms_);
        sleep_us = 20;
      }
      if (cancel_flag()->load()) return Status(StatusCode::kCancelled, "the pull was cancelled");
      // A memfd segment's path (/proc/<pid>/fd/<fd>) vanishes when its process exits.
      if (polls % 16 == 15 && !seg.file.same_file(handle.endpoint))
        return unavailable(
            fmt::format("the prefill that owns {} has gone before its layer-wise KV was complete "
                        "({} layers ready)",
                        handle.endpoint, p.layers_ready));
      if (Clock::now() >= deadline)
        return Status(
            StatusCode::kDeadlineExceeded,
            fmt::format("the prefill published no progress for {} ms ({} layers ready, waiting for "
                        "{}{})",
                        io_timeout_ms_, p.layers_ready, layers, need_token ? " and the first token" : ""));
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      sleep_us = std::min<int64_t>(sleep_us * 2, 1000);
    }
  }

  // A free channel of the segment: waits (up to the I/O timeout) while all are busy with other
  // pulls, of this process or of other decodes.
  StatusOr<uint32_t> claim_channel(const MappedSegment& seg) {
    const uint32_t me = static_cast<uint32_t>(::getpid());
    const auto deadline = Clock::now() + std::chrono::milliseconds(io_timeout_ms_);
    for (;;) {
      for (uint32_t c = 0; c < seg.geometry.num_channels; ++c) {
        auto owner = field<uint32_t>(seg.mailbox, seg.geometry.channel(c) + kChOwner);
        uint32_t expected = 0;
        if (owner.compare_exchange_strong(expected, me)) return c;
        // Taken over from a process that died holding it (never from a live one).
        if (expected != me && ::kill(static_cast<pid_t>(expected), 0) != 0 && errno == ESRCH &&
            owner.compare_exchange_strong(expected, me))
          return c;
      }
      if (cancel_flag()->load()) return Status(StatusCode::kCancelled, "the pull was cancelled");
      if (Clock::now() >= deadline)
        return resource_exhausted(
            fmt::format("all {} block-fixed channels of the segment stayed busy for {} ms",
                        seg.geometry.num_channels, io_timeout_ms_));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  StatusOr<PullResult> pull_block_fixed(const MappedSegment& seg, const KvHandle& handle,
                                        const KvScatterTarget& target) {
    if (handle.buffer_id >= seg.geometry.max_buffers)
      return not_found(fmt::format("KV buffer {} does not exist (the segment has {})", handle.buffer_id,
                                   seg.geometry.max_buffers));
    PD_ASSIGN_OR_RETURN(uint32_t c, claim_channel(seg));
    uint8_t* ch = seg.mailbox + seg.geometry.channel(c);
    StatusOr<PullResult> r = run_channel(seg, ch, handle, target);
    field<uint32_t>(ch, kChOwner).store(0, std::memory_order_release);
    return r;
  }

  StatusOr<PullResult> run_channel(const MappedSegment& seg, uint8_t* ch, const KvHandle& handle,
                                   const KvScatterTarget& target) {
    const uint8_t* slot = ch + kChannelHeaderBytes;
    const uint64_t slot_bytes = seg.geometry.slot_bytes;
    uint32_t ready = field<uint32_t>(ch, kChReadySeq).load(std::memory_order_acquire);
    field<uint32_t>(ch, kChBufferId).store(handle.buffer_id, std::memory_order_relaxed);
    field<uint64_t>(ch, kChGeneration).store(handle.generation, std::memory_order_relaxed);
    const uint32_t req = field<uint32_t>(ch, kChRequestSeq).load(std::memory_order_relaxed) + 1;
    field<uint32_t>(ch, kChRequestSeq).store(req, std::memory_order_release);
    uint8_t* doorbell = seg.mailbox;
    field<uint32_t>(doorbell, 0).fetch_add(1, std::memory_order_release);
    futex_wake(doorbell);

    // Waits for the next message, which must answer this request and be of `kind`.
    auto next = [&](uint32_t kind) -> Status {
      ++ready;
      const auto deadline = Clock::now() + std::chrono::milliseconds(io_timeout_ms_);
      if (!wait_for_u32(ch + kChReadySeq, ready, deadline))
        return Status(StatusCode::kDeadlineExceeded,
                      fmt::format("no block-fixed message from the prefill within {} ms", io_timeout_ms_));
      const uint32_t reply_to = field<uint32_t>(ch, kChReplyTo).load(std::memory_order_relaxed);
      const uint32_t got = field<uint32_t>(ch, kChMsgKind).load(std::memory_order_relaxed);
      const uint32_t msg_bytes = field<uint32_t>(ch, kChMsgBytes).load(std::memory_order_relaxed);
      if (reply_to != req)
        return data_loss(fmt::format("block-fixed message answers request {}, not {}", reply_to, req));
      if (got == kMsgError) {
        if (msg_bytes > kMaxMessageBytes || msg_bytes > slot_bytes)
          return data_loss(fmt::format("block-fixed error message of {} bytes", msg_bytes));
        const uint32_t code = field<uint32_t>(ch, kChStatusCode).load(std::memory_order_relaxed);
        return peer_status(code, std::string(reinterpret_cast<const char*>(slot), msg_bytes), "prefill");
      }
      if (got != kind) return data_loss(fmt::format("block-fixed message kind {}, expected {}", got, kind));
      return ok_status();
    };
    auto ack = [&](uint32_t code) {
      field<uint32_t>(ch, kChAckCode).store(code, std::memory_order_relaxed);
      bump_and_wake(ch + kChAckSeq, ready);
    };

    PD_RETURN_IF_ERROR(next(kMsgHeader));
    StatusOr<KvWireHeader> header = decode_kv_wire_header({slot, kKvWireHeaderBytes});
    Status checked =
        header.ok() ? check_header_for_pull(*header, handle, target, handle.bytes) : header.status();
    const uint32_t bs = field<uint32_t>(ch, kChBlockSize).load(std::memory_order_relaxed);
    const uint64_t row = checked.ok() ? header->layout.row_bytes() : 0;
    if (checked.ok() && (bs < 1 || 2 * uint64_t{bs} * row > slot_bytes))
      checked =
          data_loss(fmt::format("block-fixed block size {} does not fit the {}-byte slot", bs, slot_bytes));
    if (!checked.ok()) {
      ack(kAckAbort);
      return checked;
    }
    ack(kAckGo);
    const uint64_t tokens = static_cast<uint64_t>(header->num_tokens);
    const uint64_t part = tokens * row;
    const uint64_t num_blocks = (tokens + bs - 1) / bs;
    for (uint64_t b = 0; b < num_blocks; ++b) {
      const uint64_t n = std::min<uint64_t>(bs, tokens - b * bs);
      for (int32_t l = 0; l < header->layout.num_layers; ++l) {
        PD_RETURN_IF_ERROR(next(kMsgPiece));
        const uint32_t got_block = field<uint32_t>(ch, kChBlockIdx).load(std::memory_order_relaxed);
        const uint32_t got_layer = field<uint32_t>(ch, kChLayer).load(std::memory_order_relaxed);
        const uint32_t got_bytes = field<uint32_t>(ch, kChMsgBytes).load(std::memory_order_relaxed);
        if (got_block != b || got_layer != static_cast<uint32_t>(l) || got_bytes != 2 * n * row) {
          ack(kAckAbort);
          return data_loss(
              fmt::format("block-fixed piece (block {}, layer {}, {} bytes) != expected ({}, {}, {})",
                          got_block, got_layer, got_bytes, b, l, 2 * n * row));
        }
        const uint64_t k_offset = 2 * static_cast<uint64_t>(l) * part + b * bs * row;
        PD_RETURN_IF_ERROR(
            scatter_kv_range({slot, n * row}, k_offset, header->num_tokens, target.view, target.block_table));
        PD_RETURN_IF_ERROR(scatter_kv_range({slot + n * row, n * row}, k_offset + part, header->num_tokens,
                                            target.view, target.block_table));
        ack(kAckGo);
      }
    }
    if (header->flags & kKvWireBodyChecksum) {
      const uint64_t computed = scattered_body_checksum(target.view, target.block_table, header->num_tokens);
      if (computed != header->body_checksum)
        return data_loss(
            fmt::format("KV body checksum 0x{:016x} != header's 0x{:016x}", computed, header->body_checksum));
    }
    return PullResult{header->num_tokens, handle.bytes};
  }

  const int64_t io_timeout_ms_;
  std::mutex segments_mu_;
  std::unordered_map<std::string, std::shared_ptr<MappedSegment>> segments_;  // guarded by segments_mu_
};

}  // namespace

StatusOr<std::unique_ptr<KvSendPool>> make_shm_pool(const KvTransportOptions& options) {
  return ShmSendPool::create(options);
}

StatusOr<std::unique_ptr<KvPuller>> make_shm_puller(const KvTransportOptions& options) {
  return std::unique_ptr<KvPuller>(std::make_unique<ShmPuller>(options));
}

}  // namespace pdserve::transfer_internal

// The KV transports of GPU caches (transfer/cuda_transports.h). cuda-ipc: the pool's buffers are
// one device allocation shared through a CUDA IPC handle; the decode's RecvScatter kernel reads
// them in place. Host-staged: a host transport with a copy between GPU and host on each side.
//
// Control segment (a SharedSegment; little-endian; the decode validates all of it):
//   [0, 128)   header: magic "PDKC", version 1, max_buffers, the pool's GPU, a random 64-bit
//              token naming the pool, capacity bytes, and at 64 the 64-byte CUDA IPC handle of
//              the allocation
// A decode trusts none of it for device addresses: the capacity must fit the allocation the
// driver maps, and a pool of its own process (whose handle it cannot open) is found by its token
// in a process-wide registry, which holds the real address and size.
//   [128, ...) slot records, 64 bytes per buffer (transfer/slot_record.h); offsets are into the
//              allocation, of the message itself, which starts 192 bytes into its 4 KiB-aligned
//              buffer so that its body is 256-byte aligned
// The decode starts scattering as soon as the record's size checks against the handle, the tokens
// it expects and its block table, and checks the header, copied beside the scatter, after: a
// header that disagrees fails the pull having written only the target's own blocks, which the
// engine frees (and never offers for prefix reuse) when a pull fails.
#include "transfer/cuda_transports.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <unordered_map>
#include <vector>

#include "common/log.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#include "transfer/byte_order.h"
#include "transfer/memory.h"
#include "transfer/pull_common.h"
#include "transfer/send_pool_core.h"
#include "transfer/slot_record.h"
#include "transfer/transports.h"

namespace pdserve {
namespace {

using transfer_internal::check_fill_buffer;
using transfer_internal::CoreSendPool;
using transfer_internal::load_le;
using transfer_internal::PeerSegment;
using transfer_internal::PullResult;
using transfer_internal::SendPoolCore;
using transfer_internal::SharedSegment;
using transfer_internal::SlotSnapshot;
using transfer_internal::store_le;

constexpr uint32_t kControlMagic = 0x434B4450;  // "PDKC"
constexpr uint32_t kControlVersion = 1;
constexpr uint64_t kControlHeaderBytes = 128;
constexpr uint64_t kPageBytes = 4096;
constexpr uint32_t kMaxControlBuffers = 1 << 20;
constexpr size_t kCtlMagic = 0, kCtlVersion = 4, kCtlMaxBuffers = 8, kCtlDevice = 12, kCtlToken = 16,
                 kCtlCapacity = 24, kCtlIpcHandle = 64;
// A message starts this far into its buffer (whose start is 4 KiB-aligned), so that the body after
// the 64-byte wire header starts on a 256-byte boundary: the decode's scatter reads it over the
// link 2-3 % faster than 64 bytes off one (pdserve_gpu_bench --transfer-only). Slot records and
// handles describe the message itself.
constexpr uint64_t kMessageLead = 256 - kKvWireHeaderBytes;
static_assert(kMessageLead <= kKvSendBufferLeadMax);

// The pools of this process by token: where a puller of the same process reads them.
class LocalPools {
 public:
  struct Pool {
    const uint8_t* memory = nullptr;
    uint64_t bytes = 0;
  };
  uint64_t add(Pool pool) {
    std::lock_guard lock(mu_);
    uint64_t token = 0;
    while (token == 0 || pools_.contains(token)) token = rng_();
    pools_[token] = pool;
    return token;
  }
  void remove(uint64_t token) {
    std::lock_guard lock(mu_);
    pools_.erase(token);
  }
  std::optional<Pool> find(uint64_t token) {
    std::lock_guard lock(mu_);
    auto it = pools_.find(token);
    if (it == pools_.end()) return std::nullopt;
    return it->second;
  }

 private:
  std::mutex mu_;
  std::mt19937_64 rng_{std::random_device{}()};  // guarded by mu_
  std::unordered_map<uint64_t, Pool> pools_;     // guarded by mu_
};

LocalPools& local_pools() {
  static LocalPools* p = new LocalPools();  // never destroyed: pools may outlive static destruction
  return *p;
}

uint64_t control_bytes(uint32_t max_buffers) {
  const uint64_t n = kControlHeaderBytes + uint64_t{max_buffers} * transfer_internal::kSlotRecordBytes;
  return (n + kPageBytes - 1) / kPageBytes * kPageBytes;
}

// The kernels' description of a kCuda view (validated by the caller), or why it cannot be one.
StatusOr<cuda::PagedKvCache> kernel_cache(const PagedKvView& v) {
  if (v.memory != KvMemory::kCuda)
    return failed_precondition(
        "the cuda-ipc transport moves KV caches in GPU memory; this one is in host memory");
  const uint64_t rows = static_cast<uint64_t>(v.block_size) * v.layout.row_bytes();
  if (v.block_bytes != rows)
    return invalid_argument(fmt::format("the KV kernels need blocks of exactly their rows ({} bytes), not {}",
                                        rows, v.block_bytes));
  cuda::PagedKvCache c;
  c.base = reinterpret_cast<uint16_t*>(v.base);
  c.num_layers = v.layout.num_layers;
  c.layer_stride = static_cast<int64_t>(v.layer_bytes / 2);
  c.v_offset = static_cast<int64_t>(v.v_offset_bytes / 2);
  c.block_size = v.block_size;
  c.num_kv_heads = v.num_kv_heads;
  c.head_dim = v.layout.kv_width / v.num_kv_heads;
  return c;
}

// A block table in device memory, grown as needed; with the stream the copies run on. One user
// at a time.
class DeviceTable {
 public:
  Status init() {
    PD_ASSIGN_OR_RETURN(stream_, cuda::Stream::create());
    return ok_status();
  }
  StatusOr<const int32_t*> upload(std::span<const int32_t> table, int64_t entries) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(entries, 1)) * sizeof(int32_t);
    if (buffer_.bytes() < bytes) {
      PD_ASSIGN_OR_RETURN(buffer_, cuda::DeviceBuffer::allocate(std::max(bytes, buffer_.bytes() * 2)));
    }
    PD_RETURN_IF_ERROR(cuda::copy_to_device_async(buffer_.data(), table.data(),
                                                  static_cast<size_t>(entries) * sizeof(int32_t), stream()));
    return buffer_.as<int32_t>();
  }
  bool ready() const { return stream_.has_value(); }
  cuda::StreamHandle stream() const { return stream_->get(); }
  Status sync() const { return stream_->synchronize(); }

 private:
  std::optional<cuda::Stream> stream_;
  cuda::DeviceBuffer buffer_;
};

int64_t blocks_for(int32_t num_tokens, int32_t block_size) {
  return (static_cast<int64_t>(num_tokens) + block_size - 1) / block_size;
}

class CudaIpcSendPool final : public CoreSendPool {
 public:
  static StatusOr<std::unique_ptr<KvSendPool>> create(const KvTransportOptions& options) {
    if (options.max_buffers < 1 || static_cast<uint32_t>(options.max_buffers) > kMaxControlBuffers)
      return invalid_argument(
          fmt::format("max_buffers {} is outside [1, {}]", options.max_buffers, kMaxControlBuffers));
    if (options.pool_capacity_bytes < kKvWireHeaderBytes)
      return invalid_argument(
          fmt::format("a cuda-ipc pool of {} bytes holds no KV", options.pool_capacity_bytes));
    PD_RETURN_IF_ERROR(cuda::set_device(options.cuda_device));
    auto pool = std::unique_ptr<CudaIpcSendPool>(new CudaIpcSendPool(options.cuda_device));
    PD_ASSIGN_OR_RETURN(pool->memory_, cuda::DeviceBuffer::allocate(options.pool_capacity_bytes));
    PD_ASSIGN_OR_RETURN(const cuda::IpcHandle ipc, cuda::ipc_handle(pool->memory_.data()));
    PD_RETURN_IF_ERROR(pool->table_.init());
    const auto max_buffers = static_cast<uint32_t>(options.max_buffers);
    PD_ASSIGN_OR_RETURN(pool->control_,
                        SharedSegment::create(control_bytes(max_buffers), options.shm_backing, true));
    uint8_t* h = pool->control_.data();
    store_le<uint32_t>(h + kCtlMagic, kControlMagic);
    store_le<uint32_t>(h + kCtlVersion, kControlVersion);
    store_le<uint32_t>(h + kCtlMaxBuffers, max_buffers);
    store_le<uint32_t>(h + kCtlDevice, static_cast<uint32_t>(options.cuda_device));
    pool->token_ = local_pools().add({pool->memory_.as<uint8_t>(), options.pool_capacity_bytes});
    store_le<uint64_t>(h + kCtlToken, pool->token_);
    store_le<uint64_t>(h + kCtlCapacity, options.pool_capacity_bytes);
    std::memcpy(h + kCtlIpcHandle, ipc.data(), ipc.size());
    SendPoolCore::Config config = transfer_internal::core_config(options);
    config.message_lead = kMessageLead;
    pool->core_ = std::make_unique<SendPoolCore>(
        config, pool->memory_.as<uint8_t>(), [p = pool.get()](uint32_t id, const SlotSnapshot& s) {
          transfer_internal::write_slot_record(
              p->control_.data() + kControlHeaderBytes + uint64_t{id} * transfer_internal::kSlotRecordBytes,
              s);
        });
    return std::unique_ptr<KvSendPool>(std::move(pool));
  }

  ~CudaIpcSendPool() override {
    if (token_ != 0) local_pools().remove(token_);
  }

  TransportKind kind() const override { return TransportKind::kCudaIpc; }
  KvMemory memory() const override { return KvMemory::kCuda; }
  std::string endpoint() const override { return control_.path(); }

  // NOTE: acquire()'s span is device memory of this pool's GPU: write it with CUDA copies or
  // kernels.
  StatusOr<KvHandle> expose_paged(const PagedKvView&, std::span<const int32_t>, int32_t, uint32_t) override {
    return unimplemented("the cuda-ipc transport has no block-fixed mode (it exists for shm and tcp only)");
  }

  Status fill(const KvSendBuffer& buffer, const PagedKvView& src, std::span<const int32_t> block_table,
              int32_t num_tokens, uint32_t flags) override {
    PD_RETURN_IF_ERROR(check_send(src, block_table, num_tokens, flags, 0, "the cuda-ipc transport"));
    PD_ASSIGN_OR_RETURN(const cuda::PagedKvCache cache, kernel_cache(src));
    if (src.cuda_device != device_)
      return failed_precondition(fmt::format(
          "this cuda-ipc pool lives on GPU {}, the KV cache to send on GPU {}", device_, src.cuda_device));
    PD_RETURN_IF_ERROR(check_fill_buffer(buffer, src.layout, num_tokens));
    KvWireHeader header = make_kv_wire_header(src.layout, num_tokens);
    header.generation = buffer.ref.generation;
    PD_RETURN_IF_ERROR(write(buffer, header, cache, block_table, num_tokens));
    return core_->commit(buffer.ref);
  }

 private:
  explicit CudaIpcSendPool(int device) : device_(device) {}

  // The header and the gathered body into the buffer; returns once they are there.
  Status write(const KvSendBuffer& buffer, const KvWireHeader& header, const cuda::PagedKvCache& cache,
               std::span<const int32_t> block_table, int32_t num_tokens) {
    const std::array<uint8_t, kKvWireHeaderBytes> head = encode_kv_wire_header(header);
    std::lock_guard lock(mu_);
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    PD_ASSIGN_OR_RETURN(const int32_t* table,
                        table_.upload(block_table, blocks_for(num_tokens, cache.block_size)));
    PD_RETURN_IF_ERROR(
        cuda::copy_to_device_async(buffer.bytes.data(), head.data(), head.size(), table_.stream()));
    PD_RETURN_IF_ERROR(cuda::gather_kv(cache, table, num_tokens,
                                       reinterpret_cast<uint16_t*>(buffer.bytes.data() + kKvWireHeaderBytes),
                                       table_.stream()));
    // NOTE: the stream is of this pool; the caller's forward pass that wrote the cache has
    // returned (CudaLlamaModel::forward synchronises), so the gather sees its writes.
    return table_.sync();
  }

  const int device_;
  uint64_t token_ = 0;  // in local_pools() while the pool exists
  cuda::DeviceBuffer memory_;
  SharedSegment control_;
  std::mutex mu_;
  DeviceTable table_;  // guarded by mu_
};

// One prefill's pool as a decode sees it: the control segment and the allocation, mapped.
struct PeerPool {
  PeerSegment control;
  uint32_t max_buffers = 0;
  uint64_t capacity = 0;
  int device = 0;
  std::optional<cuda::IpcMapping> mapping;  // none when the pool is in this process
  const uint8_t* memory = nullptr;

  const uint8_t* record(uint32_t id) const {
    return control.data() + kControlHeaderBytes + uint64_t{id} * transfer_internal::kSlotRecordBytes;
  }
};

class CudaIpcPuller final : public transfer_internal::QueuedPuller {
 public:
  explicit CudaIpcPuller(int device)
      : QueuedPuller(TransportKind::kCudaIpc, KvMemory::kCuda), device_(device) {}
  ~CudaIpcPuller() override { stop(); }

 protected:
  StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) override {
    const std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
    if (handle.mode != KvTransferMode::kContiguous)
      return unimplemented("the cuda-ipc transport has no block-fixed mode");
    PD_ASSIGN_OR_RETURN(const cuda::PagedKvCache cache, kernel_cache(target.view));
    if (target.view.cuda_device != device_)
      return failed_precondition(
          fmt::format("this cuda-ipc puller writes GPU {}, the target KV cache is on GPU {}", device_,
                      target.view.cuda_device));
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    if (!table_initialised_) {
      PD_RETURN_IF_ERROR(table_.init());
      table_initialised_ = true;
    }
    PD_ASSIGN_OR_RETURN(PeerPool * peer, map_pool(handle.endpoint));
    StatusOr<PullResult> r = pull(*peer, handle, target, cache, started);
    if (!r.ok()) return r.status().with_context(fmt::format("prefill KV pool {}", handle.endpoint));
    return r;
  }

 private:
  // `started`: when run_pull() began (for the debug account of the pull's time).
  StatusOr<PullResult> pull(const PeerPool& peer, const KvHandle& handle, const KvScatterTarget& target,
                            const cuda::PagedKvCache& cache, std::chrono::steady_clock::time_point started) {
    if (handle.buffer_id >= peer.max_buffers)
      return not_found(
          fmt::format("KV buffer {} does not exist (the pool has {})", handle.buffer_id, peer.max_buffers));
    const uint8_t* rec = peer.record(handle.buffer_id);
    uint64_t offset = 0;
    uint64_t bytes = 0;
    PD_RETURN_IF_ERROR(
        transfer_internal::check_slot_record(rec, handle, KvTransferMode::kContiguous, &offset, &bytes));
    if (bytes < kKvWireHeaderBytes || bytes > peer.capacity || offset > peer.capacity - bytes)
      return data_loss(fmt::format("KV buffer {} record [{}, +{}) lies outside the {}-byte pool",
                                   handle.buffer_id, offset, bytes, peer.capacity));
    if (offset % 16 != 0)
      return data_loss(
          fmt::format("KV buffer {} record offset {} is not 16-byte aligned", handle.buffer_id, offset));
    const uint8_t* message = peer.memory + offset;
    // The tokens the record's size makes, so that the scatter starts at once: the header is read
    // on a second stream while the body is scattered, and checked after (a header that disagrees
    // fails the pull; what the scatter wrote stays in this request's own blocks, which are then
    // freed). The record's size is checked against the block table first, so the scatter writes
    // only blocks of this request and reads only the message.
    const uint64_t token_bytes = target.view.layout.token_bytes();
    if (token_bytes == 0 || (bytes - kKvWireHeaderBytes) % token_bytes != 0 ||
        (bytes - kKvWireHeaderBytes) / token_bytes >
            static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
      return data_loss(fmt::format("KV buffer {} holds {} bytes, not a header and whole tokens of {} bytes",
                                   handle.buffer_id, bytes, token_bytes));
    const auto num_tokens = static_cast<int32_t>((bytes - kKvWireHeaderBytes) / token_bytes);
    // What can be checked without the header, before anything lands.
    if (bytes != handle.bytes)
      return data_loss(fmt::format("KV buffer {} holds {} bytes, the handle says {}", handle.buffer_id, bytes,
                                   handle.bytes));
    if (num_tokens > kKvWireMaxTokens)
      return data_loss(fmt::format("KV buffer {} holds {} tokens, more than a message may ({})",
                                   handle.buffer_id, num_tokens, kKvWireMaxTokens));
    PD_RETURN_IF_ERROR(transfer_internal::check_tokens_for_pull(
        num_tokens, target, fmt::format("KV buffer {} holds", handle.buffer_id)));
    // Where a pull's time goes, at debug level (PDSERVE_LOG_LEVEL=debug): from its submission
    // until this thread took it up, then until the pool was looked up and the checks above made,
    // until the scatter was launched, then until both it and the header's copy have ended (the
    // scatter kernel alone timed by CUDA events).
    const bool timed = log_level() <= LogLevel::kDebug;
    using Clock = std::chrono::steady_clock;
    const Clock::time_point t0 = Clock::now();
    if (!header_stream_) {
      PD_ASSIGN_OR_RETURN(cuda::PinnedHostBuffer host, cuda::PinnedHostBuffer::allocate(kKvWireHeaderBytes));
      PD_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::create());
      header_host_ = std::move(host);
      header_stream_ = std::move(stream);
    }
    PD_RETURN_IF_ERROR(
        cuda::copy_to_host_async(header_host_.data(), message, kKvWireHeaderBytes, header_stream_->get()));
    PD_ASSIGN_OR_RETURN(const int32_t* table,
                        table_.upload(target.block_table, blocks_for(num_tokens, cache.block_size)));
    if (timed) {
      if (!events_) {
        PD_ASSIGN_OR_RETURN(events_, make_events());
      }
      PD_RETURN_IF_ERROR(events_->first.record(table_.stream()));
    }
    // Once the scatter may run, both streams are waited for before any return: the engine frees
    // the target's blocks when a pull fails.
    const Status launched = cuda::scatter_kv(reinterpret_cast<const uint16_t*>(message + kKvWireHeaderBytes),
                                             cache, table, num_tokens, table_.stream());
    const Status stop_recorded =
        timed && launched.ok() ? events_->second.record(table_.stream()) : ok_status();
    const Clock::time_point t1 = Clock::now();
    const Status header_copied = header_stream_->synchronize();
    const Status scattered = table_.sync();
    PD_RETURN_IF_ERROR(launched);
    PD_RETURN_IF_ERROR(scattered);
    PD_RETURN_IF_ERROR(header_copied);
    PD_RETURN_IF_ERROR(stop_recorded);
    std::array<uint8_t, kKvWireHeaderBytes> head{};
    std::memcpy(head.data(), header_host_.data(), head.size());
    PD_ASSIGN_OR_RETURN(KvWireHeader header, decode_kv_wire_header(head));
    PD_RETURN_IF_ERROR(transfer_internal::check_header_for_pull(header, handle, target, bytes));
    if (header.num_tokens != num_tokens)
      return data_loss(
          fmt::format("KV header has {} tokens, its buffer's size makes {}", header.num_tokens, num_tokens));
    if (header.flags & kKvWireBodyChecksum)
      return unimplemented(
          "the cuda-ipc transport does not verify body checksums (the prefill asked for one)");
    PD_RETURN_IF_ERROR(transfer_internal::check_slot_unchanged(rec, handle));
    if (timed) {
      const Clock::time_point t2 = Clock::now();
      auto us = [](Clock::duration d) {
        return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
      };
      PD_ASSIGN_OR_RETURN(const float kernel_ms, cuda::Event::elapsed_ms(events_->first, events_->second));
      PD_LOG_DEBUG(
          "cuda-ipc pull of {} bytes ({} tokens): {} us queued, {} us to look up and check, {} us to "
          "launch, {} us to the end (scatter kernel {:.0f} us, {:.1f} GB/s), in all {} us since submitted",
          bytes, num_tokens, us(started - submitted_at()), us(t0 - started), us(t1 - t0), us(t2 - t1),
          kernel_ms * 1e3, static_cast<double>(bytes) / (kernel_ms * 1e-3) / 1e9, us(t2 - submitted_at()));
    }
    return PullResult{header.num_tokens, bytes};
  }

  static StatusOr<std::pair<cuda::Event, cuda::Event>> make_events() {
    PD_ASSIGN_OR_RETURN(cuda::Event start, cuda::Event::create());
    PD_ASSIGN_OR_RETURN(cuda::Event stop, cuda::Event::create());
    return std::pair<cuda::Event, cuda::Event>(std::move(start), std::move(stop));
  }

  StatusOr<PeerPool*> map_pool(const std::string& path) {
    auto it = pools_.find(path);
    if (it != pools_.end() && it->second->control.same_file(path)) return it->second.get();
    if (it != pools_.end()) pools_.erase(it);
    std::erase_if(pools_, [](const auto& kv) { return !kv.second->control.same_file(kv.first); });

    auto peer = std::make_unique<PeerPool>();
    PD_ASSIGN_OR_RETURN(peer->control, PeerSegment::open(path, kPageBytes));
    const uint8_t* h = peer->control.data();
    if (load_le<uint32_t>(h + kCtlMagic) != kControlMagic)
      return data_loss(fmt::format("{} is not a cuda-ipc KV control segment (magic 0x{:08x})", path,
                                   load_le<uint32_t>(h + kCtlMagic)));
    if (load_le<uint32_t>(h + kCtlVersion) != kControlVersion)
      return unimplemented(
          fmt::format("cuda-ipc control segment version {} is not supported (this build speaks {})",
                      load_le<uint32_t>(h + kCtlVersion), kControlVersion));
    peer->max_buffers = load_le<uint32_t>(h + kCtlMaxBuffers);
    peer->capacity = load_le<uint64_t>(h + kCtlCapacity);
    peer->device = static_cast<int>(load_le<uint32_t>(h + kCtlDevice));
    if (peer->max_buffers < 1 || peer->max_buffers > kMaxControlBuffers ||
        control_bytes(peer->max_buffers) > peer->control.size())
      return data_loss(fmt::format("cuda-ipc control segment {} claims {} buffers in {} bytes", path,
                                   peer->max_buffers, peer->control.size()));
    if (std::optional<LocalPools::Pool> local = local_pools().find(load_le<uint64_t>(h + kCtlToken))) {
      // The prefill is in this process (whose own IPC handles the driver refuses): its allocation
      // is addressable as it is. NOTE: the entry goes with the pool, and so does its control file,
      // so a later pull finds the file gone (same_file) before it could use this pointer.
      peer->memory = local->memory;
      peer->capacity = std::min(peer->capacity, local->bytes);
      PD_ASSIGN_OR_RETURN(const int owner, cuda::pointer_device(peer->memory));
      if (owner != device_) PD_RETURN_IF_ERROR(cuda::enable_peer_access(owner));
    } else {
      cuda::IpcHandle ipc{};
      std::memcpy(ipc.data(), h + kCtlIpcHandle, ipc.size());
      PD_ASSIGN_OR_RETURN(peer->mapping, cuda::IpcMapping::open(ipc));
      peer->memory = static_cast<const uint8_t*>(peer->mapping->data());
      if (peer->capacity > peer->mapping->bytes())
        return data_loss(
            fmt::format("cuda-ipc control segment {} claims {} bytes of buffers; the allocation it "
                        "names has {}",
                        path, peer->capacity, peer->mapping->bytes()));
    }
    PeerPool* p = peer.get();
    pools_[path] = std::move(peer);
    return p;
  }

  const int device_;
  // The progress thread's own (run_pull runs there only).
  bool table_initialised_ = false;
  DeviceTable table_;
  std::optional<std::pair<cuda::Event, cuda::Event>> events_;  // the scatter's, at debug level
  std::optional<cuda::Stream> header_stream_;                  // the header's copy, beside the scatter
  cuda::PinnedHostBuffer header_host_;
  std::unordered_map<std::string, std::unique_ptr<PeerPool>> pools_;
};

// Layer l of a cache, as a cache of one layer (its part of the wire body is contiguous).
cuda::PagedKvCache one_layer(const cuda::PagedKvCache& cache, int32_t l) {
  cuda::PagedKvCache one = cache;
  one.base = cache.base + static_cast<int64_t>(l) * cache.layer_stride;
  one.num_layers = 1;
  return one;
}

// A device buffer that only grows.
class DeviceScratch {
 public:
  StatusOr<uint8_t*> get(size_t bytes) {
    if (buffer_.bytes() < bytes) {
      buffer_ = cuda::DeviceBuffer();  // the old one first: GPU memory may not hold both
      PD_ASSIGN_OR_RETURN(buffer_, cuda::DeviceBuffer::allocate(bytes));
    }
    return buffer_.as<uint8_t>();
  }

 private:
  cuda::DeviceBuffer buffer_;
};

// Host-staged, prefill side: a host pool (shm, tcp) whose buffers are filled from a GPU cache.
class StagedSendPool final : public KvSendPool {
 public:
  StagedSendPool(std::unique_ptr<KvSendPool> inner, int device) : inner_(std::move(inner)), device_(device) {}
  // Queued copies and progress end before the memory they use goes.
  ~StagedSendPool() override {
    const Status synced = sync_queued();
    if (!synced.ok())
      PD_LOG_ERROR("KV send pool: waiting for its queued copies failed: {}", synced.message());
  }

  Status init(bool page_lock) {
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    PD_RETURN_IF_ERROR(table_.init());
    const std::span<uint8_t> memory = inner_->host_memory();
    if (!page_lock || memory.empty()) return ok_status();
    const auto t0 = std::chrono::steady_clock::now();
    StatusOr<cuda::HostRegistration> locked = cuda::HostRegistration::create(memory.data(), memory.size());
    if (!locked.ok()) {
      PD_LOG_WARN(
          "KV send pool: could not page-lock its {:.1f} MiB of host memory ({}); KV leaves GPU {} through "
          "pageable memory, at a third or less of the bus's rate",
          static_cast<double>(memory.size()) / (1 << 20), locked.status().message(), device_);
      return ok_status();
    }
    locked_ = std::move(*locked);
    PD_LOG_INFO("KV send pool: page-locked {:.1f} MiB of host memory for copies from GPU {} in {:.0f} ms",
                static_cast<double>(memory.size()) / (1 << 20), device_,
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return ok_status();
  }

  TransportKind kind() const override { return inner_->kind(); }
  std::string endpoint() const override { return inner_->endpoint(); }
  StatusOr<KvSendBuffer> acquire(uint64_t bytes) override { return inner_->acquire(bytes); }
  Status commit(KvBufferRef ref) override { return inner_->commit(ref); }
  StatusOr<KvHandle> expose_paged(const PagedKvView&, std::span<const int32_t>, int32_t, uint32_t) override {
    return unimplemented("the block-fixed mode does not carry KV caches in GPU memory");
  }
  // A layer-wise buffer given up may still have copies queued into it: they end first, so that
  // the bytes are not reused under them.
  Status release(KvBufferRef ref) override {
    const Status landed = finish_layer_wise(ref);
    const Status released = inner_->release(ref);
    return landed.ok() ? released : landed;
  }
  KvMemory memory() const override { return KvMemory::kCuda; }

  // Layer-wise sends copy from the GPU while the forward pass is queued and runs: only into
  // page-locked memory, where a copy does not hold up the thread that queues it.
  bool supports_layer_wise() const override { return locked_.bytes() > 0 && inner_->supports_layer_wise(); }

  // Queues, behind the work queued so far on src.cuda_stream (which writes the layer; null: the
  // legacy default stream): the layer's gather into the shared scratch, its copy into the
  // buffer's body, and a host function that publishes layers [0, layer + 1) once the copy has
  // landed. Nothing here waits for the GPU: the send's block table is uploaded once, from
  // page-locked memory, and a scratch outgrown is freed only once the stream has passed it.
  Status send_layer(const LayerWiseSend& send, const PagedKvView& src, std::span<const int32_t> block_table,
                    int32_t layer) override {
    if (!supports_layer_wise())
      return failed_precondition(
          "this KV send pool sends no layer-wise KV from a GPU: its host memory is not page-locked");
    PD_ASSIGN_OR_RETURN(const cuda::PagedKvCache cache, kernel_cache(src));
    if (src.cuda_device != device_)
      return failed_precondition(
          fmt::format("this KV send pool stages from GPU {}, the KV cache to send is on GPU {}", device_,
                      src.cuda_device));
    const uint64_t part = send.layout.layer_body_bytes(send.num_tokens);
    const int64_t entries = blocks_for(send.num_tokens, cache.block_size);
    std::lock_guard lock(mu_);
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    std::unique_ptr<LayerWiseState>& state = sends_[key(send.handle.ref())];
    if (!state) {  // the send's first layer: its block table is checked and uploaded once, for all
      if (Status ok = check_kv_block_table(src, block_table, send.num_tokens); !ok.ok()) {
        sends_.erase(key(send.handle.ref()));
        return ok;
      }
      StatusOr<std::unique_ptr<LayerWiseState>> made = make_layer_wise(block_table, entries);
      if (!made.ok()) {
        sends_.erase(key(send.handle.ref()));
        return made.status();
      }
      state = std::move(*made);
    }
    if (!written_) {
      PD_ASSIGN_OR_RETURN(written_, cuda::Event::create(/*timing=*/false));
    }
    PD_RETURN_IF_ERROR(written_->record(static_cast<cuda::StreamHandle>(src.cuda_stream)));
    PD_RETURN_IF_ERROR(written_->wait_on(table_.stream()));
    PD_ASSIGN_OR_RETURN(uint8_t * wire, scratch(part));
    PD_RETURN_IF_ERROR(cuda::gather_kv(one_layer(cache, layer), state->table.as<int32_t>(), send.num_tokens,
                                       reinterpret_cast<uint16_t*>(wire), table_.stream()));
    PD_RETURN_IF_ERROR(cuda::copy_to_host_async(send.body.data() + static_cast<size_t>(layer) * part, wire,
                                                part, table_.stream()));
    auto* landed = new LayerLanded{inner_.get(), send.handle.ref(), layer + 1};
    const Status queued = cuda::launch_host_func(table_.stream(), &LayerLanded::publish, landed);
    if (!queued.ok()) {
      delete landed;
      return queued;
    }
    return state->queued->record(table_.stream());
  }

  // After the buffer's queued layers have landed and been published (in order), so a decode
  // never reads a layer still on its way; the last publication (the first token) ends the send.
  // (The last publication frees no outgrown scratch: its caller may hold a lock of its own, and
  // cudaFree waits for the whole GPU. wait_layers_landed() and release() do.)
  Status publish_progress(KvBufferRef ref, int32_t layers_ready, int32_t first_token) override {
    PD_RETURN_IF_ERROR(first_token >= 0 ? finish_layer_wise(ref, /*free_retired=*/false)
                                        : wait_layer_wise(ref));
    return inner_->publish_progress(ref, layers_ready, first_token);
  }
  // The send's layers have landed; where it is the only send, scratches outgrown are freed now.
  Status wait_layers_landed(KvBufferRef ref) override {
    PD_RETURN_IF_ERROR(wait_layer_wise(ref));
    std::lock_guard lock(mu_);
    if (retired_.empty() || sends_.size() != 1 || !sends_.contains(key(ref))) return ok_status();
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    PD_RETURN_IF_ERROR(table_.sync());
    retired_.clear();
    return ok_status();
  }
  int32_t reclaim_expired() override { return inner_->reclaim_expired(); }
  KvSendPoolStats stats() const override { return inner_->stats(); }

  Status fill(const KvSendBuffer& buffer, const PagedKvView& src, std::span<const int32_t> block_table,
              int32_t num_tokens, uint32_t flags) override {
    PD_RETURN_IF_ERROR(
        check_send(src, block_table, num_tokens, flags, kKvWireBodyChecksum, "a host-staged GPU send"));
    PD_ASSIGN_OR_RETURN(const cuda::PagedKvCache cache, kernel_cache(src));
    if (src.cuda_device != device_)
      return failed_precondition(
          fmt::format("this KV send pool stages from GPU {}, the KV cache to send is on GPU {}", device_,
                      src.cuda_device));
    PD_RETURN_IF_ERROR(check_fill_buffer(buffer, src.layout, num_tokens));
    KvWireHeader header = make_kv_wire_header(src.layout, num_tokens);
    header.flags = flags;
    header.generation = buffer.ref.generation;
    const std::span<uint8_t> body = buffer.bytes.subspan(kKvWireHeaderBytes);
    PD_RETURN_IF_ERROR(stage(cache, block_table, num_tokens, body));
    if (flags & kKvWireBodyChecksum) header.body_checksum = kv_body_checksum(body);
    encode_kv_wire_header(header, buffer.bytes);
    return inner_->commit(buffer.ref);
  }

 private:
  // A layer's progress, published by a host function on the CUDA driver's thread once its copy
  // has landed (no CUDA there: the inner pool's bookkeeping only).
  struct LayerLanded {
    KvSendPool* pool;
    KvBufferRef ref;
    int32_t layers;
    static void publish(void* p) {
      std::unique_ptr<LayerLanded> l(static_cast<LayerLanded*>(p));
      // A buffer given up meanwhile refuses it; its pull has failed already.
      (void)l->pool->publish_progress(l->ref, l->layers, -1);
    }
  };

  // One layer-wise send's own: its block table (a page-locked copy and the device's) and an
  // event recorded after its latest queued layer. Kept for reuse once the send ends (cudaFree
  // would wait for the whole GPU).
  struct LayerWiseState {
    cuda::PinnedHostBuffer host_table;
    cuda::DeviceBuffer table;
    std::optional<cuda::Event> queued;
  };
  static std::pair<uint32_t, uint64_t> key(KvBufferRef ref) { return {ref.buffer_id, ref.generation}; }

  // Under mu_: a state for a send of `entries` table entries (a spare one large enough, or a new
  // one), its table uploaded on the stream.
  StatusOr<std::unique_ptr<LayerWiseState>> make_layer_wise(std::span<const int32_t> block_table,
                                                            int64_t entries) {
    const size_t table_bytes = static_cast<size_t>(entries) * sizeof(int32_t);
    std::unique_ptr<LayerWiseState> st;
    auto fits = [&](const std::unique_ptr<LayerWiseState>& s) { return s->table.bytes() >= table_bytes; };
    if (auto it = std::find_if(spares_.begin(), spares_.end(), fits); it != spares_.end()) {
      st = std::move(*it);
      spares_.erase(it);
    } else {
      st = std::make_unique<LayerWiseState>();
      PD_ASSIGN_OR_RETURN(st->host_table, cuda::PinnedHostBuffer::allocate(table_bytes));
      PD_ASSIGN_OR_RETURN(st->table, cuda::DeviceBuffer::allocate(table_bytes));
      PD_ASSIGN_OR_RETURN(st->queued, cuda::Event::create(/*timing=*/false));
    }
    // The page-locked copy is read when the stream gets there, and is not reused before the send
    // ends (its state comes back as a spare only after its event).
    std::memcpy(st->host_table.data(), block_table.data(), table_bytes);
    PD_RETURN_IF_ERROR(
        cuda::copy_to_device_async(st->table.data(), st->host_table.data(), table_bytes, table_.stream()));
    PD_RETURN_IF_ERROR(st->queued->record(table_.stream()));  // covers the upload until a layer is queued
    return st;
  }

  // Waits (without mu_) until the layers queued for `ref` have landed and been published.
  Status wait_layer_wise(KvBufferRef ref) {
    LayerWiseState* st = nullptr;
    {
      std::lock_guard lock(mu_);
      auto it = sends_.find(key(ref));
      if (it != sends_.end()) st = it->second.get();
    }
    // NOTE: only this buffer's own writer (the engine's thread) queues layers for it or ends it.
    return st != nullptr ? st->queued->synchronize() : ok_status();
  }
  // The same, then the send's state goes back to the spares; with `free_retired`, where no send is
  // left, the scratches outgrown are freed.
  Status finish_layer_wise(KvBufferRef ref, bool free_retired = true) {
    std::unique_ptr<LayerWiseState> st;
    {
      std::lock_guard lock(mu_);
      auto it = sends_.find(key(ref));
      if (it == sends_.end()) return ok_status();
      st = std::move(it->second);
      sends_.erase(it);
    }
    const Status landed = st->queued->synchronize();
    std::lock_guard lock(mu_);
    if (landed.ok() && spares_.size() < kMaxSpares) spares_.push_back(std::move(st));
    if (!free_retired || !sends_.empty() || retired_.empty()) return landed;
    // No send left: once the stream is idle, the scratches it outgrew can go.
    Status synced = cuda::set_device(device_);
    if (synced.ok()) synced = table_.sync();
    if (synced.ok()) retired_.clear();
    return landed.ok() ? synced : landed;
  }

  // Under mu_: the one-layer scratch every copy on the stream shares, at least `bytes`. One
  // outgrown may still be read by queued work: it is kept until the stream is known to be idle.
  StatusOr<uint8_t*> scratch(size_t bytes) {
    if (scratch_.bytes() < bytes) {
      if (scratch_.bytes() > 0) retired_.push_back(std::move(scratch_));
      PD_ASSIGN_OR_RETURN(scratch_, cuda::DeviceBuffer::allocate(bytes));
    }
    return scratch_.as<uint8_t>();
  }

  Status sync_queued() {
    std::lock_guard lock(mu_);
    if (!table_.ready()) return ok_status();
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    return table_.sync();
  }

  // Gathers on the GPU, then copies the body to the host buffer; returns once it is there.
  Status stage(const cuda::PagedKvCache& cache, std::span<const int32_t> block_table, int32_t num_tokens,
               std::span<uint8_t> body) {
    std::lock_guard lock(mu_);
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    PD_ASSIGN_OR_RETURN(const int32_t* table,
                        table_.upload(block_table, blocks_for(num_tokens, cache.block_size)));
    // Layer by layer through a scratch of one layer's part (the wire body is layer by layer), so
    // the GPU memory this takes stays small. All in one stream's order: a layer's gather waits
    // for the previous layer's copy out of the scratch. Into page-locked memory the copies run
    // without the host; into pageable memory each returns once its bytes are there.
    const size_t part = body.size() / static_cast<size_t>(cache.num_layers);
    PD_ASSIGN_OR_RETURN(uint8_t * wire, scratch(part));
    Status st = ok_status();
    for (int32_t l = 0; l < cache.num_layers && st.ok(); ++l) {
      st = cuda::gather_kv(one_layer(cache, l), table, num_tokens, reinterpret_cast<uint16_t*>(wire),
                           table_.stream());
      if (st.ok())
        st = cuda::copy_to_host_async(body.data() + static_cast<size_t>(l) * part, wire, part,
                                      table_.stream());
    }
    // Whatever was enqueued ends before the buffer is committed or given back.
    const Status synced = table_.sync();
    if (synced.ok()) retired_.clear();
    PD_RETURN_IF_ERROR(st);
    return synced;
  }

  std::unique_ptr<KvSendPool> inner_;
  const int device_;
  // Declared after inner_: unregistered before the pool's memory is unmapped.
  cuda::HostRegistration locked_;
  std::mutex mu_;
  DeviceTable table_;                        // guarded by mu_; its stream runs every copy, in order
  cuda::DeviceBuffer scratch_;               // guarded by mu_: scratch()
  std::vector<cuda::DeviceBuffer> retired_;  // guarded by mu_: outgrown scratches, maybe still read
  std::optional<cuda::Event> written_;       // guarded by mu_: orders a layer's gather after its writer
  static constexpr size_t kMaxSpares = 64;   // a few bytes of table each
  std::map<std::pair<uint32_t, uint64_t>, std::unique_ptr<LayerWiseState>> sends_;  // guarded by mu_
  std::vector<std::unique_ptr<LayerWiseState>> spares_;                             // guarded by mu_
};

// Host-staged, decode side: the host puller lands the body in host memory laid out as the wire
// (one block of all the tokens: a block-major block of N rows is the wire body of N tokens); then
// it goes to the GPU and is scattered into the target's blocks.
class StagedPuller final : public transfer_internal::QueuedPuller {
 public:
  // Pulls run on kHostPullThreads threads, as the host pullers' do: a pull waiting on a
  // layer-wise prefill's pass does not hold up the others.
  StagedPuller(std::unique_ptr<KvPuller> inner, TransportKind kind, int device, bool as_they_arrive,
               uint64_t keep_bytes)
      : QueuedPuller(kind, KvMemory::kCuda, transfer_internal::kHostPullThreads),
        inner_(std::move(inner)),
        device_(device),
        as_they_arrive_(as_they_arrive),
        keep_bytes_(keep_bytes) {
    inner_listener_ = inner_->add_done_listener([this] {
      std::lock_guard lock(inner_mu_);
      ++inner_ended_;
      inner_cv_.notify_all();
    });
  }
  ~StagedPuller() override {
    stop();
    inner_->remove_done_listener(inner_listener_);
  }

 protected:
  StatusOr<PullResult> run_pull(const KvHandle& handle, const KvScatterTarget& target) override {
    PD_ASSIGN_OR_RETURN(const cuda::PagedKvCache cache, kernel_cache(target.view));
    if (target.view.cuda_device != device_)
      return failed_precondition(fmt::format("this KV puller writes GPU {}, the target KV cache is on GPU {}",
                                             device_, target.view.cuda_device));
    const int32_t tokens = target.expected_num_tokens;
    if (tokens < 1)
      return invalid_argument(
          "a host-staged pull into GPU memory needs the expected token count (to size its stage)");
    PD_RETURN_IF_ERROR(check_kv_block_table(target.view, target.block_table, tokens));
    Lane& lane = *take_lane();
    StatusOr<PullResult> r = pull(lane, handle, target, cache, tokens);
    // Nothing reads the stage any more (pull() waits for its copies before it returns).
    if (lane.staging.bytes() > keep_bytes_) lane.staging = cuda::PinnedHostBuffer();
    give_lane(&lane);
    return r;
  }

 private:
  // What one pull at a time uses: the stage (page-locked, so its copies to the GPU run at the bus's
  // rate; the largest body it has held, up to keep_bytes_), the block table and the scratch, and
  // their stream.
  struct Lane {
    cuda::PinnedHostBuffer staging;
    DeviceTable table;
    bool table_initialised = false;
    DeviceScratch scratch;
  };

  StatusOr<PullResult> pull(Lane& lane, const KvHandle& handle, const KvScatterTarget& target,
                            const cuda::PagedKvCache& cache, int32_t tokens) {
    const uint64_t body = target.view.layout.body_bytes(tokens);
    if (lane.staging.bytes() < body) {
      PD_RETURN_IF_ERROR(cuda::set_device(device_));
      lane.staging = cuda::PinnedHostBuffer();
      PD_ASSIGN_OR_RETURN(lane.staging, cuda::PinnedHostBuffer::allocate(body));
    }
    PD_RETURN_IF_ERROR(cuda::set_device(device_));
    if (!lane.table_initialised) {
      PD_RETURN_IF_ERROR(lane.table.init());
      lane.table_initialised = true;
    }
    PD_ASSIGN_OR_RETURN(const int32_t* table,
                        lane.table.upload(target.block_table, blocks_for(tokens, cache.block_size)));
    const size_t part = body / static_cast<size_t>(cache.num_layers);  // one layer's part of the body
    PD_ASSIGN_OR_RETURN(uint8_t * wire, lane.scratch.get(part));
    // Each layer goes to the GPU once it is in the stage: as the body lands, where the host puller
    // says so (tcp, shm), else after the pull. In stream order: a layer's copy into the scratch follows
    // the previous layer's scatter.
    int32_t queued_layers = 0;
    Status queued = ok_status();
    auto queue_layers = [&](int32_t upto) {
      for (; queued_layers < upto && queued.ok(); ++queued_layers) {
        const size_t at = static_cast<size_t>(queued_layers) * part;
        queued = cuda::copy_to_device_async(wire, lane.staging.data() + at, part, lane.table.stream());
        if (queued.ok())
          queued = cuda::scatter_kv(reinterpret_cast<const uint16_t*>(wire), one_layer(cache, queued_layers),
                                    table, tokens, lane.table.stream());
      }
    };
    PagedKvView host;
    host.base = lane.staging.data();
    host.block_bytes = body;
    host.num_blocks = 1;
    host.block_size = tokens;
    host.layout = target.view.layout;
    const int32_t one_block[] = {0};
    KvScatterTarget stage{host, one_block, tokens};
    if (as_they_arrive_) {
      stage.on_body_landed = [&](uint64_t landed) {  // on the host puller's thread
        if (queued.ok()) queued = cuda::set_device(device_);
        queue_layers(static_cast<int32_t>(std::min<uint64_t>(landed / part, cache.num_layers)));
      };
    }
    TransferState st = inner_pull(handle, stage);
    if (st.phase == TransferPhase::kDone) queue_layers(cache.num_layers);
    // What was queued ends before the pull does: the engine frees the target's blocks on failure.
    const Status synced = lane.table.sync();
    if (st.phase != TransferPhase::kDone) return st.error;
    PD_RETURN_IF_ERROR(queued);
    PD_RETURN_IF_ERROR(synced);
    return PullResult{st.num_tokens, st.bytes, st.first_token};  // a layer-wise body's token
  }

  // The host puller's pull, given up with this pull (a cancel reaches the host puller: a pull
  // still queued there ends at once, one waiting on a layer-wise prefill where the host puller
  // watches for it).
  TransferState inner_pull(const KvHandle& handle, const KvScatterTarget& stage) {
    StatusOr<TransferId> id = inner_->submit(handle, stage);
    if (!id.ok()) {
      TransferState failed;
      failed.phase = TransferPhase::kFailed;
      failed.error = id.status();
      return failed;
    }
    for (bool cancelled = false;;) {
      uint64_t seen;
      {
        std::lock_guard lock(inner_mu_);
        seen = inner_ended_;
      }
      TransferState st = inner_->poll(*id);
      if (st.phase != TransferPhase::kPending) return st;
      if (!cancelled && cancel_flag()->load()) {
        inner_->cancel(*id);
        cancelled = true;
      }
      // Woken when any of the host puller's pulls ends; the timeout bounds how late a cancel is seen.
      std::unique_lock lock(inner_mu_);
      inner_cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return inner_ended_ != seen; });
    }
  }

  Lane* take_lane() {
    std::lock_guard lock(lanes_mu_);
    if (idle_lanes_.empty()) {
      lanes_.push_back(std::make_unique<Lane>());
      return lanes_.back().get();
    }
    Lane* l = idle_lanes_.back();
    idle_lanes_.pop_back();
    return l;
  }
  void give_lane(Lane* lane) {
    std::lock_guard lock(lanes_mu_);
    idle_lanes_.push_back(lane);
  }

  std::unique_ptr<KvPuller> inner_;
  const int device_;
  const bool as_they_arrive_;  // KvTransportOptions::land_layers_as_they_arrive
  const uint64_t keep_bytes_;  // KvTransportOptions::host_stage_keep_bytes
  uint64_t inner_listener_ = 0;
  std::mutex inner_mu_;
  std::condition_variable inner_cv_;
  uint64_t inner_ended_ = 0;  // guarded by inner_mu_: the host puller's pulls ended so far
  std::mutex lanes_mu_;
  std::vector<std::unique_ptr<Lane>> lanes_;  // guarded by lanes_mu_: at most one a thread
  std::vector<Lane*> idle_lanes_;             // guarded by lanes_mu_
};

}  // namespace

StatusOr<KvTransport> make_cuda_staged_transport(TransportKind host_kind, const KvTransportOptions& options) {
  if (host_kind != TransportKind::kShm && host_kind != TransportKind::kTcp &&
      host_kind != TransportKind::kUcx)
    return invalid_argument(fmt::format("GPU KV caches are staged through shm, tcp or ucx, not {}",
                                        transport_kind_name(host_kind)));
  if (options.cuda_device < 0 || options.cuda_device >= cuda::device_count())
    return unavailable(fmt::format("a GPU KV transport needs GPU {}, and this machine has {} ({})",
                                   options.cuda_device, cuda::device_count(), cuda::no_device_reason()));
  PD_ASSIGN_OR_RETURN(KvTransport host, make_transport(host_kind, options));
  KvTransport t;
  t.kind = host_kind;
  if (host.pool) {
    auto pool = std::make_unique<StagedSendPool>(std::move(host.pool), options.cuda_device);
    PD_RETURN_IF_ERROR(pool->init(options.page_lock_host_stage));
    t.pool = std::move(pool);
  }
  if (host.puller)
    t.puller =
        std::make_unique<StagedPuller>(std::move(host.puller), host_kind, options.cuda_device,
                                       options.land_layers_as_they_arrive, options.host_stage_keep_bytes);
  return t;
}

StatusOr<KvTransport> make_cuda_ipc_transport(const KvTransportOptions& options) {
  if (options.cuda_device < 0 || options.cuda_device >= cuda::device_count())
    return unavailable(fmt::format("the cuda-ipc KV transport needs GPU {}, and this machine has {} ({})",
                                   options.cuda_device, cuda::device_count(), cuda::no_device_reason()));
  KvTransport t;
  t.kind = TransportKind::kCudaIpc;
  if (options.send) {
    PD_ASSIGN_OR_RETURN(t.pool, CudaIpcSendPool::create(options));
  }
  if (options.receive) {
    if (options.io_timeout_ms < 1)
      return invalid_argument(fmt::format("io_timeout_ms {} must be >= 1", options.io_timeout_ms));
    t.puller = std::make_unique<CudaIpcPuller>(options.cuda_device);
  }
  return t;
}

}  // namespace pdserve

// The KV transfer interface between a prefill and a decode instance (DESIGN.md §1.3, block-free
// KV transfer).
//
// Prefill side: a KvSendPool owns pre-reserved contiguous send buffers. The prefill acquires one
// per request, writes the wire header and the gathered body into it (publish_kv() does all of
// it), commits it, and sends the buffer's KvHandle to a decode instance inside the handoff
// message. The buffer stays until the decode has pulled it and the prefill releases it — or
// until its lease runs out, when the pool reclaims it and a later pull of the handle fails with
// "lease expired".
//
// Decode side: a KvPuller pulls a handle into a scatter target (its paged KV blocks)
// asynchronously: submit() → TransferId, poll() → pending / done / failed(Status). A pull reads
// and validates the wire header (check_compatible(), room in the block table) before it writes
// anything into the target, then RecvScatters the body into the blocks — except cuda-ipc, which
// checks the size against the block table first and the header beside the scatter (a failed pull
// has then written only the target's blocks; callers free them).
//
// Transports, chosen in one place at start-up (make_transport):
//   inproc  the puller scatters straight from the prefill's buffer (same process)
//   shm     the pool's buffers live in one shared-memory segment; the decode maps it read-only once
//           and scatters straight from it (no socket, one copy)
//   tcp     the pool serves buffers from a small TCP server; the puller keeps connections per
//           endpoint and receives the body straight into its KV blocks (recvmsg into the runs of
//           the block table: no staging copy)
//   ucx     as tcp, over UCX (optional build, transfer/ucx_transport.cpp, libucp opened at run
//           time): the puller asks with an active message and receives the body by rendezvous into
//           a staging buffer, then scatters it; UCX picks RDMA where a NIC has it, TCP otherwise
//           (peer-failure handling leaves shared memory out). Contiguous only
//   cuda-ipc  GPU to GPU on one host (transfer/cuda_transports.h, built with the CUDA backend): the pool's
//           buffers are one device allocation shared through a CUDA IPC handle; the decode's
//           RecvScatter kernel reads the prefill GPU's buffer over NVLink/PCIe into its paged blocks
// Each but cuda-ipc and ucx also serves KvTransferMode::kBlockFixed, the baseline of the P/D-Serve paper: no
// contiguous buffer, one message and one confirmation per (block, layer) straight from the prefill's paged
// memory (expose_paged()). Kept for comparison (bench/transfer_bench.cpp); tcp and shm only.
//
// Layer-wise transfer (inproc, shm and tcp; docs/decisions/layer-wise-kv.md): the prefill commits a
// buffer whose header has kKvWireLayerWise before its body exists (begin_layer_wise_kv), hands its
// handle to a decode at once, and then publishes progress — layers [0, n) written, after each
// layer of its forward pass (send_kv_layer), and at last the first token it sampled
// (publish_progress). A pull of such a buffer scatters each layer as soon as it is ready (shm: the
// slot record carries the progress; tcp: the server sends each layer as it is ready and the first
// token after the body) and reports the first token in its TransferState. A buffer released before
// it is complete fails the pulls that wait on it.
//
// Thread-safety: KvSendPool and KvPuller methods are thread-safe. Transports run their own threads
// (the tcp server, the shm block-fixed server, each puller's progress thread) behind these
// interfaces. Ownership: the pool owns its buffers and hands out spans into them, valid until
// release (or lease expiry); a pull's scatter target memory and block table belong to the
// caller and must stay valid and untouched until the pull is done or failed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "transfer/kv_layout.h"
#include "transfer/kv_wire.h"

namespace pdserve {

enum class TransportKind : uint8_t { kInproc, kShm, kTcp, kCudaIpc, kUcx };
std::string_view transport_kind_name(TransportKind kind);  // "inproc", "shm", "tcp", "cuda-ipc", "ucx"
StatusOr<TransportKind> parse_transport_kind(std::string_view name);
// Whether this build has the ucx transport (an optional build: libucx found at configure time);
// without it, making one fails with the fix.
bool ucx_transport_built();

enum class KvTransferMode : uint8_t {
  kContiguous,  // one header + one contiguous body (block-free)
  kBlockFixed,  // baseline: one message and one confirmation per (block, layer)
};
std::string_view transfer_mode_name(KvTransferMode mode);  // "contiguous", "block-fixed"

// Names one send buffer of one pool: a buffer id is reused, its generation never is.
struct KvBufferRef {
  uint32_t buffer_id = 0;
  uint64_t generation = 0;
  bool operator==(const KvBufferRef&) const = default;
};

// Where a decode instance can fetch one request's KV. Plain data; travels inside the handoff
// message as to_string() and comes back through parse() (untrusted input).
struct KvHandle {
  TransportKind kind = TransportKind::kInproc;
  KvTransferMode mode = KvTransferMode::kContiguous;
  // inproc: "inproc/<pool number>"; shm and cuda-ipc: the (control) segment's path
  // ("/proc/<pid>/fd/<fd>" or "/dev/shm/pdserve-kv-..."); tcp: "host:port". At most kMaxEndpointBytes
  // printable characters, no ';' or spaces.
  std::string endpoint;
  uint32_t buffer_id = 0;
  uint64_t generation = 0;  // a handle for a buffer that was since released and reused is refused
  uint64_t bytes = 0;       // wire header + body

  static constexpr size_t kMaxEndpointBytes = 256;

  KvBufferRef ref() const { return {buffer_id, generation}; }
  // "kv1;<kind>;<mode>;<buffer id>;<generation>;<bytes>;<endpoint>"
  std::string to_string() const;
  static StatusOr<KvHandle> parse(std::string_view text);
  bool operator==(const KvHandle&) const = default;
};

// A buffer acquired from a KvSendPool: write the wire header and body into `bytes`, then
// commit(ref) before handing `handle` to a peer.
struct KvSendBuffer {
  KvBufferRef ref;
  std::span<uint8_t> bytes;  // exactly the size asked for; valid until release or lease expiry
  KvHandle handle;
};

struct KvSendPoolStats {
  uint64_t capacity_bytes = 0;
  int32_t max_buffers = 0;
  int32_t buffers_in_use = 0;  // acquired or exposed, not yet released or reclaimed
  uint64_t bytes_in_use = 0;   // of the capacity
  int64_t acquired_total = 0;
  int64_t released_total = 0;
  int64_t leases_expired_total = 0;
  // tcp, ucx and shm block-fixed (pulls the pool sees; ucx also counts a body the decode refused
  // after reading its header, which UCX reports to the sender as delivered).
  int64_t pulls_served_total = 0;
  int64_t pull_errors_total = 0;  // refused or broken pulls the pool saw
};

// Milliseconds on a monotonic clock; injectable for tests.
using KvClockMs = std::function<int64_t()>;

// Status::reason() of a refusal for room: the send pool cannot hold so many bytes now, where a
// smaller message may still fit (a prefill passes it on when it refuses a prompt for it).
inline constexpr std::string_view kSendPoolNoRoom = "kv_send_room";

// The prefill side. Thread-safe.
struct LayerWiseSend;  // below, with begin_layer_wise_kv

class KvSendPool {
 public:
  virtual ~KvSendPool() = default;
  virtual TransportKind kind() const = 0;
  // The endpoint peers reach this pool at (as in its handles).
  virtual std::string endpoint() const = 0;

  // Reserves a buffer of `bytes` (>= kKvWireHeaderBytes: header + body). RESOURCE_EXHAUSTED when
  // all buffers or the capacity are in use (after reclaiming expired leases): a prefill acquires
  // a request's buffer when it accepts the request, and refuses the request when there is none.
  // Where a buffer is free but its bytes are not, the status's reason() is kSendPoolNoRoom.
  // A buffer still being written has no lease (its writer releases it).
  virtual StatusOr<KvSendBuffer> acquire(uint64_t bytes) = 0;
  // The buffer's bytes are written: peers may pull it from now on (a pull before fails). Its
  // lease counts from here (for a layer-wise buffer, from its latest progress).
  virtual Status commit(KvBufferRef ref) = 0;
  // Block-fixed baseline: makes `view`'s blocks of a sequence pullable piece by piece, without a
  // contiguous copy. The memory must stay untouched until release. UNIMPLEMENTED for inproc.
  virtual StatusOr<KvHandle> expose_paged(const PagedKvView& view, std::span<const int32_t> block_table,
                                          int32_t num_tokens, uint32_t flags = 0) = 0;
  // The whole send path of one request (what publish_kv() calls): acquires a buffer of
  // kv_message_bytes(src.layout, num_tokens), fill()s it and returns its handle; the buffer is
  // released on failure.
  StatusOr<KvHandle> publish(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                             uint32_t flags);
  // Writes the header and the body gathered from `src` into `buffer` (acquired from this pool
  // for exactly num_tokens tokens of src.layout, still being written) and commits it. On failure
  // the buffer stays acquired: the caller releases it. This implementation gathers host memory;
  // the GPU pools gather on their GPU.
  virtual Status fill(const KvSendBuffer& buffer, const PagedKvView& src,
                      std::span<const int32_t> block_table, int32_t num_tokens, uint32_t flags);
  // Gives the buffer back (after the decode has pulled it, or on cancellation). A pull in flight
  // finishes first (tcp, inproc: release waits for it) or fails cleanly (shm). NOT_FOUND for a
  // stale or released ref, DEADLINE_EXCEEDED for one whose lease expired.
  virtual Status release(KvBufferRef ref) = 0;
  // Layer-wise sending: whether pulls of this pool follow a buffer committed before its body is
  // written, as publish_progress() says how far it is (inproc, shm, tcp).
  virtual bool supports_layer_wise() const { return false; }
  // Where the KV caches it sends from must be: host memory, or a GPU's (cuda-ipc, host-staged).
  virtual KvMemory memory() const { return KvMemory::kHost; }
  // A committed layer-wise buffer: layers [0, layers_ready) of its body are written (never fewer
  // than said before) and, once first_token >= 0, the token sampled after the prompt. Wakes the
  // pulls waiting on it. UNIMPLEMENTED where !supports_layer_wise().
  virtual Status publish_progress(KvBufferRef ref, int32_t layers_ready, int32_t first_token);
  // Waits until the layers sent for `ref` by send_layer() have landed in its buffer (a GPU pool
  // copies them asynchronously; the host pools write them at once: nothing to wait for).
  // publish_progress() with the first token waits for the same; a caller that publishes under a
  // lock of its own calls this first, so that the lock is not held while a copy runs. Only from
  // the buffer's writer.
  virtual Status wait_layers_landed(KvBufferRef /*ref*/) { return ok_status(); }
  // What send_kv_layer() does once it has checked its arguments: writes layer `layer` of the
  // sequence into send.body and publishes layers [0, layer + 1) as ready. This one gathers host
  // memory at once; a GPU pool queues the gather and copy behind the work queued so far on
  // src.cuda_stream and publishes the layer when it has landed.
  virtual Status send_layer(const LayerWiseSend& send, const PagedKvView& src,
                            std::span<const int32_t> block_table, int32_t layer);
  // Reclaims buffers held longer than the lease; returns how many. Also done by acquire().
  virtual int32_t reclaim_expired() = 0;
  virtual KvSendPoolStats stats() const = 0;
  // The host memory every contiguous buffer of this pool lies in, mapped for the pool's life (shm,
  // tcp, ucx): a GPU stage page-locks it once, so its copies from the GPU run at the bus's rate.
  // Empty where there is no such range.
  virtual std::span<uint8_t> host_memory() const { return {}; }
};

// Where a pull lands: the decode's paged KV and the sequence's block table. view.layout is the
// local layout the peer's header must match.
struct KvScatterTarget {
  PagedKvView view;
  std::span<const int32_t> block_table;
  int32_t expected_num_tokens = -1;  // -1: any count the block table has room for
  // Called by a puller that lands the body in wire order (tcp every 32 MiB; shm and inproc every
  // 32 MiB of whole layers, and a layer-wise body's layers as they are ready), on its thread, each
  // time more of it is in the target: the body bytes landed so far (after the header was checked;
  // the body's checksum, if any, is checked only at the end over tcp, before the copy over shm and
  // inproc). ucx never calls it.
  std::function<void(uint64_t landed_bytes)> on_body_landed{};
};

using TransferId = uint64_t;

enum class TransferPhase { kPending, kDone, kFailed };

struct TransferState {
  TransferPhase phase = TransferPhase::kPending;
  Status error;              // kFailed: what went wrong
  int32_t num_tokens = 0;    // kDone: tokens scattered into the target
  uint64_t bytes = 0;        // kDone: wire bytes moved (header + body)
  int32_t first_token = -1;  // kDone, a layer-wise buffer: the first token its prefill published
};

struct KvPullerStats {
  int64_t pulls_done_total = 0;
  int64_t pulls_failed_total = 0;
  uint64_t bytes_total = 0;
  int32_t pulls_pending = 0;
};

// The decode side. Thread-safe; pulls run on the puller's progress threads, in arrival order:
// inproc, shm and tcp run up to four at once (so that pulls waiting on layer-wise prefills do not
// hold up the others), ucx and cuda-ipc one after another.
class KvPuller {
 public:
  virtual ~KvPuller() = default;
  virtual TransportKind kind() const = 0;
  // Queues a pull. Fails at once (INVALID_ARGUMENT) for a handle of another transport or an
  // invalid target; everything the peer sends is checked on the progress thread.
  virtual StatusOr<TransferId> submit(const KvHandle& handle, const KvScatterTarget& target) = 0;
  // The transfer's state. A finished (done or failed) state is reported once, then forgotten:
  // polling it again answers NOT_FOUND as a failure.
  virtual TransferState poll(TransferId id) = 0;
  // Blocks until the transfer is done or failed; reports it like poll().
  virtual TransferState wait(TransferId id) = 0;
  // Gives up a pull: a queued one fails at once (CANCELLED); a running one fails as soon as it
  // notices — within milliseconds while it waits for a layer-wise prefill's progress over inproc
  // or shm; otherwise (tcp, or moving bytes) it finishes first. Unknown or finished ids are
  // ignored.
  virtual void cancel(TransferId id) = 0;
  // Calls `fn` after each pull ends (done or failed), on a progress thread (or the thread that
  // cancels a queued pull) with the puller's lock held: it must be quick and must not call into
  // this puller. Until remove_done_listener(id),
  // after which it is never running. For a caller that would otherwise poll.
  virtual uint64_t add_done_listener(std::function<void()> fn) = 0;
  virtual void remove_done_listener(uint64_t id) = 0;
  virtual KvPullerStats stats() const = 0;

  // submit() + wait().
  TransferState pull(const KvHandle& handle, const KvScatterTarget& target);
};

enum class ShmBacking {
  kMemfd,   // memfd_create; peers open /proc/<pid>/fd/<fd> (same host and pid namespace); freed with the
            // process
  kDevShm,  // shm_open under /dev/shm (shared /dev/shm across containers); unlinked by the pool's destructor
};

struct KvTransportOptions {
  // Roles this process takes (make_transport only).
  bool send = true;     // prefill: a KvSendPool
  bool receive = true;  // decode: a KvPuller

  // Send pool.
  uint64_t pool_capacity_bytes = uint64_t{256} << 20;  // contiguous buffers, pre-reserved
  int32_t max_buffers = 64;                            // at most b_p in flight per prefill
  int64_t lease_ms = 60'000;                           // a buffer not released within this is reclaimed
  // The largest buffer one message takes (kv_send_buffer_bytes of the longest prompt's KV), or 0.
  // Buffers of at most this never cross a multiple of it, and start at one where a whole region
  // is free, so that while fewer than N are held a pool of N times it has room for another of any
  // size up to it (first-fit alone can leave the free bytes split between buffers). 0: first-fit.
  uint64_t pool_region_bytes = 0;
  bool prefault_pool = true;  // touch the capacity at start-up (pinned-buffer behaviour)
  KvClockMs clock_ms;         // nullptr: steady clock
  ShmBacking shm_backing = ShmBacking::kMemfd;
  int32_t shm_block_fixed_channels = 2;                     // concurrent block-fixed pulls per shm pool
  uint64_t shm_block_fixed_slot_bytes = uint64_t{4} << 20;  // largest (block, layer) piece
  // tcp and ucx: the address the server listens on (port 0: any free port) and the host put in
  // handles (empty: the listen host).
  std::string tcp_listen = "127.0.0.1:0";
  std::string tcp_advertise_host;
  // cuda-ipc: the GPU whose memory holds the pool's buffers and the puller's target KV cache.
  int32_t cuda_device = 0;
  // A GPU KV cache sent through a host pool (shm, tcp, ucx): page-lock the pool's memory at start
  // (its whole capacity is then held in RAM), so the copies from the GPU run at the bus's rate
  // rather than through the driver's bounce buffers; where that fails, the pool stays pageable
  // and a warning says so.
  bool page_lock_host_stage = true;
  // A GPU KV cache pulled through a host transport: copy each layer on to the GPU as soon as it
  // has landed, where the host puller reports the body's progress (tcp, shm); false: after the whole
  // body (for measurements).
  bool land_layers_as_they_arrive = true;
  // A GPU KV cache pulled through a host transport lands in a page-locked stage, one per pull in
  // flight, kept for the next pull; a stage grown past this many bytes (a longer prompt's KV) is
  // freed after its pull, so that one long prompt does not hold its size in locked RAM for good.
  uint64_t host_stage_keep_bytes = uint64_t{1} << 30;

  // Both sides.
  int32_t tcp_socket_buffer_bytes = 4 << 20;  // SO_SNDBUF/SO_RCVBUF; 0: kernel autotuning
  int64_t io_timeout_ms = 30'000;             // a peer silent this long fails the pull
};

// The pool capacity one message of `message_bytes` (wire header and body) may take: pools reserve
// whole 4 KiB pages, and a pool may start a message up to kKvSendBufferLeadMax bytes into its
// buffer (cuda-ipc does, so that the body is 256-byte aligned). Size pools with it.
inline constexpr uint64_t kKvSendBufferLeadMax = 256;
uint64_t kv_send_buffer_bytes(uint64_t message_bytes);

StatusOr<std::unique_ptr<KvSendPool>> make_send_pool(TransportKind kind, const KvTransportOptions& options);
StatusOr<std::unique_ptr<KvPuller>> make_puller(TransportKind kind, const KvTransportOptions& options);

// Both sides of one transport kind, as options.send / options.receive ask.
struct KvTransport {
  TransportKind kind = TransportKind::kInproc;
  std::unique_ptr<KvSendPool> pool;  // null unless options.send
  std::unique_ptr<KvPuller> puller;  // null unless options.receive
};
StatusOr<KvTransport> make_transport(TransportKind kind, const KvTransportOptions& options);

// What every send path checks of what it is asked to send: the block table covers num_tokens
// (check_kv_block_table), num_tokens is within the wire's limit, the flags are known
// (INVALID_ARGUMENT) and among `supported`, those this path can honour (UNIMPLEMENTED, naming
// `sender`).
Status check_send(const PagedKvView& src, std::span<const int32_t> block_table, int32_t num_tokens,
                  uint32_t flags, uint32_t supported = kKvWireKnownFlags,
                  std::string_view sender = "this KV send path");

// The bytes of one message: the wire header and the body of num_tokens tokens of `layout`.
uint64_t kv_message_bytes(const KvLayout& layout, int32_t num_tokens);

// The prefill's whole send path: pool.publish(): acquires a buffer for num_tokens tokens, writes
// the header (flags: kKvWireBodyChecksum to add a body checksum), gathers the body from `src`,
// commits, and returns the handle. The buffer is released on failure.
StatusOr<KvHandle> publish_kv(KvSendPool& pool, const PagedKvView& src, std::span<const int32_t> block_table,
                              int32_t num_tokens, uint32_t flags = 0);

// A layer-wise send in progress: the committed buffer and where its body lies.
struct LayerWiseSend {
  KvHandle handle;
  std::span<uint8_t> body;  // layout.body_bytes(num_tokens) bytes after the header
  KvLayout layout;
  int32_t num_tokens = 0;
};
// Acquires a buffer for num_tokens tokens of `layout`, writes its header (kKvWireLayerWise, no
// body checksum) and commits it with no layer ready: the handle may go to a decode at once.
// FAILED_PRECONDITION where the pool does not support layer-wise sending.
StatusOr<LayerWiseSend> begin_layer_wise_kv(KvSendPool& pool, const KvLayout& layout, int32_t num_tokens);
// The same in a buffer acquired before (kv_message_bytes(layout, num_tokens), still being
// written); on failure it stays acquired.
StatusOr<LayerWiseSend> begin_layer_wise_kv(KvSendPool& pool, const KvSendBuffer& buffer,
                                            const KvLayout& layout, int32_t num_tokens);
// Gathers layer `layer` of the sequence from `src` into the body and publishes layers
// [0, layer + 1) as ready (KvSendPool::send_layer; from a GPU cache, once the copy has landed,
// and publish_progress() waits for the layers queued before). Layers must be sent in order.
Status send_kv_layer(KvSendPool& pool, const LayerWiseSend& send, const PagedKvView& src,
                     std::span<const int32_t> block_table, int32_t layer);

}  // namespace pdserve

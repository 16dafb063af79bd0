// The CUDA runtime as the rest of pdserve sees it: devices, device memory, streams, events, and
// CUDA errors as Status. Includes no CUDA header, so code that uses it builds with the host
// compiler alone. Knows nothing of requests or models.
// Thread-safety: the free functions are thread-safe (the CUDA runtime is); a DeviceBuffer, Stream
// or Event is used by one thread at a time.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"

struct CUstream_st;
struct CUevent_st;
struct CUgraphExec_st;

namespace pdserve::cuda {

using StreamHandle = CUstream_st*;  // cudaStream_t; nullptr is the legacy default stream

// The 16-bit floating-point format of a model's weights, activations and KV cache on the GPU:
// bf16 (8 bits of precision, float's range) or fp16 (11 bits of precision, values up to 65504).
// Kernels take the values as raw bits (uint16_t) and are told which.
enum class Dtype : uint8_t { kBf16, kF16 };
inline const char* dtype_name(Dtype d) { return d == Dtype::kF16 ? "fp16" : "bf16"; }

struct DeviceInfo {
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessors = 0;
  size_t memory_bytes = 0;
  size_t l2_bytes = 0;
};

// Number of usable devices; 0 when there is no driver or no device (never an error).
int device_count();
// Why device_count() is 0 (the driver's own words), or "" when it is not.
std::string no_device_reason();
StatusOr<DeviceInfo> device_info(int device);
// Multiprocessors of the calling thread's current device (read once per device; 132 if unknown).
int current_multiprocessors();
// The current device's index (0 if unknown).
int current_device();

// Programmatic dependent launch (compute capability 9.0): the kernels of a model step may start
// while the kernel ahead of them is still running, and wait inside for its results
// (device_util.cuh). On by default; off, each kernel starts after the one before it has ended —
// for comparison in benchmarks. Process-wide; read when a kernel is launched or captured, so CUDA
// graphs captured before a change keep the way they were captured.
void set_programmatic_launch(bool on);
bool programmatic_launch();

// Makes `device` current for the calling thread.
Status set_device(int device);
// Waits for all work on the current device; reports an error any earlier kernel hit.
Status synchronize();
// The error state after enqueuing work: a launch with a bad configuration, or an earlier
// asynchronous failure. `what` names the operation in the message.
Status check_last_error(const char* what);

// Device memory, freed on destruction. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static StatusOr<DeviceBuffer> allocate(size_t bytes);
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (cudaMallocHost): copies between it and a GPU run at the bus's rate, and
// an asynchronous copy from it reads it when the stream gets there (keep it unchanged until then).
// Move-only; freed with the object.
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  static StatusOr<PinnedHostBuffer> allocate(size_t bytes);
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  ~PinnedHostBuffer();

  uint8_t* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  uint8_t* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Host memory allocated elsewhere (an mmap, a shared-memory file), page-locked in place for as
// long as the object lives (cudaHostRegister): copies between it and a GPU then run at the bus's
// rate, as from a PinnedHostBuffer. The memory must stay mapped until the registration is gone
// (destroy it first). Pinning holds the range in RAM; it takes about 40 ms a GiB. Move-only.
class HostRegistration {
 public:
  HostRegistration() = default;
  static StatusOr<HostRegistration> create(void* data, size_t bytes);
  HostRegistration(HostRegistration&& other) noexcept;
  HostRegistration& operator=(HostRegistration&& other) noexcept;
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;
  ~HostRegistration();

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Brackets the work a profiler started with profiling off (ncu --profile-from-start off) looks at.
Status profiler_start();
Status profiler_stop();

// Queues fn(data) on `stream`: it runs on a thread of the CUDA driver once the work queued before
// has run, and holds up the work queued after until it returns. It must not call CUDA, nor wait
// for a lock that a thread waiting on this stream may hold.
Status launch_host_func(StreamHandle stream, void (*fn)(void*), void* data);

// Synchronous copies (host memory may be pageable) and fills.
Status copy_to_device(void* dst, const void* src, size_t bytes);
Status copy_to_host(void* dst, const void* src, size_t bytes);
// Enqueued on `stream`, so later work on that stream sees the bytes; pageable host memory is
// staged before the call returns, so `src` may be reused at once.
Status copy_to_device_async(void* dst, const void* src, size_t bytes, StreamHandle stream);
// Enqueued on `stream`; `dst` must be page-locked (PinnedHostBuffer) for the call not to wait, and
// holds the bytes once the stream has reached the copy.
Status copy_to_host_async(void* dst, const void* src, size_t bytes, StreamHandle stream);
Status copy_device_to_device(void* dst, const void* src, size_t bytes, StreamHandle stream);
Status fill_bytes(void* dst, uint8_t value, size_t bytes, StreamHandle stream);

// Lets the current device read and write `peer`'s memory directly (NVLink or PCIe); fails where
// the two cannot. Calling it again for the same pair is not an error.
Status enable_peer_access(int peer);
// Copies bytes from src on src_device to dst on dst_device, enqueued on `stream`.
Status copy_peer(void* dst, int dst_device, const void* src, int src_device, size_t bytes,
                 StreamHandle stream);

// CUDA IPC: another process of this host maps memory of this one. The handle is 64 opaque bytes
// naming one whole allocation (DeviceBuffer::allocate's, from its start).
using IpcHandle = std::array<uint8_t, 64>;
StatusOr<IpcHandle> ipc_handle(const void* allocation);
// The peer process's allocation mapped into this one (on the current device; peer access to the
// owning GPU is enabled as needed). Closed on destruction. Move-only. A process cannot open its
// own handles (the driver refuses): use the pointer itself there.
class IpcMapping {
 public:
  static StatusOr<IpcMapping> open(const IpcHandle& handle);
  IpcMapping() = default;
  ~IpcMapping();
  IpcMapping(IpcMapping&& other) noexcept;
  IpcMapping& operator=(IpcMapping&& other) noexcept;
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;
  void* data() const { return ptr_; }
  // The size of the mapped allocation (what the driver says, not what the peer claims).
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  int device_ = 0;  // current when opened; current again when closed
};

// The device that owns the memory at `ptr` (a device pointer of this process, mapped ones too).
StatusOr<int> pointer_device(const void* ptr);

// A non-blocking stream of the current device. Move-only.
class Stream {
 public:
  static StatusOr<Stream> create();
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream();
  StreamHandle get() const { return stream_; }
  Status synchronize() const;

 private:
  Stream() = default;
  StreamHandle stream_ = nullptr;
};

// Times work on a stream: record(start), enqueue, record(stop), then elapsed_ms(start, stop).
class Event {
 public:
  // `timing`: whether elapsed_ms() may read it (an event only for ordering is cheaper without).
  static StatusOr<Event> create(bool timing = true);
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event();
  Status record(StreamHandle stream);
  // Work queued on `stream` from now on waits until the work before the latest record() has run.
  Status wait_on(StreamHandle stream) const;
  // Returns once the work before the latest record() has run (at once if never recorded).
  Status synchronize() const;
  // Waits for `stop`; milliseconds between the two recordings.
  static StatusOr<float> elapsed_ms(const Event& start, const Event& stop);

 private:
  Event() = default;
  CUevent_st* event_ = nullptr;
};

// Work captured from one stream and replayed as a single launch (a CUDA graph): the kernels see
// the same pointers and sizes at every replay, so whatever changes between replays must live in
// device memory they read. Move-only.
class Graph {
 public:
  // Starts recording what is enqueued on `stream` (nothing runs until the graph is launched).
  static Status begin_capture(StreamHandle stream);
  // Stops recording and makes the graph. Always ends the capture, also on error.
  static StatusOr<Graph> end_capture(StreamHandle stream);
  Graph(Graph&& other) noexcept;
  Graph& operator=(Graph&& other) noexcept;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph();
  Status launch(StreamHandle stream) const;

 private:
  Graph() = default;
  CUgraphExec_st* exec_ = nullptr;
};

}  // namespace pdserve::cuda

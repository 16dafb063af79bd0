#include "kernels/cuda/runtime.h"

#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <array>
#include <atomic>
#include <cstring>
#include <utility>

namespace pdserve::cuda {
namespace {

Status from_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ok_status();
  std::string message = fmt::format("{}: {} ({})", what, cudaGetErrorString(err), cudaGetErrorName(err));
  switch (err) {
    case cudaErrorMemoryAllocation:
      return resource_exhausted(std::move(message) + "; free GPU memory or ask for less");
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorInvalidDevice: return invalid_argument(std::move(message));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver: return unavailable(std::move(message));
    default: return internal_error(std::move(message));
  }
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clears the sticky "no device" error for later calls
    return 0;
  }
  return n;
}

std::string no_device_reason() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess && n > 0) return "";
  (void)cudaGetLastError();
  if (err == cudaSuccess) return "the CUDA driver reports no device";
  if (err == cudaErrorInsufficientDriver)
    return fmt::format(
        "no NVIDIA driver is loaded, or it is older than this build's CUDA runtime ({}.{}) needs",
        CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
  return fmt::format("{} ({})", cudaGetErrorString(err), cudaGetErrorName(err));
}

StatusOr<DeviceInfo> device_info(int device) {
  cudaDeviceProp prop{};
  PD_RETURN_IF_ERROR(from_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  DeviceInfo info;
  info.name = prop.name;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.memory_bytes = prop.totalGlobalMem;
  info.l2_bytes = static_cast<size_t>(prop.l2CacheSize);
  return info;
}

int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return device;
}

int current_multiprocessors() {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int>, kDevices> counts{};  // 0: not read yet
  const int device = current_device();
  if (device < 0 || device >= kDevices) return 132;
  int n = counts[static_cast<size_t>(device)].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      (void)cudaGetLastError();
      return 132;
    }
    counts[static_cast<size_t>(device)].store(n, std::memory_order_relaxed);
  }
  return n;
}

namespace {
std::atomic<bool> g_programmatic_launch{true};
}  // namespace

void set_programmatic_launch(bool on) { g_programmatic_launch.store(on, std::memory_order_relaxed); }

bool programmatic_launch() { return g_programmatic_launch.load(std::memory_order_relaxed); }

Status set_device(int device) { return from_cuda(cudaSetDevice(device), "cudaSetDevice"); }

Status synchronize() { return from_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

Status check_last_error(const char* what) { return from_cuda(cudaGetLastError(), what); }

StatusOr<DeviceBuffer> DeviceBuffer::allocate(size_t bytes) {
  DeviceBuffer buffer;
  if (bytes == 0) return buffer;
  void* ptr = nullptr;
  cudaError_t err = cudaMalloc(&ptr, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return from_cuda(err, fmt::format("cudaMalloc of {} bytes", bytes).c_str());
  }
  buffer.ptr_ = ptr;
  buffer.bytes_ = bytes;
  return buffer;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

StatusOr<PinnedHostBuffer> PinnedHostBuffer::allocate(size_t bytes) {
  PinnedHostBuffer buffer;
  if (bytes == 0) return buffer;
  void* ptr = nullptr;
  const cudaError_t err = cudaMallocHost(&ptr, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return from_cuda(err, fmt::format("cudaMallocHost of {} bytes", bytes).c_str());
  }
  buffer.ptr_ = static_cast<uint8_t*>(ptr);
  buffer.bytes_ = bytes;
  return buffer;
}

PinnedHostBuffer::PinnedHostBuffer(PinnedHostBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

PinnedHostBuffer& PinnedHostBuffer::operator=(PinnedHostBuffer&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (ptr_ != nullptr) cudaFreeHost(ptr_);
}

StatusOr<HostRegistration> HostRegistration::create(void* data, size_t bytes) {
  HostRegistration r;
  if (bytes == 0) return r;
  const cudaError_t err = cudaHostRegister(data, bytes, cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return from_cuda(err, fmt::format("cudaHostRegister of {} bytes", bytes).c_str());
  }
  r.ptr_ = data;
  r.bytes_ = bytes;
  return r;
}

HostRegistration::HostRegistration(HostRegistration&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

HostRegistration& HostRegistration::operator=(HostRegistration&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaHostUnregister(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

HostRegistration::~HostRegistration() {
  if (ptr_ != nullptr) cudaHostUnregister(ptr_);
}

Status profiler_start() { return from_cuda(cudaProfilerStart(), "cudaProfilerStart"); }
Status profiler_stop() { return from_cuda(cudaProfilerStop(), "cudaProfilerStop"); }

Status copy_to_device(void* dst, const void* src, size_t bytes) {
  return from_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

Status copy_to_host(void* dst, const void* src, size_t bytes) {
  return from_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

Status copy_to_device_async(void* dst, const void* src, size_t bytes, StreamHandle stream) {
  return from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream),
                   "cudaMemcpyAsync to device");
}

Status copy_to_host_async(void* dst, const void* src, size_t bytes, StreamHandle stream) {
  return from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream),
                   "cudaMemcpyAsync to host");
}

Status copy_device_to_device(void* dst, const void* src, size_t bytes, StreamHandle stream) {
  return from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream),
                   "cudaMemcpyAsync device to device");
}

Status fill_bytes(void* dst, uint8_t value, size_t bytes, StreamHandle stream) {
  return from_cuda(cudaMemsetAsync(dst, value, bytes, stream), "cudaMemsetAsync");
}

Status enable_peer_access(int peer) {
  int current = 0;
  PD_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&current), "cudaGetDevice"));
  int can = 0;
  PD_RETURN_IF_ERROR(from_cuda(cudaDeviceCanAccessPeer(&can, current, peer), "cudaDeviceCanAccessPeer"));
  if (can == 0)
    return unavailable(
        fmt::format("GPU {} cannot access GPU {} directly (no NVLink or PCIe peer path)", current, peer));
  cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    (void)cudaGetLastError();
    return ok_status();
  }
  return from_cuda(err, "cudaDeviceEnablePeerAccess");
}

Status copy_peer(void* dst, int dst_device, const void* src, int src_device, size_t bytes,
                 StreamHandle stream) {
  return from_cuda(cudaMemcpyPeerAsync(dst, dst_device, src, src_device, bytes, stream),
                   "cudaMemcpyPeerAsync");
}

StatusOr<IpcHandle> ipc_handle(const void* allocation) {
  static_assert(sizeof(cudaIpcMemHandle_t) == sizeof(IpcHandle));
  cudaIpcMemHandle_t h{};
  PD_RETURN_IF_ERROR(
      from_cuda(cudaIpcGetMemHandle(&h, const_cast<void*>(allocation)), "cudaIpcGetMemHandle"));
  IpcHandle out{};
  std::memcpy(out.data(), &h, out.size());
  return out;
}

StatusOr<IpcMapping> IpcMapping::open(const IpcHandle& handle) {
  cudaIpcMemHandle_t h{};
  std::memcpy(&h, handle.data(), handle.size());
  IpcMapping m;
  PD_RETURN_IF_ERROR(from_cuda(cudaGetDevice(&m.device_), "cudaGetDevice"));
  PD_RETURN_IF_ERROR(
      from_cuda(cudaIpcOpenMemHandle(&m.ptr_, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle"));
  // The runtime API has no call for an allocation's extent: the driver's, found at run time (so the
  // binary does not link the driver library, which machines without a GPU lack).
  using AddressRange = int (*)(unsigned long long* base, size_t* size, unsigned long long ptr);
  static const AddressRange range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return static_cast<AddressRange>(nullptr);
    return reinterpret_cast<AddressRange>(fn);
  }();
  if (range == nullptr) return internal_error("the CUDA driver has no cuMemGetAddressRange");
  unsigned long long base = 0;
  if (int err = range(&base, &m.bytes_, reinterpret_cast<uintptr_t>(m.ptr_)); err != 0)
    return internal_error(
        fmt::format("cuMemGetAddressRange of an IPC mapping failed (driver error {})", err));
  if (base != reinterpret_cast<uintptr_t>(m.ptr_))
    return internal_error("an IPC mapping does not start at its allocation's base");
  return m;
}

IpcMapping::~IpcMapping() {
  if (ptr_ == nullptr) return;
  int current = 0;
  (void)cudaGetDevice(&current);
  if (current != device_) (void)cudaSetDevice(device_);
  (void)cudaIpcCloseMemHandle(ptr_);
  if (current != device_) (void)cudaSetDevice(current);
}

IpcMapping::IpcMapping(IpcMapping&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      device_(other.device_) {}

IpcMapping& IpcMapping::operator=(IpcMapping&& other) noexcept {
  if (this != &other) {
    IpcMapping old(std::move(*this));
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    device_ = other.device_;
  }
  return *this;
}

StatusOr<int> pointer_device(const void* ptr) {
  cudaPointerAttributes a{};
  PD_RETURN_IF_ERROR(from_cuda(cudaPointerGetAttributes(&a, ptr), "cudaPointerGetAttributes"));
  if (a.type != cudaMemoryTypeDevice) return invalid_argument("the pointer is not device memory");
  return a.device;
}

StatusOr<Stream> Stream::create() {
  Stream s;
  PD_RETURN_IF_ERROR(
      from_cuda(cudaStreamCreateWithFlags(&s.stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"));
  return s;
}

Stream::Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

Stream::~Stream() {
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

Status Stream::synchronize() const {
  return from_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
}

StatusOr<Event> Event::create(bool timing) {
  Event e;
  PD_RETURN_IF_ERROR(
      from_cuda(cudaEventCreateWithFlags(&e.event_, timing ? cudaEventDefault : cudaEventDisableTiming),
                "cudaEventCreate"));
  return e;
}

Event::Event(Event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}

Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) cudaEventDestroy(event_);
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

Event::~Event() {
  if (event_ != nullptr) cudaEventDestroy(event_);
}

Status Event::record(StreamHandle stream) {
  return from_cuda(cudaEventRecord(event_, stream), "cudaEventRecord");
}

Status Event::wait_on(StreamHandle stream) const {
  return from_cuda(cudaStreamWaitEvent(stream, event_, 0), "cudaStreamWaitEvent");
}

Status Event::synchronize() const { return from_cuda(cudaEventSynchronize(event_), "cudaEventSynchronize"); }

Status launch_host_func(StreamHandle stream, void (*fn)(void*), void* data) {
  return from_cuda(cudaLaunchHostFunc(stream, fn, data), "cudaLaunchHostFunc");
}

StatusOr<float> Event::elapsed_ms(const Event& start, const Event& stop) {
  PD_RETURN_IF_ERROR(from_cuda(cudaEventSynchronize(stop.event_), "cudaEventSynchronize"));
  float ms = 0;
  PD_RETURN_IF_ERROR(from_cuda(cudaEventElapsedTime(&ms, start.event_, stop.event_), "cudaEventElapsedTime"));
  return ms;
}

Status Graph::begin_capture(StreamHandle stream) {
  return from_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                   "cudaStreamBeginCapture");
}

StatusOr<Graph> Graph::end_capture(StreamHandle stream) {
  cudaGraph_t graph = nullptr;
  PD_RETURN_IF_ERROR(from_cuda(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture"));
  Graph g;
  cudaError_t err = cudaGraphInstantiate(&g.exec_, graph, 0);
  cudaGraphDestroy(graph);
  PD_RETURN_IF_ERROR(from_cuda(err, "cudaGraphInstantiate"));
  return g;
}

Graph::Graph(Graph&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}

Graph& Graph::operator=(Graph&& other) noexcept {
  if (this != &other) {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}

Graph::~Graph() {
  if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
}

Status Graph::launch(StreamHandle stream) const {
  return from_cuda(cudaGraphLaunch(exec_, stream), "cudaGraphLaunch");
}

}  // namespace pdserve::cuda

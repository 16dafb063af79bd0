#include "transfer/memory.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>

namespace pdserve::transfer_internal {
namespace {

constexpr size_t kPageBytes = 4096;

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

void prefault_pages(uint8_t* p, size_t bytes) {
  // A volatile write per page: the compiler may not drop it, and a zero keeps the content.
  for (size_t off = 0; off < bytes; off += kPageBytes) static_cast<volatile uint8_t*>(p)[off] = 0;
}

StatusOr<AnonymousMemory> AnonymousMemory::create(size_t bytes, bool prefault) {
  AnonymousMemory m;
  if (bytes == 0) return m;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return resource_exhausted(
        fmt::format("cannot map {} bytes for KV send buffers: {}", bytes, errno_text(errno)));
  m.data_ = static_cast<uint8_t*>(p);
  m.size_ = bytes;
  ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only
  if (prefault) prefault_pages(m.data_, bytes);
  return m;
}

AnonymousMemory::~AnonymousMemory() {
  if (data_) ::munmap(data_, size_);
}

AnonymousMemory::AnonymousMemory(AnonymousMemory&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}

AnonymousMemory& AnonymousMemory::operator=(AnonymousMemory&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  return *this;
}

StatusOr<SharedSegment> SharedSegment::create(size_t bytes, ShmBacking backing, bool prefault) {
  SharedSegment s;
  if (backing == ShmBacking::kMemfd) {
    s.fd_ = ::memfd_create("pdserve-kv", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (s.fd_ < 0) return unavailable(fmt::format("memfd_create failed: {}", errno_text(errno)));
    s.path_ = fmt::format("/proc/{}/fd/{}", ::getpid(), s.fd_);
  } else {
    static std::atomic<uint64_t> counter{0};
    s.shm_name_ = fmt::format("/pdserve-kv-{}-{}", ::getpid(), counter.fetch_add(1));
    s.fd_ = ::shm_open(s.shm_name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (s.fd_ < 0) {
      const int err = errno;
      s.shm_name_.clear();
      return unavailable(fmt::format("shm_open failed: {}", errno_text(err)));
    }
    s.path_ = "/dev/shm" + s.shm_name_;
  }
  if (::ftruncate(s.fd_, static_cast<off_t>(bytes)) != 0)
    return resource_exhausted(
        fmt::format("cannot size the KV shared-memory segment to {} bytes: {}", bytes, errno_text(errno)));
  if (backing == ShmBacking::kMemfd) {
    // Peers map this file: a shrink would make their reads fault, so forbid any resize.
    if (::fcntl(s.fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
      return internal_error(fmt::format("cannot seal the KV memfd: {}", errno_text(errno)));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, s.fd_, 0);
  if (p == MAP_FAILED)
    return resource_exhausted(fmt::format("cannot map the {}-byte KV segment: {}", bytes, errno_text(errno)));
  s.data_ = static_cast<uint8_t*>(p);
  s.size_ = bytes;
  ::madvise(p, bytes, MADV_HUGEPAGE);  // used only where shmem huge pages are enabled
  if (prefault) prefault_pages(s.data_, bytes);
  return s;
}

SharedSegment::~SharedSegment() {
  if (data_) ::munmap(data_, size_);
  if (fd_ >= 0) ::close(fd_);
  if (!shm_name_.empty()) ::shm_unlink(shm_name_.c_str());
}

SharedSegment::SharedSegment(SharedSegment&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      fd_(std::exchange(o.fd_, -1)),
      path_(std::move(o.path_)),
      shm_name_(std::exchange(o.shm_name_, {})) {}

SharedSegment& SharedSegment::operator=(SharedSegment&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(fd_, o.fd_);
  std::swap(path_, o.path_);
  std::swap(shm_name_, o.shm_name_);
  return *this;
}

StatusOr<PeerSegment> PeerSegment::open(const std::string& path, uint64_t min_bytes) {
  PeerSegment seg;
  seg.fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (seg.fd_ < 0 && errno == ENOENT)
    return unavailable(
        fmt::format("KV segment {} is gone ({}): its prefill exited", path, std::strerror(errno)));
  if (seg.fd_ < 0)
    return unavailable(fmt::format("cannot open KV segment {}: {}", path, std::strerror(errno)));
  struct stat st {};
  if (::fstat(seg.fd_, &st) != 0 || !S_ISREG(st.st_mode))
    return unavailable(fmt::format("KV segment {} is not a regular file", path));
  seg.dev_ = static_cast<uint64_t>(st.st_dev);
  seg.ino_ = static_cast<uint64_t>(st.st_ino);
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < min_bytes)
    return data_loss(fmt::format("KV segment {} has only {} bytes", path, file_bytes));
  // A memfd must be sealed against shrinking, or its owner could make our reads fault.
  // NOTE: a /dev/shm file cannot be sealed; its owner is trusted not to shrink it.
  const int seals = ::fcntl(seg.fd_, F_GET_SEALS);
  if (path.starts_with("/proc/") && (seals < 0 || !(seals & F_SEAL_SHRINK)))
    return failed_precondition(fmt::format("KV segment {} is a memfd not sealed against shrinking", path));
  void* ro = ::mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, seg.fd_, 0);
  if (ro == MAP_FAILED)
    return unavailable(fmt::format("cannot map KV segment {}: {}", path, std::strerror(errno)));
  seg.data_ = static_cast<const uint8_t*>(ro);
  seg.size_ = file_bytes;
  return seg;
}

bool PeerSegment::same_file(const std::string& path) const {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  return static_cast<uint64_t>(st.st_dev) == dev_ && static_cast<uint64_t>(st.st_ino) == ino_;
}

PeerSegment::~PeerSegment() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
}

PeerSegment::PeerSegment(PeerSegment&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      fd_(std::exchange(o.fd_, -1)),
      dev_(o.dev_),
      ino_(o.ino_) {}

PeerSegment& PeerSegment::operator=(PeerSegment&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(fd_, o.fd_);
  std::swap(dev_, o.dev_);
  std::swap(ino_, o.ino_);
  return *this;
}

}  // namespace pdserve::transfer_internal

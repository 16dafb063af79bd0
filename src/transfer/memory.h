// Memory behind send pools (internal to src/transfer): private anonymous memory for the inproc
// and tcp pools, and a shared-memory file (memfd or /dev/shm) for the shm pool. Both ask for
// transparent huge pages where the kernel offers them and can be prefaulted at start-up, so the
// first transfer does not pay for page faults. Move-only RAII owners; not thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "transfer/kv_transport.h"

namespace pdserve::transfer_internal {

// Touches every page of [p, p + bytes) for writing, so it is backed before use.
void prefault_pages(uint8_t* p, size_t bytes);

class AnonymousMemory {
 public:
  AnonymousMemory() = default;
  static StatusOr<AnonymousMemory> create(size_t bytes, bool prefault);
  ~AnonymousMemory();
  AnonymousMemory(AnonymousMemory&& o) noexcept;
  AnonymousMemory& operator=(AnonymousMemory&& o) noexcept;
  AnonymousMemory(const AnonymousMemory&) = delete;
  AnonymousMemory& operator=(const AnonymousMemory&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A shared-memory file of a fixed size, mapped read-write by its creator. The file is sealed
// against shrinking (memfd), so a peer's mapping can never fault past its end.
class SharedSegment {
 public:
  SharedSegment() = default;
  static StatusOr<SharedSegment> create(size_t bytes, ShmBacking backing, bool prefault);
  ~SharedSegment();
  SharedSegment(SharedSegment&& o) noexcept;
  SharedSegment& operator=(SharedSegment&& o) noexcept;
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // What another process opens: "/proc/<pid>/fd/<fd>" or "/dev/shm/<name>".
  const std::string& path() const { return path_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;
  std::string path_;
  std::string shm_name_;  // kDevShm: unlinked on destruction
};

// Another process's SharedSegment, opened by its path and mapped read-only: the whole file, which
// must be a regular file of at least min_bytes and (a memfd) sealed against shrinking, so reads
// never fault. The fd stays open (more mappings of it, e.g. a writable mailbox). Move-only.
class PeerSegment {
 public:
  PeerSegment() = default;
  static StatusOr<PeerSegment> open(const std::string& path, uint64_t min_bytes);
  ~PeerSegment();
  PeerSegment(PeerSegment&& o) noexcept;
  PeerSegment& operator=(PeerSegment&& o) noexcept;
  PeerSegment(const PeerSegment&) = delete;
  PeerSegment& operator=(const PeerSegment&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }
  // Whether `path` still names this file (not gone, not a new file at the same path).
  bool same_file(const std::string& path) const;

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  int fd_ = -1;
  uint64_t dev_ = 0;
  uint64_t ino_ = 0;
};

}  // namespace pdserve::transfer_internal

#include "kernels/cpu/page_buffer.h"

#include <sys/mman.h>

#include <new>
#include <utility>

namespace pdserve::cpu {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}

PageBuffer::PageBuffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  // Over-map by one huge page so the start can be aligned to one (the kernel only backs aligned
  // 2 MiB ranges with huge pages), then trim the unused ends.
  size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  size_t map_len = len + kHugePage;
  void* p = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  auto base = reinterpret_cast<uintptr_t>(p);
  uintptr_t aligned = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > base) ::munmap(p, aligned - base);
  size_t tail = (base + map_len) - (aligned + len);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + len), tail);
  data_ = reinterpret_cast<uint8_t*>(aligned);
  mapped_ = len;
  // Advice only: without transparent huge pages the buffer still works, just slower.
  ::madvise(data_, mapped_, MADV_HUGEPAGE);
}

PageBuffer::~PageBuffer() {
  if (data_) ::munmap(data_, mapped_);
}

PageBuffer::PageBuffer(PageBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      mapped_(std::exchange(o.mapped_, 0)) {}

PageBuffer& PageBuffer::operator=(PageBuffer&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(mapped_, o.mapped_);
  return *this;
}

}  // namespace pdserve::cpu

// PageBuffer: a large, zero-initialised block of anonymous memory straight from the kernel,
// asking for transparent huge pages. Weights and the KV cache live in these: the matmul and
// attention kernels stream through tens of megabytes per token, and with 4 KiB pages the TLB
// misses and the prefetcher stopping at every page boundary cost more than the arithmetic
// (decode went from 44 to 71 tokens/s on the default model when weights moved to huge pages).
// Pages are only touched, and so only count as resident, when first written or read.
// Not copyable; movable; one owner.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pdserve::cpu {

class PageBuffer {
 public:
  PageBuffer() = default;
  explicit PageBuffer(size_t bytes);  // throws std::bad_alloc when the memory cannot be mapped
  ~PageBuffer();
  PageBuffer(const PageBuffer&) = delete;
  PageBuffer& operator=(const PageBuffer&) = delete;
  PageBuffer(PageBuffer&& o) noexcept;
  PageBuffer& operator=(PageBuffer&& o) noexcept;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;
};

}  // namespace pdserve::cpu

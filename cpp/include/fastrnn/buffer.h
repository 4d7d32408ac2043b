// A 64-byte aligned, uninitialised array owned by the portable code (never by kernel TUs).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

namespace fastrnn {

// 64-byte aligned memory for `bytes` bytes. Large blocks are recycled: a training step or a repack
// after an optimizer step allocates the same sizes again, and fresh pages from the kernel (zeroed
// on the first touch) cost more than the work on them (buffer.cpp). In AddressSanitizer builds
// (or with FASTRNN_EXACT_BUFFERS=1) every block is exactly `bytes` long and fresh, so that an
// access past its end is reported; with FASTRNN_GUARD_BUFFERS=1 every block ends at a page with
// no access (and is aligned only as its size allows), so that such an access faults.
// Throws std::bad_alloc.
void* allocate_aligned(std::size_t bytes);
void release_aligned(void* data, std::size_t bytes) noexcept;

template <class T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t count) { reset(count); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  ~AlignedBuffer() { release(); }

  // Throws std::bad_alloc (MemoryError in Python) when the request cannot be met.
  void reset(std::size_t count) {
    release();
    if (count == 0) return;
    if (count > (std::numeric_limits<std::size_t>::max() - 63) / sizeof(T)) throw std::bad_alloc();
    data_ = static_cast<T*>(allocate_aligned(count * sizeof(T)));
    size_ = count;
  }
  void zero() {
    if (data_) std::memset(data_, 0, size_ * sizeof(T));
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  void release() {
    if (data_) release_aligned(data_, size_ * sizeof(T));
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace fastrnn

// The memory behind AlignedBuffer: small blocks from malloc, large ones recycled.
#include "fastrnn/buffer.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <vector>

namespace fastrnn {
namespace {

// Blocks from this size up are kept for reuse (smaller ones are fast in malloc's own bins), up to
// kCachedBytes in all; a request takes a kept block at most a quarter larger than itself.
constexpr std::size_t kMinCachedBlock = std::size_t{64} << 10;
constexpr std::size_t kCachedBytes = std::size_t{64} << 20;

struct Block {
  void* data;
  std::size_t bytes;
};

struct Cache {
  std::mutex mutex;
  std::vector<Block> blocks;  // oldest first
  std::size_t bytes = 0;
};

Cache& cache() {
  // Never destroyed: buffers may be released while the interpreter exits.
  static Cache* instance = [] {
    auto* c = new Cache();
    // A fork while another thread holds the lock would leave it locked in the child.
    pthread_atfork(nullptr, nullptr, [] { new (&cache().mutex) std::mutex(); });
    return c;
  }();
  return *instance;
}

// How blocks are allocated: pooled (small ones from malloc, large ones from the cache above), or
// for the memory checks (README, Development) one of two ways. Under AddressSanitizer, or with
// FASTRNN_EXACT_BUFFERS=1 in the environment (for valgrind's memcheck), every block is exactly as
// long as asked for and fresh (no rounding, padding or reuse), so that the first byte past its end
// is outside the allocation and an access there is reported. With FASTRNN_GUARD_BUFFERS=1, every
// block ends where a page with no access begins, so that a read or write past its end faults at
// once in any build, on every ISA (valgrind emulates no AVX-512). GCC defines
// __SANITIZE_ADDRESS__; clang has __has_feature.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

enum class Blocks { pooled, exact, guarded };

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value && *value && std::strcmp(value, "0") != 0;
}

Blocks blocks() {
  static const Blocks mode = kSanitized                          ? Blocks::exact
                             : env_flag("FASTRNN_GUARD_BUFFERS") ? Blocks::guarded
                             : env_flag("FASTRNN_EXACT_BUFFERS") ? Blocks::exact
                                                                 : Blocks::pooled;
  return mode;
}

std::size_t page_size() {
  static const auto size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// Pages for `bytes`, then the guard page. Blocks end at the guard, so they are aligned only as
// their size allows (the kernels use unaligned loads and stores).
std::size_t guarded_data_pages(std::size_t bytes) {
  return (bytes + page_size() - 1) / page_size();
}

void* allocate_guarded(std::size_t bytes) {
  const std::size_t page = page_size();
  if (bytes > std::numeric_limits<std::size_t>::max() - 2 * page) throw std::bad_alloc();
  const std::size_t mapped = (guarded_data_pages(bytes) + 1) * page;
  void* start = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (start == MAP_FAILED) throw std::bad_alloc();
  char* guard = static_cast<char*>(start) + mapped - page;
  if (mprotect(guard, page, PROT_NONE) != 0) {
    munmap(start, mapped);
    throw std::bad_alloc();
  }
  return guard - bytes;
}

void release_guarded(void* data, std::size_t bytes) noexcept {
  char* guard = static_cast<char*>(data) + bytes;
  const std::size_t data_bytes = guarded_data_pages(bytes) * page_size();
  munmap(guard - data_bytes, data_bytes + page_size());
}

// Whole cache lines: the cache matches blocks by these sizes.
std::size_t line_multiple(std::size_t bytes) { return (bytes + 63) / 64 * 64; }

}  // namespace

void* allocate_aligned(std::size_t bytes) {
  if (blocks() == Blocks::guarded) return allocate_guarded(bytes);
  if (blocks() == Blocks::exact) {
    void* exact = nullptr;
    if (posix_memalign(&exact, 64, bytes) != 0) throw std::bad_alloc();
    return exact;
  }
  bytes = line_multiple(bytes);
  if (bytes < kMinCachedBlock) {
    // malloc and align by hand: glibc's aligned_alloc splits a larger chunk and frees its ends,
    // about 900 instructions, a third of the C++ side of a small call (a streaming cell step).
    void* raw = std::malloc(bytes + 64);
    if (!raw) throw std::bad_alloc();
    const auto address = (reinterpret_cast<std::uintptr_t>(raw) + 64) & ~std::uintptr_t{63};
    void* data = reinterpret_cast<void*>(address);
    static_cast<void**>(data)[-1] = raw;  // malloc's 16-byte alignment leaves 16-64 bytes here
    return data;
  }
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    std::size_t best = c.blocks.size();
    for (std::size_t i = 0; i < c.blocks.size(); ++i) {
      const std::size_t size = c.blocks[i].bytes;
      if (size >= bytes && size - bytes <= bytes / 4 &&
          (best == c.blocks.size() || size < c.blocks[best].bytes))
        best = i;
    }
    if (best < c.blocks.size()) {
      void* data = c.blocks[best].data;
      c.bytes -= c.blocks[best].bytes;
      c.blocks.erase(c.blocks.begin() + static_cast<long>(best));
      return data;
    }
  }
  void* data = std::aligned_alloc(64, bytes);
  if (!data) throw std::bad_alloc();
  return data;
}

void release_aligned(void* data, std::size_t bytes) noexcept {
  if (blocks() == Blocks::guarded) {
    release_guarded(data, bytes);
    return;
  }
  if (blocks() == Blocks::exact) {
    std::free(data);
    return;
  }
  bytes = line_multiple(bytes);
  if (bytes < kMinCachedBlock) {
    std::free(static_cast<void**>(data)[-1]);
    return;
  }
  if (bytes <= kCachedBytes) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    while (c.bytes + bytes > kCachedBytes) {  // the oldest blocks go first
      std::free(c.blocks.front().data);
      c.bytes -= c.blocks.front().bytes;
      c.blocks.erase(c.blocks.begin());
    }
    try {
      c.blocks.push_back({data, bytes});
      c.bytes += bytes;
      return;
    } catch (...) {  // no room to remember it: give it back
    }
  }
  std::free(data);
}

}  // namespace fastrnn

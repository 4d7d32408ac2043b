// Flush denormals to zero while a kernel runs and restore the caller's floating-point state
// afterwards: denormal operands slow FMAs down 10-100x (performance.md, technique 9).
#pragma once

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace fastrnn {

class FlushDenormalsScope {
 public:
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  FlushDenormalsScope() : saved_(_mm_getcsr()) {
    _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero);
  }
  ~FlushDenormalsScope() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#elif defined(__aarch64__)
  FlushDenormalsScope() {
    __asm__ volatile("mrs %0, fpcr" : "=r"(saved_));
    const unsigned long long flushed = saved_ | (1ull << 24);  // FPCR.FZ
    __asm__ volatile("msr fpcr, %0" : : "r"(flushed));
  }
  ~FlushDenormalsScope() { __asm__ volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  unsigned long long saved_;
#endif
 public:
  FlushDenormalsScope(const FlushDenormalsScope&) = delete;
  FlushDenormalsScope& operator=(const FlushDenormalsScope&) = delete;
};

}  // namespace fastrnn

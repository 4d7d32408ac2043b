// The portable baseline: "vectors" of one lane, plain C++ compiled without ISA flags.
// Semantics as documented in simd_avx512.h (min/max written so that a NaN in b propagates).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>  // part of the x86-64 baseline
#elif defined(__aarch64__)
#include <arm_neon.h>  // part of the AArch64 baseline
#endif

namespace fastrnn {
namespace scalar {

template <class T, class Bits, int kMantissaBits, int kBias>
struct Lane {
  using value_type = T;
  static constexpr int lanes = 1;
  T v;

  static Lane zero() { return {T(0)}; }
  static Lane set1(T x) { return {x}; }
  static Lane load(const T* p) { return {*p}; }
  static Lane load_partial(const T* p, int n) { return {n > 0 ? *p : T(0)}; }
  void store(T* p) const { *p = v; }
  void store_partial(T* p, int n) const {
    if (n > 0) *p = v;
  }
  friend Lane operator+(Lane a, Lane b) { return {a.v + b.v}; }
  friend Lane operator-(Lane a, Lane b) { return {a.v - b.v}; }
  friend Lane operator*(Lane a, Lane b) { return {a.v * b.v}; }
  friend Lane operator/(Lane a, Lane b) { return {a.v / b.v}; }
  friend Lane fma(Lane a, Lane b, Lane c) { return {a.v * b.v + c.v}; }
  // The SSE instructions on x86 and FMIN/FMAX on AArch64, so that denormal operands (seen as 0
  // under DAZ or FZ) and NaN behave as in the SIMD ISAs, and the compiler cannot turn the clamps
  // into branches it constant-folds: it folds without the flush (AArch64 with a ?: clamp:
  // sigmoid(-90) = 6e-39, a denormal, from a constant; relu(-1e-41) = -1e-41).
  friend Lane min(Lane a, Lane b) { return {min_of(a.v, b.v)}; }
  friend Lane max(Lane a, Lane b) { return {max_of(a.v, b.v)}; }
  friend Lane abs(Lane a) { return {from_bits(bits(a.v) & ~sign_bit())}; }
  friend Lane copysign(Lane mag, Lane sgn) {
    return {from_bits((bits(mag.v) & ~sign_bit()) | (bits(sgn.v) & sign_bit()))};
  }
  friend Lane select_lt(Lane a, Lane b, Lane x, Lane y) { return {a.v < b.v ? x.v : y.v}; }
  friend Lane round(Lane a) {
    // Adding and subtracting 1.5 * 2^mantissa rounds to nearest even for |a| < 2^(mantissa-1).
    const T magic = T(1.5) * T(Bits(1) << kMantissaBits);
    // (Exact IEEE arithmetic: the library is never built with -ffast-math.)
    return {(a.v + magic) - magic};
  }
  friend Lane pow2(Lane n) {
    if (n.v != n.v) return n;  // NaN: converting it to an integer would be undefined
    const auto e = static_cast<Bits>(static_cast<std::int64_t>(n.v) + kBias);
    return {from_bits(e << kMantissaBits)};
  }

 private:
#if defined(__SSE2__)
  static float min_of(float a, float b) {
    return _mm_cvtss_f32(_mm_min_ss(_mm_set_ss(a), _mm_set_ss(b)));
  }
  static float max_of(float a, float b) {
    return _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(a), _mm_set_ss(b)));
  }
  static double min_of(double a, double b) {
    return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(a), _mm_set_sd(b)));
  }
  static double max_of(double a, double b) {
    return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(a), _mm_set_sd(b)));
  }
#elif defined(__aarch64__)
  static float min_of(float a, float b) {
    return vget_lane_f32(vmin_f32(vdup_n_f32(a), vdup_n_f32(b)), 0);
  }
  static float max_of(float a, float b) {
    return vget_lane_f32(vmax_f32(vdup_n_f32(a), vdup_n_f32(b)), 0);
  }
  static double min_of(double a, double b) {
    return vget_lane_f64(vmin_f64(vdup_n_f64(a), vdup_n_f64(b)), 0);
  }
  static double max_of(double a, double b) {
    return vget_lane_f64(vmax_f64(vdup_n_f64(a), vdup_n_f64(b)), 0);
  }
#else  // elsewhere FlushDenormalsScope flushes nothing, so a compare and select is exact
  static T min_of(T a, T b) { return a < b ? a : b; }
  static T max_of(T a, T b) { return a > b ? a : b; }
#endif
  static Bits sign_bit() { return Bits(1) << (sizeof(Bits) * 8 - 1); }
  static Bits bits(T x) {
    Bits b;
    std::memcpy(&b, &x, sizeof b);
    return b;
  }
  static T from_bits(Bits b) {
    T x;
    std::memcpy(&x, &b, sizeof x);
    return x;
  }
};

template <class T>
struct Simd;
template <>
struct Simd<float> {
  using type = Lane<float, std::uint32_t, 23, 127>;
};
template <>
struct Simd<double> {
  using type = Lane<double, std::uint64_t, 52, 1023>;
};
constexpr int kMicroRows = 4;
// Rows of a forward step's micro-kernel for panels of `vectors` vectors (see simd_avx2.h).
constexpr int forward_step_rows(int /*vectors*/) { return kMicroRows; }
constexpr int single_block_rows(int vectors) { return forward_step_rows(vectors); }

}  // namespace scalar
}  // namespace fastrnn

// AVX-512 (F/BW/DQ/VL) vectors for the kernel body. Semantics shared by every simd_*.h:
// min(a, b) = a < b ? a : b and max(a, b) = a > b ? a : b lane-wise, so a NaN in b propagates
// (the x86 rule); select_lt(a, b, x, y) = a < b ? x : y; round() to nearest; pow2(n) = 2^n for
// integral n in the normal exponent range.
#pragma once
#include <immintrin.h>

namespace fastrnn {
namespace avx512 {

struct F32x16 {
  using value_type = float;
  static constexpr int lanes = 16;
  __m512 v;

  static F32x16 zero() { return {_mm512_setzero_ps()}; }
  static F32x16 set1(float x) { return {_mm512_set1_ps(x)}; }
  static F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static F32x16 load_partial(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p)};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, int n) const {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  }
  friend F32x16 operator+(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend F32x16 operator-(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend F32x16 operator*(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend F32x16 operator/(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend F32x16 fma(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend F32x16 min(F32x16 a, F32x16 b) { return {_mm512_min_ps(a.v, b.v)}; }
  friend F32x16 max(F32x16 a, F32x16 b) { return {_mm512_max_ps(a.v, b.v)}; }
  friend F32x16 abs(F32x16 a) { return {_mm512_abs_ps(a.v)}; }
  friend F32x16 copysign(F32x16 mag, F32x16 sgn) {
    const __m512 sign_bit = _mm512_set1_ps(-0.0f);
    return {_mm512_or_ps(_mm512_andnot_ps(sign_bit, mag.v), _mm512_and_ps(sign_bit, sgn.v))};
  }
  friend F32x16 select_lt(F32x16 a, F32x16 b, F32x16 x, F32x16 y) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), y.v, x.v)};
  }
  friend F32x16 round(F32x16 a) {
    return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  friend F32x16 pow2(F32x16 n) { return {_mm512_scalef_ps(_mm512_set1_ps(1.0f), n.v)}; }
};

struct F64x8 {
  using value_type = double;
  static constexpr int lanes = 8;
  __m512d v;

  static F64x8 zero() { return {_mm512_setzero_pd()}; }
  static F64x8 set1(double x) { return {_mm512_set1_pd(x)}; }
  static F64x8 load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static F64x8 load_partial(const double* p, int n) {
    return {_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1u), p)};
  }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void store_partial(double* p, int n) const {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1u), v);
  }
  friend F64x8 operator+(F64x8 a, F64x8 b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend F64x8 operator-(F64x8 a, F64x8 b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend F64x8 operator*(F64x8 a, F64x8 b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend F64x8 operator/(F64x8 a, F64x8 b) { return {_mm512_div_pd(a.v, b.v)}; }
  friend F64x8 fma(F64x8 a, F64x8 b, F64x8 c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  friend F64x8 min(F64x8 a, F64x8 b) { return {_mm512_min_pd(a.v, b.v)}; }
  friend F64x8 max(F64x8 a, F64x8 b) { return {_mm512_max_pd(a.v, b.v)}; }
  friend F64x8 abs(F64x8 a) { return {_mm512_abs_pd(a.v)}; }
  friend F64x8 copysign(F64x8 mag, F64x8 sgn) {
    const __m512d sign_bit = _mm512_set1_pd(-0.0);
    return {_mm512_or_pd(_mm512_andnot_pd(sign_bit, mag.v), _mm512_and_pd(sign_bit, sgn.v))};
  }
  friend F64x8 select_lt(F64x8 a, F64x8 b, F64x8 x, F64x8 y) {
    return {_mm512_mask_blend_pd(_mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ), y.v, x.v)};
  }
  friend F64x8 round(F64x8 a) {
    return {_mm512_roundscale_pd(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  friend F64x8 pow2(F64x8 n) { return {_mm512_scalef_pd(_mm512_set1_pd(1.0), n.v)}; }
};

template <class T>
struct Simd;
template <>
struct Simd<float> {
  using type = F32x16;
};
template <>
struct Simd<double> {
  using type = F64x8;
};
constexpr int kMicroRows = 6;  // rows of the micro-kernel: 6 x 4 accumulators of 32 registers
// Rows of a forward step's micro-kernel for panels of `vectors` vectors (see simd_avx2.h).
constexpr int forward_step_rows(int /*vectors*/) { return kMicroRows; }
constexpr int single_block_rows(int vectors) { return forward_step_rows(vectors); }

}  // namespace avx512
}  // namespace fastrnn

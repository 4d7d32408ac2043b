// AArch64 NEON vectors for the kernel body; semantics as documented in simd_avx512.h.
// min/max are FMIN/FMAX: a NaN in b propagates, and a denormal comes out as zero under FPCR.FZ,
// as x86's under DAZ (a compare + select would pass relu(-1e-41) through, below zero). They
// differ from x86 only for a NaN in a, which the kernels never pass (their a is a constant).
#pragma once
#include <arm_neon.h>

namespace fastrnn {
namespace neon {

struct F32x4 {
  using value_type = float;
  static constexpr int lanes = 4;
  float32x4_t v;

  static F32x4 zero() { return {vdupq_n_f32(0.0f)}; }
  static F32x4 set1(float x) { return {vdupq_n_f32(x)}; }
  static F32x4 load(const float* p) { return {vld1q_f32(p)}; }
  static F32x4 load_partial(const float* p, int n) {
    float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return {vld1q_f32(tmp)};
  }
  void store(float* p) const { vst1q_f32(p, v); }
  void store_partial(float* p, int n) const {
    float tmp[4];
    vst1q_f32(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
  friend F32x4 operator+(F32x4 a, F32x4 b) { return {vaddq_f32(a.v, b.v)}; }
  friend F32x4 operator-(F32x4 a, F32x4 b) { return {vsubq_f32(a.v, b.v)}; }
  friend F32x4 operator*(F32x4 a, F32x4 b) { return {vmulq_f32(a.v, b.v)}; }
  friend F32x4 operator/(F32x4 a, F32x4 b) { return {vdivq_f32(a.v, b.v)}; }
  friend F32x4 fma(F32x4 a, F32x4 b, F32x4 c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  friend F32x4 min(F32x4 a, F32x4 b) { return {vminq_f32(a.v, b.v)}; }
  friend F32x4 max(F32x4 a, F32x4 b) { return {vmaxq_f32(a.v, b.v)}; }
  friend F32x4 abs(F32x4 a) { return {vabsq_f32(a.v)}; }
  friend F32x4 copysign(F32x4 mag, F32x4 sgn) {
    return {vbslq_f32(vdupq_n_u32(0x80000000u), sgn.v, mag.v)};
  }
  friend F32x4 select_lt(F32x4 a, F32x4 b, F32x4 x, F32x4 y) {
    return {vbslq_f32(vcltq_f32(a.v, b.v), x.v, y.v)};
  }
  friend F32x4 round(F32x4 a) { return {vrndnq_f32(a.v)}; }
  friend F32x4 pow2(F32x4 n) {
    const int32x4_t biased = vaddq_s32(vcvtnq_s32_f32(n.v), vdupq_n_s32(127));
    return {vreinterpretq_f32_s32(vshlq_n_s32(biased, 23))};
  }
};

struct F64x2 {
  using value_type = double;
  static constexpr int lanes = 2;
  float64x2_t v;

  static F64x2 zero() { return {vdupq_n_f64(0.0)}; }
  static F64x2 set1(double x) { return {vdupq_n_f64(x)}; }
  static F64x2 load(const double* p) { return {vld1q_f64(p)}; }
  static F64x2 load_partial(const double* p, int n) {
    double tmp[2] = {0.0, 0.0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return {vld1q_f64(tmp)};
  }
  void store(double* p) const { vst1q_f64(p, v); }
  void store_partial(double* p, int n) const {
    double tmp[2];
    vst1q_f64(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
  friend F64x2 operator+(F64x2 a, F64x2 b) { return {vaddq_f64(a.v, b.v)}; }
  friend F64x2 operator-(F64x2 a, F64x2 b) { return {vsubq_f64(a.v, b.v)}; }
  friend F64x2 operator*(F64x2 a, F64x2 b) { return {vmulq_f64(a.v, b.v)}; }
  friend F64x2 operator/(F64x2 a, F64x2 b) { return {vdivq_f64(a.v, b.v)}; }
  friend F64x2 fma(F64x2 a, F64x2 b, F64x2 c) { return {vfmaq_f64(c.v, a.v, b.v)}; }
  friend F64x2 min(F64x2 a, F64x2 b) { return {vminq_f64(a.v, b.v)}; }
  friend F64x2 max(F64x2 a, F64x2 b) { return {vmaxq_f64(a.v, b.v)}; }
  friend F64x2 abs(F64x2 a) { return {vabsq_f64(a.v)}; }
  friend F64x2 copysign(F64x2 mag, F64x2 sgn) {
    return {vbslq_f64(vdupq_n_u64(0x8000000000000000ull), sgn.v, mag.v)};
  }
  friend F64x2 select_lt(F64x2 a, F64x2 b, F64x2 x, F64x2 y) {
    return {vbslq_f64(vcltq_f64(a.v, b.v), x.v, y.v)};
  }
  friend F64x2 round(F64x2 a) { return {vrndnq_f64(a.v)}; }
  friend F64x2 pow2(F64x2 n) {
    const int64x2_t biased = vaddq_s64(vcvtnq_s64_f64(n.v), vdupq_n_s64(1023));
    return {vreinterpretq_f64_s64(vshlq_n_s64(biased, 52))};
  }
};

template <class T>
struct Simd;
template <>
struct Simd<float> {
  using type = F32x4;
};
template <>
struct Simd<double> {
  using type = F64x2;
};
constexpr int kMicroRows = 6;  // 6 x 4 accumulators of 32 registers
// Rows of a forward step's micro-kernel for panels of `vectors` vectors (see simd_avx2.h).
constexpr int forward_step_rows(int /*vectors*/) { return kMicroRows; }
constexpr int single_block_rows(int vectors) { return forward_step_rows(vectors); }

}  // namespace neon
}  // namespace fastrnn

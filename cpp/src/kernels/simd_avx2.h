// AVX2 + FMA vectors for the kernel body; semantics as documented in simd_avx512.h.
#pragma once
#include <immintrin.h>

namespace fastrnn {
namespace avx2 {

struct F32x8 {
  using value_type = float;
  static constexpr int lanes = 8;
  __m256 v;

  static F32x8 zero() { return {_mm256_setzero_ps()}; }
  static F32x8 set1(float x) { return {_mm256_set1_ps(x)}; }
  static F32x8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F32x8 load_partial(const float* p, int n) { return {_mm256_maskload_ps(p, tail_mask(n))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm256_maskstore_ps(p, tail_mask(n), v); }
  friend F32x8 operator+(F32x8 a, F32x8 b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend F32x8 operator-(F32x8 a, F32x8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend F32x8 operator*(F32x8 a, F32x8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend F32x8 operator/(F32x8 a, F32x8 b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend F32x8 fma(F32x8 a, F32x8 b, F32x8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend F32x8 min(F32x8 a, F32x8 b) { return {_mm256_min_ps(a.v, b.v)}; }
  friend F32x8 max(F32x8 a, F32x8 b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend F32x8 abs(F32x8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
  friend F32x8 copysign(F32x8 mag, F32x8 sgn) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    return {_mm256_or_ps(_mm256_andnot_ps(sign_bit, mag.v), _mm256_and_ps(sign_bit, sgn.v))};
  }
  friend F32x8 select_lt(F32x8 a, F32x8 b, F32x8 x, F32x8 y) {
    return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))};
  }
  friend F32x8 round(F32x8 a) {
    return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  friend F32x8 pow2(F32x8 n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(biased, 23))};
  }
};

struct F64x4 {
  using value_type = double;
  static constexpr int lanes = 4;
  __m256d v;

  static F64x4 zero() { return {_mm256_setzero_pd()}; }
  static F64x4 set1(double x) { return {_mm256_set1_pd(x)}; }
  static F64x4 load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static F64x4 load_partial(const double* p, int n) {
    return {_mm256_maskload_pd(p, tail_mask(n))};
  }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void store_partial(double* p, int n) const { _mm256_maskstore_pd(p, tail_mask(n), v); }
  friend F64x4 operator+(F64x4 a, F64x4 b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend F64x4 operator-(F64x4 a, F64x4 b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend F64x4 operator*(F64x4 a, F64x4 b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend F64x4 operator/(F64x4 a, F64x4 b) { return {_mm256_div_pd(a.v, b.v)}; }
  friend F64x4 fma(F64x4 a, F64x4 b, F64x4 c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  friend F64x4 min(F64x4 a, F64x4 b) { return {_mm256_min_pd(a.v, b.v)}; }
  friend F64x4 max(F64x4 a, F64x4 b) { return {_mm256_max_pd(a.v, b.v)}; }
  friend F64x4 abs(F64x4 a) { return {_mm256_andnot_pd(_mm256_set1_pd(-0.0), a.v)}; }
  friend F64x4 copysign(F64x4 mag, F64x4 sgn) {
    const __m256d sign_bit = _mm256_set1_pd(-0.0);
    return {_mm256_or_pd(_mm256_andnot_pd(sign_bit, mag.v), _mm256_and_pd(sign_bit, sgn.v))};
  }
  friend F64x4 select_lt(F64x4 a, F64x4 b, F64x4 x, F64x4 y) {
    return {_mm256_blendv_pd(y.v, x.v, _mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ))};
  }
  friend F64x4 round(F64x4 a) {
    return {_mm256_round_pd(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  friend F64x4 pow2(F64x4 n) {
    // AVX2 has no double -> int64 conversion: adding 1.5 * 2^52 puts the integer in the low bits.
    const __m256d magic = _mm256_set1_pd(6755399441055744.0);
    const __m256i as_int = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(n.v, magic)),
                                            _mm256_castpd_si256(magic));
    return {_mm256_castsi256_pd(
        _mm256_slli_epi64(_mm256_add_epi64(as_int, _mm256_set1_epi64x(1023)), 52))};
  }
};

template <class T>
struct Simd;
template <>
struct Simd<float> {
  using type = F32x8;
};
template <>
struct Simd<double> {
  using type = F64x4;
};
constexpr int kMicroRows = 3;  // rows of the micro-kernel: 3 x 4 accumulators of 16 registers
// Rows of a forward step's micro-kernel for panels of `vectors` vectors. The GRU's 3-vector panels
// take 4 rows: 12 accumulators, 3 panel vectors and a broadcast fill the 16 registers, and each
// load of W_hh feeds 4 FMAs, not 3. Two threads, in-process A/B, medians of 15 rounds: GRU T25
// H512 inference at B=4 1.27x as fast, B=8 1.11x, B=16 1.06x (its steps alone 1.12x), B=64
// 1.04x; H256 B16 1.08x; B=1, 2 and 5 (the same row blocks) unchanged.
constexpr int forward_step_rows(int vectors) { return vectors == 3 ? 4 : kMicroRows; }
// The largest batch a step runs as one block of rows (for panels of `vectors` vectors), and the
// widest block of a larger batch. A batch of 4 or 5 with 4-vector panels (an LSTM's forward step,
// any backward step) would take two blocks of at most 3 rows, each reading all of W_hh; as one
// block it reads W_hh once, multiplying each panel in two halves of 2 vectors
// (multiply_panel_in_parts). In-process A/B, two threads: the LSTM's forward steps alone (input
// size 1) at T25 H512 B=4 1.19-1.21x as fast, B=5 1.06-1.08x, H256 B=4 1.21-1.25x; the backward
// steps too: training at T25 B4 H512 1.045x (LSTM, GRU). Larger batches take a block of 4 or 5
// rows for their tail (RowBlocks): the LSTM's steps alone at B=16, H512 1.04x, H256 1.05x, B=7
// 1.12x; training at B=16 1.02-1.06x; B=64, H=1024 unchanged. A batch of 6 as one block ran 0.89x
// as fast as 3 + 3 rows, and B=8 and 16 in blocks of 4 to 6 rows no faster than in blocks of 3.
constexpr int single_block_rows(int vectors) {
  return vectors == 4 ? 5 : forward_step_rows(vectors);
}

}  // namespace avx2
}  // namespace fastrnn

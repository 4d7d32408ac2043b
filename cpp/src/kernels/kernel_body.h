// The one kernel body, compiled once per ISA.
//
// Each kernels_<isa>.cpp includes its simd_<isa>.h, defines FASTRNN_ISA_NAMESPACE and includes
// this file, so every copy lives in its own namespace (no inline code is shared across ISA
// translation units). Written against the small vector interface of the simd_*.h headers.
//
// What is here: vectorized exp/sigmoid/tanh, one register-blocked micro-kernel (a block of rows
// times one packed panel), a cache-blocked GEMM on packed panels, and the fused time steps whose
// epilogues apply the cell's math to the micro-kernel's accumulators while they are in registers.
// The math of each cell matches python/fastrnn/reference.py, its readable twin.
#ifndef FASTRNN_ISA_NAMESPACE
#error "define FASTRNN_ISA_NAMESPACE before including kernel_body.h"
#endif

#include <cstring>
#include <utility>

#include "fastrnn/kernels.h"

namespace fastrnn {
namespace FASTRNN_ISA_NAMESPACE {

#define FASTRNN_INLINE inline __attribute__((always_inline))
#define FASTRNN_LAMBDA_INLINE __attribute__((always_inline))
#define FASTRNN_UNROLL _Pragma("GCC unroll 16")

// ---------------------------------------------------------------------------------------------
// Elementary functions. Clamps take the variable as min/max's second operand so NaN propagates.

template <class T>
struct MathConstants;

// clang-format off
template <>
struct MathConstants<float> {
  // exp's argument range: 2^n stays a normal float (denormals are flushed anyway).
  static constexpr float exp_lo = -87.3f, exp_hi = 88.0f;
  static constexpr float log2e = 1.44269504088896341f;
  // ln 2 split so that n * ln2_hi is exact (Cody-Waite range reduction).
  static constexpr float ln2_hi = 0.693115234375f, ln2_lo = 3.19461849e-05f;
  // e^r - 1 = r + r^2 Q(r) on |r| <= ln2/2, Q fitted (Lawson's minimax) for the relative error
  // of e^r - 1: 1.3e-8, so it stays accurate next to r = 0, where tanh of a small x needs it.
  static constexpr int expm1_terms = 5;
  static constexpr float expm1_poly[expm1_terms] = {0.49999998132828533f, 0.16666542683009553f,
                                                    0.041667203956101028f, 0.0083666469349037318f,
                                                    0.0013882494927426064f};
};

template <>
struct MathConstants<double> {
  static constexpr double exp_lo = -708.0, exp_hi = 709.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  // Relative error 1.8e-17.
  static constexpr int expm1_terms = 10;
  static constexpr double expm1_poly[expm1_terms] = {
      0.50000000000000052781,  0.16666666666666587794,   0.041666666666575383209,
      0.0083333333333904132423, 0.0013888888932052685446, 0.00019841269717604499896,
      2.4801504649454908481e-05, 2.7557408217560836609e-06, 2.7626299099783363228e-07,
      2.5053780774888017419e-08};
};
// clang-format on

template <class V, class T, int N>
FASTRNN_INLINE V horner(V x, const T (&coefficients)[N]) {
  V p = V::set1(coefficients[N - 1]);
  FASTRNN_UNROLL
  for (int i = N - 2; i >= 0; --i) p = fma(p, x, V::set1(coefficients[i]));
  return p;
}

// e^x = scale * (1 + m), with scale = 2^n and m = e^r - 1 for r = x - n ln2 (x clamped to exp's
// range). e^x - 1 and e^x + 1 each follow in one more fma, with no cancellation: so sigmoid and
// tanh share one polynomial, and tanh needs no second one for small x.
template <class V>
struct ExpParts {
  V scale, m;
  FASTRNN_INLINE V minus_one() const { return fma(scale, m, scale - V::set1(1)); }
  FASTRNN_INLINE V plus_one() const { return fma(scale, m, scale + V::set1(1)); }
};

template <class V>
FASTRNN_INLINE ExpParts<V> exp_parts(V x) {
  using C = MathConstants<typename V::value_type>;
  x = min(V::set1(C::exp_hi), max(V::set1(C::exp_lo), x));
  const V n = round(x * V::set1(C::log2e));
  V r = fma(n, V::set1(-C::ln2_hi), x);
  r = fma(n, V::set1(-C::ln2_lo), r);
  return {pow2(n), fma(r * r, horner(r, C::expm1_poly), r)};
}

template <class V>
FASTRNN_INLINE V sigmoid(V x) {
  return V::set1(1) / exp_parts(V::zero() - x).plus_one();
}

// tanh |x| = (1 - e^(-2|x|)) / (1 + e^(-2|x|)), the numerator as -expm1: accurate for small x too.
template <class V>
FASTRNN_INLINE V tanh(V x) {
  const ExpParts<V> e = exp_parts(V::set1(-2) * abs(x));
  // The quotient is -tanh |x|; copysign takes its magnitude. NaN stays NaN throughout.
  return copysign(e.minus_one() / e.plus_one(), x);
}

template <class V>
FASTRNN_INLINE V relu(V x) {
  return max(V::zero(), x);  // relu(NaN) = NaN
}

// Loads/stores of the first n lanes (0 < n <= lanes), the full vector when n == lanes.
template <class V>
FASTRNN_INLINE V load_first(const typename V::value_type* p, long n) {
  return n >= V::lanes ? V::load(p) : V::load_partial(p, static_cast<int>(n));
}
template <class V>
FASTRNN_INLINE void store_first(typename V::value_type* p, V v, long n) {
  if (n >= V::lanes)
    v.store(p);
  else
    v.store_partial(p, static_cast<int>(n));
}

FASTRNN_INLINE long min_long(long a, long b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Cache lines for a micro-kernel to fetch into L2 while its FMAs run. The panels of a matrix
// larger than L2 (W_hh at H = 1024: 256 KiB a panel, 16 MiB in all) come from L3, where the
// hardware prefetcher alone leaves the first block of rows on each panel waiting for it; when
// the blocks of rows that multiply one panel each prefetch a share of the next, it arrives in
// the background instead (GEMM 1600 x 4096 x 1024: +10%; LSTM step at B=64: +3%).
template <class T>
struct Prefetch {
  const T* data = nullptr;
  long lines = 0;
};

// Block `block` of `blocks`' share of the `bytes` bytes from `data`.
template <class T>
FASTRNN_INLINE Prefetch<T> prefetch_share(const T* data, long bytes, long block, long blocks) {
  const long lines = (bytes + kCacheLine - 1) / kCacheLine;
  const long share = (lines + blocks - 1) / blocks, first = block * share;
  if (first >= lines) return {};
  return {data + first * (kCacheLine / static_cast<long>(sizeof(T))),
          min_long(share, lines - first)};
}

// The lines of `count` values from `data`, fetched into L1. A forward step's epilogue reads
// x·W_ihᵀ + b from a gate buffer the input GEMM filled for many steps at once (4 MiB at B=16,
// H=256), so by its step the values are mostly out of L2: prefetched when a block's product
// starts, they arrive while its FMAs run instead of stalling the epilogue (LSTM B=16, H=256, one
// core: 11% faster a call; B=16, H=512, two: 6%).
template <class T>
FASTRNN_INLINE void prefetch_values(const T* data, long count) {
  const char* bytes = reinterpret_cast<const char*>(data);
  const long size = count * static_cast<long>(sizeof(T));
  for (long line = 0; line < size; line += kCacheLine) __builtin_prefetch(bytes + line, 0, 3);
  __builtin_prefetch(bytes + size - 1, 0, 3);  // the last line, when data starts mid-line
}

// ---------------------------------------------------------------------------------------------
// The micro-kernel: acc[MR][NV] = A[MR rows, k] · panel[k, NV vectors].
// A is strided (rows of h, or a packed block with row stride 1 and column stride MR); the panel
// row k holds NV * lanes contiguous values (PV * lanes apart: a part of a wider panel, see
// multiply_panel_in_parts). One line of `prefetch` per k (the k loop reads NV * 64 bytes of the
// panel each).

template <class V, int MR, int NV, int PV = NV>
FASTRNN_INLINE void multiply_panel(long k_count, const typename V::value_type* a, long a_row_stride,
                                   long a_col_stride, const typename V::value_type* panel,
                                   V (&acc)[MR][NV],
                                   Prefetch<typename V::value_type> prefetch = {}) {
  // FMAs have a latency of ~4 cycles and two issue ports: 8 independent accumulators keep them
  // busy. Small blocks (a batch of 1 or 2) get S sets of accumulators over interleaved k.
  constexpr int S = MR * NV >= 8 ? 1 : MR * NV >= 4 ? 2 : MR * NV >= 2 ? 4 : 8;
  V sums[S][MR][NV];
  FASTRNN_UNROLL
  for (int s = 0; s < S; ++s) {
    FASTRNN_UNROLL
    for (int r = 0; r < MR; ++r) {
      FASTRNN_UNROLL
      for (int v = 0; v < NV; ++v) sums[s][r][v] = V::zero();
    }
  }
  auto step = [&](long k, V(&into)[MR][NV]) FASTRNN_LAMBDA_INLINE {
    V b[NV];
    FASTRNN_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = V::load(panel + (k * PV + v) * V::lanes);
    const typename V::value_type* a_k = a + k * a_col_stride;
    FASTRNN_UNROLL
    for (int r = 0; r < MR; ++r) {
      const V a_rk = V::set1(a_k[r * a_row_stride]);
      FASTRNN_UNROLL
      for (int v = 0; v < NV; ++v) into[r][v] = fma(a_rk, b[v], into[r][v]);
    }
  };
  constexpr long kLineValues = kCacheLine / static_cast<long>(sizeof(typename V::value_type));
  long k = 0, line = 0;
  for (; k + S <= k_count; k += S) {
    if (line < prefetch.lines) __builtin_prefetch(prefetch.data + kLineValues * line++, 0, 2);
    FASTRNN_UNROLL
    for (int s = 0; s < S; ++s) step(k + s, sums[s]);
  }
  for (; k < k_count; ++k) step(k, sums[0]);
  FASTRNN_UNROLL
  for (int r = 0; r < MR; ++r) {
    FASTRNN_UNROLL
    for (int v = 0; v < NV; ++v) {
      V total = sums[0][r][v];
      FASTRNN_UNROLL
      for (int s = 1; s < S; ++s) total = total + sums[s][r][v];
      acc[r][v] = total;
    }
  }
}

// The micro-kernel for a block of more rows than the registers hold accumulators for over a
// whole panel (AVX2: 16 registers, 3 rows x 4 vectors): the panel's column parts (Widths vectors
// each) one after the other, so that the block still reads each value of the panel once. The parts
// take turns every kPartBlockK values of k, so that they read adjacent lines of the panel
// together. Each part over the whole panel in turn strides over every other line: an LSTM's
// forward steps at B=4, H=512 (W_hh from L3) then ran 1.01-1.07x as fast as in two blocks of 2
// rows (four runs of five), against 1.19-1.21x with the turns.
constexpr long kPartBlockK = 16;
template <class V, int MR, int NV, int... Widths>
FASTRNN_INLINE void multiply_panel_in_parts(long k_count, const typename V::value_type* a,
                                            long a_row_stride, const typename V::value_type* panel,
                                            V (&acc)[MR][NV]) {
  static_assert((Widths + ...) == NV, "the parts cover the panel");
  FASTRNN_UNROLL
  for (int r = 0; r < MR; ++r) {
    FASTRNN_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  for (long k0 = 0; k0 < k_count; k0 += kPartBlockK) {
    const long k_block = min_long(kPartBlockK, k_count - k0);
    int first = 0;  // the part's first vector
    const auto part = [&]<int PV>() FASTRNN_LAMBDA_INLINE {
      V sums[MR][PV];
      multiply_panel<V, MR, PV, NV>(k_block, a + k0, a_row_stride, 1,
                                    panel + (k0 * NV + first) * V::lanes, sums);
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) {
        FASTRNN_UNROLL
        for (int v = 0; v < PV; ++v) acc[r][first + v] = acc[r][first + v] + sums[r][v];
      }
      first += PV;
    };
    (part.template operator()<Widths>(), ...);
  }
}

// acc = a block of R rows (row k of a at a + k, rows a_row_stride apart) · a panel of NV vectors:
// in one pass while R x NV accumulators fit the registers beside a panel row (kMicroRows x 4), else
// in parts: all vectors but the last, then the last, where the first part's fit; else halves of
// the panel. AVX2's 4 rows of an LSTM's 4 gate vectors as 3 + 1 have 12 accumulators in the first
// part, where halves have 8, just enough to cover the FMAs' latency: a loop of each over 512 KiB
// to 2 MiB of panels on one core made 84-90 GFLOP/s against 79-86, and an LSTM's steps at B=4,
// H=256 on one core (W_hh in L2) ran 1.039x as fast (24 alternating rounds in one process); at
// H=512, W_hh from L3, as fast as before.
template <class V, int R, int NV>
FASTRNN_INLINE void multiply_block(long k_count, const typename V::value_type* a, long a_row_stride,
                                   const typename V::value_type* panel, V (&acc)[R][NV],
                                   Prefetch<typename V::value_type> prefetch) {
  constexpr int kFit = kMicroRows * 4;
  if constexpr (R * NV <= kFit)
    multiply_panel<V, R, NV>(k_count, a, a_row_stride, 1, panel, acc, prefetch);
  // No prefetch in parts: a whole batch's block has none, and a first block's share of the next
  // panel, fetched by its first part, made steps at B=7, 16 and 64 0.96-1.01x as fast.
  else if constexpr (NV > 2 && R * (NV - 1) <= kFit)
    multiply_panel_in_parts<V, R, NV, NV - 1, 1>(k_count, a, a_row_stride, panel, acc);
  else {
    static_assert(NV % 2 == 0, "an odd panel's blocks are small enough for NV - 1 vectors");
    multiply_panel_in_parts<V, R, NV, NV / 2, NV / 2>(k_count, a, a_row_stride, panel, acc);
  }
}

// Batch 1 with a side product (StepForwardArgs::side_x): acc = h · panel, as
// multiply_panel<V, 1, NV>, and side[r] = row r of x · a vector column of a W_ih panel (row k at
// w + k * w_stride), k by k in one loop. The product with h loads a vector of W_hh from L2 per
// FMA, which leaves the FMA units half idle; the side's SR FMAs per load fill them. One set of
// accumulators suffices: the side's chains cover the FMA latency.
template <class V, int NV, int SR>
FASTRNN_INLINE void multiply_panel_with_side(long k_count, const typename V::value_type* h,
                                             const typename V::value_type* panel, V (&acc)[1][NV],
                                             long side_k, const typename V::value_type* x,
                                             long x_stride, const typename V::value_type* w,
                                             long w_stride, V (&side)[SR]) {
  FASTRNN_UNROLL
  for (int v = 0; v < NV; ++v) acc[0][v] = V::zero();
  FASTRNN_UNROLL
  for (int r = 0; r < SR; ++r) side[r] = V::zero();
  auto recurrent = [&](long k) FASTRNN_LAMBDA_INLINE {
    const V h_k = V::set1(h[k]);
    FASTRNN_UNROLL
    for (int v = 0; v < NV; ++v)
      acc[0][v] = fma(h_k, V::load(panel + (k * NV + v) * V::lanes), acc[0][v]);
  };
  auto input = [&](long k) FASTRNN_LAMBDA_INLINE {
    const V w_k = V::load(w + k * w_stride);
    FASTRNN_UNROLL
    for (int r = 0; r < SR; ++r) side[r] = fma(V::set1(x[r * x_stride + k]), w_k, side[r]);
  };
  const long both = min_long(k_count, side_k);
  for (long k = 0; k < both; ++k) {
    recurrent(k);
    input(k);
  }
  for (long k = both; k < k_count; ++k) recurrent(k);
  for (long k = both; k < side_k; ++k) input(k);
}

// Steps in a block of the side product (StepForwardArgs::side_x): the micro-kernel's rows, so that
// the side makes as many FMAs per load of W_ih as the GEMM would (no fewer than a panel's gate
// vectors, so that a panel computes at most one of them a step). 0 where it does not pay: with
// vectors smaller than a cache line (AVX2's 32 bytes), two steps of a block each fetch the same
// lines of W_ih for half of them (LSTM T150 H256 at B=1, two threads: 1.19-1.37 -> 1.46-1.76 ms).
template <class T>
constexpr int side_block_steps() {
  return Simd<T>::type::lanes * static_cast<long>(sizeof(T)) >= kCacheLine ? kMicroRows : 0;
}

// Calls body.template operator()<N>() with N = count (1 to Max) known at compile time; nothing for
// any other count.
template <int Max, class Body>
FASTRNN_INLINE void with_count(long count, Body&& body) {
  [&]<int... N>(std::integer_sequence<int, N...>) FASTRNN_LAMBDA_INLINE {
    (void)((count == N + 1 && (body.template operator()<N + 1>(), true)) || ...);
  }(std::make_integer_sequence<int, Max>{});
}

// Rows known at compile time: a block of the micro-kernel's rows, a side block's steps, a small
// GEMM's k.
template <int MR, class Body>
FASTRNN_INLINE void with_rows(long rows, Body&& body) {
  with_count<MR>(rows, body);
}

// A panel's vectors (up to 4: a generic panel, or an LSTM's gates) known at compile time.
template <class Body>
FASTRNN_INLINE void with_vectors(long vectors, Body&& body) {
  with_count<4>(vectors, body);
}

// ---------------------------------------------------------------------------------------------
// GEMM on pre-packed B: C = A·B or C += A·B. A is copied block by block into micro-panels
// (rows padded with zeros), so the micro-kernel always runs full MR rows.

constexpr long kGemmPanelVectors = 4;
// K is cut into even blocks of at most kMaxBlockK: each block of C is read and written once per
// K block, so a small tail block (K = 100 as 96 + 4) would cost a whole extra pass, and so do
// small blocks (K = 1024 in blocks of 256: 15% slower than in one). A panel's K block (up to
// 256 KiB) is streamed from L2, each load feeding MR rows of FMAs, while the next is prefetched
// from L3; the packed block of A (kBlockM x K block, 576 KiB with AVX-512) stays in L2 for all
// panels.
template <class T>
constexpr long kMaxBlockK = 4096 / static_cast<long>(sizeof(T));
constexpr long kBlockM = kMicroRows * 24;
// Rows of a transposed operand fetched ahead while packing it: each row starts a page of its own
// (dG's rows are 4 KiB apart at H=256), where the hardware prefetchers stop. With whole blocks
// of MR values copied at once, packing dGᵀ for the weight gradients went from 6.0-6.7% of an
// LSTM's training time (T=100, B=16, H=256, one core) to 3.4-3.8%.
constexpr long kPackAhead = 4;

// The row of C that row i of the product goes to (< 0: dropped).
template <class T>
FASTRNN_INLINE long c_row_index(const GemmArgs<T>& g, long i) {
  return g.c_row_of ? g.c_row_of[i] : i;
}

// C (=|+=) A·B for a K of at most kRowByRowMaxK (a single step's weight gradients: K = batch; a
// few input features), row by row of C: the blocked path's set-up of each tile of C costs more
// than the tile's few FMAs. One core, C 512 x 128 with rows scattered as a weight gradient's,
// medians: K = 1 13.7-15.1 us blocked, 4.8-5.0 row by row; K = 4 16.4 and 9.2; K = 6 18.5 and
// 11.4; K = 8 21.4 and 16.4 (C 2048 x 512: 347 and 242). An LSTMCell training step at H=128
// (two threads): 35 to 25 us.
constexpr int kRowByRowMaxK = 8;

template <class V, int K>
void gemm_row_by_row(const GemmArgs<typename V::value_type>& args) {
  using T = typename V::value_type;
  constexpr long W = V::lanes;
  // Copies: the SIMD stores may alias anything in memory, so fields read through `args` would be
  // reloaded after every store.
  const GemmArgs<T> g = args;
  const PackedPanels<T> b = *g.b_packed;
  for (long i = 0; i < g.m; ++i) {
    const long c_index = c_row_index(g, i);
    if (c_index < 0) continue;
    T* const c_row = g.c + c_index * g.ldc;
    V a_i[K];
    FASTRNN_UNROLL
    for (int k = 0; k < K; ++k) a_i[k] = V::set1(g.a.data[i * g.a.row_stride + k * g.a.col_stride]);
    for (long col0 = 0; col0 < g.n; col0 += b.panel_width) {
      // Row k of the panel at `panel` + k * width; C takes its first n columns.
      const long width = min_long(b.panel_width, b.cols - col0), n = min_long(width, g.n - col0);
      const T* const panel = b.data + col0 * b.rows;
      const auto add_products = [&](long j, V sum) FASTRNN_LAMBDA_INLINE {
        FASTRNN_UNROLL
        for (int k = 0; k < K; ++k) sum = fma(a_i[k], V::load(panel + k * width + j), sum);
        return sum;
      };
      T* const c = c_row + col0;
      const T* const bias = g.bias ? g.bias + col0 : nullptr;
      long j = 0;
      for (; j + W <= n; j += W) {
        const V start = g.accumulate ? V::load(c + j) : bias ? V::load(bias + j) : V::zero();
        add_products(j, start).store(c + j);
      }
      if (j < n) {
        const V start = g.accumulate ? load_first<V>(c + j, n - j)
                        : bias       ? load_first<V>(bias + j, n - j)
                                     : V::zero();
        store_first(c + j, add_products(j, start), n - j);
      }
    }
  }
}

// The blocked GEMM with micro-kernels of MR rows (the A block packed in micro-panels of MR rows).
template <class T, int MR>
void gemm_blocked(const GemmArgs<T>& g) {
  using V = typename Simd<T>::type;
  constexpr long W = V::lanes;
  constexpr long kInPlaceMaxPanels = 8;
  static_assert(kBlockM % MR == 0, "an A block holds whole micro-panels");
  const PackedPanels<T>& b = *g.b_packed;
  const long panels = (b.cols + b.panel_width - 1) / b.panel_width;
  const long k_blocks = (g.k + kMaxBlockK<T> - 1) / kMaxBlockK<T>;
  const long block_k = (g.k + k_blocks - 1) / k_blocks;
  const bool packed_a = g.a.col_stride != 1 || panels > kInPlaceMaxPanels;
  T* const a_block = g.a_block;
  for (long k0 = 0; k0 < g.k; k0 += block_k) {
    const long kc = min_long(block_k, g.k - k0);
    const bool accumulate = g.accumulate || k0 > 0;
    for (long m0 = 0; m0 < g.m; m0 += kBlockM) {
      const long mc = min_long(kBlockM, g.m - m0);
      // Pack A[m0:m0+mc, k0:k0+kc] into micro-panels: element (r, k) at
      // [(r / MR) * kc * MR + k * MR + r % MR], rows past mc zero. Packing pays off over many
      // panels; for a few (the gate columns of one thread at batch 1), rows of contiguous
      // elements are read in place: 4-6% faster at 4 panels, 2-4% slower at 32 or more.
      if (packed_a && g.a.row_stride == 1) {
        // A transposed operand (dGᵀ of the weight gradients): row k of the source holds the
        // block's mc values side by side, read once, line by line.
        for (long k = 0; k < kc; ++k) {
          const T* src = g.a.data + m0 + (k0 + k) * g.a.col_stride;
          if (k + kPackAhead < kc) prefetch_values(src + kPackAhead * g.a.col_stride, mc);
          long r0 = 0;
          for (; r0 + MR <= mc; r0 += MR)
            std::memcpy(a_block + r0 * kc + k * MR, src + r0, MR * sizeof(T));
          if (r0 < mc) {
            T* dst = a_block + r0 * kc + k * MR;
            for (long r = 0; r < MR; ++r) dst[r] = r0 + r < mc ? src[r0 + r] : T(0);
          }
        }
      } else if (packed_a) {
        for (long r0 = 0; r0 < mc; r0 += MR) {
          T* dst = a_block + r0 * kc;
          for (long k = 0; k < kc; ++k)
            for (long r = 0; r < MR; ++r)
              dst[k * MR + r] =
                  r0 + r < mc ? g.a.data[(m0 + r0 + r) * g.a.row_stride + (k0 + k) * g.a.col_stride]
                              : T(0);
        }
      }
      const long row_blocks = (mc + MR - 1) / MR;
      for (long p = 0; p < panels; ++p) {
        const long col0 = p * b.panel_width;
        const long width = min_long(b.panel_width, b.cols - col0);
        const T* panel = b.data + p * b.rows * b.panel_width + k0 * width;
        // The K block of the next panel, which the blocks of rows prefetch in shares.
        const long next_width = p + 1 < panels ? min_long(b.panel_width, b.cols - col0 - width) : 0;
        const T* next_panel =
            next_width > 0 ? panel + b.rows * b.panel_width + k0 * (next_width - width) : nullptr;
        const long next_bytes = kc * next_width * static_cast<long>(sizeof(T));
        with_vectors(width / W, [&]<int NV>() {
          for (long r0 = 0; r0 < mc; r0 += MR) {
            const Prefetch<T> prefetch =
                prefetch_share(next_panel, next_bytes, r0 / MR, row_blocks);
            // The last block runs only its real rows (a single row is common: batch 1).
            with_rows<MR>(min_long(MR, mc - r0), [&]<int R>() {
              // The tile's parameters as locals and its loops over rows unrolled: the SIMD
              // stores may alias anything, so captured variables were reloaded after every
              // store of C, and the accumulators went through the stack (one core, C 2048 x 512,
              // fastest of 300 calls: K = 100 1977 -> 1892 us, K = 50 1070 -> 986).
              T* const c = g.c + col0;
              const long ldc = g.ldc, cols = g.n - col0;
              const T* const bias = !accumulate && g.bias ? g.bias + col0 : nullptr;
              const bool add_c = accumulate;
              long c_rows[R];
              FASTRNN_UNROLL
              for (int r = 0; r < R; ++r) c_rows[r] = c_row_index(g, m0 + r0 + r);
              // Fetch this tile of C while the FMAs run: a weight gradient's rows (scattered
              // by c_row_of, megabytes in all) are rarely in cache, and a miss stalls the update.
              FASTRNN_UNROLL
              for (int r = 0; r < R; ++r) {
                if (c_rows[r] < 0) continue;
                FASTRNN_UNROLL
                for (int v = 0; v < NV; ++v)
                  if (v * W < cols) __builtin_prefetch(c + c_rows[r] * ldc + v * W, 1);
              }
              V acc[R][NV];
              if (packed_a)
                multiply_panel<V, R, NV>(kc, a_block + r0 * kc, 1, MR, panel, acc, prefetch);
              else
                multiply_panel<V, R, NV>(kc, g.a.data + (m0 + r0) * g.a.row_stride + k0,
                                         g.a.row_stride, 1, panel, acc, prefetch);
              FASTRNN_UNROLL
              for (int r = 0; r < R; ++r) {
                if (c_rows[r] < 0) continue;
                T* const c_row = c + c_rows[r] * ldc;
                FASTRNN_UNROLL
                for (int v = 0; v < NV; ++v) {
                  const long n = min_long(W, cols - v * W);
                  if (n <= 0) break;
                  V out = acc[r][v];
                  if (add_c)
                    out = out + load_first<V>(c_row + v * W, n);
                  else if (bias)
                    out = out + load_first<V>(bias + v * W, n);
                  store_first(c_row + v * W, out, n);
                }
              }
            });
          }
        });
      }
    }
  }
}

template <class T>
void gemm(const GemmArgs<T>& g) {
  using V = typename Simd<T>::type;
  if (g.m <= 0 || g.n <= 0) return;
  if (g.k <= 0) {
    if (!g.accumulate)
      for (long i = 0; i < g.m; ++i) {
        const long c_index = c_row_index(g, i);
        if (c_index < 0) continue;
        for (long j = 0; j < g.n; ++j) g.c[c_index * g.ldc + j] = g.bias ? g.bias[j] : T(0);
      }
    return;
  }
  if (g.k <= kRowByRowMaxK) {
    with_rows<kRowByRowMaxK>(g.k, [&]<int K>() { gemm_row_by_row<V, K>(g); });
    return;
  }
  // Panels of 3 vectors (the GRU's gate panels, in its input projection) get the steps' rows for
  // them where those differ: AVX2's 4 x 3 tile loads 7 values per 12 FMAs, its 3 x 3 tile 6 per 9
  // (GRU inference, two threads, in-process A/B: T=25, B=16, H=512 1.039x as fast a call, B=64
  // 1.041x, T=150, B=1, H=256 1.025x).
  constexpr int kRowsFor3 = forward_step_rows(3);
  if constexpr (kRowsFor3 != kMicroRows) {
    if (g.b_packed->panel_width == 3 * V::lanes) {
      gemm_blocked<T, kRowsFor3>(g);
      return;
    }
  }
  gemm_blocked<T, kMicroRows>(g);
}

// ---------------------------------------------------------------------------------------------
// Fused forward step. Per panel and block of batch rows: the recurrent product of all gates of
// the panel's hidden units, then (in registers) + x·W_ihᵀ + b, activations and the state update.
// At batch 1 the epilogue costs nothing measurable: out-of-order execution runs it under the next
// panel's stream of W_hh (with its math replaced by a plain sum, LSTM T150 B1 H256 and T100 B1
// H128 ran 0.98-1.02x as long). At larger batches it shares the FMA units with the product.

template <class V, int U>
struct LstmForwardEpilogue {
  using T = typename V::value_type;
  const StepForwardArgs<T>& s;

  template <int MR>
  FASTRNN_INLINE void operator()(const V (&acc)[MR][4 * U], long row0, long panel) const {
    const Layout& L = *s.layout;
    const long hb = L.panel_hidden;
    FASTRNN_UNROLL
    for (int u = 0; u < U; ++u) {
      const long j = panel * hb + u * V::lanes;
      const long n = min_long(V::lanes, L.hidden - j);
      T* gates[MR];
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r)
        gates[r] = s.gates + (row0 + r) * L.gate_stride + panel * 4 * hb + u * V::lanes;
      // Stage by stage over the rows, so that the rows' independent activations sit next to
      // each other in the instruction stream, within reach of out-of-order execution: row by
      // row, each row's chain (gates, then c, then tanh c) left the FP units half idle.
      V i[MR], f[MR], g[MR], o[MR], c[MR];
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) i[r] = sigmoid(acc[r][0 * U + u] + V::load(gates[r] + 0 * hb));
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) f[r] = sigmoid(acc[r][1 * U + u] + V::load(gates[r] + 1 * hb));
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) g[r] = tanh(acc[r][2 * U + u] + V::load(gates[r] + 2 * hb));
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) o[r] = sigmoid(acc[r][3 * U + u] + V::load(gates[r] + 3 * hb));
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) {
        const long state = (row0 + r) * L.hidden_padded + j;
        c[r] = fma(f[r], V::load(s.c_prev + state), i[r] * g[r]);
        c[r].store(s.c_next + state);
      }
      FASTRNN_UNROLL
      for (int r = 0; r < MR; ++r) {
        const V h = o[r] * tanh(c[r]);
        if (n > 0) store_first(s.h_next + (row0 + r) * s.h_next_stride + j, h, n);
      }
      if (s.store_gates) {
        FASTRNN_UNROLL
        for (int r = 0; r < MR; ++r) {
          i[r].store(gates[r] + 0 * hb);
          f[r].store(gates[r] + 1 * hb);
          g[r].store(gates[r] + 2 * hb);
          o[r].store(gates[r] + 3 * hb);
        }
      }
    }
  }
};

// torch.nn.GRU: r = σ(.), z = σ(.), n = tanh(x·W_inᵀ + b_in + r * (h·W_hnᵀ + b_hn)),
// h' = (1 - z) * n + z * h = n + z * (h - n).
template <class V>
struct GruForwardEpilogue {
  using T = typename V::value_type;
  const StepForwardArgs<T>& s;

  template <int MR>
  FASTRNN_INLINE void operator()(const V (&acc)[MR][3], long row0, long panel) const {
    const Layout& L = *s.layout;
    const long hb = L.panel_hidden;
    const long j = panel * hb;
    const long n = min_long(V::lanes, L.hidden - j);
    const V bias_hn = s.bias_hn ? V::load(s.bias_hn + j) : V::zero();
    FASTRNN_UNROLL
    for (long r = 0; r < MR; ++r) {
      const long row = row0 + r;
      T* gates = s.gates + row * L.gate_stride + panel * 3 * hb;
      const V reset = sigmoid(acc[r][0] + V::load(gates + 0 * hb));
      const V update = sigmoid(acc[r][1] + V::load(gates + 1 * hb));
      const V hidden_n = acc[r][2] + bias_hn;
      const V candidate = tanh(fma(reset, hidden_n, V::load(gates + 2 * hb)));
      const V h_prev =
          s.h_prev && n > 0 ? load_first<V>(s.h_prev + row * s.h_prev_stride + j, n) : V::zero();
      const V h = fma(update, h_prev - candidate, candidate);
      if (n > 0) store_first(s.h_next + row * s.h_next_stride + j, h, n);
      if (s.store_gates) {
        reset.store(gates + 0 * hb);
        update.store(gates + 1 * hb);
        candidate.store(gates + 2 * hb);
        hidden_n.store(s.hidden_gate + row * L.hidden_padded + j);
      }
    }
  }
};

template <class V, int U, bool kRelu>
struct RnnForwardEpilogue {
  using T = typename V::value_type;
  const StepForwardArgs<T>& s;

  template <int MR>
  FASTRNN_INLINE void operator()(const V (&acc)[MR][U], long row0, long panel) const {
    const Layout& L = *s.layout;
    FASTRNN_UNROLL
    for (long r = 0; r < MR; ++r) {
      const long row = row0 + r;
      const T* gates = s.gates + row * L.gate_stride + panel * L.panel_hidden;
      FASTRNN_UNROLL
      for (int u = 0; u < U; ++u) {
        const long j = panel * L.panel_hidden + u * V::lanes;
        const long n = min_long(V::lanes, L.hidden - j);
        if (n <= 0) break;
        const V z = acc[r][u] + V::load(gates + u * V::lanes);
        store_first(s.h_next + row * s.h_next_stride + j, kRelu ? relu(z) : tanh(z), n);
      }
    }
  }
};

// How a step's batch splits into blocks of rows: a batch of up to Widest rows is one block (wider
// than MR where the ISA multiplies it in parts, see single_block_rows); more rows go in blocks of
// MR. A tail of fewer than MR rows joins the first block where that stays within Widest (AVX2's
// LSTM: 16 as 4 + 3 + 3 + 3 + 3, not 3 + 3 + 3 + 3 + 2 + 2). Else, when the last block would hold
// fewer than MR / 2 rows, blocks of near-equal size: a block of 1 or 2 rows loads a vector of the
// panel per 1 or 2 FMAs (AVX-512, H=256, the steps alone on one thread: LSTM B=8 as 4 + 4 rows
// instead of 6 + 2, 7.6% faster; B=13 as 5 + 4 + 4, 7.6%; B=20, 5.3%; GRU B=8, 18%. An LSTM at
// B=16 with lengths between T/2 and T, whose batch shrinks step by step: 17% a call in inference).
template <int MR, int Widest>
struct RowBlocks {
  long batch, count, first = 0;
  bool even = false;
  explicit RowBlocks(long rows) : batch(rows) {
    const long tail = batch % MR;
    if (batch <= Widest) {
      first = batch;
      count = 1;
    } else if (tail != 0 && MR + tail <= Widest) {
      first = MR + tail;
      count = 1 + (batch - first) / MR;
    } else {
      count = (batch + MR - 1) / MR;
      even = tail != 0 && 2 * tail < MR;
    }
  }
  // The rows of block `block`, which starts at row row0.
  long rows(long block, long row0) const {
    if (first > 0) return block == 0 ? first : MR;
    return even ? batch / count + (block < batch % count) : min_long(MR, batch - row0);
  }
};

// Panel i of [first, last) in the order a step runs them (see StepForwardArgs::descending).
FASTRNN_INLINE long panel_in_order(bool descending, long first, long last, long i) {
  return descending ? first + last - 1 - i : i;
}

template <class V, int NV, class Epilogue>
void run_step_forward(const StepForwardArgs<typename V::value_type>& args) {
  using T = typename V::value_type;
  constexpr int MR = forward_step_rows(NV);
  constexpr int single_block = single_block_rows(NV);
  constexpr long W = V::lanes;
  const long panel_size = args.layout->output * NV * W;
  // Panels [first, last) for R rows from row0, with a side product of SR rows if SR > 0 (then
  // R = 1). The body works on a copy of the arguments: the SIMD stores may alias anything in
  // memory, so fields read through `args` would be reloaded after every store.
  auto panels = [&]<int R, int SR>(long row0, long first, long last, Prefetch<T> prefetch) {
    const StepForwardArgs<T> s = args;
    const Epilogue epilogue{s};
    const Layout& L = *s.layout;
    // The units of h_prev this call multiplies: [k0, k1) and [k2, k3).
    long k0 = 0, k1 = s.h_prev ? L.output : 0, k2 = 0, k3 = 0;
    if (s.part == StepPart::own_units) {
      k0 = s.own_begin;
      k1 = s.own_end;
    } else if (s.part == StepPart::other_units) {
      k1 = s.own_begin;
      k2 = s.own_end;
      k3 = L.output;
    }
    const T* h = s.h_prev ? s.h_prev + row0 * s.h_prev_stride : nullptr;
    // acc = h[R rows, units [k_begin, k_end)] · the panel's rows for those units.
    auto multiply = [&](long k_begin, long k_end, const T* panel, V(&acc)[R][NV],
                        Prefetch<T> prefetch) FASTRNN_LAMBDA_INLINE {
      multiply_block<V, R, NV>(k_end - k_begin, h + k_begin, s.h_prev_stride,
                               panel + k_begin * NV * W, acc, prefetch);
    };
    for (long i = first; i < last; ++i) {
      const long p = panel_in_order(s.descending, first, last, i);
      const T* panel = s.w_hh + p * panel_size;
      if (s.part != StepPart::own_units) {  // the epilogue's inputs: the panel's gate columns, c
        FASTRNN_UNROLL
        for (int r = 0; r < R; ++r) {
          prefetch_values(s.gates + (row0 + r) * L.gate_stride + p * NV * W, NV * W);
          if (s.c_prev)
            prefetch_values(s.c_prev + (row0 + r) * L.hidden_padded + p * L.panel_hidden,
                            L.panel_hidden);
        }
      }
      V acc[R][NV];
      bool multiplied = false;
      if constexpr (SR > 0) {
        // The panel's share of the side product: its gate vector whose index is congruent to the
        // step's phase, modulo the block (over a block's steps, every gate vector once), if any.
        constexpr long block = side_block_steps<T>();
        const long v = ((s.side_phase - p * NV) % block + block) % block;
        if (v < NV) {
          V side[SR];
          multiply_panel_with_side<V, NV, SR>(k1 - k0, h + k0, panel + k0 * NV * W, acc, L.input,
                                              s.side_x, s.side_x_stride,
                                              s.w_ih + (p * L.input * NV + v) * W, NV * W, side);
          const long column = (p * NV + v) * W;
          const V bias = V::load(s.bias + column);
          FASTRNN_UNROLL
          for (int r = 0; r < SR; ++r)
            (side[r] + bias).store(s.side_gates + r * L.gate_stride + column);
          multiplied = true;
        }
      }
      if (!multiplied) multiply(k0, k1, panel, acc, prefetch);
      if (s.part == StepPart::own_units) {
        T* partial = s.partial_sums + row0 * L.gate_stride + p * NV * W;
        FASTRNN_UNROLL
        for (int r = 0; r < R; ++r) {
          FASTRNN_UNROLL
          for (int v = 0; v < NV; ++v) acc[r][v].store(partial + r * L.gate_stride + v * W);
        }
        continue;
      }
      if (s.part == StepPart::other_units) {
        const T* partial = s.partial_sums + row0 * L.gate_stride + p * NV * W;
        V more[R][NV];
        multiply(k2, k3, panel, more, {});
        FASTRNN_UNROLL
        for (int r = 0; r < R; ++r) {
          FASTRNN_UNROLL
          for (int v = 0; v < NV; ++v)
            acc[r][v] = acc[r][v] + more[r][v] + V::load(partial + r * L.gate_stride + v * W);
        }
      }
      epilogue.template operator()<R>(acc, row0, p);
    }
  };
  // A batch of up to single_block rows runs every panel in one call of the row-count dispatch: a
  // call per panel costs 3% of a batch-1 LSTM step at H=128 in set-up. More rows: blocks of MR,
  // panel by panel, so that all row blocks use a panel while it is in cache.
  if constexpr (side_block_steps<T>() > 0) {
    static_assert(side_block_steps<T>() >= NV, "a panel's gate vectors take a step each");
    if (args.side_x) {
      with_rows<side_block_steps<T>()>(args.side_rows, [&]<int SR>() {
        panels.template operator()<1, SR>(0, args.panel_begin, args.panel_end, {});
      });
      return;
    }
  }
  if (args.batch <= single_block) {
    with_rows<single_block>(args.batch, [&]<int R>() {
      panels.template operator()<R, 0>(0, args.panel_begin, args.panel_end, {});
    });
    return;
  }
  // The row blocks of a panel prefetch the next panel in shares (see Prefetch).
  const long panel_bytes = panel_size * static_cast<long>(sizeof(T));
  const RowBlocks<MR, single_block> blocks(args.batch);
  const auto in_order = [&](long i) {
    return panel_in_order(args.descending, args.panel_begin, args.panel_end, i);
  };
  for (long i = args.panel_begin; i < args.panel_end; ++i) {
    const long p = in_order(i);
    const T* next_panel =
        i + 1 < args.panel_end ? args.w_hh + in_order(i + 1) * panel_size : nullptr;
    long row0 = 0;
    for (long block = 0; block < blocks.count; ++block) {
      const long rows = blocks.rows(block, row0);
      const Prefetch<T> prefetch =
          next_panel ? prefetch_share(next_panel, panel_bytes, block, blocks.count) : Prefetch<T>{};
      with_rows<single_block>(
          rows, [&]<int R>() { panels.template operator()<R, 0>(row0, p, p + 1, prefetch); });
      row0 += rows;
    }
  }
}

template <class T>
void step_forward(const StepForwardArgs<T>& s) {
  using V = typename Simd<T>::type;
  switch (s.layout->cell) {
    case Cell::lstm: run_step_forward<V, 4, LstmForwardEpilogue<V, 1>>(s); break;
    case Cell::gru: run_step_forward<V, 3, GruForwardEpilogue<V>>(s); break;
    case Cell::rnn_tanh:
      with_vectors(s.layout->panel_vectors,
                   [&]<int U>() { run_step_forward<V, U, RnnForwardEpilogue<V, U, false>>(s); });
      break;
    case Cell::rnn_relu:
      with_vectors(s.layout->panel_vectors,
                   [&]<int U>() { run_step_forward<V, U, RnnForwardEpilogue<V, U, true>>(s); });
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Fused backward step. Per block of hidden units and batch rows: dh = dG_{t+1}·W_hh (micro-kernel)
// + the output's gradient, then (in registers) the gradients of the gate pre-activations.

template <class V>
struct LstmBackwardEpilogue {
  using T = typename V::value_type;
  FASTRNN_INLINE void operator()(const StepBackwardArgs<T>& s, V dh, long row, long j) const {
    const Layout& L = *s.layout;
    const long hb = L.panel_hidden;
    T* gates = s.gates + row * L.gate_stride + (j / hb) * 4 * hb + j % hb;
    const long state = row * L.hidden_padded + j;
    const V one = V::set1(1);
    const V i = V::load(gates + 0 * hb), f = V::load(gates + 1 * hb);
    const V g = V::load(gates + 2 * hb), o = V::load(gates + 3 * hb);
    const V tanh_c = tanh(V::load(s.c + state));
    const V dc = fma(dh * o, one - tanh_c * tanh_c, V::load(s.grad_c + state));
    (dc * f).store(s.grad_c + state);
    (dc * g * i * (one - i)).store(gates + 0 * hb);
    (dc * V::load(s.c_prev + state) * f * (one - f)).store(gates + 1 * hb);
    (dc * i * (one - g * g)).store(gates + 2 * hb);
    (dh * tanh_c * o * (one - o)).store(gates + 3 * hb);
  }
};

// dh arrives without the path h_t -> h_{t+1} through z, which the previous step (t+1) left in
// grad_h_carry. The n gate's gradient differs on the two sides of r * (W_hn·h + b_hn): the gate
// buffer gets the recurrent side's (for dh_{t-1} and dW_hh), hidden_gate the input side's.
template <class V>
struct GruBackwardEpilogue {
  using T = typename V::value_type;
  FASTRNN_INLINE void operator()(const StepBackwardArgs<T>& s, V dh, long row, long j) const {
    const Layout& L = *s.layout;
    const long hb = L.panel_hidden;
    T* gates = s.gates + row * L.gate_stride + (j / hb) * 3 * hb + j % hb;
    const long state = row * L.hidden_padded + j;
    const long n = min_long(V::lanes, L.hidden - j);
    const V one = V::set1(1);
    const V reset = V::load(gates + 0 * hb), update = V::load(gates + 1 * hb);
    const V candidate = V::load(gates + 2 * hb);
    const V hidden_n = V::load(s.hidden_gate + state);
    const V h_prev = n > 0 ? load_first<V>(s.h_prev + row * L.hidden + j, n) : V::zero();
    dh = dh + V::load(s.grad_h_carry + state);
    const V grad_candidate = dh * (one - update) * (one - candidate * candidate);
    const V grad_update = dh * (h_prev - candidate) * update * (one - update);
    const V grad_reset = grad_candidate * hidden_n * reset * (one - reset);
    (dh * update).store(s.grad_h_carry + state);
    grad_reset.store(gates + 0 * hb);
    grad_update.store(gates + 1 * hb);
    (grad_candidate * reset).store(gates + 2 * hb);
    grad_candidate.store(s.hidden_gate + state);
  }
};

template <class V, bool kRelu>
struct RnnBackwardEpilogue {
  using T = typename V::value_type;
  FASTRNN_INLINE void operator()(const StepBackwardArgs<T>& s, V dh, long row, long j) const {
    const Layout& L = *s.layout;
    const long n = min_long(V::lanes, L.hidden - j);
    const V h = n > 0 ? load_first<V>(s.h + row * L.hidden + j, n) : V::zero();
    const V dz = kRelu ? select_lt(V::zero(), h, dh, V::zero()) : dh * (V::set1(1) - h * h);
    dz.store(s.gates + row * L.gate_stride + j);  // one gate: the panel column is the hidden unit
  }
};

template <class V, class Epilogue>
void run_step_backward(const StepBackwardArgs<typename V::value_type>& s,
                       const Epilogue& epilogue) {
  using T = typename V::value_type;
  constexpr int MR = kMicroRows;
  constexpr long W = V::lanes;
  const Layout& L = *s.layout;
  const PackedPanels<T>& w = *s.w_hh_t;
  constexpr int single_block = single_block_rows(kGemmPanelVectors);
  const long next_batch = min_long(s.next_batch, s.batch);
  // Several row blocks prefetch the next panel in shares (see Prefetch).
  const RowBlocks<MR, single_block> blocks(next_batch);
  // Panels first to last on every step: alternating the order as the forward step does
  // (StepForwardArgs::descending) changed nothing here (training at B=1, 4 and 16: 0.99-1.01x).
  for (long col0 = s.col_begin; col0 < s.col_end; col0 += w.panel_width) {
    const long width = min_long(w.panel_width, w.cols - col0);
    const T* panel = w.data + (col0 / w.panel_width) * w.rows * w.panel_width;
    const long next_width = min_long(w.panel_width, min_long(s.col_end, w.cols) - col0 - width);
    const long next_bytes =
        blocks.count > 1 && next_width > 0 ? w.rows * next_width * static_cast<long>(sizeof(T)) : 0;
    // Rows [0, next_batch) continue to step t+1 and take its gradient through W_hh; the others end
    // here and take dL/dh_n instead. Row blocks never straddle the two.
    for (long row0 = 0, block = 0; row0 < s.batch; ++block) {
      const bool continues = row0 < next_batch;
      const long rows = continues ? blocks.rows(block, row0) : min_long(MR, s.batch - row0);
      with_rows<single_block>(rows, [&]<int R>() {
        with_vectors(width / W, [&]<int NV>() {
          V acc[R][NV];
          const long k_count = continues ? w.rows : 0;
          const long a_stride = s.grad_gates_next_stride;
          const T* a = continues ? s.grad_gates_next + row0 * a_stride : nullptr;
          const Prefetch<T> prefetch =
              next_bytes > 0 && continues
                  ? prefetch_share(panel + w.rows * w.panel_width, next_bytes, block, blocks.count)
                  : Prefetch<T>{};
          multiply_block<V, R, NV>(k_count, a, a_stride, panel, acc, prefetch);
          for (long r = 0; r < R; ++r) {
            const long row = row0 + r;
            FASTRNN_UNROLL
            for (int v = 0; v < NV; ++v) {
              const long j = col0 + v * W;
              const long n = min_long(W, L.hidden - j);
              V dh = acc[r][v];
              if (n > 0 && s.grad_out)
                dh = dh + load_first<V>(s.grad_out + row * s.grad_out_stride + j, n);
              if (n > 0 && !continues && s.grad_h_last)
                dh = dh + load_first<V>(s.grad_h_last + row * L.hidden + j, n);
              epilogue(s, dh, row, j);
            }
          }
        });
      });
      row0 += rows;
    }
  }
}

template <class T>
void step_backward(const StepBackwardArgs<T>& s) {
  using V = typename Simd<T>::type;
  switch (s.layout->cell) {
    case Cell::lstm: run_step_backward<V>(s, LstmBackwardEpilogue<V>{}); break;
    case Cell::gru: run_step_backward<V>(s, GruBackwardEpilogue<V>{}); break;
    case Cell::rnn_tanh: run_step_backward<V>(s, RnnBackwardEpilogue<V, false>{}); break;
    case Cell::rnn_relu: run_step_backward<V>(s, RnnBackwardEpilogue<V, true>{}); break;
  }
}

// ---------------------------------------------------------------------------------------------

template <class T>
void activation(Activation kind, const T* in, T* out, long n) {
  using V = typename Simd<T>::type;
  for (long i = 0; i < n; i += V::lanes) {
    const long count = min_long(V::lanes, n - i);
    const V x = load_first<V>(in + i, count);
    const V y = kind == Activation::sigmoid ? sigmoid(x)
                : kind == Activation::tanh  ? tanh(x)
                                            : relu(x);
    store_first(out + i, y, count);
  }
}

// As many chains as the micro-kernel has accumulators (kMicroRows x 4, in two nested loops that
// unroll): enough to cover the FMA latency on every ISA, and they fit in the registers.
constexpr int kFmaChains = kMicroRows * 4;

template <class T>
T fma_loop(long iterations) {
  using V = typename Simd<T>::type;
  V chains[kMicroRows][4];
  FASTRNN_UNROLL
  for (int r = 0; r < kMicroRows; ++r) {
    FASTRNN_UNROLL
    for (int v = 0; v < 4; ++v) chains[r][v] = V::set1(static_cast<T>(4 * r + v));
  }
  // x * 0.75 + 0.125 converges to 0.5: the values stay normal however many rounds run.
  const V scale = V::set1(T(0.75)), offset = V::set1(T(0.125));
  for (long i = 0; i < iterations; ++i) {
    FASTRNN_UNROLL
    for (int r = 0; r < kMicroRows; ++r) {
      FASTRNN_UNROLL
      for (int v = 0; v < 4; ++v) chains[r][v] = fma(chains[r][v], scale, offset);
    }
  }
  V total = V::zero();
  FASTRNN_UNROLL
  for (int r = 0; r < kMicroRows; ++r) {
    FASTRNN_UNROLL
    for (int v = 0; v < 4; ++v) total = total + chains[r][v];
  }
  T lanes[V::lanes];
  total.store(lanes);
  return lanes[0];
}

template <class T>
constexpr KernelTable<T> make_table() {
  return {Simd<T>::type::lanes,
          kMicroRows,
          side_block_steps<T>(),
          static_cast<int>(kGemmPanelVectors),
          kBlockM,
          kBlockM * kMaxBlockK<T>,
          &gemm<T>,
          &step_forward<T>,
          &step_backward<T>,
          &activation<T>,
          kFmaChains,
          &fma_loop<T>};
}

#undef FASTRNN_INLINE
#undef FASTRNN_LAMBDA_INLINE
#undef FASTRNN_UNROLL

}  // namespace FASTRNN_ISA_NAMESPACE
}  // namespace fastrnn

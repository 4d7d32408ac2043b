// The time loops: one forward and one backward driver for every cell and ISA. The math lives in
// the kernels (src/kernels/kernel_body.h); this file orders the calls, owns the buffers and
// shares the work between the threads of the pool.
//
// Two ways to share a time step (performance.md, technique 6):
// - hidden split (small batch): each thread owns a contiguous range of hidden-unit panels, so its
//   slices of W_ih and W_hh stay in its own L2; it also computes x·W_ihᵀ for its own gate columns,
//   so only h needs a barrier per step; from batch 4, a thread done with its own panels of a step
//   takes some of another's (PanelRanges);
// - batch split (large batch): each thread owns a range of batch rows and runs the whole time loop
//   on them with no barrier; the input projection is shared by rows.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastrnn/dispatch.h"
#include "fastrnn/fp_env.h"
#include "fastrnn/layer.h"
#include "fastrnn/thread_pool.h"
#include "panels.h"

namespace fastrnn {
namespace {

// Inference computes x·W_ihᵀ for a chunk of time steps at a time, bounding the gate buffer.
constexpr long kInferenceGateElements = 1L << 20;
// Below this many multiply-adds per time step a barrier costs more than a second thread saves
// (and on a busy machine a barrier can wait for a descheduled thread: small layers stay on one),
// and below kParallelCallWork in all, so does starting a parallel region (~1 us). A single step
// at B=1 from 2^17 (an LSTM cell at H=128) streams its weights from two L2s in parallel: 9.6 to
// 6.5 us (GRU H=160: 10.1 to 6.6 us); at 2^16 an LSTM cell at H=96 got slower (4.8 to 8.6 us).
constexpr long kParallelStepWork = 1L << 16;
constexpr long kParallelCallWork = 1L << 17;
// Rows per thread from which the batch split wins (no barrier, the micro-kernel's rows full),
// twice as many when W_hh is larger than a core's L2: split by batch, each thread streams all of
// W_hh from L3 every step; split by hidden units, only its share, for twice the rows (LSTM
// H=1024: 12% faster by hidden units at B=64, even at B=128; H=512: 4% at B=64).
constexpr long kBatchSplitRows = 32;
// Up to this many multiply-adds of the recurrent product a thread and step, a hidden-split step
// runs in two calls, the thread's own units of h_{t-1} first, so that the wait for the other
// threads' units overlaps with half of the product. Longer steps run whole and meet at a barrier:
// the two calls run each panel in two halves at different times, so a step never starts on the
// panels the previous one left in cache, and each half starts the prefetchers afresh. In-process
// A/B at two threads, 9-21 interleaved rounds, medians: two calls faster at B=1 for LSTM H=96
// (18K a thread, 10%), H=160 (4%), RNN H=256 (6%), even at LSTM H=128 (32K); whole steps faster
// for GRU H=256 at B=1 (98K, 4-13%), LSTM H=256 (131K, 1-2%), H=512 (7%), H=1024 (11%), LSTM
// H=128 at B=4 (12%), LSTM H=512 at B=4 (5%), LSTM H=256 at B=8 (4%) and B=16 (5%), LSTM and GRU
// H=512 at B=16 (2%).
constexpr long kProgressStepWork = 1L << 16;
// The side product (batch 1) pays while a thread's share of W_ih and W_hh is at most this many
// times its L2 (1 MiB here). LSTM inference at B=1 against a GEMM before the steps, medians of 3
// alternating runs: two threads, H=256 (1 MiB a thread) -10%, H=512 (4 MiB) -5%, H=640 (6.5 MiB)
// mixed, H=768 (9.4 MiB) +28%, H=1024 (16 MiB: W_ih and W_hh fill the 32 MiB L3) +90%; one
// thread, H=256 (2 MiB) -10%, H=512 (8 MiB) mixed.
constexpr long kSideProductL2s = 4;
// Up to this much of W_hh a thread, a step's last panels are still in L1 (32-48 KiB) when the next
// step starts on them.
constexpr long kL1Reuse = 128 << 10;
// From this batch up, the threads of a hidden split share each step's panels by work stealing
// (PanelRanges), so that a core slowed down by another guest does fewer of them. At batch 1 the
// steps stream W_hh from each core's own L2, where a stolen panel would come from the other's:
// with stealing, LSTM T=150 H=256 0.98x as fast, GRU T=150 H=256 1.01x, LSTM T=100 H=128 1.00x
// (in-process A/B, two threads).
constexpr long kStealBatch = 4;

template <class T>
void copy_rows(T* dst, long dst_stride, const T* src, long src_stride, long rows, long cols) {
  for (long r = 0; r < rows; ++r)
    std::memcpy(dst + r * dst_stride, src + r * src_stride,
                static_cast<std::size_t>(cols) * sizeof(T));
}

// Panels [first, last) of a packed matrix, as a packed matrix of their own.
template <class T>
PackedPanels<T> panel_range(const PackedPanels<T>& b, long first, long last) {
  const long col0 = first * b.panel_width;
  return {b.data + col0 * b.rows, b.rows, std::min(b.cols, last * b.panel_width) - col0,
          b.panel_width};
}

template <class T>
long panel_count(const PackedPanels<T>& b) {
  return (b.cols + b.panel_width - 1) / b.panel_width;
}

// Where a GEMM writes: C = bias + A·B, or C += A·B with `accumulate`; with c_row_of, row i of
// the product goes to C row c_row_of[i] (< 0: dropped).
template <class T>
struct GemmOutput {
  T* c;
  long ldc;
  const T* bias = nullptr;
  bool accumulate = false;
  const long* c_row_of = nullptr;
};

// The output columns of panels [first, last) of B: C[:, cols] (=|+=) A·B[:, cols].
template <class T>
void gemm_panels(const KernelTable<T>& k, T* a_block, long m, long n, long kk, StridedMatrix<T> a,
                 const PackedPanels<T>& b, long first, long last, const GemmOutput<T>& out) {
  const long col0 = first * b.panel_width;
  if (first >= last || col0 >= n) return;
  const PackedPanels<T> part = panel_range(b, first, last);
  k.gemm({m, std::min(n - col0, part.cols), kk, a, &part, out.c + col0, out.ldc, out.accumulate,
          out.bias ? out.bias + col0 : nullptr, out.c_row_of, a_block});
}

// A GEMM's blocks of rows, handed out one at a time to whichever thread asks first.
struct alignas(64) BlockCounter {
  std::atomic<long> next{0};
};

// This thread's part of a GEMM: by rows (in eights) or by B's panels, whichever leaves the
// busiest thread the smaller share. A short GEMM split by rows idles a thread: M = 100 on two
// threads is 56 + 44 rows, while its 8 panels split evenly (and each thread streams half of B).
// Given `blocks` (a counter of its own, zero when the region starts), a GEMM of at least
// kMinSharedBlocks of the kernel's blocks of rows a thread hands them out one by one instead, so
// that a core slowed down by another guest does fewer (as PanelRanges for the steps): which rows
// a block holds does not depend on the threads, nor do the results.
constexpr long kMinSharedBlocks = 4;
template <class T>
void gemm_part(const KernelTable<T>& k, T* a_block, const ThreadContext& ctx, long m, long n,
               long kk, StridedMatrix<T> a, const PackedPanels<T>& b, const GemmOutput<T>& out,
               BlockCounter* blocks = nullptr) {
  if (m <= 0 || n <= 0) return;
  const auto multiply_rows = [&](long begin, long end) {
    StridedMatrix<T> rows{a.data + begin * a.row_stride, a.row_stride, a.col_stride};
    T* c = out.c_row_of ? out.c : out.c + begin * out.ldc;
    const long* c_row_of = out.c_row_of ? out.c_row_of + begin : nullptr;
    k.gemm({end - begin, n, kk, rows, &b, c, out.ldc, out.accumulate, out.bias, c_row_of, a_block});
  };
  const long block_rows = k.gemm_block_rows;
  if (blocks && ctx.count > 1 && m >= kMinSharedBlocks * block_rows * ctx.count) {
    for (;;) {
      const long begin = blocks->next.fetch_add(1, std::memory_order_relaxed) * block_rows;
      if (begin >= m) return;
      multiply_rows(begin, std::min(m, begin + block_rows));
    }
  }
  const long row_units = (m + 7) / 8;
  const long panels = std::min(panel_count(b), (n + b.panel_width - 1) / b.panel_width);
  const auto most = [&](long units) { return (units + ctx.count - 1) / ctx.count; };
  long begin = 0, end = 0;
  // most(rows) / rows <= most(panels) / panels, without division
  if (ctx.count == 1 || most(row_units) * panels <= most(panels) * row_units) {
    ctx.split(m, 8, begin, end);
    if (begin < end) multiply_rows(begin, end);
  } else {
    ctx.split(panels, 1, begin, end);
    gemm_panels(k, a_block, m, n, kk, a, b, begin, end, out);
  }
}

// Threads for a time loop of `steps` steps of `step_work` multiply-adds each, in a call that
// does `passes` times that work (backward: dh, dW_ih and dW_hh).
int threads_for(long steps, long step_work, long passes) {
  const long work = passes * steps * step_work;
  if (step_work < kParallelStepWork || work < kParallelCallWork) return 1;
  ThreadPool& pool = ThreadPool::global();
  return pool.use_workers(work) ? pool.threads() : 1;
}

// Whether a time loop of `batch` rows on `threads` threads splits the batch, not the hidden units.
template <class T>
bool split_by_batch(const PackedLayer<T>& p, long batch, int threads) {
  const bool w_hh_in_l2 = static_cast<long>(p.w_hh.size() * sizeof(T)) <= l2_cache_bytes();
  return batch >= kBatchSplitRows * (w_hh_in_l2 ? 1 : 2) * threads;
}

// Rows of a [rows, cols] matrix gathered (dst[r] = src[from[r]]) or scattered (dst[to[r]] =
// src[r]).
template <class T>
void gather_rows(T* dst, const T* src, const std::vector<long>& from, long cols) {
  for (std::size_t r = 0; r < from.size(); ++r)
    std::memcpy(dst + static_cast<long>(r) * cols, src + from[r] * cols,
                static_cast<std::size_t>(cols) * sizeof(T));
}
template <class T>
void scatter_rows(T* dst, long dst_stride, const T* src, const std::vector<long>& to, long cols) {
  for (std::size_t r = 0; r < to.size(); ++r)
    std::memcpy(dst + to[r] * dst_stride, src + static_cast<long>(r) * cols,
                static_cast<std::size_t>(cols) * sizeof(T));
}

// Round t's panels on this thread (a step's, or a chunk's input GEMM's), if it has rows: its own,
// claimed from the front (from the back when the step runs descending), then those it steals from
// the other threads. Then its own range [own_first, own_last) is set for the next round, of the
// other parity.
template <class Run>
void share_panels(const ThreadContext& ctx, PanelRanges& ranges, long t, bool descending,
                  bool has_rows, long own_first, long own_last, Run&& run) {
  const int parity = static_cast<int>(t % 2);
  long first = 0, last = 0;
  if (has_rows) {
    while (ranges.claim(parity, ctx.index, descending, first, last)) run(first, last);
    for (int i = 1; i < ctx.count; ++i)
      while (ranges.steal(parity, (ctx.index + i) % ctx.count, descending, first, last))
        run(first, last);
  }
  ranges.reset(1 - parity, ctx.index, own_first, own_last);
}

}  // namespace

long step_multiply_adds(const Layout& L) {
  const long projection = L.output != L.hidden ? L.hidden * L.output : 0;
  return L.gate_stride * (L.input + L.output) + projection;
}

Sequences Sequences::uniform(long steps, long batch) {
  Sequences s;
  s.steps = steps;
  s.batch = batch;
  s.sizes.assign(static_cast<std::size_t>(steps), batch);
  s.offset.resize(static_cast<std::size_t>(steps + 1));
  for (long t = 0; t <= steps; ++t) s.offset[t] = t * batch;
  s.length.assign(static_cast<std::size_t>(batch), steps);
  return s;
}

Sequences Sequences::from_batch_sizes(const long* sizes, long steps) {
  if (steps < 1) throw std::invalid_argument("batch_sizes must not be empty");
  Sequences s;
  s.steps = steps;
  s.batch = sizes[0];
  s.sizes.assign(sizes, sizes + steps);
  s.offset.resize(static_cast<std::size_t>(steps + 1));
  s.offset[0] = 0;
  for (long t = 0; t < steps; ++t) {
    if (sizes[t] < 1 || (t > 0 && sizes[t] > sizes[t - 1]))
      throw std::invalid_argument("batch_sizes must be positive and non-increasing, got " +
                                  std::to_string(sizes[t]) + " at step " + std::to_string(t) +
                                  (t > 0 ? " after " + std::to_string(sizes[t - 1]) : ""));
    s.offset[t + 1] = s.offset[t] + sizes[t];
  }
  s.length.assign(static_cast<std::size_t>(s.batch), 0);
  for (long t = 0; t < steps; ++t) s.length[sizes[t] - 1] = t + 1;  // the last step with that row
  for (long b = s.batch - 2; b >= 0; --b) s.length[b] = std::max(s.length[b], s.length[b + 1]);
  return s;
}

std::vector<long> Sequences::reversed_rows() const {
  std::vector<long> rows_of(static_cast<std::size_t>(rows()));
  for (long t = 0; t < steps; ++t)
    for (long b = 0; b < sizes[t]; ++b) rows_of[offset[t] + b] = offset[length[b] - 1 - t] + b;
  return rows_of;
}

template <class T>
void forward(const std::shared_ptr<const PackedLayer<T>>& layer, const Sequences& seq, bool reverse,
             const T* x_in, const T* h0, const T* c0, T* out_in, long out_stride, T* h_n, T* c_n,
             TrainingState<T>* state) {
  const PackedLayer<T>& p = *layer;
  const Layout& L = p.layout;
  const KernelTable<T>& k = *p.kernels;
  const bool lstm = L.cell == Cell::lstm, gru = L.cell == Cell::gru, projected = p.projected();
  const long H = L.hidden, Hp = L.hidden_padded, I = L.input, G = L.gate_stride, P = L.output;
  const long steps = seq.steps, batch = seq.batch, rows = seq.rows();
  if (state) {
    state->layer = layer;
    state->sequences = seq;
    state->reverse = reverse;
  }
  if (batch == 0) return;

  // Every buffer is allocated before any work, so a request too large fails at once.
  // A reverse layer runs on its sequences reversed, then puts its outputs back in input order.
  // In inference on sequences of one length, step t of the reversed sequences is input step
  // steps - 1 - t, whose rows are contiguous: it reads x and writes out in place (first_row),
  // with no reversed copies of x and out (2-3% of a direction's time at B=16, H=256).
  const bool reverse_in_place =
      reverse && !state &&
      std::all_of(seq.sizes.begin(), seq.sizes.end(), [&](long size) { return size == batch; });
  const auto first_row = [&](long t) { return seq.offset[reverse_in_place ? steps - 1 - t : t]; };
  std::vector<long> reversed;
  AlignedBuffer<T> reversed_x, reversed_out;
  const T* x = x_in;
  T* out = out_in;
  long os = out_stride;  // out's row stride
  if (reverse && !reverse_in_place) {
    os = P;
    reversed = seq.reversed_rows();
    reversed_x.reset(static_cast<std::size_t>(rows * I));
    reversed_out.reset(static_cast<std::size_t>(rows * P));
    gather_rows(reversed_x.data(), x_in, reversed, I);
    x = reversed_x.data();
    out = reversed_out.data();
  }
  const int threads = threads_for(steps, batch * step_multiply_adds(L), 1);
  const bool batch_split = split_by_batch(p, batch, threads);
  // At batch 1 (hidden split, no projection), x·W_ihᵀ + b of each block of side_block steps is
  // computed in shares during the block before it (StepForwardArgs::side_x), where the steps'
  // stream of W_hh leaves the FMA units half idle, instead of by a GEMM before the steps; a GEMM
  // computes the first block. Its stream of W_ih competes with W_hh's for the caches: it pays
  // while a thread's share of both is at most kSideProductL2s times its L2, and on the ISAs whose
  // kernels have it (KernelTable::side_block: AVX-512).
  const long weight_share_bytes =
      static_cast<long>((p.w_ih.size() + p.w_hh.size()) * sizeof(T)) / threads;
  const long side_block = k.side_block;
  const bool side_product = side_block > 0 && batch == 1 && !batch_split && !projected &&
                            weight_share_bytes <= kSideProductL2s * l2_cache_bytes();
  // Hidden split without a projection: a step needs the other threads' part of h_{t-1} only for
  // half of its product, so each thread can wait for exactly that (StepProgress), not at a
  // barrier. That pays only for short steps (see kProgressStepWork), and at batch 1 whole steps
  // with the side product pay more (T=100, two threads, medians of 6 alternating runs: LSTM H=96
  // 0.139 -> 0.118 ms, H=128 0.219 -> 0.217, H=160 0.326 -> 0.293, GRU H=160 0.251 -> 0.230, RNN
  // H=256 0.206 -> 0.188).
  const bool split_steps = !side_product && !batch_split && !projected && threads > 1 &&
                           batch * G * P <= kProgressStepWork * threads;
  // Training keeps the whole sequence of gates and cell states for backward; inference computes
  // x·W_ihᵀ for a chunk of time steps at a time (with the side product: two blocks, in turn) and
  // alternates two cell states.
  const long chunk_steps = state ? steps
                           : side_product
                               ? std::min(2 * side_block, steps)
                               : std::clamp(kInferenceGateElements / (batch * G), 1L, steps);
  // The gate buffer's row of step t with the side product.
  const auto side_gate_row = [&](long t) { return state ? t : t % chunk_steps; };
  // With a projection the step writes h_full = o * tanh(c), and a GEMM then makes h = h_full·W_hrᵀ.
  AlignedBuffer<T> inference_gates, inference_c, inference_h_full;
  T* gates = nullptr;
  T* c_all = nullptr;
  T* h_full = nullptr;
  if (state) {
    state->gates.reset(static_cast<std::size_t>(rows * G));
    state->h.reset(static_cast<std::size_t>((batch + rows) * P));
    if (lstm) state->c.reset(static_cast<std::size_t>((batch + rows) * Hp));
    if (gru) state->hidden_gate.reset(static_cast<std::size_t>(rows * Hp));
    if (projected) state->h_full.reset(static_cast<std::size_t>(rows * H));
    if (!reverse) state->x.reset(static_cast<std::size_t>(rows * I));
    gates = state->gates.data();
    c_all = state->c.data();
    h_full = state->h_full.data();
  } else {
    inference_gates.reset(static_cast<std::size_t>(chunk_steps * batch * G));
    if (lstm) inference_c.reset(static_cast<std::size_t>(2 * batch * Hp));
    if (projected) inference_h_full.reset(static_cast<std::size_t>(batch * H));
    gates = inference_gates.data();
    c_all = inference_c.data();
    h_full = inference_h_full.data();
  }
  // Cell states live in rows padded to hidden_padded, so the kernels read and write whole vectors.
  // Training keeps c0 and then each row's c in row order; inference alternates two buffers, where
  // a finished sequence's row is never written again.
  auto c_before = [&](long t) {
    if (t == 0) return c_all;
    return c_all + (state ? batch + seq.offset[t - 1] : (t % 2) * batch) * Hp;
  };
  auto c_after = [&](long t) {
    return c_all + (state ? batch + seq.offset[t] : ((t + 1) % 2) * batch) * Hp;
  };
  if (lstm) {
    std::fill(c_all, c_all + batch * Hp, T(0));
    if (c0) copy_rows(c_all, Hp, c0, H, batch, H);
  }

  const bool steal_panels =
      !batch_split && !side_product && !split_steps && threads > 1 && batch >= kStealBatch;
  PanelRanges ranges(steal_panels ? threads : 0);
  PanelRanges input_ranges(steal_panels ? threads : 0);  // the input GEMM's, chunk by chunk
  AlignedBuffer<T> partial_sums(static_cast<std::size_t>(split_steps ? batch * G : 0));
  AlignedBuffer<T> gemm_blocks(static_cast<std::size_t>(threads * k.gemm_block_elements));
  StepProgress progress(split_steps ? threads : 0);
  ThreadPool::global().run(threads, [&](const ThreadContext& ctx) {
    FlushDenormalsScope flush_denormals;
    T* const a_block = gemm_blocks.data() + ctx.index * k.gemm_block_elements;
    long row0 = 0, row1 = batch, panel0 = 0, panel1 = L.panels, proj0 = 0, proj1 = 0;
    if (batch_split) {
      ctx.split(batch, 1, row0, row1);
    } else {
      ctx.split(L.panels, 1, panel0, panel1);
      if (projected) ctx.split(panel_count(p.w_hr_panels), 1, proj0, proj1);
    }
    if (steal_panels) {
      ranges.reset(0, ctx.index, panel0, panel1);
      input_ranges.reset(0, ctx.index, panel0, panel1);
    }

    // Every other step runs the thread's panels last to first, so that it starts on the panels
    // the previous step used last: still in L2 when the thread's W_hh is about as large as its L2
    // (LSTM H=256 at B=1 on a 1 MiB L2: 3% faster a call; H=512 at B=4 on a 2 MiB L2: 3-5%), and
    // in L1 when it is a few times L1 (B=1, 32 KiB L1: LSTM H=64, 7-11%; H=96, 3%; H=128, 1-3%;
    // GRU H=64, 10%; RNN H=256, 6%). In between, the whole of it stays in L2 either way, and the
    // fixed order lets the prefetchers run on from one panel into the next (GRU H=256 at B=1,
    // 384 KiB a thread: 0.5-2% slower alternating).
    const long w_hh_bytes =
        (panel1 - panel0) * L.gates * L.panel_hidden * L.output * static_cast<long>(sizeof(T));
    const bool alternate_order = 2 * w_hh_bytes >= l2_cache_bytes() || w_hh_bytes <= kL1Reuse;
    StepForwardArgs<T> step{};
    step.layout = &L;
    step.w_hh = p.w_hh.data();
    step.h_next_stride = projected ? H : os;
    step.store_gates = state != nullptr;
    step.bias_hn = p.bias_hn.size() ? p.bias_hn.data() : nullptr;
    step.panel_begin = panel0;
    step.panel_end = panel1;
    step.own_begin = std::min(panel0 * L.panel_hidden, H);
    step.own_end = std::min(panel1 * L.panel_hidden, H);
    step.partial_sums = partial_sums.data();
    long chunk_row0 = 0;  // first row of the chunk of x·W_ihᵀ in the gate buffer
    step.w_ih = p.w_ih.data();
    step.bias = p.bias.data();
    // x's rows of consecutive steps at batch 1 (reversed in place: backwards).
    step.side_x_stride = steps > 1 ? (first_row(1) - first_row(0)) * I : I;
    if (side_product)  // the first block's x·W_ihᵀ + b; each later block's comes from the steps
      gemm_panels(k, a_block, std::min(side_block, steps), G, I,
                  {x + first_row(0) * I, step.side_x_stride, 1}, p.w_ih_panels, panel0, panel1,
                  GemmOutput<T>{gates, G, p.bias.data()});
    for (long t = 0; t < steps; ++t) {
      if (side_product) {
        const long next_block = (t / side_block + 1) * side_block;
        step.side_x = next_block < steps ? x + first_row(next_block) * I : nullptr;
        step.side_rows = std::min(side_block, steps - next_block);
        step.side_phase = t % side_block;
        step.side_gates = gates + side_gate_row(next_block) * G;
      } else if (t % chunk_steps == 0) {
        const long chunk_end = std::min(t + chunk_steps, steps);
        chunk_row0 = std::min(first_row(t), first_row(chunk_end - 1));
        const long chunk_rows = seq.offset[chunk_end] - seq.offset[t];
        const T* x_chunk = x + chunk_row0 * I;
        T* gates_chunk = gates + (state ? chunk_row0 * G : 0);
        if (batch_split) {
          if (t > 0) ctx.sync();  // every thread is done reading the previous chunk
          gemm_part(k, a_block, ctx, chunk_rows, G, I, {x_chunk, I, 1}, p.w_ih_panels,
                    GemmOutput<T>{gates_chunk, G, p.bias.data()});
          ctx.sync();
        } else {
          const auto gate_columns = [&](long first, long last) {
            gemm_panels(k, a_block, chunk_rows, G, I, {x_chunk, I, 1}, p.w_ih_panels, first, last,
                        GemmOutput<T>{gates_chunk, G, p.bias.data()});
          };
          if (steal_panels) {
            // The gate columns of the thread's own panels, then those of others it takes, as the
            // steps share panels; each thread may then read any of them. A slowed core held up
            // the whole GEMM (half of an LSTM's forward at I = H) with fixed halves: in-process
            // A/B on a busy day (40 alternating rounds, medians of per-round ratios), LSTM T25 B4
            // H512 1.026x as fast, B16 1.035x, GRU T25 B16 H512 1.015x; no change in calm phases
            // (the fastest calls of 30 rounds 0.996-1.011x).
            share_panels(ctx, input_ranges, t / chunk_steps, false, chunk_rows > 0, panel0, panel1,
                         gate_columns);
            ctx.sync();
          } else {
            gate_columns(panel0, panel1);  // the thread's own, which only it reads
          }
        }
      }
      const long row = first_row(t) + row0;
      step.batch = std::max(0L, std::min(row1, seq.sizes[t]) - row0);
      step.h_prev = t > 0 ? out + (first_row(t - 1) + row0) * os : h0 ? h0 + row0 * P : nullptr;
      step.h_prev_stride = t > 0 ? os : P;
      // h_full's rows: the step's own in training, one buffer of batch rows in inference.
      T* h_full_t = h_full + (state ? seq.offset[t] : 0) * H;
      step.h_next = projected ? h_full_t + row0 * H : out + row * os;
      step.gates = gates + (side_product ? side_gate_row(t) : state ? row : row - chunk_row0) * G;
      if (lstm) {
        step.c_prev = c_before(t) + row0 * Hp;
        step.c_next = c_after(t) + row0 * Hp;
      }
      if (gru && state) step.hidden_gate = state->hidden_gate.data() + row * Hp;
      step.descending = alternate_order && t % 2 == 1;
      const bool has_panels = step.batch > 0 && panel0 < panel1;
      if (split_steps && ctx.count > 1) {
        // The units of h_{t-1} this thread computed, then, once the others are done with step
        // t - 1, theirs: the wait overlaps with half of the product.
        if (has_panels && t > 0) {
          step.part = StepPart::own_units;
          k.step_forward(step);
          progress.wait_for_others(ctx, t - 1);
          step.part = StepPart::other_units;
        }
        if (has_panels) k.step_forward(step);
        progress.finished(ctx, t);
        continue;
      }
      if (steal_panels) {
        share_panels(ctx, ranges, t, step.descending, step.batch > 0, panel0, panel1,
                     [&](long first, long last) {
                       step.panel_begin = first;
                       step.panel_end = last;
                       k.step_forward(step);
                     });
      } else if (has_panels) {
        k.step_forward(step);
      }
      if (!batch_split) ctx.sync();  // h_t (h_full) is complete before anyone reads it
      if (projected && batch_split) {
        gemm_panels(k, a_block, step.batch, P, H, {h_full_t + row0 * H, H, 1}, p.w_hr_panels, 0,
                    panel_count(p.w_hr_panels), GemmOutput<T>{out + row * os, os});
      } else if (projected) {
        gemm_panels(k, a_block, seq.sizes[t], P, H, {h_full_t, H, 1}, p.w_hr_panels, proj0, proj1,
                    GemmOutput<T>{out + first_row(t) * os, os});
        ctx.sync();
      }
    }
  });

  // Each sequence's final state is its row at its last step (a cell's step passes h_n as out).
  for (long b = 0; b < batch; ++b) {
    const long last = seq.length[b] - 1;
    const T* h_last = out + (first_row(last) + b) * os;
    if (h_last != h_n + b * P)
      std::memcpy(h_n + b * P, h_last, static_cast<std::size_t>(P) * sizeof(T));
    if (lstm && c_n)
      std::memcpy(c_n + b * H, c_after(last) + b * Hp, static_cast<std::size_t>(H) * sizeof(T));
  }
  if (state) {
    if (reverse)
      state->x = std::move(reversed_x);
    else
      std::memcpy(state->x.data(), x, state->x.size() * sizeof(T));
    T* h_all = state->h.data();
    if (h0)
      std::memcpy(h_all, h0, static_cast<std::size_t>(batch * P) * sizeof(T));
    else
      std::fill(h_all, h_all + batch * P, T(0));
    copy_rows(h_all + batch * P, P, out, os, rows, P);
  }
  if (reverse && !reverse_in_place) scatter_rows(out_in, out_stride, out, reversed, P);
}

template <class T>
void backward(TrainingState<T>& state, const T* grad_out_in, const T* grad_h_n, const T* grad_c_n,
              T* grad_x_in, T* grad_h0, T* grad_c0, const ParameterGrads<T>& grads) {
  const PackedLayer<T>& p = *state.layer;
  const Layout& L = p.layout;
  const KernelTable<T>& k = *p.kernels;
  const bool lstm = L.cell == Cell::lstm, gru = L.cell == Cell::gru, projected = p.projected();
  const Sequences& seq = state.sequences;
  const long steps = seq.steps, batch = seq.batch, rows = seq.rows();
  const long H = L.hidden, Hp = L.hidden_padded, I = L.input, G = L.gate_stride, P = L.output;
  if (batch == 0) return;

  // A reverse layer's state is in processing order: so are the gradients, until the end.
  std::vector<long> reversed;
  AlignedBuffer<T> reversed_grad_out, reversed_grad_x;
  const T* grad_out = grad_out_in;
  T* grad_x = grad_x_in;
  if (state.reverse) {
    reversed = seq.reversed_rows();
    if (grad_out_in) {
      reversed_grad_out.reset(static_cast<std::size_t>(rows * P));
      gather_rows(reversed_grad_out.data(), grad_out_in, reversed, P);
      grad_out = reversed_grad_out.data();
    }
    if (grad_x_in) {
      reversed_grad_x.reset(static_cast<std::size_t>(rows * I));
      grad_x = reversed_grad_x.data();
    }
  }

  // The gate buffer turns into dG in place, one step at a time, from the last step back.
  T* dgates = state.gates.data();
  AlignedBuffer<T> grad_c(static_cast<std::size_t>(batch * Hp)), grad_h_carry;
  grad_c.zero();
  if (lstm && grad_c_n) copy_rows(grad_c.data(), Hp, grad_c_n, H, batch, H);
  if (gru) {
    grad_h_carry.reset(static_cast<std::size_t>(batch * Hp));
    grad_h_carry.zero();
  }
  // Operands of the weight gradients, packed as GEMM panels: each row's x, and the h its step
  // started from (h0 for a row of step 0, else the same sequence's row of the step before).
  const long panel = k.gemm_panel_vectors * L.lanes;
  AlignedBuffer<T> x_storage, h_storage;
  const T* x = state.x.data();
  const T* h = state.h.data();
  std::vector<long> h_prev_row(static_cast<std::size_t>(rows));
  for (long t = 0; t < steps; ++t)
    for (long b = 0; b < seq.sizes[t]; ++b)
      h_prev_row[seq.offset[t] + b] = t == 0 ? b : batch + seq.offset[t - 1] + b;
  const PackedPanels<T> x_panels =
      pack_gathered_rows(x_storage, x, I, I, nullptr, rows, I, panel, L.lanes);
  const PackedPanels<T> h_panels =
      pack_gathered_rows(h_storage, h, P, P, h_prev_row.data(), rows, P, panel, L.lanes);
  // A projection's backward first makes dL/dh_t [rows, P], then the step multiplies it by W_hr;
  // dW_hr = dhᵀ·h_full.
  AlignedBuffer<T> h_full_storage, grad_h;
  PackedPanels<T> h_full_panels{};
  if (projected) {
    h_full_panels = pack_gathered_rows(h_full_storage, state.h_full.data(), H, H, nullptr, rows, H,
                                       panel, L.lanes);
    grad_h.reset(static_cast<std::size_t>(rows * P));
  }
  const PackedPanels<T>& w_step = projected ? p.w_hr_t_panels : p.w_hh_t_panels;

  // Allocated here: nothing may throw inside the parallel region.
  AlignedBuffer<T> bias_sum(static_cast<std::size_t>(G));

  // A single step's backward still splits its weight-gradient GEMMs: on two cores the
  // gradients' rows stream from two L2 caches (an LSTMCell training step at H = 128: 50 to 33 us).
  const int threads = threads_for(steps, batch * step_multiply_adds(L), 3);
  const bool batch_split = split_by_batch(p, batch, threads);
  const bool steal_panels = !batch_split && threads > 1 && batch >= kStealBatch;
  PanelRanges ranges(steal_panels ? threads : 0);
  BlockCounter weight_gemm_blocks[4];  // dW_hh, dW_hr, dX, dW_ih
  AlignedBuffer<T> gemm_blocks(static_cast<std::size_t>(threads * k.gemm_block_elements));
  ThreadPool::global().run(threads, [&](const ThreadContext& ctx) {
    FlushDenormalsScope flush_denormals;
    T* const a_block = gemm_blocks.data() + ctx.index * k.gemm_block_elements;
    long row0 = 0, row1 = batch, col0 = 0, col1 = w_step.cols, proj0 = 0, proj1 = 0;
    long panel0 = 0, panel1 = 0;  // of w_step, in a hidden split
    const auto column = [&](long panel) {
      return std::min(panel * w_step.panel_width, w_step.cols);
    };
    if (batch_split) {
      ctx.split(batch, 1, row0, row1);
    } else {
      ctx.split(panel_count(w_step), 1, panel0, panel1);
      col0 = column(panel0);
      col1 = column(panel1);
      if (projected) ctx.split(panel_count(p.w_hh_t_panels), 1, proj0, proj1);
    }
    if (steal_panels) {  // the steps run from t = steps - 1 down, of either parity
      ranges.reset(0, ctx.index, panel0, panel1);
      ranges.reset(1, ctx.index, panel0, panel1);
      ctx.sync();
    }
    // dL/dh_t [rows r0..r1, columns of panels proj0..proj1 of W_hh]: dG_{t+1}·W_hh for the rows
    // that continue, dL/dh_n for those that end, plus the output's gradient.
    auto projected_grad_h = [&](long t, long r0, long r1, long q0, long q1) {
      const long next = t + 1 < steps ? seq.sizes[t + 1] : 0;
      const long c0 = std::min(q0 * p.w_hh_t_panels.panel_width, P);
      const long c1 = std::min(q1 * p.w_hh_t_panels.panel_width, P);
      T* dh = grad_h.data() + seq.offset[t] * P;
      if (std::min(r1, next) > r0)
        gemm_panels(k, a_block, std::min(r1, next) - r0, P, G,
                    {dgates + (seq.offset[t + 1] + r0) * G, G, 1}, p.w_hh_t_panels, q0, q1,
                    GemmOutput<T>{dh + r0 * P, P});
      for (long r = r0; r < r1; ++r)
        for (long j = c0; j < c1; ++j) {
          T value = r < next ? dh[r * P + j] : grad_h_n ? grad_h_n[r * P + j] : T(0);
          if (grad_out) value += grad_out[(seq.offset[t] + r) * P + j];
          dh[r * P + j] = value;
        }
    };
    StepBackwardArgs<T> step{};
    step.layout = &L;
    step.w_hh_t = &w_step;
    step.grad_gates_next_stride = projected ? P : G;
    step.grad_out_stride = P;
    step.grad_h_last = grad_h_n && !projected ? grad_h_n + row0 * P : nullptr;
    step.grad_c = grad_c.data() + row0 * Hp;
    if (gru) step.grad_h_carry = grad_h_carry.data() + row0 * Hp;
    step.col_begin = col0;
    step.col_end = col1;
    for (long t = steps - 1; t >= 0; --t) {
      const long row = seq.offset[t] + row0;
      const long prev = t > 0 ? batch + seq.offset[t - 1] + row0 : row0;  // of h and c
      const long next_size = t + 1 < steps ? seq.sizes[t + 1] : 0;
      step.batch = std::max(0L, std::min(row1, seq.sizes[t]) - row0);
      if (projected) {
        if (batch_split) {
          projected_grad_h(t, row0, row0 + step.batch, 0, panel_count(p.w_hh_t_panels));
        } else {
          projected_grad_h(t, 0, seq.sizes[t], proj0, proj1);
          ctx.sync();
        }
        step.next_batch = step.batch;
        step.grad_gates_next = grad_h.data() + row * P;
      } else {
        step.next_batch = std::max(0L, next_size - row0);
        step.grad_gates_next =
            step.next_batch > 0 ? dgates + (seq.offset[t + 1] + row0) * G : nullptr;
        step.grad_out = grad_out ? grad_out + row * P : nullptr;
      }
      step.gates = dgates + row * G;
      step.h = h + (batch + row) * P;
      step.h_prev = h + prev * P;
      if (lstm) {
        step.c = state.c.data() + (batch + row) * Hp;
        step.c_prev = state.c.data() + prev * Hp;
      }
      if (gru) step.hidden_gate = state.hidden_gate.data() + row * Hp;
      if (steal_panels) {
        share_panels(ctx, ranges, t, false, step.batch > 0, panel0, panel1,
                     [&](long first, long last) {
                       step.col_begin = column(first);
                       step.col_end = column(last);
                       k.step_backward(step);
                     });
      } else if (step.batch > 0 && col0 < col1) {
        k.step_backward(step);
      }
      if (!batch_split) ctx.sync();  // dG_t is complete before anyone reads it
    }
    if (batch_split) ctx.sync();

    const long* torch_row = p.torch_row.data();
    // Column sums of dG into the bias gradients, each thread its own gate columns.
    auto add_bias_grads = [&](T* b_ih, T* b_hh) {
      if (!b_ih && !b_hh) return;
      long gate0 = 0, gate1 = 0;
      ctx.split(G, 1, gate0, gate1);
      T* sum = bias_sum.data();
      std::fill(sum + gate0, sum + gate1, T(0));
      for (long r = 0; r < rows; ++r)
        for (long col = gate0; col < gate1; ++col) sum[col] += dgates[r * G + col];
      for (long col = gate0; col < gate1; ++col) {
        if (torch_row[col] < 0) continue;
        if (b_ih) b_ih[torch_row[col]] += sum[col];
        if (b_hh) b_hh[torch_row[col]] += sum[col];
      }
    };
    // dh0 = dG_0 · W_hh and dW_hh += dGᵀ·h_prev, added straight into torch.nn's rows (the packed
    // gate columns are in panel order: torch_row maps them back, padding dropped).
    gemm_part(k, a_block, ctx, batch, P, G, {dgates, G, 1}, p.w_hh_t_panels,
              GemmOutput<T>{grad_h0, P});
    gemm_part(k, a_block, ctx, G, P, rows, {dgates, 1, G}, h_panels,
              GemmOutput<T>{grads.w_hh, P, nullptr, true, torch_row}, &weight_gemm_blocks[0]);
    if (projected)
      gemm_part(k, a_block, ctx, P, H, rows, {grad_h.data(), 1, P}, h_full_panels,
                GemmOutput<T>{grads.w_hr, H, nullptr, true}, &weight_gemm_blocks[1]);
    if (gru) {
      // The input side differs in the n gate: put its gradient into the n columns.
      add_bias_grads(nullptr, grads.b_hh);
      ctx.sync();
      long r0 = 0, r1 = 0;
      ctx.split(rows, 1, r0, r1);
      const long hb = L.panel_hidden;
      for (long r = r0; r < r1; ++r)
        for (long q = 0; q < L.panels; ++q)
          std::memcpy(dgates + r * G + q * 3 * hb + 2 * hb,
                      state.hidden_gate.data() + r * Hp + q * hb,
                      static_cast<std::size_t>(hb) * sizeof(T));
      ctx.sync();
      add_bias_grads(grads.b_ih, nullptr);
    } else {
      add_bias_grads(grads.b_ih, grads.b_hh);
    }
    // dX = dG · W_ih (unless not wanted) and dW_ih += dGᵀ·x.
    if (grad_x)
      gemm_part(k, a_block, ctx, rows, I, G, {dgates, G, 1}, p.w_ih_t_panels,
                GemmOutput<T>{grad_x, I}, &weight_gemm_blocks[2]);
    gemm_part(k, a_block, ctx, G, I, rows, {dgates, 1, G}, x_panels,
              GemmOutput<T>{grads.w_ih, I, nullptr, true, torch_row}, &weight_gemm_blocks[3]);
  });
  if (lstm && grad_c0) copy_rows(grad_c0, H, grad_c.data(), Hp, batch, H);
  if (gru)  // h0 also reaches h_1 through z, past W_hh
    for (long b = 0; b < batch; ++b)
      for (long j = 0; j < H; ++j) grad_h0[b * H + j] += grad_h_carry.data()[b * Hp + j];
  if (state.reverse && grad_x_in) scatter_rows(grad_x_in, I, grad_x, reversed, I);
}

template void forward(const std::shared_ptr<const PackedLayer<float>>&, const Sequences&, bool,
                      const float*, const float*, const float*, float*, long, float*, float*,
                      TrainingState<float>*);
template void forward(const std::shared_ptr<const PackedLayer<double>>&, const Sequences&, bool,
                      const double*, const double*, const double*, double*, long, double*, double*,
                      TrainingState<double>*);
template void backward(TrainingState<float>&, const float*, const float*, const float*, float*,
                       float*, float*, const ParameterGrads<float>&);
template void backward(TrainingState<double>&, const double*, const double*, const double*, double*,
                       double*, double*, const ParameterGrads<double>&);

}  // namespace fastrnn

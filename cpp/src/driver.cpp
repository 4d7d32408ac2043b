// The time loops: one forward and one backward driver for every cell and ISA. The math lives in
// the kernels (src/kernels/kernel_body.h); this file orders the calls, owns the buffers and
// shares the work between the threads of the pool.
//
// Two ways to share a time step (performance.md, technique 6):
// - hidden split (small batch): each thread owns a contiguous range of hidden-unit panels, so its
//   slices of W_ih and W_hh stay in its own L2; it also computes x·W_ihᵀ for its own gate columns,
//   so only h needs a barrier per step;
// - batch split (large batch): each thread owns a range of batch rows and runs the whole time loop
//   on them with no barrier; the input projection is shared by rows.
#include <algorithm>
#include <cstring>

#include "fastrnn/fp_env.h"
#include "fastrnn/layer.h"
#include "fastrnn/thread_pool.h"
#include "panels.h"

namespace fastrnn {
namespace {

// Inference computes x·W_ihᵀ for a chunk of time steps at a time, bounding the gate buffer.
constexpr long kInferenceGateElements = 1L << 20;
// Below this many multiply-adds per time step a barrier costs more than a second thread saves,
// and below kParallelCallWork in all, so does starting a parallel region (~1 us).
constexpr long kParallelStepWork = 1L << 14;
constexpr long kParallelCallWork = 1L << 18;
// Rows per thread from which the batch split wins (no barrier, the micro-kernel's rows full).
constexpr long kBatchSplitRows = 32;

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
void gemm_panels(const KernelTable<T>& k, long m, long n, long kk, StridedMatrix<T> a,
                 const PackedPanels<T>& b, long first, long last, const GemmOutput<T>& out) {
  const long col0 = first * b.panel_width;
  if (first >= last || col0 >= n) return;
  const PackedPanels<T> part = panel_range(b, first, last);
  k.gemm({m, std::min(n - col0, part.cols), kk, a, &part, out.c + col0, out.ldc, out.accumulate,
          out.bias ? out.bias + col0 : nullptr, out.c_row_of});
}

// This thread's part of a GEMM: by rows when there are many, else by panels.
template <class T>
void gemm_part(const KernelTable<T>& k, const ThreadContext& ctx, long m, long n, long kk,
               StridedMatrix<T> a, const PackedPanels<T>& b, const GemmOutput<T>& out) {
  long begin = 0, end = 0;
  if (ctx.count == 1 || m >= 8 * ctx.count) {
    ctx.split(m, 8, begin, end);
    if (begin == end) return;
    StridedMatrix<T> rows{a.data + begin * a.row_stride, a.row_stride, a.col_stride};
    T* c = out.c_row_of ? out.c : out.c + begin * out.ldc;
    const long* c_row_of = out.c_row_of ? out.c_row_of + begin : nullptr;
    k.gemm({end - begin, n, kk, rows, &b, c, out.ldc, out.accumulate, out.bias, c_row_of});
  } else {
    ctx.split(panel_count(b), 1, begin, end);
    gemm_panels(k, m, n, kk, a, b, begin, end, out);
  }
}

// Threads for a time loop of `steps` steps of `step_work` multiply-adds each.
int threads_for(long steps, long step_work) {
  const bool worth_it = step_work >= kParallelStepWork && steps * step_work >= kParallelCallWork;
  return worth_it ? ThreadPool::global().threads() : 1;
}

}  // namespace

template <class T>
void forward(const std::shared_ptr<const PackedLayer<T>>& layer, long steps, long batch, const T* x,
             const T* h0, const T* c0, T* out, T* h_n, T* c_n, TrainingState<T>* state) {
  const PackedLayer<T>& p = *layer;
  const Layout& L = p.layout;
  const KernelTable<T>& k = *p.kernels;
  const bool lstm = L.cell == Cell::lstm;
  const long H = L.hidden, Hp = L.hidden_padded;
  const long state_size = batch * Hp, row_elements = batch * L.gate_stride;
  if (state) {
    state->layer = layer;
    state->steps = steps;
    state->batch = batch;
  }
  if (batch == 0) return;

  // Every buffer is allocated before any work, so a request too large fails at once.
  // Training keeps the whole sequence of gates and cell states for backward; inference computes
  // x·W_ihᵀ for a chunk of time steps at a time and alternates two cell states.
  const long chunk_steps =
      state ? steps : std::clamp(kInferenceGateElements / row_elements, 1L, steps);
  AlignedBuffer<T> inference_gates, inference_c;
  T* gates = nullptr;
  T* c_all = nullptr;
  if (state) {
    state->gates.reset(static_cast<std::size_t>(steps * row_elements));
    state->x.reset(static_cast<std::size_t>(steps * batch * L.input));
    state->h.reset(static_cast<std::size_t>((steps + 1) * batch * H));
    if (lstm) state->c.reset(static_cast<std::size_t>((steps + 1) * state_size));
    gates = state->gates.data();
    c_all = state->c.data();
  } else {
    inference_gates.reset(static_cast<std::size_t>(chunk_steps * row_elements));
    if (lstm) inference_c.reset(static_cast<std::size_t>(2 * state_size));
    gates = inference_gates.data();
    c_all = inference_c.data();
  }
  auto c_at = [&](long t) { return c_all + (state ? t : t % 2) * state_size; };
  // Cell states live in rows padded to hidden_padded, so the kernels read and write whole vectors.
  if (lstm) {
    std::fill(c_all, c_all + state_size, T(0));
    if (c0) copy_rows(c_all, Hp, c0, H, batch, H);
  }

  const int threads = threads_for(steps, batch * L.gate_stride * (H + L.input));
  const bool batch_split = batch >= kBatchSplitRows * threads;
  ThreadPool::global().run(threads, [&](const ThreadContext& ctx) {
    FlushDenormalsScope flush_denormals;
    long row0 = 0, row1 = batch, panel0 = 0, panel1 = L.panels;
    if (batch_split)
      ctx.split(batch, 1, row0, row1);
    else
      ctx.split(L.panels, 1, panel0, panel1);

    StepForwardArgs<T> step{};
    step.layout = &L;
    step.batch = row1 - row0;
    step.w_hh = p.w_hh.data();
    step.h_prev_stride = H;
    step.h_next_stride = H;
    step.store_gates = state != nullptr;
    step.panel_begin = panel0;
    step.panel_end = panel1;
    for (long t = 0; t < steps; ++t) {
      const long chunk_t = state ? t : t % chunk_steps;
      if (t % chunk_steps == 0) {
        const long rows = std::min(chunk_steps, steps - t) * batch;
        const T* x_chunk = x + t * batch * L.input;
        T* gates_chunk = gates + (state ? t * row_elements : 0);
        if (batch_split) {
          if (t > 0) ctx.sync();  // every thread is done reading the previous chunk
          gemm_part(k, ctx, rows, L.gate_stride, L.input, {x_chunk, L.input, 1}, p.w_ih_panels,
                    GemmOutput<T>{gates_chunk, L.gate_stride, p.bias.data()});
          ctx.sync();
        } else {
          // The thread's own gate columns: no other thread reads them.
          gemm_panels(k, rows, L.gate_stride, L.input, {x_chunk, L.input, 1}, p.w_ih_panels, panel0,
                      panel1, GemmOutput<T>{gates_chunk, L.gate_stride, p.bias.data()});
        }
      }
      const long h_offset = row0 * H;
      step.h_prev = t == 0 ? (h0 ? h0 + h_offset : nullptr) : out + (t - 1) * batch * H + h_offset;
      step.h_next = out + t * batch * H + h_offset;
      step.gates = gates + chunk_t * row_elements + row0 * L.gate_stride;
      if (lstm) {
        step.c_prev = c_at(t) + row0 * Hp;
        step.c_next = c_at(t + 1) + row0 * Hp;
      }
      if (step.batch > 0 && panel0 < panel1) k.step_forward(step);
      if (!batch_split) ctx.sync();  // h_t is complete before anyone reads it
    }
  });

  std::memcpy(h_n, out + (steps - 1) * batch * H, static_cast<std::size_t>(batch * H) * sizeof(T));
  if (lstm && c_n) copy_rows(c_n, H, c_at(steps), Hp, batch, H);
  if (state) {
    std::memcpy(state->x.data(), x, state->x.size() * sizeof(T));
    T* h_all = state->h.data();
    if (h0)
      std::memcpy(h_all, h0, static_cast<std::size_t>(batch * H) * sizeof(T));
    else
      std::fill(h_all, h_all + batch * H, T(0));
    std::memcpy(h_all + batch * H, out, static_cast<std::size_t>(steps * batch * H) * sizeof(T));
  }
}

template <class T>
void backward(TrainingState<T>& state, const T* grad_out, const T* grad_h_n, const T* grad_c_n,
              T* grad_x, T* grad_h0, T* grad_c0, const ParameterGrads<T>& grads) {
  const PackedLayer<T>& p = *state.layer;
  const Layout& L = p.layout;
  const KernelTable<T>& k = *p.kernels;
  const bool lstm = L.cell == Cell::lstm;
  const long steps = state.steps, batch = state.batch, H = L.hidden, Hp = L.hidden_padded;
  const long I = L.input, G = L.gate_stride, rows = steps * batch;
  const long state_size = batch * Hp;
  if (batch == 0) return;

  // The gate buffer turns into dG in place, one step at a time, from the last step back.
  T* dgates = state.gates.data();
  AlignedBuffer<T> grad_c(static_cast<std::size_t>(state_size));
  grad_c.zero();
  if (lstm && grad_c_n) copy_rows(grad_c.data(), Hp, grad_c_n, H, batch, H);
  // Operands of the weight gradients, packed as GEMM panels.
  const long panel = k.gemm_panel_vectors * L.lanes;
  AlignedBuffer<T> x_storage, h_storage;
  const T* x = state.x.data();
  const T* h = state.h.data();
  const PackedPanels<T> x_panels =
      pack_panels(x_storage, rows, I, panel, L.lanes, [&](long r, long j) { return x[r * I + j]; });
  const PackedPanels<T> h_panels =
      pack_panels(h_storage, rows, H, panel, L.lanes, [&](long r, long j) { return h[r * H + j]; });

  // Allocated here: nothing may throw inside the parallel region.
  AlignedBuffer<T> bias_sum(static_cast<std::size_t>(G));

  const int threads = threads_for(steps, batch * G * (H + I));
  const bool batch_split = batch >= kBatchSplitRows * threads;
  ThreadPool::global().run(threads, [&](const ThreadContext& ctx) {
    FlushDenormalsScope flush_denormals;
    long row0 = 0, row1 = batch, col0 = 0, col1 = p.w_hh_t_panels.cols;
    if (batch_split) {
      ctx.split(batch, 1, row0, row1);
    } else {
      ctx.split(panel_count(p.w_hh_t_panels), 1, col0, col1);
      col0 = std::min(col0 * p.w_hh_t_panels.panel_width, p.w_hh_t_panels.cols);
      col1 = std::min(col1 * p.w_hh_t_panels.panel_width, p.w_hh_t_panels.cols);
    }
    StepBackwardArgs<T> step{};
    step.layout = &L;
    step.batch = row1 - row0;
    step.w_hh_t = &p.w_hh_t_panels;
    step.grad_out_stride = H;
    step.grad_c = grad_c.data() + row0 * Hp;
    step.col_begin = col0;
    step.col_end = col1;
    for (long t = steps - 1; t >= 0; --t) {
      const long at = (t * batch + row0);
      step.grad_gates_next = t + 1 < steps ? dgates + (at + batch) * G : nullptr;
      step.grad_out = grad_out ? grad_out + at * H : nullptr;
      step.grad_h_last = t == steps - 1 && grad_h_n ? grad_h_n + row0 * H : nullptr;
      step.gates = dgates + at * G;
      step.h = h + (at + batch) * H;
      if (lstm) {
        step.c = state.c.data() + (t + 1) * state_size + row0 * Hp;
        step.c_prev = state.c.data() + t * state_size + row0 * Hp;
      }
      if (step.batch > 0 && col0 < col1) k.step_backward(step);
      if (!batch_split) ctx.sync();  // dG_t is complete before anyone reads it
    }
    if (batch_split) ctx.sync();

    // dh0 = dG_0 · W_hh and dX = dG · W_ih. The weight gradients dGᵀ·[x] and
    // dGᵀ·[h0 .. h_{T-1}] are added straight into torch.nn's rows (the packed gate columns are
    // in panel order: torch_row maps them back, padding dropped).
    gemm_part(k, ctx, batch, H, G, {dgates, G, 1}, p.w_hh_t_panels, GemmOutput<T>{grad_h0, H});
    gemm_part(k, ctx, rows, I, G, {dgates, G, 1}, p.w_ih_t_panels, GemmOutput<T>{grad_x, I});
    const long* torch_row = p.torch_row.data();
    gemm_part(k, ctx, G, I, rows, {dgates, 1, G}, x_panels,
              GemmOutput<T>{grads.w_ih, I, nullptr, true, torch_row});
    gemm_part(k, ctx, G, H, rows, {dgates, 1, G}, h_panels,
              GemmOutput<T>{grads.w_hh, H, nullptr, true, torch_row});

    if (grads.b_ih || grads.b_hh) {  // column sums of dG, each thread its own gate columns
      long gate0 = 0, gate1 = 0;
      ctx.split(G, 1, gate0, gate1);
      T* sum = bias_sum.data();
      std::fill(sum + gate0, sum + gate1, T(0));
      for (long r = 0; r < rows; ++r)
        for (long col = gate0; col < gate1; ++col) sum[col] += dgates[r * G + col];
      for (long col = gate0; col < gate1; ++col) {
        if (torch_row[col] < 0) continue;
        if (grads.b_ih) grads.b_ih[torch_row[col]] += sum[col];
        if (grads.b_hh) grads.b_hh[torch_row[col]] += sum[col];
      }
    }
  });
  if (lstm && grad_c0) copy_rows(grad_c0, H, grad_c.data(), Hp, batch, H);
}

template void forward(const std::shared_ptr<const PackedLayer<float>>&, long, long, const float*,
                      const float*, const float*, float*, float*, float*, TrainingState<float>*);
template void forward(const std::shared_ptr<const PackedLayer<double>>&, long, long, const double*,
                      const double*, const double*, double*, double*, double*,
                      TrainingState<double>*);
template void backward(TrainingState<float>&, const float*, const float*, const float*, float*,
                       float*, float*, const ParameterGrads<float>&);
template void backward(TrainingState<double>&, const double*, const double*, const double*, double*,
                       double*, double*, const ParameterGrads<double>&);

}  // namespace fastrnn

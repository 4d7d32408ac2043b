// The time loops: one forward and one backward driver for every cell and ISA. The math lives in
// the kernels (src/kernels/kernel_body.h); this file only orders the calls and owns the buffers.
#include <algorithm>
#include <cstring>
#include <vector>

#include "fastrnn/fp_env.h"
#include "fastrnn/layer.h"
#include "panels.h"

namespace fastrnn {
namespace {

// Inference computes x·W_ihᵀ for a chunk of time steps at a time, bounding the gate buffer.
constexpr long kInferenceGateElements = 1L << 20;

template <class T>
void copy_rows(T* dst, long dst_stride, const T* src, long src_stride, long rows, long cols) {
  for (long r = 0; r < rows; ++r)
    std::memcpy(dst + r * dst_stride, src + r * src_stride,
                static_cast<std::size_t>(cols) * sizeof(T));
}

// gates[rows, gate_stride] = bias + x[rows, input] · W_ihᵀ
template <class T>
void input_projection(const PackedLayer<T>& p, const T* x, long rows, T* gates) {
  const Layout& L = p.layout;
  for (long r = 0; r < rows; ++r)
    std::memcpy(gates + r * L.gate_stride, p.bias.data(),
                static_cast<std::size_t>(L.gate_stride) * sizeof(T));
  GemmArgs<T> g{rows,           L.gate_stride, L.input,       {x, L.input, 1},
                &p.w_ih_panels, gates,         L.gate_stride, true};
  p.kernels->gemm(g);
}

}  // namespace

template <class T>
void forward(const std::shared_ptr<const PackedLayer<T>>& layer, long steps, long batch, const T* x,
             const T* h0, const T* c0, T* out, T* h_n, T* c_n, TrainingState<T>* state) {
  FlushDenormalsScope flush_denormals;
  const PackedLayer<T>& p = *layer;
  const Layout& L = p.layout;
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

  StepForwardArgs<T> step{};
  step.layout = &L;
  step.batch = batch;
  step.w_hh = p.w_hh.data();
  step.h_prev_stride = H;
  step.h_next_stride = H;
  step.store_gates = state != nullptr;
  step.panel_begin = 0;
  step.panel_end = L.panels;
  for (long t = 0; t < steps; ++t) {
    const long chunk_t = state ? t : t % chunk_steps;
    if (t % chunk_steps == 0) {
      const long rows = std::min(chunk_steps, steps - t) * batch;
      input_projection(p, x + t * batch * L.input, rows, gates + (state ? t * row_elements : 0));
    }
    step.h_prev = t == 0 ? h0 : out + (t - 1) * batch * H;  // h0 == nullptr: zeros
    step.h_next = out + t * batch * H;
    step.gates = gates + chunk_t * row_elements;
    if (lstm) {
      step.c_prev = c_at(t);
      step.c_next = c_at(t + 1);
    }
    p.kernels->step_forward(step);
  }

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
  FlushDenormalsScope flush_denormals;
  const PackedLayer<T>& p = *state.layer;
  const Layout& L = p.layout;
  const KernelTable<T>& k = *p.kernels;
  const bool lstm = L.cell == Cell::lstm;
  const long steps = state.steps, batch = state.batch, H = L.hidden, Hp = L.hidden_padded;
  const long I = L.input, G = L.gate_stride, rows = steps * batch;
  const std::size_t state_size = static_cast<std::size_t>(batch * Hp);
  if (batch == 0) return;

  // The gate buffer turns into dG in place, one step at a time, from the last step back.
  T* dgates = state.gates.data();
  AlignedBuffer<T> grad_c(state_size);
  grad_c.zero();
  if (lstm && grad_c_n) copy_rows(grad_c.data(), Hp, grad_c_n, H, batch, H);

  StepBackwardArgs<T> step{};
  step.layout = &L;
  step.batch = batch;
  step.w_hh_t = &p.w_hh_t_panels;
  step.grad_out_stride = H;
  step.grad_c = grad_c.data();
  step.col_begin = 0;
  step.col_end = p.w_hh_t_panels.cols;
  for (long t = steps - 1; t >= 0; --t) {
    step.grad_gates_next = t + 1 < steps ? dgates + (t + 1) * batch * G : nullptr;
    step.grad_out = grad_out ? grad_out + t * batch * H : nullptr;
    step.grad_h_last = t == steps - 1 ? grad_h_n : nullptr;
    step.gates = dgates + t * batch * G;
    step.h = state.h.data() + (t + 1) * batch * H;
    if (lstm) {
      step.c = state.c.data() + (t + 1) * state_size;
      step.c_prev = state.c.data() + t * state_size;
    }
    k.step_backward(step);
  }

  // dh0 = dG_0 · W_hh and dc0 from the last step's carry.
  GemmArgs<T> dh0{batch, H, G, {dgates, G, 1}, &p.w_hh_t_panels, grad_h0, H, false};
  k.gemm(dh0);
  if (lstm && grad_c0) copy_rows(grad_c0, H, grad_c.data(), Hp, batch, H);

  // Whole-sequence products: dX = dG · W_ih, dW_ih = dGᵀ · X, dW_hh = dGᵀ · [h0 .. h_{T-1}].
  GemmArgs<T> dx{rows, I, G, {dgates, G, 1}, &p.w_ih_t_panels, grad_x, I, false};
  k.gemm(dx);

  const long lanes = L.lanes, panel = k.gemm_panel_vectors * lanes;
  AlignedBuffer<T> packed_operand, grad_packed_w(static_cast<std::size_t>(G * std::max(I, H)));
  auto accumulate_weight_grad = [&](const T* operand, long cols, T* grad_w) {
    const PackedPanels<T> b = pack_panels(packed_operand, rows, cols, panel, lanes,
                                          [&](long r, long j) { return operand[r * cols + j]; });
    GemmArgs<T> g{G, cols, rows, {dgates, 1, G}, &b, grad_packed_w.data(), cols, false};
    k.gemm(g);
    for (long col = 0; col < G; ++col) {
      const long row = torch_row_of_gate_column(L, col);
      if (row < 0) continue;
      const T* src = grad_packed_w.data() + col * cols;
      T* dst = grad_w + row * cols;
      for (long j = 0; j < cols; ++j) dst[j] += src[j];
    }
  };
  accumulate_weight_grad(state.x.data(), I, grads.w_ih);
  accumulate_weight_grad(state.h.data(), H, grads.w_hh);

  if (grads.b_ih || grads.b_hh) {
    std::vector<T> grad_bias(static_cast<std::size_t>(G), T(0));
    for (long r = 0; r < rows; ++r)
      for (long col = 0; col < G; ++col) grad_bias[col] += dgates[r * G + col];
    for (long col = 0; col < G; ++col) {
      const long row = torch_row_of_gate_column(L, col);
      if (row < 0) continue;
      if (grads.b_ih) grads.b_ih[row] += grad_bias[col];
      if (grads.b_hh) grads.b_hh[row] += grad_bias[col];
    }
  }
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

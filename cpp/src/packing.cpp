#include <functional>
#include <iterator>
#include <stdexcept>

#include "fastrnn/layer.h"
#include "fastrnn/thread_pool.h"
#include "panels.h"

namespace fastrnn {
namespace {

// Below this many weights a layer is packed on the calling thread: waking a worker costs more.
constexpr long kParallelPackElements = 1 << 16;
// Below this many, so is a layer while the workers sleep (as kShortCallWork), and the pack wakes
// them for the call that follows. LSTMs packed 20 ms after the previous call, two threads,
// medians of 40 (3 runs each): H=128 (164K weights) 716-742 -> 236-378 us this way, H=256 (655K)
// 1343-1567 -> 916-1212 us; at H=512 (2.6M) waiting for the workers is faster (3835-4262 us
// against 4441-4723).
constexpr long kShortPackElements = 1 << 20;

template <class T>
const KernelTable<T>& table_of(const IsaKernels& isa);
template <>
const KernelTable<float>& table_of(const IsaKernels& isa) {
  return isa.f32;
}
template <>
const KernelTable<double>& table_of(const IsaKernels& isa) {
  return isa.f64;
}

Layout make_layout(Cell cell, long input, long hidden, long output, int lanes) {
  Layout L{};
  L.cell = cell;
  L.output = output;
  L.gates = cell == Cell::lstm ? 4 : cell == Cell::gru ? 3 : 1;
  L.input = input;
  L.hidden = hidden;
  L.lanes = lanes;
  // A panel is 3 or 4 vectors wide: the gates of the LSTM (4) or GRU (3) for one vector of hidden
  // units, or up to 4 vectors of hidden units of the RNN's single gate (fewer when H is small).
  const long vectors = (hidden + lanes - 1) / lanes;
  L.panel_vectors = L.gates > 1 ? 1 : static_cast<int>(vectors < 4 ? vectors : 4);
  L.panel_hidden = static_cast<long>(L.panel_vectors) * lanes;
  L.hidden_padded = round_up(hidden, L.panel_hidden);
  L.panels = L.hidden_padded / L.panel_hidden;
  L.gate_stride = L.gates * L.hidden_padded;
  return L;
}

}  // namespace

template <class T>
std::shared_ptr<const PackedLayer<T>> pack_layer(const IsaKernels& isa, Cell cell, long input,
                                                 long hidden, long output, const T* w_ih,
                                                 const T* w_hh, const T* b_ih, const T* b_hh,
                                                 const T* w_hr, bool trainable) {
  if (input < 1 || hidden < 1 || output < 1)
    throw std::invalid_argument("input, hidden and projection sizes must be >= 1");
  if ((w_hr != nullptr) != (output != hidden) || (w_hr && cell != Cell::lstm))
    throw std::invalid_argument("a projection is for the LSTM, with its weight_hr");
  auto packed = std::make_shared<PackedLayer<T>>();
  PackedLayer<T>& p = *packed;
  p.isa = &isa;
  p.kernels = &table_of<T>(isa);
  p.layout = make_layout(cell, input, hidden, output, p.kernels->lanes);
  p.has_bias = b_ih != nullptr || b_hh != nullptr;
  p.trainable = trainable;
  const Layout& L = p.layout;
  const long lanes = L.lanes;
  const long gate_panel = L.gates * L.panel_hidden;
  const long generic_panel = p.kernels->gemm_panel_vectors * lanes;
  // torch.nn's weight row of every packed gate column, computed once: packing runs after every
  // weight update (an optimizer step), so it must be a plain copy, not a division per element.
  p.torch_row.reset(static_cast<std::size_t>(L.gate_stride));
  long* row_of = p.torch_row.data();
  for (long col = 0; col < L.gate_stride; ++col) row_of[col] = torch_row_of_gate_column(L, col);

  // The panels are independent copies, each a pass over one weight matrix: after an optimizer
  // step every layer is repacked, so the large ones are spread over the pool's threads.
  const long w_hh_t_cols = w_hr ? output : L.hidden_padded;  // no projection: the hidden panels
  std::function<void()> tasks[] = {
      // Forward: K x gate columns, gate-interleaved panels.
      [&] {
        p.w_ih_panels = pack_transposed_rows(p.w_ih, w_ih, input, input, row_of, L.gate_stride,
                                             gate_panel, lanes);
      },
      [&] {
        p.w_hh_panels = pack_transposed_rows(p.w_hh, w_hh, output, output, row_of, L.gate_stride,
                                             gate_panel, lanes);
      },
      // Backward: gate columns (as rows, K) x input / hidden units.
      [&] {
        if (trainable)
          p.w_ih_t_panels = pack_gathered_rows(p.w_ih_t, w_ih, input, input, row_of, L.gate_stride,
                                               input, generic_panel, lanes);
      },
      [&] {
        if (trainable)
          p.w_hh_t_panels = pack_gathered_rows(p.w_hh_t, w_hh, output, output, row_of,
                                               L.gate_stride, w_hh_t_cols, generic_panel, lanes);
      },
      // h = W_hr·h_full: forward K = hidden x N = output; backward K = output x N = hidden.
      [&] {
        if (w_hr)
          p.w_hr_panels = pack_transposed_rows(p.w_hr, w_hr, hidden, hidden, nullptr, output,
                                               generic_panel, lanes);
      },
      [&] {
        if (w_hr && trainable)
          p.w_hr_t_panels = pack_gathered_rows(p.w_hr_t, w_hr, hidden, hidden, nullptr, output,
                                               L.hidden_padded, generic_panel, lanes);
      },
  };
  constexpr int kTasks = static_cast<int>(std::size(tasks));
  const long elements = L.gate_stride * (input + output) + 2 * output * hidden;
  const bool parallel = elements >= kParallelPackElements &&
                        ThreadPool::global().use_workers(elements, kShortPackElements);
  const int threads = parallel ? kTasks : 1;
  ThreadPool::global().run_tasks(threads, kTasks, [&](int i) { tasks[i](); });
  // The GRU's b_hn is applied inside r * (W_hn·h + b_hn): it gets its own vector.
  const bool gru = cell == Cell::gru;
  const long hn_row0 = 2 * hidden;  // torch.nn.GRU's rows: r, z, n
  p.bias.reset(static_cast<std::size_t>(L.gate_stride));
  for (long col = 0; col < L.gate_stride; ++col) {
    const long row = row_of[col];
    T b = T(0);
    if (row >= 0 && b_ih) b += b_ih[row];
    if (row >= 0 && b_hh && !(gru && row >= hn_row0)) b += b_hh[row];
    p.bias.data()[col] = b;
  }
  if (gru && b_hh) {
    p.bias_hn.reset(static_cast<std::size_t>(L.hidden_padded));
    for (long j = 0; j < L.hidden_padded; ++j)
      p.bias_hn.data()[j] = j < hidden ? b_hh[hn_row0 + j] : T(0);
  }
  return packed;
}

template std::shared_ptr<const PackedLayer<float>> pack_layer(const IsaKernels&, Cell, long, long,
                                                              long, const float*, const float*,
                                                              const float*, const float*,
                                                              const float*, bool);
template std::shared_ptr<const PackedLayer<double>> pack_layer(const IsaKernels&, Cell, long, long,
                                                               long, const double*, const double*,
                                                               const double*, const double*,
                                                               const double*, bool);

}  // namespace fastrnn

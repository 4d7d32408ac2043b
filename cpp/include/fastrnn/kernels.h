// The contract between the portable driver and the per-ISA kernels.
//
// Only plain structs, enums and declarations live here: this header is included by translation
// units compiled with different ISA flags, so it must not define any inline code the linker could
// merge across them (style.md, pitfall 2).
#pragma once

#include <cstddef>

namespace fastrnn {

enum class Cell : int { rnn_tanh = 0, rnn_relu = 1, lstm = 2, gru = 3 };

constexpr long kCacheLine = 64;  // bytes
enum class Activation : int { sigmoid = 0, tanh = 1, relu = 2 };

// How a layer's weights are laid out for one ISA.
//
// The hidden units are cut into blocks of `panel_hidden` units (a multiple of the SIMD width).
// A packed panel holds, for one block, the columns of all gates side by side, so one micro-kernel
// call produces every gate pre-activation of those hidden units and the cell update can run in its
// epilogue. The packed ("panel") column of gate g, hidden unit j is
//     (j / panel_hidden) * gates * panel_hidden + g * panel_hidden + j % panel_hidden.
// Gate buffers (x·W_ihᵀ + b, post-activation gates, gate gradients) use the same column order,
// with rows of `gate_stride` = gates * hidden_padded elements.
struct Layout {
  Cell cell;
  int gates;    // G: 1 (RNN), 3 (GRU: r, z, n), 4 (LSTM: i, f, g, o)
  long input;   // I
  long hidden;  // H
  long output;  // P: size of h, the layer's output (LSTM with projection: W_hr's rows; else H)
  int lanes;    // W: SIMD width of the dtype on the ISA
  int panel_vectors;   // U: vectors of hidden units per gate in a panel
  long panel_hidden;   // U * W
  long hidden_padded;  // H rounded up to panel_hidden
  long panels;         // hidden_padded / panel_hidden
  long gate_stride;    // G * hidden_padded
};

// A matrix (rows x cols) packed into column panels for the micro-kernel: panel p holds columns
// [p*panel_width, p*panel_width + width_p) for all `rows` rows, row-major within the panel, and
// starts at data + p * rows * panel_width. Only the last panel may be narrower; its width is
// rounded up to the SIMD width, the extra columns are zero.
template <class T>
struct PackedPanels {
  const T* data;
  long rows;         // K
  long cols;         // N (padded to the SIMD width)
  long panel_width;  // columns of a full panel, a multiple of the SIMD width
};

// A strided view: element (i, j) at data[i * row_stride + j * col_stride].
template <class T>
struct StridedMatrix {
  const T* data;
  long row_stride;
  long col_stride;
};

// C[m x n] = bias + A[m x k] · B[k x n], or C += A·B when accumulate; B packed into panels.
template <class T>
struct GemmArgs {
  long m, n, k;
  StridedMatrix<T> a;
  const PackedPanels<T>* b_packed;
  T* c;
  long ldc;
  bool accumulate;
  const T* bias;         // n values added to every row (nullptr: none); ignored when accumulate
  const long* c_row_of;  // row i of the product goes to C row c_row_of[i] (< 0: dropped);
                         // nullptr: row i
  T* a_block;            // the calling thread's space to pack blocks of A in:
                         // KernelTable::gemm_block_elements values
};

enum class StepPart : int { whole = 0, own_units = 1, other_units = 2 };

// One time step forward for panels [panel_begin, panel_end):
// gates = gates_in + h_prev · W_hhᵀ, then the cell's activations and state update.
template <class T>
struct StepForwardArgs {
  const Layout* layout;
  long batch;
  const T* h_prev;  // [batch, output], row stride h_prev_stride; nullptr: zeros
  long h_prev_stride;
  const T* w_hh;    // gate-interleaved panels, output rows each
  T* gates;         // [batch, gate_stride]: in x·W_ihᵀ + biases; out post-activation gates (LSTM,
                    // GRU; if store_gates)
  const T* c_prev;  // [batch, hidden_padded] (LSTM)
  T* c_next;        // [batch, hidden_padded] (LSTM)
  T* h_next;        // [batch, hidden], row stride h_next_stride (before the projection, if any)
  long h_next_stride;
  bool store_gates;
  // GRU: the n gate's recurrent bias b_hn [hidden_padded] stays inside r * (W_hn·h + b_hn), so it
  // is not folded into gates; with store_gates, W_hn·h + b_hn is kept in hidden_gate
  // [batch, hidden_padded] for backward.
  const T* bias_hn;
  T* hidden_gate;
  long panel_begin, panel_end;
  // Runs the panels last to first. When a thread's part of W_hh is about as large as its L2, or a
  // few times its L1, the driver alternates the order every step, so that a step starts on the
  // panels the previous one used last: those are still in L2 or L1.
  bool descending;
  // The recurrent product can run in two calls, so that a thread multiplies the units of h_prev
  // it computed itself while the other threads finish theirs: `own_units` multiplies units
  // [own_begin, own_end) and stores the sums in partial_sums (no epilogue); `other_units`
  // multiplies the rest, adds partial_sums and runs the epilogue.
  StepPart part;
  long own_begin, own_end;
  T* partial_sums;  // [batch, gate_stride], the gate buffer's column order
  // The "side product" (batch 1, whole steps): x·W_ihᵀ + b for the next block of steps, computed
  // in shares alongside the recurrent product, whose stream of W_hh from L2 leaves the FMA units
  // half idle. A block is KernelTable::side_block steps. Step side_phase of a block computes the
  // gate vectors of its panels whose index (gate column / lanes) is congruent to side_phase modulo
  // the block, so that the block's steps compute each gate vector once, for the side_rows rows of
  // side_x [side_rows, input] (row stride side_x_stride, negative when reversed in place), into
  // side_gates [side_rows, gate_stride]. side_x nullptr: none.
  const T* side_x;
  long side_x_stride;
  long side_rows;
  long side_phase;
  const T* w_ih;  // gate-interleaved panels, input rows each
  const T* bias;  // gate_stride values
  T* side_gates;
};

// One time step backward for hidden columns [col_begin, col_end) of w_hh_t (multiples of its panel
// width): dh_t = grad_out_t + dG_{t+1} · W_hh for the rows that continue to step t+1 (row <
// next_batch), dh_t = grad_out_t + dL/dh_n for the rows whose sequence ends at t; then the cell's
// gate gradients in the epilogue. With a projection the driver computes dL/dh_t (P) first, and
// the step multiplies it by W_hr instead: grad_gates_next = dL/dh_t, w_hh_t = W_hr.
template <class T>
struct StepBackwardArgs {
  const Layout* layout;
  long batch;
  long next_batch;                // rows of grad_gates_next (0 at the last step)
  const T* grad_gates_next;       // dG_{t+1} [next_batch, grad_gates_next_stride]
  long grad_gates_next_stride;    // gate_stride
  const PackedPanels<T>* w_hh_t;  // rows gate_stride (panel column order), cols hidden_padded
  const T* grad_out;              // dL/dh_t from the layer output [batch, hidden] or nullptr
  long grad_out_stride;
  const T* grad_h_last;  // dL/dh_n [batch, hidden], or nullptr (zeros)
  T* gates;    // in: post-activation gates at t (LSTM, GRU); out: dG_t (pre-activation grads; GRU:
               // those of W_hh·h + b_hh)
  const T* h;  // h_t [batch, hidden] (RNN derivative)
  const T* h_prev;  // h_{t-1} [batch, hidden] (GRU)
  const T* c;       // c_t [batch, hidden_padded] (LSTM)
  const T* c_prev;  // c_{t-1} [batch, hidden_padded] (LSTM)
  T* grad_c;        // in: dL/dc_t; out: dL/dc_{t-1} [batch, hidden_padded] (LSTM)
  T* hidden_gate;   // in: W_hn·h + b_hn; out: the n gate's gradient on the input side (GRU)
  T* grad_h_carry;  // in: z_{t+1} * dL/dh_{t+1}; out: z_t * dL/dh_t [batch, hidden_padded] (GRU)
  long col_begin, col_end;
};

template <class T>
struct KernelTable {
  int lanes;
  int micro_rows;            // rows of the micro-kernel
  int side_block;            // steps in a block of the side product; 0: none on this ISA
  int gemm_panel_vectors;    // vectors per full panel of a generic packed matrix
  long gemm_block_rows;      // rows of A the GEMM packs at a time
  long gemm_block_elements;  // size of GemmArgs::a_block
  void (*gemm)(const GemmArgs<T>&);
  void (*step_forward)(const StepForwardArgs<T>&);
  void (*step_backward)(const StepBackwardArgs<T>&);
  void (*activation)(Activation, const T* in, T* out, long n);
  // The FMA units' limit, for the benchmarks: `iterations` rounds of fma_chains independent
  // vector FMAs on registers. Returns a lane of their sum, so that none is optimised away.
  int fma_chains;
  T (*fma_loop)(long iterations);
};

struct IsaKernels {
  const char* name;
  KernelTable<float> f32;
  KernelTable<double> f64;
};

// Defined by the per-ISA translation units (only those built for this architecture exist).
extern const IsaKernels scalar_kernels;
#if defined(FASTRNN_HAVE_AVX2)
extern const IsaKernels avx2_kernels;
#endif
#if defined(FASTRNN_HAVE_AVX512)
extern const IsaKernels avx512_kernels;
#endif
#if defined(FASTRNN_HAVE_NEON)
extern const IsaKernels neon_kernels;
#endif

}  // namespace fastrnn

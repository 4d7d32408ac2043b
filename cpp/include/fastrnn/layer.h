// A recurrent layer's weights packed for one ISA, and the drivers that run its time loop.
#pragma once

#include <memory>
#include <vector>

#include "fastrnn/buffer.h"
#include "fastrnn/kernels.h"

namespace fastrnn {

// Packed once per weight update, then shared read-only by any number of calls and threads.
template <class T>
struct PackedLayer {
  const IsaKernels* isa;
  const KernelTable<T>* kernels;
  Layout layout;
  bool has_bias;
  AlignedBuffer<T> w_ih, w_hh;      // gate-interleaved panels (forward): K = input / hidden
  AlignedBuffer<T> w_ih_t, w_hh_t;  // panels of W_ih and W_hh for dX = dG·W_ih and dh = dG·W_hh
  AlignedBuffer<T> w_hr, w_hr_t;    // LSTM projection: panels of W_hrᵀ (h = h_full·W_hrᵀ) and W_hr
  AlignedBuffer<T> bias;            // b_ih + b_hh in panel column order, gate_stride long
                                    // (GRU: b_in alone in the n gate's columns)
  AlignedBuffer<T> bias_hn;         // GRU: b_hn, hidden_padded long (empty without bias)
  AlignedBuffer<long> torch_row;    // torch.nn's weight row of each panel column, -1 for padding
  PackedPanels<T> w_ih_panels, w_hh_panels, w_ih_t_panels, w_hh_t_panels;
  PackedPanels<T> w_hr_panels, w_hr_t_panels;
  // Packed for training too: with the backward's copies of the weights (w_ih_t, w_hh_t, w_hr_t).
  bool trainable = true;
  bool projected() const { return layout.output != layout.hidden; }
};

// Weights in torch.nn's layout: w_ih (G*H, I), w_hh (G*H, P), biases (G*H) or nullptr, and the
// LSTM's projection w_hr (P, H), or nullptr and P = H. Without `trainable`, only the forward's
// copies are packed: half the memory and time, for inference.
template <class T>
std::shared_ptr<const PackedLayer<T>> pack_layer(const IsaKernels& isa, Cell cell, long input,
                                                 long hidden, long output, const T* w_ih,
                                                 const T* w_hh, const T* b_ih, const T* b_hh,
                                                 const T* w_hr, bool trainable);

// Multiply-adds per row and step: the gates from x and h, and the LSTM's projection of h.
long step_multiply_adds(const Layout& L);

// The rows of a batch of sequences, time-major and packed like torch's PackedSequence: step t
// holds rows [offset[t], offset[t] + sizes[t]), the first sizes[t] sequences of the batch, which
// are sorted by length, longest first (sizes never increase). Equal lengths: offset[t] = t * batch.
struct Sequences {
  long steps = 0, batch = 0;
  std::vector<long> sizes;   // [steps]: sequences still running at step t, >= 1
  std::vector<long> offset;  // [steps + 1]: first row of step t; offset[steps] = rows
  std::vector<long> length;  // [batch]: steps of each sequence

  static Sequences uniform(long steps, long batch);
  // Throws std::invalid_argument unless 1 <= sizes[t] <= sizes[t-1].
  static Sequences from_batch_sizes(const long* sizes, long steps);
  long rows() const { return offset[steps]; }
  // The row of (t, b) when every sequence is read back to front: (length[b] - 1 - t, b).
  std::vector<long> reversed_rows() const;
};

// What a training forward keeps for backward (everything in processing order: a reverse layer's
// sequences are stored reversed).
template <class T>
struct TrainingState {
  std::shared_ptr<const PackedLayer<T>> layer;  // backward uses the weights the forward used
  Sequences sequences;
  bool reverse = false;
  AlignedBuffer<T> x;            // [rows, input]
  AlignedBuffer<T> gates;        // [rows, gate_stride]: post-activation gates (LSTM, GRU)
  AlignedBuffer<T> hidden_gate;  // [rows, hidden_padded]: W_hn·h + b_hn (GRU)
  AlignedBuffer<T> h;            // [batch + rows, output]: h0, then h after each row's step
  AlignedBuffer<T> c;            // [batch + rows, hidden_padded]: c0, then c (LSTM)
  AlignedBuffer<T> h_full;       // [rows, hidden]: o * tanh(c) before the projection
};

// x [rows, input] in the row order of `sequences`; h0 [batch, output], c0 [batch, hidden] or
// nullptr for zeros. Writes out [rows, output] with row stride out_stride >= output (so that the
// two directions of a layer can write side by side), h_n [batch, output] and (LSTM) c_n
// [batch, hidden]: each sequence's state after its last step. `reverse` runs every sequence from
// its last step to its first (the backward direction of a bidirectional layer); out stays in
// input order. With a non-null `state`, keeps what backward needs in it. A single step may pass
// out itself as h_n (a cell's step: its one output row is h').
template <class T>
void forward(const std::shared_ptr<const PackedLayer<T>>& layer, const Sequences& sequences,
             bool reverse, const T* x, const T* h0, const T* c0, T* out, long out_stride, T* h_n,
             T* c_n, TrainingState<T>* state);

// Gradients of the layer's parameters in torch.nn's layout; each is accumulated (+=).
template <class T>
struct ParameterGrads {
  T* w_ih;
  T* w_hh;
  T* b_ih;  // nullptr without bias
  T* b_hh;
  T* w_hr;  // LSTM projection, else nullptr
};

// Consumes the state: its gate buffer becomes the gate gradients, so call it once per forward.
// grad_out [rows, output], grad_h_n [batch, output], grad_c_n [batch, hidden]: each may be
// nullptr (zeros). Writes grad_x [rows, input] (skipped if nullptr), grad_h0 [batch, output] and
// (LSTM) grad_c0.
template <class T>
void backward(TrainingState<T>& state, const T* grad_out, const T* grad_h_n, const T* grad_c_n,
              T* grad_x, T* grad_h0, T* grad_c0, const ParameterGrads<T>& grads);

}  // namespace fastrnn

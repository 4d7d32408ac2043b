// A recurrent layer's weights packed for one ISA, and the drivers that run its time loop.
#pragma once

#include <memory>

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
  AlignedBuffer<T> bias;            // b_ih + b_hh in panel column order, gate_stride long
  AlignedBuffer<long> torch_row;    // torch.nn's weight row of each panel column, -1 for padding
  PackedPanels<T> w_ih_panels, w_hh_panels, w_ih_t_panels, w_hh_t_panels;
};

// Weights in torch.nn's layout: w_ih (G*H, I), w_hh (G*H, H), biases (G*H) or nullptr.
template <class T>
std::shared_ptr<const PackedLayer<T>> pack_layer(const IsaKernels& isa, Cell cell, long input,
                                                 long hidden, const T* w_ih, const T* w_hh,
                                                 const T* b_ih, const T* b_hh);

// What a training forward keeps for backward (everything time-major).
template <class T>
struct TrainingState {
  std::shared_ptr<const PackedLayer<T>> layer;  // backward uses the weights the forward used
  long steps = 0, batch = 0;
  AlignedBuffer<T> x;      // [steps, batch, input]
  AlignedBuffer<T> gates;  // [steps, batch, gate_stride]: post-activation gates (LSTM)
  AlignedBuffer<T> h;      // [steps + 1, batch, hidden]: h0, h1, ..., h_T
  AlignedBuffer<T> c;      // [steps + 1, batch, hidden_padded] (LSTM)
};

// x [steps, batch, input] C-contiguous; h0, c0 [batch, hidden] or nullptr for zeros.
// Writes out [steps, batch, hidden], h_n and (LSTM) c_n [batch, hidden].
// With a non-null `state`, keeps what backward needs in it.
template <class T>
void forward(const std::shared_ptr<const PackedLayer<T>>& layer, long steps, long batch, const T* x,
             const T* h0, const T* c0, T* out, T* h_n, T* c_n, TrainingState<T>* state);

// Gradients of the layer's parameters in torch.nn's layout; each is accumulated (+=).
template <class T>
struct ParameterGrads {
  T* w_ih;
  T* w_hh;
  T* b_ih;  // nullptr without bias
  T* b_hh;
};

// Consumes the state: its gate buffer becomes the gate gradients, so call it once per forward.
// grad_out [steps, batch, hidden], grad_h_n, grad_c_n [batch, hidden]: each may be nullptr (zeros).
// Writes grad_x [steps, batch, input], grad_h0 and (LSTM) grad_c0 [batch, hidden].
template <class T>
void backward(TrainingState<T>& state, const T* grad_out, const T* grad_h_n, const T* grad_c_n,
              T* grad_x, T* grad_h0, T* grad_c0, const ParameterGrads<T>& grads);

}  // namespace fastrnn

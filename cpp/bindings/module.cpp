// fastrnn._core: argument checks, buffer allocation and GIL release around the C++ drivers.
// No math here. The user-facing checks with torch-like messages live in python/fastrnn; these
// checks are the safety net that keeps direct calls from crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "fastrnn/buffer.h"
#include "fastrnn/dispatch.h"
#include "fastrnn/fp_env.h"
#include "fastrnn/layer.h"
#include "fastrnn/thread_pool.h"

namespace py = pybind11;
using namespace fastrnn;

namespace {

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A new uninitialised array, 64-byte aligned in fastrnn's memory (buffer.cpp): a training loop
// asks for outputs of the same shapes on every call, and large blocks are recycled (fresh pages
// from the kernel cost a page fault and a zeroing each: about 5% of a training step of a large
// layer); rows that threads write side by side share no cache line by accident. Below a page
// (a cell step's outputs) NumPy's own array, without the capsule, saves 0.1-0.3 us an array on a
// call of a few microseconds; the kernels store unaligned, so any alignment is correct.
template <class T>
CArray<T> new_array(const std::vector<py::ssize_t>& shape) {
  constexpr std::size_t kPageBytes = 4096;
  std::size_t count = 1;
  for (const py::ssize_t n : shape) count *= static_cast<std::size_t>(n);
  if (count * sizeof(T) < kPageBytes) return CArray<T>(shape);
  auto owner = std::make_unique<AlignedBuffer<T>>(count);
  T* data = owner->data();
  py::capsule base(owner.get(), [](void* p) { delete static_cast<AlignedBuffer<T>*>(p); });
  owner.release();  // the capsule owns it now
  return CArray<T>(shape, data, base);
}

// A C-contiguous, aligned array of T (a copy when needed); TypeError when the input cannot
// convert, MemoryError when the copy does not fit. NumPy allows misaligned arrays (e.g. views
// into byte buffers): they are copied too.
template <class T>
CArray<T> as_array(const py::array& a, const char* name) {
  // Already right (every call of a streaming cell): no NumPy conversion machinery, which costs
  // about 0.1 us an array.
  if (py::isinstance<py::array_t<T>>(a) && (a.flags() & py::array::c_style) &&
      reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) == 0)
    return py::reinterpret_borrow<CArray<T>>(a);
  CArray<T> out;
  try {
    out = CArray<T>(a);
  } catch (py::error_already_set& e) {
    if (e.matches(PyExc_MemoryError)) throw;  // the copy itself, not the conversion, failed
    throw py::type_error(std::string(name) + " must be convertible to " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (reinterpret_cast<std::uintptr_t>(out.data()) % alignof(T) != 0) {
    CArray<T> aligned(std::vector<py::ssize_t>(out.shape(), out.shape() + out.ndim()));
    std::memcpy(aligned.mutable_data(), out.data(), static_cast<std::size_t>(out.nbytes()));
    return aligned;
  }
  return out;
}

Cell parse_cell(const std::string& name) {
  if (name == "lstm") return Cell::lstm;
  if (name == "rnn_tanh") return Cell::rnn_tanh;
  if (name == "rnn_relu") return Cell::rnn_relu;
  if (name == "gru") return Cell::gru;
  throw py::value_error("cell must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '" + name + "'");
}

const char* cell_name(Cell cell) {
  switch (cell) {
    case Cell::lstm: return "lstm";
    case Cell::rnn_tanh: return "rnn_tanh";
    case Cell::rnn_relu: return "rnn_relu";
    case Cell::gru: return "gru";
  }
  return "?";
}

std::string shape_string(const std::vector<py::ssize_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

void require_shape(const py::array& a, const std::vector<py::ssize_t>& expected, const char* name) {
  if (shape_of(a) != expected)
    throw py::value_error(std::string(name) + " must have shape " + shape_string(expected) +
                          ", got " + shape_string(shape_of(a)));
}

// An optional input converted to a C-contiguous array of T and checked against `shape`.
template <class T>
std::optional<CArray<T>> optional_input(const std::optional<py::array>& a,
                                        const std::vector<py::ssize_t>& shape, const char* name) {
  if (!a) return std::nullopt;
  CArray<T> array = as_array<T>(*a, name);
  require_shape(array, shape, name);
  return array;
}

template <class T>
const T* data_or_null(const std::optional<CArray<T>>& a) {
  return a ? a->data() : nullptr;
}

// A parameter-gradient array the caller owns and we add into: exact dtype, C-contiguous, writable.
template <class T>
T* accumulator(const std::optional<py::array>& a, const std::vector<py::ssize_t>& shape,
               const char* name) {
  if (!a) return nullptr;
  const bool aligned = reinterpret_cast<std::uintptr_t>(a->data()) % alignof(T) == 0;
  if (!py::isinstance<py::array_t<T>>(*a) || !(a->flags() & py::array::c_style) ||
      !a->writeable() || !aligned)
    throw py::value_error(std::string(name) +
                          " must be a writable, aligned, C-contiguous array of the layer's dtype");
  require_shape(*a, shape, name);
  py::array target = *a;  // a new handle to the same array
  return static_cast<T*>(target.mutable_data());
}

// NumPy's dtype equivalence (not object identity: unpickled arrays carry equal, distinct dtypes).
template <class T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

// The packed weights of one layer and direction, for one dtype and ISA.
class Layer {
 public:
  std::shared_ptr<const PackedLayer<float>> f32;
  std::shared_ptr<const PackedLayer<double>> f64;

  template <class T>
  const std::shared_ptr<const PackedLayer<T>>& get() const {
    if constexpr (std::is_same_v<T, float>)
      return f32;
    else
      return f64;
  }
  const Layout& layout() const { return f32 ? f32->layout : f64->layout; }
  const char* isa() const { return f32 ? f32->isa->name : f64->isa->name; }
  bool packed_for_active_isa() const { return (f32 ? f32->isa : f64->isa) == &active_isa(); }
  bool has_bias() const { return f32 ? f32->has_bias : f64->has_bias; }
  bool trainable() const { return f32 ? f32->trainable : f64->trainable; }
  py::dtype dtype() const { return f32 ? py::dtype::of<float>() : py::dtype::of<double>(); }
};

// What a training forward kept; consumed by one backward.
class State {
 public:
  std::shared_ptr<TrainingState<float>> f32;
  std::shared_ptr<TrainingState<double>> f64;
  bool packed = false;  // the forward's x was packed (rows, input) with batch_sizes
  bool consumed = false;
};

// A training forward's state as the TrainingState object backward takes; None without one.
template <class T>
py::object saved_state(std::shared_ptr<TrainingState<T>> state, bool packed) {
  if (!state) return py::none();
  State s;
  s.packed = packed;
  if constexpr (std::is_same_v<T, float>)
    s.f32 = std::move(state);
  else
    s.f64 = std::move(state);
  return py::cast(std::move(s));
}

template <class T>
Layer pack_typed(Cell cell, const py::array& w_ih_in, const py::array& w_hh_in,
                 const std::optional<py::array>& b_ih_in, const std::optional<py::array>& b_hh_in,
                 const std::optional<py::array>& w_hr_in, bool trainable) {
  const long gates = cell == Cell::lstm ? 4 : cell == Cell::gru ? 3 : 1;
  CArray<T> w_ih = as_array<T>(w_ih_in, "weight_ih"), w_hh = as_array<T>(w_hh_in, "weight_hh");
  std::optional<CArray<T>> w_hr;
  if (w_hr_in) {
    if (cell != Cell::lstm) throw py::value_error("weight_hr (a projection) is for the LSTM only");
    w_hr = as_array<T>(*w_hr_in, "weight_hr");
    if (w_hr->ndim() != 2 || w_hr->shape(0) < 1 || w_hr->shape(1) < 1)
      throw py::value_error("weight_hr must have shape (proj_size, hidden_size), got " +
                            shape_string(shape_of(*w_hr)));
  }
  // Without a projection W_hh is (G*H, H); with one, (G*H, P) and W_hr is (P, H).
  const long hidden = static_cast<long>(w_hr ? w_hr->shape(1) : w_hh.shape(1));
  const long output = static_cast<long>(w_hr ? w_hr->shape(0) : hidden);
  if (w_hh.ndim() != 2 || w_hh.shape(0) != gates * hidden || w_hh.shape(1) != output || hidden < 1)
    throw py::value_error("weight_hh must have shape (" + std::to_string(gates) + "*hidden_size, " +
                          (w_hr ? "proj_size" : "hidden_size") + "), got " +
                          shape_string(shape_of(w_hh)));
  if (w_ih.ndim() != 2 || w_ih.shape(0) != gates * hidden || w_ih.shape(1) < 1)
    throw py::value_error("weight_ih must have shape (" + std::to_string(gates * hidden) +
                          ", input_size), got " + shape_string(shape_of(w_ih)));
  const long input = static_cast<long>(w_ih.shape(1));
  const auto b_ih = optional_input<T>(b_ih_in, {gates * hidden}, "bias_ih");
  const auto b_hh = optional_input<T>(b_hh_in, {gates * hidden}, "bias_hh");
  const IsaKernels& isa = active_isa();
  Layer layer;
  py::gil_scoped_release release;
  auto packed =
      pack_layer<T>(isa, cell, input, hidden, output, w_ih.data(), w_hh.data(), data_or_null(b_ih),
                    data_or_null(b_hh), data_or_null(w_hr), trainable);
  if constexpr (std::is_same_v<T, float>)
    layer.f32 = std::move(packed);
  else
    layer.f64 = std::move(packed);
  return layer;
}

Layer pack(const std::string& cell_name_in, const py::array& w_ih, const py::array& w_hh,
           const std::optional<py::array>& b_ih, const std::optional<py::array>& b_hh,
           const std::optional<py::array>& w_hr, bool training) {
  const Cell cell = parse_cell(cell_name_in);
  if (has_dtype<float>(w_ih))
    return pack_typed<float>(cell, w_ih, w_hh, b_ih, b_hh, w_hr, training);
  if (has_dtype<double>(w_ih))
    return pack_typed<double>(cell, w_ih, w_hh, b_ih, b_hh, w_hr, training);
  throw py::type_error("weight_ih must be float32 or float64, got " +
                       std::string(py::str(w_ih.dtype())));
}

// The sequences of a call: x [steps, batch, input], or x [rows, input] packed like a
// PackedSequence's data with its batch_sizes [steps].
Sequences sequences_of(const py::array& x, const std::optional<py::array>& batch_sizes_in,
                       long input) {
  if (!batch_sizes_in) {
    if (x.ndim() != 3 || x.shape(2) != input)
      throw py::value_error("x must have shape (seq_len, batch, " + std::to_string(input) +
                            "), got " + shape_string(shape_of(x)));
    if (x.shape(0) < 1) throw py::value_error("x: sequence length must be > 0, got 0");
    return Sequences::uniform(static_cast<long>(x.shape(0)), static_cast<long>(x.shape(1)));
  }
  const char kind = batch_sizes_in->dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw py::type_error("batch_sizes must be integers, got " +
                         std::string(py::str(batch_sizes_in->dtype())));
  const CArray<long> sizes = as_array<long>(*batch_sizes_in, "batch_sizes");
  if (sizes.ndim() != 1 || sizes.size() < 1)
    throw py::value_error("batch_sizes must be a non-empty 1-D array, got shape " +
                          shape_string(shape_of(sizes)));
  Sequences seq;
  try {
    seq = Sequences::from_batch_sizes(sizes.data(), static_cast<long>(sizes.size()));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  if (x.ndim() != 2 || x.shape(0) != seq.rows() || x.shape(1) != input)
    throw py::value_error("x must have shape (sum(batch_sizes), input_size) = (" +
                          std::to_string(seq.rows()) + ", " + std::to_string(input) + "), got " +
                          shape_string(shape_of(x)));
  return seq;
}

// The shape of a call's rows of `width` values: (steps, batch, width) or packed (rows, width).
std::vector<py::ssize_t> rows_shape(const Sequences& seq, bool packed, long width) {
  if (packed) return {seq.rows(), width};
  return {seq.steps, seq.batch, width};
}

// A core call whose arguments are checked and whose outputs are allocated: run() needs no GIL
// and touches no Python object; result() (with the GIL, after run) builds the return value.
struct PreparedCall {
  std::function<void()> run;
  std::function<py::object()> result;
  bool* consumes = nullptr;  // a backward's state flag: set once every call is checked
  long work = 0;             // multiply-adds, about
};

// Runs the calls, several at once when the pool has the threads: each on one thread, so a
// call's own parallel regions run on its thread alone (the two directions of a bidirectional
// layer: no per-step barrier, each core keeps one direction's weights). Releases the GIL.
void run_calls(std::vector<PreparedCall>& calls) {
  for (std::size_t i = 0; i < calls.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      if (calls[i].consumes && calls[i].consumes == calls[j].consumes)
        throw py::value_error("the same training state was given to backward twice");
  for (PreparedCall& call : calls)
    if (call.consumes) *call.consumes = true;  // backward overwrites the saved gates
  py::gil_scoped_release release;
  long work = 0;
  for (const PreparedCall& call : calls) work += call.work;
  // Short calls do not wait for workers that sleep (kShortCallWork): one after the other here.
  if (calls.size() == 1 || !ThreadPool::global().use_workers(work)) {
    for (PreparedCall& call : calls) call.run();
    return;
  }
  const int count = static_cast<int>(calls.size());
  ThreadPool::global().run_tasks(count, count,
                                 [&](int i) { calls[static_cast<std::size_t>(i)].run(); });
}

// forward_each's concatenated output: call after call writes the next `output` columns of one
// array of `width` columns, which the first call allocates. A bidirectional layer's directions
// write side by side, with no np.concatenate (a copy of the whole output).
struct SharedOutput {
  py::object array;  // null until the first call
  long width = 0;
  long column = 0;  // the next call's first column
};

template <class T>
PreparedCall prepare_forward(const Layer& layer, const py::array& x_in,
                             const std::optional<py::array>& h0_in,
                             const std::optional<py::array>& c0_in, bool training,
                             const std::optional<py::array>& batch_sizes, bool reverse,
                             SharedOutput* shared) {
  const Layout& L = layer.layout();
  const bool lstm = L.cell == Cell::lstm, packed = batch_sizes.has_value();
  if (training && !layer.trainable())
    throw py::value_error("a training forward needs a layer packed with training=True");
  CArray<T> x = as_array<T>(x_in, "x");
  auto seq = std::make_shared<const Sequences>(sequences_of(x, batch_sizes, L.input));
  const std::vector<py::ssize_t> h_shape{seq->batch, L.output}, c_shape{seq->batch, L.hidden};
  if (c0_in && !lstm) throw py::value_error("c0 is only for the LSTM");
  const auto h0 = optional_input<T>(h0_in, h_shape, "h0");
  const auto c0 = optional_input<T>(c0_in, c_shape, "c0");
  const long out_stride = shared ? shared->width : L.output;
  const std::vector<py::ssize_t> out_shape = rows_shape(*seq, packed, out_stride);
  long out_column = 0;
  CArray<T> out = [&] {
    if (!shared) return new_array<T>(out_shape);
    if (!shared->array)
      shared->array = new_array<T>(out_shape);
    else if (!has_dtype<T>(shared->array) || shape_of(shared->array) != out_shape)
      throw py::value_error("concatenated forwards must have the same dtype and rows");
    out_column = shared->column;
    shared->column += L.output;
    return py::reinterpret_borrow<CArray<T>>(shared->array);
  }();
  CArray<T> h_n = new_array<T>(h_shape);
  std::optional<CArray<T>> c_n;
  if (lstm) c_n = new_array<T>(c_shape);
  std::shared_ptr<TrainingState<T>> state;
  if (training) state = std::make_shared<TrainingState<T>>();
  auto run = [packed_layer = layer.get<T>(), seq, reverse, x = x.data(), h0 = data_or_null(h0),
              c0 = data_or_null(c0), out = out.mutable_data() + out_column, out_stride,
              h_n = h_n.mutable_data(), c_n = c_n ? c_n->mutable_data() : nullptr, state] {
    forward<T>(packed_layer, *seq, reverse, x, h0, c0, out, out_stride, h_n, c_n, state.get());
  };
  // The arrays stay alive in result's captures until the call is done.
  auto result = [x, h0, c0, out, h_n, c_n, state, packed]() -> py::object {
    return py::make_tuple(out, h_n, c_n ? py::object(*c_n) : py::none(),
                          saved_state(state, packed));
  };
  return {run, result, nullptr, seq->rows() * step_multiply_adds(L)};
}

PreparedCall prepare_forward_any(const Layer& layer, const py::array& x,
                                 const std::optional<py::array>& h0,
                                 const std::optional<py::array>& c0, bool training,
                                 const std::optional<py::array>& batch_sizes, bool reverse,
                                 SharedOutput* shared = nullptr) {
  if (layer.f32)
    return prepare_forward<float>(layer, x, h0, c0, training, batch_sizes, reverse, shared);
  return prepare_forward<double>(layer, x, h0, c0, training, batch_sizes, reverse, shared);
}

py::object forward_any(const Layer& layer, const py::array& x, const std::optional<py::array>& h0,
                       const std::optional<py::array>& c0, bool training,
                       const std::optional<py::array>& batch_sizes, bool reverse) {
  std::vector<PreparedCall> calls{
      prepare_forward_any(layer, x, h0, c0, training, batch_sizes, reverse)};
  run_calls(calls);
  return calls[0].result();
}

// One time step of a cell (fastrnn.LSTMCell, GRUCell, RNNCell): x (batch, input), h (batch,
// output) and c (batch, hidden) or None for zeros. The streaming path, a few microseconds a call
// at small sizes, so without forward's generality (sequences, several calls, the output rows
// apart from h_n: one step's output is h'). Returns (h', c' or None, TrainingState or None).
template <class T>
py::object step_typed(const Layer& layer, const py::array& x_in,
                      const std::optional<py::array>& h_in, const std::optional<py::array>& c_in,
                      bool training) {
  const Layout& L = layer.layout();
  const bool lstm = L.cell == Cell::lstm;
  if (training && !layer.trainable())
    throw py::value_error("a training step needs a layer packed with training=True");
  CArray<T> x = as_array<T>(x_in, "x");
  if (x.ndim() != 2 || x.shape(1) != L.input)
    throw py::value_error("x must have shape (batch, " + std::to_string(L.input) + "), got " +
                          shape_string(shape_of(x)));
  const long batch = static_cast<long>(x.shape(0));
  const std::vector<py::ssize_t> h_shape{batch, L.output}, c_shape{batch, L.hidden};
  if (c_in && !lstm) throw py::value_error("c is only for the LSTM");
  const auto h = optional_input<T>(h_in, h_shape, "h");
  const auto c = optional_input<T>(c_in, c_shape, "c");
  CArray<T> h_next = new_array<T>(h_shape);
  std::optional<CArray<T>> c_next;
  if (lstm) c_next = new_array<T>(c_shape);
  std::shared_ptr<TrainingState<T>> state;
  if (training) state = std::make_shared<TrainingState<T>>();
  {
    py::gil_scoped_release release;
    T* out = h_next.mutable_data();
    forward<T>(layer.get<T>(), Sequences::uniform(1, batch), false, x.data(), data_or_null(h),
               data_or_null(c), out, L.output, out, c_next ? c_next->mutable_data() : nullptr,
               state.get());
  }
  return py::make_tuple(h_next, c_next ? py::object(*c_next) : py::none(),
                        saved_state(std::move(state), false));
}

py::object step_any(const Layer& layer, const py::array& x, const std::optional<py::array>& h,
                    const std::optional<py::array>& c, bool training) {
  if (layer.f32) return step_typed<float>(layer, x, h, c, training);
  return step_typed<double>(layer, x, h, c, training);
}

// backward's arguments after the state: the gradients arriving at out, h_n and c_n (None:
// zeros), the caller's parameter-gradient accumulators, and whether dx is wanted.
struct BackwardArgs {
  std::optional<py::array> grad_out, grad_h_n, grad_c_n;
  std::optional<py::array> grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
  bool grad_input = true;
};

template <class T>
PreparedCall prepare_backward(const std::shared_ptr<TrainingState<T>>& state, bool packed,
                              bool& consumed, const BackwardArgs& a) {
  const Layout& L = state->layer->layout;
  const bool lstm = L.cell == Cell::lstm, projected = state->layer->projected();
  const Sequences& seq = state->sequences;
  const long gate_rows = L.gates * L.hidden;
  const std::vector<py::ssize_t> h_shape{seq.batch, L.output}, c_shape{seq.batch, L.hidden};
  if (a.grad_c_n && !lstm) throw py::value_error("grad_c_n is only for the LSTM");
  const auto grad_out =
      optional_input<T>(a.grad_out, rows_shape(seq, packed, L.output), "grad_out");
  const auto grad_h_n = optional_input<T>(a.grad_h_n, h_shape, "grad_h_n");
  const auto grad_c_n = optional_input<T>(a.grad_c_n, c_shape, "grad_c_n");
  if (!a.grad_w_ih || !a.grad_w_hh || (projected && !a.grad_w_hr))
    throw py::value_error(std::string("grad_weight_ih, grad_weight_hh") +
                          (projected ? " and grad_weight_hr are" : " are") + " required");
  if (a.grad_w_hr && !projected) throw py::value_error("grad_weight_hr is only for a projection");
  ParameterGrads<T> grads{accumulator<T>(a.grad_w_ih, {gate_rows, L.input}, "grad_weight_ih"),
                          accumulator<T>(a.grad_w_hh, {gate_rows, L.output}, "grad_weight_hh"),
                          accumulator<T>(a.grad_b_ih, {gate_rows}, "grad_bias_ih"),
                          accumulator<T>(a.grad_b_hh, {gate_rows}, "grad_bias_hh"),
                          accumulator<T>(a.grad_w_hr, {L.output, L.hidden}, "grad_weight_hr")};
  std::optional<CArray<T>> grad_x, grad_c0;
  if (a.grad_input) grad_x = new_array<T>(rows_shape(seq, packed, L.input));
  CArray<T> grad_h0 = new_array<T>(h_shape);
  if (lstm) grad_c0 = new_array<T>(c_shape);
  // The gradient accumulators are the caller's arrays, alive for the whole call.
  auto run = [state, grad_out = data_or_null(grad_out), grad_h_n = data_or_null(grad_h_n),
              grad_c_n = data_or_null(grad_c_n), grad_x = grad_x ? grad_x->mutable_data() : nullptr,
              grad_h0 = grad_h0.mutable_data(),
              grad_c0 = grad_c0 ? grad_c0->mutable_data() : nullptr, grads] {
    backward<T>(*state, grad_out, grad_h_n, grad_c_n, grad_x, grad_h0, grad_c0, grads);
  };
  auto result = [grad_out, grad_h_n, grad_c_n, grad_x, grad_h0, grad_c0]() -> py::object {
    return py::make_tuple(grad_x ? py::object(*grad_x) : py::none(), grad_h0,
                          grad_c0 ? py::object(*grad_c0) : py::none());
  };
  // Backward does three times a forward's work: dh, dW_ih and dW_hh (as the driver counts it).
  return {run, result, &consumed, 3 * seq.rows() * step_multiply_adds(L)};
}

PreparedCall prepare_backward_any(State& state, const BackwardArgs& args) {
  if (state.consumed)
    throw std::runtime_error(
        "backward was already run for this forward; run a training forward again");
  if (state.f32) return prepare_backward(state.f32, state.packed, state.consumed, args);
  return prepare_backward(state.f64, state.packed, state.consumed, args);
}

py::object backward_any(State& state, const std::optional<py::array>& grad_out,
                        const std::optional<py::array>& grad_h_n,
                        const std::optional<py::array>& grad_c_n,
                        const std::optional<py::array>& grad_w_ih,
                        const std::optional<py::array>& grad_w_hh,
                        const std::optional<py::array>& grad_b_ih,
                        const std::optional<py::array>& grad_b_hh,
                        const std::optional<py::array>& grad_w_hr, bool grad_input) {
  std::vector<PreparedCall> calls{
      prepare_backward_any(state, {grad_out, grad_h_n, grad_c_n, grad_w_ih, grad_w_hh, grad_b_ih,
                                   grad_b_hh, grad_w_hr, grad_input})};
  run_calls(calls);
  return calls[0].result();
}

// Several independent calls at once: a list of argument tuples, a list of results. Every call
// is checked before any runs.
template <class Prepare>
py::list run_each(const py::list& argument_tuples, Prepare prepare) {
  std::vector<PreparedCall> calls;
  for (const py::handle arguments : argument_tuples) calls.push_back(prepare(arguments));
  run_calls(calls);
  py::list results;
  for (PreparedCall& call : calls) results.append(call.result());
  return results;
}

py::list forward_each(const py::list& calls, bool concatenate) {
  using Arguments = std::tuple<const Layer&, py::array, std::optional<py::array>,
                               std::optional<py::array>, bool, std::optional<py::array>, bool>;
  std::optional<SharedOutput> shared;
  if (concatenate) {
    shared.emplace();
    for (const py::handle arguments : calls)
      shared->width += std::get<0>(py::cast<Arguments>(arguments)).layout().output;
  }
  return run_each(calls, [&](py::handle arguments) {
    const auto [layer, x, h0, c0, training, batch_sizes, reverse] = py::cast<Arguments>(arguments);
    return prepare_forward_any(layer, x, h0, c0, training, batch_sizes, reverse,
                               shared ? &*shared : nullptr);
  });
}

py::list backward_each(const py::list& calls) {
  return run_each(calls, [](py::handle arguments) {
    auto [state, grad_out, grad_h_n, grad_c_n, w_ih, w_hh, b_ih, b_hh, w_hr, grad_input] =
        py::cast<std::tuple<State&, std::optional<py::array>, std::optional<py::array>,
                            std::optional<py::array>, std::optional<py::array>,
                            std::optional<py::array>, std::optional<py::array>,
                            std::optional<py::array>, std::optional<py::array>, bool>>(arguments);
    return prepare_backward_any(
        state, {grad_out, grad_h_n, grad_c_n, w_ih, w_hh, b_ih, b_hh, w_hr, grad_input});
  });
}

template <class T>
const KernelTable<T>& active_kernels() {
  if constexpr (std::is_same_v<T, float>)
    return active_isa().f32;
  else
    return active_isa().f64;
}

template <class T>
py::array activation_typed(Activation kind, const py::array& x_in) {
  CArray<T> x = as_array<T>(x_in, "x");
  CArray<T> y(x.size());
  const KernelTable<T>& k = active_kernels<T>();
  py::gil_scoped_release release;
  FlushDenormalsScope flush_denormals;
  k.activation(kind, x.data(), y.mutable_data(), static_cast<long>(x.size()));
  return y;
}

py::array activation(const std::string& name, const py::array& x) {
  Activation kind;
  if (name == "sigmoid")
    kind = Activation::sigmoid;
  else if (name == "tanh")
    kind = Activation::tanh;
  else if (name == "relu")
    kind = Activation::relu;
  else
    throw py::value_error("activation must be 'sigmoid', 'tanh' or 'relu', got '" + name + "'");
  if (x.ndim() != 1) throw py::value_error("x must be 1-D");
  if (has_dtype<float>(x)) return activation_typed<float>(kind, x);
  if (has_dtype<double>(x)) return activation_typed<double>(kind, x);
  throw py::type_error("x must be float32 or float64");
}

// About `flops` operations of register FMAs, shared by the pool's threads all at once: the FMA
// units' limit, which the benchmarks compare the layers with. Returns the operations done.
template <class T>
double fma_limit_run(double flops) {
  const KernelTable<T>& k = active_kernels<T>();
  const int threads = ThreadPool::global().threads();
  const double per_round = 2.0 * k.fma_chains * k.lanes;
  const long rounds = static_cast<long>(flops / (per_round * threads));
  py::gil_scoped_release release;
  ThreadPool::global().run(threads, [&](const ThreadContext&) { k.fma_loop(rounds); });
  return static_cast<double>(rounds) * per_round * threads;
}

double fma_limit(double flops, const std::string& dtype) {
  if (!(flops >= 1 && flops <= 1e15))
    throw py::value_error("flops must be between 1 and 1e15, got " + std::to_string(flops));
  if (dtype == "float32") return fma_limit_run<float>(flops);
  if (dtype == "float64") return fma_limit_run<double>(flops);
  throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

// Seconds per barrier of the pool's threads: what a time step split by hidden units pays once per
// step to meet the other threads (0 on one thread).
double barrier_seconds(long rounds) {
  if (rounds < 1 || rounds > 100'000'000)
    throw py::value_error("rounds must be between 1 and 1e8, got " + std::to_string(rounds));
  py::gil_scoped_release release;
  double seconds = 0;
  ThreadPool::global().run(ThreadPool::global().threads(), [&](const ThreadContext& ctx) {
    if (ctx.count < 2) return;  // the pool was busy: this call ran alone
    ctx.sync();                 // every thread has started
    const auto start = std::chrono::steady_clock::now();
    for (long i = 0; i < rounds; ++i) ctx.sync();
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    if (ctx.index == 0) seconds = elapsed.count() / static_cast<double>(rounds);
  });
  return seconds;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastrnn's compiled core (private: use the fastrnn package)";
  try {
    select_isa_from_environment();
    ThreadPool::global().set_threads(ThreadPool::default_threads());
    l2_cache_bytes();  // read from the OS now, not inside a layer call's first parallel region
  } catch (const std::invalid_argument& e) {
    throw py::import_error(e.what());
  }
  m.attr("__version__") = FASTRNN_VERSION;

  m.def(
      "active_isa", [] { return std::string(active_isa().name); },
      "The instruction set the kernels use (chosen at import; FASTRNN_ISA overrides it).");
  m.def("available_isas", &available_isas, "The instruction sets this CPU supports, best first.");
  m.def("compiled_isas", &compiled_isas,
        "The instruction sets compiled into this build, best first.");
  m.def(
      "_set_isa",
      [](const std::string& name) {
        try {
          set_active_isa(name);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("name"), "Testing hook: use another ISA for layers packed from now on.");
  m.def("_l2_cache_bytes", &l2_cache_bytes,
        "One core's L2 cache in bytes, as detected at import (it sizes the work split).");
  m.attr("_max_threads") = ThreadPool::kMaxThreads;
  m.def(
      "get_num_threads", [] { return ThreadPool::global().threads(); },
      "Threads a layer call may use (the calling thread included).");
  m.def(
      "set_num_threads",
      [](int threads) {
        if (threads < 1 || threads > ThreadPool::kMaxThreads)
          throw py::value_error("set_num_threads: n must be from 1 to " +
                                std::to_string(ThreadPool::kMaxThreads) + ", got " +
                                std::to_string(threads));
        py::gil_scoped_release release;  // waits for a running region to finish
        ThreadPool::global().set_threads(threads);
      },
      py::arg("n"),
      "Set the threads layer calls may use. Default: FASTRNN_NUM_THREADS, or the usable cores.");
  m.def(
      "_use_openmp",
      [](const std::string& library) {
        py::gil_scoped_release release;  // waits for a running region to finish
        ThreadPool::global().use_openmp(library);
      },
      py::arg("library"),
      "Run parallel regions on the thread team of this already loaded OpenMP runtime (a path; "
      "\"\" for fastrnn's own workers). fastrnn.torch uses it with torch's runtime.");
  m.def(
      "_openmp_library", [] { return ThreadPool::global().openmp_library(); },
      "The OpenMP runtime parallel regions run on, or \"\" for fastrnn's own workers.");
  m.def("_fma_limit", &fma_limit, py::arg("flops"), py::arg("dtype") = "float32",
        "Benchmark hook: about `flops` operations of independent FMAs on registers, on all the "
        "threads at once (the FMA units' limit); returns the operations done.");
  m.def("_barrier_seconds", &barrier_seconds, py::arg("rounds"),
        "Benchmark hook: seconds per barrier of the thread pool's threads, the synchronisation a "
        "time step split by hidden units pays once per step (0 on one thread).");
  m.def("_cpu_moves", &ThreadPool::cpu_moves,
        "Testing hook: how many times a worker has left a CPU it shared with another thread of "
        "its parallel region.");
  m.def("_steals", &PanelRanges::steals,
        "Testing hook: how many times a thread has taken time-step panels from another thread's "
        "share (work stealing, at batch 4 and up).");
  m.def("activation", &activation, py::arg("name"), py::arg("x"),
        "Testing hook: the active ISA's vectorized activation applied to a 1-D array.");

  py::class_<Layer>(m, "PackedLayer", "A layer's weights packed for the kernels of one ISA.")
      .def_property_readonly("isa", &Layer::isa)
      .def_property_readonly("current", &Layer::packed_for_active_isa,
                             "Whether the weights are packed for the active ISA (else: repack).")
      .def_property_readonly("dtype", &Layer::dtype)
      .def_property_readonly("cell", [](const Layer& l) { return cell_name(l.layout().cell); })
      .def_property_readonly("input_size", [](const Layer& l) { return l.layout().input; })
      .def_property_readonly("hidden_size", [](const Layer& l) { return l.layout().hidden; })
      .def_property_readonly("output_size", [](const Layer& l) { return l.layout().output; })
      .def_property_readonly("has_bias", &Layer::has_bias)
      .def_property_readonly("trainable", &Layer::trainable);
  py::class_<State>(m, "TrainingState", "What a training forward keeps for its backward.");

  m.def("pack", &pack, py::arg("cell"), py::arg("weight_ih"), py::arg("weight_hh"),
        py::arg("bias_ih") = py::none(), py::arg("bias_hh") = py::none(),
        py::arg("weight_hr") = py::none(), py::arg("training") = true,
        "Pack torch.nn-layout weights for the active ISA (weight_hr: the LSTM's projection). "
        "training=False packs only what a forward in inference needs: half the memory.");
  m.def("forward", &forward_any, py::arg("layer"), py::arg("x"), py::arg("h0") = py::none(),
        py::arg("c0") = py::none(), py::arg("training") = false,
        py::arg("batch_sizes") = py::none(), py::arg("reverse") = false,
        "Time-major forward of x (seq_len, batch, input), or of x (rows, input) packed like a "
        "PackedSequence with its batch_sizes; reverse runs each sequence back to front. Returns "
        "(out, h_n, c_n or None, TrainingState or None).");
  m.def("step", &step_any, py::arg("layer"), py::arg("x"), py::arg("h") = py::none(),
        py::arg("c") = py::none(), py::arg("training") = false,
        "One time step of x (batch, input) from h and c (None: zeros), a cell's call. Returns "
        "(h', c' or None, TrainingState or None); backward takes the state as forward's.");
  m.def("forward_each", &forward_each, py::arg("calls"), py::arg("concatenate") = false,
        "Several independent forwards at once, each on its own thread (e.g. the two directions "
        "of a layer): calls is a list of (layer, x, h0, c0, training, batch_sizes, reverse); "
        "returns the list of forward's results. With concatenate, the calls (same dtype and "
        "rows) write their outputs side by side into one array, every result's out.");
  m.def("backward_each", &backward_each, py::arg("calls"),
        "Several independent backwards at once: calls is a list of (state, grad_out, grad_h_n, "
        "grad_c_n, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_weight_hr, "
        "grad_input); returns the list of backward's results.");
  m.def("backward", &backward_any, py::arg("state"), py::arg("grad_out") = py::none(),
        py::arg("grad_h_n") = py::none(), py::arg("grad_c_n") = py::none(),
        py::arg("grad_weight_ih") = py::none(), py::arg("grad_weight_hh") = py::none(),
        py::arg("grad_bias_ih") = py::none(), py::arg("grad_bias_hh") = py::none(),
        py::arg("grad_weight_hr") = py::none(), py::arg("grad_input") = true,
        "Backward through time: returns (dx, dh0, dc0 or None); adds into the parameter grads. "
        "grad_input=False skips dx (returned as None) and its GEMM.");
}

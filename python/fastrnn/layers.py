"""Recurrent layers and cells with torch.nn's constructor, call, parameter names and shapes.

Weights move freely between the two: ``layer.load_state_dict({k: v.numpy() for k, v in
torch_layer.state_dict().items()})`` and back with ``torch_layer.load_state_dict({k:
torch.from_numpy(v) for k, v in layer.state_dict().items()})``.

A layer runs one C++ call per layer, for both directions at once (each on a thread of its own,
writing its half of the output rows); the stacking of layers, dropout between layers and the
conversion of ``lengths`` to packed rows are NumPy.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core

__all__ = ["GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "RNNCell"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _positive_int(value: Any, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


def _layer_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _as_array(value: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """An array of exactly the layer's dtype; lists and scalars are converted, arrays must match."""
    if isinstance(value, np.ndarray):
        if value.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
        return value
    try:
        array = np.asarray(value)
    except Exception as exc:  # e.g. ragged nested lists
        raise TypeError(f"{name} must be an array of {dtype}, got {type(value).__name__}") from exc
    if array.dtype.kind not in "biuf":  # lists carry no dtype of their own: real numbers convert
        raise TypeError(f"{name} must be real numbers convertible to {dtype}, got {array.dtype}")
    return array.astype(dtype)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """np.stack, with a single array (one layer, one direction) as a free view: np.stack itself
    costs microseconds, a share of a short sequence's call."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _state_pair(value: Any, name: str, form: str) -> tuple[Any, Any]:
    """The LSTM's (h, c) pair; None means (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise TypeError(f"{name} must be a tuple {form} or None for the LSTM")


class _Module:
    """Parameters under torch.nn's names, their gradients, state_dict, train/eval and pickling.

    Subclasses define ``_param_shapes()`` and ``_unit_of(name)``: the packed unit (a layer and
    direction) a parameter belongs to, repacked when that parameter changes.
    """

    def _init_params(self, dtype: Any, seed: int | np.random.Generator | None) -> None:
        self.dtype = _layer_dtype(dtype)
        self.training = True
        # One generator for the initial weights and, in the layers, the dropout masks.
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._packed: dict[str, _core.PackedLayer] = {}
        bound = 1.0 / math.sqrt(self.hidden_size)
        self._params: dict[str, np.ndarray] = {}
        for name, shape in self._param_shapes().items():
            self._params[name] = self._checked_param(name, self._rng.uniform(-bound, bound, shape))
        self.grads: dict[str, np.ndarray] = {}
        self.zero_grad()

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _unit_of(self, name: str) -> str:
        raise NotImplementedError

    def _checked_param(self, name: str, value: Any) -> np.ndarray:
        expected = self._param_shapes()[name]
        try:
            # np.asarray first: NumPy 2's np.array(x, dtype) passes copy= to __array__, which
            # torch tensors warn about.
            given = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor that requires grad
            raise TypeError(f"{name}: cannot convert to an array of {self.dtype}: {exc}") from exc
        if given.dtype.kind not in "biuf":  # complex, strings, objects: no silent casts
            raise TypeError(
                f"{name} must be real numbers convertible to {self.dtype}, got {given.dtype}"
            )
        array = np.array(given, dtype=self.dtype)  # a private copy, whatever came in
        if array.shape != expected:
            raise ValueError(
                f"{name} must have shape {_shape(expected)}, got {_shape(array.shape)}"
            )
        array.setflags(write=False)  # packed copies exist: in-place edits would be ignored
        return array

    def _set_param(self, name: str, value: Any) -> None:
        self._params[name] = self._checked_param(name, value)
        self._packed.pop(self._unit_of(name), None)

    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if "_params" in self.__dict__ and name in self._params:
            self._set_param(name, value)
        else:
            super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # The packed weights and pending training states are derived, per-process data: a copy or
        # an unpickled module repacks on its first call and needs a new forward for backward.
        state = self.__dict__.copy()
        state["_packed"] = {}
        state["_saved"] = None
        if "_tape" in state:
            state["_tape"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for array in self._params.values():
            array.setflags(write=False)  # unpickled arrays come back writable

    def __copy__(self) -> Any:
        # Containers of its own: sharing the parameter dict but not the packed weights, one module
        # would compute with weights the other was assigned; sharing grads, both would add into
        # them. (deepcopy and pickle copy everything already, through __getstate__.)
        clone = type(self).__new__(type(self))
        clone.__setstate__(self.__getstate__())
        clone.__dict__["_params"] = dict(self._params)
        clone.__dict__["grads"] = {name: grad.copy() for name, grad in self.grads.items()}
        return clone

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        return list(self._params.items())

    def parameters(self) -> list[np.ndarray]:
        return list(self._params.values())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters under torch.nn's names, in torch.nn's order."""
        return {name: value.copy() for name, value in self._params.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load parameters (anything np.asarray takes: arrays, lists, torch CPU tensors)."""
        expected = self._param_shapes()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise KeyError(
                f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        checked = {name: self._checked_param(name, state_dict[name]) for name in expected}
        self._params.update(checked)  # only once every entry is valid
        self._packed.clear()

    def zero_grad(self) -> None:
        """Set every parameter gradient in ``grads`` to zeros, in place where it can (backward
        adds into them; an optimizer may hold the arrays)."""
        for name, shape in self._param_shapes().items():
            grad = self.grads.get(name)
            if (
                grad is not None
                and grad.shape == shape
                and grad.dtype == self.dtype
                and grad.flags.writeable
            ):
                grad.fill(0)
            else:
                self.grads[name] = np.zeros(shape, self.dtype)

    def train(self, mode: bool = True) -> Any:
        self.training = bool(mode)
        return self

    def eval(self) -> Any:
        return self.train(False)

    def _packed_unit(self, unit: str, cell: str, trainable: bool) -> _core.PackedLayer:
        """The packed weights of a unit ("l0", "l1_reverse", or "" for a cell), packed lazily:
        with the backward's copies of the weights once a call is ``trainable`` (keeps what
        backward needs), without them until then (half the memory, for inference)."""
        packed = self._packed.get(unit)
        if packed is None or not packed.current or (trainable and not packed.trainable):
            suffix = f"_{unit}" if unit else ""
            p = self._params
            packed = _core.pack(
                cell,
                p["weight_ih" + suffix],
                p["weight_hh" + suffix],
                p.get("bias_ih" + suffix),
                p.get("bias_hh" + suffix),
                p.get("weight_hr" + suffix),
                trainable,
            )
            self._packed[unit] = packed
        return packed


class _PackedRows:
    """Padded time-major sequences with lengths <-> the rows of a torch-style PackedSequence.

    The packed rows hold the sequences of length > 0, longest first (stable for ties), step by
    step: step t has the first ``batch_sizes[t]`` of them. Index arrays make every conversion one
    NumPy gather or scatter.
    """

    def __init__(self, lengths: Any, steps: int, batch: int) -> None:
        array = np.asarray(lengths)
        if array.size == 0:  # [] carries no dtype: an empty batch has no lengths to check
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise TypeError(f"lengths must be integers, got dtype {array.dtype}")
        if array.shape != (batch,):
            raise ValueError(
                f"lengths must have shape ({batch},): one length per sequence of the batch, "
                f"got {_shape(array.shape)}"
            )
        if batch and (array.min() < 0 or array.max() > steps):
            raise ValueError(
                f"lengths must be in [0, seq_len={steps}], got values from {array.min()} "
                f"to {array.max()}"
            )
        lengths = array.astype(np.int64)
        order = np.argsort(-lengths, kind="stable")
        self.order = order[: np.count_nonzero(lengths)]  # running sequences, longest first
        sorted_lengths = lengths[self.order]
        running = np.arange(sorted_lengths[0] if self.order.size else 0)[:, None] < sorted_lengths
        self.batch_sizes = running.sum(axis=1).astype(np.int64)
        step_of, rank_of = np.nonzero(running)  # row by row, step-major: the packed order
        self._step_of, self._batch_of = step_of, self.order[rank_of]

    @property
    def empty(self) -> bool:
        return self.order.size == 0

    def pack(self, padded: np.ndarray) -> np.ndarray:
        """(steps, batch, n) -> (rows, n)."""
        return padded[self._step_of, self._batch_of]

    def unpack(self, rows: np.ndarray, steps: int, batch: int) -> np.ndarray:
        """(rows, n) -> (steps, batch, n), zeros past each sequence's end."""
        padded = np.zeros((steps, batch, rows.shape[-1]), rows.dtype)
        padded[self._step_of, self._batch_of] = rows
        return padded

    def sort(self, states: np.ndarray | None) -> np.ndarray | None:
        """(layers, batch, n) -> the running sequences', longest first."""
        return None if states is None else states[:, self.order]

    def unsort(self, running: np.ndarray, others: np.ndarray) -> np.ndarray:
        """The running sequences' states put back among `others` (those of length 0)."""
        merged = others.copy()
        merged[:, self.order] = running
        return merged


@dataclass
class _Tape:
    """What a training forward keeps for its backward: per layer and direction the core's state,
    and the dropout mask applied to each layer's output (None where there was none)."""

    states: list[list[_core.TrainingState]]
    masks: list[np.ndarray | None]


class _RNNBase(_Module):
    """What LSTM, GRU and RNN share: parameters, input checks, stacking and the core calls."""

    _gates: int
    _name: str
    _cell: str

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        proj_size: int,
        dtype: Any,
        seed: int | np.random.Generator | None,
    ) -> None:
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.num_layers = _positive_int(num_layers, "num_layers")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if float(dropout) > 0 and self.num_layers == 1:
            warnings.warn(  # as torch.nn does
                "dropout applies between recurrent layers, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers=1",
                UserWarning,
                stacklevel=3,
            )
        try:
            proj_size = operator.index(proj_size)
        except TypeError:
            raise TypeError(f"proj_size must be an int, got {type(proj_size).__name__}") from None
        if proj_size < 0 or proj_size >= self.hidden_size and proj_size != 0:
            raise ValueError(f"proj_size must be in [0, hidden_size), got {proj_size}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        self._saved: tuple[Any, ...] | None = None
        self._unit_names = [
            f"l{layer}{'_reverse' if d else ''}"
            for layer in range(self.num_layers)
            for d in range(self.num_directions)
        ]
        self._init_params(dtype, seed)

    # -- parameters -------------------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _output_size(self) -> int:
        """The size of h per direction: proj_size with a projection, else hidden_size."""
        return self.proj_size or self.hidden_size

    def _units(self) -> list[str]:
        """Packed units in torch.nn's order: l0, l0_reverse, l1, ..."""
        return self._unit_names

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        rows, out = self._gates * self.hidden_size, self._output_size
        shapes: dict[str, tuple[int, ...]] = {}
        for k, unit in enumerate(self._units()):
            layer_input = self.input_size if k < self.num_directions else self.num_directions * out
            shapes[f"weight_ih_{unit}"] = (rows, layer_input)
            shapes[f"weight_hh_{unit}"] = (rows, out)
            if self.bias:
                shapes[f"bias_ih_{unit}"] = (rows,)
                shapes[f"bias_hh_{unit}"] = (rows,)
            if self.proj_size:
                shapes[f"weight_hr_{unit}"] = (self.proj_size, self.hidden_size)
        return shapes

    def _unit_of(self, name: str) -> str:
        return name[name.rindex("_l") + 1 :]

    # -- the stack of layers on rows ---------------------------------------------------------

    def _forward_rows(
        self,
        x: np.ndarray,
        batch_sizes: np.ndarray | None,
        h0: np.ndarray | None,
        c0: np.ndarray | None,
        keep: bool,
        dropout: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, _Tape | None]:
        """Every layer and direction on x (seq_len, batch, input) or, with batch_sizes, on packed
        rows x (rows, input) of sequences sorted longest first. h0 (layers * directions, batch,
        output size), c0 (..., hidden_size) or None. ``keep`` keeps what backward needs;
        ``dropout`` applies dropout between layers. Returns (out, h_n, c_n, tape)."""
        units, directions, cell = self._units(), self.num_directions, self._cell
        states: list[list[Any]] = []
        masks: list[np.ndarray | None] = []
        h_n: list[np.ndarray] = []
        c_n: list[np.ndarray] = []
        layer_input = x
        # Plain loops, not comprehensions: a short sequence's call is a few microseconds, and
        # each comprehension costs a fraction of one.
        for layer in range(self.num_layers):
            calls = []
            for d in range(directions):
                k = layer * directions + d
                h_start = None if h0 is None else h0[k]
                c_start = None if c0 is None else c0[k]
                packed = self._packed_unit(units[k], cell, keep)
                calls.append((packed, layer_input, h_start, c_start, keep, batch_sizes, d == 1))
            # The two directions run at once, each on a thread of its own, and write their
            # outputs side by side into one array.
            results = _core.forward_each(calls, directions > 1)
            layer_states = []
            for _, h, c, saved in results:
                h_n.append(h)
                c_n.append(c)
                layer_states.append(saved)
            layer_input = results[0][0]
            mask = None
            if dropout and self.dropout > 0 and layer < self.num_layers - 1:
                mask = self._dropout_mask(layer_input.shape)
                layer_input = layer_input * mask
            states.append(layer_states)
            masks.append(mask)
        tape = _Tape(states, masks) if keep else None
        return layer_input, _stack(h_n), _stack(c_n) if self._gates == 4 else None, tape

    def _dropout_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """Zeros with probability p, else 1 / (1 - p) (inverted dropout, as torch)."""
        keep = self._rng.random(shape) >= self.dropout
        scale = 0.0 if self.dropout == 1.0 else 1.0 / (1.0 - self.dropout)
        return (keep * scale).astype(self.dtype)

    def _backward_rows(
        self,
        tape: _Tape,
        grad_out: np.ndarray | None,
        grad_h_n: np.ndarray | None,
        grad_c_n: np.ndarray | None,
        grads: Mapping[str, np.ndarray],
        grad_input: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """Backward through ``_forward_rows``: gradients in its layouts (None: zeros); adds the
        parameter gradients into ``grads``. Returns (dx, dh0, dc0); dx is None, and its GEMM
        skipped, when not ``grad_input``."""
        units, size, directions = self._units(), self._output_size, self.num_directions
        dh0: list[Any] = [None] * len(units)
        dc0: list[Any] = [None] * len(units)
        grad = grad_out
        for layer in reversed(range(self.num_layers)):
            mask = tape.masks[layer]
            if mask is not None and grad is not None:
                grad = grad * mask
            calls = []
            for d in range(directions):
                k = layer * directions + d
                unit = units[k]
                g = grad
                if g is not None and directions > 1:
                    g = np.ascontiguousarray(g[..., d * size : (d + 1) * size])
                calls.append(
                    (
                        tape.states[layer][d],
                        g,
                        None if grad_h_n is None else grad_h_n[k],
                        None if grad_c_n is None else grad_c_n[k],
                        grads[f"weight_ih_{unit}"],
                        grads[f"weight_hh_{unit}"],
                        grads.get(f"bias_ih_{unit}"),
                        grads.get(f"bias_hh_{unit}"),
                        grads.get(f"weight_hr_{unit}"),
                        grad_input or layer > 0,
                    )
                )
            results = _core.backward_each(calls)
            grad = results[0][0]  # x feeds both directions: their dx add up
            for dx, _, _ in results[1:]:
                grad = None if grad is None else grad + dx
            for d, (_, dh, dc) in enumerate(results):
                dh0[layer * directions + d], dc0[layer * directions + d] = dh, dc
        return grad, _stack(dh0), _stack(dc0) if self._gates == 4 else None

    # -- user-facing shapes -------------------------------------------------------------------

    def _time_major_input(self, x: Any) -> tuple[np.ndarray, bool]:
        x = _as_array(x, "x", self.dtype)
        if x.ndim not in (2, 3):
            raise ValueError(
                "x must be 3-D (seq_len, batch, input_size), (batch, seq_len, input_size) with "
                f"batch_first, or 2-D (seq_len, input_size) unbatched; got shape {_shape(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"x.shape[-1] must equal input_size={self.input_size}, got {x.shape[-1]}"
            )
        batched = x.ndim == 3
        if x.shape[1 if batched and self.batch_first else 0] == 0:
            raise ValueError(f"x: sequence length must be > 0, got x.shape {_shape(x.shape)}")
        if not batched:
            x = x[:, None, :]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        return x, batched

    def _state_input(
        self, value: Any, name: str, batch: int, batched: bool, size: int
    ) -> np.ndarray | None:
        """A state (layers * directions, batch, size), from (..., size) when unbatched."""
        if value is None:
            return None
        array = _as_array(value, name, self.dtype)
        units = self.num_layers * self.num_directions
        expected = (units, batch, size) if batched else (units, size)
        if array.shape != expected:
            hint = " (unbatched x needs 2-D states)" if not batched and array.ndim == 3 else ""
            size_name = "proj_size" if size != self.hidden_size else "hidden_size"
            batch_name = ", batch" if batched else ""
            raise ValueError(
                f"{name} must have shape {_shape(expected)} (num_layers * num_directions"
                f"{batch_name}, {size_name}), got {_shape(array.shape)}{hint}"
            )
        return array.reshape(units, batch, size)

    def _output_shape(self, steps: int, batch: int, batched: bool) -> tuple[int, ...]:
        size = self.num_directions * self._output_size
        if not batched:
            return (steps, size)
        return (batch, steps, size) if self.batch_first else (steps, batch, size)

    def _user_output(self, out: np.ndarray, batched: bool) -> np.ndarray:
        if not batched:
            return out[:, 0, :]
        return np.ascontiguousarray(out.transpose(1, 0, 2)) if self.batch_first else out

    def _user_state(self, state: np.ndarray, batched: bool) -> np.ndarray:
        return state if batched else state[:, 0, :]

    # -- calls ---------------------------------------------------------------------------------

    def _run_forward(
        self, x: Any, h0: Any, c0: Any, lengths: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        xt, batched = self._time_major_input(x)
        steps, batch = xt.shape[:2]
        h0 = self._state_input(h0, "h0", batch, batched, self._output_size)
        lstm = self._gates == 4
        c0 = self._state_input(c0, "c0", batch, batched, self.hidden_size) if lstm else None
        keep = self.training
        rows = None
        if lengths is None:
            out, h_n, c_n, tape = self._forward_rows(xt, None, h0, c0, keep, self.training)
        else:
            if not batched:
                raise ValueError("lengths needs batched x (3-D); unbatched x is one sequence")
            rows = _PackedRows(lengths, steps, batch)
            units = self.num_layers * self.num_directions
            h_zero = np.zeros((units, batch, self._output_size), self.dtype) if h0 is None else h0
            c_zero = np.zeros((units, batch, self.hidden_size), self.dtype) if c0 is None else c0
            if rows.empty:  # every sequence has length 0: nothing runs
                out = np.zeros((steps, batch, self.num_directions * self._output_size), self.dtype)
                h_n, c_n, tape = h_zero.copy(), c_zero.copy() if lstm else None, None
            else:
                out_rows, h_run, c_run, tape = self._forward_rows(
                    rows.pack(xt),
                    rows.batch_sizes,
                    rows.sort(h0),
                    rows.sort(c0),
                    keep,
                    self.training,
                )
                out = rows.unpack(out_rows, steps, batch)
                h_n = rows.unsort(h_run, h_zero)
                c_n = rows.unsort(c_run, c_zero) if c_run is not None else None
        # Straight into __dict__: __setattr__ (which routes parameter names) costs ~0.4 us a call.
        self.__dict__["_saved"] = (tape, batched, steps, batch, rows) if keep else None
        c_user = None if c_n is None else self._user_state(c_n, batched)
        return self._user_output(out, batched), self._user_state(h_n, batched), c_user

    def _run_backward(
        self, grad_out: Any, grad_h_n: Any, grad_c_n: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self._saved is None:
            raise RuntimeError(
                "backward() needs a preceding forward in training mode (layer.train()); "
                "it runs once per forward"
            )
        tape, batched, steps, batch, rows = self._saved
        if grad_out is not None:
            grad_out = _as_array(grad_out, "grad_out", self.dtype)
            expected = self._output_shape(steps, batch, batched)
            if grad_out.shape != expected:
                raise ValueError(
                    f"grad_out must have the output's shape {_shape(expected)}, "
                    f"got {_shape(grad_out.shape)}"
                )
            if not batched:
                grad_out = grad_out[:, None, :]
            elif self.batch_first:
                grad_out = grad_out.transpose(1, 0, 2)
        lstm = self._gates == 4
        grad_h_n = self._state_input(grad_h_n, "grad_h_n", batch, batched, self._output_size)
        grad_c_n = self._state_input(grad_c_n, "grad_c_n", batch, batched, self.hidden_size)
        if rows is None:
            dx, dh0, dc0 = self._backward_rows(tape, grad_out, grad_h_n, grad_c_n, self.grads)
        else:
            # A sequence of length 0 passes its state's gradient straight back to its h0 / c0.
            units = self.num_layers * self.num_directions
            h_zero = np.zeros((units, batch, self._output_size), self.dtype)
            c_zero = np.zeros((units, batch, self.hidden_size), self.dtype)
            dh_other = h_zero if grad_h_n is None else grad_h_n
            dc_other = c_zero if grad_c_n is None else grad_c_n
            if tape is None:
                dx = np.zeros((steps, batch, self.input_size), self.dtype)
                dh0, dc0 = dh_other.copy(), dc_other.copy() if lstm else None
            else:
                dx_rows, dh_run, dc_run = self._backward_rows(
                    tape,
                    None if grad_out is None else rows.pack(grad_out),
                    rows.sort(grad_h_n),
                    rows.sort(grad_c_n),
                    self.grads,
                )
                dx = rows.unpack(dx_rows, steps, batch)
                dh0 = rows.unsort(dh_run, dh_other)
                dc0 = rows.unsort(dc_run, dc_other) if dc_run is not None else None
        self._saved = None
        if not batched:
            dx = dx[:, 0, :]
        elif self.batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        dc_user = None if dc0 is None else self._user_state(dc0, batched)
        return dx, self._user_state(dh0, batched), dc_user

    def __call__(self, x: Any, hx: Any = None, lengths: Any = None) -> Any:
        return self.forward(x, hx, lengths)

    def forward(self, x: Any, hx: Any = None, lengths: Any = None) -> Any:
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [str(self.input_size), str(self.hidden_size)]
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        if self.num_layers != 1:
            parts.append(f"num_layers={self.num_layers}")
        if not self.bias:
            parts.append("bias=False")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


_LAYER_SHAPES = """
    x is (seq_len, batch, input_size), (batch, seq_len, input_size) with batch_first, or
    (seq_len, input_size) unbatched; out is (..., D * H_out) with D = 2 if bidirectional else 1
    and H_out = proj_size or hidden_size. States are (num_layers * D, batch, H_out) (c: hidden_size)
    in torch.nn's order (layer by layer, forward direction first); unbatched, without the batch
    axis. ``hx=None`` means zeros.

    ``lengths`` (batch ints in [0, seq_len]) gives each sequence's length, as torch's packed
    sequences: outputs past a sequence's end are 0, its final state is taken at its last step, and
    the reverse direction starts at its own end. Sequences of length 0 keep their initial state.

    In training mode (the default) the forward keeps what ``backward`` needs, and dropout (if any)
    applies to the outputs of every layer but the last, with masks drawn from the generator
    seeded by ``seed``. In eval mode nothing is kept and dropout is off.
"""


class LSTM(_RNNBase):
    """Long short-term memory layers, as torch.nn.LSTM (gate order i, f, g, o).

    ``out, (h_n, c_n) = lstm(x, (h0, c0), lengths=None)``. With ``proj_size > 0``, each layer's
    h = W_hr (o * tanh(c)) has proj_size values (torch's projections).
    """

    __doc__ = (__doc__ or "") + _LAYER_SHAPES
    _gates = 4
    _name = "LSTM"
    _cell = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        dtype: Any = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            dtype,
            seed,
        )

    def forward(
        self, x: Any, hx: tuple[Any, Any] | None = None, lengths: Any = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        h0, c0 = _state_pair(hx, "hx", "(h0, c0)")
        out, h_n, c_n = self._run_forward(x, h0, c0, lengths)
        assert c_n is not None
        return out, (h_n, c_n)

    def backward(
        self, grad_out: Any, grad_state: tuple[Any, Any] | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Backpropagation through time for the last training forward.

        ``grad_out`` is dL/d(out) (None: zeros), ``grad_state`` is (dL/dh_n, dL/dc_n) (either may
        be None). Returns ``(dx, (dh0, dc0))`` and adds the parameter gradients into ``grads``.
        """
        grad_h, grad_c = _state_pair(grad_state, "grad_state", "(grad_h_n, grad_c_n)")
        dx, dh0, dc0 = self._run_backward(grad_out, grad_h, grad_c)
        assert dc0 is not None
        return dx, (dh0, dc0)


class GRU(_RNNBase):
    """Gated recurrent unit layers, as torch.nn.GRU (gate order r, z, n).

    ``out, h_n = gru(x, h0, lengths=None)`` with r = σ(W_ir x + b_ir + W_hr h + b_hr),
    z = σ(W_iz x + b_iz + W_hz h + b_hz), n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),
    h' = (1 - z) * n + z * h.
    """

    __doc__ = (__doc__ or "") + _LAYER_SHAPES
    _gates = 3
    _name = "GRU"
    _cell = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            dtype,
            seed,
        )

    def forward(self, x: Any, hx: Any = None, lengths: Any = None) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(hx, tuple):
            raise TypeError(f"hx must be an array h0 (not a tuple) or None for the {self._name}")
        out, h_n, _ = self._run_forward(x, hx, None, lengths)
        return out, h_n

    def backward(self, grad_out: Any, grad_state: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Backpropagation through time: returns ``(dx, dh0)``; adds into ``grads``."""
        dx, dh0, _ = self._run_backward(grad_out, grad_state, None)
        return dx, dh0


class RNN(GRU):
    """Elman RNN layers with tanh or relu, as torch.nn.RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh).

    ``out, h_n = rnn(x, h0, lengths=None)``.
    """

    __doc__ = (__doc__ or "") + _LAYER_SHAPES
    _gates = 1
    _name = "RNN"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        dtype: Any = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        _RNNBase.__init__(  # not GRU's: the dropout warning's stacklevel counts the frames
            self,
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            dtype,
            seed,
        )

    @property
    def _cell(self) -> str:  # type: ignore[override]
        return f"rnn_{self.nonlinearity}"

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.nonlinearity == "tanh" else f"{base}, nonlinearity='relu'"


# ------------------------------------------------------------------------------------------ cells


class _CellBase(_Module):
    """One time step, as torch.nn's cells: ``h' = cell(x, h)`` / ``h', c' = cell(x, (h, c))``.

    x is (batch, input_size) or (input_size,) unbatched, states (batch, hidden_size) or
    (hidden_size,); None means zeros. Every call is one C++ call on weights packed once per weight
    update. In training mode each call keeps what its backward needs; ``backward`` runs for the
    most recent call not yet backpropagated (last in, first out, as backpropagation through a
    sequence of calls goes), so call ``eval()`` for streaming inference; ``clear_tape()`` drops
    calls that will not be backpropagated.
    """

    _gates: int
    _cell: str

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        dtype: Any = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.bias = bool(bias)
        self._tape: list[tuple[Any, bool, int]] = []
        self._init_params(dtype, seed)

    def clear_tape(self) -> None:
        """Drop what the training-mode calls not yet backpropagated keep for backward."""
        self._tape.clear()

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        rows = self._gates * self.hidden_size
        shapes = {
            "weight_ih": (rows, self.input_size),
            "weight_hh": (rows, self.hidden_size),
        }
        if self.bias:
            shapes.update({"bias_ih": (rows,), "bias_hh": (rows,)})
        return shapes

    def _unit_of(self, name: str) -> str:
        return ""

    def _state(self, value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        # A streaming step is a few microseconds: a state that is already right (NumPy's dtype
        # singletons make `is` exact) returns at once.
        if type(value) is np.ndarray and value.dtype is self.dtype and value.shape == shape:
            return value
        if value is None:
            return None
        array = _as_array(value, name, self.dtype)
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {_shape(shape)}, got {_shape(array.shape)}")
        return array

    def _fast_step(self, x: Any, h: Any, c: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
        # The streaming path: batched arrays of the cell's dtype, weights packed for the call, go
        # straight to the core, which checks their shapes (0.8 us of a 3.1 us call at H=4). None
        # for anything else, and when the core rejects the arguments: then _step converts them, or
        # says what is wrong in the layer's words.
        dtype = self.dtype
        if not (
            type(x) is np.ndarray
            and x.dtype is dtype
            and x.ndim == 2
            and type(h) is np.ndarray
            and h.dtype is dtype
            and (c is None or (type(c) is np.ndarray and c.dtype is dtype))
        ):
            return None
        training = self.training
        # _packed_unit's test, inline: calling it added 0.2-0.4 us to a 2.4 us call at H=4.
        packed = self._packed.get("")
        if packed is None or not packed.current or (training and not packed.trainable):
            return None
        try:
            h_next, c_next, saved = _core.step(packed, x, h, c, training)
        except ValueError:
            return None
        if saved is not None:
            self._tape.append((saved, True, x.shape[0]))
        return h_next, c_next

    def _step(self, x: Any, h: Any, c: Any) -> tuple[np.ndarray, np.ndarray | None]:
        # A streaming step costs a few microseconds, and every Python call in it about 0.1 us:
        # arguments that are already right (NumPy's dtype singletons make `is` exact) pass
        # checks inline (at H=4: 3.05 -> 2.77 us a step, against calling _state).
        dtype = self.dtype
        if type(x) is not np.ndarray or x.dtype is not dtype:
            x = _as_array(x, "input", dtype)
        shape = x.shape
        batched = len(shape) == 2
        if not (batched or len(shape) == 1) or shape[-1] != self.input_size:
            raise ValueError(
                f"input must have shape (batch, {self.input_size}) or ({self.input_size},) "
                f"unbatched, got {_shape(shape)}"
            )
        state_shape = (shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if h is not None and not (
            type(h) is np.ndarray and h.dtype is dtype and h.shape == state_shape
        ):
            h = self._state(h, "h", state_shape)
        if self._gates != 4:
            c = None
        elif c is not None and not (
            type(c) is np.ndarray and c.dtype is dtype and c.shape == state_shape
        ):
            c = self._state(c, "c", state_shape)
        if not batched:
            x, h, c = x[None], None if h is None else h[None], None if c is None else c[None]
        training = self.training
        packed = self._packed_unit("", self._cell, training)
        h_next, c_next, saved = _core.step(packed, x, h, c, training)
        if saved is not None:
            self._tape.append((saved, batched, x.shape[0]))
        if not batched:
            return h_next[0], None if c_next is None else c_next[0]
        return h_next, c_next

    def _step_backward(
        self, grad_h: Any, grad_c: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if not self._tape:
            raise RuntimeError(
                "backward() needs a preceding call in training mode (cell.train()) whose "
                "backward has not run yet"
            )
        saved, batched, batch = self._tape[-1]
        shape = (batch, self.hidden_size) if batched else (self.hidden_size,)
        grads = []
        for value, name in ((grad_h, "grad_h"), (grad_c, "grad_c")):
            array = self._state(value, name, shape)
            grads.append(array if array is None or batched else array[None])
        g = self.grads
        dx, dh, dc = _core.backward(
            saved,
            None,
            grads[0],
            grads[1] if self._gates == 4 else None,
            g["weight_ih"],
            g["weight_hh"],
            g.get("bias_ih"),
            g.get("bias_hh"),
        )
        self._tape.pop()
        dx = dx[0]
        if not batched:
            return dx[0], dh[0], None if dc is None else dc[0]
        return dx, dh, dc

    def extra_repr(self) -> str:
        parts = [str(self.input_size), str(self.hidden_size)]
        if not self.bias:
            parts.append("bias=False")
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class LSTMCell(_CellBase):
    """One LSTM step, as torch.nn.LSTMCell: ``h', c' = cell(x, (h, c))``."""

    __doc__ = (__doc__ or "") + (_CellBase.__doc__ or "")
    _gates = 4
    _cell = "lstm"

    def __call__(self, x: Any, hx: tuple[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.forward(x, hx)

    def forward(self, x: Any, hx: tuple[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        if type(hx) is tuple and len(hx) == 2:
            fast = self._fast_step(x, hx[0], hx[1])
            if fast is not None:
                return fast  # type: ignore[return-value]
        h, c = _state_pair(hx, "hx", "(h, c)")
        h_next, c_next = self._step(x, h, c)
        assert c_next is not None
        return h_next, c_next

    def backward(
        self, grad_h: Any, grad_c: Any = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """dL/dh' and dL/dc' (None: zeros) of the latest call -> ``(dx, (dh, dc))``; adds the
        parameter gradients into ``grads``."""
        dx, dh, dc = self._step_backward(grad_h, grad_c)
        assert dc is not None
        return dx, (dh, dc)


class GRUCell(_CellBase):
    """One GRU step, as torch.nn.GRUCell: ``h' = cell(x, h)``."""

    __doc__ = (__doc__ or "") + (_CellBase.__doc__ or "")
    _gates = 3
    _cell = "gru"

    def __call__(self, x: Any, hx: Any = None) -> np.ndarray:
        return self.forward(x, hx)

    def forward(self, x: Any, hx: Any = None) -> np.ndarray:
        fast = self._fast_step(x, hx, None)
        if fast is not None:
            return fast[0]
        if isinstance(hx, tuple):
            raise TypeError(
                f"hx must be an array h (not a tuple) or None for {type(self).__name__}"
            )
        return self._step(x, hx, None)[0]

    def backward(self, grad_h: Any) -> tuple[np.ndarray, np.ndarray]:
        """dL/dh' of the latest call -> ``(dx, dh)``; adds into ``grads``."""
        dx, dh, _ = self._step_backward(grad_h, None)
        return dx, dh


class RNNCell(GRUCell):
    """One Elman RNN step, as torch.nn.RNNCell: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``."""

    _gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        dtype: Any = np.float32,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, dtype, seed)

    @property
    def _cell(self) -> str:  # type: ignore[override]
        return f"rnn_{self.nonlinearity}"

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.nonlinearity == "tanh" else f"{base}, nonlinearity='relu'"

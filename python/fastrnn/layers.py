"""Recurrent layers with torch.nn's constructor, call signature, parameter names and shapes.

Weights move freely between the two: ``layer.load_state_dict({k: v.numpy() for k, v in
torch_layer.state_dict().items()})`` and back with ``torch_layer.load_state_dict({k:
torch.from_numpy(v) for k, v in layer.state_dict().items()})``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _core

__all__ = ["LSTM", "RNN"]

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


def _state_pair(value: Any, name: str, form: str) -> tuple[Any, Any]:
    """The LSTM's (h, c) pair; None means (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise TypeError(f"{name} must be a tuple {form} or None for the LSTM")


class _RNNBase:
    """What LSTM and RNN share: parameters, state_dict, modes, input checks and the core calls."""

    _gates: int
    _name: str

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
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        proj_size = operator.index(proj_size)
        if proj_size < 0 or proj_size >= self.hidden_size and proj_size != 0:
            raise ValueError(f"proj_size must be in [0, hidden_size), got {proj_size}")
        unsupported = [
            what
            for what, used in (
                ("num_layers > 1", self.num_layers != 1),
                ("bidirectional=True", bool(bidirectional)),
                ("proj_size > 0", proj_size != 0),
                ("dropout > 0", float(dropout) != 0.0),
            )
            if used
        ]
        if unsupported:
            raise NotImplementedError(
                f"{self._name}: {', '.join(unsupported)} is not implemented yet "
                "(single-layer, unidirectional layers only for now)"
            )
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = False
        self.proj_size = 0
        self.dtype = _layer_dtype(dtype)
        self.training = True
        self._packed: _core.PackedLayer | None = None
        self._saved: tuple[Any, ...] | None = None

        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self._params: dict[str, np.ndarray] = {}
        for name, shape in self._param_shapes().items():
            self._set_param(name, rng.uniform(-bound, bound, size=shape))
        self.grads: dict[str, np.ndarray] = {}
        self.zero_grad()

    # -- parameters -------------------------------------------------------------------------

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        rows = self._gates * self.hidden_size
        shapes = {
            "weight_ih_l0": (rows, self.input_size),
            "weight_hh_l0": (rows, self.hidden_size),
        }
        if self.bias:
            shapes.update({"bias_ih_l0": (rows,), "bias_hh_l0": (rows,)})
        return shapes

    def _checked_param(self, name: str, value: Any) -> np.ndarray:
        expected = self._param_shapes()[name]
        try:
            # A private copy, whatever came in. np.asarray first: NumPy 2's np.array(x, dtype)
            # passes copy= to __array__, which torch tensors warn about.
            array = np.array(np.asarray(value), dtype=self.dtype)
        except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor that requires grad
            raise TypeError(f"{name}: cannot convert to an array of {self.dtype}: {exc}") from exc
        if array.shape != expected:
            raise ValueError(
                f"{name} must have shape {_shape(expected)}, got {_shape(array.shape)}"
            )
        array.setflags(write=False)  # packed copies exist: in-place edits would be ignored
        return array

    def _set_param(self, name: str, value: Any) -> None:
        self._params[name] = self._checked_param(name, value)
        self._packed = None

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
        # The packed weights and a pending training state are derived, per-process data: a copy
        # or an unpickled layer repacks on its first call and needs a new forward for backward.
        state = self.__dict__.copy()
        state["_packed"] = None
        state["_saved"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for array in self._params.values():
            array.setflags(write=False)  # unpickled arrays come back writable

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
        self._packed = None

    def zero_grad(self) -> None:
        self.grads = {
            name: np.zeros(shape, self.dtype) for name, shape in self._param_shapes().items()
        }

    # -- modes ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> _RNNBase:
        self.training = bool(mode)
        return self

    def eval(self) -> _RNNBase:
        return self.train(False)

    # -- calls ------------------------------------------------------------------------------

    @property
    def _cell(self) -> str:
        raise NotImplementedError

    def _packed_layer(self) -> _core.PackedLayer:
        packed = self._packed
        if packed is None or packed.isa != _core.active_isa():
            p = self._params
            packed = _core.pack(
                self._cell,
                p["weight_ih_l0"],
                p["weight_hh_l0"],
                p.get("bias_ih_l0"),
                p.get("bias_hh_l0"),
            )
            self._packed = packed
        return packed

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
        if not batched:
            x = x[:, None, :]
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        if x.shape[0] == 0:
            raise ValueError(f"x: sequence length must be > 0, got x.shape {_shape(x.shape)}")
        return x, batched

    def _state_shape(self, batch: int, batched: bool) -> tuple[int, ...]:
        return (1, batch, self.hidden_size) if batched else (1, self.hidden_size)

    def _state_input(self, value: Any, name: str, batch: int, batched: bool) -> np.ndarray | None:
        if value is None:
            return None
        array = _as_array(value, name, self.dtype)
        expected = self._state_shape(batch, batched)
        if array.shape != expected:
            hint = " (unbatched x needs 2-D states)" if not batched and array.ndim == 3 else ""
            raise ValueError(
                f"{name} must have shape {_shape(expected)}, got {_shape(array.shape)}{hint}"
            )
        return array.reshape(batch, self.hidden_size)

    def _output_shape(self, steps: int, batch: int, batched: bool) -> tuple[int, ...]:
        if not batched:
            return (steps, self.hidden_size)
        return (
            (batch, steps, self.hidden_size)
            if self.batch_first
            else (steps, batch, self.hidden_size)
        )

    def _user_output(self, out: np.ndarray, batched: bool) -> np.ndarray:
        if not batched:
            return out[:, 0, :]
        return np.ascontiguousarray(out.transpose(1, 0, 2)) if self.batch_first else out

    def _user_state(self, state: np.ndarray, batched: bool) -> np.ndarray:
        return state.reshape(self._state_shape(state.shape[0], batched))

    def _run_forward(
        self, x: Any, h0: Any, c0: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        xt, batched = self._time_major_input(x)
        batch = xt.shape[1]
        h0 = self._state_input(h0, "h0", batch, batched)
        c0 = self._state_input(c0, "c0", batch, batched) if self._gates == 4 else None
        out, h_n, c_n, saved = _core.forward(self._packed_layer(), xt, h0, c0, self.training)
        self._saved = (saved, batched, xt.shape) if self.training else None
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
        saved, batched, (steps, batch, _) = self._saved
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
        grad_h_n = self._state_input(grad_h_n, "grad_h_n", batch, batched)
        grad_c_n = self._state_input(grad_c_n, "grad_c_n", batch, batched)
        g = self.grads
        dx, dh0, dc0 = _core.backward(
            saved,
            grad_out,
            grad_h_n,
            grad_c_n,
            g["weight_ih_l0"],
            g["weight_hh_l0"],
            g.get("bias_ih_l0"),
            g.get("bias_hh_l0"),
        )
        self._saved = None
        if not batched:
            dx = dx[:, 0, :]
        elif self.batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        dc_user = None if dc0 is None else self._user_state(dc0, batched)
        return dx, self._user_state(dh0, batched), dc_user

    def __call__(self, x: Any, hx: Any = None) -> Any:
        return self.forward(x, hx)

    def forward(self, x: Any, hx: Any = None) -> Any:
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [str(self.input_size), str(self.hidden_size)]
        if not self.bias:
            parts.append("bias=False")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class LSTM(_RNNBase):
    """Long short-term memory layer, as torch.nn.LSTM (gate order i, f, g, o).

    ``out, (h_n, c_n) = lstm(x, (h0, c0))`` with x of shape (seq_len, batch, input_size)
    ((batch, seq_len, input_size) with batch_first; (seq_len, input_size) unbatched) and states of
    shape (1, batch, hidden_size) ((1, hidden_size) unbatched). ``hx=None`` means zeros.
    In training mode (the default) the forward keeps what :meth:`backward` needs.
    """

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
        self, x: Any, hx: tuple[Any, Any] | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        h0, c0 = _state_pair(hx, "hx", "(h0, c0)")
        out, h_n, c_n = self._run_forward(x, h0, c0)
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


class RNN(_RNNBase):
    """Elman RNN layer with tanh or relu, as torch.nn.RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh).

    ``out, h_n = rnn(x, h0)`` with the shapes of :class:`LSTM`.
    """

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

    @property
    def _cell(self) -> str:
        return f"rnn_{self.nonlinearity}"

    def forward(self, x: Any, hx: Any = None) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(hx, tuple):
            raise TypeError("hx must be an array h0 (not a tuple) or None for the RNN")
        out, h_n, _ = self._run_forward(x, hx, None)
        return out, h_n

    def backward(self, grad_out: Any, grad_state: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Backpropagation through time: returns ``(dx, dh0)``; adds into ``grads``."""
        dx, dh0, _ = self._run_backward(grad_out, grad_state, None)
        return dx, dh0

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.nonlinearity == "tanh" else f"{base}, nonlinearity='relu'"

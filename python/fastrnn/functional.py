"""Stateless functions on explicit weights (time-major, one layer, one direction).

They pack the weights on every call; the layers in :mod:`fastrnn.layers` pack once per weight
update and are the faster choice for repeated calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core

__all__ = ["gru", "lstm", "rnn"]


def _checked(name: str, value: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """An array of dtype (weight_ih's): arrays must have it, lists of real numbers convert."""
    array = np.asarray(value)
    if dtype is not None and not hasattr(value, "dtype") and array.dtype.kind in "biuf":
        array = array.astype(dtype)  # a list carries no dtype of its own
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {array.dtype}")
    if dtype is not None and array.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} (the dtype of weight_ih), got {array.dtype}"
        )
    return array


def _run(cell: str, x: Any, h0: Any, c0: Any, weights: tuple[Any, ...]) -> tuple[Any, ...]:
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    w_ih = _checked("weight_ih", weights[0])
    arrays = [w_ih] + [
        None if w is None else _checked(n, w, w_ih.dtype) for n, w in zip(names[1:], weights[1:])
    ]
    x = _checked("x", x, w_ih.dtype)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (seq_len, batch, input_size), got {x.shape}")
    h0 = None if h0 is None else _checked("h0", h0, w_ih.dtype)
    c0 = None if c0 is None else _checked("c0", c0, w_ih.dtype)
    packed = _core.pack(cell, *arrays, training=False)  # a forward alone: no backward's copies
    return _core.forward(packed, x, h0, c0, False)[:3]


def lstm(
    x: Any,
    h0: Any,
    c0: Any,
    weight_ih: Any,
    weight_hh: Any,
    bias_ih: Any = None,
    bias_hh: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LSTM forward: x (T, B, I), h0 and c0 (B, H) or None -> (out (T, B, H), h_n, c_n)."""
    out, h_n, c_n = _run("lstm", x, h0, c0, (weight_ih, weight_hh, bias_ih, bias_hh))
    return out, h_n, c_n


def gru(
    x: Any,
    h0: Any,
    weight_ih: Any,
    weight_hh: Any,
    bias_ih: Any = None,
    bias_hh: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GRU forward (torch.nn.GRU's gates r, z, n): x (T, B, I), h0 (B, H) or None ->
    (out (T, B, H), h_n)."""
    out, h_n, _ = _run("gru", x, h0, None, (weight_ih, weight_hh, bias_ih, bias_hh))
    return out, h_n


def rnn(
    x: Any,
    h0: Any,
    weight_ih: Any,
    weight_hh: Any,
    bias_ih: Any = None,
    bias_hh: Any = None,
    nonlinearity: str = "tanh",
) -> tuple[np.ndarray, np.ndarray]:
    """Elman RNN forward: x (T, B, I), h0 (B, H) or None -> (out (T, B, H), h_n)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    out, h_n, _ = _run(f"rnn_{nonlinearity}", x, h0, None, (weight_ih, weight_hh, bias_ih, bias_hh))
    return out, h_n

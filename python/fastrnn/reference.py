"""Pure-NumPy reference implementation of a vanilla RNN and an LSTM.

This module is the readable specification of the math that the C++ kernels
implement. It is slow on purpose: it favours clarity over speed and is used by
the tests as the ground truth. It covers one layer and one direction, with
time-major inputs, and follows ``torch.nn.RNN`` / ``torch.nn.LSTM`` exactly
(equations, gate order and weight shapes), so weights can be copied between
the two.

Shapes (T = sequence length, B = batch, I = input size, H = hidden size)::

    x          (T, B, I)            out        (T, B, H)
    h0, c0     (B, H)               h_n, c_n   (B, H)

``h0`` / ``c0`` may be None, meaning zeros (like torch's ``hx=None``).

RNN, with ``act`` = tanh or relu::

    weight_ih (H, I)   weight_hh (H, H)   bias_ih (H,)   bias_hh (H,)

    h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)

LSTM, gates stacked in the order (i, f, g, o) along the first axis::

    weight_ih (4H, I)  weight_hh (4H, H)  bias_ih (4H,)  bias_hh (4H,)

    i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)    input gate
    f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)    forget gate
    g_t =    tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)    cell candidate
    o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)    output gate
    c_t = f_t * c_{t-1} + i_t * g_t
    h_t = o_t * tanh(c_t)

``out`` stacks h_1 .. h_T; ``h_n = h_T`` and ``c_n = c_T``.

Backward is backpropagation through time (BPTT): walk the sequence in reverse,
carrying the gradient that flows into h_{t-1} (and c_{t-1}) from step t.
Gradients are returned for the loss L given dL/d(out), dL/d(h_n), dL/d(c_n).

Everything is computed in the dtype of ``x`` (float32 or float64); the other
arrays are cast to it, never upcast. Biases are optional: pass ``None`` to
leave a bias out (torch's ``bias=False``); its gradient is then ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "LSTMCache",
    "RNNCache",
    "lstm_backward",
    "lstm_forward",
    "rnn_backward",
    "rnn_forward",
    "sigmoid",
]

Array = NDArray[np.floating]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def sigmoid(x: Array) -> Array:
    """Logistic function 1 / (1 + exp(-x)), without overflow for large |x|.

    ``exp(-x)`` overflows for very negative x, so only ever exponentiate a
    non-positive number: with z = exp(-|x|) in (0, 1],
    sigmoid(x) = 1 / (1 + z) for x >= 0 and z / (1 + z) for x < 0.
    Unlike 0.5 * (1 + tanh(x / 2)), this keeps full relative precision for
    tiny outputs (large negative x).
    """
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1, z) / (1 + z)


def _float_dtype(x: np.ndarray) -> np.dtype:
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    return x.dtype


def _cast(a: ArrayLike | None, dtype: np.dtype) -> Array | None:
    """Optional array (a bias) in the compute dtype; None stays None."""
    return None if a is None else np.asarray(a, dtype=dtype)


def _state_or_zeros(s: ArrayLike | None, shape: tuple[int, ...], dtype: np.dtype) -> Array:
    """Initial state: None means zeros, like torch's ``hx=None``."""
    return np.zeros(shape, dtype) if s is None else np.asarray(s, dtype=dtype)


def _input_projection(
    x: Array, weight_ih: Array, bias_ih: Array | None, bias_hh: Array | None
) -> Array:
    """W_ih x_t + b_ih + b_hh for all t at once, shape (T, B, G).

    This part does not depend on the recurrence, so it is one big matrix
    product instead of T small ones (the same trick cuDNN and torch use).
    Both biases are folded in here; only W_hh h_{t-1} is left for the loop.
    """
    proj = x @ weight_ih.T
    if bias_ih is not None:
        proj += bias_ih
    if bias_hh is not None:
        proj += bias_hh
    return proj


def _param_grads(
    dz: Array,
    x: Array,
    h_prev: Array,
    weight_ih: Array,
    has_bias_ih: bool,
    has_bias_hh: bool,
) -> dict[str, Array | None]:
    """Gradients that follow from dL/dz, z_t being the pre-activations.

    dz (T, B, G), x (T, B, I), h_prev (T, B, H) = h_0 .. h_{T-1}.
    Since z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, each weight gradient
    is a sum over time and batch of outer products, i.e. one matrix product
    once (T, B) is flattened into a single axis.
    """
    T, B, G = dz.shape
    dz2 = dz.reshape(T * B, G)
    db = dz2.sum(axis=0)
    return {
        "x": dz @ weight_ih,
        "weight_ih": dz2.T @ x.reshape(T * B, x.shape[2]),
        "weight_hh": dz2.T @ h_prev.reshape(T * B, h_prev.shape[2]),
        # b_ih and b_hh enter z identically, so their gradients are equal.
        "bias_ih": db if has_bias_ih else None,
        "bias_hh": db.copy() if has_bias_hh else None,
    }


# --------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------


@dataclass
class LSTMCache:
    """What ``lstm_backward`` needs from the forward pass."""

    x: Array  # (T, B, I)
    weight_ih: Array  # (4H, I)
    weight_hh: Array  # (4H, H)
    has_bias_ih: bool
    has_bias_hh: bool
    h: Array  # (T+1, B, H): h_0 .. h_T
    c: Array  # (T+1, B, H): c_0 .. c_T
    gates: Array  # (T, B, 4H): activated i, f, g, o per step
    tanh_c: Array  # (T, B, H): tanh(c_t), reused for dL/do and dL/dc


def lstm_forward(
    x: ArrayLike,
    h0: ArrayLike | None,
    c0: ArrayLike | None,
    weight_ih: ArrayLike,
    weight_hh: ArrayLike,
    bias_ih: ArrayLike | None = None,
    bias_hh: ArrayLike | None = None,
) -> tuple[Array, Array, Array, LSTMCache]:
    """LSTM over a whole sequence: returns ``(out, h_n, c_n, cache)``.

    x (T, B, I); h0, c0 (B, H) or None for zeros; out (T, B, H);
    h_n, c_n (B, H). See the module docstring for the equations.
    """
    x = np.array(x)  # a copy: the cache must not see later changes to x
    dtype = _float_dtype(x)
    weight_ih = np.asarray(weight_ih, dtype=dtype)
    weight_hh = np.asarray(weight_hh, dtype=dtype)
    bias_ih, bias_hh = _cast(bias_ih, dtype), _cast(bias_hh, dtype)
    T, B, _ = x.shape
    H = weight_hh.shape[1]

    h = np.empty((T + 1, B, H), dtype)
    c = np.empty((T + 1, B, H), dtype)
    h[0] = _state_or_zeros(h0, (B, H), dtype)
    c[0] = _state_or_zeros(c0, (B, H), dtype)
    gates = np.empty((T, B, 4 * H), dtype)
    tanh_c = np.empty((T, B, H), dtype)

    proj = _input_projection(x, weight_ih, bias_ih, bias_hh)
    for t in range(T):
        z = proj[t] + h[t] @ weight_hh.T  # (B, 4H) pre-activations
        # Slice views into gates[t], so filling them fills the cache.
        i, f, g, o = (gates[t, :, k * H : (k + 1) * H] for k in range(4))
        i[...] = sigmoid(z[:, 0 * H : 1 * H])
        f[...] = sigmoid(z[:, 1 * H : 2 * H])
        g[...] = np.tanh(z[:, 2 * H : 3 * H])
        o[...] = sigmoid(z[:, 3 * H : 4 * H])
        c[t + 1] = f * c[t] + i * g
        tanh_c[t] = np.tanh(c[t + 1])
        h[t + 1] = o * tanh_c[t]

    cache = LSTMCache(
        x=x,
        weight_ih=weight_ih,
        weight_hh=weight_hh,
        has_bias_ih=bias_ih is not None,
        has_bias_hh=bias_hh is not None,
        h=h,
        c=c,
        gates=gates,
        tanh_c=tanh_c,
    )
    return h[1:].copy(), h[T].copy(), c[T].copy(), cache


def lstm_backward(
    cache: LSTMCache,
    grad_out: ArrayLike | None = None,
    grad_h_n: ArrayLike | None = None,
    grad_c_n: ArrayLike | None = None,
) -> dict[str, Array | None]:
    """BPTT through ``lstm_forward``.

    Takes dL/d(out) (T, B, H), dL/d(h_n) and dL/d(c_n) (B, H); None means
    zeros. Returns a dict with the gradients of "x", "h0", "c0",
    "weight_ih", "weight_hh", "bias_ih", "bias_hh" (bias ones are None when
    that bias was None in the forward).
    """
    h, c, gates, tanh_c = cache.h, cache.c, cache.gates, cache.tanh_c
    T, B, G = gates.shape
    H = G // 4
    dtype = h.dtype
    grad_out = _state_or_zeros(grad_out, (T, B, H), dtype)
    # dh, dc: gradient flowing into h_t, c_t from later steps (and h_n, c_n).
    dh = _state_or_zeros(grad_h_n, (B, H), dtype).copy()
    dc = _state_or_zeros(grad_c_n, (B, H), dtype).copy()
    dz = np.empty((T, B, G), dtype)  # dL/d(pre-activation) per step

    for t in reversed(range(T)):
        # h_t feeds both out[t] and the next step.
        dh += grad_out[t]
        i, f, g, o = (gates[t, :, k * H : (k + 1) * H] for k in range(4))
        # h_t = o * tanh(c_t): c_t gets a share through tanh, plus what
        # already flows into it from c_{t+1} = f_{t+1} * c_t + ...
        do = dh * tanh_c[t]
        dc += dh * o * (1 - tanh_c[t] ** 2)
        # c_t = f * c_{t-1} + i * g
        di = dc * g
        dg = dc * i
        df = dc * c[t]
        # Through the activations: sigmoid' = s (1 - s), tanh' = 1 - tanh^2.
        dz[t, :, 0 * H : 1 * H] = di * i * (1 - i)
        dz[t, :, 1 * H : 2 * H] = df * f * (1 - f)
        dz[t, :, 2 * H : 3 * H] = dg * (1 - g**2)
        dz[t, :, 3 * H : 4 * H] = do * o * (1 - o)
        # Gradients flowing into step t-1.
        dc = dc * f
        dh = dz[t] @ cache.weight_hh

    grads = _param_grads(dz, cache.x, h[:-1], cache.weight_ih, cache.has_bias_ih, cache.has_bias_hh)
    grads["h0"] = dh
    grads["c0"] = dc
    return grads


# --------------------------------------------------------------------------
# Vanilla RNN
# --------------------------------------------------------------------------


@dataclass
class RNNCache:
    """What ``rnn_backward`` needs from the forward pass."""

    x: Array  # (T, B, I)
    weight_ih: Array  # (H, I)
    weight_hh: Array  # (H, H)
    has_bias_ih: bool
    has_bias_hh: bool
    nonlinearity: str
    h: Array  # (T+1, B, H): h_0 .. h_T; the derivative of act needs only h_t


def rnn_forward(
    x: ArrayLike,
    h0: ArrayLike | None,
    weight_ih: ArrayLike,
    weight_hh: ArrayLike,
    bias_ih: ArrayLike | None = None,
    bias_hh: ArrayLike | None = None,
    nonlinearity: str = "tanh",
) -> tuple[Array, Array, RNNCache]:
    """Elman RNN over a whole sequence: returns ``(out, h_n, cache)``.

    x (T, B, I); h0 (B, H) or None for zeros; out (T, B, H); h_n (B, H).
    ``nonlinearity`` is "tanh" or "relu".
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f'nonlinearity must be "tanh" or "relu", got {nonlinearity!r}')
    x = np.array(x)  # a copy: the cache must not see later changes to x
    dtype = _float_dtype(x)
    weight_ih = np.asarray(weight_ih, dtype=dtype)
    weight_hh = np.asarray(weight_hh, dtype=dtype)
    bias_ih, bias_hh = _cast(bias_ih, dtype), _cast(bias_hh, dtype)
    T, B, _ = x.shape
    H = weight_hh.shape[1]

    h = np.empty((T + 1, B, H), dtype)
    h[0] = _state_or_zeros(h0, (B, H), dtype)
    proj = _input_projection(x, weight_ih, bias_ih, bias_hh)
    for t in range(T):
        z = proj[t] + h[t] @ weight_hh.T
        h[t + 1] = np.tanh(z) if nonlinearity == "tanh" else np.maximum(z, 0)

    cache = RNNCache(
        x=x,
        weight_ih=weight_ih,
        weight_hh=weight_hh,
        has_bias_ih=bias_ih is not None,
        has_bias_hh=bias_hh is not None,
        nonlinearity=nonlinearity,
        h=h,
    )
    return h[1:].copy(), h[T].copy(), cache


def rnn_backward(
    cache: RNNCache,
    grad_out: ArrayLike | None = None,
    grad_h_n: ArrayLike | None = None,
) -> dict[str, Array | None]:
    """BPTT through ``rnn_forward``.

    Takes dL/d(out) (T, B, H) and dL/d(h_n) (B, H); None means zeros.
    Returns a dict with the gradients of "x", "h0", "weight_ih",
    "weight_hh", "bias_ih", "bias_hh" (bias ones are None when that bias was
    None in the forward).
    """
    h = cache.h
    T, B, H = h.shape[0] - 1, h.shape[1], h.shape[2]
    dtype = h.dtype
    grad_out = _state_or_zeros(grad_out, (T, B, H), dtype)
    dh = _state_or_zeros(grad_h_n, (B, H), dtype).copy()  # flows into h_t
    dz = np.empty((T, B, H), dtype)

    for t in reversed(range(T)):
        dh += grad_out[t]
        # The activation's derivative written in terms of its output h_t:
        # tanh' = 1 - h^2; relu' = 1 where h > 0, else 0 (torch's choice at 0).
        if cache.nonlinearity == "tanh":
            dz[t] = dh * (1 - h[t + 1] ** 2)
        else:
            dz[t] = dh * (h[t + 1] > 0)
        dh = dz[t] @ cache.weight_hh

    grads = _param_grads(dz, cache.x, h[:-1], cache.weight_ih, cache.has_bias_ih, cache.has_bias_hh)
    grads["h0"] = dh
    return grads

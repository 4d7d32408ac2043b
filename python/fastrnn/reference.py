"""Pure-NumPy reference implementation of a vanilla RNN, an LSTM and a GRU.

This module is the readable specification of the math that the C++ kernels
implement. It is slow on purpose: it favours clarity over speed and is used by
the tests as the ground truth. It covers one layer and one direction, with
time-major inputs, and follows ``torch.nn.RNN`` / ``torch.nn.LSTM`` /
``torch.nn.GRU`` exactly (equations, gate order and weight shapes), so
weights can be copied between them.

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

LSTM with projections (torch's ``proj_size`` = P, with P < H in torch): an
extra ``weight_hr`` (P, H) maps the hidden state down to P features::

    h_t = W_hr (o_t * tanh(c_t))

so h has P features everywhere: ``weight_hh`` is (4H, P), ``h0`` and ``h_n``
are (B, P) and ``out`` is (T, B, P); the cell state keeps H (``c0``, ``c_n``
are (B, H)).

GRU, gates stacked in the order (r, z, n) along the first axis::

    weight_ih (3H, I)  weight_hh (3H, H)  bias_ih (3H,)  bias_hh (3H,)

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)           reset gate
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)           update gate
    n_t =    tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))   candidate
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}

(here W_hr is the reset gate's slice of weight_hh, not the LSTM projection).
Because b_hn sits inside ``r_t * (...)``, b_ih and b_hh are not
interchangeable in a GRU: their gradients differ in the n gate.

``out`` stacks h_1 .. h_T (``out[t]`` is the state after step t);
``h_n = h_T`` and ``c_n = c_T``.

Variable lengths (``lengths``, B ints in [0, T]): sequence b only has the
steps t < lengths[b], as with torch's packed sequences
(``nn.utils.rnn.pack_padded_sequence``). On its padded steps
t >= lengths[b] the state is carried through unchanged and ``out`` is
exactly 0, so ``h_n`` / ``c_n`` are each sequence's state after its own
last step (``h0`` / ``c0`` when its length is 0). Padded inputs never
affect anything (nan is fine) and get zero gradient; the gradient given for
padded outputs is ignored.

Reverse direction (``reverse=True``), the backward half of a bidirectional
layer: each sequence is processed from its own last step lengths[b] - 1 (or
T - 1) down to 0, starting from ``h0``; ``out[t]`` is still the state after
processing step t, so it lines up with x[t], and ``h_n`` is the state after
step 0. Without lengths this is the forward direction run on ``x[::-1]``,
with its ``out`` flipped back.

Backward is backpropagation through time (BPTT): walk the steps in the
opposite order of the forward, carrying the gradient that flows into the
previous state (h_{t-1} and c_{t-1}) from step t. Gradients are returned for
the loss L given dL/d(out), dL/d(h_n), dL/d(c_n).

Everything is computed in the dtype of ``x`` (float32 or float64); the other
arrays are cast to it, never upcast. Biases are optional: pass ``None`` to
leave a bias out (torch's ``bias=False``); its gradient is then ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "GRUCache",
    "LSTMCache",
    "RNNCache",
    "gru_backward",
    "gru_forward",
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


def _valid_steps(lengths: ArrayLike | None, T: int, B: int) -> NDArray[np.bool_]:
    """(T, B, 1) mask, True where step t exists for sequence b (t < lengths[b]).

    The trailing axis of 1 broadcasts against (B, features) per step, so
    ``np.where(valid[t], new, old)`` picks, per sequence, the new state or
    the carried one. Without lengths every step is valid.
    """
    if lengths is None:
        return np.ones((T, B, 1), bool)
    n = np.asarray(lengths)
    if n.shape != (B,):
        raise ValueError(f"lengths must hold one int per sequence ({B}), got shape {n.shape}")
    # An empty list comes out as float64: nothing to check in it.
    if n.size and not np.issubdtype(n.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {n.dtype}")
    if n.size and (n.min() < 0 or n.max() > T):
        raise ValueError(f"lengths must be in [0, T={T}], got {n.tolist()}")
    return np.arange(T)[:, None, None] < n[None, :, None]


def _steps(T: int, reverse: bool) -> range:
    """The time steps in the order the recurrence visits them.

    With lengths, sequence b in reverse really starts at lengths[b] - 1: the
    steps above it are padded, and padded steps leave the state unchanged.
    """
    return range(T - 1, -1, -1) if reverse else range(T)


def _input_projection(
    x: Array, weight_ih: Array, bias_ih: Array | None, bias_hh: Array | None
) -> Array:
    """W_ih x_t + b_ih (+ b_hh) for all t at once, shape (T, B, G).

    This part does not depend on the recurrence, so it is one big matrix
    product instead of T small ones (the same trick cuDNN and torch use).
    The biases passed are folded in here; only W_hh h_{t-1} is left for the
    loop. (The GRU passes no b_hh: its b_hn has to stay inside r * (...).)
    """
    proj = x @ weight_ih.T
    if bias_ih is not None:
        proj += bias_ih
    if bias_hh is not None:
        proj += bias_hh
    return proj


def _split_grad(
    valid_t: NDArray[np.bool_], d_after: Array, grad_out_t: Array | None = None
) -> tuple[Array, Array]:
    """Route dL/d(state after step t) backward through the mask of step t.

    Returns ``(d_new, d_skip)``. On a valid step the state after it is the
    step's new state, which is also out[t], so dL/d(out[t]) adds to it and
    all of it flows into the step (d_new). On a padded step the state was
    carried through unchanged, so the gradient skips the step and goes
    straight to the state before it (d_skip), and out[t] = 0 depends on
    nothing: grad_out there is ignored. np.where rather than a product with
    the mask, so that not even inf or nan there can leak in.
    """
    d_new = d_after if grad_out_t is None else d_after + grad_out_t
    return np.where(valid_t, d_new, 0), np.where(valid_t, 0, d_after)


def _param_grads(
    dz_ih: Array,
    dz_hh: Array,
    x: Array,
    h_prev: Array,
    weight_ih: Array,
    has_bias_ih: bool,
    has_bias_hh: bool,
) -> dict[str, Array | None]:
    """Gradients that follow from the two pre-activation gradients.

    dz_ih (T, B, G) is dL/d(W_ih x_t + b_ih) and dz_hh (T, B, G) is
    dL/d(W_hh h_{t-1} + b_hh); x (T, B, I); h_prev (T, B, H): the state
    each step t started from. For the RNN and the LSTM both terms are simply
    added, so dz_ih = dz_hh = dL/dz; the GRU's n gate scales the hidden term
    by r first, so there they differ.
    Each weight gradient is a sum over time and batch of outer products,
    i.e. one matrix product once (T, B) is flattened into a single axis.
    """
    T, B, G = dz_ih.shape
    dz_ih2 = dz_ih.reshape(T * B, G)
    dz_hh2 = dz_hh.reshape(T * B, G)
    return {
        "x": dz_ih @ weight_ih,
        "weight_ih": dz_ih2.T @ x.reshape(T * B, x.shape[2]),
        "weight_hh": dz_hh2.T @ h_prev.reshape(T * B, h_prev.shape[2]),
        "bias_ih": dz_ih2.sum(axis=0) if has_bias_ih else None,
        "bias_hh": dz_hh2.sum(axis=0) if has_bias_hh else None,
    }


# --------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------


@dataclass
class LSTMCache:
    """What ``lstm_backward`` needs from the forward pass.

    Arrays over time are indexed by the step t (the position in x), in
    either direction; P = H without a projection.
    """

    x: Array  # (T, B, I), 0 on padded steps
    weight_ih: Array  # (4H, I)
    weight_hh: Array  # (4H, P)
    weight_hr: Array | None  # (P, H) or None: no projection
    has_bias_ih: bool
    has_bias_hh: bool
    valid: NDArray[np.bool_]  # (T, B, 1): t < lengths[b]
    reverse: bool
    h_prev: Array  # (T, B, P): the h that step t started from
    c_prev: Array  # (T, B, H): the c that step t started from
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
    *,
    weight_hr: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    reverse: bool = False,
) -> tuple[Array, Array, Array, LSTMCache]:
    """LSTM over a whole sequence: returns ``(out, h_n, c_n, cache)``.

    x (T, B, I); h0 (B, P), c0 (B, H), or None for zeros; out (T, B, P);
    h_n (B, P), c_n (B, H), where P = H without ``weight_hr`` (P, H).
    ``lengths`` (B ints in [0, T]) and ``reverse``: see the module docstring,
    as for the equations.
    """
    x = np.array(x)  # a copy: the cache must not see later changes to x
    dtype = _float_dtype(x)
    weight_ih = np.asarray(weight_ih, dtype=dtype)
    weight_hh = np.asarray(weight_hh, dtype=dtype)
    weight_hr = _cast(weight_hr, dtype)
    bias_ih, bias_hh = _cast(bias_ih, dtype), _cast(bias_hh, dtype)
    T, B, _ = x.shape
    H = weight_hh.shape[0] // 4
    P = H if weight_hr is None else weight_hr.shape[0]
    valid = _valid_steps(lengths, T, B)
    x[~valid[:, :, 0]] = 0  # padded inputs are never read: they may hold anything

    out = np.empty((T, B, P), dtype)
    h_prev = np.empty((T, B, P), dtype)
    c_prev = np.empty((T, B, H), dtype)
    gates = np.empty((T, B, 4 * H), dtype)
    tanh_c = np.empty((T, B, H), dtype)
    h = _state_or_zeros(h0, (B, P), dtype)
    c = _state_or_zeros(c0, (B, H), dtype)

    proj = _input_projection(x, weight_ih, bias_ih, bias_hh)
    for t in _steps(T, reverse):
        h_prev[t], c_prev[t] = h, c
        z = proj[t] + h @ weight_hh.T  # (B, 4H) pre-activations
        # Slice views into gates[t], so filling them fills the cache.
        i, f, g, o = (gates[t, :, k * H : (k + 1) * H] for k in range(4))
        i[...] = sigmoid(z[:, 0 * H : 1 * H])
        f[...] = sigmoid(z[:, 1 * H : 2 * H])
        g[...] = np.tanh(z[:, 2 * H : 3 * H])
        o[...] = sigmoid(z[:, 3 * H : 4 * H])
        c_t = f * c + i * g
        tanh_c[t] = np.tanh(c_t)
        h_t = o * tanh_c[t]
        if weight_hr is not None:
            h_t = h_t @ weight_hr.T  # the projection: H -> P features
        # Sequences that have no step t keep their state, and output 0.
        out[t] = np.where(valid[t], h_t, 0)
        h = np.where(valid[t], h_t, h)
        c = np.where(valid[t], c_t, c)

    cache = LSTMCache(
        x=x,
        weight_ih=weight_ih,
        weight_hh=weight_hh,
        weight_hr=weight_hr,
        has_bias_ih=bias_ih is not None,
        has_bias_hh=bias_hh is not None,
        valid=valid,
        reverse=reverse,
        h_prev=h_prev,
        c_prev=c_prev,
        gates=gates,
        tanh_c=tanh_c,
    )
    return out, h.copy(), c.copy(), cache


def lstm_backward(
    cache: LSTMCache,
    grad_out: ArrayLike | None = None,
    grad_h_n: ArrayLike | None = None,
    grad_c_n: ArrayLike | None = None,
) -> dict[str, Array | None]:
    """BPTT through ``lstm_forward``.

    Takes dL/d(out) (T, B, P), dL/d(h_n) (B, P) and dL/d(c_n) (B, H); None
    means zeros. Returns a dict with the gradients of "x", "h0", "c0",
    "weight_ih", "weight_hh", "weight_hr", "bias_ih", "bias_hh" (the bias
    ones and "weight_hr" are None when that array was None in the forward).
    """
    gates, tanh_c, weight_hr = cache.gates, cache.tanh_c, cache.weight_hr
    T, B, G = gates.shape
    H, P = G // 4, cache.h_prev.shape[2]
    dtype = cache.x.dtype
    grad_out = _state_or_zeros(grad_out, (T, B, P), dtype)
    # dh, dc: gradient flowing into the state after the step at hand, from
    # the steps that followed it (and from h_n, c_n).
    dh = _state_or_zeros(grad_h_n, (B, P), dtype)
    dc = _state_or_zeros(grad_c_n, (B, H), dtype)
    dz = np.empty((T, B, G), dtype)  # dL/d(pre-activation) per step
    dh_proj = np.empty((T, B, P), dtype)  # dL/d(projected h_t), for dL/dW_hr

    for t in reversed(_steps(T, cache.reverse)):
        # h_t feeds both out[t] and the next step (unless step t is padded).
        dh_t, dh_skip = _split_grad(cache.valid[t], dh, grad_out[t])
        dc_t, dc_skip = _split_grad(cache.valid[t], dc)
        if weight_hr is not None:
            dh_proj[t] = dh_t
            dh_t = dh_t @ weight_hr  # back through h_t = W_hr (o * tanh(c_t))
        i, f, g, o = (gates[t, :, k * H : (k + 1) * H] for k in range(4))
        # h_t = o * tanh(c_t): c_t gets a share through tanh, plus what
        # already flows into it from c_{t+1} = f_{t+1} * c_t + ...
        do = dh_t * tanh_c[t]
        dc_t = dc_t + dh_t * o * (1 - tanh_c[t] ** 2)
        # c_t = f * c_{t-1} + i * g
        di = dc_t * g
        dg = dc_t * i
        df = dc_t * cache.c_prev[t]
        # Through the activations: sigmoid' = s (1 - s), tanh' = 1 - tanh^2.
        dz[t, :, 0 * H : 1 * H] = di * i * (1 - i)
        dz[t, :, 1 * H : 2 * H] = df * f * (1 - f)
        dz[t, :, 2 * H : 3 * H] = dg * (1 - g**2)
        dz[t, :, 3 * H : 4 * H] = do * o * (1 - o)
        # Gradients flowing into the state before step t.
        dc = dc_t * f + dc_skip
        dh = dz[t] @ cache.weight_hh + dh_skip

    grads = _param_grads(
        dz, dz, cache.x, cache.h_prev, cache.weight_ih, cache.has_bias_ih, cache.has_bias_hh
    )
    grads["weight_hr"] = None
    if weight_hr is not None:
        # Sum over steps and batch of dL/dh_t (o_t * tanh(c_t))^T; zero on
        # padded steps, where dh_proj is 0.
        o_tanh_c = gates[:, :, 3 * H :] * tanh_c
        grads["weight_hr"] = dh_proj.reshape(T * B, P).T @ o_tanh_c.reshape(T * B, H)
    grads["h0"] = dh
    grads["c0"] = dc
    return grads


# --------------------------------------------------------------------------
# Vanilla RNN
# --------------------------------------------------------------------------


@dataclass
class RNNCache:
    """What ``rnn_backward`` needs from the forward pass.

    Arrays over time are indexed by the step t (the position in x), in
    either direction.
    """

    x: Array  # (T, B, I), 0 on padded steps
    weight_ih: Array  # (H, I)
    weight_hh: Array  # (H, H)
    has_bias_ih: bool
    has_bias_hh: bool
    nonlinearity: str
    valid: NDArray[np.bool_]  # (T, B, 1): t < lengths[b]
    reverse: bool
    h_prev: Array  # (T, B, H): the h that step t started from
    out: Array  # (T, B, H): h_t, 0 on padded steps; act' needs only h_t


def rnn_forward(
    x: ArrayLike,
    h0: ArrayLike | None,
    weight_ih: ArrayLike,
    weight_hh: ArrayLike,
    bias_ih: ArrayLike | None = None,
    bias_hh: ArrayLike | None = None,
    nonlinearity: str = "tanh",
    *,
    lengths: ArrayLike | None = None,
    reverse: bool = False,
) -> tuple[Array, Array, RNNCache]:
    """Elman RNN over a whole sequence: returns ``(out, h_n, cache)``.

    x (T, B, I); h0 (B, H) or None for zeros; out (T, B, H); h_n (B, H).
    ``nonlinearity`` is "tanh" or "relu". ``lengths`` (B ints in [0, T])
    and ``reverse``: see the module docstring.
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
    valid = _valid_steps(lengths, T, B)
    x[~valid[:, :, 0]] = 0  # padded inputs are never read: they may hold anything

    out = np.empty((T, B, H), dtype)
    h_prev = np.empty((T, B, H), dtype)
    h = _state_or_zeros(h0, (B, H), dtype)
    proj = _input_projection(x, weight_ih, bias_ih, bias_hh)
    for t in _steps(T, reverse):
        h_prev[t] = h
        z = proj[t] + h @ weight_hh.T
        h_t = np.tanh(z) if nonlinearity == "tanh" else np.maximum(z, 0)
        # Sequences that have no step t keep their state, and output 0.
        out[t] = np.where(valid[t], h_t, 0)
        h = np.where(valid[t], h_t, h)

    cache = RNNCache(
        x=x,
        weight_ih=weight_ih,
        weight_hh=weight_hh,
        has_bias_ih=bias_ih is not None,
        has_bias_hh=bias_hh is not None,
        nonlinearity=nonlinearity,
        valid=valid,
        reverse=reverse,
        h_prev=h_prev,
        out=out.copy(),
    )
    return out, h.copy(), cache


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
    T, B, H = cache.out.shape
    dtype = cache.x.dtype
    grad_out = _state_or_zeros(grad_out, (T, B, H), dtype)
    # Gradient flowing into the state after the step at hand.
    dh = _state_or_zeros(grad_h_n, (B, H), dtype)
    dz = np.empty((T, B, H), dtype)

    for t in reversed(_steps(T, cache.reverse)):
        # h_t feeds both out[t] and the next step (unless step t is padded).
        dh_t, dh_skip = _split_grad(cache.valid[t], dh, grad_out[t])
        # The activation's derivative written in terms of its output h_t:
        # tanh' = 1 - h^2; relu' = 1 where h > 0, else 0 (torch's choice at 0).
        if cache.nonlinearity == "tanh":
            dz[t] = dh_t * (1 - cache.out[t] ** 2)
        else:
            dz[t] = dh_t * (cache.out[t] > 0)
        dh = dz[t] @ cache.weight_hh + dh_skip

    grads = _param_grads(
        dz, dz, cache.x, cache.h_prev, cache.weight_ih, cache.has_bias_ih, cache.has_bias_hh
    )
    grads["h0"] = dh
    return grads


# --------------------------------------------------------------------------
# GRU
# --------------------------------------------------------------------------


@dataclass
class GRUCache:
    """What ``gru_backward`` needs from the forward pass.

    Arrays over time are indexed by the step t (the position in x), in
    either direction.
    """

    x: Array  # (T, B, I), 0 on padded steps
    weight_ih: Array  # (3H, I)
    weight_hh: Array  # (3H, H)
    has_bias_ih: bool
    has_bias_hh: bool
    valid: NDArray[np.bool_]  # (T, B, 1): t < lengths[b]
    reverse: bool
    h_prev: Array  # (T, B, H): the h that step t started from
    gates: Array  # (T, B, 3H): activated r, z, n per step
    hn: Array  # (T, B, H): W_hn h_{t-1} + b_hn, what r scales (for dL/dr)


def gru_forward(
    x: ArrayLike,
    h0: ArrayLike | None,
    weight_ih: ArrayLike,
    weight_hh: ArrayLike,
    bias_ih: ArrayLike | None = None,
    bias_hh: ArrayLike | None = None,
    *,
    lengths: ArrayLike | None = None,
    reverse: bool = False,
) -> tuple[Array, Array, GRUCache]:
    """GRU over a whole sequence: returns ``(out, h_n, cache)``.

    x (T, B, I); h0 (B, H) or None for zeros; out (T, B, H); h_n (B, H).
    ``lengths`` (B ints in [0, T]) and ``reverse``: see the module
    docstring, as for the equations.
    """
    x = np.array(x)  # a copy: the cache must not see later changes to x
    dtype = _float_dtype(x)
    weight_ih = np.asarray(weight_ih, dtype=dtype)
    weight_hh = np.asarray(weight_hh, dtype=dtype)
    bias_ih, bias_hh = _cast(bias_ih, dtype), _cast(bias_hh, dtype)
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    valid = _valid_steps(lengths, T, B)
    x[~valid[:, :, 0]] = 0  # padded inputs are never read: they may hold anything

    out = np.empty((T, B, H), dtype)
    h_prev = np.empty((T, B, H), dtype)
    gates = np.empty((T, B, 3 * H), dtype)
    hn = np.empty((T, B, H), dtype)
    h = _state_or_zeros(h0, (B, H), dtype)

    # Only b_ih is folded into the input side: b_hn must stay inside r * (...).
    proj = _input_projection(x, weight_ih, bias_ih, None)
    for t in _steps(T, reverse):
        h_prev[t] = h
        zh = h @ weight_hh.T  # (B, 3H) hidden side: W_hr h, W_hz h, W_hn h
        if bias_hh is not None:
            zh = zh + bias_hh
        zx = proj[t]  # (B, 3H) input side: W_ir x + b_ir, ...
        # Slice views into gates[t], so filling them fills the cache.
        r, z, n = (gates[t, :, k * H : (k + 1) * H] for k in range(3))
        r[...] = sigmoid(zx[:, 0 * H : 1 * H] + zh[:, 0 * H : 1 * H])
        z[...] = sigmoid(zx[:, 1 * H : 2 * H] + zh[:, 1 * H : 2 * H])
        hn[t] = zh[:, 2 * H : 3 * H]
        n[...] = np.tanh(zx[:, 2 * H : 3 * H] + r * hn[t])
        h_t = (1 - z) * n + z * h
        # Sequences that have no step t keep their state, and output 0.
        out[t] = np.where(valid[t], h_t, 0)
        h = np.where(valid[t], h_t, h)

    cache = GRUCache(
        x=x,
        weight_ih=weight_ih,
        weight_hh=weight_hh,
        has_bias_ih=bias_ih is not None,
        has_bias_hh=bias_hh is not None,
        valid=valid,
        reverse=reverse,
        h_prev=h_prev,
        gates=gates,
        hn=hn,
    )
    return out, h.copy(), cache


def gru_backward(
    cache: GRUCache,
    grad_out: ArrayLike | None = None,
    grad_h_n: ArrayLike | None = None,
) -> dict[str, Array | None]:
    """BPTT through ``gru_forward``.

    Takes dL/d(out) (T, B, H) and dL/d(h_n) (B, H); None means zeros.
    Returns a dict with the gradients of "x", "h0", "weight_ih",
    "weight_hh", "bias_ih", "bias_hh" (bias ones are None when that bias was
    None in the forward).
    """
    gates, h_prev = cache.gates, cache.h_prev
    T, B, H = h_prev.shape
    dtype = cache.x.dtype
    grad_out = _state_or_zeros(grad_out, (T, B, H), dtype)
    # Gradient flowing into the state after the step at hand.
    dh = _state_or_zeros(grad_h_n, (B, H), dtype)
    # dL/d(input side W_ih x_t + b_ih) and dL/d(hidden side W_hh h_{t-1} + b_hh).
    # They agree for r and z, which just add the two; the n gate sees the
    # hidden side only through r * (...), so there dzh = r * dzx.
    dzx = np.empty((T, B, 3 * H), dtype)
    dzh = np.empty((T, B, 3 * H), dtype)

    for t in reversed(_steps(T, cache.reverse)):
        # h_t feeds both out[t] and the next step (unless step t is padded).
        dh_t, dh_skip = _split_grad(cache.valid[t], dh, grad_out[t])
        r, z, n = (gates[t, :, k * H : (k + 1) * H] for k in range(3))
        # h_t = (1 - z) * n + z * h_{t-1}
        dn = dh_t * (1 - z)
        dz = dh_t * (h_prev[t] - n)
        # n = tanh(zx_n + r * hn): tanh' = 1 - n^2, then r gets hn's share.
        dzn = dn * (1 - n**2)
        dr = dzn * cache.hn[t]
        # Through the sigmoids: sigmoid' = s (1 - s).
        dzx[t, :, 0 * H : 1 * H] = dzh[t, :, 0 * H : 1 * H] = dr * r * (1 - r)
        dzx[t, :, 1 * H : 2 * H] = dzh[t, :, 1 * H : 2 * H] = dz * z * (1 - z)
        dzx[t, :, 2 * H : 3 * H] = dzn
        dzh[t, :, 2 * H : 3 * H] = dzn * r
        # h_{t-1} enters through the hidden side and directly via z * h_{t-1}.
        dh = dzh[t] @ cache.weight_hh + dh_t * z + dh_skip

    grads = _param_grads(
        dzx, dzh, cache.x, h_prev, cache.weight_ih, cache.has_bias_ih, cache.has_bias_hh
    )
    grads["h0"] = dh
    return grads

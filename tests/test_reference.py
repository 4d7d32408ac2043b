"""Tests of the pure-NumPy reference (fastrnn.reference) itself.

The reference is the ground truth for the C++ kernels, so it is checked
against finite differences, against itself across dtypes, batches, lengths
and directions, and (when torch is installed) against torch.nn.LSTM /
torch.nn.GRU / torch.nn.RNN, packed sequences and bidirectional layers included.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from conftest import DTYPE_IDS, DTYPES, assert_close
from fastrnn import reference

B, N_IN, H, P = 2, 3, 4, 2  # batch, input size, hidden size, LSTM projection size

# (kind, nonlinearity) of every cell the reference implements; "lstm_proj"
# is the LSTM with a projection weight_hr (torch's proj_size = P).
CELLS = [("lstm", None), ("lstm_proj", None), ("gru", None), ("rnn", "tanh"), ("rnn", "relu")]
CELL_IDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]

Params = dict[str, np.ndarray]


def _is_lstm(kind: str) -> bool:
    return kind in ("lstm", "lstm_proj")


def _state_names(kind: str) -> list[str]:
    return ["h0", "c0"] if _is_lstm(kind) else ["h0"]


def _grad_names(kind: str) -> set[str]:
    """Every key the backward returns, whether or not the cell uses it."""
    names = {"x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", *_state_names(kind)}
    if _is_lstm(kind):
        names.add("weight_hr")
    return names


def _make_params(
    rng: np.random.Generator,
    kind: str,
    *,
    T: int = 4,
    batch: int = B,
    bias: bool = True,
    scale: float = 0.5,
) -> Params:
    """Random float64 inputs, states and weights (biases only when bias)."""
    G = {"lstm": 4 * H, "lstm_proj": 4 * H, "gru": 3 * H, "rnn": H}[kind]
    H_out = P if kind == "lstm_proj" else H  # features of h
    p = {"x": rng.standard_normal((T, batch, N_IN))}
    p["h0"] = rng.standard_normal((batch, H_out))
    if _is_lstm(kind):
        p["c0"] = rng.standard_normal((batch, H))
    p["weight_ih"] = scale * rng.standard_normal((G, N_IN))
    p["weight_hh"] = scale * rng.standard_normal((G, H_out))
    if kind == "lstm_proj":
        p["weight_hr"] = scale * rng.standard_normal((P, H))
    if bias:
        p["bias_ih"] = scale * rng.standard_normal(G)
        p["bias_hh"] = scale * rng.standard_normal(G)
    return p


def _forward(kind: str, nonlinearity: str | None, p: Params, **kw):
    """Run the reference forward; returns (outputs tuple, cache).

    ``kw`` (lengths, reverse) goes to the reference as is.
    """
    if _is_lstm(kind):
        out, h_n, c_n, cache = reference.lstm_forward(
            p["x"], p["h0"], p["c0"], p["weight_ih"], p["weight_hh"],
            p.get("bias_ih"), p.get("bias_hh"), weight_hr=p.get("weight_hr"), **kw,
        )  # fmt: skip
        return (out, h_n, c_n), cache
    if kind == "gru":
        out, h_n, cache = reference.gru_forward(
            p["x"], p["h0"], p["weight_ih"], p["weight_hh"],
            p.get("bias_ih"), p.get("bias_hh"), **kw,
        )  # fmt: skip
        return (out, h_n), cache
    out, h_n, cache = reference.rnn_forward(
        p["x"], p["h0"], p["weight_ih"], p["weight_hh"],
        p.get("bias_ih"), p.get("bias_hh"), nonlinearity=nonlinearity, **kw,
    )  # fmt: skip
    return (out, h_n), cache


def _backward(kind: str, cache, grads_out):
    if _is_lstm(kind):
        return reference.lstm_backward(cache, *grads_out)
    if kind == "gru":
        return reference.gru_backward(cache, *grads_out)
    return reference.rnn_backward(cache, *grads_out)


def _random_like(rng: np.random.Generator, arrays) -> list[np.ndarray]:
    return [rng.standard_normal(a.shape) for a in arrays]


def _one_sequence(p: Params, b: int, n: int, reverse: bool = False) -> Params:
    """Sequence b alone (batch of 1), truncated to its first n steps, and
    with those steps in reverse order when ``reverse``."""
    x = p["x"][:n, b : b + 1]
    q = {**p, "x": x[::-1] if reverse else x}
    for s in ("h0", "c0"):
        if s in p:
            q[s] = p[s][b : b + 1]
    return q


def _naive_rnn_preactivations(p: Params, nonlinearity: str) -> np.ndarray:
    """All pre-activations z_t (T, B, H) of an RNN, computed independently."""
    h = p["h0"]
    b = p.get("bias_ih", 0) + p.get("bias_hh", 0)
    zs = []
    for x_t in p["x"]:
        z = x_t @ p["weight_ih"].T + h @ p["weight_hh"].T + b
        h = np.tanh(z) if nonlinearity == "tanh" else np.maximum(z, 0)
        zs.append(z)
    return np.array(zs)


def _params_for(
    kind: str,
    nonlinearity: str | None,
    seed: int,
    *,
    lengths: list[int] | None = None,
    reverse: bool = False,
    **kw,
) -> Params:
    """Random parameters; for relu, ones whose pre-activations keep |z| > 1e-2.

    Finite differences are only valid where relu is differentiable, so for
    relu we walk through seeds until every pre-activation is well away from
    the kink (a perturbation of 1e-6 then cannot cross it), while still
    having both signs so that both branches are exercised. With lengths or
    reverse, the pre-activations checked are those of the steps each
    sequence really runs, in the order it runs them.
    """
    for s in range(seed, seed + 1000):
        p = _make_params(np.random.default_rng(s), kind, **kw)
        if nonlinearity != "relu":
            return p
        T, batch, _ = p["x"].shape
        ns = [T] * batch if lengths is None else lengths
        z = np.concatenate(
            [
                _naive_rnn_preactivations(_one_sequence(p, b, n, reverse), "relu").ravel()
                for b, n in enumerate(ns)
            ]
        )
        if np.abs(z).min() > 1e-2 and (z > 0).any() and (z < 0).any():
            return p
    raise AssertionError("no relu-safe parameters found")


def _numerical_grad(
    loss: Callable[[Params], float], p: Params, name: str, eps: float = 1e-6
) -> np.ndarray:
    """Central finite differences of loss w.r.t. p[name], element by element."""
    p = {k: v.copy() for k, v in p.items()}
    a = p[name]
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        orig = a[idx]
        a[idx] = orig + eps
        plus = loss(p)
        a[idx] = orig - eps
        minus = loss(p)
        a[idx] = orig
        g[idx] = (plus - minus) / (2 * eps)
    return g


def _assert_rel(actual, expected, rtol: float, err_msg: str = "") -> None:
    """Elementwise rtol, with an atol of rtol times the array's scale (>= 1)
    so that entries that are ~0 by cancellation do not need exact zeros."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def _check_finite_differences(kind, nonlinearity, p, bias, **kw) -> None:
    """Every gradient of the backward against central finite differences."""
    outputs, cache = _forward(kind, nonlinearity, p, **kw)
    # Random weights R per output make the scalar loss sum(out*R1)+sum(h_n*R2)
    # (+ sum(c_n*R3)) sensitive to every output element independently.
    rs = _random_like(np.random.default_rng(99), outputs)

    def loss(q: Params) -> float:
        outs, _ = _forward(kind, nonlinearity, q, **kw)
        return sum(float(np.sum(o * r)) for o, r in zip(outs, rs))

    grads = _backward(kind, cache, rs)
    assert set(grads) == _grad_names(kind)
    for name, value in p.items():
        assert grads[name].shape == value.shape, name
        assert grads[name].dtype == np.float64, name
        numeric = _numerical_grad(loss, p, name)
        # Tighter than torch.autograd.gradcheck's atol=1e-5, rtol=1e-3.
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)
    # Whatever the cell was not given has no gradient.
    for name in _grad_names(kind) - set(p):
        assert grads[name] is None, name
    if not bias:
        assert grads["bias_ih"] is None
        assert grads["bias_hh"] is None


# --------------------------------------------------------------------------
# Gradients against central finite differences (float64)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_gradients_match_finite_differences(kind, nonlinearity, bias, T):
    p = _params_for(kind, nonlinearity, seed=10 * T + bias, T=T, bias=bias)
    _check_finite_differences(kind, nonlinearity, p, bias)


# Lengths with a full, an empty and a partial sequence, in no order.
LENGTHS_AND_DIRECTIONS = [(None, True), ([4, 0, 2], False), ([4, 0, 2], True)]
LENGTHS_AND_DIRECTIONS_IDS = ["reverse", "lengths", "lengths_reverse"]


@pytest.mark.parametrize(
    ("lengths", "reverse"), LENGTHS_AND_DIRECTIONS, ids=LENGTHS_AND_DIRECTIONS_IDS
)
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_gradients_match_finite_differences_lengths_reverse(kind, nonlinearity, lengths, reverse):
    kw = {"lengths": lengths, "reverse": reverse}
    p = _params_for(kind, nonlinearity, seed=50, T=4, batch=3, **kw)
    _check_finite_differences(kind, nonlinearity, p, True, **kw)


def test_relu_params_exercise_both_branches():
    """Guard for the relu finite-difference test: the chosen data really
    has negative pre-activations, so zeroed gradients are covered too."""
    p = _params_for("rnn", "relu", seed=41, T=4)
    (out, _), _ = _forward("rnn", "relu", p)
    assert (out == 0).any() and (out > 0).any()


def test_gru_bias_gradients_differ_only_in_the_n_gate():
    """b_ih and b_hh add up for r and z, but b_hn sits inside r * (...)."""
    p = _make_params(np.random.default_rng(2), "gru")
    outputs, cache = _forward("gru", None, p)
    grads = _backward("gru", cache, _random_like(np.random.default_rng(3), outputs))
    np.testing.assert_allclose(grads["bias_ih"][: 2 * H], grads["bias_hh"][: 2 * H], rtol=1e-14)
    assert np.abs(grads["bias_ih"][2 * H :] - grads["bias_hh"][2 * H :]).min() > 1e-6


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_none_grads_mean_zeros(kind, nonlinearity):
    p = _params_for(kind, nonlinearity, seed=3)
    outputs, cache = _forward(kind, nonlinearity, p)
    rng = np.random.default_rng(4)
    n = len(outputs)
    for given in range(n):
        # Only output number `given` has a gradient; the others are None
        # in one call and explicit zeros in the other.
        with_none = [None] * n
        with_zeros = [np.zeros_like(o) for o in outputs]
        with_none[given] = with_zeros[given] = rng.standard_normal(outputs[given].shape)
        g_none = _backward(kind, cache, with_none)
        g_zeros = _backward(kind, cache, with_zeros)
        for name in p:
            np.testing.assert_array_equal(g_none[name], g_zeros[name], name)
    # No gradient at all: everything is exactly zero.
    grads = _backward(kind, cache, [None] * n)
    for name in p:
        np.testing.assert_array_equal(grads[name], np.zeros_like(p[name]), name)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_backward_is_repeatable_and_keeps_cache(kind, nonlinearity):
    """Backward does not consume or modify the cache."""
    p = _params_for(kind, nonlinearity, seed=5)
    outputs, cache = _forward(kind, nonlinearity, p)
    rs = _random_like(np.random.default_rng(6), outputs)
    g1 = _backward(kind, cache, rs)
    g2 = _backward(kind, cache, rs)
    for name in p:
        np.testing.assert_array_equal(g1[name], g2[name], name)


# --------------------------------------------------------------------------
# Forward properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_forward_matches_naive_loop(nonlinearity):
    p = _params_for("rnn", nonlinearity, seed=7)
    (out, h_n), _ = _forward("rnn", nonlinearity, p)
    z = _naive_rnn_preactivations(p, nonlinearity)
    expected = np.tanh(z) if nonlinearity == "tanh" else np.maximum(z, 0)
    np.testing.assert_allclose(out, expected, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(h_n, out[-1])


def _sig(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))  # naive form is fine for small values


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj"])
def test_lstm_single_step_by_hand(kind):
    """One LSTM step written out gate by gate, (i, f, g, o) order, then the
    projection h = W_hr (o * tanh(c)) when there is one."""
    rng = np.random.default_rng(8)
    p = _make_params(rng, kind, T=1)
    (out, h_n, c_n), _ = _forward(kind, None, p)
    z = p["x"][0] @ p["weight_ih"].T + p["bias_ih"] + p["h0"] @ p["weight_hh"].T + p["bias_hh"]
    zi, zf, zg, zo = np.split(z, 4, axis=1)
    c = _sig(zf) * p["c0"] + _sig(zi) * np.tanh(zg)
    h = _sig(zo) * np.tanh(c)
    if kind == "lstm_proj":
        h = h @ p["weight_hr"].T
        assert h_n.shape == (B, P) and c_n.shape == (B, H)
    np.testing.assert_allclose(c_n, c, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(h_n, h, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(out[0], h_n)


def test_gru_single_step_by_hand():
    """One GRU step written out gate by gate, (r, z, n) order; b_hn is
    inside r * (...)."""
    p = _make_params(np.random.default_rng(8), "gru", T=1)
    (out, h_n), _ = _forward("gru", None, p)
    xr, xz, xn = np.split(p["x"][0] @ p["weight_ih"].T + p["bias_ih"], 3, axis=1)
    hr, hz, hn = np.split(p["h0"] @ p["weight_hh"].T + p["bias_hh"], 3, axis=1)
    r = _sig(xr + hr)
    z = _sig(xz + hz)
    n = np.tanh(xn + r * hn)
    h = (1 - z) * n + z * p["h0"]
    np.testing.assert_allclose(h_n, h, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(out[0], h_n)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_float32_matches_float64(kind, nonlinearity):
    p64 = _params_for(kind, nonlinearity, seed=9)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    # Compare against float64 on the same (rounded) numbers, so only the
    # arithmetic differs, not the inputs.
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    outs32, cache32 = _forward(kind, nonlinearity, p32)
    outs64, cache64 = _forward(kind, nonlinearity, p64)
    for o32, o64 in zip(outs32, outs64):
        assert o32.dtype == np.float32
        np.testing.assert_allclose(o32, o64, rtol=1e-5, atol=1e-6)

    rs = _random_like(np.random.default_rng(10), outs64)
    g32 = _backward(kind, cache32, [r.astype(np.float32) for r in rs])
    g64 = _backward(kind, cache64, rs)
    for name in p64:
        assert g32[name].dtype == np.float32, name
        _assert_rel(g32[name], g64[name], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_computes_in_dtype_of_x(kind, nonlinearity):
    """float32 x with float64 weights/states: everything is float32."""
    p = _params_for(kind, nonlinearity, seed=11)
    p["x"] = p["x"].astype(np.float32)
    outputs, cache = _forward(kind, nonlinearity, p)
    assert all(o.dtype == np.float32 for o in outputs)
    rs = _random_like(np.random.default_rng(12), outputs)  # float64 grads
    grads = _backward(kind, cache, rs)
    for name in p:
        assert grads[name].dtype == np.float32, name


def test_sigmoid_is_safe_and_accurate():
    for dtype in (np.float32, np.float64):
        x = np.array([-1e4, -1000.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1000.0, 1e4], dtype)
        # Underflow to 0 is harmless (numpy ignores it by default).
        with np.errstate(all="raise", under="ignore"):
            s = reference.sigmoid(x)
        assert s.dtype == dtype
        assert np.all((s >= 0) & (s <= 1))
        assert s[0] == 0 and s[-1] == 1 and s[4] == 0.5
    # Full relative precision in the far negative tail, where
    # 0.5 * (1 + tanh(x / 2)) would lose it.
    x = np.array([-700.0, -100.0, -20.0])
    expected = np.exp(x) / (1 + np.exp(x))
    np.testing.assert_allclose(reference.sigmoid(x), expected, rtol=1e-15)
    x = np.linspace(-30, 30, 601)
    np.testing.assert_allclose(reference.sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-15)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_large_values_raise_no_floating_point_warnings(kind, nonlinearity):
    p = _params_for(kind, nonlinearity, seed=13)
    p = {k: v * 1e3 for k, v in p.items()}
    # Underflow to 0 is harmless (numpy ignores it by default).
    with np.errstate(all="raise", under="ignore"):
        outputs, cache = _forward(kind, nonlinearity, p)
        grads = _backward(kind, cache, [np.ones_like(o) for o in outputs])
    assert all(np.isfinite(o).all() for o in outputs)
    assert all(np.isfinite(grads[name]).all() for name in p)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_none_state_is_zeros(kind, nonlinearity):
    p = _params_for(kind, nonlinearity, seed=14)
    for name in _state_names(kind):
        p[name] = np.zeros_like(p[name])
    outs_zero, cache_zero = _forward(kind, nonlinearity, p)
    outs_none, cache_none = _forward(kind, nonlinearity, {**p, **dict.fromkeys(_state_names(kind))})
    for a, b in zip(outs_zero, outs_none):
        np.testing.assert_array_equal(a, b)
    rs = _random_like(np.random.default_rng(15), outs_zero)
    g_zero = _backward(kind, cache_zero, rs)
    g_none = _backward(kind, cache_none, rs)
    for name in p:
        np.testing.assert_array_equal(g_zero[name], g_none[name], name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_batch_zero(kind, nonlinearity, bias):
    p = _make_params(np.random.default_rng(16), kind, T=3, batch=0, bias=bias)
    # lengths=[] is the one valid list of lengths for an empty batch.
    for lengths in (None, []):
        outputs, cache = _forward(kind, nonlinearity, p, lengths=lengths)
        assert outputs[0].shape == (3, *p["h0"].shape)
        for o, s in zip(outputs[1:], _state_names(kind)):
            assert o.shape == p[s].shape
        for grads_out in ([None] * len(outputs), [np.zeros_like(o) for o in outputs]):
            grads = _backward(kind, cache, grads_out)
            for name, value in p.items():
                assert grads[name].shape == value.shape, name
                # Nothing to sum over: weight and bias gradients are zeros.
                np.testing.assert_array_equal(grads[name], 0, name)
            if not bias:
                assert grads["bias_ih"] is None and grads["bias_hh"] is None


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_inputs_not_modified_and_odd_layouts(kind, nonlinearity):
    """Read-only, Fortran-order and negative-stride inputs work, and no
    input (nor a later change to one) affects the results."""
    p = _params_for(kind, nonlinearity, seed=17)
    outputs, cache = _forward(kind, nonlinearity, p)
    rs = _random_like(np.random.default_rng(18), outputs)
    grads = _backward(kind, cache, rs)

    odd = {}
    for k, v in p.items():
        if v.ndim == 1:
            v = v[::-1].copy()[::-1]  # negative stride, same values
        else:
            v = np.asfortranarray(v)
        v.flags.writeable = False
        odd[k] = v
    r_odd = [np.asfortranarray(r) for r in rs]
    for r in r_odd:
        r.flags.writeable = False
    # lengths that zero nothing still exercise the masking of x.
    outs2, cache2 = _forward(kind, nonlinearity, odd, lengths=[p["x"].shape[0]] * B)
    x_before = odd["x"].copy()
    grads2 = _backward(kind, cache2, r_odd)
    for a, b in zip(outputs, outs2):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    for name in p:  # BLAS may round differently for other layouts
        np.testing.assert_allclose(grads[name], grads2[name], rtol=1e-13, atol=1e-15, err_msg=name)

    # The cache holds its own copy of x.
    x = p["x"].copy()
    _, cache3 = _forward(kind, nonlinearity, {**p, "x": x})
    x[...] = 0
    grads3 = _backward(kind, cache3, rs)
    np.testing.assert_array_equal(grads3["weight_ih"], grads["weight_ih"])
    np.testing.assert_array_equal(odd["x"], x_before)


def test_unknown_nonlinearity():
    p = _make_params(np.random.default_rng(19), "rnn")
    with pytest.raises(ValueError, match="nonlinearity"):
        _forward("rnn", "sigmoid", p)


# --------------------------------------------------------------------------
# Variable lengths and the reverse direction
# --------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_lengths_match_each_sequence_alone(kind, nonlinearity, dtype, reverse, rng):
    """A batch with lengths is the same as running every sequence on its
    own, truncated to its length; in reverse, on its own steps reversed,
    with the output flipped back. Forward and backward."""
    lengths = [5, 0, 3, 1]
    p = {k: v.astype(dtype) for k, v in _make_params(rng, kind, T=5, batch=4).items()}
    outputs, cache = _forward(kind, nonlinearity, p, lengths=lengths, reverse=reverse)
    # Gradients everywhere, padded outputs included: those must be ignored.
    rs = [r.astype(dtype) for r in _random_like(rng, outputs)]
    grads = _backward(kind, cache, rs)

    weight_names = [k for k in p if k.startswith(("weight", "bias"))]
    weight_sums = {name: np.zeros_like(p[name]) for name in weight_names}
    flip = slice(None, None, -1) if reverse else slice(None)
    for b, n in enumerate(lengths):
        outs_b, cache_b = _forward(kind, nonlinearity, _one_sequence(p, b, n, reverse))
        assert_close(outputs[0][:n, b : b + 1], outs_b[0][flip], dtype, "fwd", f"out[:, {b}]")
        np.testing.assert_array_equal(outputs[0][n:, b], 0)  # padded outputs are exactly 0
        for state, ours, alone in zip(_state_names(kind), outputs[1:], outs_b[1:]):
            assert_close(ours[b : b + 1], alone, dtype, "fwd", f"{state}[{b}]")

        rs_b = [rs[0][:n, b : b + 1][flip]] + [r[b : b + 1] for r in rs[1:]]
        g_b = _backward(kind, cache_b, rs_b)
        assert_close(grads["x"][:n, b : b + 1], g_b["x"][flip], dtype, "grad", f"x[:, {b}]")
        np.testing.assert_array_equal(grads["x"][n:, b], 0)  # padded inputs get no gradient
        for state in _state_names(kind):
            assert_close(grads[state][b : b + 1], g_b[state], dtype, "grad", f"{state}[{b}]")
        for name in weight_names:
            weight_sums[name] += g_b[name]
    # The batch's parameter gradients are the sums over its sequences.
    for name in weight_names:
        assert_close(grads[name], weight_sums[name], dtype, "grad", name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_reverse_is_forward_on_flipped_input(kind, nonlinearity, dtype, rng):
    p = {k: v.astype(dtype) for k, v in _make_params(rng, kind, T=5).items()}
    outputs, cache = _forward(kind, nonlinearity, p, reverse=True)
    flipped_outputs, flipped_cache = _forward(kind, nonlinearity, {**p, "x": p["x"][::-1]})
    assert_close(outputs[0], flipped_outputs[0][::-1], dtype, "fwd", "out")
    for state, ours, theirs in zip(_state_names(kind), outputs[1:], flipped_outputs[1:]):
        assert_close(ours, theirs, dtype, "fwd", state)

    rs = [r.astype(dtype) for r in _random_like(rng, outputs)]
    grads = _backward(kind, cache, rs)
    flipped_grads = _backward(kind, flipped_cache, [rs[0][::-1], *rs[1:]])
    assert_close(grads["x"], flipped_grads["x"][::-1], dtype, "grad", "x")
    for name in set(p) - {"x"}:
        assert_close(grads[name], flipped_grads[name], dtype, "grad", name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_full_lengths_change_nothing(kind, nonlinearity, reverse):
    """lengths all equal to T (as a tuple, or an unsigned numpy array) give
    bit for bit the results of lengths=None."""
    p = _params_for(kind, nonlinearity, seed=22, T=3)
    outputs, cache = _forward(kind, nonlinearity, p, reverse=reverse)
    rs = _random_like(np.random.default_rng(23), outputs)
    grads = _backward(kind, cache, rs)
    for lengths in ((3,) * B, np.full(B, 3, np.uint8)):
        outs2, cache2 = _forward(kind, nonlinearity, p, lengths=lengths, reverse=reverse)
        grads2 = _backward(kind, cache2, rs)
        for a, b in zip(outputs, outs2):
            np.testing.assert_array_equal(a, b)
        for name in p:
            np.testing.assert_array_equal(grads[name], grads2[name], name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_padding_is_never_read(kind, nonlinearity, reverse):
    """Padded inputs and the gradients of padded outputs may hold anything,
    nan and inf included, without changing a single result bit; a sequence
    of length 0 returns its initial state and passes its gradient through."""
    lengths = [0, 2, 3]
    p = _make_params(np.random.default_rng(24), kind, T=3, batch=3)
    outputs, cache = _forward(kind, nonlinearity, p, lengths=lengths, reverse=reverse)
    rs = _random_like(np.random.default_rng(25), outputs)
    grads = _backward(kind, cache, rs)

    padded = np.arange(3)[:, None] >= np.array(lengths)  # (T, B)
    x_junk, grad_junk = p["x"].copy(), rs[0].copy()
    x_junk[padded] = np.nan
    grad_junk[padded] = np.inf
    junk_outputs, junk_cache = _forward(
        kind, nonlinearity, {**p, "x": x_junk}, lengths=lengths, reverse=reverse
    )
    junk_grads = _backward(kind, junk_cache, [grad_junk, *rs[1:]])
    for a, b in zip(outputs, junk_outputs):
        np.testing.assert_array_equal(a, b)
    for name in p:
        np.testing.assert_array_equal(grads[name], junk_grads[name], name)

    np.testing.assert_array_equal(outputs[0][padded], 0)
    np.testing.assert_array_equal(grads["x"][padded], 0)
    for state, final, grad_final in zip(_state_names(kind), outputs[1:], rs[1:]):
        np.testing.assert_array_equal(final[0], p[state][0])
        np.testing.assert_array_equal(grads[state][0], grad_final[0])


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_zero_steps(kind, nonlinearity):
    """T = 0: no output, the final state is the initial one."""
    p = _make_params(np.random.default_rng(26), kind, T=0)
    outputs, cache = _forward(kind, nonlinearity, p, lengths=[0] * B, reverse=True)
    assert outputs[0].shape == (0, *p["h0"].shape)
    rs = _random_like(np.random.default_rng(27), outputs)
    grads = _backward(kind, cache, rs)
    for state, final, grad_final in zip(_state_names(kind), outputs[1:], rs[1:]):
        np.testing.assert_array_equal(final, p[state])
        np.testing.assert_array_equal(grads[state], grad_final)
    for name in set(p) - set(_state_names(kind)):
        np.testing.assert_array_equal(grads[name], np.zeros_like(p[name]), name)


BAD_LENGTHS = {
    "too_few": [3],
    "too_many": [3, 3, 3],
    "scalar": 3,
    "2d": [[3, 3]],
    "negative": [3, -1],
    "above_T": [3, 4],
    "fraction": [1.5, 2],
    "float": [1.0, 2.0],
    "bool": [True, False],
    "str": ["1", "2"],
    "none": [None, 1],
}


@pytest.mark.parametrize("lengths", BAD_LENGTHS.values(), ids=BAD_LENGTHS.keys())
def test_bad_lengths_raise(lengths):
    for kind, nonlinearity in CELLS:
        p = _make_params(np.random.default_rng(28), kind, T=3)  # batch of B = 2
        with pytest.raises(ValueError, match="lengths"):
            _forward(kind, nonlinearity, p, lengths=lengths)


# --------------------------------------------------------------------------
# Parity with torch.nn (only when torch is installed)
# --------------------------------------------------------------------------


def _torch_parity(kind, nonlinearity, bias, *, lengths=None, bidirectional=False):
    """Outputs, final states and all gradients of one torch layer against
    the reference, in float64. With lengths, torch runs a packed sequence;
    bidirectional checks the reference's reverse=True against the torch
    layer's reverse direction (its ``_reverse`` weights)."""
    torch = pytest.importorskip("torch")
    pack = torch.nn.utils.rnn
    T = 4 if lengths is None else max(lengths) + 1  # with lengths, some padding
    batch = B if lengths is None else len(lengths)
    suffixes = ["", "_reverse"] if bidirectional else [""]
    # One set of weights and states per direction; all directions read one x.
    ps = [
        _params_for(kind, nonlinearity, seed=20 + bias + 2 * d, T=T, batch=batch, bias=bias)
        for d in range(len(suffixes))
    ]
    for p in ps[1:]:
        p["x"] = ps[0]["x"]

    kw = {"bias": bias, "bidirectional": bidirectional, "dtype": torch.float64}
    if _is_lstm(kind):
        layer = torch.nn.LSTM(N_IN, H, proj_size=P if kind == "lstm_proj" else 0, **kw)
    elif kind == "gru":
        layer = torch.nn.GRU(N_IN, H, **kw)
    else:
        layer = torch.nn.RNN(N_IN, H, nonlinearity=nonlinearity, **kw)
    weight_names = [k for k in ps[0] if k.startswith(("weight", "bias"))]
    with torch.no_grad():
        for p, suffix in zip(ps, suffixes):
            for name in weight_names:
                getattr(layer, f"{name}_l0{suffix}").copy_(torch.from_numpy(p[name]))

    x = torch.tensor(ps[0]["x"], requires_grad=True)
    # torch states carry a leading (num_layers * directions) axis.
    states = [
        torch.tensor(np.stack([p[s] for p in ps]), requires_grad=True) for s in _state_names(kind)
    ]
    hx = tuple(states) if _is_lstm(kind) else states[0]
    if lengths is None:
        t_out, t_hx = layer(x, hx)
    else:
        packed = pack.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        t_packed, t_hx = layer(packed, hx)
        t_out, _ = pack.pad_packed_sequence(t_packed, total_length=T)
    t_states = t_hx if _is_lstm(kind) else (t_hx,)
    width = t_out.shape[2] // len(suffixes)  # out holds the directions side by side

    results, loss = [], 0
    for d, p in enumerate(ps):
        outputs, cache = _forward(kind, nonlinearity, p, lengths=lengths, reverse=d == 1)
        t_outputs = (t_out[:, :, d * width : (d + 1) * width], *(s[d] for s in t_states))
        # Random gradients everywhere, padded outputs included: both ignore those.
        rs = _random_like(np.random.default_rng(21 + d), outputs)
        loss = loss + sum((o * torch.from_numpy(r)).sum() for o, r in zip(t_outputs, rs))
        results.append((outputs, t_outputs, _backward(kind, cache, rs)))
    loss.backward()

    grad_x = np.zeros_like(ps[0]["x"])  # x feeds every direction
    for d, (outputs, t_outputs, grads) in enumerate(results):
        names = ["out", *_state_names(kind)]
        for name, ours, theirs in zip(names, outputs, t_outputs):
            assert_close(ours, theirs.detach().numpy(), np.float64, "fwd", f"{name}, dir {d}")
        for name, s in zip(_state_names(kind), states):
            assert_close(grads[name], s.grad.numpy()[d], np.float64, "grad", f"{name}, dir {d}")
        for name in weight_names:
            theirs = getattr(layer, f"{name}_l0{suffixes[d]}").grad.numpy()
            assert_close(grads[name], theirs, np.float64, "grad", f"{name}, dir {d}")
        if not bias:
            assert grads["bias_ih"] is None and grads["bias_hh"] is None
        grad_x += grads["x"]
    assert_close(grad_x, x.grad.numpy(), np.float64, "grad", "x")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_parity_lstm(bias):
    _torch_parity("lstm", None, bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_parity_lstm_proj(bias):
    _torch_parity("lstm_proj", None, bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_parity_gru(bias):
    _torch_parity("gru", None, bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_torch_parity_rnn(nonlinearity, bias):
    _torch_parity("rnn", nonlinearity, bias)


# Unsorted lengths, one of them 1, none of them T: torch needs lengths >= 1.
@pytest.mark.parametrize("lengths", [None, [3, 1, 4, 2]], ids=["full", "packed"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_torch_parity_bidirectional(kind, nonlinearity, lengths):
    _torch_parity(kind, nonlinearity, True, lengths=lengths, bidirectional=True)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_torch_parity_packed(kind, nonlinearity):
    _torch_parity(kind, nonlinearity, False, lengths=[2, 3, 1])

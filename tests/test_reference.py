"""Tests of the pure-NumPy reference (fastrnn.reference) itself.

The reference is the ground truth for the C++ kernels, so it is checked
against finite differences, against itself across dtypes, and (when torch is
installed) against torch.nn.LSTM / torch.nn.RNN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fastrnn import reference

B, N_IN, H = 2, 3, 4  # batch, input size, hidden size

# (kind, nonlinearity) of every cell the reference implements.
CELLS = [("lstm", None), ("rnn", "tanh"), ("rnn", "relu")]
CELL_IDS = ["lstm", "rnn_tanh", "rnn_relu"]

Params = dict[str, np.ndarray]


def _state_names(kind: str) -> list[str]:
    return ["h0", "c0"] if kind == "lstm" else ["h0"]


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
    G = 4 * H if kind == "lstm" else H
    p = {"x": rng.standard_normal((T, batch, N_IN))}
    for name in _state_names(kind):
        p[name] = rng.standard_normal((batch, H))
    p["weight_ih"] = scale * rng.standard_normal((G, N_IN))
    p["weight_hh"] = scale * rng.standard_normal((G, H))
    if bias:
        p["bias_ih"] = scale * rng.standard_normal(G)
        p["bias_hh"] = scale * rng.standard_normal(G)
    return p


def _forward(kind: str, nonlinearity: str | None, p: Params):
    """Run the reference forward; returns (outputs tuple, cache)."""
    if kind == "lstm":
        out, h_n, c_n, cache = reference.lstm_forward(
            p["x"], p["h0"], p["c0"], p["weight_ih"], p["weight_hh"],
            p.get("bias_ih"), p.get("bias_hh"),
        )  # fmt: skip
        return (out, h_n, c_n), cache
    out, h_n, cache = reference.rnn_forward(
        p["x"], p["h0"], p["weight_ih"], p["weight_hh"],
        p.get("bias_ih"), p.get("bias_hh"), nonlinearity=nonlinearity,
    )  # fmt: skip
    return (out, h_n), cache


def _backward(kind: str, cache, grads_out):
    if kind == "lstm":
        return reference.lstm_backward(cache, *grads_out)
    return reference.rnn_backward(cache, *grads_out)


def _random_like(rng: np.random.Generator, arrays) -> list[np.ndarray]:
    return [rng.standard_normal(a.shape) for a in arrays]


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


def _params_for(kind: str, nonlinearity: str | None, seed: int, **kw) -> Params:
    """Random parameters; for relu, ones whose pre-activations keep |z| > 1e-2.

    Finite differences are only valid where relu is differentiable, so for
    relu we walk through seeds until every pre-activation is well away from
    the kink (a perturbation of 1e-6 then cannot cross it), while still
    having both signs so that both branches are exercised.
    """
    for s in range(seed, seed + 1000):
        p = _make_params(np.random.default_rng(s), kind, **kw)
        if nonlinearity != "relu":
            return p
        z = _naive_rnn_preactivations(p, "relu")
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


# --------------------------------------------------------------------------
# Gradients against central finite differences (float64)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_gradients_match_finite_differences(kind, nonlinearity, bias, T):
    p = _params_for(kind, nonlinearity, seed=10 * T + bias, T=T, bias=bias)
    outputs, cache = _forward(kind, nonlinearity, p)
    # Random weights R per output make the scalar loss sum(out*R1)+sum(h_n*R2)
    # (+ sum(c_n*R3)) sensitive to every output element independently.
    rs = _random_like(np.random.default_rng(99), outputs)

    def loss(q: Params) -> float:
        outs, _ = _forward(kind, nonlinearity, q)
        return sum(float(np.sum(o * r)) for o, r in zip(outs, rs))

    grads = _backward(kind, cache, rs)
    expected_keys = {"x", "weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    assert set(grads) == expected_keys | set(_state_names(kind))
    for name, value in p.items():
        assert grads[name].shape == value.shape, name
        assert grads[name].dtype == np.float64, name
        numeric = _numerical_grad(loss, p, name)
        # Tighter than torch.autograd.gradcheck's atol=1e-5, rtol=1e-3.
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)
    if not bias:
        assert grads["bias_ih"] is None
        assert grads["bias_hh"] is None


def test_relu_params_exercise_both_branches():
    """Guard for the relu finite-difference test: the chosen data really
    has negative pre-activations, so zeroed gradients are covered too."""
    p = _params_for("rnn", "relu", seed=41, T=4)
    (out, _), _ = _forward("rnn", "relu", p)
    assert (out == 0).any() and (out > 0).any()


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
        for name in g_zeros:
            np.testing.assert_array_equal(g_none[name], g_zeros[name], name)
    # No gradient at all: everything is exactly zero.
    for name, g in _backward(kind, cache, [None] * n).items():
        np.testing.assert_array_equal(g, np.zeros_like(p[name]), name)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_backward_is_repeatable_and_keeps_cache(kind, nonlinearity):
    """Backward does not consume or modify the cache."""
    p = _params_for(kind, nonlinearity, seed=5)
    outputs, cache = _forward(kind, nonlinearity, p)
    rs = _random_like(np.random.default_rng(6), outputs)
    g1 = _backward(kind, cache, rs)
    g2 = _backward(kind, cache, rs)
    for name in g1:
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


def test_lstm_single_step_by_hand():
    """One LSTM step written out gate by gate, (i, f, g, o) order."""
    rng = np.random.default_rng(8)
    p = _make_params(rng, "lstm", T=1)
    (out, h_n, c_n), _ = _forward("lstm", None, p)
    z = p["x"][0] @ p["weight_ih"].T + p["bias_ih"] + p["h0"] @ p["weight_hh"].T + p["bias_hh"]
    zi, zf, zg, zo = np.split(z, 4, axis=1)

    def sig(v: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-v))  # naive form is fine for small values

    c = sig(zf) * p["c0"] + sig(zi) * np.tanh(zg)
    h = sig(zo) * np.tanh(c)
    np.testing.assert_allclose(c_n, c, rtol=1e-14, atol=1e-15)
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
    for name in g64:
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
    for name, g in _backward(kind, cache, rs).items():
        assert g.dtype == np.float32, name


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
    assert all(np.isfinite(g).all() for g in grads.values())


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
    for name in g_zero:
        np.testing.assert_array_equal(g_zero[name], g_none[name], name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS, ids=CELL_IDS)
def test_batch_zero(kind, nonlinearity, bias):
    p = _make_params(np.random.default_rng(16), kind, T=3, batch=0, bias=bias)
    outputs, cache = _forward(kind, nonlinearity, p)
    assert outputs[0].shape == (3, 0, H)
    for o in outputs[1:]:
        assert o.shape == (0, H)
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
    outs2, cache2 = _forward(kind, nonlinearity, odd)
    x_before = odd["x"].copy()
    grads2 = _backward(kind, cache2, r_odd)
    for a, b in zip(outputs, outs2):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    for name in grads:  # BLAS may round differently for other layouts
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
# Parity with torch.nn (only when torch is installed)
# --------------------------------------------------------------------------


def _torch_parity(kind, nonlinearity, bias):
    torch = pytest.importorskip("torch")
    p = _params_for(kind, nonlinearity, seed=20 + bias, T=4, bias=bias)
    if kind == "lstm":
        layer = torch.nn.LSTM(N_IN, H, bias=bias, dtype=torch.float64)
    else:
        layer = torch.nn.RNN(N_IN, H, nonlinearity=nonlinearity, bias=bias, dtype=torch.float64)
    weight_names = [k for k in p if k.startswith(("weight", "bias"))]
    with torch.no_grad():
        for name in weight_names:
            getattr(layer, f"{name}_l0").copy_(torch.from_numpy(p[name]))

    x = torch.tensor(p["x"], requires_grad=True)
    # torch states carry a leading (num_layers * directions) = 1 axis.
    states = [torch.tensor(p[s][None], requires_grad=True) for s in _state_names(kind)]
    if kind == "lstm":
        t_out, (t_h, t_c) = layer(x, tuple(states))
        t_outputs = (t_out, t_h[0], t_c[0])
    else:
        t_out, t_h = layer(x, states[0])
        t_outputs = (t_out, t_h[0])

    outputs, cache = _forward(kind, nonlinearity, p)
    rs = _random_like(np.random.default_rng(21), outputs)
    loss = sum((o * torch.from_numpy(r)).sum() for o, r in zip(t_outputs, rs))
    loss.backward()
    grads = _backward(kind, cache, rs)

    for ours, theirs in zip(outputs, t_outputs):
        _assert_rel(ours, theirs.detach().numpy(), rtol=1e-10)
    _assert_rel(grads["x"], x.grad.numpy(), rtol=1e-10, err_msg="x")
    for name, s in zip(_state_names(kind), states):
        _assert_rel(grads[name], s.grad.numpy()[0], rtol=1e-10, err_msg=name)
    for name in weight_names:
        theirs = getattr(layer, f"{name}_l0").grad.numpy()
        _assert_rel(grads[name], theirs, rtol=1e-10, err_msg=name)
    if not bias:
        assert grads["bias_ih"] is None and grads["bias_hh"] is None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_parity_lstm(bias):
    _torch_parity("lstm", None, bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_torch_parity_rnn(nonlinearity, bias):
    _torch_parity("rnn", nonlinearity, bias)

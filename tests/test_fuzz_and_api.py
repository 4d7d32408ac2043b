"""Hypothesis fuzzing against the reference, the functional API and memory errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrnn
from conftest import ISAS, assert_close, tol
from test_layers import make_hx, make_layer, run_layer, run_reference, x_shape


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI must not be flaky
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]),
    isa=st.sampled_from(ISAS),
    dtype=st.sampled_from([np.float32, np.float64]),
    steps=st.integers(1, 6),
    batch=st.integers(0, 9),
    input_size=st.integers(1, 40),
    hidden_size=st.integers(1, 70),
    bias=st.booleans(),
    batch_first=st.booleans(),
    with_hx=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes_match_reference(
    kind, isa, dtype, steps, batch, input_size, hidden_size, bias, batch_first, with_hx, scale, seed
):
    rng = np.random.default_rng(seed)
    previous = fastrnn.active_isa()
    fastrnn._core._set_isa(isa)
    try:
        layer = make_layer(
            kind, input_size, hidden_size, dtype, seed=seed, bias=bias, batch_first=batch_first
        )
        x = (scale * rng.standard_normal(x_shape(steps, batch, input_size, batch_first))).astype(
            dtype
        )
        hx = make_hx(kind, rng, batch, hidden_size, dtype) if with_hx else None
        grad_out = rng.standard_normal(x.shape[:-1] + (hidden_size,)).astype(dtype)
        got = run_layer(layer, kind, x, hx, grad_out)
    finally:
        fastrnn._core._set_isa(previous)
    ref = run_reference(kind, layer.state_dict(), x, hx, grad_out, batch_first=batch_first)
    if batch == 0:
        assert got["out"].shape == ref["out"].shape and got["dx"].shape == x.shape
        return
    for name in ("out", "h_n", "c_n"):
        if name in ref:
            assert_close(got[name], ref[name], dtype, "fwd", name)
    # Gradients are linear in grad_out: errors are measured against the larger of a gradient's
    # norm and a small fraction of grad_out's. A gradient that nearly cancels (a saturated unit:
    # 1 - tanh(z)^2 rounds to 0 in float32) has no meaningful relative error of its own.
    floor = 1e-3 * float(np.linalg.norm(grad_out))
    grads = {n: (got[n], ref[n]) for n in ("dx", "dh0", "dc0") if n in ref}
    grads.update({n: (got["grads"][n], ref["grads"][n]) for n in ref["grads"]})
    for name, (mine, want) in grads.items():
        want = np.asarray(want, np.float64)
        err = np.linalg.norm(mine - want) / max(np.linalg.norm(want), floor)
        assert err <= tol(dtype, "grad"), f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_matches_layers(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 6)).astype(dtype)
    h0 = rng.standard_normal((3, 11)).astype(dtype)
    c0 = rng.standard_normal((3, 11)).astype(dtype)
    lstm = fastrnn.LSTM(6, 11, dtype=dtype, seed=1).eval()
    out, h_n, c_n = fastrnn.functional.lstm(x, h0, c0, *lstm.state_dict().values())
    want_out, (want_h, want_c) = lstm(x, (h0[None], c0[None]))
    assert_close(out, want_out, dtype, "fwd")
    assert_close(h_n, want_h[0], dtype, "fwd")
    assert_close(c_n, want_c[0], dtype, "fwd")
    rnn = fastrnn.RNN(6, 11, nonlinearity="relu", bias=False, dtype=dtype, seed=2).eval()
    out, h_n = fastrnn.functional.rnn(x, None, *rnn.state_dict().values(), nonlinearity="relu")
    want_out, want_h = rnn(x)
    assert_close(out, want_out, dtype, "fwd")
    assert_close(h_n, want_h[0], dtype, "fwd")
    gru = fastrnn.GRU(6, 11, dtype=dtype, seed=3).eval()
    out, h_n = fastrnn.functional.gru(x, h0, *gru.state_dict().values())
    want_out, want_h = gru(x, h0[None])
    assert_close(out, want_out, dtype, "fwd")
    assert_close(h_n, want_h[0], dtype, "fwd")


def test_functional_rejects_bad_input():
    w_ih, w_hh = np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32)
    x = np.zeros((2, 1, 2), np.float32)
    # Lists carry no dtype: they convert to weight_ih's, as the layers convert them to theirs.
    out = fastrnn.functional.lstm(x.tolist(), [[0.0]], None, w_ih, w_hh)[0]
    assert out.dtype == np.float32
    with pytest.raises(TypeError, match="weight_hh"):
        fastrnn.functional.lstm(x, None, None, w_ih, w_hh.astype(np.float64))
    with pytest.raises(TypeError, match="x"):
        fastrnn.functional.lstm(x.astype(np.int64), None, None, w_ih, w_hh)
    with pytest.raises(ValueError, match="x"):
        fastrnn.functional.lstm(x[0], None, None, w_ih, w_hh)
    with pytest.raises(ValueError, match="weight_hh"):
        fastrnn.functional.lstm(x, None, None, w_ih, np.zeros((3, 1), np.float32))
    with pytest.raises(ValueError, match="nonlinearity"):
        fastrnn.functional.rnn(x, None, w_ih[:1], w_hh[:1], nonlinearity="gelu")


def test_workspace_too_large_for_memory_is_memory_error():
    # x is small (16 MiB) but a training forward needs (batch x 4 * hidden) gates: 64 GiB.
    layer = fastrnn.LSTM(1, 1024, seed=0)
    x = np.zeros((1, 1 << 22, 1), np.float32)
    with pytest.raises(MemoryError):
        layer(x)


def test_parameters_too_large_for_memory_is_memory_error():
    with pytest.raises(MemoryError):
        fastrnn.LSTM(1, 1 << 22)

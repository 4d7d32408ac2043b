"""fastrnn.LSTM / fastrnn.GRU / fastrnn.RNN against the NumPy reference, and the layer API
contract."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

import fastrnn
from conftest import DTYPE_IDS, DTYPES, assert_close, rel_err, tol
from fastrnn import reference as R

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
PARAM_NAMES = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
REF_GRAD_NAMES = {
    "weight_ih_l0": "weight_ih",
    "weight_hh_l0": "weight_hh",
    "bias_ih_l0": "bias_ih",
    "bias_hh_l0": "bias_hh",
}


# --------------------------------------------------------------------------- helpers


def make_layer(kind, input_size, hidden_size, dtype=np.float32, seed=0, **kwargs):
    if kind == "lstm":
        return fastrnn.LSTM(input_size, hidden_size, dtype=dtype, seed=seed, **kwargs)
    if kind == "gru":
        return fastrnn.GRU(input_size, hidden_size, dtype=dtype, seed=seed, **kwargs)
    return fastrnn.RNN(
        input_size, hidden_size, nonlinearity=kind[4:], dtype=dtype, seed=seed, **kwargs
    )


def gate_count(kind):
    return {"lstm": 4, "gru": 3}.get(kind, 1)


def x_shape(T, B, IN, batch_first=False, unbatched=False):
    if unbatched:
        return (T, IN)
    return (B, T, IN) if batch_first else (T, B, IN)


def state_shape(B, H, unbatched=False):
    return (1, H) if unbatched else (1, B, H)


def make_hx(kind, rng, B, H, dtype, unbatched=False):
    shape = state_shape(B, H, unbatched)
    h0 = rng.standard_normal(shape).astype(dtype)
    if kind == "lstm":
        return (h0, rng.standard_normal(shape).astype(dtype))
    return h0


def make_grad_state(kind, rng, B, H, dtype, unbatched=False, which="both"):
    """grad_state for backward: which in {"both", "h", "c"} (LSTM) / anything (RNN)."""
    shape = state_shape(B, H, unbatched)
    gh = rng.standard_normal(shape).astype(dtype)
    if kind != "lstm":
        return gh
    gc = rng.standard_normal(shape).astype(dtype)
    return {"both": (gh, gc), "h": (gh, None), "c": (None, gc)}[which]


def to_time_major(a, batch_first, unbatched):
    """Layer layout (x, out, dx) -> reference layout (T, B, F)."""
    if unbatched:
        return a[:, None, :]
    return a.transpose(1, 0, 2) if batch_first else a


def from_time_major(a, batch_first, unbatched):
    """Reference layout (T, B, F) -> layer layout."""
    if unbatched:
        return a[:, 0, :]
    return a.transpose(1, 0, 2) if batch_first else a


def state_to_ref(s, unbatched):
    """(1, B, H) or unbatched (1, H) -> reference (B, H)."""
    return s if unbatched else s[0]


def state_from_ref(s, unbatched):
    return s if unbatched else s[None]


def run_reference(
    kind,
    params,
    x,
    hx=None,
    grad_out=None,
    grad_state=None,
    *,
    batch_first=False,
    unbatched=False,
    ref_dtype=np.float64,
    backward=True,
):
    """The reference in ``ref_dtype`` for a layer call, results in the layer's layout.

    Returns a dict with out, h_n, (c_n), and when ``backward``: dx, dh0, (dc0) and
    grads (keyed by torch parameter names).
    """
    p = {k: np.asarray(v, dtype=ref_dtype) for k, v in params.items()}
    H = p["weight_hh_l0"].shape[1]
    xt = np.asarray(to_time_major(x, batch_first, unbatched), dtype=ref_dtype)
    B = xt.shape[1]
    lstm = kind == "lstm"

    def cast_state(s):
        if s is None:
            return np.zeros((B, H), ref_dtype)
        return np.asarray(state_to_ref(s, unbatched), ref_dtype)

    if lstm:
        h0, c0 = (None, None) if hx is None else hx
        out, h_n, c_n, cache = R.lstm_forward(
            xt,
            cast_state(h0),
            cast_state(c0),
            p["weight_ih_l0"],
            p["weight_hh_l0"],
            p.get("bias_ih_l0"),
            p.get("bias_hh_l0"),
        )
    else:
        options = {} if kind == "gru" else {"nonlinearity": kind[4:]}
        out, h_n, cache = (R.gru_forward if kind == "gru" else R.rnn_forward)(
            xt,
            cast_state(hx),
            p["weight_ih_l0"],
            p["weight_hh_l0"],
            p.get("bias_ih_l0"),
            p.get("bias_hh_l0"),
            **options,
        )
    res = {
        "out": from_time_major(out, batch_first, unbatched),
        "h_n": state_from_ref(h_n, unbatched),
    }
    if lstm:
        res["c_n"] = state_from_ref(c_n, unbatched)
    if not backward:
        return res

    def cast_grad_state(g):
        return None if g is None else np.asarray(state_to_ref(g, unbatched), ref_dtype)

    gout = None
    if grad_out is not None:
        gout = np.asarray(to_time_major(grad_out, batch_first, unbatched), ref_dtype)
    if lstm:
        gh, gc = (None, None) if grad_state is None else grad_state
        g = R.lstm_backward(cache, gout, cast_grad_state(gh), cast_grad_state(gc))
        res["dc0"] = state_from_ref(g["c0"], unbatched)
    else:
        backward_of = R.gru_backward if kind == "gru" else R.rnn_backward
        g = backward_of(cache, gout, cast_grad_state(grad_state))
    res["dx"] = from_time_major(g["x"], batch_first, unbatched)
    res["dh0"] = state_from_ref(g["h0"], unbatched)
    res["grads"] = {k: g[REF_GRAD_NAMES[k]] for k in params}
    return res


def run_layer(layer, kind, x, hx=None, grad_out=None, grad_state=None, backward=True):
    """Forward (and backward) through a fastrnn layer; results as in ``run_reference``."""
    res = {}
    if kind == "lstm":
        out, (h_n, c_n) = layer(x, hx)
        res.update(out=out, h_n=h_n, c_n=c_n)
        if backward:
            dx, (dh0, dc0) = layer.backward(grad_out, grad_state)
            res.update(dx=dx, dh0=dh0, dc0=dc0)
    else:
        out, h_n = layer(x, hx)
        res.update(out=out, h_n=h_n)
        if backward:
            dx, dh0 = layer.backward(grad_out, grad_state)
            res.update(dx=dx, dh0=dh0)
    if backward:
        res["grads"] = {k: np.array(v) for k, v in layer.grads.items()}
    return res


def compare(got, ref, dtype, grad_tol_kind="grad"):
    """Every output/state/gradient of ``got`` against ``ref`` with the dtype's tolerances."""
    for name in ("out", "h_n", "c_n"):
        if name in ref:
            assert got[name].dtype == np.dtype(dtype), name
            assert_close(got[name], ref[name], dtype, "fwd", name)
    for name in ("dx", "dh0", "dc0"):
        if name in ref:
            assert got[name] is not None, name
            assert got[name].dtype == np.dtype(dtype), name
            assert_close(got[name], ref[name], dtype, grad_tol_kind, name)
    if "grads" in ref:
        assert list(got["grads"]) == list(ref["grads"])
        for k in ref["grads"]:
            assert_close(got["grads"][k], ref["grads"][k], dtype, grad_tol_kind, f"grads[{k!r}]")


def snapshot(obj):
    """Deep copy of arrays inside (nested) tuples, for 'inputs never modified' checks."""
    if obj is None:
        return None
    if isinstance(obj, tuple):
        return tuple(snapshot(o) for o in obj)
    return np.array(obj, copy=True)


def assert_same(a, b):
    if a is None or b is None:
        assert a is None and b is None
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- parity with the reference


@dataclass(frozen=True)
class Case:
    IN: int
    H: int
    B: int | None  # None = unbatched input (T, I)
    T: int
    bias: bool = True
    batch_first: bool = False
    hx: bool = True  # False: hx=None
    # both | out (grad_state None) | state (grad_out None) | h, c (LSTM: only that grad_state)
    grads: str = "both"

    @property
    def id(self):
        b = "unbatched" if self.B is None else f"B{self.B}"
        return (
            f"I{self.IN}-H{self.H}-{b}-T{self.T}-{'bias' if self.bias else 'nobias'}"
            f"-{'bf' if self.batch_first else 'tm'}-{'hx' if self.hx else 'nohx'}"
            f"-g_{self.grads}"
        )


CASES = [
    Case(1, 1, 1, 1),
    Case(3, 7, 3, 5),
    Case(3, 7, 3, 5, bias=False, hx=False, grads="out"),
    Case(3, 7, 8, 1, batch_first=True, grads="state"),
    Case(17, 33, 1, 5, hx=False),
    Case(17, 33, 8, 5, batch_first=True, grads="h"),
    Case(65, 17, 3, 5, bias=False, batch_first=True),
    Case(65, 17, 8, 1, hx=False, grads="c"),
    Case(33, 65, 3, 5),
    Case(33, 65, 1, 1, bias=False, batch_first=True, hx=False),
    Case(3, 7, None, 5),
    Case(17, 33, None, 1, bias=False, hx=False, grads="out"),
    Case(300, 70, 7, 9, batch_first=True),  # input_size > the GEMM's K block, T*B > its M block
    Case(260, 129, 5, 11, bias=False, grads="h"),
    Case(130, 257, 3, 5),
    Case(130, 257, 8, 1, bias=False, batch_first=True, hx=False, grads="h"),
    # Batches whose last block of micro-kernel rows would hold 1 or 2 rows run in blocks of
    # near-equal size instead (AVX-512's 6 rows: 7 as 4 + 3, 13 as 5 + 4 + 4; 4 rows, scalar and
    # AVX2's GRU: 13 as 4 + 3 + 3 + 3), or, on AVX2 with 4-vector panels, give their tail to a
    # first block of 4 or 5 rows (7 as 4 + 3, 13 as 4 + 3 + 3 + 3; 8 as 5 + 3 above).
    Case(9, 20, 7, 4),
    Case(9, 40, 13, 3, hx=False, grads="h"),
    # AVX2 runs a step at B=4 or 5 as one block of rows, each 4-vector panel in two halves that
    # take turns every 16 values of k (45 = 16 + 16 + 13), a narrower one in one pass, or vector
    # by vector (H=52: the backward step's last panel has 3 vectors).
    Case(21, 45, 4, 3, batch_first=True),
    Case(9, 52, 5, 3, bias=False),
]


def run_case(kind, case, dtype, rng, seed=1):
    unbatched = case.B is None
    B = 1 if unbatched else case.B
    layer = make_layer(
        kind, case.IN, case.H, dtype, seed=seed, bias=case.bias, batch_first=case.batch_first
    )
    x = rng.standard_normal(x_shape(case.T, B, case.IN, case.batch_first, unbatched)).astype(dtype)
    hx = make_hx(kind, rng, B, case.H, dtype, unbatched) if case.hx else None
    out_shape = x.shape[:-1] + (case.H,)
    grad_out = None if case.grads == "state" else rng.standard_normal(out_shape).astype(dtype)
    if case.grads == "out":
        grad_state = None
    else:
        which = case.grads if case.grads in ("h", "c") else "both"
        grad_state = make_grad_state(kind, rng, B, case.H, dtype, unbatched, which)
    got = run_layer(layer, kind, x, hx, grad_out, grad_state)
    ref = run_reference(
        kind,
        layer.state_dict(),
        x,
        hx,
        grad_out,
        grad_state,
        batch_first=case.batch_first,
        unbatched=unbatched,
    )
    return got, ref, x


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(isa, kind, dtype, case, rng):
    got, ref, x = run_case(kind, case, dtype, rng)
    assert got["out"].shape == x.shape[:-1] + (case.H,)
    assert got["dx"].shape == x.shape
    compare(got, ref, dtype)


# ----------------------------------------------------------------- hx / batch 0 / accumulation


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_hx_none_equals_zeros(kind, dtype, unbatched, rng):
    IN, H, B, T = 5, 9, 3, 4
    x = rng.standard_normal(x_shape(T, B, IN, unbatched=unbatched)).astype(dtype)
    grad_out = rng.standard_normal(x.shape[:-1] + (H,)).astype(dtype)
    zeros = np.zeros(state_shape(B, H, unbatched), dtype)
    hx0 = (zeros, zeros.copy()) if kind == "lstm" else zeros
    a = run_layer(make_layer(kind, IN, H, dtype, seed=3), kind, x, None, grad_out)
    b = run_layer(make_layer(kind, IN, H, dtype, seed=3), kind, x, hx0, grad_out)
    for name in a:
        if name == "grads":
            for k in a["grads"]:
                assert rel_err(a["grads"][k], b["grads"][k]) <= tol(dtype, "fwd"), k
        else:
            assert a[name] is not None, name
            assert a[name].shape == b[name].shape, name
            assert rel_err(a[name], b[name]) <= tol(dtype, "fwd"), name


@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_zero(kind, with_hx, batch_first, rng):
    IN, H, T = 4, 6, 3
    dtype = np.float32
    layer = make_layer(kind, IN, H, dtype, batch_first=batch_first)
    # Put something into layer.grads first: batch 0 must add nothing to it.
    x1 = rng.standard_normal(x_shape(T, 2, IN, batch_first)).astype(dtype)
    run_layer(layer, kind, x1, None, rng.standard_normal(x1.shape[:-1] + (H,)).astype(dtype))
    before = {k: np.array(v) for k, v in layer.grads.items()}

    x = np.zeros(x_shape(T, 0, IN, batch_first), dtype)
    hx = make_hx(kind, rng, 0, H, dtype) if with_hx else None
    grad_out = np.zeros(x.shape[:-1] + (H,), dtype)
    got = run_layer(layer, kind, x, hx, grad_out, None)
    assert got["out"].shape == x.shape[:-1] + (H,)
    assert got["h_n"].shape == (1, 0, H)
    assert got["dx"].shape == x.shape
    assert got["dh0"].shape == (1, 0, H)
    if kind == "lstm":
        assert got["c_n"].shape == (1, 0, H)
        assert got["dc0"].shape == (1, 0, H)
    for k, v in before.items():
        np.testing.assert_array_equal(layer.grads[k], v, err_msg=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_grads_accumulate_and_zero_grad(kind, dtype, rng):
    IN, H, B, T = 5, 11, 3, 4
    layer = make_layer(kind, IN, H, dtype, seed=7)
    sd = layer.state_dict()
    assert list(layer.grads) == list(sd)
    for k, v in layer.grads.items():
        assert v.shape == sd[k].shape and v.dtype == np.dtype(dtype), k
        assert not np.any(v), f"{k} not zero initially"

    refs = []
    for _ in range(2):
        x = rng.standard_normal((T, B, IN)).astype(dtype)
        hx = make_hx(kind, rng, B, H, dtype)
        gout = rng.standard_normal((T, B, H)).astype(dtype)
        gstate = make_grad_state(kind, rng, B, H, dtype)
        run_layer(layer, kind, x, hx, gout, gstate)
        refs.append(run_reference(kind, sd, x, hx, gout, gstate)["grads"])
    for k in sd:
        assert_close(layer.grads[k], refs[0][k] + refs[1][k], dtype, "grad", k)

    held = dict(layer.grads)  # as an optimizer may hold them
    layer.zero_grad()
    assert list(layer.grads) == list(sd)
    for k, v in layer.grads.items():
        assert v.shape == sd[k].shape
        assert v is held[k], f"{k} not zeroed in place"
        assert not np.any(v), f"{k} not zeroed"

    x = rng.standard_normal((T, B, IN)).astype(dtype)
    gout = rng.standard_normal((T, B, H)).astype(dtype)
    run_layer(layer, kind, x, None, gout)
    ref = run_reference(kind, sd, x, None, gout)["grads"]
    for k in sd:
        assert_close(layer.grads[k], ref[k], dtype, "grad", k)


# ----------------------------------------------------------------- train / eval


@pytest.mark.parametrize("kind", KINDS)
def test_train_eval_modes(kind, rng):
    layer = make_layer(kind, 3, 4)
    assert layer.training is True
    assert layer.eval() is layer
    assert layer.training is False
    assert layer.train() is layer
    assert layer.training is True
    assert layer.train(False) is layer
    assert layer.training is False
    assert layer.train(True) is layer
    assert layer.training is True


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_packs_the_forward_alone(kind, rng):
    """Eval mode packs no backward copies of the weights; training mode adds them, once."""
    layer = make_layer(kind, 3, 4)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    expected = layer.eval()(x)[0]
    inference_pack = layer._packed["l0"]
    assert not inference_pack.trainable
    out = layer.train()(x)[0]
    assert layer._packed["l0"].trainable
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    layer.backward(np.ones_like(out))
    training_pack = layer._packed["l0"]
    layer.eval()(x)
    assert layer._packed["l0"] is training_pack  # kept: it serves both modes

    cell_class = {"lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell}.get(kind, fastrnn.RNNCell)
    cell = cell_class(3, 4, seed=0).eval()
    cell(x[0])
    assert not cell._packed[""].trainable
    cell.train()
    h = cell(x[0])
    assert cell._packed[""].trainable
    cell.backward(*(np.ones_like(v) for v in (h if isinstance(h, tuple) else (h,))))


@pytest.mark.parametrize("kind", KINDS)
def test_backward_requires_training_forward(kind, rng):
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    gout = np.ones((3, 2, 4), np.float32)

    fresh = make_layer(kind, 3, 4)
    with pytest.raises(RuntimeError):
        fresh.backward(gout)

    evaluated = make_layer(kind, 3, 4).eval()
    evaluated(x)
    with pytest.raises(RuntimeError):
        evaluated.backward(gout)
    for v in evaluated.grads.values():
        assert not np.any(v)

    layer = make_layer(kind, 3, 4)
    layer(x)
    layer.backward(gout)
    grads = {k: np.array(v) for k, v in layer.grads.items()}
    with pytest.raises(RuntimeError):
        layer.backward(gout)
    for k, v in grads.items():
        np.testing.assert_array_equal(layer.grads[k], v, err_msg=k)
    # A new training forward makes backward possible again.
    layer(x)
    layer.backward(gout)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_matches_reference(kind, dtype, rng):
    layer = make_layer(kind, 6, 10, dtype).eval()
    x = rng.standard_normal((4, 3, 6)).astype(dtype)
    hx = make_hx(kind, rng, 3, 10, dtype)
    got = run_layer(layer, kind, x, hx, backward=False)
    compare(got, run_reference(kind, layer.state_dict(), x, hx, backward=False), dtype)


# (T, B, input, hidden): the GEMM's blocks of K (input 1100; 1200 rows for the weight gradients)
# and of rows (200 rows, 10 panels), the step's row blocks prefetching the next panel (batch 64),
# and W_hh past a core's L2 (4 MiB at hidden 520): a thread's share of half its L2 or more runs
# its panels in alternating order step by step (batch 2; so does one of 128 KiB or less), and it
# is split by hidden units at batch 64 on two threads and by batch at 130.
LARGE_SHAPES = [
    (4, 2, 7, 520),
    (3, 2, 1100, 40),
    (30, 40, 20, 24),
    (5, 40, 300, 160),
    (3, 64, 9, 520),
    (2, 130, 9, 520),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_large_shapes_match_reference(isa, shape, kind, dtype, threads, rng, restore_threads):
    T, B, IN, H = shape
    layer = make_layer(kind, IN, H, dtype)
    x = rng.standard_normal((T, B, IN)).astype(dtype)
    hx = make_hx(kind, rng, B, H, dtype)
    grad_out = rng.standard_normal((T, B, H)).astype(dtype)
    fastrnn.set_num_threads(threads)
    got = run_layer(layer, kind, x, hx, grad_out)
    inference = run_layer(layer.eval(), kind, x, hx, backward=False)
    ref = run_reference(kind, layer.state_dict(), x, hx, grad_out)
    compare(got, ref, dtype)
    compare(inference, run_reference(kind, layer.state_dict(), x, hx, backward=False), dtype)


# ----------------------------------------------------------------- state_dict / parameters


def expected_param_shapes(kind, IN, H, bias=True):
    G = gate_count(kind)
    shapes = {"weight_ih_l0": (G * H, IN), "weight_hh_l0": (G * H, H)}
    if bias:
        shapes.update(bias_ih_l0=(G * H,), bias_hh_l0=(G * H,))
    return shapes


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_names_shapes_order(kind, dtype, bias):
    IN, H = 5, 7
    layer = make_layer(kind, IN, H, dtype, bias=bias)
    sd = layer.state_dict()
    shapes = expected_param_shapes(kind, IN, H, bias)
    assert list(sd) == list(shapes)
    for k, shape in shapes.items():
        assert sd[k].shape == shape, k
        assert sd[k].dtype == np.dtype(dtype), k
        np.testing.assert_array_equal(sd[k], getattr(layer, k), err_msg=k)
        assert getattr(layer, k).shape == shape
    if not bias:
        assert getattr(layer, "bias_ih_l0", None) is None
        assert getattr(layer, "bias_hh_l0", None) is None
    # state_dict returns copies: changing them leaves the layer alone.
    before = {k: np.array(getattr(layer, k)) for k in shapes}
    for v in sd.values():
        v[...] = 42
    for k in shapes:
        np.testing.assert_array_equal(getattr(layer, k), before[k], err_msg=k)
        np.testing.assert_array_equal(layer.state_dict()[k], before[k], err_msg=k)


@pytest.mark.parametrize("as_lists", [False, True], ids=["arrays", "lists"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_round_trip(kind, dtype, as_lists, rng):
    IN, H = 4, 6
    src = make_layer(kind, IN, H, dtype, seed=1)
    dst = make_layer(kind, IN, H, dtype, seed=2)
    sd = src.state_dict()
    assert any(not np.array_equal(sd[k], v) for k, v in dst.state_dict().items())
    dst.load_state_dict({k: v.tolist() for k, v in sd.items()} if as_lists else sd)
    for k, v in dst.state_dict().items():
        assert v.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    x = rng.standard_normal((3, 2, IN)).astype(dtype)
    a = run_layer(src.eval(), kind, x, backward=False)
    b = run_layer(dst.eval(), kind, x, backward=False)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_casts_to_layer_dtype(kind, rng):
    layer = make_layer(kind, 3, 5, np.float32)
    sd64 = {k: rng.uniform(-0.3, 0.3, v.shape) for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd64)
    for k, v in layer.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, sd64[k].astype(np.float32), err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_errors_leave_layer_unchanged(kind, rng):
    IN, H = 4, 6
    layer = make_layer(kind, IN, H)
    before = layer.state_dict()
    good = {k: rng.uniform(-1, 1, v.shape).astype(np.float32) for k, v in before.items()}

    def assert_unchanged():
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)

    missing = dict(good)
    del missing["weight_hh_l0"]
    with pytest.raises(KeyError, match="weight_hh_l0"):
        layer.load_state_dict(missing)
    assert_unchanged()

    missing_bias = dict(good)
    del missing_bias["bias_hh_l0"]
    with pytest.raises(KeyError, match="bias_hh_l0"):
        layer.load_state_dict(missing_bias)
    assert_unchanged()

    unexpected = dict(good, weight_ih_l1=good["weight_ih_l0"])
    with pytest.raises(KeyError, match="weight_ih_l1"):
        layer.load_state_dict(unexpected)
    assert_unchanged()

    # The wrong-shaped entry comes last so that an implementation updating in place would
    # already have changed the earlier ones.
    wrong_shape = dict(good)
    rows = gate_count(kind) * H
    wrong_shape["bias_hh_l0"] = np.zeros(rows + 1, np.float32)
    with pytest.raises(ValueError, match="bias_hh_l0") as info:
        layer.load_state_dict(wrong_shape)
    assert str(rows) in str(info.value) and str(rows + 1) in str(info.value), (
        "expected and got shape"
    )
    assert_unchanged()

    wrong_shape = dict(good)
    wrong_shape["weight_hh_l0"] = np.zeros((H, H + 1) if kind != "lstm" else (H, 4 * H))
    with pytest.raises(ValueError, match="weight_hh_l0"):
        layer.load_state_dict(wrong_shape)
    assert_unchanged()


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_dict_nobias_rejects_bias_keys(kind):
    layer = make_layer(kind, 3, 4, bias=False)
    sd = make_layer(kind, 3, 4, bias=True).state_dict()
    with pytest.raises(KeyError, match="bias_ih_l0"):
        layer.load_state_dict(sd)


@pytest.mark.parametrize("name", PARAM_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_read_only(kind, name):
    layer = make_layer(kind, 3, 4)
    before = np.array(getattr(layer, name))
    with pytest.raises(ValueError):
        getattr(layer, name)[0] = 1.0
    with pytest.raises(ValueError):
        getattr(layer, name)[...] += 1.0
    np.testing.assert_array_equal(getattr(layer, name), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", PARAM_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_assigning_parameter_takes_effect(kind, name, dtype, rng):
    IN, H = 5, 8
    layer = make_layer(kind, IN, H, dtype)
    x = rng.standard_normal((3, 2, IN)).astype(dtype)
    gout = rng.standard_normal((3, 2, H)).astype(dtype)
    run_layer(layer, kind, x, None, gout)  # forward/backward before the change: caches, packing
    layer.zero_grad()

    new = rng.uniform(-0.5, 0.5, getattr(layer, name).shape).astype(dtype)
    setattr(layer, name, new)
    np.testing.assert_array_equal(getattr(layer, name), new)
    np.testing.assert_array_equal(layer.state_dict()[name], new)
    got = run_layer(layer, kind, x, None, gout)
    compare(got, run_reference(kind, layer.state_dict(), x, None, gout), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_assigned_parameter_is_read_only(kind, rng):
    layer = make_layer(kind, 3, 4)
    layer.weight_hh_l0 = rng.uniform(-0.5, 0.5, layer.weight_hh_l0.shape).astype(np.float32)
    with pytest.raises(ValueError):
        layer.weight_hh_l0[0, 0] = 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_assigning_wrong_shape_is_an_error(kind, rng):
    layer = make_layer(kind, 3, 4)
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)
    with pytest.raises(ValueError):
        layer.weight_hh_l0 = np.zeros((5, 5), np.float32)
        layer(x)  # an error either at assignment or at the next call, never a crash


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H", [1, 16, 100])
def test_init_range_and_seed(kind, dtype, H):
    IN = 7
    bound = 1.0 / np.sqrt(H)
    a = make_layer(kind, IN, H, dtype, seed=123)
    b = make_layer(kind, IN, H, dtype, seed=123)
    c = make_layer(kind, IN, H, dtype, seed=124)
    d = make_layer(kind, IN, H, dtype, seed=np.random.default_rng(5))
    e = make_layer(kind, IN, H, dtype, seed=np.random.default_rng(5))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k, v in sa.items():
        assert np.all(np.abs(v) <= bound), k
        np.testing.assert_array_equal(v, sb[k], err_msg=k)
        np.testing.assert_array_equal(d.state_dict()[k], e.state_dict()[k], err_msg=k)
    assert any(not np.array_equal(v, sc[k]) for k, v in sa.items())
    allw = np.concatenate([v.ravel() for v in sa.values()])
    if allw.size >= 100:  # spread over the range, not a constant
        assert allw.max() > 0.5 * bound and allw.min() < -0.5 * bound
        assert len(np.unique(allw)) > 0.9 * allw.size


def test_seed_none_is_random():
    a, b = fastrnn.LSTM(5, 6, seed=None), fastrnn.LSTM(5, 6)
    assert not np.array_equal(a.weight_ih_l0, b.weight_ih_l0)


# ----------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_long_sequence(isa, kind, dtype, rng):
    T, B, IN, H = 2000, 2, 16, 32
    layer = make_layer(kind, IN, H, dtype, seed=11)
    x = rng.standard_normal((T, B, IN)).astype(dtype)
    hx = make_hx(kind, rng, B, H, dtype)
    gout = rng.standard_normal((T, B, H)).astype(dtype)
    got = run_layer(layer, kind, x, hx, gout)
    for name, v in got.items():
        for a in v.values() if name == "grads" else [v]:
            assert np.all(np.isfinite(a)), name
    ref = run_reference(kind, layer.state_dict(), x, hx, gout)
    fwd_tol = 1e-4 if dtype == np.float32 else tol(dtype, "fwd")
    for name in ("out", "h_n", "c_n"):
        if name in ref:
            assert rel_err(got[name], ref[name]) <= fwd_tol, name
    compare(
        {k: got[k] for k in ("dx", "dh0", "dc0", "grads") if k in got},
        {k: ref[k] for k in ("dx", "dh0", "dc0", "grads") if k in ref},
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_long_sequence_eval(isa, kind, dtype, rng):
    """Inference may project the inputs chunk by chunk: more than 2**20 gate values in total."""
    T, B, IN, H = 1100, 8, 9, 33
    layer = make_layer(kind, IN, H, dtype, seed=12)
    x = rng.standard_normal((T, B, IN)).astype(dtype)
    hx = make_hx(kind, rng, B, H, dtype)
    trained = run_layer(layer, kind, x, hx, backward=False)
    evaluated = run_layer(layer.eval(), kind, x, hx, backward=False)
    ref = run_reference(kind, layer.state_dict(), x, hx, backward=False)
    fwd_tol = 1e-4 if dtype == np.float32 else tol(dtype, "fwd")
    for name in ref:
        assert rel_err(evaluated[name], ref[name]) <= fwd_tol, name
        assert rel_err(evaluated[name], trained[name]) <= tol(dtype, "fwd"), name


# (T, input, hidden) at batch 1, the streaming shapes: odd sizes, an input larger than the hidden
# state, and a layer large enough to split its hidden units over two threads.
BATCH_ONE_SHAPES = [(17, 20, 20), (40, 9, 33), (50, 200, 16), (33, 128, 128), (16, 8, 8)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", BATCH_ONE_SHAPES, ids=lambda s: "T{}I{}H{}".format(*s))
def test_batch_one_inference_matches_training_forward(
    isa, shape, kind, dtype, threads, rng, restore_threads
):
    """Inference (no saved state, the reverse direction read in place) equals the training
    forward in both directions, with h0 given and zero."""
    T, IN, H = shape
    fastrnn.set_num_threads(threads)
    layer = make_layer(kind, IN, H, dtype, seed=3, bidirectional=True)
    x = rng.standard_normal((T, 1, IN)).astype(dtype)
    h0 = rng.standard_normal((2, 1, H)).astype(dtype)
    for hx in (None, (h0, 0.5 * h0) if kind == "lstm" else h0):
        trained = layer.train()(x, hx)
        evaluated = layer.eval()(x, hx)
        for name, got, want in zip(("out", "h_n"), evaluated, trained):
            if isinstance(got, tuple):  # the LSTM's (h_n, c_n)
                for part, g, w in zip(("h_n", "c_n"), got, want):
                    assert_close(g, w, dtype, "fwd", part)
            else:
                assert_close(got, want, dtype, "fwd", name)
    # and the reference, for one direction
    single = make_layer(kind, IN, H, dtype, seed=3).eval()
    hx = make_hx(kind, rng, 1, H, dtype)
    got = run_layer(single, kind, x, hx, backward=False)
    compare(got, run_reference(kind, single.state_dict(), x, hx, backward=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_inputs_saturate(isa, kind, dtype, rng):
    T, B, IN, H = 4, 3, 5, 7
    layer = make_layer(kind, IN, H, dtype, seed=5)
    x = (np.where(rng.random((T, B, IN)) < 0.5, -1.0, 1.0) * 1e30).astype(dtype)
    gout = rng.standard_normal((T, B, H)).astype(dtype)
    got = run_layer(layer, kind, x, None, gout)
    for name in ("out", "h_n", "c_n", "dx", "dh0", "dc0"):
        if name in got:
            assert np.all(np.isfinite(got[name])), name
    if kind != "rnn_relu":
        assert np.all(np.abs(got["out"]) <= 1) and np.all(np.abs(got["h_n"]) <= 1)
    if kind == "lstm":
        assert np.all(np.abs(got["c_n"]) <= T)
    with np.errstate(all="ignore"):
        ref = run_reference(kind, layer.state_dict(), x, None, gout, backward=False)
    if all(np.all(np.isfinite(v)) for v in ref.values()):
        compare(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_propagates_only_in_its_batch_row(isa, kind, dtype, rng):
    T, B, IN, H = 5, 3, 17, 19  # sizes not multiples of the SIMD width: body and tail
    t0, bad = 2, 1
    layer = make_layer(kind, IN, H, dtype, seed=9)
    x = rng.standard_normal((T, B, IN)).astype(dtype)
    x[t0, bad, IN // 2] = np.nan
    gout = rng.standard_normal((T, B, H)).astype(dtype)
    got = run_layer(layer, kind, x, None, gout)
    good = [b for b in range(B) if b != bad]
    out = got["out"]
    assert np.all(np.isfinite(out[:t0])), "outputs before the NaN"
    assert np.all(np.isfinite(out[:, good])), "other batch rows"
    assert np.all(np.isnan(out[t0:, bad])), "NaN must reach every output of its row from t0 on"
    for name in ("h_n", "c_n"):
        if name in got:
            assert np.all(np.isnan(got[name][0, bad])), name
            assert np.all(np.isfinite(got[name][0, good])), name
    for name in ("dx", "dh0", "dc0"):
        if name in got:
            assert np.all(np.isfinite(got[name][..., good, :])), name


# ----------------------------------------------------------------- memory layout / aliasing


@pytest.mark.parametrize(
    "unbatched,batch_first",
    [(False, False), (False, True), (True, False)],
    ids=["time_major", "batch_first", "unbatched"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_inputs_never_modified(kind, unbatched, batch_first, rng):
    IN, H, B, T = 5, 9, 3, 4
    dtype = np.float32
    layer = make_layer(kind, IN, H, dtype, batch_first=batch_first)
    x = rng.standard_normal(x_shape(T, B, IN, batch_first, unbatched)).astype(dtype)
    hx = make_hx(kind, rng, B, H, dtype, unbatched)
    gout = rng.standard_normal(x.shape[:-1] + (H,)).astype(dtype)
    gstate = make_grad_state(kind, rng, B, H, dtype, unbatched)
    saved = snapshot((x, hx, gout, gstate))
    params = layer.state_dict()

    first = run_layer(layer, kind, x, hx, gout, gstate)
    assert_same((x, hx, gout, gstate), saved)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    first_copy = {k: snapshot(v) for k, v in first.items() if k != "grads"}

    # Returned arrays are not views of internal buffers that a later call overwrites.
    x2 = rng.standard_normal(x.shape).astype(dtype)
    run_layer(layer, kind, x2, None, gout * 2, None)
    for k, v in first_copy.items():
        np.testing.assert_array_equal(first[k], v, err_msg=k)
    for k in ("out", "dx"):
        assert not np.shares_memory(first[k], x) and not np.shares_memory(first[k], gout)


def _layout(a, variant):
    """``a`` (C-contiguous) re-laid out as ``variant``; values are unchanged."""
    if variant == "strided":
        big = np.zeros(tuple(2 * n + 1 for n in a.shape), a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if variant == "fortran":
        return np.asfortranarray(a)
    if variant == "negstride":
        return np.ascontiguousarray(a[::-1, ..., ::-1])[::-1, ..., ::-1]
    if variant == "readonly":
        r = a.copy()
        r.setflags(write=False)
        return r
    if variant == "misaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)
        m = raw[1:].view(a.dtype).reshape(a.shape)  # one byte off the allocation's alignment
        m[...] = a
        return m
    raise AssertionError(variant)


def _relayout(obj, variant):
    if obj is None:
        return None
    if isinstance(obj, tuple):
        return tuple(_relayout(o, variant) for o in obj)
    return _layout(obj, variant)


@pytest.mark.parametrize("variant", ["strided", "fortran", "negstride", "readonly", "misaligned"])
@pytest.mark.parametrize("kind", KINDS)
def test_input_layouts(isa, kind, variant, rng):
    IN, H, B, T = 7, 13, 3, 5
    dtype = np.float32
    x = rng.standard_normal((T, B, IN)).astype(dtype)
    hx = make_hx(kind, rng, B, H, dtype)
    gout = rng.standard_normal((T, B, H)).astype(dtype)
    gstate = make_grad_state(kind, rng, B, H, dtype)

    args = _relayout((x, hx, gout, gstate), variant)
    if variant == "fortran":
        assert not args[0].flags.c_contiguous and args[0].flags.f_contiguous
    elif variant == "negstride":
        assert args[0].strides[0] < 0
    elif variant == "misaligned":
        assert not args[0].flags.aligned
    elif variant == "strided":
        assert not args[0].flags.c_contiguous and not args[0].flags.f_contiguous
    saved = snapshot(args)

    expected = run_layer(make_layer(kind, IN, H, dtype, seed=4), kind, x, hx, gout, gstate)
    got = run_layer(make_layer(kind, IN, H, dtype, seed=4), kind, *args)
    assert_same(args, saved)
    for name in expected:
        if name == "grads":
            for k in expected["grads"]:
                assert rel_err(got["grads"][k], expected["grads"][k]) <= tol(dtype, "fwd"), k
        else:
            assert got[name].shape == expected[name].shape, name
            assert rel_err(got[name], expected[name]) <= tol(dtype, "fwd"), name


@pytest.mark.parametrize("kind", KINDS)
def test_input_layouts_batch_first_negative_stride(kind, rng):
    """x[::-1] on the batch axis with batch_first=True (reversed batch order)."""
    IN, H, B, T = 6, 10, 4, 3
    layer = make_layer(kind, IN, H, np.float32, batch_first=True).eval()
    x = rng.standard_normal((B, T, IN)).astype(np.float32)
    got = run_layer(layer, kind, x[::-1], backward=False)
    expected = run_layer(layer, kind, np.ascontiguousarray(x[::-1]), backward=False)
    for name in expected:
        assert rel_err(got[name], expected[name]) <= tol(np.float32, "fwd"), name


# ----------------------------------------------------------------- threads


N_THREADS, N_CALLS = 4, 10


@pytest.mark.parametrize("mode", ["own_layer_train", "shared_layer_eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_threads_match_serial(isa, kind, mode, rng):
    IN, H, B, T = 24, 40, 5, 12
    dtype = np.float32
    inputs = []
    for _ in range(N_THREADS * N_CALLS):
        x = rng.standard_normal((T, B, IN)).astype(dtype)
        hx = make_hx(kind, rng, B, H, dtype)
        gout = rng.standard_normal((T, B, H)).astype(dtype)
        inputs.append((x, hx, gout))
    backward = mode == "own_layer_train"

    def calls(layer, indices):
        results = {}
        for i in indices:
            x, hx, gout = inputs[i]
            res = run_layer(layer, kind, x, hx, gout, None, backward=backward)
            res.pop("grads", None)
            results[i] = res
        return results

    serial_layer = make_layer(kind, IN, H, dtype, seed=21)
    if not backward:
        serial_layer.eval()
    serial = calls(serial_layer, range(len(inputs)))

    shared = make_layer(kind, IN, H, dtype, seed=21).eval()
    barrier = threading.Barrier(N_THREADS)

    def worker(t):
        layer = make_layer(kind, IN, H, dtype, seed=21) if backward else shared
        barrier.wait()
        res = calls(layer, range(t, len(inputs), N_THREADS))
        return res, (layer.grads if backward else None)

    with ThreadPoolExecutor(N_THREADS) as pool:
        outcomes = list(pool.map(worker, range(N_THREADS)))

    for res, _ in outcomes:
        for i, r in res.items():
            for name, v in r.items():
                assert rel_err(v, serial[i][name]) <= tol(dtype, "fwd"), (i, name)
    if backward:
        total = {k: sum(g[k] for _, g in outcomes) for k in serial_layer.grads}
        for k, v in total.items():
            assert rel_err(v, serial_layer.grads[k]) <= tol(dtype, "grad"), k


def test_denormal_mode_restored_after_calls(rng):
    """Kernels may flush denormals internally, but the caller's FP mode must be restored."""
    layer = fastrnn.LSTM(4, 5)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    layer(x)
    layer.backward(np.ones((3, 2, 5), np.float32))
    tiny = np.array([np.finfo(np.float32).tiny], np.float32)
    assert (tiny / np.float32(4))[0] != 0, "FTZ left enabled after a fastrnn call"
    denormal = np.array([1e-40], np.float32)
    assert (denormal * np.float32(2))[0] != 0, "DAZ left enabled after a fastrnn call"


@pytest.mark.parametrize("kind", KINDS)
def test_copy_and_pickle(kind, rng):
    import copy
    import pickle

    layer = make_layer(kind, 5, 9, np.float64, seed=3)
    x = rng.standard_normal((4, 2, 5))
    expected, _ = layer(x)  # packs, and keeps a training state
    for clone in (copy.copy(layer), copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        out, _ = clone(x)
        np.testing.assert_array_equal(out, expected)
        assert not clone.weight_hh_l0.flags.writeable
        clone.backward(np.ones_like(out))  # the clone's own forward pairs with its backward
        clone.weight_ih_l0 = np.zeros_like(clone.weight_ih_l0)  # independent of the original
    assert np.any(layer.weight_ih_l0 != 0)
    np.testing.assert_array_equal(layer(x)[0], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_lists_convert_to_the_layer_dtype(kind):
    layer = make_layer(kind, 3, 4, np.float32, seed=0).eval()
    as_floats = layer([[[1.0, 2.5, -3.0]]])[0]
    as_ints = layer([[[1, 2, 3]]])[0]
    assert as_floats.dtype == as_ints.dtype == np.float32
    np.testing.assert_array_equal(layer(np.array([[[1, 2, 3]]], np.float32))[0], as_ints)


# --------------------------------------------------------------------------- skipping dx


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [None, [5, 3, 2]], ids=["equal", "lengths"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_backward_without_grad_input_gives_the_same_other_gradients(
    isa, cell, lengths, reverse, dtype
):
    """grad_input=False skips dx (and its GEMM): dh0, dc0 and every parameter gradient are
    those of the full backward."""
    from fastrnn import _core

    rng = np.random.default_rng(3)
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    steps, batch, inputs, hidden = 5, 3, 7, 130
    w = [
        rng.standard_normal(s).astype(dtype) * 0.2
        for s in [
            (gates * hidden, inputs),
            (gates * hidden, hidden),
            (gates * hidden,),
            (gates * hidden,),
        ]
    ]
    layer = _core.pack(cell, *w)
    if lengths is None:
        x = rng.standard_normal((steps, batch, inputs)).astype(dtype)
        batch_sizes, out_shape = None, (steps, batch, hidden)
    else:
        batch_sizes = np.array([sum(n > t for n in lengths) for t in range(steps)], np.int64)
        x = rng.standard_normal((int(batch_sizes.sum()), inputs)).astype(dtype)
        out_shape = (x.shape[0], hidden)
    grad_out = rng.standard_normal(out_shape).astype(dtype)
    results = []
    for grad_input in (True, False):
        state = _core.forward(layer, x, None, None, True, batch_sizes, reverse)[3]
        grads = [np.zeros_like(a) for a in w]
        dx, dh0, dc0 = _core.backward(state, grad_out, None, None, *grads, grad_input=grad_input)
        results.append((dx, dh0, dc0, grads))
    assert results[0][0] is not None and results[1][0] is None
    for name, a, b in [
        ("dh0", results[0][1], results[1][1]),
        ("dc0", results[0][2], results[1][2]),
    ]:
        if a is not None:
            assert_close(b, a, dtype, "grad", name)
    for name, a, b in zip(PARAM_NAMES, results[0][3], results[1][3]):
        assert_close(b, a, dtype, "grad", name)


# --------------------------------------------------------------------------- reverse in place


@pytest.mark.parametrize("batch", [3, 64], ids=["hidden-split", "batch-split"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_reverse_inference_equals_forward_of_flipped_sequences(
    isa, cell, batch, rng, restore_threads
):
    """An inference reverse call on sequences of one length reads x and writes out in place, step
    t at input step T - 1 - t, chunk by chunk: the forward call's results on the flipped
    sequences, flipped back. Two threads, split by hidden units and by batch rows, states given
    and inputs projected in several chunks (over 2**20 gate values)."""
    from fastrnn import _core

    fastrnn.set_num_threads(2)
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    steps, inputs, hidden = 4200 // batch, 7, 130
    # Scaled for a contracting recurrence: the two calls' input projections may round
    # differently (other chunk and row-block boundaries), and a chaotic one would amplify that.
    w_ih, w_hh, b_ih, b_hh = [
        (rng.standard_normal(s) * 0.5 / np.sqrt(hidden)).astype(np.float32)
        for s in [(gates * hidden, inputs), (gates * hidden, hidden)] + [(gates * hidden,)] * 2
    ]
    layer = _core.pack(cell, w_ih, w_hh, b_ih, b_hh)
    x = rng.standard_normal((steps, batch, inputs)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    c0 = rng.standard_normal((batch, hidden)).astype(np.float32) if cell == "lstm" else None
    out, h_n, c_n, _ = _core.forward(layer, x, h0, c0, False, None, True)
    flipped_out, flipped_h_n, flipped_c_n, _ = _core.forward(
        layer, np.ascontiguousarray(x[::-1]), h0, c0, False, None, False
    )
    assert_close(out, flipped_out[::-1], np.float32, "fwd", "out")
    assert_close(h_n, flipped_h_n, np.float32, "fwd", "h_n")
    if c0 is not None:
        assert_close(c_n, flipped_c_n, np.float32, "fwd", "c_n")


def test_concatenated_forwards_need_the_same_rows_and_dtype(rng):
    """forward_each's concatenate writes the calls' outputs side by side into one array."""
    from fastrnn import _core

    layer = fastrnn.LSTM(3, 4, bidirectional=True, seed=0)
    units = [layer._packed_unit(u, "lstm", False) for u in ("l0", "l0_reverse")]
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    results = _core.forward_each(
        [
            (units[0], x, None, None, False, None, False),
            (units[1], x, None, None, False, None, True),
        ],
        True,
    )
    assert results[0][0] is results[1][0] and results[0][0].shape == (5, 2, 8)
    alone = _core.forward(units[1], x, None, None, False, None, True)[0]
    np.testing.assert_array_equal(results[0][0][..., 4:], alone)
    double = fastrnn.LSTM(3, 4, dtype=np.float64, seed=0)._packed_unit("l0", "lstm", False)
    for unit, rows in ((units[1], x[:4]), (double, x)):
        calls = [
            (units[0], x, None, None, False, None, False),
            (unit, rows, None, None, False, None, True),
        ]
        with pytest.raises(ValueError, match="same dtype and rows"):
            _core.forward_each(calls, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_cell_step_is_a_one_step_forward(isa, kind, dtype, rng):
    """_core.step, a cell's call, gives what a forward of one step gives, and so does the
    backward of what it kept; any batch (0 too), h and c given or None."""
    from fastrnn import _core

    G, IN, H = gate_count(kind), 5, 7
    w = [rng.standard_normal(shape).astype(dtype) for shape in ((G * H, IN), (G * H, H), (G * H,))]
    packed = _core.pack(kind, w[0], w[1], w[2], w[2][::-1].copy())
    for batch, with_state in ((1, True), (3, True), (3, False), (0, True)):
        x = rng.standard_normal((batch, IN)).astype(dtype)
        h = rng.standard_normal((batch, H)).astype(dtype) if with_state else None
        c = rng.standard_normal((batch, H)).astype(dtype) if with_state and kind == "lstm" else None
        h_step, c_step, saved = _core.step(packed, x, h, c, True)
        _, h_n, c_n, state = _core.forward(packed, x[None], h, c, True)
        assert h_step.shape == (batch, H) and h_step.dtype == dtype
        assert_close(h_step, h_n, dtype, "fwd", "h'")
        if kind == "lstm":
            assert_close(c_step, c_n, dtype, "fwd", "c'")
        else:
            assert c_step is None
        grad_h = rng.standard_normal((batch, H)).astype(dtype)
        grad_c = rng.standard_normal((batch, H)).astype(dtype) if kind == "lstm" else None
        results = []
        for kept in (saved, state):
            grads = [np.zeros_like(a) for a in (w[0], w[1], w[2], w[2])]
            results.append((*_core.backward(kept, None, grad_h, grad_c, *grads), *grads))
        for name, from_step, from_forward in zip(
            ("dx", "dh", "dc", "dW_ih", "dW_hh", "db_ih", "db_hh"), *results
        ):
            if from_forward is None:
                assert from_step is None, name
            else:
                assert_close(from_step, from_forward, dtype, "grad", name)
    h_step, c_step, saved = _core.step(packed, x)  # inference: nothing kept
    assert saved is None


def test_cell_step_checks_its_arguments(rng):
    from fastrnn import _core

    w = [rng.standard_normal(shape).astype(np.float32) for shape in ((12, 3), (12, 4))]
    gru = _core.pack("gru", *w)
    x = np.zeros((2, 3), np.float32)
    for bad_x in (np.zeros((2, 4), np.float32), np.zeros((1, 2, 3), np.float32)):
        with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
            _core.step(gru, bad_x)
    with pytest.raises(ValueError, match=r"h must have shape \(2, 4\)"):
        _core.step(gru, x, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="c is only for the LSTM"):
        _core.step(gru, x, None, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="packed with training=True"):
        _core.step(_core.pack("gru", *w, training=False), x, training=True)


def test_calls_repack_for_another_isa(rng):
    """A layer's or cell's packed weights serve the ISA they were packed for: after a switch,
    the next call repacks for the active one (the ISA tests rely on it)."""
    from fastrnn import _core

    previous = fastrnn.active_isa()
    layer, cell = fastrnn.GRU(3, 4, seed=0), fastrnn.GRUCell(3, 4, seed=0)
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)
    expected = layer(x)[0], cell(x[0])
    try:
        for name in fastrnn.available_isas():
            old_packs = layer._packed["l0"], cell._packed[""]
            _core._set_isa(name)
            assert all(p.current == (p.isa == name) for p in old_packs)
            result = layer(x)[0], cell(x[0])
            for packed in (layer._packed["l0"], cell._packed[""]):
                assert packed.isa == name and packed.current
            for got, want in zip(result, expected):
                assert_close(got, want, np.float32, "fwd")
    finally:
        _core._set_isa(previous)


def test_training_forward_needs_a_trainable_pack(rng):
    from fastrnn import _core

    w = [rng.standard_normal(shape).astype(np.float32) for shape in ((16, 3), (16, 4))]
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    inference = _core.pack("lstm", *w, training=False)
    assert not inference.trainable and _core.pack("lstm", *w).trainable
    np.testing.assert_array_equal(
        _core.forward(inference, x)[0], _core.forward(_core.pack("lstm", *w), x)[0]
    )
    with pytest.raises(ValueError, match="packed with training=True"):
        _core.forward(inference, x, training=True)

"""Bad input gives a clear ValueError/TypeError naming the argument, never a crash."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastrnn

KINDS = ["lstm", "rnn_tanh", "rnn_relu"]
IN, H, B, T = 10, 20, 3, 5
F32 = np.float32

# Loose patterns for "the message names the argument".
X = r"\bx\b|\binput\b"
H0 = r"\bh0\b|\bh_0\b|\bhx\b"
C0 = r"\bc0\b|\bc_0\b|\bhx\b"
HX = r"\bhx\b|\bh0\b|tuple"
GRAD_OUT = r"grad_out"
GRAD_H = r"grad_h_n|grad_h|grad_state|\bh_n\b"
GRAD_C = r"grad_c_n|grad_c|grad_state|\bc_n\b"
SHAPE_1_3_20 = r"\(1, 3, 20\)|\[1, 3, 20\]"


def make_layer(kind, dtype=F32, **kwargs):
    if kind == "lstm":
        return fastrnn.LSTM(IN, H, dtype=dtype, seed=0, **kwargs)
    return fastrnn.RNN(IN, H, nonlinearity=kind[4:], dtype=dtype, seed=0, **kwargs)


def good_x(dtype=F32):
    return np.zeros((T, B, IN), dtype)


def states(kind, h_shape=(1, B, H), c_shape=None, h_dtype=F32, c_dtype=F32):
    h0 = np.zeros(h_shape, h_dtype)
    if kind != "lstm":
        return h0
    return (h0, np.zeros(c_shape or h_shape, c_dtype))


def call(layer, x, hx=None):
    return layer(x, hx)


# --------------------------------------------------------------------------- x


@pytest.mark.parametrize("shape", [(IN,), (2, T, B, IN), (1, 1, 1, 1, IN)], ids=["1d", "4d", "5d"])
@pytest.mark.parametrize("kind", KINDS)
def test_x_wrong_ndim(kind, shape):
    with pytest.raises(ValueError, match=X):
        call(make_layer(kind), np.zeros(shape, F32))


@pytest.mark.parametrize(
    "shape", [(T, B, 7), (T, B, IN + 1), (T, 7), (T, B, 0)], ids=["3d", "3d+1", "unbatched", "zero"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_x_wrong_feature_size(kind, shape):
    with pytest.raises(ValueError, match=r"input_size|\bx\b|\binput\b") as info:
        call(make_layer(kind), np.zeros(shape, F32))
    assert str(shape[-1]) in str(info.value)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
@pytest.mark.parametrize("shape", ["batched", "unbatched"])
@pytest.mark.parametrize("kind", KINDS)
def test_sequence_length_zero(kind, shape, batch_first):
    if shape == "unbatched":
        x = np.zeros((0, IN), F32)
    else:
        x = np.zeros((B, 0, IN) if batch_first else (0, B, IN), F32)
    # The shape as passed, not as the layer rearranged it.
    with pytest.raises(ValueError, match=rf"sequence length.*{re.escape(str(x.shape))}"):
        call(make_layer(kind, batch_first=batch_first), x)


@pytest.mark.parametrize("kind", KINDS)
def test_x_whose_copy_does_not_fit_in_memory(kind):
    """A valid view whose contiguous copy would take 4 TiB: MemoryError, as NumPy's own copy."""
    x = np.broadcast_to(np.zeros((1, 1, IN), F32), (1 << 37, 1, IN))
    with pytest.raises(MemoryError):
        call(make_layer(kind).eval(), x)
    cell = fastrnn.LSTMCell(IN, H, seed=0).eval()
    with pytest.raises(MemoryError):
        cell(np.broadcast_to(np.zeros((1, IN), F32), (1 << 37, IN)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "x_dtype,layer_dtype",
    [(np.float64, np.float32), (np.float32, np.float64), (np.float16, np.float32)],
    ids=["f64_into_f32", "f32_into_f64", "f16_into_f32"],
)
def test_x_dtype_mismatch(kind, x_dtype, layer_dtype):
    with pytest.raises(TypeError, match=X) as info:
        call(make_layer(kind, dtype=layer_dtype), np.zeros((T, B, IN), x_dtype))
    assert np.dtype(layer_dtype).name in str(info.value)


BAD_X = {
    "int32": lambda: np.zeros((T, B, IN), np.int32),
    "int64": lambda: np.zeros((T, B, IN), np.int64),
    "bool": lambda: np.zeros((T, B, IN), bool),
    "object": lambda: np.full((T, B, IN), 1.0, dtype=object),
    "object_none": lambda: np.full((T, B, IN), None, dtype=object),
    "str": lambda: np.full((T, B, IN), "a"),
    "bytes": lambda: np.full((T, B, IN), b"a"),
    "complex64": lambda: np.zeros((T, B, IN), np.complex64),
    "complex128": lambda: np.zeros((T, B, IN), np.complex128),
    "structured": lambda: np.zeros((T, B, IN), dtype=[("a", F32)]),
    "datetime": lambda: np.zeros((T, B, IN), "datetime64[s]"),
}


@pytest.mark.parametrize("name", list(BAD_X))
@pytest.mark.parametrize("kind", KINDS)
def test_x_non_float_dtype(kind, name):
    with pytest.raises((TypeError, ValueError), match=X):
        call(make_layer(kind), BAD_X[name]())


@pytest.mark.parametrize(
    "value", [None, "hello", 3.0, object()], ids=["None", "str", "float", "object"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_x_not_an_array(kind, value):
    with pytest.raises((TypeError, ValueError)):
        call(make_layer(kind), value)


# --------------------------------------------------------------------------- h0 / c0


@pytest.mark.parametrize("kind", KINDS)
def test_h0_batch_mismatch(kind):
    hx = states(kind, h_shape=(1, 4, H))
    with pytest.raises(ValueError, match=H0) as info:
        call(make_layer(kind), good_x(), hx)
    assert re.search(SHAPE_1_3_20, str(info.value)), "expected shape not in message"


@pytest.mark.parametrize(
    "h_shape",
    [(1, B, H + 1), (2, B, H), (B, H), (1, 1, B, H), (H,), (0, B, H)],
    ids=["hidden", "layers", "2d", "4d", "1d", "zero_layers"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_h0_wrong_shape(kind, h_shape):
    with pytest.raises(ValueError, match=H0):
        call(make_layer(kind), good_x(), states(kind, h_shape=h_shape, c_shape=(1, B, H)))


@pytest.mark.parametrize(
    "c_shape",
    [(1, B, H + 1), (1, 4, H), (2, B, H), (B, H), (1, 1, B, H)],
    ids=["hidden", "batch", "layers", "2d", "4d"],
)
def test_c0_wrong_shape(c_shape):
    with pytest.raises(ValueError, match=C0):
        call(make_layer("lstm"), good_x(), states("lstm", c_shape=c_shape))


def test_h_and_c_different_first_dim():
    """PyTorch #173946 segfaulted here."""
    hx = (np.zeros((1, B, H), F32), np.zeros((2, B, H), F32))
    with pytest.raises(ValueError, match=C0):
        call(make_layer("lstm"), good_x(), hx)
    hx = (np.zeros((2, B, H), F32), np.zeros((1, B, H), F32))
    with pytest.raises(ValueError, match=H0):
        call(make_layer("lstm"), good_x(), hx)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_x_with_batched_h(kind):
    x = np.zeros((T, IN), F32)
    with pytest.raises(ValueError, match=H0):
        call(make_layer(kind), x, states(kind, h_shape=(1, 1, H)))


@pytest.mark.parametrize("h_shape", [(2, H), (1, H + 1), (H,)], ids=["layers", "hidden", "1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_x_with_wrong_h(kind, h_shape):
    x = np.zeros((T, IN), F32)
    with pytest.raises(ValueError, match=H0):
        call(make_layer(kind), x, states(kind, h_shape=h_shape, c_shape=(1, H)))


def test_unbatched_x_with_batched_c():
    x = np.zeros((T, IN), F32)
    with pytest.raises(ValueError, match=C0):
        call(make_layer("lstm"), x, (np.zeros((1, H), F32), np.zeros((1, 1, H), F32)))


@pytest.mark.parametrize("kind", KINDS)
def test_batched_x_with_unbatched_h(kind):
    with pytest.raises(ValueError, match=H0):
        call(make_layer(kind), good_x(), states(kind, h_shape=(1, H)))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_first_batch_mismatch(kind):
    x = np.zeros((B, T, IN), F32)
    with pytest.raises(ValueError, match=H0):
        call(make_layer(kind, batch_first=True), x, states(kind, h_shape=(1, T, H)))


@pytest.mark.parametrize(
    "dtype", [np.float64, np.int32, np.complex64, object], ids=["f64", "i32", "c64", "obj"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_h0_bad_dtype(kind, dtype):
    with pytest.raises(TypeError, match=H0):
        call(make_layer(kind), good_x(), states(kind, h_dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.int32], ids=["f64", "i32"])
def test_c0_bad_dtype(dtype):
    with pytest.raises(TypeError, match=C0):
        call(make_layer("lstm"), good_x(), states("lstm", c_dtype=dtype))


@pytest.mark.parametrize(
    "hx",
    [
        lambda: np.zeros((1, B, H), F32),
        lambda: (np.zeros((1, B, H), F32),),
        lambda: (np.zeros((1, B, H), F32),) * 3,
        lambda: 1.0,
        lambda: "hx",
    ],
    ids=["array", "1-tuple", "3-tuple", "float", "str"],
)
def test_lstm_hx_not_a_pair(hx):
    with pytest.raises((TypeError, ValueError), match=HX + r"|\bc0\b"):
        call(make_layer("lstm"), good_x(), hx())


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu"])
def test_rnn_hx_tuple(kind):
    hx = (np.zeros((1, B, H), F32), np.zeros((1, B, H), F32))
    with pytest.raises((TypeError, ValueError), match=H0):
        call(make_layer(kind), good_x(), hx)


# --------------------------------------------------------------------------- backward


def forward(layer, x=None):
    """A training-mode forward so that backward is allowed."""
    layer(good_x() if x is None else x)
    return layer


@pytest.mark.parametrize(
    "shape",
    [(T, B, H + 1), (T + 1, B, H), (T, B + 1, H), (T, B * H), (B, T, H)],
    ids=["hidden", "time", "batch", "2d", "swapped"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_wrong_grad_out_shape(kind, shape):
    layer = forward(make_layer(kind))
    with pytest.raises(ValueError, match=GRAD_OUT):
        layer.backward(np.zeros(shape, F32))


@pytest.mark.parametrize("kind", KINDS)
def test_backward_wrong_grad_out_shape_unbatched(kind):
    layer = forward(make_layer(kind), np.zeros((T, IN), F32))
    with pytest.raises(ValueError, match=GRAD_OUT):
        layer.backward(np.zeros((T, 1, H), F32))


@pytest.mark.parametrize(
    "shape",
    [(1, B, H + 1), (1, B + 1, H), (B, H), (2, B, H)],
    ids=["hidden", "batch", "2d", "layers"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_wrong_grad_h_shape(kind, shape):
    layer = forward(make_layer(kind))
    gout = np.zeros((T, B, H), F32)
    gh = np.zeros(shape, F32)
    with pytest.raises(ValueError, match=GRAD_H):
        layer.backward(gout, (gh, None) if kind == "lstm" else gh)


@pytest.mark.parametrize(
    "shape", [(1, B, H + 1), (1, B + 1, H), (B, H)], ids=["hidden", "batch", "2d"]
)
def test_backward_wrong_grad_c_shape(shape):
    layer = forward(make_layer("lstm"))
    with pytest.raises(ValueError, match=GRAD_C):
        layer.backward(np.zeros((T, B, H), F32), (np.zeros((1, B, H), F32), np.zeros(shape, F32)))


@pytest.mark.parametrize(
    "grad_state", [lambda: np.zeros((1, B, H), F32), lambda: (None,)], ids=["array", "1-tuple"]
)
def test_backward_lstm_grad_state_not_a_pair(grad_state):
    layer = forward(make_layer("lstm"))
    with pytest.raises((TypeError, ValueError), match=r"grad_state|tuple"):
        layer.backward(np.zeros((T, B, H), F32), grad_state())


@pytest.mark.parametrize("kind", KINDS)
def test_backward_grad_out_non_float(kind):
    layer = forward(make_layer(kind))
    with pytest.raises((TypeError, ValueError), match=GRAD_OUT):
        layer.backward(np.full((T, B, H), "a"))


@pytest.mark.parametrize("kind", KINDS)
def test_failed_backward_adds_nothing(kind):
    layer = forward(make_layer(kind))
    with pytest.raises(ValueError):
        layer.backward(np.ones((T, B, H + 1), F32))
    for k, v in layer.grads.items():
        assert not np.any(v), k


# --------------------------------------------------------------------------- constructor


CTOR_CASES = [
    ("hidden_size=0", dict(input_size=IN, hidden_size=0), "hidden_size"),
    ("hidden_size=-3", dict(input_size=IN, hidden_size=-3), "hidden_size"),
    ("input_size=-1", dict(input_size=-1, hidden_size=H), "input_size"),
    ("input_size=0", dict(input_size=0, hidden_size=H), "input_size"),
    ("dtype=int32", dict(input_size=IN, hidden_size=H, dtype=np.int32), "dtype"),
    ("dtype=float16", dict(input_size=IN, hidden_size=H, dtype=np.float16), "dtype"),
    ("dtype=complex64", dict(input_size=IN, hidden_size=H, dtype=np.complex64), "dtype"),
    ("dropout=1.5", dict(input_size=IN, hidden_size=H, dropout=1.5), "dropout"),
    ("dropout=True", dict(input_size=IN, hidden_size=H, dropout=True), "dropout"),
    ("dropout=-0.1", dict(input_size=IN, hidden_size=H, dropout=-0.1), "dropout"),
]


@pytest.mark.parametrize(
    "kwargs,pattern", [c[1:] for c in CTOR_CASES], ids=[c[0] for c in CTOR_CASES]
)
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.RNN], ids=["LSTM", "RNN"])
def test_bad_constructor_args(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "", None], ids=["sigmoid", "empty", "None"])
def test_bad_nonlinearity(nonlinearity):
    with pytest.raises((ValueError, TypeError), match="nonlinearity"):
        fastrnn.RNN(IN, H, nonlinearity=nonlinearity)


@pytest.mark.parametrize(
    "kwargs",
    [dict(input_size=2.5), dict(hidden_size="20"), dict(hidden_size=None)],
    ids=["float_size", "str_size", "None_size"],
)
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.RNN], ids=["LSTM", "RNN"])
def test_non_integer_sizes(cls, kwargs):
    args = dict(input_size=IN, hidden_size=H)
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=r"input_size|hidden_size"):
        cls(**args)

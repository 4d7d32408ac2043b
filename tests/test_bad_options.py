"""Bad input to the new options (lengths, num_layers / bidirectional states, proj_size) and to the
cells: a clear ValueError/TypeError/RuntimeError naming the argument, never a crash."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastrnn

KINDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]
CELL_KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
IN, H, P, B, T = 4, 9, 5, 3, 6
F32 = np.float32


def make_layer(kind, **options):
    if kind.startswith("lstm"):
        proj = P if kind == "lstm_proj" else 0
        return fastrnn.LSTM(IN, H, proj_size=proj, seed=0, **options)
    if kind == "gru":
        return fastrnn.GRU(IN, H, seed=0, **options)
    return fastrnn.RNN(IN, H, nonlinearity=kind[4:], seed=0, **options)


def make_cell(kind):
    if kind == "lstm":
        return fastrnn.LSTMCell(IN, H, seed=0)
    if kind == "gru":
        return fastrnn.GRUCell(IN, H, seed=0)
    return fastrnn.RNNCell(IN, H, nonlinearity=kind[4:], seed=0)


def x_tm(batch=B):
    return np.ones((T, batch, IN), F32)


def shape_text(shape):
    """How fastrnn prints a shape: (4, 3, 5), (5,)."""
    return re.escape("(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")")


def forward(layer, x, h0=None, c0=None, lengths=None):
    hx = None
    if h0 is not None or c0 is not None:
        hx = (h0, c0) if isinstance(layer, fastrnn.LSTM) else h0
    return layer(x, hx, lengths=lengths)


def assert_layer_still_works(layer, x):
    """After a rejected call the layer runs normally (nothing half-updated)."""
    out = layer(x)[0]
    assert np.all(np.isfinite(out))


# --------------------------------------------------------------------------- lengths

BAD_LENGTHS = [
    ("negative", [2, -1, 3], ValueError, r"lengths.*-1"),
    ("above_T", [2, T + 1, 3], ValueError, rf"lengths.*{T + 1}"),
    ("huge", np.array([2, 2**40, 3]), ValueError, r"lengths"),
    ("too_few", [2, 3], ValueError, rf"lengths.*\({B},\)"),
    ("too_many", [2, 3, 1, 1], ValueError, rf"lengths.*\({B},\)"),
    ("2d", [[2, 3, 1]], ValueError, r"lengths.*\(1, 3\)"),
    ("2d_column", np.array([[2], [3], [1]]), ValueError, r"lengths"),
    ("scalar", 3, ValueError, r"lengths"),
    ("float_array", np.array([2.0, 3.0, 1.0]), TypeError, r"lengths.*float64"),
    ("float_list", [2.0, 3.0, 1.0], TypeError, r"lengths"),
    ("float32_array", np.array([2, 3, 1], np.float32), TypeError, r"lengths.*float32"),
    ("bool_array", np.array([True, True, False]), TypeError, r"lengths.*bool"),
    ("strings", ["2", "3", "1"], TypeError, r"lengths"),
    ("none_inside", [2, None, 1], TypeError, r"lengths"),
]


@pytest.mark.parametrize(
    "lengths,exc,pattern", [c[1:] for c in BAD_LENGTHS], ids=[c[0] for c in BAD_LENGTHS]
)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_lengths(kind, lengths, exc, pattern):
    layer = make_layer(kind, num_layers=2, bidirectional=True)
    with pytest.raises(exc, match=pattern):
        forward(layer, x_tm(), lengths=lengths)
    with pytest.raises(RuntimeError, match="backward"):
        layer.backward(np.zeros((T, B, 2 * (layer.proj_size or H)), F32))
    assert_layer_still_works(layer, x_tm())


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_count_follows_batch_first(kind):
    """With batch_first the batch is axis 0: T lengths for a (B, T, IN) x are wrong."""
    layer = make_layer(kind, batch_first=True)
    x = np.ones((B, T, IN), F32)
    forward(layer, x, lengths=[T] * B)
    with pytest.raises(ValueError, match=rf"lengths.*\({B},\)"):
        forward(layer, x, lengths=[1] * T)


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_with_unbatched_x(kind):
    layer = make_layer(kind)
    for lengths in ([T], T, np.array([T])):
        with pytest.raises(ValueError, match=r"lengths.*(batched|unbatched)"):
            forward(layer, np.ones((T, IN), F32), lengths=lengths)


@pytest.mark.parametrize("lengths", [[], np.zeros(0, np.int64)], ids=["list", "array"])
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_lengths_of_an_empty_batch(kind, lengths):
    """A batch of 0 sequences takes 0 lengths, also as an empty list (a list of no ints)."""
    layer = make_layer(kind, num_layers=2, bidirectional=True)
    out = forward(layer, x_tm(batch=0), lengths=lengths)[0]
    assert out.shape == (T, 0, 2 * (layer.proj_size or H))
    dx = layer.backward(np.zeros(out.shape, F32))[0]
    assert dx.shape == (T, 0, IN)


# --------------------------------------------------------------------------- states


def state_shapes(kind, num_layers, bidirectional, batch=B):
    units = num_layers * (2 if bidirectional else 1)
    out = P if kind == "lstm_proj" else H
    lead = (units,) if batch is None else (units, batch)
    return lead + (out,), lead + (H,)


STATE_OPTIONS = [(2, False), (1, True), (3, True)]


@pytest.mark.parametrize("num_layers,bidirectional", STATE_OPTIONS, ids=["L2", "L1-bi", "L3-bi"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_h0_wrong_number_of_layers_names_expected_shape(kind, num_layers, bidirectional, batched):
    layer = make_layer(kind, num_layers=num_layers, bidirectional=bidirectional)
    h_shape, c_shape = state_shapes(kind, num_layers, bidirectional, B if batched else None)
    x = x_tm() if batched else np.ones((T, IN), F32)
    bad = (h_shape[0] - 1,) + h_shape[1:]  # e.g. num_layers states without the reverse ones
    with pytest.raises(ValueError, match=r"\bh0\b.*" + shape_text(h_shape)):
        forward(layer, x, np.zeros(bad, F32), np.zeros(c_shape, F32))
    if kind.startswith("lstm"):
        bad = (c_shape[0] + 1,) + c_shape[1:]
        with pytest.raises(ValueError, match=r"\bc0\b.*" + shape_text(c_shape)):
            forward(layer, x, np.zeros(h_shape, F32), np.zeros(bad, F32))
    forward(layer, x, np.zeros(h_shape, F32), np.zeros(c_shape, F32))  # the right shapes run


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_proj_h0_must_have_proj_size(batched):
    layer = make_layer("lstm_proj", num_layers=2)
    h_shape, c_shape = state_shapes("lstm_proj", 2, False, B if batched else None)
    x = x_tm() if batched else np.ones((T, IN), F32)
    # h0 of hidden_size (as without projections)
    with pytest.raises(ValueError, match=r"\bh0\b.*" + shape_text(h_shape) + ".*proj_size"):
        forward(layer, x, np.zeros(c_shape, F32), np.zeros(c_shape, F32))
    # c0 of proj_size (c keeps hidden_size)
    with pytest.raises(ValueError, match=r"\bc0\b.*" + shape_text(c_shape) + ".*hidden_size"):
        forward(layer, x, np.zeros(h_shape, F32), np.zeros(h_shape, F32))


@pytest.mark.parametrize("kind", KINDS)
def test_backward_grad_states_shapes_with_options(kind):
    layer = make_layer(kind, num_layers=2, bidirectional=True)
    h_shape, c_shape = state_shapes(kind, 2, True)
    out = forward(layer, x_tm(), lengths=[T, 0, 2])[0]
    bad_h = (1,) + h_shape[1:]
    lstm = kind.startswith("lstm")
    with pytest.raises(ValueError, match=r"grad_h_n.*" + shape_text(h_shape)):
        layer.backward(
            np.zeros(out.shape, F32), (np.zeros(bad_h, F32), None) if lstm else np.zeros(bad_h, F32)
        )
    if lstm:
        bad_c = c_shape[:-1] + (c_shape[-1] + 1,)
        with pytest.raises(ValueError, match=r"grad_c_n.*" + shape_text(c_shape)):
            layer.backward(np.zeros(out.shape, F32), (None, np.zeros(bad_c, F32)))
    bad_out = out.shape[:-1] + (out.shape[-1] // 2,)  # one direction's width
    with pytest.raises(ValueError, match=r"grad_out.*" + shape_text(out.shape)):
        layer.backward(np.zeros(bad_out, F32))
    for name, grad in layer.grads.items():  # the failed calls added nothing
        assert not np.any(grad), name
    layer.backward(np.zeros(out.shape, F32))  # the training state is still there


# --------------------------------------------------------------------------- constructor

BAD_CTOR = [
    ("proj_eq_hidden", fastrnn.LSTM, dict(proj_size=H), ValueError, r"proj_size.*hidden_size"),
    ("proj_gt_hidden", fastrnn.LSTM, dict(proj_size=H + 3), ValueError, r"proj_size"),
    ("proj_negative", fastrnn.LSTM, dict(proj_size=-1), ValueError, r"proj_size.*-1"),
    ("proj_float", fastrnn.LSTM, dict(proj_size=2.0), TypeError, r"proj_size"),
    ("proj_str", fastrnn.LSTM, dict(proj_size="2"), TypeError, r"proj_size"),
    ("proj_none", fastrnn.LSTM, dict(proj_size=None), TypeError, r"proj_size"),
    ("gru_proj", fastrnn.GRU, dict(proj_size=2), TypeError, r"proj_size"),
    ("rnn_proj", fastrnn.RNN, dict(proj_size=2), TypeError, r"proj_size"),
    ("gru_proj_zero", fastrnn.GRU, dict(proj_size=0), TypeError, r"proj_size"),
    ("layers_zero", fastrnn.GRU, dict(num_layers=0), ValueError, r"num_layers"),
    ("layers_negative", fastrnn.LSTM, dict(num_layers=-2), ValueError, r"num_layers"),
    ("layers_float", fastrnn.RNN, dict(num_layers=2.0), TypeError, r"num_layers"),
    ("dropout_above_1", fastrnn.GRU, dict(num_layers=2, dropout=1.5), ValueError, r"dropout"),
    ("dropout_negative", fastrnn.GRU, dict(num_layers=2, dropout=-0.1), ValueError, r"dropout"),
    ("dropout_str", fastrnn.LSTM, dict(num_layers=2, dropout="0.5"), ValueError, r"dropout"),
    ("dropout_bool", fastrnn.RNN, dict(num_layers=2, dropout=True), ValueError, r"dropout"),
    ("dropout_nan", fastrnn.RNN, dict(num_layers=2, dropout=float("nan")), ValueError, r"dropout"),
    ("gru_nonlinearity", fastrnn.GRU, dict(nonlinearity="tanh"), TypeError, r"nonlinearity"),
]


@pytest.mark.parametrize(
    "cls,kwargs,exc,pattern", [c[1:] for c in BAD_CTOR], ids=[c[0] for c in BAD_CTOR]
)
def test_bad_constructor_options(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(IN, H, **kwargs)


BAD_CELL_CTOR = [
    ("hidden_zero", dict(hidden_size=0), ValueError, r"hidden_size"),
    ("input_negative", dict(input_size=-1), ValueError, r"input_size"),
    ("dtype", dict(dtype=np.int32), ValueError, r"dtype"),
    ("num_layers", dict(num_layers=2), TypeError, r"num_layers"),
    ("proj_size", dict(proj_size=2), TypeError, r"proj_size"),
]


@pytest.mark.parametrize(
    "kwargs,exc,pattern", [c[1:] for c in BAD_CELL_CTOR], ids=[c[0] for c in BAD_CELL_CTOR]
)
@pytest.mark.parametrize("cls", [fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell])
def test_bad_cell_constructor(cls, kwargs, exc, pattern):
    args = dict(input_size=IN, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        cls(**args)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "RELU", None])
def test_bad_cell_nonlinearity(nonlinearity):
    with pytest.raises(ValueError, match="nonlinearity"):
        fastrnn.RNNCell(IN, H, nonlinearity=nonlinearity)


# --------------------------------------------------------------------------- load_state_dict


def test_load_state_dict_of_other_options_names_the_keys():
    two_layers = make_layer("lstm", num_layers=2, bidirectional=True)
    one_layer = make_layer("lstm")
    with pytest.raises(KeyError, match=r"weight_ih_l1_reverse"):
        one_layer.load_state_dict(two_layers.state_dict())
    with pytest.raises(KeyError, match=r"weight_ih_l1"):
        two_layers.load_state_dict(one_layer.state_dict())
    projected = make_layer("lstm_proj")
    with pytest.raises(KeyError, match=r"weight_hr_l0"):
        projected.load_state_dict(one_layer.state_dict())
    with pytest.raises(KeyError, match=r"weight_hr_l0"):
        one_layer.load_state_dict(projected.state_dict())
    state = projected.state_dict()
    state["weight_hr_l0"] = np.zeros((P + 1, H), F32)
    before = projected.state_dict()
    with pytest.raises(ValueError, match=rf"weight_hr_l0.*\({P}, {H}\)"):
        projected.load_state_dict(state)
    for name, value in projected.state_dict().items():  # unchanged
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, object], ids=["c64", "str", "obj"])
def test_assign_weights_that_are_not_real_numbers(dtype):
    """No silent cast (complex would lose its imaginary part, strings would be parsed)."""
    layer = make_layer("lstm")
    before = layer.weight_ih_l0
    with pytest.raises(TypeError, match=r"weight_ih_l0.*real numbers"):
        layer.weight_ih_l0 = np.ones(before.shape).astype(dtype)
    with pytest.raises(TypeError, match=r"weight_ih_l0.*real numbers"):
        layer.load_state_dict({**layer.state_dict(), "weight_ih_l0": before.astype(dtype)})
    assert layer.weight_ih_l0 is before


def test_assign_projection_of_wrong_shape():
    layer = make_layer("lstm_proj", num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=rf"weight_hr_l1_reverse.*\({P}, {H}\)"):
        layer.weight_hr_l1_reverse = np.zeros((H, P), F32)
    with pytest.raises(ValueError, match=rf"weight_ih_l1.*\({4 * H}, {2 * P}\)"):
        layer.weight_ih_l1 = np.zeros((4 * H, 2 * H), F32)


# --------------------------------------------------------------------------- cells


def cell_call(cell, x, h=None, c=None):
    if isinstance(cell, fastrnn.LSTMCell):
        return cell(x, None if h is None and c is None else (h, c))
    return cell(x, h)


def warm_cell(kind):
    """A cell after a valid streaming call (its weights packed, nothing kept for backward): its
    calls with arrays of its dtype take the core's direct path, which must reject the same
    arguments with the same messages."""
    cell = make_cell(kind)
    zeros = np.zeros((B, H), F32)
    cell_call(cell, np.ones((B, IN), F32), zeros, zeros if kind == "lstm" else None)
    cell.clear_tape()
    return cell


CELLS = [pytest.param(make_cell, id="fresh"), pytest.param(warm_cell, id="warm")]


@pytest.mark.parametrize(
    "shape", [(B, IN + 1), (IN - 1,), (2, B, IN), (), (B, 0)], ids=["2d", "1d", "3d", "0d", "zero"]
)
@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("new_cell", CELLS)
def test_cell_bad_x_shape(new_cell, kind, shape):
    cell = new_cell(kind)
    with pytest.raises(ValueError, match=r"\binput\b.*" + shape_text(shape)):
        cell_call(cell, np.ones(shape, F32), np.zeros((B, H), F32), np.zeros((B, H), F32))
    with pytest.raises(ValueError, match=r"\binput\b.*" + shape_text(shape)):
        cell_call(cell, np.ones(shape, F32))


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_bad_x_dtype(kind):
    with pytest.raises(TypeError, match=r"\binput\b.*float64"):
        cell_call(make_cell(kind), np.ones((B, IN), np.float64))
    with pytest.raises(TypeError, match=r"\binput\b"):
        cell_call(make_cell(kind), np.full((B, IN), "a"))


H_CASES = [
    ("batch", (B, IN), (B + 1, H), (B, H)),
    ("hidden", (B, IN), (B, H + 1), (B, H)),
    ("unbatched_x_batched_h", (IN,), (1, H), (H,)),
    ("batched_x_unbatched_h", (B, IN), (H,), (B, H)),
    ("3d", (B, IN), (1, B, H), (B, H)),
]


@pytest.mark.parametrize(
    "x_shape,h_shape,expected", [c[1:] for c in H_CASES], ids=[c[0] for c in H_CASES]
)
@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("new_cell", CELLS)
def test_cell_bad_h_shape(new_cell, kind, x_shape, h_shape, expected):
    cell = new_cell(kind)
    x = np.ones(x_shape, F32)
    with pytest.raises(ValueError, match=r"\bh\b.*" + shape_text(expected)):
        cell_call(cell, x, np.zeros(h_shape, F32), np.zeros(expected, F32))
    if kind == "lstm":
        with pytest.raises(ValueError, match=r"\bc\b.*" + shape_text(expected)):
            cell_call(cell, x, np.zeros(expected, F32), np.zeros(h_shape, F32))
    with pytest.raises(RuntimeError, match="backward"):  # rejected calls keep nothing
        cell_backward(cell, np.zeros(expected, F32))


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_bad_h_dtype(kind):
    cell = make_cell(kind)
    with pytest.raises(TypeError, match=r"\bh\b.*float64"):
        cell_call(cell, np.ones((B, IN), F32), np.zeros((B, H)), np.zeros((B, H), F32))


def test_lstm_cell_hx_not_a_pair():
    cell = make_cell("lstm")
    for hx in (np.zeros((B, H), F32), (np.zeros((B, H), F32),), [np.zeros((B, H), F32)] * 3):
        with pytest.raises(TypeError, match=r"\bhx\b"):
            cell(np.ones((B, IN), F32), hx)


@pytest.mark.parametrize("cls", [fastrnn.GRUCell, fastrnn.RNNCell])
def test_gru_rnn_cell_hx_tuple(cls):
    with pytest.raises(TypeError, match=r"\bhx\b"):
        cls(IN, H)(np.ones((B, IN), F32), (np.zeros((B, H), F32), np.zeros((B, H), F32)))


def cell_backward(cell, gh, gc=None):
    if isinstance(cell, fastrnn.LSTMCell):
        return cell.backward(gh, gc)
    return cell.backward(gh)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_backward_without_training_call(kind):
    cell = make_cell(kind)
    with pytest.raises(RuntimeError, match=r"backward.*train"):
        cell_backward(cell, np.zeros((B, H), F32))
    cell.eval()
    cell_call(cell, np.ones((B, IN), F32))
    with pytest.raises(RuntimeError, match=r"backward.*train"):
        cell_backward(cell, np.zeros((B, H), F32))
    cell.train()
    cell_call(cell, np.ones((B, IN), F32))
    cell_backward(cell, np.zeros((B, H), F32))
    with pytest.raises(RuntimeError, match=r"backward"):  # one backward per call
        cell_backward(cell, np.zeros((B, H), F32))


BAD_CELL_GRADS = [
    # (id, x shape of the call, bad grad shape)
    ("batched_hidden", (B, IN), (B, H + 1)),
    ("batched_batch", (B, IN), (B + 1, H)),
    ("batched_1d", (B, IN), (H,)),
    ("unbatched_hidden", (IN,), (H + 2,)),
    ("unbatched_2d", (IN,), (1, H)),
]


@pytest.mark.parametrize(
    "x_shape,bad_shape", [c[1:] for c in BAD_CELL_GRADS], ids=[c[0] for c in BAD_CELL_GRADS]
)
@pytest.mark.parametrize("kind,which", [(k, "grad_h") for k in CELL_KINDS] + [("lstm", "grad_c")])
def test_cell_backward_bad_grad_shape(kind, which, x_shape, bad_shape):
    """The message names the argument and the shape the caller gave; the call's training state
    stays for a correct backward, and nothing was added to grads."""
    cell = make_cell(kind)
    h = cell_call(cell, np.ones(x_shape, F32))
    h = h[0] if kind == "lstm" else h
    good = np.ones(h.shape, F32)
    bad = np.ones(bad_shape, F32)
    args = (bad, None) if which == "grad_h" else (good, bad)
    with pytest.raises(ValueError, match=which + r".*" + shape_text(bad_shape)):
        cell_backward(cell, *args)
    for name, grad in cell.grads.items():
        assert not np.any(grad), name
    dx = cell_backward(cell, good)[0]
    assert dx.shape == x_shape


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_backward_bad_grad_dtype(kind):
    cell = make_cell(kind)
    cell_call(cell, np.ones((B, IN), F32))
    with pytest.raises(TypeError, match=r"grad_h.*float64"):
        cell_backward(cell, np.ones((B, H)))

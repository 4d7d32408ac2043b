"""fastrnn.LSTM / fastrnn.RNN against torch.nn.LSTM / torch.nn.RNN with the same weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import fastrnn
from conftest import DTYPE_IDS, DTYPES, assert_close

torch = pytest.importorskip("torch")

KINDS = ["lstm", "rnn_tanh", "rnn_relu"]
TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


@dataclass(frozen=True)
class Case:
    IN: int
    H: int
    B: int | None  # None: unbatched
    T: int
    bias: bool = True
    batch_first: bool = False

    @property
    def id(self):
        b = "unbatched" if self.B is None else f"B{self.B}"
        return (
            f"I{self.IN}-H{self.H}-{b}-T{self.T}-{'bias' if self.bias else 'nobias'}"
            f"-{'bf' if self.batch_first else 'tm'}"
        )


CASES = [
    Case(5, 7, 3, 4),
    Case(5, 7, 3, 4, batch_first=True),
    Case(5, 7, 3, 4, bias=False),
    Case(17, 33, 2, 3, bias=False, batch_first=True),
    Case(5, 7, None, 4),
    Case(9, 16, None, 3, bias=False),
    # The C++ GEMMs run row by row up to 8 k and blocked from 9 (k is the input size for x·W_ihᵀ
    # and the rows, T·B, for the weight gradients): 8 inputs and rows, then 9. H = 33 makes
    # partial vectors and a narrower last panel.
    Case(8, 33, 2, 4),
    Case(9, 33, 9, 1, bias=False),
]


def make_pair(kind, case, dtype, seed):
    torch.manual_seed(seed)
    kwargs = dict(bias=case.bias, batch_first=case.batch_first, dtype=TORCH_DTYPE[np.dtype(dtype)])
    if kind == "lstm":
        tm = torch.nn.LSTM(case.IN, case.H, **kwargs)
        fm = fastrnn.LSTM(
            case.IN, case.H, bias=case.bias, batch_first=case.batch_first, dtype=dtype
        )
    else:
        nl = kind[4:]
        tm = torch.nn.RNN(case.IN, case.H, nonlinearity=nl, **kwargs)
        fm = fastrnn.RNN(
            case.IN,
            case.H,
            nonlinearity=nl,
            bias=case.bias,
            batch_first=case.batch_first,
            dtype=dtype,
        )
    fm.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    assert list(fm.state_dict()) == list(tm.state_dict())
    return tm, fm


def leaf(a):
    return torch.tensor(a, requires_grad=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch(isa, kind, dtype, case, rng):
    tm, fm = make_pair(kind, case, dtype, seed=len(case.id))
    lstm = kind == "lstm"
    if case.B is None:
        x_shape, s_shape = (case.T, case.IN), (1, case.H)
    else:
        x_shape = (case.B, case.T, case.IN) if case.batch_first else (case.T, case.B, case.IN)
        s_shape = (1, case.B, case.H)
    x = rng.standard_normal(x_shape).astype(dtype)
    h0 = rng.standard_normal(s_shape).astype(dtype)
    c0 = rng.standard_normal(s_shape).astype(dtype)
    gout = rng.standard_normal(x_shape[:-1] + (case.H,)).astype(dtype)
    gh = rng.standard_normal(s_shape).astype(dtype)
    gc = rng.standard_normal(s_shape).astype(dtype)

    # torch
    tx, th0, tc0 = leaf(x), leaf(h0), leaf(c0)
    if lstm:
        t_out, (t_hn, t_cn) = tm(tx, (th0, tc0))
        grads = [torch.tensor(gout), torch.tensor(gh), torch.tensor(gc)]
        torch.autograd.backward([t_out, t_hn, t_cn], grads)
    else:
        t_out, t_hn = tm(tx, th0)
        torch.autograd.backward([t_out, t_hn], [torch.tensor(gout), torch.tensor(gh)])

    # fastrnn
    if lstm:
        out, (hn, cn) = fm(x, (h0, c0))
        dx, (dh0, dc0) = fm.backward(gout, (gh, gc))
    else:
        out, hn = fm(x, h0)
        dx, dh0 = fm.backward(gout, gh)

    assert_close(out, t_out.detach().numpy(), dtype, "fwd", "out")
    assert_close(hn, t_hn.detach().numpy(), dtype, "fwd", "h_n")
    assert_close(dx, tx.grad.numpy(), dtype, "grad", "dx")
    assert_close(dh0, th0.grad.numpy(), dtype, "grad", "dh0")
    if lstm:
        assert_close(cn, t_cn.detach().numpy(), dtype, "fwd", "c_n")
        assert_close(dc0, tc0.grad.numpy(), dtype, "grad", "dc0")
    named = dict(tm.named_parameters())
    assert list(fm.grads) == list(named)
    for k, p in named.items():
        assert_close(fm.grads[k], p.grad.numpy(), dtype, "grad", f"grads[{k!r}]")


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_without_hx(kind, rng):
    """hx=None and grad_state=None on both sides."""
    case = Case(6, 10, 4, 5)
    dtype = np.float64
    tm, fm = make_pair(kind, case, dtype, seed=3)
    x = rng.standard_normal((case.T, case.B, case.IN))
    gout = rng.standard_normal((case.T, case.B, case.H))
    tx = leaf(x)
    t_out = tm(tx)[0]
    t_out.backward(torch.tensor(gout))
    out = fm(x)[0]
    dx = fm.backward(gout)[0]
    assert_close(out, t_out.detach().numpy(), dtype, "fwd", "out")
    assert_close(dx, tx.grad.numpy(), dtype, "grad", "dx")
    for k, p in tm.named_parameters():
        assert_close(fm.grads[k], p.grad.numpy(), dtype, "grad", k)


def test_load_state_dict_accepts_torch_tensors_directly():
    module = torch.nn.LSTM(4, 3)
    layer = fastrnn.LSTM(4, 3)
    layer.load_state_dict(module.state_dict())  # detached tensors convert through np.asarray
    for name, value in module.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[name], value.numpy())
    with pytest.raises(TypeError, match="weight_ih_l0: cannot convert"):
        layer.load_state_dict(dict(module.named_parameters()))  # these require grad

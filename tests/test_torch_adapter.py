"""fastrnn.torch against torch.nn: the same modules, weights and calls, compared output by output
and gradient by gradient; plus fallback, patch(), optimizer steps, copies and autograd modes."""

from __future__ import annotations

import copy
import itertools
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import assert_close

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastrnn.torch")

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import fastrnn  # noqa: E402

# torch's float32 LSTM with proj_size says it does not use oneDNN: not ours to report.
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
)

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]
NP = {torch.float32: np.float32, torch.float64: np.float64}

IN, H, P, T, B = 3, 5, 2, 4, 3  # small: the grid below has ~900 cases
LENGTHS = [2, 4, 3]  # unsorted, for PackedSequence


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """torch's OpenMP workers crawl through the many tiny ops of its backward when the two cores
    are shared (fastrnn's own pool, other processes): one thread keeps the file fast."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Options:
    kind: str  # lstm, gru, rnn_tanh, rnn_relu
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    proj: bool  # LSTM only

    @property
    def lstm(self) -> bool:
        return self.kind == "lstm"

    def kwargs(self, dtype: torch.dtype) -> dict:
        kw = dict(
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            bias=self.bias,
            batch_first=self.batch_first,
            dtype=dtype,
        )
        if self.proj:
            kw["proj_size"] = P
        if self.kind.startswith("rnn"):
            kw["nonlinearity"] = self.kind[4:]
        return kw

    @property
    def id(self) -> str:
        return (
            f"{self.kind}{'-proj' if self.proj else ''}-L{self.num_layers}"
            f"{'-bi' if self.bidirectional else ''}{'' if self.bias else '-nobias'}"
            f"{'-bf' if self.batch_first else ''}"
        )


TORCH_CLASS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}

GRID = [
    Options(kind, layers, bi, bias, bf, proj)
    for kind, layers, bi, bias, bf, proj in itertools.product(
        ["lstm", "gru", "rnn_tanh", "rnn_relu"],
        [1, 2],
        [False, True],
        [True, False],
        [False, True],
        [False, True],
    )
    if not proj or kind == "lstm"
]


def make_twins(opts: Options, dtype: torch.dtype, seed: int = 0):
    """A torch.nn module and its fastrnn.torch twin with identical weights."""
    name = TORCH_CLASS[opts.kind]
    torch.manual_seed(seed)
    reference = getattr(torch.nn, name)(IN, H, **opts.kwargs(dtype))
    fast = getattr(ft, name)(IN, H, **opts.kwargs(dtype))
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def twins(kind, input_size, dtype, **kwargs):
    """A torch.nn layer `kind`(input_size, 4) and its fastrnn.torch twin, with torch's weights."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, kind)(input_size, 4, dtype=dtype, **kwargs)
    fast = getattr(ft, kind)(input_size, 4, dtype=dtype, **kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def gru_twins(dtype=torch.float64, **kwargs):
    """A torch.nn.GRU(3, 4) and its fastrnn.torch twin."""
    return twins("GRU", 3, dtype, **kwargs)


def leaf(shape, dtype, gen):
    return torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()


def run_and_backprop(module, x, hx, weights, lstm: bool):
    """Forward, a loss weighting every output by fixed random numbers, backward. Returns the
    outputs (the PackedSequence's data for packed input)."""
    out, state = module(x, hx)
    h_n, c_n = state if lstm else (state, None)
    out_t = out.data if isinstance(out, PackedSequence) else out
    loss = (out_t * weights[0][: out_t.numel()].view_as(out_t)).sum()
    loss = loss + (h_n * weights[1][: h_n.numel()].view_as(h_n)).sum()
    if c_n is not None:
        loss = loss + (c_n * weights[2][: c_n.numel()].view_as(c_n)).sum()
    loss.backward()
    return out, h_n, c_n


def check_parity(opts: Options, dtype: torch.dtype, form: str, with_hx: bool, seed: int) -> None:
    reference, fast = make_twins(opts, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    directions = 2 if opts.bidirectional else 1
    units, h_out = opts.num_layers * directions, P if opts.proj else H
    batch_shape = () if form == "unbatched" else (B,)
    if form == "padded" and opts.batch_first:
        x_shape = (B, T, IN)
    else:
        x_shape = (T, *batch_shape, IN)
    x = leaf(x_shape, dtype, gen)
    h0 = leaf((units, *batch_shape, h_out), dtype, gen) if with_hx else None
    c0 = leaf((units, *batch_shape, H), dtype, gen) if with_hx and opts.lstm else None
    hx = (h0, c0) if opts.lstm and with_hx else h0
    loss_weights = [torch.randn(4096, dtype=dtype, generator=gen) for _ in range(3)]

    results = []
    for module in (reference, fast):
        for t in (x, h0, c0):
            if t is not None:
                t.grad = None
        module_input = x
        if form == "packed":
            padded = x.transpose(0, 1) if opts.batch_first else x
            module_input = pack_padded_sequence(
                padded, torch.tensor(LENGTHS), batch_first=opts.batch_first, enforce_sorted=False
            )
        out, h_n, c_n = run_and_backprop(module, module_input, hx, loss_weights, opts.lstm)
        grads = {k: p.grad.clone() for k, p in module.named_parameters()}
        inputs = [None if t is None else t.grad.clone() for t in (x, h0, c0)]
        results.append((out, h_n, c_n, grads, inputs))

    (t_out, t_h, t_c, t_grads, t_in), (f_out, f_h, f_c, f_grads, f_in) = results
    if form == "packed":
        assert isinstance(f_out, PackedSequence)
        assert torch.equal(f_out.batch_sizes, t_out.batch_sizes)
        assert torch.equal(f_out.unsorted_indices, t_out.unsorted_indices)
        t_out, f_out = t_out.data, f_out.data
    assert f_out.shape == t_out.shape and f_out.dtype == dtype
    assert_close(f_out.detach(), t_out.detach(), NP[dtype], "fwd", "out")
    assert_close(f_h.detach(), t_h.detach(), NP[dtype], "fwd", "h_n")
    if opts.lstm:
        assert_close(f_c.detach(), t_c.detach(), NP[dtype], "fwd", "c_n")
    for name, tg, fg in zip(("x", "h0", "c0"), t_in, f_in):
        assert (tg is None) == (fg is None), name
        if tg is not None:
            assert_close(fg, tg, NP[dtype], "grad", f"d{name}")
    assert list(f_grads) == list(t_grads)
    for k in t_grads:
        assert_close(f_grads[k], t_grads[k], NP[dtype], "grad", k)


@pytest.mark.parametrize("with_hx", [False, True], ids=["hx_none", "hx"])
@pytest.mark.parametrize("form", ["padded", "packed", "unbatched"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opts", GRID, ids=[o.id for o in GRID])
def test_parity_with_torch_nn(opts, dtype, form, with_hx):
    """Forward outputs, states and every gradient (input, hx, parameters) match torch.nn."""
    check_parity(opts, dtype, form, with_hx, seed=len(opts.id))


def test_parity_on_every_isa(isa):
    """The widest case (two bidirectional projected LSTM layers, packed) on each kernel set."""
    opts = Options("lstm", 2, True, True, True, True)
    for dtype in DTYPES:
        check_parity(opts, dtype, "packed", True, seed=7)
        check_parity(Options("gru", 2, True, True, False, False), dtype, "padded", True, seed=8)


def test_sorted_packed_sequence_without_permutation():
    """pack_sequence with enforce_sorted=True has no sorted_indices: the states stay in order."""
    from torch.nn.utils.rnn import pack_sequence

    torch.manual_seed(0)
    reference, fast = torch.nn.LSTM(3, 4, bidirectional=True), ft.LSTM(3, 4, bidirectional=True)
    fast.load_state_dict(reference.state_dict())
    seqs = [torch.randn(n, 3) for n in (5, 3, 1)]
    hx = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    packed = pack_sequence(seqs)
    assert packed.sorted_indices is None
    (t_out, (t_h, t_c)), (f_out, (f_h, f_c)) = reference(packed, hx), fast(packed, hx)
    assert f_out.sorted_indices is None
    for a, b, name in ((f_out.data, t_out.data, "out"), (f_h, t_h, "h_n"), (f_c, t_c, "c_n")):
        assert_close(a.detach(), b.detach(), np.float32, "fwd", name)


def test_gradcheck_against_finite_differences():
    torch.manual_seed(0)
    m = ft.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *weights):
        out, (h, c) = torch.func.functional_call(
            m, dict(zip(m._flat_weights_names, weights)), (x, (h0, c0))
        )
        return out, h, c

    weights = [w.detach().clone().requires_grad_() for w in m._flat_weights]
    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


# ------------------------------------------------------------------------------- the drop-in


def test_is_a_torch_module_with_torch_constructor_and_repr():
    for name in ("LSTM", "GRU", "RNN"):
        torch.manual_seed(1)
        reference = getattr(torch.nn, name)(4, 6, num_layers=2, bidirectional=True)
        torch.manual_seed(1)
        fast = getattr(ft, name)(4, 6, num_layers=2, bidirectional=True)
        assert isinstance(fast, getattr(torch.nn, name))
        assert repr(fast) == repr(reference)
        assert list(fast.state_dict()) == list(reference.state_dict())
        for (k, a), (_, b) in zip(fast.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), k  # the same initialisation from torch's generator
    relu = ft.RNN(2, 3, nonlinearity="relu")
    assert relu.nonlinearity == "relu" and relu.mode == "RNN_RELU"


def test_bad_shapes_raise_torch_errors():
    m, ref = ft.LSTM(3, 4), torch.nn.LSTM(3, 4)
    for args in [
        (torch.randn(5, 2, 7),),  # wrong input size
        (torch.randn(5, 2, 3), (torch.randn(1, 3, 4), torch.randn(1, 3, 4))),  # wrong batch
        (torch.randn(5, 2, 3, 1),),  # 4-D
    ]:
        with pytest.raises((RuntimeError, ValueError)) as expected:
            ref(*args)
        with pytest.raises(type(expected.value)):
            m(*args)
    gru, ref_gru = ft.GRU(3, 4), torch.nn.GRU(3, 4)
    args = (torch.randn(5, 2, 3), (torch.randn(1, 2, 4),))  # a tuple for the GRU
    with pytest.raises(Exception) as expected:
        ref_gru(*args)
    with pytest.raises(type(expected.value)):
        gru(*args)


def test_fallback_for_bfloat16_warns_once_and_matches_torch():
    torch.manual_seed(0)
    reference = torch.nn.GRU(3, 4, dtype=torch.bfloat16)
    fast = ft.GRU(3, 4, dtype=torch.bfloat16)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    with pytest.warns(ft.FastRNNFallbackWarning, match="bfloat16"):
        out = fast(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_again = fast(x)[0]  # once per module
    assert torch.equal(out, reference(x)[0]) and torch.equal(out_again, out)


def test_fallback_for_dtype_mismatch_gives_torchs_error():
    m = ft.LSTM(3, 4)  # float32 weights
    with pytest.warns(ft.FastRNNFallbackWarning, match="float64"):
        with pytest.raises(ValueError, match="dtype"):
            m(torch.randn(5, 2, 3, dtype=torch.float64))


def test_packs_backward_copies_only_when_autograd_needs_them():
    torch.manual_seed(0)
    reference, fast = torch.nn.LSTM(3, 4), ft.LSTM(3, 4)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        fast(x)
    assert not fast._fastrnn.spec.layer._packed["l0"].trainable
    out = fast(x)[0]
    assert fast._fastrnn.spec.layer._packed["l0"].trainable
    out.sum().backward()
    reference(x)[0].sum().backward()
    for name, p in reference.named_parameters():
        assert_close(dict(fast.named_parameters())[name].grad, p.grad, np.float32, "grad", name)


def test_follows_to_dtype_and_repacks():
    torch.manual_seed(0)
    reference, fast = torch.nn.LSTM(3, 4), ft.LSTM(3, 4)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3)
    fast(x)
    reference.double(), fast.double()
    assert_close(
        fast(x.double())[0].detach(), reference(x.double())[0].detach(), np.float64, "fwd", "out"
    )


# ------------------------------------------------------------------------------------ patch()


class Tagger(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.decoder = torch.nn.GRU(16, 8, batch_first=True)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Tanh())

    def forward(self, x):
        out = self.encoder(x)[0]
        out = self.decoder(out)[0]
        return self.head(out)


def test_patch_replaces_in_place_and_keeps_weights_and_outputs():
    torch.manual_seed(0)
    model = Tagger().eval()
    calls = []
    model.encoder.register_forward_hook(lambda module, args, out: calls.append(type(module)))
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 7, 6)
    expected = model(x)
    assert ft.patch(model) is model
    assert type(model.encoder) is ft.LSTM and type(model.decoder) is ft.GRU
    assert type(model.head[0]) is torch.nn.Linear
    assert not model.encoder.training  # training mode kept
    for k, p in model.named_parameters():
        assert p is params[k]  # the very same Parameter objects: optimizers keep working
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert_close(model(x).detach(), expected.detach(), np.float32, "fwd", "output")
    assert calls == [torch.nn.LSTM, ft.LSTM]  # the hook moved along
    encoder = model.encoder
    ft.patch(model)  # patching twice changes nothing
    assert model.encoder is encoder


def test_patch_of_a_bare_rnn_returns_a_new_module_and_modules_in_lists():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(3, 4, nonlinearity="relu", dtype=torch.float64)
    fast = ft.patch(rnn)
    assert type(fast) is ft.RNN and type(rnn) is torch.nn.RNN
    assert fast.weight_hh_l0 is rnn.weight_hh_l0 and fast.mode == "RNN_RELU"
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_close(fast(x)[0].detach(), rnn(x)[0].detach(), np.float64, "fwd", "out")

    shared = torch.nn.LSTM(3, 3)
    stack = torch.nn.ModuleList([shared, torch.nn.Linear(3, 3), shared])
    ft.patch(stack)
    assert type(stack[0]) is ft.LSTM and stack[0] is stack[2]


def test_patch_shares_hooks_in_a_model_and_copies_them_for_a_bare_module():
    calls = []
    rnn = torch.nn.GRU(3, 4)
    handle = rnn.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    x = torch.randn(2, 1, 3)
    fast = ft.patch(rnn)  # a new module: registrations on it leave rnn alone
    fast.register_forward_hook(lambda m, args, out: calls.append("new"))
    rnn(x)
    fast(x)
    assert calls == [torch.nn.GRU, ft.GRU, "new"]
    model = torch.nn.Sequential(rnn)
    ft.patch(model)
    handle.remove()  # a handle made before the patch removes the hook from the replacement
    calls.clear()
    model(x)
    assert calls == []


def test_patch_keeps_the_optimizer_working():
    torch.manual_seed(0)
    model = Tagger()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    ft.patch(model)  # after building the optimizer
    x = torch.randn(2, 7, 6)
    for _ in range(2):
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for (k, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert_close(a.detach(), b.detach(), np.float32, "grad", k)


# ------------------------------------------------------------------ training and weight tracking


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_training_loop_matches_torch_nn(optimizer, dtype):
    """Five optimizer steps: every step's loss and the final weights match a torch.nn twin, so
    each step's in-place update was seen and repacked."""
    torch.manual_seed(0)
    twin = torch.nn.Sequential(
        torch.nn.LSTM(4, 6, num_layers=2, proj_size=3),
    ).to(dtype)
    model = copy.deepcopy(twin)
    ft.patch(model)
    assert type(model[0]) is ft.LSTM
    head = torch.nn.Linear(3, 1, dtype=dtype)
    head_twin = copy.deepcopy(head)
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    }[optimizer]
    opt = make([*model.parameters(), *head.parameters()])
    opt_twin = make([*twin.parameters(), *head_twin.parameters()])
    gen = torch.Generator().manual_seed(1)
    losses, losses_twin = [], []
    for _ in range(5):
        x = torch.randn(7, 3, 4, dtype=dtype, generator=gen)
        y = torch.randn(7, 3, 1, dtype=dtype, generator=gen)
        for m, h, o, log in ((model, head, opt, losses), (twin, head_twin, opt_twin, losses_twin)):
            o.zero_grad()
            loss = (h(m(x)[0]) - y).square().mean()
            loss.backward()
            o.step()
            log.append(loss.item())
    assert len(set(losses)) == 5  # the weights did change every step
    assert_close(losses, losses_twin, NP[dtype], "grad", "losses")
    for (k, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert_close(a.detach(), b.detach(), NP[dtype], "grad", k)


def test_load_state_dict_and_functional_call_are_seen():
    torch.manual_seed(0)
    reference, fast = torch.nn.GRU(3, 4, num_layers=2), ft.GRU(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float32)
    fast(x)  # packs the initial weights
    fast.load_state_dict(reference.state_dict())  # copy_ under no_grad: versions move
    assert_close(fast(x)[0].detach(), reference(x)[0].detach(), np.float32, "fwd", "load")
    other = {k: torch.randn_like(v) for k, v in reference.named_parameters()}
    got = torch.func.functional_call(fast, other, (x,))[0]
    want = torch.func.functional_call(reference, other, (x,))[0]
    assert_close(got.detach(), want.detach(), np.float32, "fwd", "functional_call")
    # and back to the module's own weights
    assert_close(fast(x)[0].detach(), reference(x)[0].detach(), np.float32, "fwd", "own")


def test_writes_through_data_need_repack_weights():
    reference, fast = twins("RNN", 3, torch.float32)
    x = torch.randn(5, 2, 3)
    fast(x)
    for p, q in zip(reference.parameters(), fast.parameters()):
        p.data.mul_(0.5)  # .data has its own version counter: invisible to the adapter
        q.data.mul_(0.5)
    fast.repack_weights()
    assert_close(fast(x)[0].detach(), reference(x)[0].detach(), np.float32, "fwd", "out")


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_fused_optimizer_steps_are_seen(name):
    """Fused optimizers write their parameters without bumping the version counter; the
    adapter's optimizer hook bumps it, so the next forward repacks."""
    reference, fast = gru_twins(torch.float32)
    x = torch.randn(5, 2, 3)
    for m in (reference, fast):
        opt = getattr(torch.optim, name)(m.parameters(), lr=0.1, fused=True)
        for _ in range(2):
            opt.zero_grad()
            m(x)[0].square().sum().backward()
            opt.step()
    assert_close(fast(x)[0].detach(), reference(x)[0].detach(), np.float32, "grad", "out")


def test_data_assigned_a_view_at_the_same_address_is_seen():
    reference, fast = twins("RNN", 4, torch.float32)
    x = torch.randn(5, 2, 4)
    fast(x)
    for m in (reference, fast):
        m.weight_hh_l0.data = m.weight_hh_l0.data.t()  # same memory, other strides
    assert_close(fast(x)[0].detach(), reference(x)[0].detach(), np.float32, "fwd", "out")


def test_inputs_and_weights_with_the_negative_bit():
    reference, fast = gru_twins()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    want = reference(x, h0)[0]
    for m in (reference, fast):
        with torch.no_grad():
            m.weight_hh_l0.data = torch._neg_view(-m.weight_hh_l0.data)
    got = fast(torch._neg_view(-x), torch._neg_view(-h0))[0]
    assert_close(got.detach(), want.detach(), np.float64, "fwd", "out")


def test_parametrized_weights_get_gradients():
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    reference = torch.nn.LSTM(3, 4, dtype=torch.float64)
    fast = ft.LSTM(3, 4, dtype=torch.float64)
    fast.load_state_dict(reference.state_dict())
    for m in (reference, fast):
        parametrizations.weight_norm(m, "weight_hh_l0")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for m in (reference, fast):
        for step in range(2):
            m.zero_grad()
            m(x)[0].sum().backward()
            with torch.no_grad():  # the parametrization's inputs change: a new weight each call
                m.parametrizations.weight_hh_l0.original1.mul_(1.1 + step)
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert list(grads[0]) == list(grads[1])
    for k in grads[0]:
        assert_close(grads[1][k], grads[0][k], np.float64, "grad", k)


def test_frozen_weights_and_input_only_gradient():
    torch.manual_seed(0)
    reference, fast = torch.nn.LSTM(3, 4, num_layers=2), ft.LSTM(3, 4, num_layers=2)
    fast.load_state_dict(reference.state_dict())
    for m in (reference, fast):
        m.requires_grad_(False)
        m.bias_ih_l1.requires_grad_(True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    got = []
    for m in (reference, fast):
        x.grad = None
        m(x)[0].sum().backward()
        got.append((x.grad.clone(), m.bias_ih_l1.grad.clone(), m.weight_ih_l0.grad))
    assert got[1][2] is None
    assert_close(got[1][0], got[0][0], np.float32, "grad", "dx")
    assert_close(got[1][1], got[0][1], np.float32, "grad", "bias_ih_l1")


# --------------------------------------------------------------------------- autograd behaviour


def test_no_grad_and_inference_mode():
    torch.manual_seed(0)
    reference, fast = torch.nn.LSTM(3, 4), ft.LSTM(3, 4)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3)
    expected = reference(x)[0].detach()
    with torch.no_grad():
        out, (h, c) = fast(x)
    assert out.grad_fn is None and not out.requires_grad
    assert_close(out, expected, np.float32, "fwd", "no_grad")
    with torch.inference_mode():
        out = fast(torch.randn(5, 2, 3) * 0 + x)[0]  # an inference tensor as input
    assert_close(out, expected, np.float32, "fwd", "inference_mode")
    out = fast(x)[0]  # grad mode again, parameters require grad: a graph is recorded
    assert out.grad_fn is not None


def test_two_forwards_before_one_backward():
    """Each call keeps its own tape: the module's two calls are backpropagated together."""
    torch.manual_seed(0)
    reference, fast = torch.nn.GRU(3, 3, num_layers=2), ft.GRU(3, 3, num_layers=2)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(4, 2, 3, requires_grad=True)
    results = []
    for m in (reference, fast):
        x.grad = None
        m.zero_grad()
        first, h = m(x)
        second, _ = m(first.tanh(), h)  # the second call consumes the first's outputs
        (first.sum() + 2 * second.sum()).backward()
        results.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert_close(b, a, np.float32, "grad", "grad")


def test_second_backward_through_one_forward():
    """retain_graph=True: the second backward runs the forward again; like torch.nn, an
    in-place change of a saved input in between is an error."""
    torch.manual_seed(0)
    m = ft.LSTM(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3, requires_grad=True)
    loss = m(x)[0].sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    loss.backward(retain_graph=True)  # the same dropout masks: the gradients double
    second = [x.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(first, second):
        assert_close(b, 2 * a, np.float32, "grad", "second backward")
    with torch.no_grad():
        m.weight_hh_l1.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------ higher-order and batched gradients


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_double_backward_of_a_gradient_penalty_matches_torch_nn(kind):
    """create_graph=True (a gradient penalty on dL/dx): the gradient is differentiable and its
    contribution to the weights' gradients matches torch.nn, also for a loss linear in the
    outputs, whose dL/dout does not require grad."""
    torch.manual_seed(0)
    reference = getattr(torch.nn, kind)(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    fast = getattr(ft, kind)(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    fast.load_state_dict(reference.state_dict())
    x0 = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for m in (reference, fast):
        x = x0.clone().requires_grad_()
        for loss_of in (torch.sum, lambda out: out.square().sum()):
            m.zero_grad()
            loss = loss_of(m(x)[0])
            (dx,) = torch.autograd.grad(loss, x, create_graph=True)
            assert dx.requires_grad
            (loss + dx.square().sum()).backward()
            results.append([p.grad.clone() for p in m.parameters()])
    half = len(results) // 2
    for want, got in zip(results[:half], results[half:]):
        for a, b in zip(want, got):
            assert_close(b, a, np.float64, "grad", "penalty")


def test_double_backward_of_a_packed_projected_lstm_matches_torch_nn():
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    reference, fast = torch.nn.LSTM(3, 4, **kwargs), ft.LSTM(3, 4, **kwargs)
    fast.load_state_dict(reference.state_dict())
    x0 = torch.randn(5, 3, 3, dtype=torch.float64)
    results = []
    for m in (reference, fast):
        x = x0.clone().requires_grad_()
        packed = pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False)
        out, (h_n, c_n) = m(packed)
        loss = out.data.sum() + h_n.square().sum() + c_n.sum()
        (dx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + dx.square().sum()).backward()
        results.append([p.grad.clone() for p in m.parameters()])
    for want, got in zip(*results):
        assert_close(got, want, np.float64, "grad", "penalty")


def test_hessian_and_batched_jacobian_match_torch_nn():
    reference, fast = gru_twins()
    x = torch.randn(3, 1, 3, dtype=torch.float64)
    want = torch.autograd.functional.hessian(lambda t: reference(t)[0].sum(), x)
    got = torch.autograd.functional.hessian(lambda t: fast(t)[0].sum(), x)
    assert want.abs().max() > 0
    assert_close(got, want, np.float64, "grad", "hessian")
    want = torch.autograd.functional.jacobian(lambda t: reference(t)[0], x, vectorize=True)
    got = torch.autograd.functional.jacobian(lambda t: fast(t)[0], x, vectorize=True)
    assert_close(got, want, np.float64, "grad", "jacobian")
    x.requires_grad_()
    v = torch.randn(4, 3, 1, 4, dtype=torch.float64)
    want = torch.autograd.grad(reference(x)[0], x, v, is_grads_batched=True)[0]
    got = torch.autograd.grad(fast(x)[0], x, v, is_grads_batched=True)[0]
    assert_close(got, want, np.float64, "grad", "is_grads_batched")


def test_double_backward_with_dropout_in_training_is_a_clear_error():
    fast = ft.LSTM(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot repeat fastrnn's dropout masks"):
        torch.autograd.grad(fast(x)[0].sum(), x, create_graph=True)
    fast.eval()
    (dx,) = torch.autograd.grad(fast(x)[0].sum(), x, create_graph=True)
    assert dx.requires_grad


# torch's forward-mode AD of its RNN operators scripts a helper with TorchScript.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_falls_back_to_torch():
    import torch.autograd.forward_ad as fwad

    reference, fast = gru_twins()
    x, tangent = (
        torch.randn(5, 2, 3, dtype=torch.float64),
        torch.randn(5, 2, 3, dtype=torch.float64),
    )
    with fwad.dual_level():
        want = fwad.unpack_dual(reference(fwad.make_dual(x, tangent))[0]).tangent
        with pytest.warns(ft.FastRNNFallbackWarning, match="forward-mode AD"):
            got = fwad.unpack_dual(fast(fwad.make_dual(x, tangent))[0]).tangent
    assert got is not None
    assert_close(got.detach(), want.detach(), np.float64, "grad", "tangent")


def test_dropout_between_layers():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(3, 4, num_layers=3, dropout=1.0, dtype=torch.float64)
    fast = ft.LSTM(3, 4, num_layers=3, dropout=1.0, dtype=torch.float64)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    # p = 1 drops everything on both sides: a deterministic comparison of the training path
    results = []
    for m in (reference, fast):
        x.grad = None
        m.zero_grad()
        out, (h, c) = m(x)
        (out.sum() + h.sum()).backward()
        results.append([out, h, c] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert_close(b.detach(), a.detach(), np.float64, "grad", "dropout=1")

    fast.dropout = 0.5
    torch.manual_seed(3)
    first = fast(x)[0]
    torch.manual_seed(3)
    again = fast(x)[0]
    assert torch.equal(first, again)  # seeded by torch's generator
    assert not torch.equal(first, fast(x)[0])  # fresh masks per call
    fast.eval()
    reference.eval()
    assert_close(fast(x)[0].detach(), reference(x)[0].detach(), np.float64, "fwd", "eval")

    fast.train()

    def seeded(x):
        torch.manual_seed(5)  # the same masks for every gradcheck evaluation
        return fast(x)[0]

    assert torch.autograd.gradcheck(seeded, (x,))


# ---------------------------------------------------------------------------------- state, copies


def test_state_dict_round_trip():
    torch.manual_seed(0)
    fast = ft.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    plain = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(5, 2, 3)
    assert_close(fast(x)[0].detach(), plain(x)[0].detach(), np.float32, "fwd", "to torch.nn")
    back = ft.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    back.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), fast.parameters()))


def test_deepcopy_and_pickle():
    torch.manual_seed(0)
    fast = ft.GRU(3, 4, bidirectional=True)
    x = torch.randn(5, 2, 3)
    expected = fast(x)[0].detach()
    clone = copy.deepcopy(fast)
    restored = pickle.loads(pickle.dumps(fast))
    for m in (clone, restored):
        assert type(m) is ft.GRU
        assert torch.equal(m(x)[0].detach(), expected)
    with torch.no_grad():
        clone.weight_hh_l0.zero_()
    assert not torch.equal(clone(x)[0], expected)
    assert torch.equal(fast(x)[0].detach(), expected)  # the original is untouched


# Exporters and tracers (torch.jit.trace and the ONNX export built on it, torch.export) get
# torch's own operator, silently: fastrnn's C++ call is invisible to them, and torch.jit.trace
# recorded its outputs and the weights as constants (its check then failed on a second run).
# torch.compile runs fastrnn between its graphs.
TRACED_OPERATOR = {"LSTM": "aten::lstm", "GRU": "aten::gru", "RNN": "aten::rnn_tanh"}


def _fast_and_plain(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    fast = getattr(ft, kind)(3, 4, num_layers=2, bidirectional=True)
    plain = getattr(torch.nn, kind)(3, 4, num_layers=2, bidirectional=True)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _without_torchs_tracing_notices(test):
    """torch's own notices, as for torch.nn's modules: TorchScript's deprecation, the tracer's
    note on Python values in torch.nn.RNNBase's checks, and torch.export's note that it assigns
    its list of weights."""
    for spec in (
        "ignore:`torch.jit.",  # trace, trace_method and script are deprecated
        "ignore:The feature will be removed",
        "ignore:You are using the legacy TorchScript-based ONNX export",
        "ignore::torch.jit.TracerWarning",
        "ignore:The tensor attributes self._flat_weights",
    ):
        test = pytest.mark.filterwarnings(spec)(test)
    return test


@_without_torchs_tracing_notices
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_jit_trace_records_torchs_operator_reading_the_parameters(kind):
    fast, plain = _fast_and_plain(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FastRNNFallbackWarning)  # a silent fallback
        traced = torch.jit.trace(fast, torch.randn(5, 2, 3))  # and its check of a second run
    assert TRACED_OPERATOR[kind] in str(traced.graph)
    with torch.no_grad():  # the trace reads the parameters, not copies of them
        fast.weight_hh_l0.mul_(0.5)
        plain.weight_hh_l0.mul_(0.5)
    x = torch.randn(7, 2, 3)
    assert_close(traced(x)[0].detach(), plain(x)[0].detach(), np.float32, "fwd", kind)
    assert_close(fast(x)[0].detach(), plain(x)[0].detach(), np.float32, "fwd", kind)


@_without_torchs_tracing_notices
@pytest.mark.filterwarnings("ignore:Exporting a model to ONNX with a batch_size other than 1")
def test_onnx_export_runs_in_onnx_runtime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    fast, plain = _fast_and_plain("LSTM")
    path = str(tmp_path / "lstm.onnx")
    torch.onnx.export(fast, (torch.randn(5, 2, 3),), path, dynamo=False, input_names=["x"])
    x = torch.randn(5, 2, 3)
    out = ort.InferenceSession(path).run(None, {"x": x.numpy()})[0]
    assert_close(out, plain(x)[0].detach().numpy(), np.float32, "fwd", "ONNX Runtime")


@_without_torchs_tracing_notices
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_torch_export_records_torchs_operator(kind):
    fast, plain = _fast_and_plain(kind)
    exported = torch.export.export(fast, (torch.randn(5, 2, 3),)).module()
    assert TRACED_OPERATOR[kind].replace("::", ".") in str(exported.graph)
    x = torch.randn(5, 2, 3)  # the shapes it was exported with
    assert_close(exported(x)[0].detach(), plain(x)[0].detach(), np.float32, "fwd", kind)


@_without_torchs_tracing_notices
def test_torch_compile_runs_fastrnn_between_its_graphs(monkeypatch):
    """Dynamo runs torch.nn's RNN modules outside its graphs: there, fastrnn's kernels."""
    torch.manual_seed(0)
    plain = Tagger()
    model = ft.patch(copy.deepcopy(plain))
    calls = []
    numpy_forward = ft._numpy_forward
    monkeypatch.setattr(
        ft, "_numpy_forward", lambda *a, **k: calls.append(1) or numpy_forward(*a, **k)
    )
    compiled = torch.compile(model, backend="aot_eager")  # AOTAutograd, no C++ compiler run
    x = torch.randn(2, 5, 6, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    out, expected = compiled(x), plain(x_plain)
    assert len(calls) == 2  # the encoder and the decoder
    assert_close(out.detach(), expected.detach(), np.float32, "fwd", "torch.compile")
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert_close(x.grad, x_plain.grad, np.float32, "grad", "dx")
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert_close(a.grad, b.grad, np.float32, "grad", name)


@_without_torchs_tracing_notices
def test_jit_script_raises_a_clear_error():
    with pytest.raises(
        TypeError, match=r"torch.jit.script cannot compile fastrnn.torch.GRU.*nn.GRU"
    ):
        torch.jit.script(ft.GRU(3, 4))


def test_importing_fastrnn_does_not_import_torch_nor_fastrnn_torch_dynamo():
    import subprocess
    import sys

    # torch.compile's Dynamo takes a second to import: only torch.compile should load it.
    code = (
        "import sys, fastrnn; assert 'torch' not in sys.modules; import fastrnn.torch; "
        "assert 'torch._dynamo' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parallel_regions_run_on_torchs_openmp_team():
    """Importing fastrnn.torch moves fastrnn's regions onto torch's OpenMP threads (where torch
    uses OpenMP and /proc shows its runtime); the results do not depend on which team runs them."""
    from fastrnn import _core

    library = _core._openmp_library()
    if "parallel backend: OpenMP" in torch.__config__.parallel_info() and os.path.exists(
        "/proc/self/maps"
    ):
        assert os.path.basename(library).startswith(("libgomp", "libiomp5", "libomp"))
    if not library:
        pytest.skip("torch runs no OpenMP runtime fastrnn can use here")
    previous_threads = fastrnn.get_num_threads()
    previous_torch = torch.get_num_threads()
    fastrnn.set_num_threads(2)
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        m = ft.LSTM(16, 130, num_layers=2, bidirectional=True)
        x = torch.randn(6, 3, 16, requires_grad=True)
        results = []
        for team in (library, ""):
            _core._use_openmp(team)
            m.zero_grad()
            x.grad = None
            out, _ = m(x)
            (out * out).sum().backward()
            results.append([out.detach(), x.grad, *(p.grad for p in m.parameters())])
    finally:
        _core._use_openmp(library)
        fastrnn.set_num_threads(previous_threads)
        torch.set_num_threads(previous_torch)
    for a, b in zip(*results):
        assert_close(a, b, np.float32, "grad")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_on_fastrnns_own_workers():
    """GNU OpenMP's team does not survive a fork: the child must not start a region on it."""
    import subprocess
    import sys

    code = """
import os, torch, fastrnn, fastrnn.torch as ft
from fastrnn import _core
fastrnn.set_num_threads(2)
m = ft.LSTM(16, 130)
x = torch.randn(5, 2, 16)
expected = m(x)[0]  # a region on torch's team in the parent
pid = os.fork()
if pid == 0:
    ok = _core._openmp_library() == "" and torch.equal(m(x)[0], expected)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()


def test_python_threads_at_once_on_torchs_team():
    """Calls from several Python threads while regions run on torch's OpenMP team: one call has
    the team, the others run on their own threads; no deadlock, the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    previous = fastrnn.get_num_threads()
    fastrnn.set_num_threads(2)
    try:
        torch.manual_seed(0)
        modules = [ft.GRU(16, 130, bidirectional=i % 2 == 1) for i in range(4)]
        x = torch.randn(6, 3, 16)

        def run(m):
            m.zero_grad()
            out, _ = m(x)
            out.square().sum().backward()
            return [out.detach(), *(p.grad.clone() for p in m.parameters())]

        serial = [run(m) for m in modules]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                for got, want in zip(pool.map(run, modules), serial):
                    for a, b in zip(got, want):
                        assert_close(a, b, np.float32, "grad")
    finally:
        fastrnn.set_num_threads(previous)

"""The layer options (num_layers, bidirectional, dropout, proj_size, lengths=), fastrnn.GRU and
the cells: parity with torch.nn, variable-length semantics, cells, dropout and state_dict.

The torch tests are skipped when torch is missing; every other test runs without it.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

import fastrnn
from conftest import DTYPE_IDS, DTYPES, ISAS, assert_close

try:
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
except ImportError:  # the non-torch tests still run
    torch = None

requires_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

# torch's float32 LSTM with proj_size tells that it does not use oneDNN: not ours to report.
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
)

#: "lstm_proj" is an LSTM with proj_size > 0.
KINDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]
CELL_KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def is_lstm(kind):
    return kind.startswith("lstm")


def proj_for(kind, hidden_size):
    """The proj_size used for ``kind`` at this hidden size (0 unless "lstm_proj")."""
    return hidden_size // 3 + 1 if kind == "lstm_proj" else 0


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """torch on one thread: small problems, and its pool does not compete with fastrnn's."""
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- builders


def make_layer(kind, input_size, hidden_size, *, dtype=np.float64, seed=0, **options):
    """A fastrnn layer of ``kind``; options are torch.nn's (num_layers, bidirectional, ...)."""
    if is_lstm(kind):
        return fastrnn.LSTM(
            input_size,
            hidden_size,
            proj_size=proj_for(kind, hidden_size),
            dtype=dtype,
            seed=seed,
            **options,
        )
    if kind == "gru":
        return fastrnn.GRU(input_size, hidden_size, dtype=dtype, seed=seed, **options)
    return fastrnn.RNN(
        input_size, hidden_size, nonlinearity=kind[4:], dtype=dtype, seed=seed, **options
    )


def make_torch(kind, input_size, hidden_size, *, dtype=np.float64, seed=0, **options):
    """The torch.nn twin of ``make_layer`` (its own random weights)."""
    torch.manual_seed(seed)
    tdtype = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
    if is_lstm(kind):
        return torch.nn.LSTM(
            input_size, hidden_size, proj_size=proj_for(kind, hidden_size), dtype=tdtype, **options
        )
    if kind == "gru":
        return torch.nn.GRU(input_size, hidden_size, dtype=tdtype, **options)
    return torch.nn.RNN(input_size, hidden_size, nonlinearity=kind[4:], dtype=tdtype, **options)


def to_numpy_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def make_pair(kind, input_size, hidden_size, *, dtype, seed=0, **options):
    """A torch module and a fastrnn layer holding the torch module's weights."""
    tm = make_torch(kind, input_size, hidden_size, dtype=dtype, seed=seed, **options)
    fm = make_layer(kind, input_size, hidden_size, dtype=dtype, seed=seed + 1, **options)
    fm.load_state_dict(to_numpy_state(tm))
    return tm, fm


def state_sizes(layer):
    """(size of h, size of c) per direction."""
    return (layer.proj_size or layer.hidden_size), layer.hidden_size


def random_states(layer, rng, batch):
    """Random (h, c) of the layer's state shapes; batch None: unbatched. c is None but LSTM."""
    units = layer.num_layers * (2 if layer.bidirectional else 1)
    h_size, c_size = state_sizes(layer)
    lead = (units,) if batch is None else (units, batch)
    h = rng.standard_normal(lead + (h_size,)).astype(layer.dtype)
    c = rng.standard_normal(lead + (c_size,)).astype(layer.dtype) if layer._gates == 4 else None
    return h, c


def hx_arg(layer, h, c):
    return (h, c) if isinstance(layer, fastrnn.LSTM) else h


def call(layer, x, h=None, c=None, lengths=None):
    """Forward -> (out, h_n, c_n or None) for every kind; h None means hx=None."""
    hx = None if h is None else hx_arg(layer, h, c)
    result = layer(x, hx, lengths=lengths)
    if isinstance(layer, fastrnn.LSTM):
        out, (h_n, c_n) = result
        return out, h_n, c_n
    out, h_n = result
    return out, h_n, None


def back(layer, grad_out, gh=None, gc=None):
    """Backward -> (dx, dh0, dc0 or None) for every kind; gh and gc None means no grad_state."""
    if isinstance(layer, fastrnn.LSTM):
        grad_state = None if gh is None and gc is None else (gh, gc)
        dx, (dh0, dc0) = layer.backward(grad_out, grad_state)
        return dx, dh0, dc0
    dx, dh0 = layer.backward(grad_out, gh)
    return dx, dh0, None


def copy_grads(layer):
    return {k: v.copy() for k, v in layer.grads.items()}


def output_shape(layer, x):
    features = (2 if layer.bidirectional else 1) * state_sizes(layer)[0]
    return x.shape[:-1] + (features,)


def make_lengths(rng, batch, steps, with_zero):
    """Unsorted lengths in [1, steps] (with a 0 if with_zero) that include steps and 1."""
    lengths = rng.integers(1, steps + 1, batch)
    lengths[0], lengths[-1] = 1, steps
    if with_zero:
        lengths[1] = 0
    lengths = rng.permutation(lengths)
    if with_zero:  # keep at least one sequence of every kind, unsorted
        assert 0 in lengths and steps in lengths
    return lengths.astype(np.int64)


# --------------------------------------------------------------------------- torch runner


def leaf(a):
    return torch.tensor(a, requires_grad=True)


def run_torch(tm, kind, x, h0, c0, lengths, gout, gh, gc, *, steps):
    """torch forward and backward of sum(out*gout) + sum(h_n*gh) + sum(c_n*gc) (None: no term).

    h0/c0 are always given (zeros stand for hx=None) so that torch returns their gradients.
    lengths (no zeros: torch rejects them) go through pack_padded_sequence(enforce_sorted=False)
    and pad_packed_sequence(total_length=steps). Returns numpy results keyed like ``compare``."""
    lstm = is_lstm(kind)
    tx, th0 = leaf(x), leaf(h0)
    tc0 = leaf(c0) if lstm else None
    hx = (th0, tc0) if lstm else th0
    if lengths is None:
        out, state = tm(tx, hx)
    else:
        packed = pack_padded_sequence(
            tx, torch.as_tensor(lengths), batch_first=tm.batch_first, enforce_sorted=False
        )
        packed_out, state = tm(packed, hx)
        out, _ = pad_packed_sequence(packed_out, batch_first=tm.batch_first, total_length=steps)
    h_n, c_n = state if lstm else (state, None)
    terms = []
    if gout is not None:
        terms.append((out * torch.from_numpy(gout)).sum())
    if gh is not None:
        terms.append((h_n * torch.from_numpy(gh)).sum())
    if gc is not None and lstm:
        terms.append((c_n * torch.from_numpy(gc)).sum())
    sum(terms).backward()
    result = {
        "out": out.detach().numpy(),
        "h_n": h_n.detach().numpy(),
        "dx": tx.grad.numpy(),
        "dh0": th0.grad.numpy(),
        "grads": {k: p.grad.numpy() for k, p in tm.named_parameters()},
    }
    if lstm:
        result["c_n"] = c_n.detach().numpy()
        result["dc0"] = tc0.grad.numpy()
    return result


def run_torch_with_empty(tm, kind, x, h0, c0, lengths, gout, gh, gc, *, steps):
    """``run_torch`` where lengths may hold zeros: torch runs the other sequences, and the empty
    ones are what the semantics say: out 0, h_n = h0, c_n = c0, dx 0, dh0 = gh, dc0 = gc."""
    lengths = np.asarray(lengths)
    keep = np.flatnonzero(lengths)
    xb = 0 if tm.batch_first else 1  # the batch axis of x and out

    def sub(a, axis):
        return None if a is None else np.ascontiguousarray(np.take(a, keep, axis=axis))

    part = run_torch(
        tm,
        kind,
        sub(x, xb),
        sub(h0, 1),
        sub(c0, 1),
        lengths[keep],
        sub(gout, xb),
        sub(gh, 1),
        sub(gc, 1),
        steps=steps,
    )

    def put(full, value, axis):
        index = [slice(None)] * full.ndim
        index[axis] = keep
        full[tuple(index)] = value
        return full

    out_shape = list(gout.shape if gout is not None else part["out"].shape)
    out_shape[xb] = x.shape[xb]
    result = {
        "out": put(np.zeros(out_shape, x.dtype), part["out"], xb),
        "h_n": put(h0.copy(), part["h_n"], 1),
        "dx": put(np.zeros_like(x), part["dx"], xb),
        "dh0": put(np.zeros_like(h0) if gh is None else gh.copy(), part["dh0"], 1),
        "grads": part["grads"],
    }
    if is_lstm(kind):
        result["c_n"] = put(c0.copy(), part["c_n"], 1)
        result["dc0"] = put(np.zeros_like(c0) if gc is None else gc.copy(), part["dc0"], 1)
    return result


def compare(actual, expected, dtype):
    for key in ("out", "h_n", "c_n"):
        if key in expected:
            assert_close(actual[key], expected[key], dtype, "fwd", key)
    for key in ("dx", "dh0", "dc0"):
        if key in expected:
            assert_close(actual[key], expected[key], dtype, "grad", key)
    assert list(actual["grads"]) == list(expected["grads"])
    for name, grad in expected["grads"].items():
        assert_close(actual["grads"][name], grad, dtype, "grad", f"grads[{name!r}]")


# --------------------------------------------------------------------------- 1. torch parity

#: Option values. The cases cover every pair of values of two options, and every triple of the
#: options in TRIPLES (where the direction, the lengths and the kind of cell meet); the dtype and
#: ISA parametrization multiplies them all.
FACTORS = {
    "kind": KINDS,
    "num_layers": [1, 2, 3],
    "bidirectional": [False, True],
    "bias": [True, False],
    "batch_first": [False, True],
    "hx": [True, False],
    # padded: 3-D x without lengths; lengths: unsorted, all >= 1; lengths0: some are 0
    "input": ["padded", "unbatched", "lengths", "lengths0"],
    # all: grad_out and grad_state; out: grad_state=None; state: grad_out=None
    "grads": ["all", "out", "state"],
}
TRIPLES = [("kind", "bidirectional", "input"), ("num_layers", "bidirectional", "input")]


def interactions(factors, triples):
    """The groups of options whose value combinations must all appear."""
    return list(itertools.combinations(factors, 2)) + [tuple(t) for t in triples]


def covering_array(factors, triples):
    """A greedy covering array: deterministic; every combination of values of every group of
    ``interactions(factors, triples)`` appears in some case."""
    groups = interactions(factors, triples)
    candidates = [dict(zip(factors, v)) for v in itertools.product(*factors.values())]
    covers = [{tuple((n, c[n]) for n in g) for g in groups} for c in candidates]
    uncovered = set().union(*covers)
    chosen = []
    while uncovered:
        best = max(range(len(candidates)), key=lambda i: len(covers[i] & uncovered))
        chosen.append(candidates[best])
        uncovered -= covers[best]
    return chosen


@dataclass(frozen=True)
class Case:
    kind: str
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    hx: bool
    input: str
    grads: str
    IN: int
    H: int
    B: int
    T: int

    @property
    def id(self):
        return "-".join(
            [
                self.kind,
                f"L{self.num_layers}",
                "bi" if self.bidirectional else "uni",
                "bias" if self.bias else "nobias",
                "bf" if self.batch_first else "tm",
                "hx" if self.hx else "nohx",
                self.input,
                f"g{self.grads}",
                f"I{self.IN}H{self.H}B{self.B}T{self.T}",
            ]
        )

    @property
    def options(self):
        return dict(
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            bias=self.bias,
            batch_first=self.batch_first,
        )


def _covering_cases():
    cases = []
    for i, combo in enumerate(covering_array(FACTORS, TRIPLES)):
        # odd sizes: SIMD tails in every ISA
        cases.append(
            Case(
                **combo, IN=(5, 11, 16)[i % 3], H=(9, 17, 33)[(i + 1) % 3], B=3 + i % 3, T=4 + i % 4
            )
        )
    return cases


CASES = _covering_cases()

#: Large enough that the C++ shares each time loop between 2 threads: batch split (a batch, or
#: packed batch_sizes[0], of >= 64) and hidden split (small batch, H=200). At batch 1 with H=232,
#: each thread's step is long enough to run whole, with the next block's input projection
#: computed alongside it (the side product), over a number of steps that leaves a partial block.
THREADED_CASES = [
    Case("lstm", 2, True, True, False, True, "lengths", "all", IN=17, H=33, B=70, T=20),
    Case("lstm_proj", 1, False, True, True, True, "padded", "all", IN=17, H=200, B=70, T=20),
    Case("lstm_proj", 2, True, False, False, False, "lengths0", "all", IN=9, H=200, B=3, T=20),
    Case("gru", 1, True, True, False, True, "padded", "all", IN=17, H=200, B=3, T=20),
    Case("gru", 2, False, True, True, True, "lengths0", "out", IN=33, H=65, B=70, T=20),
    Case("rnn_relu", 2, False, True, False, True, "lengths", "all", IN=17, H=200, B=5, T=20),
    Case("rnn_tanh", 1, True, False, False, False, "padded", "state", IN=9, H=33, B=130, T=20),
    Case("lstm", 2, True, True, False, True, "unbatched", "all", IN=72, H=232, B=1, T=23),
    Case("gru", 1, True, False, True, False, "padded", "all", IN=40, H=232, B=1, T=23),
    Case("rnn_relu", 1, False, True, False, True, "lengths", "all", IN=300, H=232, B=1, T=13),
]


def run_case(case, dtype, rng, also_eval=False):
    """torch's and fastrnn's training forward and backward of ``case``; ``also_eval``: then an
    eval-mode forward of the layer, against torch's outputs."""
    tm, fm = make_pair(case.kind, case.IN, case.H, dtype=dtype, seed=7, **case.options)
    assert list(fm.state_dict()) == list(tm.state_dict())
    lstm = is_lstm(case.kind)
    unbatched = case.input == "unbatched"
    if unbatched:
        x_shape = (case.T, case.IN)
    elif case.batch_first:
        x_shape = (case.B, case.T, case.IN)
    else:
        x_shape = (case.T, case.B, case.IN)
    x = rng.standard_normal(x_shape).astype(dtype)
    h0, c0 = random_states(fm, rng, None if unbatched else case.B)
    if not case.hx:
        h0 = np.zeros_like(h0)
        c0 = None if c0 is None else np.zeros_like(c0)
    gout = rng.standard_normal(output_shape(fm, x)).astype(dtype)
    gh, gc = random_states(fm, rng, None if unbatched else case.B)
    if case.grads == "out":
        gh = gc = None
    elif case.grads == "state":
        gout = None
    lengths = None
    if case.input.startswith("lengths"):
        lengths = make_lengths(rng, case.B, case.T, with_zero=case.input == "lengths0")

    runner = run_torch_with_empty if case.input == "lengths0" else run_torch
    expected = runner(tm, case.kind, x, h0, c0, lengths, gout, gh, gc, steps=case.T)

    out, h_n, c_n = call(fm, x, h0 if case.hx else None, c0 if case.hx else None, lengths)
    dx, dh0, dc0 = back(fm, gout, gh, gc)
    actual = {"out": out, "h_n": h_n, "dx": dx, "dh0": dh0, "grads": fm.grads}
    if lstm:
        actual.update(c_n=c_n, dc0=dc0)
    for name in ("out", "h_n", "dx", "dh0", "c_n", "dc0"):
        if name in actual:
            assert actual[name].dtype == np.dtype(dtype), name
    compare(actual, expected, dtype)
    if also_eval:
        fm.eval()
        out, h_n, c_n = call(fm, x, h0 if case.hx else None, c0 if case.hx else None, lengths)
        for name, value in (("out", out), ("h_n", h_n), ("c_n", c_n)):
            if name in expected:
                assert_close(value, expected[name], dtype, "fwd", f"eval {name}")


def test_cases_cover_every_combination():
    for group in interactions(FACTORS, TRIPLES):
        covered = {tuple(getattr(c, n) for n in group) for c in CASES}
        for values in itertools.product(*(FACTORS[n] for n in group)):
            assert values in covered, (group, values)
    assert len(CASES) < 60  # the runtime budget


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch(isa, case, dtype, rng):
    run_case(case, dtype, rng)


@pytest.fixture
def two_threads():
    previous = fastrnn.get_num_threads()
    fastrnn.set_num_threads(2)
    yield
    fastrnn.set_num_threads(previous)


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", THREADED_CASES, ids=[c.id for c in THREADED_CASES])
def test_matches_torch_threaded(isa, case, dtype, rng, two_threads):
    run_case(case, dtype, rng)


#: The multiply-adds of a random case's forward (layers x directions x T x B x H x (I + H)) are
#: at most this: up to about 0.5 s for torch's float64 training on one thread.
RANDOM_CASE_WORK = 6 * 10**7


def random_case(rng):
    """A Case with every option drawn at random, at sizes that reach the kernels' paths: odd
    sizes (SIMD tails); batch 1 with hidden sizes on both sides of where 2 threads run whole steps
    with the next block's input projection alongside (an LSTM from H = 177); batches that 2
    threads split (64 rows or more); lengths, where the active rows shrink step by step."""
    kind = str(rng.choice(KINDS))
    form = str(rng.choice(["padded", "unbatched", "lengths", "lengths0"]))
    num_layers = int(rng.integers(1, 4))
    bidirectional = bool(rng.integers(2))
    hidden = int(rng.integers(177, 261) if rng.integers(2) else rng.integers(2, 41))
    input_size = int(rng.integers(1, 81))
    if form == "unbatched":
        batch = 1
    else:  # make_lengths keeps sequences of length 1 and T, and with lengths0 one of length 0
        batch = int(rng.choice([rng.integers(3, 21), rng.integers(64, 81)]))
    per_step = num_layers * (2 if bidirectional else 1) * batch * hidden * (input_size + hidden)
    steps = int(rng.integers(1, max(1, min(12, RANDOM_CASE_WORK // per_step)) + 1))
    return Case(
        kind,
        num_layers,
        bidirectional,
        bool(rng.integers(2)),
        bool(rng.integers(2)),
        bool(rng.integers(2)),
        form,
        str(rng.choice(["all", "out", "state"])),
        IN=input_size,
        H=hidden,
        B=batch,
        T=steps,
    )


#: (case, dtype, ISA, threads): the same cases on every run; every combination of dtype, ISA
#: and thread count recurs.
RANDOM_CASES = [
    (
        random_case(np.random.default_rng([2026, i])),
        DTYPES[i % 2],
        ISAS[i // 2 % len(ISAS)],
        1 + i // 4 % 2,
    )
    for i in range(64)
]


@requires_torch
@pytest.mark.parametrize(
    "case, dtype, isa, threads",
    RANDOM_CASES,
    ids=[f"{c.id}-{np.dtype(d).name}-{i}-t{t}" for c, d, i, t in RANDOM_CASES],
    indirect=["isa"],  # the isa fixture sets each case's ISA and restores the previous one
)
def test_random_cases_match_torch(case, dtype, isa, threads, rng, restore_threads):
    """Every option at random sizes, on every ISA, on 1 and 2 threads: training forward and
    backward, then an eval forward, against torch."""
    fastrnn.set_num_threads(threads)
    run_case(case, dtype, rng, also_eval=True)


@requires_torch
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_eval_mode(isa, kind, rng):
    """Eval forwards (no training state kept) with every option at once, lengths and dropout."""
    dtype = np.float32
    options = dict(num_layers=3, bidirectional=True, dropout=0.5, batch_first=True)
    tm, fm = make_pair(kind, 7, 17, dtype=dtype, **options)
    tm.eval()
    fm.eval()
    x = rng.standard_normal((5, 6, 7)).astype(dtype)
    h0, c0 = random_states(fm, rng, 5)
    lengths = make_lengths(rng, 5, 6, with_zero=False)
    with torch.no_grad():
        hx = torch.from_numpy(h0) if c0 is None else (torch.from_numpy(h0), torch.from_numpy(c0))
        packed = pack_padded_sequence(
            torch.from_numpy(x), torch.as_tensor(lengths), batch_first=True, enforce_sorted=False
        )
        t_out, t_state = tm(packed, hx)
        t_out = pad_packed_sequence(t_out, batch_first=True, total_length=6)[0]
    out, h_n, c_n = call(fm, x, h0, c0, lengths)
    assert_close(out, t_out.numpy(), dtype, "fwd", "out")
    if c0 is None:
        assert_close(h_n, t_state.numpy(), dtype, "fwd", "h_n")
    else:
        assert_close(h_n, t_state[0].numpy(), dtype, "fwd", "h_n")
        assert_close(c_n, t_state[1].numpy(), dtype, "fwd", "c_n")
    with pytest.raises(RuntimeError, match="backward"):
        back(fm, np.zeros_like(out))


# --------------------------------------------------------------------------- 2. lengths


#: (T, B, I, H): long enough that the inputs are projected in several chunks (over 2**20 gate
#: values); and batch 1, where the input projection of each block of steps is computed alongside
#: the block before it, into two blocks of gates in turn, with a partial last block and steps long
#: enough (H=232) that two threads run them whole.
EVAL_ONE_LENGTH_SHAPES = [(600, 64, 5, 20), (23, 1, 40, 232)]


@requires_torch
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", EVAL_ONE_LENGTH_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_eval_bidirectional_one_length(
    isa, kind, shape, threads, rng, restore_threads
):
    """Eval forwards of sequences of one length, where the reverse direction reads x and writes
    its output in place (no reversed copies) and both directions write into one array: states
    given, two layers."""
    T, B, IN, H = shape
    dtype = np.float32
    fastrnn.set_num_threads(threads)
    tm, fm = make_pair(kind, IN, H, dtype=dtype, num_layers=2, bidirectional=True)
    tm.eval()
    fm.eval()
    x = rng.standard_normal((T, B, IN)).astype(dtype)
    h0, c0 = random_states(fm, rng, B)
    with torch.no_grad():
        hx = torch.from_numpy(h0) if c0 is None else (torch.from_numpy(h0), torch.from_numpy(c0))
        t_out, t_state = tm(torch.from_numpy(x), hx)
    out, h_n, c_n = call(fm, x, h0, c0)
    assert out.flags.c_contiguous and out.shape == t_out.shape
    assert_close(out, t_out.numpy(), dtype, "fwd", "out")
    t_h = t_state if c0 is None else t_state[0]
    assert_close(h_n, t_h.numpy(), dtype, "fwd", "h_n")
    if c0 is not None:
        assert_close(c_n, t_state[1].numpy(), dtype, "fwd", "c_n")


LENGTH_OPTIONS = [
    dict(num_layers=1, bidirectional=False),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, bidirectional=True, batch_first=True),
]
LENGTH_IDS = ["L1-uni", "L2-bi", "L3-bi-bf"]


def batch_axis(layer):
    return 0 if layer.batch_first else 1


def seq_slice(a, layer, b, length):
    """Sequence b of a layer-layout x/out/dx, its first ``length`` steps, kept 3-D (batch 1)."""
    if layer.batch_first:
        return a[b : b + 1, :length]
    return a[:length, b : b + 1]


@pytest.mark.parametrize("options", LENGTH_OPTIONS, ids=LENGTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_lengths_outputs_and_dx_past_end_are_exactly_zero(kind, options, rng):
    B, T = 6, 7
    layer = make_layer(kind, 5, 9, dtype=np.float32, **options)
    x_shape = (B, T, 5) if layer.batch_first else (T, B, 5)
    x = rng.standard_normal(x_shape).astype(np.float32)
    lengths = make_lengths(rng, B, T, with_zero=True)
    h0, c0 = random_states(layer, rng, B)
    out, _, _ = call(layer, x, h0, c0, lengths)
    gout = rng.standard_normal(out.shape).astype(np.float32)
    dx, _, _ = back(layer, gout, *random_states(layer, rng, B))
    steps = np.arange(T)
    past = steps[None, :] >= lengths[:, None]  # (B, T)
    if not layer.batch_first:
        past = past.T
    assert np.all(out[past] == 0)
    assert np.all(dx[past] == 0)
    if kind != "rnn_relu":  # relu outputs may be exactly 0
        assert np.all(out[~past] != 0)
        assert np.all(dx[~past] != 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", LENGTH_OPTIONS, ids=LENGTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_lengths_each_sequence_equals_running_it_alone(isa, kind, options, dtype, rng):
    """Forward, states and every gradient of each sequence equal those of the sequence run alone,
    cut at its length; the parameter gradients are the sum over the sequences."""
    B, T, IN, H = 5, 6, 4, 9
    layer = make_layer(kind, IN, H, dtype=dtype, **options)
    x_shape = (B, T, IN) if layer.batch_first else (T, B, IN)
    x = rng.standard_normal(x_shape).astype(dtype)
    lengths = make_lengths(rng, B, T, with_zero=False)
    h0, c0 = random_states(layer, rng, B)
    gh, gc = random_states(layer, rng, B)
    out, h_n, c_n = call(layer, x, h0, c0, lengths)
    gout = rng.standard_normal(out.shape).astype(dtype)
    dx, dh0, dc0 = back(layer, gout, gh, gc)
    batch_grads = copy_grads(layer)

    layer.zero_grad()
    for b, length in enumerate(lengths):
        state = slice(None), slice(b, b + 1)
        o, hn, cn = call(
            layer, seq_slice(x, layer, b, length), h0[state], None if c0 is None else c0[state]
        )
        d, dh, dc = back(
            layer,
            seq_slice(gout, layer, b, length),
            gh[state],
            None if gc is None else gc[state],
        )
        assert_close(seq_slice(out, layer, b, length), o, dtype, "fwd", f"out[{b}]")
        assert_close(h_n[state], hn, dtype, "fwd", f"h_n[{b}]")
        assert_close(seq_slice(dx, layer, b, length), d, dtype, "grad", f"dx[{b}]")
        assert_close(dh0[state], dh, dtype, "grad", f"dh0[{b}]")
        if c0 is not None:
            assert_close(c_n[state], cn, dtype, "fwd", f"c_n[{b}]")
            assert_close(dc0[state], dc, dtype, "grad", f"dc0[{b}]")
    for name, grad in layer.grads.items():  # accumulated over the B single-sequence backwards
        assert_close(batch_grads[name], grad, dtype, "grad", name)


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("options", LENGTH_OPTIONS, ids=LENGTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_length_zero_keeps_initial_state(kind, options, with_hx, rng):
    B, T = 5, 4
    layer = make_layer(kind, 3, 9, **options)
    x = rng.standard_normal((B, T, 3) if layer.batch_first else (T, B, 3))
    lengths = np.array([2, 0, 4, 0, 1])
    h0, c0 = random_states(layer, rng, B)
    if not with_hx:
        h0, c0 = np.zeros_like(h0), None if c0 is None else np.zeros_like(c0)
    out, h_n, c_n = call(layer, x, h0 if with_hx else None, c0 if with_hx else None, lengths)
    gh, gc = random_states(layer, rng, B)
    dx, dh0, dc0 = back(layer, rng.standard_normal(out.shape), gh, gc)
    empty = lengths == 0
    np.testing.assert_array_equal(h_n[:, empty], h0[:, empty])
    np.testing.assert_array_equal(dh0[:, empty], gh[:, empty])  # dL/dh_n passes straight to dh0
    if c0 is not None:
        np.testing.assert_array_equal(c_n[:, empty], c0[:, empty])
        np.testing.assert_array_equal(dc0[:, empty], gc[:, empty])
    assert not np.any(np.take(out, np.flatnonzero(empty), axis=batch_axis(layer)))
    assert not np.any(np.take(dx, np.flatnonzero(empty), axis=batch_axis(layer)))
    assert not np.array_equal(h_n[:, ~empty], h0[:, ~empty])  # the others did run


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_all_lengths_zero(kind, training, rng):
    """Nothing runs: out zeros, states are h0/c0 (zeros without hx), gradients pass through."""
    B, T = 3, 4
    layer = make_layer(kind, 3, 9, num_layers=2, bidirectional=True).train(training)
    x = rng.standard_normal((T, B, 3))
    lengths = np.zeros(B, np.int64)
    h0, c0 = random_states(layer, rng, B)
    out, h_n, c_n = call(layer, x, h0, c0, lengths)
    assert out.shape == output_shape(layer, x) and not np.any(out)
    np.testing.assert_array_equal(h_n, h0)
    if c0 is not None:
        np.testing.assert_array_equal(c_n, c0)
    out, h_n, c_n = call(layer, x, lengths=lengths)
    assert not np.any(out) and not np.any(h_n)
    if c0 is not None:
        assert c_n.shape == c0.shape and not np.any(c_n)
    if not training:
        return
    gh, gc = random_states(layer, rng, B)
    dx, dh0, dc0 = back(layer, rng.standard_normal(out.shape), gh, gc)
    assert dx.shape == x.shape and not np.any(dx)
    np.testing.assert_array_equal(dh0, gh)
    if gc is not None:
        np.testing.assert_array_equal(dc0, gc)
    for name, grad in layer.grads.items():
        assert not np.any(grad), name


@pytest.mark.parametrize("kind", KINDS)
def test_reverse_direction_starts_at_each_sequence_end(kind, rng):
    """Bidirectional: the reverse half of out at t=0 is the reverse final state, the forward
    half at t=length-1 the forward one; nothing past a sequence's end changes anything."""
    B, T, H = 4, 6, 9
    layer = make_layer(kind, 3, H, bidirectional=True)
    size = state_sizes(layer)[0]
    x = rng.standard_normal((T, B, 3))
    lengths = np.array([3, 6, 1, 4])
    out, h_n, c_n = call(layer, x, lengths=lengths)
    gout = rng.standard_normal(out.shape)
    dx, dh0, _ = back(layer, gout)
    grads = copy_grads(layer)
    for b, length in enumerate(lengths):
        np.testing.assert_array_equal(h_n[0, b], out[length - 1, b, :size])
        np.testing.assert_array_equal(h_n[1, b], out[0, b, size:])
    # garbage past each end: same results, bit for bit
    x2 = x.copy()
    gout2 = gout.copy()
    for b, length in enumerate(lengths):
        x2[length:, b] = 1e3 * rng.standard_normal((T - length, 3))
        gout2[length:, b] = 1e3
    layer.zero_grad()
    out2, h_n2, c_n2 = call(layer, x2, lengths=lengths)
    dx2, dh02, _ = back(layer, gout2)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(h_n2, h_n)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dh02, dh0)
    for name, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, grads[name], err_msg=name)
    # the reverse direction of a short sequence differs from a full-length run's
    out_full, _, _ = call(layer, x)
    assert not np.allclose(out_full[0, 0, size:], out[0, 0, size:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_lengths_all_full_equals_no_lengths(isa, kind, dtype, rng):
    B, T = 4, 5
    layer = make_layer(kind, 6, 17, dtype=dtype, num_layers=2, bidirectional=True)
    x = rng.standard_normal((T, B, 6)).astype(dtype)
    h0, c0 = random_states(layer, rng, B)
    gh, gc = random_states(layer, rng, B)
    results = []
    for lengths in (None, [T] * B):
        layer.zero_grad()
        out, h_n, c_n = call(layer, x, h0, c0, lengths)
        dx, dh0, dc0 = back(layer, np.ones_like(out), gh, gc)
        results.append((out, h_n, c_n, dx, dh0, dc0, copy_grads(layer)))
    (out, h_n, c_n, dx, dh0, dc0, grads), expected = results[1], results[0]
    assert_close(out, expected[0], dtype, "fwd", "out")
    assert_close(h_n, expected[1], dtype, "fwd", "h_n")
    assert_close(dx, expected[3], dtype, "grad", "dx")
    assert_close(dh0, expected[4], dtype, "grad", "dh0")
    if c_n is not None:
        assert_close(c_n, expected[2], dtype, "fwd", "c_n")
        assert_close(dc0, expected[5], dtype, "grad", "dc0")
    for name, grad in grads.items():
        assert_close(grad, expected[6][name], dtype, "grad", name)


LENGTH_TYPES = ["list", "int32", "int64", "uint8", "tuple", "torch"]


@pytest.mark.parametrize("as_type", LENGTH_TYPES)
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_lengths_types(kind, as_type, rng):
    B, T = 4, 5
    values = [5, 2, 0, 3]
    if as_type == "torch":
        if torch is None:
            pytest.skip("torch is not installed")
        lengths = torch.tensor(values)
    elif as_type == "list":
        lengths = values
    elif as_type == "tuple":
        lengths = tuple(values)
    else:
        lengths = np.array(values, dtype=as_type)
    layer = make_layer(kind, 3, 9, num_layers=2, bidirectional=True, batch_first=True)
    x = rng.standard_normal((B, T, 3))
    out_ref, h_ref, _ = call(layer, x, lengths=np.array(values))
    dx_ref = back(layer, np.ones_like(out_ref))[0]
    out, h_n, _ = call(layer, x, lengths=lengths)
    dx = back(layer, np.ones_like(out))[0]
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(h_n, h_ref)
    np.testing.assert_array_equal(dx, dx_ref)


def test_lengths_do_not_modify_inputs(rng):
    layer = make_layer("lstm_proj", 3, 9, num_layers=2, bidirectional=True)
    x = rng.standard_normal((4, 3, 3))
    h0, c0 = random_states(layer, rng, 3)
    lengths = np.array([2, 4, 0])
    saved = [a.copy() for a in (x, h0, c0, lengths)]
    out, _, _ = call(layer, x, h0, c0, lengths)
    gout = rng.standard_normal(out.shape)
    gh, gc = random_states(layer, rng, 3)
    saved_grads = [a.copy() for a in (gout, gh, gc)]
    back(layer, gout, gh, gc)
    for a, b in zip((x, h0, c0, lengths, gout, gh, gc), saved + saved_grads):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- 3. cells


def make_cell(kind, input_size, hidden_size, *, dtype=np.float64, bias=True, seed=0):
    if kind == "lstm":
        return fastrnn.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed)
    if kind == "gru":
        return fastrnn.GRUCell(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed)
    return fastrnn.RNNCell(
        input_size, hidden_size, bias=bias, nonlinearity=kind[4:], dtype=dtype, seed=seed
    )


def make_cell_pair(kind, input_size, hidden_size, *, dtype, bias=True):
    torch.manual_seed(3)
    tdtype = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
    if kind == "lstm":
        tc = torch.nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=tdtype)
    elif kind == "gru":
        tc = torch.nn.GRUCell(input_size, hidden_size, bias=bias, dtype=tdtype)
    else:
        tc = torch.nn.RNNCell(
            input_size, hidden_size, bias=bias, nonlinearity=kind[4:], dtype=tdtype
        )
    fc = make_cell(kind, input_size, hidden_size, dtype=dtype, bias=bias, seed=4)
    fc.load_state_dict(to_numpy_state(tc))
    assert list(fc.state_dict()) == list(tc.state_dict())
    return tc, fc


def cell_call(cell, x, h, c):
    """(h', c' or None); h None: hx=None."""
    if isinstance(cell, fastrnn.LSTMCell):
        return cell(x, None if h is None else (h, c))
    return cell(x, h), None


def cell_back(cell, gh, gc):
    """(dx, dh, dc or None)."""
    if isinstance(cell, fastrnn.LSTMCell):
        dx, (dh, dc) = cell.backward(gh, gc)
        return dx, dh, dc
    dx, dh = cell.backward(gh)
    return dx, dh, None


CELL_MODES = ["batched-hx", "batched-nohx", "unbatched-hx", "unbatched-nohx"]


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", CELL_MODES)
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_forward_matches_torch(isa, kind, mode, dtype, rng):
    batched, with_hx = mode.startswith("batched"), mode.endswith("-hx")
    B, IN, H = 5, 7, 17
    tc, fc = make_cell_pair(kind, IN, H, dtype=dtype, bias=with_hx)
    lead = (B,) if batched else ()
    x = rng.standard_normal(lead + (IN,)).astype(dtype)
    h = rng.standard_normal(lead + (H,)).astype(dtype) if with_hx else None
    c = rng.standard_normal(lead + (H,)).astype(dtype) if with_hx else None
    for training in (True, False):
        fc.train(training)
        h1, c1 = cell_call(fc, x, h, c)
        with torch.no_grad():
            tx = torch.from_numpy(x)
            if not with_hx:
                t_result = tc(tx)
            elif kind == "lstm":
                t_result = tc(tx, (torch.from_numpy(h), torch.from_numpy(c)))
            else:
                t_result = tc(tx, torch.from_numpy(h))
        t_h, t_c = t_result if kind == "lstm" else (t_result, None)
        assert h1.dtype == np.dtype(dtype)
        assert_close(h1, t_h.numpy(), dtype, "fwd", "h'")
        if kind == "lstm":
            assert_close(c1, t_c.numpy(), dtype, "fwd", "c'")


def unroll_torch(tc, kind, xs, h0, c0, gs, gc, autoregressive):
    """torch autograd through T cell calls; loss = sum_t sum(h_t * gs[t]) + sum(c_T * gc)."""
    tx = [leaf(x) for x in xs[: 1 if autoregressive else len(xs)]]
    th0, tc0 = leaf(h0), leaf(c0)
    h, c = th0, tc0
    loss = 0
    hs = []
    for t in range(len(xs)):
        x = (tx[0] if t == 0 else h) if autoregressive else tx[t]
        if kind == "lstm":
            h, c = tc(x, (h, c))
        else:
            h = tc(x, h)
        hs.append(h.detach().numpy().copy())
        loss = loss + (h * torch.from_numpy(gs[t])).sum()
    if kind == "lstm":
        loss = loss + (c * torch.from_numpy(gc)).sum()
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in tc.named_parameters()}
    dc0 = tc0.grad.numpy() if kind == "lstm" else None
    return hs, [x.grad.numpy() for x in tx], th0.grad.numpy(), dc0, grads


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "mode", ["bptt-batched", "bptt-unbatched-nohx", "autoregressive", "autoregressive-unbatched"]
)
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_backward_through_time_matches_torch(isa, kind, mode, dtype, rng):
    """T training calls, then T backward calls in reverse order (the LIFO tape), against torch
    autograd through the same unrolled loop. autoregressive: x_{t+1} = h_t (one-to-many), so
    dL/dh_t collects dx of the next call too."""
    T, B, H = 5, 4, 9
    autoregressive = mode.startswith("autoregressive")
    IN = H if autoregressive else 6
    batched = "unbatched" not in mode
    with_hx = "nohx" not in mode
    tc, fc = make_cell_pair(kind, IN, H, dtype=dtype)
    lead = (B,) if batched else ()
    xs = rng.standard_normal((T,) + lead + (IN,)).astype(dtype)
    h0 = rng.standard_normal(lead + (H,)).astype(dtype)
    c0 = rng.standard_normal(lead + (H,)).astype(dtype)
    if not with_hx:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    gs = rng.standard_normal((T,) + lead + (H,)).astype(dtype)
    gc = rng.standard_normal(lead + (H,)).astype(dtype)
    t_hs, t_dxs, t_dh0, t_dc0, t_grads = unroll_torch(tc, kind, xs, h0, c0, gs, gc, autoregressive)

    h, c = (h0, c0) if with_hx else (None, None)
    hs = []
    for t in range(T):
        x = (xs[0] if t == 0 else h) if autoregressive else xs[t]
        h, c = cell_call(fc, x, h, c)
        hs.append(h)
    assert_close(np.stack(hs), np.stack(t_hs), dtype, "fwd", "h_t")
    dh_next = np.zeros_like(gs[0])
    dx_next = np.zeros_like(gs[0])
    dc = gc if kind == "lstm" else None
    dxs = []
    for t in reversed(range(T)):
        dx, dh_next, dc = cell_back(fc, gs[t] + dh_next + (dx_next if autoregressive else 0), dc)
        dx_next = dx
        dxs.append(dx)
    dxs.reverse()
    with pytest.raises(RuntimeError, match="backward"):  # the tape is empty now
        cell_back(fc, gs[0], dc)
    if autoregressive:
        assert_close(dxs[0], t_dxs[0], dtype, "grad", "dx_0")
    else:
        assert_close(np.stack(dxs), np.stack(t_dxs), dtype, "grad", "dx")
    assert_close(dh_next, t_dh0, dtype, "grad", "dh0")
    if kind == "lstm":
        assert_close(dc, t_dc0, dtype, "grad", "dc0")
    assert list(fc.grads) == list(t_grads)
    for name, grad in t_grads.items():
        assert_close(fc.grads[name], grad, dtype, "grad", f"grads[{name!r}]")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_grads_accumulate_per_call(kind, rng):
    """Each backward adds its call's parameter gradients into grads; zero_grad resets them."""
    cell = make_cell(kind, 5, 7)
    xs = rng.standard_normal((2, 3, 5))
    hs = rng.standard_normal((2, 3, 7))
    g = rng.standard_normal((2, 3, 7))
    per_call = []
    for i in range(2):
        cell.zero_grad()
        cell_call(cell, xs[i], hs[i], hs[i])
        results = cell_back(cell, g[i], g[i])
        per_call.append((results, copy_grads(cell)))
    cell.zero_grad()
    for i in range(2):  # both calls first, then both backwards, latest first
        cell_call(cell, xs[i], hs[i], hs[i])
    for i in reversed(range(2)):
        results = cell_back(cell, g[i], g[i])
        for actual, expected in zip(results, per_call[i][0]):
            if expected is not None:
                np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14)
    for name, grad in cell.grads.items():
        np.testing.assert_allclose(
            grad, per_call[0][1][name] + per_call[1][1][name], rtol=1e-12, atol=1e-14
        )
    cell.zero_grad()
    assert all(not np.any(v) for v in cell.grads.values())


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_eval_keeps_nothing(kind, rng):
    cell = make_cell(kind, 4, 6).eval()
    x = rng.standard_normal((2, 4))
    h, _ = cell_call(cell, x, None, None)
    with pytest.raises(RuntimeError, match="backward"):
        cell_back(cell, np.ones_like(h), None)
    # eval calls between training calls are not on the tape: backward is for the training call
    cell.train()
    h_train, _ = cell_call(cell, x, None, None)
    cell.eval()
    cell_call(cell, rng.standard_normal((3, 4)), None, None)  # another batch size
    np.testing.assert_array_equal(h_train, h)
    dx, _, _ = cell_back(cell, np.ones_like(h_train), None)  # runs in eval mode too
    assert dx.shape == x.shape
    with pytest.raises(RuntimeError, match="backward"):
        cell_back(cell, np.ones_like(h_train), None)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_hx_none_equals_zeros(kind, rng):
    cell = make_cell(kind, 4, 6).eval()
    for lead in ((3,), ()):
        x = rng.standard_normal(lead + (4,))
        zeros = np.zeros(lead + (6,))
        a = cell_call(cell, x, None, None)
        b = cell_call(cell, x, zeros, zeros)
        np.testing.assert_array_equal(a[0], b[0])
        if kind == "lstm":
            np.testing.assert_array_equal(a[1], b[1])


# --------------------------------------------------------------------------- 4. dropout


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_eval_is_deterministic_and_equals_no_dropout(kind, rng):
    options = dict(num_layers=3, bidirectional=True)
    layer = make_layer(kind, 5, 9, dtype=np.float32, dropout=0.5, **options)
    twin = make_layer(kind, 5, 9, dtype=np.float32, dropout=0.0, **options)
    twin.load_state_dict(layer.state_dict())
    layer.eval()
    twin.eval()
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    first = call(layer, x)
    second = call(layer, x)
    expected = call(twin, x)
    for a, b, c in zip(first, second, expected):
        if a is not None:
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
    # and training mode does apply dropout
    assert not np.array_equal(call(layer.train(), x)[0], first[0])


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_zero_in_training_equals_no_dropout(kind, rng):
    """p=0 in training: the eval results, and the backward of a layer built without dropout."""
    options = dict(num_layers=3, bidirectional=True)
    layer = make_layer(kind, 5, 9, dropout=0.0, seed=1, **options)
    plain = make_layer(kind, 5, 9, seed=1, **options)
    x = rng.standard_normal((6, 4, 5))
    train = call(layer.train(), x)
    gout = rng.standard_normal(train[0].shape)
    dx = back(layer, gout)[0]
    for a, b in zip(train, call(plain, x)):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dx, back(plain, gout)[0])
    for a, b in zip(train, call(layer.eval(), x)):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_dropout_seed_reproduces(kind, rng):
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    a = make_layer(kind, 4, 9, dtype=np.float32, num_layers=2, dropout=0.5, seed=11)
    b = make_layer(kind, 4, 9, dtype=np.float32, num_layers=2, dropout=0.5, seed=11)
    c = make_layer(kind, 4, 9, dtype=np.float32, num_layers=2, dropout=0.5, seed=12)
    c.load_state_dict(a.state_dict())
    out_a, out_b, out_c = call(a, x)[0], call(b, x)[0], call(c, x)[0]
    np.testing.assert_array_equal(out_a, out_b)  # same seed: same weights and masks
    assert not np.array_equal(out_a, out_c)  # same weights, other masks
    assert not np.array_equal(call(a, x)[0], out_a)  # a new mask per forward
    # np.random.Generator as the seed
    d = make_layer(kind, 4, 9, dtype=np.float32, num_layers=2, dropout=0.5, seed=None)
    d._rng = np.random.default_rng(5)
    e = make_layer(kind, 4, 9, dtype=np.float32, num_layers=2, dropout=0.5, seed=None)
    e.load_state_dict(d.state_dict())
    e._rng = np.random.default_rng(5)
    np.testing.assert_array_equal(call(d, x)[0], call(e, x)[0])


def identity_relu_rnn(size, num_layers, bidirectional, dropout):
    """A relu RNN whose every layer passes its input through: out_l = relu(x) = x for x > 0.

    Layer 0 takes size inputs; bidirectional layers above take [fwd, rev] (2 * size) and the
    forward direction reads the first half, the reverse the second. So out = x * masks."""
    layer = fastrnn.RNN(
        size,
        size,
        num_layers=num_layers,
        nonlinearity="relu",
        bias=False,
        bidirectional=bidirectional,
        dropout=dropout,
        dtype=np.float64,
        seed=0,
    )
    eye = np.eye(size)
    state = {}
    for name, value in layer.state_dict().items():
        if name.startswith("weight_hh"):
            state[name] = np.zeros_like(value)
        elif name.startswith("weight_ih_l0"):
            state[name] = eye
        elif name.startswith("weight_ih"):
            reverse = name.endswith("_reverse")
            halves = [np.zeros((size, size)), eye] if reverse else [eye, np.zeros((size, size))]
            state[name] = np.hstack(halves) if bidirectional else eye
    layer.load_state_dict(state)
    return layer


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_dropout_masks_between_layers_only(p, num_layers, bidirectional, rng):
    """On an identity network out = x * (masks of layers 0..L-2): about p of the values of
    each inter-layer mask are 0, the others scale by 1/(1-p), and the last layer's output has
    none (a product of L-1 masks, not L). Backward multiplies by the same masks."""
    T, B, size = 20, 16, 32
    layer = identity_relu_rnn(size, num_layers, bidirectional, p)
    x = rng.uniform(0.5, 1.5, (T, B, size))
    out, h_n, _ = call(layer, x)
    d = 2 if bidirectional else 1
    ratio = out / np.concatenate([x] * d, axis=-1)  # the product of the masks
    masks = num_layers - 1
    scale = 1.0 / (1.0 - p)
    kept = ratio != 0
    np.testing.assert_allclose(ratio[kept], scale**masks, rtol=1e-12)
    zero_fraction = 1.0 - np.mean(kept)
    expected = 1.0 - (1.0 - p) ** masks
    n = ratio.size
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(zero_fraction - expected) < 6 * sigma + 1e-3, (zero_fraction, expected)
    # the final states: each layer's own (unmasked) output at its last step; layer 0's is x
    np.testing.assert_array_equal(h_n[0], x[-1])
    np.testing.assert_array_equal(h_n[-d], out[-1, :, :size])
    # backward through the same masks
    gout = rng.standard_normal(out.shape)
    dx, _, _ = back(layer, gout)
    expected_dx = (gout * ratio)[..., :size]
    if bidirectional:
        expected_dx = expected_dx + (gout * ratio)[..., size:]
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_one_gives_zeros_between_layers(kind, rng):
    """p=1: every layer above the first sees zeros, so the output is the last layer's on zeros,
    and nothing flows back to x or to the first layer's input weights."""
    B, T, IN, H = 3, 5, 4, 9
    layer = make_layer(kind, IN, H, num_layers=2, dropout=1.0)
    x = rng.standard_normal((T, B, IN))
    h0, c0 = random_states(layer, rng, B)
    out, h_n, _ = call(layer, x, h0, c0)
    top = make_layer(kind, state_sizes(layer)[0], H)
    top.load_state_dict(
        {k.replace("_l1", "_l0"): v for k, v in layer.state_dict().items() if "_l1" in k}
    )
    expected, expected_h, _ = call(
        top,
        np.zeros((T, B, top.input_size)),
        h0[1:],
        None if c0 is None else c0[1:],
    )
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_n[1:], expected_h, rtol=1e-13, atol=1e-15)
    assert np.any(h_n[0] != 0)  # layer 0 did run; its state is not dropped
    dx, dh0, _ = back(layer, rng.standard_normal(out.shape))
    assert not np.any(dx)
    assert not np.any(layer.grads["weight_ih_l0"])
    assert not np.any(layer.grads["weight_ih_l1"])
    assert not np.any(dh0[0])
    assert np.any(layer.grads["weight_hh_l1"])


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_dropout_with_one_layer_warns(cls):
    with pytest.warns(UserWarning, match="dropout") as record:
        cls(3, 5, dropout=0.3)
    # stacklevel: attributed to the line that built the layer, whatever the class
    assert record[0].filename == __file__, f"warning attributed to {record[0].filename}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(3, 5, num_layers=2, dropout=0.3)
        cls(3, 5, num_layers=1, dropout=0.0)


def _fd_loss(layer, x, h0, c0, lengths, gout, gh, seed):
    layer._rng = np.random.default_rng(seed)  # the same masks for every forward
    out, h_n, _ = call(layer, x, h0, c0, lengths)
    return float(np.sum(out * gout) + np.sum(h_n * gh))


@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_tanh"])
def test_dropout_backward_matches_finite_differences(kind, with_lengths, rng):
    """Central differences in float64 along random directions, the masks fixed by reseeding
    the layer's generator before each forward: x, h0 and a parameter of every layer."""
    B, T, IN, H, seed = 4, 5, 3, 9, 21
    layer = make_layer(kind, IN, H, num_layers=3, bidirectional=True, dropout=0.5)
    x = rng.standard_normal((T, B, IN))
    h0, c0 = random_states(layer, rng, B)
    lengths = np.array([5, 0, 2, 4]) if with_lengths else None
    layer._rng = np.random.default_rng(seed)
    out, _, _ = call(layer, x, h0, c0, lengths)
    out_eval = call(layer.eval(), x, h0, c0, lengths)[0]
    layer.train()
    assert not np.allclose(out, out_eval)  # the masks are on
    gout = rng.standard_normal(out.shape)
    gh = rng.standard_normal(h0.shape)
    _fd_loss(layer, x, h0, c0, lengths, gout, gh, seed)
    dx, dh0, _ = back(layer, gout, gh, None)
    grads = copy_grads(layer)
    eps = 1e-5

    def directional(f, value):
        v = rng.standard_normal(value.shape)
        return (f(value + eps * v) - f(value - eps * v)) / (2 * eps), v

    def check(numeric, analytic, name):
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, numeric, analytic)

    numeric, v = directional(lambda a: _fd_loss(layer, a, h0, c0, lengths, gout, gh, seed), x)
    check(numeric, np.sum(dx * v), "x")
    numeric, v = directional(lambda a: _fd_loss(layer, x, a, c0, lengths, gout, gh, seed), h0)
    check(numeric, np.sum(dh0 * v), "h0")
    original = layer.state_dict()
    for name in ("weight_ih_l0", "weight_hh_l1_reverse", "weight_ih_l2"):

        def loss_at(value, name=name):
            setattr(layer, name, value)
            return _fd_loss(layer, x, h0, c0, lengths, gout, gh, seed)

        numeric, v = directional(loss_at, original[name])
        setattr(layer, name, original[name])
        check(numeric, np.sum(grads[name] * v), name)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_with_lengths_keeps_padding_zero(kind, rng):
    layer = make_layer(kind, 3, 9, num_layers=3, bidirectional=True, dropout=0.5)
    x = rng.standard_normal((6, 4, 3))
    lengths = np.array([6, 1, 0, 3])
    out, _, _ = call(layer, x, lengths=lengths)
    dx, _, _ = back(layer, rng.standard_normal(out.shape))
    past = (np.arange(6)[None, :] >= lengths[:, None]).T
    assert not np.any(out[past]) and not np.any(dx[past])


# --------------------------------------------------------------------------- 5. state_dict

STATE_COMBOS = [
    (kind, num_layers, bidirectional, bias)
    for kind in KINDS
    for num_layers in (1, 2, 3)
    for bidirectional in (False, True)
    for bias in (True, False)
]


@requires_torch
@pytest.mark.parametrize(
    "kind,num_layers,bidirectional,bias",
    STATE_COMBOS,
    ids=[
        f"{k}-L{n}-{'bi' if b else 'uni'}-{'bias' if s else 'nobias'}"
        for k, n, b, s in STATE_COMBOS
    ],
)
def test_state_dict_names_order_shapes_match_torch(kind, num_layers, bidirectional, bias):
    options = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    tm = make_torch(kind, 5, 9, **options)
    fm = make_layer(kind, 5, 9, **options)
    t_state = tm.state_dict()
    assert list(fm.state_dict()) == list(t_state)
    assert [k for k, _ in fm.named_parameters()] == [k for k, _ in tm.named_parameters()]
    assert list(fm.grads) == list(t_state)
    for name, value in fm.state_dict().items():
        assert value.shape == tuple(t_state[name].shape), name
        assert fm.grads[name].shape == value.shape, name
        assert getattr(fm, name).shape == value.shape, name
    for k, (name, value) in enumerate(fm.named_parameters()):
        assert value is fm.parameters()[k], name


@requires_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_transfer_both_ways(kind, dtype, rng):
    options = dict(num_layers=2, bidirectional=True, batch_first=True)
    x = rng.standard_normal((3, 5, 6)).astype(dtype)
    # fastrnn -> torch
    fm = make_layer(kind, 6, 17, dtype=dtype, seed=9, **options)
    tm = make_torch(kind, 6, 17, dtype=dtype, **options)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in fm.state_dict().items()})
    fm.eval()
    out = call(fm, x)[0]
    with torch.no_grad():
        assert_close(out, tm(torch.from_numpy(x))[0].numpy(), dtype, "fwd", "fastrnn -> torch")
    # torch -> fastrnn, from tensors directly
    tm2 = make_torch(kind, 6, 17, dtype=dtype, seed=4, **options)
    fm.load_state_dict({k: v.detach() for k, v in tm2.state_dict().items()})
    for name, value in tm2.state_dict().items():
        np.testing.assert_array_equal(fm.state_dict()[name], value.numpy())
    with torch.no_grad():
        expected = tm2(torch.from_numpy(x))[0].numpy()
    assert_close(call(fm, x)[0], expected, dtype, "fwd", "torch -> fastrnn")


@requires_torch
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_state_dict_matches_torch(kind):
    for bias in (True, False):
        tc, fc = make_cell_pair(kind, 5, 7, dtype=np.float64, bias=bias)
        assert list(fc.grads) == list(tc.state_dict())
        for name, value in tc.state_dict().items():
            assert fc.state_dict()[name].shape == tuple(value.shape)
        tc2 = make_cell_pair(kind, 5, 7, dtype=np.float64, bias=bias)[0]
        tc2.load_state_dict({k: torch.from_numpy(v) for k, v in fc.state_dict().items()})
        for name, value in tc2.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), fc.state_dict()[name])


@pytest.mark.parametrize("kind", KINDS)
def test_assigning_one_parameter_repacks_its_unit(kind, rng):
    """Every parameter of every layer and direction takes effect when assigned (no stale packed
    weights), equal to a fresh layer loading the same state_dict."""
    options = dict(num_layers=2, bidirectional=True, dtype=np.float32)
    layer = make_layer(kind, 4, 9, **options)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    call(layer, x)  # packs every unit
    for name, value in layer.state_dict().items():
        before = call(layer, x)[0]
        setattr(layer, name, value + np.float32(0.25))
        after = call(layer, x)[0]
        assert not np.array_equal(after, before), name
        fresh = make_layer(kind, 4, 9, seed=99, **options)
        fresh.load_state_dict(layer.state_dict())
        np.testing.assert_array_equal(after, call(fresh, x)[0], err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_grads_accumulate_and_zero_grad_with_options(kind, rng):
    layer = make_layer(kind, 4, 9, num_layers=3, bidirectional=True)
    x = rng.standard_normal((5, 3, 4))
    lengths = np.array([5, 0, 2])
    out = call(layer, x, lengths=lengths)[0]
    gout = rng.standard_normal(out.shape)
    back(layer, gout)
    once = copy_grads(layer)
    assert all(np.any(g) for g in once.values())
    call(layer, x, lengths=lengths)
    back(layer, gout)
    for name, grad in layer.grads.items():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12, atol=1e-15, err_msg=name)
    layer.zero_grad()
    assert list(layer.grads) == list(once)
    assert all(not np.any(g) for g in layer.grads.values())
    with pytest.raises(RuntimeError, match="backward"):  # one backward per forward
        back(layer, gout)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", KINDS)
def test_copy_and_pickle_with_options(kind, how, rng):
    layer = make_layer(kind, 4, 9, num_layers=2, bidirectional=True, dropout=0.3, batch_first=True)
    x = rng.standard_normal((3, 5, 4))
    call(layer, x)  # packed weights and a pending training state exist
    clone = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    for attr in ("num_layers", "bidirectional", "dropout", "batch_first", "proj_size", "dtype"):
        assert getattr(clone, attr) == getattr(layer, attr), attr
    assert repr(clone) == repr(layer)
    layer.eval()
    clone.eval()
    for a, b in zip(call(layer, x), call(clone, x)):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    # the clone's generator continues from the same point: the same masks in training
    clone.train()
    layer.train()
    np.testing.assert_array_equal(call(layer, x)[0], call(clone, x)[0])


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_copy_and_pickle(kind, rng):
    cell = make_cell(kind, 4, 6)
    x = rng.standard_normal((3, 4))
    cell_call(cell, x, None, None)
    for clone in (copy.deepcopy(cell), pickle.loads(pickle.dumps(cell))):
        with pytest.raises(RuntimeError, match="backward"):  # the tape is not copied
            cell_back(clone, np.ones((3, 6)), None)
        np.testing.assert_array_equal(
            cell_call(clone, x, None, None)[0], cell_call(cell.eval(), x, None, None)[0]
        )
        cell.train()


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_clear_tape(kind, rng):
    """clear_tape drops the pending training calls: backward has nothing left to run for, and
    later calls and backwards work as on a fresh cell."""
    cell = make_cell(kind, 4, 6)
    x = rng.standard_normal((3, 4))
    for _ in range(3):
        cell_call(cell, x, None, None)
    cell.clear_tape()
    with pytest.raises(RuntimeError, match="backward"):
        cell_back(cell, np.ones((3, 6)), None)
    assert all(not np.any(g) for g in cell.grads.values())
    fresh = make_cell(kind, 4, 6)
    fresh.load_state_dict(cell.state_dict())
    for c in (cell, fresh):
        cell_call(c, x, None, None)
    expected = cell_back(fresh, np.ones((3, 6)), None)
    for a, b in zip(cell_back(cell, np.ones((3, 6)), None), expected):
        if b is not None:
            np.testing.assert_array_equal(a, b)
    for name, grad in fresh.grads.items():
        np.testing.assert_array_equal(cell.grads[name], grad, err_msg=name)
    cell.clear_tape()  # on an empty tape: nothing happens
    cell.eval().clear_tape()


# (B, T, H): small (one thread per direction) and large (a direction could use both threads)
BIDIRECTIONAL_SHAPES = [(3, 5, 9), (70, 12, 33), (4, 12, 200)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize(
    "shape", BIDIRECTIONAL_SHAPES, ids=[f"B{b}-T{t}-H{h}" for b, t, h in BIDIRECTIONAL_SHAPES]
)
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_bidirectional_results_do_not_depend_on_thread_count(
    isa, kind, shape, with_lengths, dtype, rng, restore_threads
):
    """The two directions of a layer run at once, one thread each: forward, states and every
    gradient equal those of a single-threaded run."""
    B, T, H = shape
    x = rng.standard_normal((T, B, 7)).astype(dtype)
    lengths = make_lengths(rng, B, T, with_zero=True) if with_lengths else None
    results = []
    for threads in (1, 2):
        fastrnn.set_num_threads(threads)
        layer = make_layer(kind, 7, H, dtype=dtype, num_layers=2, bidirectional=True, seed=2)
        out, h_n, c_n = call(layer, x, lengths=lengths)
        gh, gc = random_states(layer, np.random.default_rng(1), B)
        dx, dh0, dc0 = back(layer, np.ones_like(out), gh, gc)
        results.append(([out, h_n, c_n], [dx, dh0, dc0], copy_grads(layer)))
    for fwd, grad, grads in results[1:]:
        for a, b in zip(fwd, results[0][0]):
            if b is not None:
                assert_close(a, b, dtype, "fwd")
        for a, b in zip(grad, results[0][1]):
            if b is not None:
                assert_close(a, b, dtype, "grad")
        for name, g in grads.items():
            assert_close(g, results[0][2][name], dtype, "grad", name)

"""fastrnn inside PyTorch models: ``LSTM``, ``GRU`` and ``RNN`` that *are* torch.nn modules.

Install with the extra ``pip install fastrnn[torch]``. The classes subclass ``torch.nn.LSTM``,
``torch.nn.GRU`` and ``torch.nn.RNN`` and keep their constructor, parameters, ``state_dict``,
``repr`` and call; only the computation changes::

    import torch
    import fastrnn.torch

    lstm = fastrnn.torch.LSTM(128, 256, num_layers=2, batch_first=True)  # as torch.nn.LSTM
    out, (h_n, c_n) = lstm(x)            # forward on fastrnn's kernels
    out.sum().backward()                 # backward too: x, hx and every parameter get .grad

    model = fastrnn.torch.patch(model)   # every nn.LSTM / nn.GRU / nn.RNN inside, in place
    fast = fastrnn.torch.LSTM.from_torch(torch_lstm)  # one module, sharing its Parameters

What runs where:

* CPU float32 or float64 tensors (input, states and weights of one dtype), padded or
  :class:`~torch.nn.utils.rnn.PackedSequence` input, batched or not, every constructor option
  (``num_layers``, ``bidirectional``, ``bias``, ``batch_first``, ``dropout``, ``proj_size``,
  ``nonlinearity``): fastrnn, through one ``torch.autograd.Function`` per call.
* Anything else (other devices or dtypes, autocast, ``vmap`` / ``torch.func`` transforms,
  forward-mode AD, tensor subclasses): torch's own implementation, with a
  :class:`FastRNNFallbackWarning` once per module.
* Under ``torch.compile``: fastrnn. Dynamo does not trace torch.nn's recurrent modules; it runs
  their calls between its compiled graphs, and leaves this module's call whole.
* Under an exporter or tracer (``torch.export``, ``torch.jit.trace`` and so the TorchScript-based
  ``torch.onnx.export``): torch's own implementation, silently, so that the exported graph holds
  torch's RNN operator reading the module's parameters, as it would for torch.nn.
  ``torch.jit.script`` raises a TypeError: TorchScript cannot compile a call into fastrnn.

Weights: each module keeps a private fastrnn layer (one per weight dtype) that reads the
parameters without copying them and packs them lazily. Before each forward every Parameter's
address, strides and ``_version`` are compared with the last call and only the changed ones are
repacked, so optimizer steps (fused ones through an optimizer hook that bumps the version they do
not), ``load_state_dict``, ``.to()`` and ``.data = ...`` are all seen. Weights that are not
Parameters (parametrizations, ``torch.func.functional_call``) are repacked on every call.
In-place writes that torch's version counter does not see (``param.data.mul_(...)``, writes
through a NumPy view) need ``module.repack_weights()`` before the next forward.

Autograd: a forward keeps what its backward needs only when grad mode is on and some input or
weight requires grad. A second backward through one forward (``retain_graph=True``, gradcheck,
jacobians) runs that forward again on its saved inputs. A backward that must be differentiable
itself (``create_graph=True``) or that gets batched gradients (``is_grads_batched=True``) runs
torch's own implementation on the saved inputs, except with dropout in training (an error). A
backward uses the weights its forward ran with, even if an optimizer changed them in between
(torch.nn raises an error there instead).

Speed: every optimizer step makes all weights stale, so the next forward repacks them (on all of
fastrnn's threads). Importing this module moves fastrnn's parallel regions onto torch's OpenMP
threads: torch's workers spin for milliseconds after each of its parallel ops, and fastrnn's own
workers would share the cores with them. The thread count stays ``fastrnn.set_num_threads``'s.
A backward skips dL/dx, and its GEMM, when the input does not require grad.

Dropout between layers follows ``module.training``; its masks come from a NumPy generator seeded
from torch's generator, so ``torch.manual_seed`` makes runs reproducible (the masks differ from
torch.nn's own).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
from torch import _VF, nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from . import _core
from . import layers as _layers

__all__ = ["GRU", "LSTM", "RNN", "FastRNNFallbackWarning", "patch"]

_NUMPY_DTYPE: dict[torch.dtype, type] = {torch.float32: np.float32, torch.float64: np.float64}
_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def _torch_openmp_library() -> str | None:
    """The file of the OpenMP runtime torch's CPU ops run on, or None (another parallel backend,
    or no ``/proc/self/maps`` to find it in)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            # address perms offset dev inode [path]; the path may hold spaces
            fields = (line.split(maxsplit=5) for line in maps)
            files = {f[5].strip() for f in fields if len(f) == 6}
    except OSError:
        return None
    runtimes = sorted(f for f in files if os.path.basename(f).startswith(_OPENMP_RUNTIMES))
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    # The copy torch ships (torch/lib) before any other a library may have loaded.
    runtimes.sort(key=lambda f: not os.path.realpath(f).startswith(torch_dir))
    return runtimes[0] if runtimes else None


def _run_on_torch_threads() -> None:
    """Make fastrnn's parallel regions run on torch's OpenMP team. After each of its parallel
    ops torch's OpenMP workers spin for milliseconds; fastrnn's own workers would then share the
    cores with them and stall at every time step's barrier. On torch's team a region starts on
    those very threads (8x faster in a training step at (100, 1, 128) on 2 cores)."""
    library = _torch_openmp_library()
    if library is None:
        return
    try:
        _core._use_openmp(library)
    except RuntimeError:  # not a GNU-compatible OpenMP runtime: fastrnn's own workers stay
        pass


_run_on_torch_threads()


def _mark_fused_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """A fused optimizer step writes its parameters without bumping their version counters:
    bump them, so that the next forward sees the new weights."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            for param in group["params"]:  # one at a time: torch < 2.4 takes no list
                torch.autograd.graph.increment_version(param)


register_optimizer_step_post_hook(_mark_fused_step)

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
_is_tracing = torch._C._is_tracing
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: False)
_has_torch_function = torch._C._has_torch_function
_functorch = getattr(torch._C, "_functorch", None)
_is_functorch_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)
# The batched gradients of is_grads_batched=True (vectorized jacobians and hessians).
_is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", lambda t: False)


class FastRNNFallbackWarning(UserWarning):
    """A fastrnn.torch module ran torch's own implementation (shown once per module)."""


class _Spec:
    """One private fastrnn layer and the torch parameters it mirrors, by position in torch's
    ``_flat_weights``."""

    __slots__ = ("layer", "dtype", "names", "units", "shapes", "lstm", "synced")

    def __init__(self, layer: _layers._RNNBase, dtype: torch.dtype, names: list[str]) -> None:
        self.layer = layer
        self.dtype = dtype
        self.names = names
        self.units = [layer._unit_of(name) for name in names]
        self.shapes = [layer._params[name].shape for name in names]
        self.lstm = layer._gates == 4
        # Per parameter: (data_ptr, strides, _version, the tensor it was read from) at the last
        # refresh, or None. Holding the tensor keeps its storage alive, so no other tensor can
        # reuse the address and look unchanged.
        self.synced: list[tuple[int, tuple[int, ...], int, torch.Tensor] | None] = [None] * len(
            names
        )


class _Adapter:
    """Per-module state of the adapter: the fastrnn layer (per weight dtype) and the warning."""

    __slots__ = ("spec", "warned")

    def __init__(self) -> None:
        self.spec: _Spec | None = None
        self.warned = False


def _sync_weights(spec: _Spec, weights: list[torch.Tensor], trust_versions: bool = True) -> None:
    """Point the fastrnn layer at every weight changed since the last call (it repacks those
    lazily, on its next forward). Only Parameters are trusted to be unchanged while their address,
    strides and ``_version`` are: plain tensors (parametrizations, functional_call, gradcheck's
    perturbations through ``.data``) are re-read on every call."""
    synced, params, packed = spec.synced, spec.layer._params, spec.layer._packed
    for i, w in enumerate(weights):
        record = synced[i]
        try:
            version = w._version if trust_versions and isinstance(w, nn.Parameter) else -1
        except RuntimeError:  # inference tensors have no version counter: always re-read
            version = -1
        ptr = w.data_ptr()
        if (
            record is not None
            and version >= 0
            and record[0] == ptr
            and record[2] == version
            and w.stride() == record[1]  # ``.data =`` a transposed view, at the same address
        ):
            continue
        held = w.detach()
        array = _array(held)
        if not array.flags.c_contiguous or held.is_neg():
            array = np.ascontiguousarray(array)
            version = -1  # a copy: re-read next time
        array.flags.writeable = False
        # A view of torch's memory, no copy: the layer packs from it on its next forward.
        params[spec.names[i]] = array
        packed.pop(spec.units[i], None)
        synced[i] = (ptr, held.stride(), version, held)


def _numpy_forward(
    spec: _Spec,
    batch_sizes: np.ndarray | None,
    dropout: tuple[float, int] | None,
    x: torch.Tensor,
    h0: torch.Tensor | None,
    c0: torch.Tensor | None,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
    """fastrnn's layer stack on time-major (or packed-row) tensors; zero-copy both ways.
    ``dropout`` is (p, seed of the masks' generator) or None."""
    layer = spec.layer
    if dropout is not None:
        layer.dropout = dropout[0]
        layer._rng = np.random.default_rng(dropout[1])
    out, h_n, c_n, tape = layer._forward_rows(
        _array(x),
        batch_sizes,
        _array(h0),
        _array(c0),
        keep,
        dropout is not None,
    )
    c_t = None if c_n is None else torch.from_numpy(c_n)
    return torch.from_numpy(out), torch.from_numpy(h_n), c_t, tape


def _array(t: torch.Tensor | None) -> np.ndarray | None:
    """A NumPy view of t (a copy if its negative bit is set). Expanded (stride 0) or transposed
    views are fine: the core copies those."""
    if t is None:
        return None
    t = t.detach()
    try:
        return t.numpy()
    except RuntimeError:  # the negative bit; checked only then, since a check costs 0.3 us
        return t.resolve_neg().numpy()


def _torch_backward(ctx: Any, grads: tuple[torch.Tensor | None, ...]) -> tuple[Any, ...]:
    """The gradients of _RNNFunction's inputs by torch's own implementation, run again on the
    saved inputs: for the backwards fastrnn's kernels cannot do, a differentiable one
    (create_graph=True: double backward, gradient penalties, Hessians) or one on batched
    gradients (is_grads_batched, vectorized jacobians)."""
    ctx.tape = None
    if ctx.dropout is not None:
        raise RuntimeError(
            "fastrnn.torch: a backward with create_graph=True or batched gradients runs torch's "
            "own implementation, which cannot repeat fastrnn's dropout masks; run the forward "
            "in eval mode or with dropout=0"
        )
    spec, batch_sizes = ctx.spec, ctx.batch_sizes
    layer = spec.layer
    x, h0, c0, *weights = ctx.saved_tensors
    inputs = (x, h0, c0, *weights)
    needs = ctx.needs_input_grad[3:]  # after spec, batch_sizes, dropout
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        batch = x.shape[1] if batch_sizes is None else int(batch_sizes[0])
        units = layer.num_layers * layer.num_directions
        if h0 is None:
            h0 = x.new_zeros((units, batch, layer._output_size))
        hx: Any = h0
        if spec.lstm:
            hx = (h0, x.new_zeros((units, batch, layer.hidden_size)) if c0 is None else c0)
        options = (layer.bias, layer.num_layers, 0.0, False, layer.bidirectional)
        op = getattr(_VF, layer._cell)  # lstm, gru, rnn_tanh or rnn_relu
        if batch_sizes is None:
            outputs = op(x, hx, weights, *options, False)
        else:
            outputs = op(x, torch.from_numpy(batch_sizes), hx, weights, *options)
        used = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        wanted = [t for t, need in zip(inputs, needs) if need]
        found = iter(
            torch.autograd.grad(
                [o for o, _ in used],
                wanted,
                [g for _, g in used],
                create_graph=create_graph,
                allow_unused=True,
            )
            if used and wanted
            else [None] * len(wanted)
        )
    return (None, None, None, *(next(found) if need else None for need in needs))


class _RNNFunction(torch.autograd.Function):
    """out, h_n[, c_n] = f(x, h0, c0, *flat weights), forward and backward by fastrnn."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        spec: _Spec,
        batch_sizes: np.ndarray | None,
        dropout: tuple[float, int] | None,
        x: torch.Tensor,
        h0: torch.Tensor | None,
        c0: torch.Tensor | None,
        *weights: torch.Tensor,
    ) -> tuple[torch.Tensor | None, ...]:
        ctx.set_materialize_grads(False)  # unused outputs give None: the kernels skip zeros
        out, h_n, c_n, tape = _numpy_forward(spec, batch_sizes, dropout, x, h0, c0, keep=True)
        # The tape lives in ctx, never on the module: a module may run several forwards before
        # one backward. The inputs are saved only to run the forward again for a second
        # backward (retain_graph=True: gradcheck, jacobians); the kernels consume the tape.
        ctx.spec, ctx.tape, ctx.batch_sizes, ctx.dropout = spec, tape, batch_sizes, dropout
        ctx.save_for_backward(x, h0, c0, *weights)
        return (out, h_n, c_n) if spec.lstm else (out, h_n)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled() or any(
            g is not None and (_is_legacy_batched(g) or _is_functorch_wrapped(g)) for g in grads
        ):
            return _torch_backward(ctx, grads)
        spec, tape = ctx.spec, ctx.tape
        ctx.tape = None
        if tape is None:  # a second backward: the same forward again, on the saved inputs
            x, h0, c0, *weights = ctx.saved_tensors  # torch checks they were not modified
            _sync_weights(spec, weights, trust_versions=False)
            tape = _numpy_forward(spec, ctx.batch_sizes, ctx.dropout, x, h0, c0, keep=True)[3]
        needs = ctx.needs_input_grad  # (spec, batch_sizes, dropout, x, h0, c0, *weights)
        dtype = _NUMPY_DTYPE[spec.dtype]
        # The kernels add into these; weight gradients are required by the core, bias ones not.
        param_grads: dict[str, np.ndarray | None] = {}
        for name, shape, need in zip(spec.names, spec.shapes, needs[6:]):
            wanted = need or not name.startswith("bias")
            param_grads[name] = np.zeros(shape, dtype) if wanted else None
        grad_out, grad_h = grads[0], grads[1]
        grad_c = grads[2] if spec.lstm else None
        dx, dh0, dc0 = spec.layer._backward_rows(
            tape,
            _array(grad_out),
            _array(grad_h),
            _array(grad_c),
            param_grads,
            grad_input=needs[3],
        )
        weight_grads = [
            torch.from_numpy(g) if need and g is not None else None
            for g, need in zip(param_grads.values(), needs[6:])
        ]
        return (
            None,
            None,
            None,
            torch.from_numpy(dx) if dx is not None else None,
            torch.from_numpy(dh0) if needs[4] else None,
            torch.from_numpy(dc0) if needs[5] and dc0 is not None else None,
            *weight_grads,
        )


_forward_outside_dynamo: Any = None  # _FastRNNMixin._forward wrapped by torch.compiler.disable


class _FastRNNMixin:
    """The forward shared by LSTM, GRU and RNN; everything else is torch.nn's RNNBase."""

    # Declared for type checkers; torch.nn.RNNBase provides them.
    mode: str
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    proj_size: int
    training: bool
    _flat_weights: list[Any]
    _flat_weights_names: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fastrnn = _Adapter()

    @classmethod
    def from_torch(cls, module: nn.RNNBase, *, share_hooks: bool = False) -> Any:
        """A new module of this class with ``module``'s options, hooks and training mode that
        shares its Parameter objects (an optimizer built on ``module`` keeps working). Later
        registrations (parameters, hooks) on one module do not change the other; with
        ``share_hooks`` the two share their hooks, so that handles made on ``module`` remove
        them from the new module too (``patch`` replacing a module inside a model)."""
        state = module.__getstate__()
        new = cls.__new__(cls)
        new.__setstate__(state)
        # Containers (dicts of parameters or hooks, lists of names) the two would otherwise share.
        for key, value in state.items():
            if isinstance(value, (dict, list, set)) and not (share_hooks and "hooks" in key):
                new.__dict__[key] = copy.copy(value)
        new.__dict__["_all_weights"] = [list(names) for names in state["_all_weights"]]
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_fastrnn", None)  # packed weights are per process; a copy repacks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_fastrnn"] = _Adapter()

    def __prepare_scriptable__(self) -> Any:
        # torch.jit.script calls this first; it would otherwise fail to compile forward with an
        # error about a type annotation.
        base = next(c.__name__ for c in type(self).__mro__ if c in (nn.LSTM, nn.GRU, nn.RNN))
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__module__}.{type(self).__name__}: its "
            "forward calls fastrnn's C++ kernels. torch.compile runs them; torch.jit.trace and "
            "torch.export record torch's own operator; or script a "
            f"torch.nn.{base} that loads this module's state_dict."
        )

    def repack_weights(self) -> None:
        """Repack every parameter on the next forward (needed only after writes that bypass
        torch's version counter, e.g. through ``param.data`` or a NumPy view)."""
        self._fastrnn.spec = None

    # -- dispatch -----------------------------------------------------------------------------

    def forward(self, input: Any, hx: Any = None) -> Any:
        # torch.compile's Dynamo does not trace torch.nn's RNN modules: it runs their calls
        # between its graphs, but would still compile each function such a call makes, where
        # fastrnn would see itself compiled and fall back to torch. So Dynamo must leave the whole
        # call alone; torch.compiler.disable imports Dynamo (1 s), so only once something has.
        if "torch._dynamo" not in sys.modules:
            return self._forward(input, hx)
        global _forward_outside_dynamo
        if _forward_outside_dynamo is None:
            _forward_outside_dynamo = torch.compiler.disable(_FastRNNMixin._forward, recursive=True)
        return _forward_outside_dynamo(self, input, hx)

    def _forward(self, input: Any, hx: Any) -> Any:
        weights = self._flat_weights
        params = self._parameters  # type: ignore[attr-defined]
        for name, weight in zip(self._flat_weights_names, weights):
            if params.get(name) is not weight:  # functional_call, parametrize, ...: torch's check
                self._update_flat_weights()  # type: ignore[attr-defined]
                weights = self._flat_weights
                break
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        reason = self._unsupported(data, hx, weights)
        if reason is not None:
            if reason:
                self._warn_fallback(reason)
            return super().forward(input, hx)  # type: ignore[misc]
        prepared = self._prepare(input, hx, packed)
        if prepared is None:  # bad shapes: torch's forward raises its own error
            return super().forward(input, hx)  # type: ignore[misc]
        x, batch_sizes, h0, c0, batched = prepared

        spec = self._synced_spec(weights, x.dtype)
        dropout = None
        if self.training and self.dropout > 0 and self.num_layers > 1:
            # The masks' seed comes from torch's generator: torch.manual_seed fixes them.
            dropout = (float(self.dropout), int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        keep = torch.is_grad_enabled() and (
            x.requires_grad
            or (h0 is not None and h0.requires_grad)
            or (c0 is not None and c0.requires_grad)
            or any(w.requires_grad for w in weights)
        )
        bs = None if batch_sizes is None else batch_sizes.numpy()
        if keep:
            result = _RNNFunction.apply(spec, bs, dropout, x, h0, c0, *weights)
            out, h_n = result[0], result[1]
            c_n = result[2] if spec.lstm else None
        else:
            out, h_n, c_n, _ = _numpy_forward(spec, bs, dropout, x, h0, c0, keep=False)

        if packed:
            unsorted = input.unsorted_indices
            if unsorted is not None:
                h_n = h_n.index_select(1, unsorted)
                c_n = None if c_n is None else c_n.index_select(1, unsorted)
            output: Any = PackedSequence(
                out, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        elif not batched:
            output = out.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        else:
            output = out.transpose(0, 1) if self.batch_first else out
        return (output, (h_n, c_n)) if spec.lstm else (output, h_n)

    def _unsupported(self, x: Any, hx: Any, weights: list[Any]) -> str | None:
        """None when fastrnn can run this call; else why not ("" for a silent fallback)."""
        # A tracer (torch.export, AOTAutograd, torch.jit.trace and so torch.onnx.export) cannot
        # see into fastrnn's C++ call: torch.jit.trace would record its outputs, and the weights,
        # as constants. Torch's own operator traces with the module's parameters as inputs.
        if _is_compiling() or _is_tracing() or not isinstance(x, torch.Tensor):
            return ""
        if not x.is_cpu:
            return f"the input is on {x.device}"
        dtype = x.dtype
        if dtype not in _NUMPY_DTYPE:
            return f"the input's dtype is {dtype}"
        if x.layout is not torch.strided:
            return ""
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        tensors = [x]
        for t in (*weights, *states):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                return ""  # torch raises its own error
            if t.dtype is not dtype or not t.is_cpu:
                return (
                    f"the input is {dtype} on cpu but a weight or state is {t.dtype} on {t.device}"
                )
            tensors.append(t)
        if _any_autocast():
            return "autocast is enabled"
        if _has_torch_function(tuple(tensors)):
            return "a tensor subclass with __torch_function__ is involved"
        if _is_functorch_wrapped(x):
            return "a torch.func transform (vmap, grad, ...) is active"
        if forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in tensors
        ):
            return "forward-mode AD (a dual tensor) is involved"
        return None

    def _warn_fallback(self, reason: str) -> None:
        adapter = self._fastrnn
        if adapter.warned:
            return
        adapter.warned = True
        warnings.warn(
            f"{type(self).__module__}.{type(self).__name__}: {reason}; running torch's own "
            "implementation (fastrnn runs CPU float32/float64). Shown once per module.",
            FastRNNFallbackWarning,
            stacklevel=5,  # _warn_fallback, forward, _call_impl, __call__, the caller
        )

    def _prepare(
        self, input: Any, hx: Any, packed: bool
    ) -> (
        tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, bool]
        | None
    ):
        """Time-major contiguous x (or packed rows) and states (layers * directions, batch, n)
        in the kernels' order; None when a shape is wrong (torch's forward then raises)."""
        lstm = self.mode == "LSTM"
        batch_sizes = None
        batched = True
        if packed:
            x, batch_sizes, sorted_indices = input.data, input.batch_sizes, input.sorted_indices
            if x.dim() != 2 or batch_sizes.dtype is not torch.int64 or batch_sizes.dim() != 1:
                return None
            batch = int(batch_sizes[0])
        else:
            sorted_indices = None
            x = input
            if x.dim() == 2:
                batched = False
                x = x.unsqueeze(1)
            elif x.dim() == 3:
                if self.batch_first:
                    x = x.transpose(0, 1)
            else:
                return None
            if x.shape[0] == 0 or x.shape[1] == 0:
                return None
            batch = x.shape[1]
        if x.shape[-1] != self.input_size:
            return None
        x = x.contiguous()

        units = self.num_layers * (2 if self.bidirectional else 1)
        h_shape = (units, batch, self.proj_size or self.hidden_size)
        h0 = c0 = None
        if hx is not None:
            if lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    return None
                h0, c0 = hx
            elif isinstance(hx, torch.Tensor):
                h0 = hx
            else:
                return None
            if not batched:
                if h0.dim() != 2 or (c0 is not None and c0.dim() != 2):
                    return None
                h0 = h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)
            if h0.shape != h_shape:
                return None
            if c0 is not None and c0.shape != (units, batch, self.hidden_size):
                return None
            if sorted_indices is not None:  # the states follow the user's batch order
                h0 = h0.index_select(1, sorted_indices)
                c0 = None if c0 is None else c0.index_select(1, sorted_indices)
        return x, batch_sizes, h0, c0, batched

    # -- weights --------------------------------------------------------------------------------

    def _synced_spec(self, weights: list[torch.Tensor], dtype: torch.dtype) -> _Spec:
        """The fastrnn layer for this dtype, pointed at the current parameters."""
        adapter = self._fastrnn
        spec = adapter.spec
        if spec is None or spec.dtype is not dtype:
            spec = adapter.spec = _Spec(
                self._new_layer(_NUMPY_DTYPE[dtype]), dtype, list(self._flat_weights_names)
            )
        _sync_weights(spec, weights)
        return spec

    def _new_layer(self, dtype: type) -> _layers._RNNBase:
        options: dict[str, Any] = dict(
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=False,  # the adapter hands over time-major tensors
            # dropout only acts between layers; fastrnn warns like torch about one layer.
            dropout=float(self.dropout) if self.num_layers > 1 else 0.0,
            bidirectional=self.bidirectional,
            dtype=dtype,
            seed=0,
        )
        if self.mode == "LSTM":
            layer: _layers._RNNBase = _layers.LSTM(
                self.input_size, self.hidden_size, proj_size=self.proj_size, **options
            )
        elif self.mode == "GRU":
            layer = _layers.GRU(self.input_size, self.hidden_size, **options)
        else:
            nonlinearity = "relu" if self.mode == "RNN_RELU" else "tanh"
            layer = _layers.RNN(
                self.input_size, self.hidden_size, nonlinearity=nonlinearity, **options
            )
        layer.grads = {}  # the adapter passes its own gradient arrays
        if list(layer._params) != list(self._flat_weights_names):
            raise RuntimeError(
                f"fastrnn.torch: parameter names {list(layer._params)} do not match torch's "
                f"{list(self._flat_weights_names)}"
            )
        return layer


class LSTM(_FastRNNMixin, nn.LSTM):
    """torch.nn.LSTM on fastrnn's kernels: same constructor, parameters, state_dict and call
    (``out, (h_n, c_n) = lstm(x, (h0, c0))``); see the module docstring."""


class GRU(_FastRNNMixin, nn.GRU):
    """torch.nn.GRU on fastrnn's kernels: same constructor, parameters, state_dict and call
    (``out, h_n = gru(x, h0)``); see the module docstring."""


class RNN(_FastRNNMixin, nn.RNN):
    """torch.nn.RNN (tanh or relu) on fastrnn's kernels: same constructor, parameters,
    state_dict and call (``out, h_n = rnn(x, h0)``); see the module docstring."""


_REPLACEMENTS: dict[type, type] = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


def patch(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.LSTM``, ``GRU`` and ``RNN`` inside ``model`` by its fastrnn.torch
    twin, in place, and return ``model``.

    The replacements share the originals' Parameter objects (values, device, dtype and
    ``requires_grad`` are kept, and an optimizer created before the patch keeps updating them),
    their hooks (hook handles made before the patch still remove them) and training mode. Only
    modules whose type is exactly one of the three are replaced: subclasses (own forward,
    parametrized modules) are left alone. A module shared by several parents gets one
    replacement.

    If ``model`` itself is an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``, a new module is returned
    (sharing the parameters, with copies of the hooks) and ``model`` is left unchanged: use
    ``model = patch(model)``.
    """
    own = _REPLACEMENTS.get(type(model))
    if own is not None:
        return own.from_torch(model)  # type: ignore[attr-defined, no-any-return]
    replaced: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            cls = _REPLACEMENTS.get(type(child))
            if cls is None:
                continue
            if id(child) not in replaced:
                # It takes the child's place: the child's hook handles must still work.
                twin = cls.from_torch(child, share_hooks=True)  # type: ignore[attr-defined]
                replaced[id(child)] = twin
            setattr(parent, name, replaced[id(child)])
    return model

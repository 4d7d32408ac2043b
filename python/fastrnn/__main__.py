"""Command line: ``python -m fastrnn info`` reports the build and checks every ISA."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import LSTM, RNN, __version__, _core, reference


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.linalg.norm(want.astype(np.float64)))
    return float(np.linalg.norm((got - want).astype(np.float64))) / max(scale, 1e-30)


def self_check(isa: str, dtype: np.dtype) -> float:
    """Largest relative error of a small LSTM and ReLU RNN (outputs, all gradients) vs reference."""
    rng = np.random.default_rng(0)
    steps, batch, inputs, hidden = 7, 3, 13, 37
    x = rng.standard_normal((steps, batch, inputs)).astype(dtype)
    grad_out = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    previous = _core.active_isa()
    _core._set_isa(isa)
    try:
        errors = []
        lstm = LSTM(inputs, hidden, dtype=dtype, seed=1)
        out, _ = lstm(x)
        dx, _ = lstm.backward(grad_out)
        p = lstm.state_dict()
        ref_out, _, _, cache = reference.lstm_forward(x, None, None, *p.values())
        ref = reference.lstm_backward(cache, grad_out)
        errors += [_rel_err(out, ref_out), _rel_err(dx, ref["x"])]
        errors += [_rel_err(lstm.grads[k], ref[k[:-3]]) for k in p]
        rnn = RNN(inputs, hidden, nonlinearity="relu", dtype=dtype, seed=2)
        out, _ = rnn(x)
        dx, _ = rnn.backward(grad_out)
        p = rnn.state_dict()
        ref_out, _, cache = reference.rnn_forward(x, None, *p.values(), nonlinearity="relu")
        ref = reference.rnn_backward(cache, grad_out)
        errors += [_rel_err(out, ref_out), _rel_err(dx, ref["x"])]
        errors += [_rel_err(rnn.grads[k], ref[k[:-3]]) for k in p]
    finally:
        _core._set_isa(previous)
    return max(errors)


def info() -> int:
    print(f"fastrnn {__version__}")
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}")
    print(f"active ISA:     {_core.active_isa()}  (set FASTRNN_ISA to force one)")
    print(f"available ISAs: {', '.join(_core.available_isas())}")
    print(f"compiled ISAs:  {', '.join(_core.compiled_isas())}")
    print(
        f"cores usable by this process: {_usable_cores()} (the kernels run on the calling thread)"
    )
    print("self-check against fastrnn.reference (LSTM and ReLU RNN, forward and all gradients):")
    tolerances = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}
    ok = True
    for isa in _core.available_isas():
        for dtype, tol in tolerances.items():
            err = self_check(isa, dtype)
            passed = err <= tol
            ok &= passed
            print(
                f"  {isa:7s} {dtype.name:8s} max relative error {err:.1e}  "
                f"{'ok' if passed else 'FAILED'}"
            )
    print("all checks passed" if ok else "SELF-CHECK FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, ISAs, and a self-check of every ISA")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return 2


if __name__ == "__main__":
    sys.exit(main())

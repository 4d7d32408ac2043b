"""Command line: ``python -m fastrnn info`` reports the build and checks every ISA;
``python -m fastrnn bench`` times fastrnn against the NumPy reference, torch.nn and ONNX Runtime."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys

import numpy as np

from . import GRU, LSTM, RNN, __version__, _core, reference
from . import bench as benchmarks


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.linalg.norm(want.astype(np.float64)))
    return float(np.linalg.norm((got - want).astype(np.float64))) / max(scale, 1e-30)


def self_check(isa: str, dtype: np.dtype) -> float:
    """Largest relative error of a small LSTM, GRU and ReLU RNN (outputs, all gradients) against
    the reference."""
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
        for layer, forward, backward in (
            (
                GRU(inputs, hidden, dtype=dtype, seed=3),
                reference.gru_forward,
                reference.gru_backward,
            ),
            (
                RNN(inputs, hidden, nonlinearity="relu", dtype=dtype, seed=2),
                functools.partial(reference.rnn_forward, nonlinearity="relu"),
                reference.rnn_backward,
            ),
        ):
            out, _ = layer(x)
            dx, _ = layer.backward(grad_out)
            p = layer.state_dict()
            ref_out, _, cache = forward(x, None, *p.values())
            ref = backward(cache, grad_out)
            errors += [_rel_err(out, ref_out), _rel_err(dx, ref["x"])]
            errors += [_rel_err(layer.grads[k], ref[k[:-3]]) for k in p]
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
        f"threads: {_core.get_num_threads()} (usable cores: {_usable_cores()}; FASTRNN_NUM_THREADS)"
    )
    print(f"L2 cache: {_core._l2_cache_bytes() >> 10} KiB per core")
    if _core.get_num_threads() > 1:
        barrier = _core._barrier_seconds(benchmarks.BARRIER_ROUNDS)
        print(
            f"barrier of the {_core.get_num_threads()} threads: {barrier * 1e9:.0f} ns "
            "(once per time step at small batch)"
        )
    print("self-check against fastrnn.reference (LSTM, GRU, ReLU RNN; forward, all gradients):")
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


def bench(args: argparse.Namespace) -> int:
    cases = tuple(
        c for c in benchmarks.CASES if not args.cases or any(k in c.name for k in args.cases)
    )
    modes = tuple(m for m in benchmarks.MODES if args.mode in (None, m))
    libraries = tuple(args.libraries or benchmarks.LIBRARIES)
    missing = [lib for lib in libraries if not benchmarks.library_available(lib)]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}", file=sys.stderr)
    rounds, repeat = (3, 2) if args.quick else (args.rounds, 3)

    def progress(message: str) -> None:
        print(f"\r{message:<78}", end="", file=sys.stderr, flush=True)

    results = benchmarks.run_benchmarks(
        cases,
        modes,
        libraries,
        threads=args.threads,
        rounds=rounds,
        repeat=repeat,
        progress=progress,
    )
    print("\r" + " " * 78 + "\r", end="", file=sys.stderr)
    isa = _core.active_isa()  # the bench's worker processes inherit FASTRNN_ISA
    print(benchmarks.format_table(results, args.threads, isa))
    for r in results:
        for library, error in r["errors"].items():
            print(f"{r['case']} {r['mode']}: {library} failed: {error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "isa": isa, "results": results}, f, indent=1)
    if args.plot:
        benchmarks.plot(results, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, ISAs, and a self-check of every ISA")
    bench_parser = commands.add_parser(
        "bench", help="time fastrnn against the NumPy reference, torch.nn and ONNX Runtime"
    )
    bench_parser.add_argument(
        "--threads",
        type=int,
        default=_core.get_num_threads(),
        help="threads for every library (default: fastrnn's default)",
    )
    bench_parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    bench_parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    bench_parser.add_argument(
        "--cases", nargs="*", help="only cases whose name contains one of these"
    )
    bench_parser.add_argument("--mode", choices=["inference", "training"], help="only this mode")
    bench_parser.add_argument("--libraries", nargs="*", choices=benchmarks.LIBRARIES)
    bench_parser.add_argument(
        "--json", metavar="FILE", help="save the results (medians and every sample) as JSON"
    )
    bench_parser.add_argument("--plot", metavar="FILE.png", help="draw the speed-ups (matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "bench":
        if not 1 <= args.threads <= _core._max_threads:
            parser.error(f"--threads must be from 1 to {_core._max_threads}")
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        for option, path in (("--json", args.json), ("--plot", args.plot)):
            # Found out now, not after the run.
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                parser.error(f"{option}: the directory of {path!r} does not exist")
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib (pip install 'fastrnn[plot]')")
        return bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

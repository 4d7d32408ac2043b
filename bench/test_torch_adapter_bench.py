"""A torch training step with fastrnn.torch.LSTM against the same step with torch.nn.LSTM.

One step: zero_grad, forward, sum-of-output loss, backward, SGD step, at 2 threads for both
(``torch.set_num_threads``, ``fastrnn.set_num_threads``). Both modules start from the same weights.
With ``compiled``, the step trains a model under ``torch.compile`` (inductor): a linear layer, the
LSTM and a linear head. Dynamo runs the LSTM between its compiled graphs (on fastrnn's kernels for
fastrnn.torch.LSTM, on torch's for torch.nn.LSTM).

    python -m pytest bench/test_torch_adapter_bench.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds
    python bench/test_torch_adapter_bench.py [--threads 2] [--repeats 30] [--compiled]   # A/B

The stand-alone runner measures two ways: interleaved in one process (A, B, A, B, ..., so drift on
a shared machine hits both alike; back to back, and with a pause before each step so the other
library's spinning workers go idle), and each library alone in its own process, the processes
alternating (as in a real training loop, where only one of the thread pools is busy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

import fastrnn  # noqa: E402

# (seq_len, batch, hidden = input size)
CASES = [(100, 1, 128), (25, 4, 512)]
LIBRARIES = ["fastrnn.torch", "torch.nn"]


class CompiledModel(torch.nn.Module):
    """What torch.compile gets: the LSTM between two layers that Dynamo puts in its graphs."""

    def __init__(self, lstm: torch.nn.LSTM) -> None:
        super().__init__()
        hidden = lstm.hidden_size
        self.embed = torch.nn.Linear(hidden, hidden)
        self.lstm = lstm
        self.head = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(torch.relu(self.embed(x)))[0])


def make_step(
    library: str, steps: int, batch: int, hidden: int, compiled: bool = False
) -> Callable[[], None]:
    """A closure running one training step of an LSTM(hidden, hidden) on fixed data."""
    # Imported here, not at collection: importing fastrnn.torch moves fastrnn's parallel regions
    # onto torch's OpenMP threads, which would change the other bench files' fastrnn rows.
    import fastrnn.torch as ft

    torch.manual_seed(0)
    cls = ft.LSTM if library == "fastrnn.torch" else torch.nn.LSTM
    model: torch.nn.Module = cls(hidden, hidden)
    if compiled:
        model = CompiledModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(steps, batch, hidden)

    def step() -> None:
        optimizer.zero_grad()
        out = forward(x)
        (out if compiled else out[0]).sum().backward()
        optimizer.step()

    return step


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    fastrnn.set_num_threads(threads)


# torch's compiler imports code that declares TorchScript methods, deprecated in torch 2.13.
COMPILED = pytest.param(
    True, id="compiled", marks=pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
)


@pytest.mark.parametrize("compiled", [pytest.param(False, id="eager"), COMPILED])
@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("case", CASES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in CASES])
def test_lstm_training_step(benchmark, case, library, compiled, threads):
    set_threads(threads)
    steps, batch, hidden = case
    step = make_step(library, *case, compiled=compiled)
    model = "a torch.compile model with LSTM" if compiled else "LSTM"
    benchmark.group = f"torch training step {model} T={steps} B={batch} H=I={hidden}"
    time.sleep(0.2)  # the other library's workers go idle
    step()  # warm-up: compilation, packing, allocation, library initialisation
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)


def interleaved(threads: int, repeats: int, pause: float, compiled: bool) -> None:
    """Alternating timings (A, B, A, B, ...); ``pause`` seconds of sleep before each timed step
    let the other library's spinning workers go idle (0: back to back, as in a real loop).
    Prints the medians and the median of the per-pair ratios."""
    set_threads(threads)
    for case in CASES:
        runs = {library: make_step(library, *case, compiled=compiled) for library in LIBRARIES}
        times: dict[str, list[float]] = {library: [] for library in LIBRARIES}
        for run in runs.values():
            for _ in range(3):
                run()
        for _ in range(repeats):
            for library, run in runs.items():
                if pause:
                    time.sleep(pause)
                start = time.perf_counter()
                run()
                times[library].append(time.perf_counter() - start)
        fast, ref = (statistics.median(times[library]) for library in LIBRARIES)
        ratio = statistics.median(r / f for f, r in zip(*times.values()))
        print(
            f"T={case[0]:3d} B={case[1]} H=I={case[2]:3d} threads={threads} pause={pause}: "
            f"fastrnn.torch {fast * 1e3:6.2f} ms, torch.nn {ref * 1e3:6.2f} ms, "
            f"torch.nn / fastrnn.torch = {ref / fast:.2f} (median of pairs {ratio:.2f})"
        )


def alone(
    library: str, case: tuple[int, int, int], threads: int, repeats: int, compiled: bool
) -> float:
    """Median step time of one library running alone (as in a real training loop)."""
    set_threads(threads)
    run = make_step(library, *case, compiled=compiled)
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def separate_processes(threads: int, repeats: int, rounds: int, compiled: bool) -> None:
    """Each library alone in its own process, processes alternating; medians over the rounds."""
    import subprocess
    import sys

    for index, case in enumerate(CASES):
        times: dict[str, list[float]] = {library: [] for library in LIBRARIES}
        for _ in range(rounds):
            for library in LIBRARIES:
                command = [sys.executable, __file__, "--alone", library, "--case", str(index)]
                command += ["--threads", str(threads), "--repeats", str(repeats)]
                command += ["--compiled"] if compiled else []
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                times[library].append(float(result.stdout.split()[-1]))
        fast, ref = (statistics.median(times[library]) for library in LIBRARIES)
        print(
            f"T={case[0]:3d} B={case[1]} H=I={case[2]:3d} threads={threads} separate processes: "
            f"fastrnn.torch {fast * 1e3:6.2f} ms, torch.nn {ref * 1e3:6.2f} ms, "
            f"torch.nn / fastrnn.torch = {ref / fast:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pause", type=float, nargs="*", default=[0.0, 0.05])
    parser.add_argument("--rounds", type=int, default=3, help="process pairs per case")
    parser.add_argument("--compiled", action="store_true", help="a torch.compile model")
    parser.add_argument("--alone", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alone:
        print(alone(args.alone, CASES[args.case], args.threads, args.repeats, args.compiled))
    else:
        for pause in args.pause:
            interleaved(args.threads, args.repeats, pause, args.compiled)
        if args.rounds:
            separate_processes(args.threads, args.repeats, args.rounds, args.compiled)

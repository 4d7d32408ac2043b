"""Benchmark cases and runners: fastrnn against its NumPy reference, torch.nn and ONNX Runtime.

``python -m fastrnn bench`` runs every library in a worker process of its own (started once),
interleaves the repetitions of the libraries case by case and, between libraries, waits until
every worker is idle, so one library's spinning thread pool never runs while another is timed.
The pytest-benchmark suite in ``bench/`` uses the same cases and runners.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

LIBRARIES = ("fastrnn", "reference", "torch", "onnxruntime")
MODES = ("inference", "training")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: float32, input_size = hidden_size (DeepBench's convention)."""

    # "lstm", "gru", "rnn_relu", "rnn_tanh", "lstm_cell" (one streaming step of fastrnn.LSTMCell
    # against torch.nn.LSTMCell: each call takes the state the previous call returned),
    # "torch_step" (a torch training step with fastrnn.torch.LSTM against torch.nn.LSTM), or
    # a limit of the machine: "sgemm" (torch.mm) or "fma" (the FMA units)
    cell: str
    steps: int
    batch: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0  # LSTM proj_size
    lengths: bool = False  # sequence lengths drawn between steps/2 and steps

    @property
    def name(self) -> str:
        if self.cell == "sgemm":
            return f"SGEMM {self.hidden}^3 (torch.mm)"
        if self.cell == "fma":
            return "FMA units (register FMAs)"
        if self.cell == "lstm_cell":
            return f"LSTMCell step B{self.batch} H{self.hidden}"
        if self.cell == "torch_step":
            return f"torch train step LSTM T{self.steps} B{self.batch} H{self.hidden}"
        label = {"lstm": "LSTM", "gru": "GRU", "rnn_relu": "ReLU RNN", "rnn_tanh": "tanh RNN"}
        name = f"{label[self.cell]} T{self.steps} B{self.batch} H{self.hidden}"
        if self.layers > 1:
            name += f" {self.layers} layers"
        if self.bidirectional:
            name += " bidir"
        if self.proj:
            name += f" proj{self.proj}"
        if self.lengths:
            name += " lengths T/2..T"
        return name

    @property
    def gates(self) -> int:
        return {"lstm": 4, "lstm_cell": 4, "torch_step": 4, "gru": 3}.get(self.cell, 1)

    def sequence_lengths(self) -> np.ndarray | None:
        if not self.lengths:
            return None
        lengths = np.random.default_rng(1).integers(self.steps // 2, self.steps + 1, self.batch)
        lengths[0] = self.steps
        return lengths

    def flops(self, mode: str) -> float:
        """Multiply-adds x 2 of the rows that run; training counts forward + backward as 3x."""
        if self.cell == "sgemm":
            return 2.0 * self.hidden**3
        if self.cell == "fma":
            return FMA_LIMIT_FLOPS
        lengths = self.sequence_lengths()
        rows = self.steps * self.batch if lengths is None else int(lengths.sum())
        directions = 2 if self.bidirectional else 1
        out = self.proj or self.hidden
        per_row = 0.0
        for layer in range(self.layers):
            inputs = self.hidden if layer == 0 else directions * out
            per_row += directions * (
                self.gates * self.hidden * (inputs + out) + out * self.hidden * (self.proj > 0)
            )
        total = 2.0 * rows * per_row * (3 if mode == "training" else 1)
        if self.cell == "torch_step" and mode == "training":
            total -= 2.0 * rows * self.gates * self.hidden * self.hidden  # x needs no gradient
        return total


# The cases of issue 3 (performance.md's DeepBench shapes) and issue 4 (GRU, lengths,
# projections, stacked bidirectional layers, fastrnn.torch in a torch training step).
CASES = (
    Case("lstm", 100, 1, 128),
    Case("lstm", 150, 1, 256),
    Case("lstm", 25, 4, 512),
    Case("lstm", 25, 16, 512),
    Case("lstm", 25, 64, 1024),
    Case("rnn_relu", 50, 16, 1760),
    Case("rnn_relu", 672, 1, 32),
    Case("lstm_cell", 1, 1, 128),
    Case("gru", 150, 1, 256),
    Case("gru", 25, 16, 512),
    Case("lstm", 100, 16, 256, lengths=True),
    Case("lstm", 100, 16, 256, proj=128),
    Case("lstm", 100, 16, 256, layers=2, bidirectional=True),
    Case("torch_step", 100, 1, 128),
    Case("torch_step", 25, 4, 512),
)
# The limits measured in the same run, at the same threads: torch's SGEMM (MKL / oneDNN), and the
# FMA units themselves (fastrnn._core._fma_limit: independent FMAs on registers, no memory).
SGEMM = Case("sgemm", 1, 1, 2048)
FMA_LIMIT = Case("fma", 1, 1, 0)
FMA_LIMIT_FLOPS = 2.0**31  # about 10 ms on two Zen 4 cores
# Barriers of fastrnn's threads, timed after each of its samples (fastrnn._core._barrier_seconds;
# about 1-3 ms): a time step split by hidden units pays one, and its cost follows where the
# threads run. On this project's VM it took about 35 ns at some times and 160 ns at others, and the
# batch-1 rows ran slower at the latter.
BARRIER_ROUNDS = 20_000


def supported(library: str, case: Case, mode: str) -> bool:
    if case.cell == "sgemm":
        return library == "torch" and mode == "inference"
    if case.cell == "fma":
        return library == "fastrnn" and mode == "inference"
    if case.cell == "torch_step":
        return library in ("fastrnn", "torch") and mode == "training"
    if library == "onnxruntime":  # inference only; its LSTM and GRU operators, plain layers
        plain = case.layers == 1 and not (case.bidirectional or case.proj or case.lengths)
        return mode == "inference" and case.cell in ("lstm", "gru") and plain
    if library == "reference":  # one layer and direction, where it finishes in a second or so
        work = case.steps * case.batch * case.hidden**2 * case.gates
        return case.layers == 1 and not case.bidirectional and work < 4e8
    return True


def _inputs(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    directions = 2 if case.bidirectional else 1
    x = rng.standard_normal((case.steps, case.batch, case.hidden)).astype(np.float32)
    out_shape = (case.steps, case.batch, directions * (case.proj or case.hidden))
    grad = rng.standard_normal(out_shape).astype(np.float32)
    return x, grad


def _layer_options(case: Case) -> dict[str, Any]:
    options: dict[str, Any] = {"num_layers": case.layers, "bidirectional": case.bidirectional}
    if case.proj:
        options["proj_size"] = case.proj
    if case.cell.startswith("rnn_"):
        options["nonlinearity"] = case.cell[4:]
    return options


def _fastrnn_layer(case: Case) -> Any:
    """The fastrnn layer of a case (an LSTM for the cell step), weights seeded."""
    import fastrnn

    kind = case.cell.replace("_cell", "")
    layer_class = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}.get(kind, fastrnn.RNN)
    return layer_class(case.hidden, case.hidden, seed=0, **_layer_options(case))


def fastrnn_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    import fastrnn

    fastrnn.set_num_threads(threads)
    if case.cell == "fma":
        return lambda: fastrnn._core._fma_limit(FMA_LIMIT_FLOPS)
    if case.cell == "torch_step":
        return _torch_step_runner(case, threads, fastrnn_layer=True)
    x, grad = _inputs(case, np.random.default_rng(0))
    h = case.hidden
    if case.cell == "lstm_cell":
        cell = fastrnn.LSTMCell(h, h, seed=0)
        zeros = np.zeros((case.batch, h), np.float32)
        state = [(zeros, zeros)]
        if mode == "inference":
            cell.eval()

            def step() -> None:
                state[0] = cell(x[0], state[0])

            return step

        def train_step() -> None:
            state[0] = cell(x[0], state[0])
            cell.backward(grad[0])

        return train_step
    layer = _fastrnn_layer(case)
    lengths = case.sequence_lengths()
    if mode == "inference":
        layer.eval()
        return lambda: layer(x, None, lengths)

    def train() -> None:
        layer(x, None, lengths)
        layer.backward(grad)

    return train


def reference_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    from fastrnn import reference

    x, grad = _inputs(case, np.random.default_rng(0))
    lengths = case.sequence_lengths()
    layer = _fastrnn_layer(case)
    p = {name[: -len("_l0")]: value for name, value in layer.state_dict().items()}
    weights = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    run_forward: Callable[[], Any]
    if "lstm" in case.cell:
        run_forward = functools.partial(
            reference.lstm_forward,
            x,
            None,
            None,
            *weights,
            weight_hr=p.get("weight_hr"),
            lengths=lengths,
        )
        run_backward = reference.lstm_backward
    elif case.cell == "gru":
        run_forward = functools.partial(reference.gru_forward, x, None, *weights, lengths=lengths)
        run_backward = reference.gru_backward
    else:
        run_forward = functools.partial(
            reference.rnn_forward, x, None, *weights, nonlinearity=case.cell[4:], lengths=lengths
        )
        run_backward = reference.rnn_backward

    if case.cell == "lstm_cell":  # a streaming step: the state carries from call to call
        zeros = np.zeros((case.batch, case.hidden), np.float32)
        state = [zeros, zeros]

        def step() -> None:
            _, state[0], state[1], cache = reference.lstm_forward(x, state[0], state[1], *weights)
            if mode == "training":
                reference.lstm_backward(cache, grad)

        return step

    def run() -> None:
        cache = run_forward()[-1]
        if mode == "training":
            run_backward(cache, grad)

    return run


def torch_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if case.cell == "sgemm":
        a, b = torch.randn(case.hidden, case.hidden), torch.randn(case.hidden, case.hidden)
        return lambda: torch.mm(a, b)
    x_np, grad_np = _inputs(case, np.random.default_rng(0))
    h = case.hidden
    if case.cell == "lstm_cell":
        cell = torch.nn.LSTMCell(h, h)
        x = torch.from_numpy(x_np[0])
        state = [(torch.zeros(case.batch, h), torch.zeros(case.batch, h))]
        if mode == "inference":

            def step() -> None:
                with torch.inference_mode():
                    state[0] = cell(x, state[0])

            return step
        x.requires_grad_(True)
        g = torch.from_numpy(grad_np[0])

        def train_step() -> None:
            # The state requires grad, so that torch computes dh and dc as fastrnn's cell does.
            h0, c0 = (s.detach().requires_grad_() for s in state[0])
            hy, cy = cell(x, (h0, c0))
            hy.backward(g)
            state[0] = (hy, cy)

        return train_step
    if case.cell == "torch_step":
        return _torch_step_runner(case, threads, fastrnn_layer=False)
    layer_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(case.cell, torch.nn.RNN)
    layer = layer_class(h, h, **_layer_options(case))
    x = torch.from_numpy(x_np)
    lengths = case.sequence_lengths()

    def run() -> Any:
        if lengths is None:
            return layer(x)[0]
        # What a user with padded batches and lengths does: pack, run, pad.
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, torch.from_numpy(lengths), enforce_sorted=False
        )
        out, _ = layer(packed)
        return torch.nn.utils.rnn.pad_packed_sequence(out, total_length=case.steps)[0]

    if mode == "inference":

        def infer() -> None:
            with torch.inference_mode():  # oneDNN picks its inference path from grad mode
                run()

        return infer
    x.requires_grad_(True)
    grad = torch.from_numpy(grad_np)

    def train() -> None:
        layer.zero_grad(set_to_none=True)
        run().backward(grad)

    return train


def _torch_step_runner(case: Case, threads: int, fastrnn_layer: bool) -> Callable[[], Any]:
    """A torch training step (zero_grad, forward, loss, backward, SGD step) of an LSTM:
    fastrnn.torch.LSTM or torch.nn.LSTM."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h = case.hidden
    if fastrnn_layer:
        import fastrnn.torch

        layer: Any = fastrnn.torch.LSTM(h, h)
    else:
        layer = torch.nn.LSTM(h, h)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x_np, grad_np = _inputs(case, np.random.default_rng(0))
    x, grad = torch.from_numpy(x_np), torch.from_numpy(grad_np)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.backward(grad)
        optimizer.step()

    return step


def onnxruntime_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    h, gates = case.hidden, case.gates
    rng = np.random.default_rng(0)
    bound = 1 / np.sqrt(h)
    weights = {
        "W": rng.uniform(-bound, bound, (1, gates * h, h)).astype(np.float32),
        "R": rng.uniform(-bound, bound, (1, gates * h, h)).astype(np.float32),
        "B": rng.uniform(-bound, bound, (1, 2 * gates * h)).astype(np.float32),
    }
    if case.cell == "gru":  # torch's GRU: b_hn inside r * (...)
        node = helper.make_node(
            "GRU", ["X", "W", "R", "B"], ["Y", "Y_h"], hidden_size=h, linear_before_reset=1
        )
    else:
        node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=h)
    graph = helper.make_graph(
        [node],
        case.cell,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [case.steps, case.batch, h])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    x, _ = _inputs(case, np.random.default_rng(0))
    return lambda: session.run(["Y"], {"X": x})


RUNNERS: dict[str, Callable[[Case, str, int], Callable[[], Any]]] = {
    "fastrnn": fastrnn_runner,
    "reference": reference_runner,
    "torch": torch_runner,
    "onnxruntime": onnxruntime_runner,
}


def library_available(library: str) -> bool:
    module = {"torch": "torch", "onnxruntime": "onnxruntime"}.get(library)
    if module is None:
        return True
    try:
        __import__(module)
        if library == "onnxruntime":
            __import__("onnx")
    except ImportError:
        return False
    return True


def time_calls(run: Callable[[], Any], repeat: int, min_seconds: float = 0.02) -> list[float]:
    """Seconds per call for `repeat` samples, each averaging enough calls to last min_seconds."""
    run()  # warm-up: packing, allocation, library initialisation
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(min_seconds / once))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        samples.append((time.perf_counter() - start) / calls)
    return samples


def worker_main() -> None:
    """A benchmark worker: one JSON request per stdin line, one JSON answer per stdout line."""
    # torch's notice that its LSTM with proj_size has no oneDNN path (why the case is compared)
    # would break the progress line on stderr.
    warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
    prepared: dict[tuple, Callable[[], Any]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        case = Case(**request["case"])
        key = (case, request["mode"], request["threads"])
        try:
            if key not in prepared:
                prepared[key] = RUNNERS[request["library"]](
                    case, request["mode"], request["threads"]
                )
            samples = time_calls(prepared[key], request["repeat"])
            answer: dict[str, Any] = {"samples": samples}
            if request["library"] == "fastrnn":
                import fastrnn

                answer["barrier"] = fastrnn._core._barrier_seconds(BARRIER_ROUNDS)
        except Exception as exc:  # reported to the parent, which shows it in the table
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


class Worker:
    def __init__(self, library: str, threads: int) -> None:
        self.library = library
        env = dict(os.environ)
        if library == "reference":  # NumPy's BLAS gets the threads every library gets
            for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[variable] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from fastrnn.bench import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def measure(self, case: Case, mode: str, threads: int, repeat: int) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        request = {
            "library": self.library,
            "case": dataclasses.asdict(case),
            "mode": mode,
            "threads": threads,
            "repeat": repeat,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            return {"error": f"the {self.library} worker exited"}
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def _cpu_seconds(pids: list[int]) -> float | None:
    """CPU time so far of all the threads of the processes (Linux), or None without /proc."""
    total = 0
    try:
        for pid in pids:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as stats:
                    total += int(stats.read().split()[0])  # nanoseconds on a CPU
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def wait_until_idle(pids: list[int], pause: float, limit: float = 1.0) -> float:
    """Sleeps until the processes together stay idle (under 2% of a core) for `pause` seconds,
    or about `limit` seconds have passed; returns the seconds waited.

    Thread pools keep spinning after a call: OpenBLAS's (the NumPy reference's matrix products)
    for about 0.1 s, which a fixed 0.05 s pause left running during the next library's timing.
    Without /proc this is a plain pause."""
    start = time.perf_counter()
    before = _cpu_seconds(pids)
    while True:
        time.sleep(pause)
        after = _cpu_seconds(pids)
        if before is None or after is None or after - before < 0.02 * pause:
            break
        if time.perf_counter() - start > limit:
            break
        before = after
    return time.perf_counter() - start


def steal_seconds() -> float | None:
    """CPU seconds the hypervisor has given other guests on this machine's CPUs, summed over
    them (the steal column of Linux's /proc/stat); None where it is not reported."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_benchmarks(
    cases: tuple[Case, ...] = CASES,
    modes: tuple[str, ...] = MODES,
    libraries: tuple[str, ...] = LIBRARIES,
    threads: int = 2,
    rounds: int = 5,
    repeat: int = 3,
    pause: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Median seconds per call for every (case, mode, library), interleaved round by round (the
    FMA units' limit: the best sample), with every sample under "samples"."""
    libraries = tuple(lib for lib in libraries if library_available(lib))
    workers = {lib: Worker(lib, threads) for lib in libraries}
    worker_pids = [worker.process.pid for worker in workers.values()]
    results = []
    try:
        jobs = [
            (c, m) for c in cases for m in modes if any(supported(lib, c, m) for lib in libraries)
        ]
        if "torch" in workers:
            jobs.insert(0, (SGEMM, "inference"))
        if "fastrnn" in workers:
            jobs.insert(0, (FMA_LIMIT, "inference"))
        for index, (case, mode) in enumerate(jobs):
            samples: dict[str, list[float]] = {}
            barriers: list[float] = []  # fastrnn's, one per round
            # Per library and round: the share of the CPUs' time the hypervisor gave to other
            # guests while it was timed (on a shared VM, the cause of most outliers).
            steal: dict[str, list[float]] = {}
            errors: dict[str, str] = {}
            todo = [lib for lib in libraries if supported(lib, case, mode)]
            for round_ in range(rounds):
                if progress:
                    progress(
                        f"[{index + 1}/{len(jobs)}] {case.name} {mode}: round {round_ + 1}/{rounds}"
                    )
                for lib in todo:
                    if lib in errors:
                        continue
                    # Waits until the previous library's thread pool stops spinning.
                    wait_until_idle(worker_pids, pause)
                    steal_before, start = steal_seconds(), time.perf_counter()
                    answer = workers[lib].measure(case, mode, threads, repeat)
                    elapsed, steal_after = time.perf_counter() - start, steal_seconds()
                    if steal_before is not None and steal_after is not None:
                        cpus = os.cpu_count() or 1
                        share = (steal_after - steal_before) / (elapsed * cpus)
                        steal.setdefault(lib, []).append(min(1.0, share))
                    if "error" in answer:
                        errors[lib] = answer["error"]
                    else:
                        samples.setdefault(lib, []).extend(answer["samples"])
                        if "barrier" in answer:
                            barriers.append(answer["barrier"])
            row: dict[str, Any] = {"case": case.name, "mode": mode, "flops": case.flops(mode)}
            if case.cell in ("sgemm", "fma"):
                row[case.cell] = True  # a limit: a note above the table, not a row
            # A limit of the hardware is its best sample: anything else on the machine only slows
            # it down (on a VM the first calls of a new thread pool can run on one core).
            statistic = np.min if case.cell == "fma" else np.median
            row["seconds"] = {lib: float(statistic(s)) for lib, s in samples.items()}
            # Every sample too: on a shared VM the spread says how far one run's ratios can move.
            row["samples"] = samples
            row["barrier"] = barriers
            row["steal"] = steal
            row["errors"] = errors
            results.append(row)
    finally:
        for worker in workers.values():
            worker.close()
    return results


def _limit_gflops(results: list[dict[str, Any]], limit: str, library: str) -> float | None:
    rows = [r for r in results if r.get(limit) and library in r["seconds"]]
    return rows[0]["flops"] / rows[0]["seconds"][library] / 1e9 if rows else None


def _without_limits(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if not (r.get("sgemm") or r.get("fma"))]


def format_table(results: list[dict[str, Any]], threads: int, isa: str | None = None) -> str:
    """A Markdown table: median times, fastrnn's GFLOP/s and its speed-up over each peer.
    `isa`: the instruction set of fastrnn's kernels, named in the first line (one machine's
    ratios differ by ISA: a VM may hide AVX-512 from a CPU that has it)."""
    sgemm_gflops = _limit_gflops(results, "sgemm", "torch")
    fma_gflops = _limit_gflops(results, "fma", "fastrnn")
    stolen = [  # the limits' measurements too
        (share, r["case"], r["mode"], lib)
        for r in results
        for lib, shares in r.get("steal", {}).items()
        for share in shares
    ]
    results = _without_limits(results)
    peers = [lib for lib in LIBRARIES[1:] if any(lib in r["seconds"] for r in results)]
    head = ["case", "mode", "fastrnn", "GFLOP/s", *(["of FMA"] if fma_gflops else [])]
    head += [*peers, *(f"vs {p}" for p in peers)]
    lines = [
        f"threads: {threads}; "
        + (f"fastrnn's kernels: {isa}; " if isa else "")
        + "medians; 'vs X' = X's time / fastrnn's time (higher: fastrnn faster)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def fmt(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"

    notes = []
    if sgemm_gflops:
        notes.append(
            f"SGEMM in this run: {sgemm_gflops:.1f} GFLOP/s (torch.mm 2048^3); GFLOP/s column: "
            "fastrnn's, with its % of SGEMM"
        )
    if fma_gflops:
        notes.append(
            f"FMA units in this run: {fma_gflops:.1f} GFLOP/s (independent FMAs on registers, "
            "every thread at once, best sample); 'of FMA' column: fastrnn's GFLOP/s as a % of "
            "that limit"
        )
    barriers = [b for r in results for b in r.get("barrier", []) if b > 0]
    if barriers:
        notes.append(
            f"Barrier of fastrnn's threads (once per time step at small batch) over the run: "
            f"median {1e9 * float(np.median(barriers)):.0f} ns, {1e9 * min(barriers):.0f}-"
            f"{1e9 * max(barriers):.0f} ns"
        )
    if stolen:
        share, case, mode, lib = max(stolen)
        notes.append(
            f"Steal time (the hypervisor running other guests on these CPUs) over the run: "
            f"{100 * float(np.mean([s[0] for s in stolen])):.1f}% of the CPUs' time on average, "
            f"at most {100 * share:.0f}% in one measurement ({lib}, {case} {mode}); a measurement "
            "under steal runs slower than the hardware allows"
        )
    lines[1:1] = notes
    for r in results:
        s = r["seconds"]
        mine = s.get("fastrnn")
        gflops = f"{r['flops'] / mine / 1e9:.1f}" if mine else "-"
        if mine and sgemm_gflops:
            gflops += f" ({100 * r['flops'] / mine / 1e9 / sgemm_gflops:.0f}%)"
        share = []
        if fma_gflops:
            share = [f"{100 * r['flops'] / mine / 1e9 / fma_gflops:.0f}%" if mine else "-"]
        ratios = [f"{s[p] / mine:.2f}x" if mine and p in s else "-" for p in peers]
        cells = [r["case"], r["mode"], fmt(mine), gflops, *share]
        cells += [*(fmt(s.get(p)) for p in peers), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Bar chart of each peer's time / fastrnn's time per case and mode (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = _without_limits(results)
    peers = [lib for lib in LIBRARIES[1:] if any(lib in r["seconds"] for r in results)]
    labels = [f"{r['case']}\n{r['mode']}" for r in results]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(results)), 5))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        ratios = [
            r["seconds"][peer] / r["seconds"]["fastrnn"]
            if peer in r["seconds"] and "fastrnn" in r["seconds"]
            else 0.0
            for r in results
        ]
        ax.bar(
            np.arange(len(results)) + i * width, ratios, width, label=f"{peer} time / fastrnn time"
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(
        np.arange(len(results)) + 0.4 - width / 2, labels, rotation=60, ha="right", fontsize=7
    )
    ax.set_ylabel("speed-up of fastrnn (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

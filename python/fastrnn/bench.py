"""Benchmark cases and runners: fastrnn against its NumPy reference, torch.nn and ONNX Runtime.

``python -m fastrnn bench`` runs every library in a worker process of its own (started once),
interleaves the repetitions of the libraries case by case and pauses between libraries, so one
library's spinning thread pool never runs while another is timed. The pytest-benchmark suite in
``bench/`` uses the same cases and runners.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

LIBRARIES = ("fastrnn", "reference", "torch", "onnxruntime")
MODES = ("inference", "training")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: float32, input_size = hidden_size (DeepBench's convention)."""

    cell: str  # "lstm", "rnn_relu", "rnn_tanh", "lstm_cell" (one step), or "sgemm" (the limit)
    steps: int
    batch: int
    hidden: int

    @property
    def name(self) -> str:
        if self.cell == "sgemm":
            return f"SGEMM {self.hidden}^3 (torch.mm)"
        if self.cell == "lstm_cell":
            return f"LSTMCell step B{self.batch} H{self.hidden}"
        label = {"lstm": "LSTM", "rnn_relu": "ReLU RNN", "rnn_tanh": "tanh RNN"}[self.cell]
        return f"{label} T{self.steps} B{self.batch} H{self.hidden}"

    def flops(self, mode: str) -> float:
        """Multiply-adds x 2 of the layer; training counts forward + backward as 3x forward."""
        if self.cell == "sgemm":
            return 2.0 * self.hidden**3
        gates = {"lstm": 4, "lstm_cell": 4, "rnn_relu": 1, "rnn_tanh": 1}[self.cell]
        forward = 2.0 * gates * self.steps * self.batch * self.hidden * 2 * self.hidden
        return forward * (3 if mode == "training" else 1)


# The cases of issue 3 (performance.md's DeepBench shapes).
CASES = (
    Case("lstm", 100, 1, 128),
    Case("lstm", 150, 1, 256),
    Case("lstm", 25, 4, 512),
    Case("lstm", 25, 16, 512),
    Case("lstm", 25, 64, 1024),
    Case("rnn_relu", 50, 16, 1760),
    Case("rnn_relu", 672, 1, 32),
    Case("lstm_cell", 1, 1, 128),
)
# The hardware limit measured in the same run: torch's SGEMM (MKL / oneDNN) at the same threads.
SGEMM = Case("sgemm", 1, 1, 2048)


def supported(library: str, case: Case, mode: str) -> bool:
    if case.cell == "sgemm":
        return library == "torch" and mode == "inference"
    if library == "onnxruntime":  # inference only, and its LSTM operator has no ReLU RNN twin here
        return mode == "inference" and case.cell == "lstm"
    if library == "reference":  # only where it finishes in a second or so
        return case.steps * case.batch * case.hidden**2 * (4 if "lstm" in case.cell else 1) < 4e8
    return True


def _inputs(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((case.steps, case.batch, case.hidden)).astype(np.float32)
    grad = rng.standard_normal((case.steps, case.batch, case.hidden)).astype(np.float32)
    return x, grad


def fastrnn_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    import fastrnn

    fastrnn.set_num_threads(threads)
    x, grad = _inputs(case, np.random.default_rng(0))
    h = case.hidden
    if "lstm" in case.cell:  # "lstm_cell" is one step of the same layer
        layer = fastrnn.LSTM(h, h, seed=0)
    else:
        layer = fastrnn.RNN(h, h, nonlinearity=case.cell[4:], seed=0)
    if mode == "inference":
        layer.eval()
        return lambda: layer(x)

    def train() -> None:
        layer(x)
        layer.backward(grad)

    return train


def reference_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    import fastrnn
    from fastrnn import reference

    x, grad = _inputs(case, np.random.default_rng(0))
    h = case.hidden
    lstm = "lstm" in case.cell
    layer = fastrnn.LSTM(h, h, seed=0) if lstm else fastrnn.RNN(h, h, seed=0)
    params = list(layer.state_dict().values())

    def run() -> None:
        if lstm:
            *_, cache = reference.lstm_forward(x, None, None, *params)
            if mode == "training":
                reference.lstm_backward(cache, grad)
        else:
            *_, cache = reference.rnn_forward(x, None, *params, nonlinearity=case.cell[4:])
            if mode == "training":
                reference.rnn_backward(cache, grad)

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
        if mode == "inference":

            def step() -> None:
                with torch.inference_mode():
                    cell(x)

            return step
        x.requires_grad_(True)
        g = torch.from_numpy(grad_np[0])

        def train_step() -> None:
            hy, _ = cell(x)
            hy.backward(g)

        return train_step
    if case.cell == "lstm":
        layer = torch.nn.LSTM(h, h)
    else:
        layer = torch.nn.RNN(h, h, nonlinearity=case.cell[4:])
    x = torch.from_numpy(x_np)
    if mode == "inference":

        def infer() -> None:
            with torch.inference_mode():  # oneDNN picks its inference path from grad mode
                layer(x)

        return infer
    x.requires_grad_(True)
    grad = torch.from_numpy(grad_np)

    def train() -> None:
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.backward(grad)

    return train


def onnxruntime_runner(case: Case, mode: str, threads: int) -> Callable[[], Any]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    h = case.hidden
    rng = np.random.default_rng(0)
    bound = 1 / np.sqrt(h)
    weights = {
        "W": rng.uniform(-bound, bound, (1, 4 * h, h)).astype(np.float32),
        "R": rng.uniform(-bound, bound, (1, 4 * h, h)).astype(np.float32),
        "B": rng.uniform(-bound, bound, (1, 8 * h)).astype(np.float32),
    }
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=h)
    graph = helper.make_graph(
        [node],
        "lstm",
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
        except Exception as exc:  # reported to the parent, which shows it in the table
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


class Worker:
    def __init__(self, library: str) -> None:
        self.library = library
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from fastrnn.bench import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
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
    """Median seconds per call for every (case, mode, library), interleaved round by round."""
    libraries = tuple(lib for lib in libraries if library_available(lib))
    workers = {lib: Worker(lib) for lib in libraries}
    results = []
    try:
        jobs = [(c, m) for c in cases for m in modes]
        if "torch" in workers:
            jobs.insert(0, (SGEMM, "inference"))
        for index, (case, mode) in enumerate(jobs):
            samples: dict[str, list[float]] = {}
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
                    time.sleep(pause)  # the previous library's pool stops spinning
                    answer = workers[lib].measure(case, mode, threads, repeat)
                    if "error" in answer:
                        errors[lib] = answer["error"]
                    else:
                        samples.setdefault(lib, []).extend(answer["samples"])
            row: dict[str, Any] = {"case": case.name, "mode": mode, "flops": case.flops(mode)}
            if case.cell == "sgemm":
                row["sgemm"] = True
            row["seconds"] = {lib: float(np.median(s)) for lib, s in samples.items()}
            row["errors"] = errors
            results.append(row)
    finally:
        for worker in workers.values():
            worker.close()
    return results


def format_table(results: list[dict[str, Any]], threads: int) -> str:
    """A Markdown table: median times, fastrnn's GFLOP/s and its speed-up over each peer."""
    sgemm = [r for r in results if r.get("sgemm") and "torch" in r["seconds"]]
    sgemm_gflops = sgemm[0]["flops"] / sgemm[0]["seconds"]["torch"] / 1e9 if sgemm else None
    results = [r for r in results if not r.get("sgemm")]
    peers = [lib for lib in LIBRARIES[1:] if any(lib in r["seconds"] for r in results)]
    head = ["case", "mode", "fastrnn", "GFLOP/s", *peers, *(f"vs {p}" for p in peers)]
    lines = [
        f"threads: {threads}; medians; 'vs X' = X's time / fastrnn's time (higher: fastrnn faster)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def fmt(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"

    if sgemm_gflops:
        lines.insert(
            1,
            f"SGEMM in this run: {sgemm_gflops:.1f} GFLOP/s (torch.mm 2048^3); GFLOP/s column: "
            "fastrnn's, with its % of SGEMM",
        )
    for r in results:
        s = r["seconds"]
        mine = s.get("fastrnn")
        gflops = f"{r['flops'] / mine / 1e9:.1f}" if mine else "-"
        if mine and sgemm_gflops:
            gflops += f" ({100 * r['flops'] / mine / 1e9 / sgemm_gflops:.0f}%)"
        ratios = [f"{s[p] / mine:.2f}x" if mine and p in s else "-" for p in peers]
        cells = [r["case"], r["mode"], fmt(mine), gflops, *(fmt(s.get(p)) for p in peers), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Bar chart of each peer's time / fastrnn's time per case and mode (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if not r.get("sgemm")]
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

"""Inference and training (forward + backward with weight gradients) per case and library."""

from __future__ import annotations

import time

import numpy as np
import pytest

import fastrnn
from fastrnn import reference

# (cell, seq_len, batch, hidden), input_size = hidden, float32
CASES = [
    ("lstm", 100, 1, 128),
    ("lstm", 25, 4, 512),
    ("lstm", 25, 16, 512),
    ("rnn_relu", 672, 1, 32),
    ("rnn_relu", 50, 16, 1760),
]
MODES = ["inference", "training"]
LIBRARIES = ["fastrnn", "reference", "torch"]


def _case_id(case: tuple) -> str:
    cell, t, b, h = case
    return f"{cell}-T{t}-B{b}-H{h}"


def _fastrnn_runner(cell: str, t: int, b: int, h: int, mode: str, rng: np.random.Generator):
    layer = (
        fastrnn.LSTM(h, h, seed=0)
        if cell == "lstm"
        else fastrnn.RNN(h, h, nonlinearity="relu", seed=0)
    )
    x = rng.standard_normal((t, b, h)).astype(np.float32)
    grad = rng.standard_normal((t, b, h)).astype(np.float32)
    if mode == "inference":
        layer.eval()
        return lambda: layer(x)

    def step():
        layer(x)
        layer.backward(grad)

    return step


def _reference_runner(cell: str, t: int, b: int, h: int, mode: str, rng: np.random.Generator):
    params = (
        fastrnn.LSTM(h, h, seed=0) if cell == "lstm" else fastrnn.RNN(h, h, seed=0)
    ).state_dict()
    x = rng.standard_normal((t, b, h)).astype(np.float32)
    grad = rng.standard_normal((t, b, h)).astype(np.float32)

    def run():
        if cell == "lstm":
            out = reference.lstm_forward(x, None, None, *params.values())
            if mode == "training":
                reference.lstm_backward(out[-1], grad)
        else:
            out = reference.rnn_forward(x, None, *params.values(), nonlinearity="relu")
            if mode == "training":
                reference.rnn_backward(out[-1], grad)

    return run


def _torch_runner(
    cell: str, t: int, b: int, h: int, mode: str, rng: np.random.Generator, threads: int
):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = torch.nn.LSTM(h, h) if cell == "lstm" else torch.nn.RNN(h, h, nonlinearity="relu")
    x = torch.from_numpy(rng.standard_normal((t, b, h)).astype(np.float32))
    if mode == "inference":

        def infer():
            with torch.inference_mode():
                layer(x)

        return infer
    grad = torch.from_numpy(rng.standard_normal((t, b, h)).astype(np.float32))
    x.requires_grad_(True)

    def train():
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.backward(grad)

    return train


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layer(benchmark, case, mode, library, threads):
    cell, t, b, h = case
    rng = np.random.default_rng(0)
    if library == "fastrnn":
        run = _fastrnn_runner(cell, t, b, h, mode, rng)
    elif library == "reference":
        if t * b * h * h > 50_000_000:
            pytest.skip("the NumPy reference takes too long on this case")
        run = _reference_runner(cell, t, b, h, mode, rng)
    else:
        run = _torch_runner(cell, t, b, h, mode, rng, threads)
    benchmark.group = f"{_case_id(case)}-{mode}"
    time.sleep(0.2)  # let the previous library's worker threads go idle
    run()  # warm-up: packing, allocation, library initialisation
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)

"""Every C++ entry point of fastrnn, round after round, for the memory tests (test_memory.py).

Run as a script: ``python memory_workload.py ROUNDS [WARMUP [torch]]``. It runs WARMUP rounds,
then ROUNDS more, and prints the ISA and the resident set size (bytes) after each phase:
``isa avx512``, ``rss-after-warmup N``, ``rss-after-rounds N``. A round covers the layers (every
option, training and inference, lengths, batch 0, a repack), the cells, the functional forms and
calls that raise, on one and two threads, in float32 and float64; with ``torch``, training steps
of fastrnn.torch's layers (padded and packed input, an optimizer step) instead.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import fastrnn
from fastrnn import _core

STEPS, BATCH, INPUTS, HIDDEN = 6, 3, 7, 33


def layer_calls(dtype: type, rng: np.random.Generator) -> None:
    time_major = rng.standard_normal((STEPS, BATCH, INPUTS)).astype(dtype)
    lengths = np.array([STEPS, 2, 0])
    for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
        variants: list[dict] = [
            {},
            {"num_layers": 2, "bidirectional": True, "dropout": 0.3, "seed": 1},
            {"bias": False, "batch_first": True},
        ]
        if cls is fastrnn.LSTM:
            variants.append({"proj_size": 5, "bidirectional": True})
        for options in variants:
            layer = cls(INPUTS, HIDDEN, dtype=dtype, **options)
            x = time_major.transpose(1, 0, 2) if options.get("batch_first") else time_major
            out, state = layer(x)
            layer.backward(np.ones_like(out))
            out, state = layer(x, None, lengths)
            layer.backward(np.ones_like(out), state)
            empty = x[:0] if options.get("batch_first") else x[:, :0]
            layer.backward(np.ones_like(layer(empty)[0]))
            layer.load_state_dict(layer.state_dict())  # a repack
            layer.eval()
            layer(x, state)
    for cls in (fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell):
        cell = cls(INPUTS, HIDDEN, dtype=dtype)
        state = None
        for step in time_major:
            state = cell(step, state)
            h = state[0] if isinstance(state, tuple) else state
            cell.backward(np.ones_like(h))
        cell.eval()  # streaming: a step that keeps nothing
        cell(time_major[0], state)
    gates = {"lstm": 4, "gru": 3, "rnn": 1}
    for name, count in gates.items():
        w_ih = rng.standard_normal((count * HIDDEN, INPUTS)).astype(dtype)
        w_hh = rng.standard_normal((count * HIDDEN, HIDDEN)).astype(dtype)
        if name == "lstm":
            fastrnn.functional.lstm(time_major, None, None, w_ih, w_hh)
        else:
            getattr(fastrnn.functional, name)(time_major, None, w_ih, w_hh)


def failing_calls() -> None:
    layer = fastrnn.LSTM(INPUTS, HIDDEN)
    x = np.zeros((STEPS, BATCH, INPUTS), np.float32)
    state = np.zeros((1, BATCH + 1, HIDDEN), np.float32)
    calls = [
        lambda: layer(np.zeros((STEPS, BATCH, INPUTS + 1), np.float32)),
        lambda: layer(x, (state, state)),
        lambda: layer(x, None, [STEPS + 1, 1, 1]),
        lambda: layer(np.zeros((0, BATCH, INPUTS), np.float32)),
        lambda: fastrnn.LSTM(INPUTS, HIDDEN).backward(np.zeros((STEPS, BATCH, HIDDEN))),
        lambda: layer.load_state_dict({"weight_ih_l0": np.zeros((3, 3))}),
        lambda: _core.pack(
            "lstm", np.zeros((4 * HIDDEN, INPUTS)), np.zeros((4 * HIDDEN, HIDDEN + 1)), None, None
        ),
        lambda: fastrnn.LSTM(1 << 40, 1 << 30),
    ]
    for call in calls:
        try:
            call()
        except (ValueError, TypeError, KeyError, RuntimeError, MemoryError):
            continue
        raise AssertionError("a bad call did not raise")


def torch_training_steps() -> None:
    import torch

    import fastrnn.torch

    # Larger than the layers' calls: what a forward keeps for its backward is ~1 MiB here.
    steps, batch, inputs, hidden = 20, 8, 16, 64
    x = torch.randn(steps, batch, inputs)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [steps] + [steps // 2] * (batch - 1))
    for cls in (fastrnn.torch.LSTM, fastrnn.torch.GRU, fastrnn.torch.RNN):
        layer = cls(inputs, hidden, num_layers=2, bidirectional=True)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
        for data in (x, packed):
            out = layer(data)[0]
            loss = (out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # the next forward repacks


def run_round(rng: np.random.Generator) -> None:
    for threads in (1, 2):
        fastrnn.set_num_threads(threads)
        for dtype in (np.float32, np.float64):
            layer_calls(dtype, rng)
        failing_calls()


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    rounds = int(sys.argv[1])
    warmup = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    rng = np.random.default_rng(0)
    one_round = torch_training_steps if sys.argv[3:] == ["torch"] else lambda: run_round(rng)
    print("isa", fastrnn.active_isa(), flush=True)
    for _ in range(warmup):
        one_round()
    print("rss-after-warmup", resident_bytes(), flush=True)
    for _ in range(rounds):
        one_round()
    print("rss-after-rounds", resident_bytes(), flush=True)


if __name__ == "__main__":
    main()

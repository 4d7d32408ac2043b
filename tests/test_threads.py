"""fastrnn's thread pool: thread count control, results independent of it, fork safety."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastrnn
from conftest import DTYPE_IDS, DTYPES, assert_close


def _train_step(layer, x, grad_out):
    out, _ = layer(x)
    layer.backward(grad_out)
    return out, {k: v.copy() for k, v in layer.grads.items()}


# (T, B, I, H): hidden split (small batch) and batch split (large batch), sizes with tails; the
# last has fewer hidden-unit panels than 3 or 4 threads (a thread without work).
SHAPES = [(6, 1, 40, 130), (4, 3, 17, 257), (3, 70, 33, 65), (2, 130, 9, 40), (6, 8, 60, 20)]
LAYERS = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU, "rnn_tanh": fastrnn.RNN}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-B{b}-I{i}-H{h}" for t, b, i, h in SHAPES])
def test_results_do_not_depend_on_thread_count(isa, kind, dtype, shape, restore_threads):
    # Training, and inference (which computes x·W_ihᵀ in chunks and keeps no state).
    steps, batch, inputs, hidden = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, batch, inputs)).astype(dtype)
    grad_out = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    results = []
    for threads in (1, 2, 3, 4):
        fastrnn.set_num_threads(threads)
        assert fastrnn.get_num_threads() == threads
        layer = LAYERS[kind](inputs, hidden, dtype=dtype, seed=1)
        out, grads = _train_step(layer, x, grad_out)
        inference, _ = layer.eval()(x)
        results.append((out, grads, inference))
    for out, grads, inference in results[1:]:
        assert_close(out, results[0][0], dtype, "fwd", "out")
        assert_close(inference, results[0][2], dtype, "fwd", "inference out")
        for name, grad in grads.items():
            assert_close(grad, results[0][1][name], dtype, "grad", name)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_lengths_and_stacks_do_not_depend_on_thread_count(
    isa, kind, bidirectional, restore_threads
):
    # Sequences that end early leave the hidden split's steps with fewer rows; the directions of
    # a bidirectional layer run at once, each on a thread of its own.
    steps, batch, inputs, hidden = 7, 4, 30, 150
    rng = np.random.default_rng(2)
    x = rng.standard_normal((steps, batch, inputs)).astype(np.float32)
    lengths = np.array([7, 3, 7, 1])
    directions = 2 if bidirectional else 1
    grad_out = rng.standard_normal((steps, batch, directions * hidden)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        fastrnn.set_num_threads(threads)
        layer = LAYERS[kind](inputs, hidden, num_layers=2, bidirectional=bidirectional, seed=3)
        out, _ = layer(x, lengths=lengths)
        layer.backward(grad_out)
        results.append((out, {k: v.copy() for k, v in layer.grads.items()}))
    for out, grads in results[1:]:
        assert_close(out, results[0][0], np.float32, "fwd", "out")
        for name, grad in grads.items():
            assert_close(grad, results[0][1][name], np.float32, "grad", name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("threads", [2, 5])
def test_shared_panels_give_the_results_of_one_thread(isa, kind, dtype, threads, restore_threads):
    # From batch 4, the threads of a step split by hidden units take each other's panels once
    # their own are done (forward and backward steps, and the forward's input GEMM), and the
    # weight gradients' GEMMs hand out blocks of rows (G = 800 rows here). Which thread takes what
    # depends on timing: a few calls, each long enough (over 2^24 multiply-adds) to run on the
    # workers even when they sleep.
    steps, batch, inputs, hidden = 20, 6, 48, 200
    rng = np.random.default_rng(6)
    x = rng.standard_normal((steps, batch, inputs)).astype(dtype)
    grad_out = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    layer = LAYERS[kind](inputs, hidden, dtype=dtype, seed=7)
    fastrnn.set_num_threads(1)
    expected = _train_step(layer, x, grad_out)
    expected_inference, _ = layer.eval()(x)
    fastrnn.set_num_threads(threads)
    for _ in range(3):
        layer.train().zero_grad()
        out, grads = _train_step(layer, x, grad_out)
        inference, _ = layer.eval()(x)
        assert_close(out, expected[0], dtype, "fwd", "out")
        assert_close(inference, expected_inference, dtype, "fwd", "inference out")
        for name, grad in grads.items():
            assert_close(grad, expected[1][name], dtype, "grad", name)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")
def test_a_thread_takes_the_panels_of_one_that_does_not_run():
    # Two threads on one core: while one runs, the other does not, and the running one, done with
    # its own panels of a step, takes the other's (which two cores at the same speed rarely need).
    # Calls of over 2^24 multiply-adds, which run on the workers even when they sleep (calls far
    # apart, as under an emulator, would otherwise run on the calling thread alone).
    code = """
import os, time, numpy as np, fastrnn
from fastrnn import _core
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
rng = np.random.default_rng(0)
x = rng.standard_normal((20, 6, 48)).astype(np.float32)
grad_out = rng.standard_normal((20, 6, 200)).astype(np.float32)
worst = 0.0
for kind in (fastrnn.LSTM, fastrnn.GRU):
    fastrnn.set_num_threads(1)
    layer = kind(48, 200, seed=0)
    out, _ = layer(x)
    layer.backward(grad_out)
    expected = [out, layer.eval()(x)[0], *(g.copy() for g in layer.grads.values())]
    fastrnn.set_num_threads(2)
    steals, start = _core._steals(), time.monotonic()
    while _core._steals() == steals and time.monotonic() - start < 20:
        layer.train().zero_grad()
        out, _ = layer(x)
        layer.backward(grad_out)
        got = [out, layer.eval()(x)[0], *layer.grads.values()]
        for a, b in zip(expected, got):
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    assert _core._steals() > steals, "no steal in 20 s"
print(worst)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-5


CELLS = {"lstm": fastrnn.LSTMCell, "gru": fastrnn.GRUCell, "rnn_tanh": fastrnn.RNNCell}


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_backward_does_not_depend_on_thread_count(isa, kind, restore_threads):
    # One step's backward splits its weight-gradient GEMMs between the threads.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 100)).astype(np.float32)
    grad_h = rng.standard_normal((2, 260)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        fastrnn.set_num_threads(threads)
        cell = CELLS[kind](100, 260, seed=5)
        cell(x)
        dx = cell.backward(grad_h)[0]
        results.append((dx, {k: v.copy() for k, v in cell.grads.items()}))
    for dx, grads in results[1:]:
        assert_close(dx, results[0][0], np.float32, "grad", "dx")
        for name, grad in grads.items():
            assert_close(grad, results[0][1][name], np.float32, "grad", name)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("steps", [1, 400], ids=["short", "long"])
def test_calls_after_the_workers_sleep(steps, bidirectional, restore_threads):
    # Idle workers sleep after about 2 ms. A short call then runs on the calling thread (the two
    # directions one after the other) and wakes them for the next call; a long one wakes them and
    # waits; packing weights (after they change) runs on the calling thread. Either way: the same
    # results, forward and backward.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((steps, 1, 128)).astype(np.float32)
    grad_out = rng.standard_normal((steps, 1, 256 if bidirectional else 128)).astype(np.float32)
    fastrnn.set_num_threads(1)
    layer = fastrnn.LSTM(128, 128, bidirectional=bidirectional, seed=7)
    expected = _train_step(layer, x, grad_out)
    fastrnn.set_num_threads(2)
    for _ in range(3):
        time.sleep(0.01)
        layer.load_state_dict(layer.state_dict())  # repacks the weights at the next call
        for _ in range(3):  # the first after the pause, then with the workers awake
            layer.zero_grad()
            out, grads = _train_step(layer, x, grad_out)
            assert_close(out, expected[0], np.float32, "fwd", "out")
            for name, grad in grads.items():
                assert_close(grad, expected[1][name], np.float32, "grad", name)


def test_set_num_threads_rejects_bad_values(restore_threads):
    for bad in (0, -1, fastrnn._core._max_threads + 1):
        with pytest.raises(ValueError, match="n must be from 1 to 1024"):
            fastrnn.set_num_threads(bad)
    with pytest.raises(TypeError):
        fastrnn.set_num_threads("2")


def test_barrier_timing_hook(restore_threads):
    # What `python -m fastrnn info` and the bench report: a barrier of the pool's threads.
    fastrnn.set_num_threads(1)
    assert fastrnn._core._barrier_seconds(100) == 0.0  # one thread meets no one
    fastrnn.set_num_threads(2)
    assert 0.0 < fastrnn._core._barrier_seconds(1000) < 1e-3
    for rounds in (0, -1, 10**9):
        with pytest.raises(ValueError, match="rounds must be between 1 and 1e8"):
            fastrnn._core._barrier_seconds(rounds)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_environment_sets_the_default():
    result = _python("import fastrnn; print(fastrnn.get_num_threads())", FASTRNN_NUM_THREADS="3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


@pytest.mark.parametrize("value", ["0", "two", "-1", "2.5"])
def test_bad_environment_value_fails_the_import(value):
    result = _python("import fastrnn", FASTRNN_NUM_THREADS=value)
    assert result.returncode != 0
    assert "FASTRNN_NUM_THREADS" in result.stderr


def test_default_is_the_usable_cores():
    env = {k: v for k, v in os.environ.items() if k != "FASTRNN_NUM_THREADS"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fastrnn, os; print(fastrnn.get_num_threads(), len(os.sched_getaffinity(0)))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    threads, cores = map(int, result.stdout.split())
    assert 1 <= threads <= cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")
def test_more_threads_than_cores():
    # Three threads on one core: every wait at a step's barrier outlasts the spin and yields the
    # core to the thread it waits for (the path two busy processes take). Same results as one.
    code = """
import os, numpy as np, fastrnn
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
x = np.random.default_rng(0).standard_normal((300, 1, 256)).astype(np.float32)
outs = []
for threads in (1, 3):
    fastrnn.set_num_threads(threads)
    layer = fastrnn.LSTM(256, 256, seed=0)
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    outs.append((out, layer.grads["weight_hh_l0"]))
print(max(float(np.abs(a - b).max()) for a, b in zip(*outs)))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-4


# A layer's steps wait at a barrier; a cell's single step has none, so its worker checks when the
# region starts.
LAYER_CALL = """
module = fastrnn.LSTM(256, 256, seed=0).eval()
x = np.random.default_rng(0).standard_normal((200, 1, 256)).astype(np.float32)
def call():
    return module(x)[0]
"""
CELL_CALL = """
module = fastrnn.LSTMCell(128, 128, seed=0).eval()
x = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
def call():
    return module(x, (x, x))[0]
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs and os.sched_setaffinity",
)
@pytest.mark.parametrize("call", [LAYER_CALL, CELL_CALL], ids=["layer", "cell"])
def test_a_worker_leaves_the_calling_threads_cpu(call):
    # The scheduler now and then wakes a worker on the calling thread's CPU, where the two pass
    # each step's barrier only by yielding to each other. Put the worker there (pinned for a
    # moment, then free again) with the calling thread pinned to that CPU: at the start of the
    # next region, or at its first long wait, the worker moves to the free CPU. Same results. The
    # scheduler may move it first on its own, so up to five tries.
    code = f"""
import os, numpy as np, fastrnn
from fastrnn import _core
fastrnn.set_num_threads(2)
{call}
expected = call()  # starts the worker
def name(task):
    with open(f"/proc/self/task/{{task}}/comm") as comm:
        return comm.read().strip()
workers = [int(t) for t in os.listdir("/proc/self/task") if name(t) == "fastrnn-worker"]
assert len(workers) == 1, workers
cpus = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {{cpus[0]}})  # the calling thread
for attempt in range(5):
    os.sched_setaffinity(workers[0], {{cpus[0]}})
    os.sched_setaffinity(workers[0], set(cpus))
    moves = _core._cpu_moves()
    np.testing.assert_allclose(call(), expected, rtol=1e-6, atol=1e-7)
    if _core._cpu_moves() > moves:
        break
print(_core._cpu_moves())
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_layers_work_in_a_forked_child(restore_threads):
    fastrnn.set_num_threads(2)
    layer = fastrnn.LSTM(16, 130, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((5, 2, 16)).astype(np.float32)
    expected, _ = layer(x)  # starts the pool's workers in the parent
    code = """
import os, sys, numpy as np, fastrnn
fastrnn.set_num_threads(2)
layer = fastrnn.LSTM(16, 130, seed=0).eval()
x = np.random.default_rng(0).standard_normal((5, 2, 16)).astype(np.float32)
layer(x)
pid = os.fork()
if pid == 0:
    out, _ = layer(x)
    os._exit(0 if np.allclose(out, np.load(sys.argv[1])) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastrnn-fork-{os.getpid()}.npy")
    np.save(path, expected)
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60
        )
    finally:
        os.remove(path)
    assert result.returncode == 0, result.stderr


def test_use_openmp_needs_a_loaded_gnu_compatible_runtime(restore_threads):
    from fastrnn import _core

    previous = _core._openmp_library()
    try:
        with pytest.raises(RuntimeError, match="no-such-libgomp.so.1' is not loaded"):
            _core._use_openmp("/nonexistent/no-such-libgomp.so.1")
        # A loaded library without GOMP_parallel: fastrnn's own extension module.
        with pytest.raises(RuntimeError, match="exports no GOMP_parallel"):
            _core._use_openmp(_core.__file__)
        assert _core._openmp_library() == previous  # a failed switch changes nothing
        _core._use_openmp("")
        assert _core._openmp_library() == ""
    finally:
        _core._use_openmp(previous)

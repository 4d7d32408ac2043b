"""pytest-benchmark suite over fastrnn.bench's cases: one group per case and mode.

Before each library is timed, the suite waits until the process's other threads (the previous
library's thread pool) have stopped spinning; for strictly separate processes use
``python -m fastrnn bench``.
"""

from __future__ import annotations

import os

import pytest

from fastrnn import bench as cases

# The machine's limits (the FMA units, torch's SGEMM) first, each in a group of its own.
PARAMS = [
    pytest.param(case, mode, library, id=f"{case.name.replace(' ', '-')}-{mode}-{library}")
    for case in (cases.FMA_LIMIT, cases.SGEMM, *cases.CASES)
    for mode in cases.MODES
    for library in cases.LIBRARIES
    if cases.supported(library, case, mode)
]


@pytest.mark.parametrize(("case", "mode", "library"), PARAMS)
def test_layer(benchmark, case, mode, library, threads):
    if not cases.library_available(library):
        pytest.skip(f"{library} is not installed")
    run = cases.RUNNERS[library](case, mode, threads)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info["gflop"] = case.flops(mode) / 1e9
    cases.wait_until_idle([os.getpid()], pause=0.05)  # this thread sleeps meanwhile
    run()  # warm-up: packing, allocation, library initialisation
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)

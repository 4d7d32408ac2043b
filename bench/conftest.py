"""pytest-benchmark suite: fastrnn against fastrnn.reference and torch.nn, side by side.

Run: python -m pytest bench --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
(or the stand-alone runner with a table: python -m fastrnn bench)
Compare medians within a group (one case, one mode); absolute times on a shared VM drift. The
suite times one library after the other, in one process, and the NumPy reference's BLAS uses the
threads OPENBLAS_NUM_THREADS gives it: the ratios the README reports come from
``python -m fastrnn bench``, which interleaves the libraries round by round, each in a process of
its own, with --threads for everyone, the reference's BLAS included.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--threads", type=int, default=2, help="threads for the peers (torch)")


@pytest.fixture(scope="session")
def threads(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--threads")

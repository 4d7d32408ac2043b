"""pytest-benchmark suite: fastrnn against fastrnn.reference and torch.nn, side by side.

Run: python -m pytest bench --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
(or the stand-alone runner with a table: python -m fastrnn bench)
Compare medians within a group (one case, one mode); absolute times on a shared VM drift.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--threads", type=int, default=2, help="threads for the peers (torch)")


@pytest.fixture(scope="session")
def threads(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--threads")

"""Shared fixtures and helpers for the fastrnn test suite.

Helpers defined here (``rel_err``, ``TOL``, ``tol``, ``assert_close``) are imported by
the test modules with ``from conftest import ...``.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import fastrnn

# Make ``from conftest import ...`` work whatever pytest import mode is configured.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

#: ISAs this CPU supports, evaluated once at collection time (best first, ends with "scalar").
ISAS: list[str] = list(fastrnn.available_isas())

#: Relative L2-norm tolerances per dtype: "fwd" for outputs/states, "grad" for gradients.
TOL: dict[np.dtype, dict[str, float]] = {
    np.dtype(np.float32): {"fwd": 2e-5, "grad": 2e-4},
    np.dtype(np.float64): {"fwd": 1e-10, "grad": 1e-9},
}

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def tol(dtype, kind: str) -> float:
    """Tolerance for ``dtype`` and ``kind`` ("fwd" or "grad")."""
    return TOL[np.dtype(dtype)][kind]


def rel_err(a, b) -> float:
    """Relative L2-norm error ``||a - b|| / max(||b||, tiny)`` computed in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    tiny = np.finfo(np.float64).tiny
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), tiny))


def assert_close(actual, expected, dtype, kind: str, name: str = "") -> None:
    """Assert equal shapes and ``rel_err(actual, expected) <= tol(dtype, kind)``."""
    assert actual is not None, f"{name}: got None"
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{name}: shape {actual.shape} != expected {expected.shape}"
    )
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    limit = tol(dtype, kind)
    assert err <= limit, f"{name}: relative L2 error {err:.3e} > {limit:.1e}"


@pytest.fixture(params=ISAS, ids=ISAS)
def isa(request):
    """Run the test with ``fastrnn._core._set_isa(name)``; restore the previous ISA afterwards."""
    previous = fastrnn.active_isa()
    fastrnn._core._set_isa(request.param)
    try:
        assert fastrnn.active_isa() == request.param
        yield request.param
    finally:
        fastrnn._core._set_isa(previous)


@pytest.fixture
def restore_threads():
    """Put the thread count back as it was after a test that sets it."""
    previous = fastrnn.get_num_threads()
    yield
    fastrnn.set_num_threads(previous)


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: different data per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))

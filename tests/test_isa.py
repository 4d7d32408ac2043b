"""ISA dispatch: detection, the FASTRNN_ISA override and the private _set_isa hook."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastrnn
from conftest import ISAS

KNOWN_ISAS = ["avx512", "avx2", "neon", "scalar"]


def run_python(code, isa=None, cwd=None):
    env = dict(os.environ)
    env.pop("FASTRNN_ISA", None)
    if isa is not None:
        env["FASTRNN_ISA"] = isa
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_available_isas():
    isas = fastrnn.available_isas()
    assert isinstance(isas, list) and all(isinstance(n, str) for n in isas)
    assert isas[-1] == "scalar"
    assert len(set(isas)) == len(isas)
    assert set(isas) <= set(KNOWN_ISAS)
    assert fastrnn.active_isa() in isas
    # best first: the order of preference is the same as KNOWN_ISAS
    assert isas == sorted(isas, key=KNOWN_ISAS.index)


def test_default_isa_is_the_best(tmp_path):
    code = "import fastrnn; print(fastrnn.active_isa()); print(fastrnn.available_isas())"
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    active, available = proc.stdout.splitlines()
    assert available == repr(ISAS)
    assert active == ISAS[0]


@pytest.mark.parametrize("name", ISAS)
def test_env_forces_isa(name, tmp_path):
    proc = run_python("import fastrnn; print(fastrnn.active_isa())", isa=name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == name


@pytest.mark.parametrize("name", ["bogus", "", "sse2"] + [n for n in KNOWN_ISAS if n not in ISAS])
def test_env_unknown_or_unsupported_isa_fails_import(name, tmp_path):
    proc = run_python("import fastrnn", isa=name, cwd=tmp_path)
    if name == "":
        # An empty variable may reasonably mean "not set"; it must not crash either way.
        assert proc.returncode in (0, 1), proc.stderr
        return
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "FASTRNN_ISA" in proc.stderr
    assert "scalar" in proc.stderr, "the message should list the valid choices"


@pytest.mark.parametrize("name", ISAS)
def test_set_isa(name):
    previous = fastrnn.active_isa()
    try:
        fastrnn._core._set_isa(name)
        assert fastrnn.active_isa() == name
    finally:
        fastrnn._core._set_isa(previous)
    assert fastrnn.active_isa() == previous


@pytest.mark.parametrize("name", ["bogus", "", "sse2"] + [n for n in KNOWN_ISAS if n not in ISAS])
def test_set_isa_rejects_bad_names(name):
    previous = fastrnn.active_isa()
    with pytest.raises(ValueError):
        fastrnn._core._set_isa(name)
    assert fastrnn.active_isa() == previous


def test_isa_fixture_sets_and_restores(isa):
    assert fastrnn.active_isa() == isa


def test_set_isa_changes_results_only_within_tolerance():
    """Every ISA computes the same function: a quick smoke check of the switch itself."""
    layer = fastrnn.LSTM(9, 17, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((4, 3, 9)).astype(np.float32)
    previous = fastrnn.active_isa()
    outs = {}
    try:
        for name in ISAS:
            fastrnn._core._set_isa(name)
            outs[name] = layer(x)[0]
    finally:
        fastrnn._core._set_isa(previous)
    for name, out in outs.items():
        np.testing.assert_allclose(out, outs["scalar"], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fma_limit_hook_does_the_operations_asked(isa, dtype, threads, restore_threads):
    """The benchmarks' FMA limit: whole rounds of register FMAs, so a little under `flops`."""
    fastrnn.set_num_threads(threads)
    done = fastrnn._core._fma_limit(1e6, dtype)
    assert 0.9e6 < done <= 1e6


@pytest.mark.parametrize(
    ("flops", "dtype", "message"),
    [(0, "float32", "flops"), (float("nan"), "float32", "flops"), (1e6, "int8", "dtype")],
)
def test_fma_limit_hook_rejects_bad_arguments(flops, dtype, message):
    with pytest.raises(ValueError, match=message):
        fastrnn._core._fma_limit(flops, dtype)

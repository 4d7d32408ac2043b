"""The command line: python -m fastrnn info | bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fastrnn


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastrnn", *args], capture_output=True, text=True, timeout=600
    )


def test_info_self_check_passes():
    result = _run("info")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"active ISA:     {fastrnn.active_isa()}" in result.stdout
    assert f"threads: {fastrnn.get_num_threads()}" in result.stdout
    assert f"L2 cache: {fastrnn._core._l2_cache_bytes() >> 10} KiB per core" in result.stdout
    threads = fastrnn.get_num_threads()
    assert (f"barrier of the {threads} threads: " in result.stdout) == (threads > 1)
    assert "all checks passed" in result.stdout


def test_bench_prints_a_table_and_saves_json(tmp_path):
    from fastrnn import bench

    path = tmp_path / "bench.json"
    result = _run(
        "bench",
        "--quick",
        "--cases",
        "LSTMCell",
        "--libraries",
        "fastrnn",
        "reference",
        "--threads",
        "1",
        "--json",
        str(path),
    )
    assert result.returncode == 0, result.stderr
    assert "| LSTMCell step B1 H128 | inference |" in result.stdout
    assert "vs reference" in result.stdout
    saved = json.loads(path.read_text())
    assert saved["threads"] == 1
    # which kernels ran: one machine's ratios differ by ISA (a VM may hide AVX-512)
    assert saved["isa"] == fastrnn.active_isa()
    assert f"fastrnn's kernels: {saved['isa']};" in result.stdout.splitlines()[0]
    limit, *rows = saved["results"]  # the FMA units' limit, measured first
    assert limit["fma"] and limit["seconds"]["fastrnn"] > 0
    assert "FMA units in this run:" in result.stdout
    assert [r["mode"] for r in rows] == ["inference", "training"]
    for row in rows:
        assert row["barrier"] == [0.0] * 3  # fastrnn's, one per round: none on one thread
        assert set(row["seconds"]) == {"fastrnn", "reference"}
        if bench.steal_seconds() is not None:  # Linux: each measurement's share of steal time
            assert all(len(row["steal"][lib]) == 3 for lib in ("fastrnn", "reference"))
            assert all(0 <= share <= 1 for shares in row["steal"].values() for share in shares)
        assert all(seconds > 0 for seconds in row["seconds"].values())
        for library, samples in row["samples"].items():
            assert min(samples) <= row["seconds"][library] <= max(samples)


@pytest.mark.parametrize(
    "args,option",
    [
        (["--threads", "0"], "--threads"),
        (["--threads", "1025"], "--threads"),
        (["--rounds", "0"], "--rounds"),
        (["--json", "/nonexistent-dir/results.json"], "--json"),
    ],
)
def test_bench_rejects_bad_options_before_running(args, option):
    result = _run("bench", *args)
    assert result.returncode == 2
    assert option in result.stderr


def test_table_reports_the_shares_of_the_limits():
    from fastrnn import bench

    def row(case, flops, seconds, **flags):
        return {"case": case, "mode": "inference", "flops": flops, "seconds": seconds, **flags}

    results = [
        row(bench.FMA_LIMIT.name, 4e9, {"fastrnn": 0.01}, fma=True, barrier=[9e-6], steal={}),
        row(bench.SGEMM.name, 2e9, {"torch": 0.01}, sgemm=True),
        row(
            "LSTM T1 B1 H8",
            1e9,
            {"fastrnn": 0.01, "torch": 0.02},
            barrier=[4e-8, 1.6e-7],
            steal={"fastrnn": [0.0, 0.3], "torch": [0.0, 0.1]},
        ),
        row("LSTM T1 B2 H8", 1e9, {"fastrnn": 0.01}, barrier=[3.5e-8]),
    ]
    table = bench.format_table(results, threads=2, isa="avx2")
    assert table.startswith("threads: 2; fastrnn's kernels: avx2; medians;")
    assert "over the run: median 40 ns, 35-160 ns" in table  # the limits' rows left out
    assert "SGEMM in this run: 200.0 GFLOP/s" in table
    assert (
        "over the run: 10.0% of the CPUs' time on average, at most 30% in one measurement "
        "(fastrnn, LSTM T1 B1 H8 inference)" in table
    )
    assert "FMA units in this run: 400.0 GFLOP/s" in table
    assert "| case | mode | fastrnn | GFLOP/s | of FMA | torch | vs torch |" in table
    assert (
        "| LSTM T1 B1 H8 | inference | 10.000 ms | 100.0 (50%) | 25% | 20.000 ms | 2.00x |" in table
    )
    rows = table.split("| case |", 1)[1]
    assert bench.SGEMM.name not in rows and bench.FMA_LIMIT.name not in rows  # notes, not rows


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
def test_bench_waits_until_the_other_libraries_are_idle():
    # A library's thread pool spinning after its call would slow the next library's timing.
    from fastrnn import bench

    busy = "import time\nend = time.time() + 0.6\nwhile time.time() < end: pass"
    spinning = subprocess.Popen([sys.executable, "-c", busy])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        waited = bench.wait_until_idle([spinning.pid, idle.pid], pause=0.05, limit=5.0)
        assert 0.4 < waited < 4.0  # until the spinning process ended
        spinning.wait(timeout=10)
        assert bench.wait_until_idle([idle.pid], pause=0.05, limit=5.0) < 2.0
        assert bench.wait_until_idle([idle.pid], pause=0.05, limit=0.0) < 1.0  # the limit holds
    finally:
        for process in (spinning, idle):
            process.kill()
            process.wait()

"""benchmarks/gpu.sh is never dead code: its smoke setting runs the same driver on CPU at tiny widths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANS = ["none", "fastvar", "turbo"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {**os.environ, "FASTVAR_GPU_SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_smoke_run_reports_every_config_and_plan(smoke):
    assert smoke["smoke"] is True and smoke["device"] == "cpu" and smoke["dtype"] == "bf16"
    assert [c["name"] for c in smoke["configs"]] == ["infinity-2b-1M", "infinity-2b-2K", "var-d30-256",
                                                     "hart-0.7b-1024"]
    assert smoke["skipped"] == []
    for c in smoke["configs"]:
        rows = {r["plan"]: r for r in c["rows"]}
        assert list(rows) == PLANS, c["name"]
        assert rows["none"]["speedup"] == 1.0 and rows["none"]["flop_ratio"] == 1.0
        for plan in ("fastvar", "turbo"):
            r = rows[plan]
            assert 0 < r["flop_ratio"] < 1, (c["name"], plan, r["flop_ratio"])
            assert r["seconds_median"] > 0 and r["speedup"] > 0
            assert 0 < r["kv_bytes"] <= rows["none"]["kv_bytes"], (c["name"], plan)
        for r in rows.values():
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0
            assert len(r["seconds_all"]) == smoke["repeats"]


def test_smoke_schedules_are_the_short_ones(smoke):
    by = {c["name"]: c for c in smoke["configs"]}
    assert by["infinity-2b-1M"]["pn"] == "0.06M" and by["infinity-2b-2K"]["pn"] == "0.25M"
    assert by["var-d30-256"]["depth"] == 2


def test_unknown_config_fails_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--out", "/dev/null",
                           "--smoke", "--device", "cpu", "--only", "var-d99"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "var-d99" in proc.stderr and "infinity-2b-1M" in proc.stderr

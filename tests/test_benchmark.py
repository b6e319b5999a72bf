"""FLOP accounting per scale and the throughput ceiling that `fastvar bench` reports next to the efficiency."""

from __future__ import annotations

import json

import pytest

from fastvar.accel.stats import FlopDims, dense_counts, estimate_flops
from fastvar.cli import main
from fastvar.eval.benchmark import throughput_ceiling


def test_scale_flops_are_the_blocks_of_each_executed_scale():
    sizes = [(1, 1), (2, 2), (4, 4), (8, 8)]
    dims = FlopDims(width=32, ffn_hidden=128, vocab_out=16, cross_len=5, tail_flops=1e4,
                    branches=("attn", "cross", "ffn"))
    counts = dense_counts(sizes, 3, dims.branches, skip=[3])
    for layer in range(3):  # prune scale 2 to a quarter in every branch
        for b in dims.branches:
            counts[(2, layer, b)] = (16, 4)
    f = estimate_flops(counts, sizes, dims, batch=2)
    assert sorted(f["scale_flops"]) == [0, 1, 2]  # the skipped scale has none
    assert f["tail_flops"] == 0.0  # the tail runs with the last scale only
    head = 2 * 2 * 32 * 16 * (1 + 4 + 16)  # batch 2, per executed token
    # blocks per scale + the head (outside the blocks) make the total
    assert sum(f["scale_flops"].values()) + head == pytest.approx(f["total_flops"])
    full = estimate_flops(dense_counts(sizes, 3, dims.branches), sizes, dims, batch=2)
    assert full["tail_flops"] == 2e4 and full["scale_flops"][3] > full["scale_flops"][2] > f["scale_flops"][2]
    head_full = head + 2 * 2 * 32 * 16 * 64
    assert sum(full["scale_flops"].values()) + head_full + 2e4 == pytest.approx(full["total_flops"])
    # a scale's blocks: the same whatever comes after it (attention looks back only)
    assert full["scale_flops"][1] == f["scale_flops"][1]


def test_ceiling_of_a_plan_that_runs_every_scale_at_the_dense_rate():
    dense_secs, dense_flops = {"0": 1.0, "1": 3.0}, {"0": 10.0, "1": 30.0}
    dense_total = 4.5  # 0.5 s outside the blocks
    plan_flops = {"0": 10.0, "1": 15.0}  # half of scale 1
    flop_ratio = 25.0 / 40.0
    # the plan runs scale 0 as the dense run, scale 1 at the same rate, and 0.5 s outside the blocks
    plan_secs = {"0": 1.0, "1": 1.5}
    c = throughput_ceiling(dense_secs, dense_flops, dense_total, plan_secs, plan_flops, flop_ratio, 3.0)
    assert c["ceiling_seconds"] == pytest.approx(3.0) and c["of_ceiling"] == pytest.approx(1.0)
    # its efficiency against the dense run is then exactly the ceiling, below 1 since scale 1 was the cheap one
    assert c["ceiling_efficiency"] == pytest.approx(dense_total / 3.0 * flop_ratio)
    slow = throughput_ceiling(dense_secs, dense_flops, dense_total, {"0": 1.0, "1": 2.0}, plan_flops, flop_ratio, 3.5)
    assert slow["of_ceiling"] == pytest.approx(3.0 / 3.5)  # 0.5 s of overhead in the pruned scale
    skipped = throughput_ceiling(dense_secs, dense_flops, dense_total, {"0": 1.0}, {"0": 10.0}, 0.25, 1.5)
    assert skipped["ceiling_seconds"] == pytest.approx(1.5)  # a skipped scale costs nothing
    # blocks without FLOP accounting (HART's text prefill, scale 0) cost what they cost in the dense run
    prefill = throughput_ceiling({"0": 0.7, "1": 1.0, "2": 3.0}, {"1": 10.0, "2": 30.0}, 5.2,
                                 {"0": 0.7, "1": 1.0, "2": 1.5}, {"1": 10.0, "2": 15.0}, flop_ratio, 3.7)
    assert prefill["ceiling_seconds"] == pytest.approx(0.7 + 1.0 + 1.5 + 0.5) and prefill["of_ceiling"] == pytest.approx(1.0)


def test_bench_reports_the_ceiling_against_identity(tmp_path):
    out = tmp_path / "b.json"
    # depth 4: the preset prunes layers 3.. (the published 3-27 band, clipped to the depth)
    assert main(["bench", "--model", "infinity", "--random-init", "--depth", "4", "--width", "64", "--heads", "2",
                 "--text-width", "64", "--pn", "0.25M", "--plans", "identity", "fastvar-strong", "--repeats", "2",
                 "--warmup", "0", "--threads", "1", "--json", str(out), "--quiet"]) == 0
    rows = {r["plan"]: r for r in json.loads(out.read_text())}
    assert rows["none"]["threads"] == 1
    assert "ceiling_efficiency" not in rows["none"] and "ceiling_efficiency" not in rows["identity"]
    strong = rows["fastvar-strong"]
    n_scales = len(rows["identity"]["scale_seconds"])
    assert len(strong["scale_seconds"]) == n_scales and set(strong["scale_flops"]) == set(strong["scale_seconds"])
    assert sum(strong["scale_flops"].values()) < sum(rows["identity"]["scale_flops"].values())
    assert 0 < strong["ceiling_seconds"] < rows["identity"]["seconds_median"]
    assert strong["of_ceiling"] == pytest.approx(strong["ceiling_seconds"] / strong["seconds_median"])


def test_bench_rejects_a_bad_thread_count(capsys):
    assert main(["bench", "--model", "var-d16", "--random-init", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err

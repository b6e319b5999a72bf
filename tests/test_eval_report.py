"""The report: one row per run (several folders may make one run), deltas against the baseline, speedup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastvar.errors import UsageError
from fastvar.eval.report import build_report, load_run, to_markdown


def _run(folder: Path, plan, seconds: float, scores: dict[str, dict]) -> Path:
    (folder / "logs").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model": "infinity-2b", "plan": plan}))
    (folder / "logs" / "rank-00.jsonl").write_text(
        "".join(json.dumps({"prompt": i, "sample": 0, "seconds": seconds}) + "\n" for i in range(3)) + '{"torn')
    (folder / "scores").mkdir()
    for metric, data in scores.items():
        (folder / "scores" / f"{metric}.json").write_text(json.dumps(data))
    return folder


def test_report_merges_a_runs_folders_and_compares_with_the_baseline(tmp_path):
    b1 = _run(tmp_path / "b-geneval", None, 2.0, {"geneval": {"overall": 0.73}})
    b2 = _run(tmp_path / "b-mjhq", None, 2.0, {"fid": {"fid": 10.0}, "clipscore": {"clipscore": 30.0}})
    p1 = _run(tmp_path / "p-geneval", "fastvar", 1.0, {"geneval": {"overall": 0.72}})
    p2 = _run(tmp_path / "p-mjhq", "fastvar", 1.0, {"fid": {"fid": 11.5}, "clipscore": {"clipscore": 30.5},
                                                   "fidelity": {"psnr": None, "ssim": 0.9}})
    rep = build_report([load_run("base", f"{b1},{b2}"), load_run("fastvar", [p1, p2])], "base")
    assert rep["columns"] == ["GenEval", "FID", "CLIP", "PSNR", "SSIM"]  # PSNR null (all identical): a column of –
    row = rep["rows"][1]
    assert row["images"] == 6 and row["speedup"] == pytest.approx(2.0) and row["plan"] == "fastvar"
    assert row["metrics"]["FID"] == {"value": 11.5, "delta": pytest.approx(1.5)}
    assert row["metrics"]["GenEval"]["delta"] == pytest.approx(-0.01)
    assert row["metrics"]["SSIM"]["delta"] is None  # the baseline has no fidelity against itself
    md = to_markdown(rep)
    assert "| fastvar | fastvar | 6 | 1 | 2.00x | 0.72 (-0.0100) | 11.5 (+1.5000) |" in md and "FID ↓" in md
    with pytest.raises(UsageError, match="another model or plan"):
        load_run("mixed", [b1, p1])
    with pytest.raises(UsageError, match="not among the runs"):
        build_report([load_run("base", b1)], "nope")

"""The evaluation generation runner with the embedded model: per-image seeds, shards without duplicates or gaps,
atomic PNGs, a killed run that resumes, the same bytes from 1 process and from 2 torchrun ranks, and bad
inputs refused before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvar.cli import main
from fastvar.eval.generate import (
    GenerationJob,
    image_seed,
    is_complete_png,
    read_timings,
    run_job,
    sample_path,
    shard,
    work_units,
)
from fastvar.eval.prompts import PromptItem

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = (2, 5, 9)  # 3 prompts x 2 samples = 6 images per run
SAMPLES = 2


def _final(out: Path) -> list[Path]:
    """Images with their final names (pathlib's glob also matches the hidden ``.tmp-*.png`` of a write in flight)."""
    return sorted(p for p in out.glob("[0-9]*/samples/*.png") if not p.name.startswith("."))


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in _final(out)}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def classes_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cls") / "classes.txt"
    f.write_text("".join(f"{c}\n" for c in CLASSES))
    return f


@pytest.fixture(scope="module")
def reference(tmp_path_factory, classes_file) -> Path:
    """One uninterrupted single-process run: what every other way of generating must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    assert main(["eval", "generate", "--classes-file", str(classes_file), "--samples-per-prompt", str(SAMPLES),
                 "--seed", "7", "--out", str(out), "--quiet"]) == 0
    return out


def _args(classes_file: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "generate", "--classes-file", str(classes_file), "--samples-per-prompt", str(SAMPLES), "--seed", "7",
            "--out", str(out), "--quiet", *extra]


# ---------------------------------------------------------------------------------------------- pure parts
def test_image_seeds_and_shards():
    assert image_seed(0, 1, 2) == image_seed(0, 1, 2)
    seeds = {image_seed(s, p, k) for s in range(3) for p in range(20) for k in range(4)}
    assert len(seeds) == 240 and all(0 <= x < 2**63 for x in seeds)
    units = work_units(7, 3)
    for world in range(1, 6):
        parts = [shard(units, r, world) for r in range(world)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == units and len(flat) == len(set(flat))  # no duplicates, no gaps
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    with pytest.raises(ValueError):
        shard(units, 2, 2)


def test_png_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves neither a file with the final name nor a temporary file."""
    from PIL import Image

    items = [PromptItem(0, "x", {"prompt": "x"})]
    job = GenerationJob(items, tmp_path, lambda it, s: (torch.rand(3, 8, 8), 0.0), progress=False)
    real_save = Image.Image.save

    def dying_save(self, fp, *a, **k):
        fp.write(b"\x89PNG\r\n\x1a\nhalf")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_job(job)
    assert list((tmp_path / "00000" / "samples").iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert run_job(job)["generated"] == 1 and is_complete_png(sample_path(tmp_path, 0, 0))
    umask = os.umask(0)
    os.umask(umask)
    assert sample_path(tmp_path, 0, 0).stat().st_mode & 0o777 == 0o666 & ~umask  # readable by other tools, as open()


# ---------------------------------------------------------------------------------------------- embedded model
def test_layout_manifest_and_geneval_on_the_reference(reference, capsys):
    imgs = _pngs(reference)
    assert sorted(imgs) == [f"{p:05d}/samples/{s:04d}.png" for p in range(len(CLASSES)) for s in range(SAMPLES)]
    meta = json.loads((reference / "00001" / "metadata.jsonl").read_text())
    assert meta == {"class_id": 5, "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "blue"}],
                    "prompt": "a photo of a blue circle"}
    man = json.loads((reference / "manifest.json").read_text())
    assert man["model"] == "embedded" and man["seed"] == 7 and man["plan"] is None and man["samples_per_prompt"] == 2
    assert {"torch", "fastvar", "numpy", "python"} <= set(man["versions"])
    times = read_timings(reference)
    assert len(times) == 6 and all(t["seconds"] > 0 for t in times)
    assert [t["seed"] for t in times] == [image_seed(7, p, s) for p in range(3) for s in range(2)]
    assert main(["eval", "geneval", "--images", str(reference), "--quiet", "--json", str(reference / "g.json")]) == 0
    res = json.loads((reference / "scores" / "geneval.json").read_text())
    assert res["detector"] == "procedural" and res["images"] == 6 and set(res["tasks"]) == {"colors"}
    assert "colors" in capsys.readouterr().out


def test_resume_after_a_partial_run_and_stale_temp_files(reference, classes_file, tmp_path):
    out = tmp_path / "run"
    assert main(_args(classes_file, out, "--max-images", "2")) == 0
    assert len(_pngs(out)) == 2
    stale = out / "00002" / "samples" / ".tmp-dead.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG partial")
    torn = sample_path(out, 2, 1)
    torn.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)  # a file not written by us: not a complete PNG
    assert main(_args(classes_file, out)) == 0
    assert _pngs(out) == _pngs(reference)
    assert not list(out.glob("*/samples/.tmp-*"))
    assert len(read_timings(out)) == 6


def test_killed_process_resumes_to_the_same_images(reference, classes_file, tmp_path):
    """SIGKILL a running `fastvar eval generate` after its first image, resume it, compare with the reference."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastvar", *_args(classes_file, out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not _final(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _final(out)
    assert 1 <= len(done) < 6, proc.stderr.read().decode()[-2000:]
    assert all(is_complete_png(p) for p in done)  # whatever has a final name is complete
    assert main(_args(classes_file, out)) == 0
    assert _pngs(out) == _pngs(reference)
    assert not list(out.glob("*/samples/.tmp-*"))  # a write the kill interrupted left no temporary file behind


def test_two_torchrun_ranks_split_the_work_and_make_the_same_images(reference, classes_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastvar",
           *_args(classes_file, out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _pngs(out) == _pngs(reference)  # same bytes whatever the number of processes
    per_rank = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (out / "logs" / f"rank-{rank:02d}.jsonl").read_text().splitlines()]
        per_rank[rank] = [(x["prompt"], x["sample"]) for x in lines]
        assert all(x["world"] == 2 and x["rank"] == rank for x in lines)
    units = work_units(len(CLASSES), SAMPLES)
    assert per_rank[0] == shard(units, 0, 2) and per_rank[1] == shard(units, 1, 2)
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2


def test_fidelity_and_report_between_baseline_and_plan(reference, classes_file, tmp_path, capsys):
    plan = tmp_path / "fastvar"
    assert main(_args(classes_file, plan, "--preset", "fastvar")) == 0
    assert main(["eval", "fidelity", "--images", str(plan), "--ref", str(reference), "--metrics", "psnr", "ssim",
                 "--quiet"]) == 0
    fid = json.loads((plan / "scores" / "fidelity.json").read_text())
    assert fid["num_images"] == 6 and (fid["psnr"] is None or fid["psnr"] > 10) and 0 < fid["ssim"] <= 1
    for run in (reference, plan):
        assert main(["eval", "geneval", "--images", str(run), "--quiet"]) == 0
    capsys.readouterr()
    md, js, png = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.png"
    assert main(["eval", "report", "--runs", f"baseline={reference}", f"fastvar={plan}", "--markdown", str(md),
                 "--json", str(js), "--plot", str(png)]) == 0
    rep = json.loads(js.read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert rows["baseline"]["speedup"] == pytest.approx(1.0) and rows["fastvar"]["speedup"] > 0
    assert rows["fastvar"]["plan"] == "fastvar" and rows["fastvar"]["metrics"]["GenEval"]["delta"] is not None
    assert "| baseline |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"
    # a plan run with other seeds is not comparable
    other = tmp_path / "other"
    assert main(_args(classes_file, other, "--max-images", "0")) == 0
    man = json.loads((other / "manifest.json").read_text())
    man["seed"] = 8
    (other / "manifest.json").write_text(json.dumps(man))
    for p, s in work_units(len(CLASSES), SAMPLES):
        sample_path(other, p, s).parent.mkdir(parents=True, exist_ok=True)
        sample_path(other, p, s).write_bytes(sample_path(reference, p, s).read_bytes())
    assert main(["eval", "fidelity", "--images", str(other), "--ref", str(reference), "--metrics", "psnr"]) == 2
    assert "differ in seed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture()
def no_model(monkeypatch):
    import fastvar.pipelines as pipelines

    def boom(*a, **k):
        raise AssertionError("a model was loaded for a bad input")

    monkeypatch.setattr(pipelines, "load_pipeline", boom)


def test_bad_inputs_fail_in_one_line_before_any_model_loads(no_model, classes_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"tag": "colors", "prompt": "x"}\n{oops\n')
    cases = [
        (["--classes-file", str(tmp_path / "missing.txt")], "does not exist"),
        (["--classes-file", str(empty)], "holds no class ids"),
        (["--prompts-file", str(classes_file)], "class-conditional; pass --classes-file"),
        (["--model", "infinity-2b", "--random-init"], "pass --prompts-file"),
        (["--model", "infinity-2b", "--random-init", "--prompts-file", str(empty)], "the file is empty"),
        (["--model", "infinity-2b", "--random-init", "--prompts-file", str(bad_json)], "line 2 is not valid JSON"),
        (["--model", "var-d16", "--random-init"], "pass --classes-file"),
        (["--classes-file", str(classes_file), "--samples-per-prompt", "0"], "--samples-per-prompt"),
        (["--classes-file", str(classes_file), "--preset", "nope"], "unknown preset"),
    ]
    for extra, match in cases:
        assert main(["eval", "generate", "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (extra, err)
    assert not (tmp_path / "o").exists()


def test_a_folder_of_another_run_is_refused(no_model, reference, classes_file, capsys):
    assert main(["eval", "generate", "--classes-file", str(classes_file), "--samples-per-prompt", "2", "--seed", "8",
                 "--out", str(reference), "--quiet"]) == 2
    assert "different seed" in capsys.readouterr().err


def test_scorer_inputs_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    cases = [
        (["eval", "fid", "--images", str(tmp_path / "nope"), "--ref", str(tmp_path)], "does not exist"),
        (["eval", "clipscore", "--images", str(tmp_path / "flat")], "needs each image's prompt"),
        (["eval", "geneval", "--images", str(tmp_path / "flat")], "GenEval needs prompts with include clauses"),
        (["eval", "fidelity", "--images", str(tmp_path / "flat"), "--ref", str(tmp_path / "flat"), "--metrics", "x"],
         "unknown"),
        (["eval", "report", "--runs", f"a={tmp_path / 'nope'}"], "no such folder"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (argv, err)

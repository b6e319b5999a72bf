"""The command line: help, clear errors before any work, nothing half-written, checkpoint diagnostics."""

from __future__ import annotations

import json

import pytest
import torch

from fastvar.checkpoints import CheckpointError, load_checked, resolve_file
from fastvar.cli import main
from fastvar.models.var import VAR
from fastvar.pipelines.var import _guess_var


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "bench", "plan", "models"):
        assert cmd in out


def test_unknown_model_lists_known_ones(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--model", "var-d17", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'var-d17'" in err and "var-d16" in err
    assert not out.exists()


def test_class_out_of_range_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--model", "var-d16", "--classes", "3", "1000", "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_preset_and_missing_plan_file(tmp_path, capsys):
    assert main(["generate", "--preset", "warp-speed", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["generate", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_local_weights_fail_before_writing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--model", "var-d16", "--weights", str(tmp_path / "var_d16.pth"), "--out", str(out)]) == 2
    assert not out.exists()


def test_hub_id_offline_fails_fast_with_local_path_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ConnectionError, ImportError), match="local"):
        resolve_file("FoundationVision/var:var_d16.pth")


def test_checkpoint_of_other_depth_is_explained():
    small = VAR(vocab_size=16, cvae=4, num_classes=3, depth=2, embed_dim=32, num_heads=2, patch_nums=(1, 2))
    other = VAR(vocab_size=16, cvae=4, num_classes=3, depth=3, embed_dim=32, num_heads=2, patch_nums=(1, 2))
    with pytest.raises(CheckpointError) as e:
        load_checked(small, other.state_dict(), "var-d2", _guess_var)
    msg = str(e.value)
    assert "unexpected key" in msg and "blocks.2" in msg and "depth 3" in msg
    wide = VAR(vocab_size=16, cvae=4, num_classes=3, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checked(small, wide.state_dict(), "var-d2", _guess_var)


def test_plan_command_prints_valid_json(capsys):
    assert main(["plan", "fastvar", "--family", "infinity"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["keep"] == {"32": 0.6, "40": 0.5} and plan["skip"] == ["48", "64"]


def test_models_command(capsys):
    assert main(["models"]) == 0
    assert "var-d36" in capsys.readouterr().out


def test_read_state_dict_weights_only(tmp_path):
    from fastvar.checkpoints import read_state_dict

    p = tmp_path / "m.pth"
    torch.save({"a": torch.ones(2)}, p)
    assert torch.equal(read_state_dict(p)["a"], torch.ones(2))
    torch.save({"a": object()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "bad.pth")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--cache-preset", "bogus"], "unknown cache preset"),
        (["--cache-threshold", "1.5"], "outside"),
        (["--use-cache", "--sim-path", "/nonexistent/sim.json"], "does not exist"),
        (["--model", "var-d16", "--cache-skip-stages", "999"], "999"),
        (["--calibration"], "--sim-path"),
    ],
)
def test_bad_cache_flags_fail_before_loading(flags, match, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", *flags, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture()
def tiny_pipeline(monkeypatch):
    """`generate` end to end on a small random VAR (the full-size ones are too slow for the fast suite)."""
    from fastvar.pipelines.var import VARPipeline
    from fastvar.tokenizers.vqvae import VQVAE

    torch.manual_seed(0)
    pn = (1, 2, 3, 4)
    model = VAR(vocab_size=32, cvae=4, num_classes=1000, depth=2, embed_dim=32, num_heads=2, patch_nums=pn)
    model.init_weights()
    vae = VQVAE(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=pn, using_sa=False)
    pipe = VARPipeline(model.eval(), vae.eval(), "var-d16")
    import fastvar.pipelines as pipelines

    monkeypatch.setattr(pipelines, "load_pipeline", lambda spec, **kw: pipe)
    return pipe


def test_generate_writes_pngs_grid_and_report(tiny_pipeline, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--model", "var-d16", "--classes", "207", "360", "--seed", "0", "--cfg", "4",
                 "--out", str(out), "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_class207.png", "0001_class360.png", "grid.png", "report.json"]
    from PIL import Image

    assert Image.open(out / "0000_class207.png").size == (8, 8)


def test_generate_compare_writes_both_sets(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "--model", "var-d16", "--classes", "1", "2", "--preset", "skip-last", "--compare",
                 "--stats", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "skipped scales" in text
    assert (out / "baseline" / "grid.png").is_file() and (out / "skip-last" / "grid.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["plan"] == "skip-last" and report["speedup"] > 0


def test_bf16_autocast_generation_runs(tiny_pipeline):
    from fastvar.pipelines.common import resolve_dtype

    tiny_pipeline.dtype = resolve_dtype("bf16")
    res = tiny_pipeline([3, 4], seed=1)
    assert res.images.dtype == torch.float32 and torch.isfinite(res.images).all()


def test_bench_infinity_random_init_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "infinity", "--random-init", "--depth", "2", "--width", "64", "--heads", "2",
                 "--text-width", "64", "--pn", "0.06M", "--plans", "identity", "--repeats", "1", "--warmup", "0",
                 "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert [r["plan"] for r in rows] == ["none", "identity"]
    for key in ("plan", "seconds_median", "speedup", "token_ratio", "flop_ratio", "peak_mem_mb", "psnr", "ssim"):
        assert key in rows[1]
    assert rows[1]["token_ratio"] == 1.0 and rows[1]["flop_ratio"] == 1.0 and rows[1]["ssim"] == 1.0


def test_bench_var_random_init_json_fields(tiny_pipeline, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "var-d16", "--random-init", "--plans", "fastvar", "--repeats", "2",
                 "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["plan"] == "none" and rows[0]["speedup"] == 1.0 and rows[1]["plan"] == "fastvar"
    assert rows[1]["token_ratio"] < 1.0 and rows[1]["flop_ratio"] < 1.0 and len(rows[1]["seconds_all"]) == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--model", "var-d16", "--prompts", "a cat"], "give --classes, not --prompts"),
        (["generate", "--model", "infinity-2b", "--classes", "3"], "give --prompts, not --classes"),
        (["generate", "--model", "infinity-2b", "--prompts", "  "], "empty"),
        (["generate", "--model", "infinity-2b", "--prompts", "a", "--pn", "3M"], "3M"),
        (["generate", "--model", "infinity-2b", "--prompts", "a", "--depth", "4"], "--random-init"),
        (["generate", "--model", "hart", "--prompts", "a", "--diff-width", "64"], "--random-init"),
        (["generate", "--model", "infinity-2b", "--prompts", "a", "--random-init", "--diff-depth", "2"], "has none"),
        (["generate", "--model", "var-d16", "--pn", "1M"], "text-to-image"),
        (["generate", "--model", "var-d16", "--benchmark", "0"], "N >= 1"),
        (["generate", "--model", "var-d16", "--benchmark", "--compare"], "drop --compare"),
        (["generate", "--model", "var-d16", "--num-samples", "0"], "--num-samples"),
    ],
)
def test_condition_and_family_flags_fail_before_loading(argv, match, tmp_path, capsys, monkeypatch):
    import fastvar.pipelines as pipelines

    def boom(*a, **k):  # any of these must be rejected before a model is built
        raise AssertionError("model was loaded")

    monkeypatch.setattr(pipelines, "load_pipeline", boom)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_generate_benchmark_reports_median_and_spread(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "o"
    js = tmp_path / "bench.json"
    assert main(["generate", "--model", "var-d16", "--classes", "1", "2", "--preset", "fastvar", "--benchmark", "3",
                 "--json", str(js), "--out", str(out), "--quiet"]) == 0
    row = json.loads(js.read_text())
    assert row["runs"] == 3 and len(row["seconds_all"]) == 3 and row["config"] == "fastvar"
    assert row["seconds_min"] <= row["seconds_median"] <= row["seconds_max"] and row["seconds_stdev"] >= 0
    assert "median" in capsys.readouterr().out
    assert not out.exists()  # a benchmark writes no images


def test_generate_names_images_after_conditions(tiny_pipeline, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--model", "var-d16", "--classes", "5", "--num-samples", "3", "--batch-size", "2",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["conditions"] == [5, 5, 5] and report["images"] == 3
    assert (out / "0002_class5.png").is_file()


def test_hart_diffusion_head_size_reaches_the_pipeline(monkeypatch):
    import fastvar.pipelines as pipelines

    seen = {}

    class Loaded(Exception):
        pass

    def capture(spec, **kw):
        seen.update(kw)
        raise Loaded

    monkeypatch.setattr(pipelines, "load_pipeline", capture)
    with pytest.raises(Loaded):
        main(["bench", "--model", "hart", "--random-init", "--width", "64", "--diff-width", "128", "--diff-depth", "2",
              "--quiet"])
    assert seen["random_init"] and seen["diff_width"] == 128 and seen["diff_depth"] == 2 and seen["embed_dim"] == 64


def test_generate_compare_configs_end_to_end(tiny_pipeline, tmp_path, capsys):
    """--compare-configs through the run primitive: baseline first, a caching config calibrated on the same
    classes (hit rate from its cache policy), a pruning preset with its restore cache counted, chart and JSON."""
    out, js = tmp_path / "o", tmp_path / "cmp.json"
    assert main(["generate", "--model", "var-d16", "--classes", "1", "2", "--compare-configs", "original", "fastvar",
                 "--json", str(js), "--out", str(out), "--quiet"]) == 0
    rows = {r["config"]: r for r in json.loads(js.read_text())}
    assert list(rows) == ["baseline", "original", "fastvar"]
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["psnr"] is None
    assert rows["original"]["cache_mem_mb"] > 0 and rows["fastvar"]["cache_mem_mb"] > 0
    assert rows["fastvar"]["hit_rate"] == 0.0 and rows["fastvar"]["tokens_forwarded"] < rows["baseline"]["tokens_forwarded"]
    assert "original" in capsys.readouterr().out and (out / "compare.png").read_bytes()[:4] == b"\x89PNG"

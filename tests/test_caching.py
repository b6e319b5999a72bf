"""Feature caching on a small random VAR: calibration, inference decisions, presets, composition, errors.

The decoder is a tiny fixed map (a test double with the VQVAE's inference interface) so these tests
exercise the transformer and the hooks alone.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvar.accel import AccelPlan, CacheConfig, PlanError, get_preset
from fastvar.accel.cache_presets import CACHE_PRESETS, describe_cache_presets, get_cache_preset
from fastvar.accel.caching import (
    CachingHooks,
    SimilarityData,
    get_cache_statistics,
    load_similarity_data,
    stage_thresholds,
)
from fastvar.models.var import VAR
from fastvar.pipelines.var import VARPipeline
from fastvar.schedules import Schedule

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SCHED = Schedule.square(PATCH_NUMS)
DEPTH = 4
CLASSES = [0, 3]


class _Quant(nn.Module):
    def __init__(self, vocab: int, cvae: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, cvae)

    def add_scale_to_fhat(self, f_hat, h, si, SN):
        P = f_hat.shape[-1]
        return f_hat + (h if h.shape[-1] == P else F.interpolate(h, size=(P, P), mode="bicubic"))


class _TinyDecoder(nn.Module):
    """VQVAE inference interface (quantize.embedding, add_scale_to_fhat, fhat_to_img) at minimal cost."""

    def __init__(self, vocab: int = 64, cvae: int = 8) -> None:
        super().__init__()
        self.quantize = _Quant(vocab, cvae)
        self.to_rgb = nn.Conv2d(cvae, 3, 1)

    def fhat_to_img(self, f_hat):
        return torch.tanh(self.to_rgb(F.interpolate(f_hat, scale_factor=2, mode="nearest")))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = VAR(vocab_size=64, cvae=8, num_classes=5, depth=DEPTH, embed_dim=64, num_heads=2, patch_nums=PATCH_NUMS)
    model.init_weights()
    # unit AdaLN gains instead of the training init's ~0, so branch outputs matter and reuse changes images
    for blk in model.blocks:
        blk.ada_lin[-1].bias.data[: 2 * model.C].fill_(1.0)
    return VARPipeline(model.eval(), _TinyDecoder().eval(), "tiny", defaults=dict(cfg=2.0, top_k=10, top_p=0.9))


@pytest.fixture(scope="module")
def baseline(pipe):
    return pipe(CLASSES, seed=7)


@pytest.fixture(scope="module")
def calibrated(pipe, tmp_path_factory):
    """'original' calibrated once: (sim file path, result)."""
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    cfg = get_cache_preset("original", calibration=True, sim_path=str(path))
    res = pipe(CLASSES, seed=7, plan=AccelPlan(name="cal", cache=cfg), record=True)
    return path, res


def _cached(cfg: CacheConfig, **kw) -> AccelPlan:
    return AccelPlan(name="cache", cache=cfg, **kw)


def test_calibration_is_baseline_and_records_every_pair(baseline, calibrated):
    path, res = calibrated
    assert torch.equal(res.images, baseline.images)  # calibration returns the fresh outputs
    d = json.loads(path.read_text())
    keys = {(e["layer"], e["stage"], e["branch"]): e for e in d["entries"]}
    assert set(keys) == {(layer, s, b) for layer in range(DEPTH) for s in (169, 256) for b in ("attn", "ffn")}
    for (_layer, stage, _b), e in keys.items():
        assert e["source"] == {169: 100, 256: 169}[stage]
        assert -1.0 <= e["mean"] <= 1.0 and e["n"] == 1
        assert e["mean"] == pytest.approx(statistics.fmean(e["values"]))


def test_inference_reproduces_recorded_decisions(pipe, baseline, calibrated):
    path, _ = calibrated
    entries = json.loads(path.read_text())["entries"]
    thr = statistics.median(e["mean"] for e in entries)
    expected = {(e["stage"], e["layer"], e["branch"]): e["mean"] >= thr for e in entries}
    assert any(expected.values()) and not all(expected.values())
    cfg = get_cache_preset("original", threshold=thr, sim_path=str(path))
    res = pipe(CLASSES, seed=7, plan=_cached(cfg), record=True)
    hooks: CachingHooks = res.stats["hooks"]
    tok = SCHED.token_counts
    assert {(tok[si], layer, b): v for (si, layer, b), v in hooks.decisions.items()} == expected
    for (si, layer, b), (n_in, n_comp) in hooks.counts.items():
        assert n_comp == (0 if expected.get((tok[si], layer, b)) else n_in)
    assert sum(map(sum, hooks.hits.values())) == sum(expected.values())
    assert not torch.equal(res.images, baseline.images)
    # a second run decides the same from the same file
    res2 = pipe(CLASSES, seed=7, plan=_cached(cfg), record=True)
    assert res2.stats["hooks"].decisions == hooks.decisions
    assert torch.equal(res2.images, res.images)


def test_threshold_one_reuses_nothing_and_is_bit_identical(pipe, baseline, calibrated):
    path, _ = calibrated
    sim = load_similarity_data(path)
    assert max(sim.mean(k) for k in sim.values) <= 1.0  # nothing recordable lies above 1
    for adaptive in (False, True):
        cfg = get_cache_preset("original", threshold=1.0, adaptive_threshold=adaptive, sim_path=str(path))
        res = pipe(CLASSES, seed=7, plan=_cached(cfg), record=True)
        assert torch.equal(res.images, baseline.images)
        assert sum(map(sum, res.stats["hooks"].hits.values())) == 0
    with pytest.raises(PlanError, match=r"outside \[0, 1\].*1\.0 to reuse nothing"):
        CacheConfig(threshold=1.0001)


@pytest.mark.parametrize("name", list(CACHE_PRESETS))
def test_each_preset_runs(pipe, baseline, tmp_path, name):
    path = tmp_path / f"{name}.json"
    cal = pipe(CLASSES, seed=7, plan=_cached(get_cache_preset(name, calibration=True, sim_path=str(path))))
    assert torch.equal(cal.images, baseline.images)
    res = pipe(CLASSES, seed=7, plan=_cached(get_cache_preset(name, sim_path=str(path))), record=True)
    assert res.images.shape == baseline.images.shape and torch.isfinite(res.images).all()
    stats = res.stats["hooks"].statistics()
    assert stats["cache_config"]["threshold"] == CACHE_PRESETS[name].settings.get("threshold", 0.9)
    if name == "no-cache":
        assert torch.equal(res.images, baseline.images)
    assert CACHE_PRESETS[name].intent


def test_attention_and_mlp_switches(calibrated, pipe):
    path, _ = calibrated
    for name, allowed in (("attn-only", {"attn"}), ("mlp-only", {"ffn"})):
        cfg = get_cache_preset(name, threshold=0.0, sim_path=str(path))
        hooks = pipe(CLASSES, seed=7, plan=_cached(cfg), record=True).stats["hooks"]
        assert {b for (_si, _l, b) in hooks.decisions} == allowed


def test_preset_stages_as_token_counts():
    cfg = get_cache_preset("original", SCHED)
    assert (cfg.cache_stages, cfg.skip_stages) == (("100", "169"), ("169", "256"))
    assert "ultra-fast" in describe_cache_presets(SCHED)


def test_combined_pruning_and_caching_plan(pipe, baseline, tmp_path):
    path = tmp_path / "combo.json"
    prune = get_preset("fastvar", "var", 16, DEPTH)  # prunes 13x13 / 16x16, caches 10x10, layers [0, 4)
    cal_plan = AccelPlan(**{**prune.to_dict(), "cache": get_cache_preset("attn-only", calibration=True,
                                                                        sim_path=str(path)).to_dict()})
    pipe(CLASSES, seed=7, plan=cal_plan)
    plan = AccelPlan.from_json(AccelPlan(**{**prune.to_dict(), "cache": get_cache_preset(
        "attn-only", threshold=0.0, sim_path=str(path)).to_dict()}).to_json())
    res = pipe(CLASSES, seed=7, plan=plan, record=True)
    hooks: CachingHooks = res.stats["hooks"]
    r = hooks.resolved
    assert r.keep and hooks.decisions
    for (si, layer, b), (n_in, n_comp) in hooks.counts.items():
        if hooks.decisions.get((si, layer, b)):
            assert n_comp == 0  # reused: neither computed nor pruned
        elif r.prunes(si, layer, b):
            assert n_comp == r.n_keep(si, n_in)
        else:
            assert n_comp == n_in
    assert any(v for (si, _l, b), v in hooks.decisions.items() if b == "attn")
    assert any(r.prunes(si, layer, b) and n_c > 0 for (si, layer, b), (_n, n_c) in hooks.counts.items())
    assert res.images.shape == baseline.images.shape and torch.isfinite(res.images).all()


def test_adaptive_threshold_definition():
    sim = SimilarityData()
    vals = {0: 0.95, 1: 0.9, 2: 0.6, 3: 0.85}
    for layer, v in vals.items():
        sim.add(layer, 256, "attn", 169, v)
        sim.add(layer, 256, "ffn", 169, v - 0.1)
    sim.add(0, 169, "attn", 100, 0.99)
    cfg = CacheConfig(cache_stages=("100", "169"), skip_stages=("169", "256"), threshold=0.9, adaptive_threshold=True)
    thr = stage_thresholds(cfg, sim, {169: 100, 256: 169})
    all256 = list(vals.values()) + [v - 0.1 for v in vals.values()]
    m, s = statistics.fmean(all256), statistics.pstdev(all256)
    assert thr[256] == pytest.approx(min(0.9, m - s))
    assert thr[169] == pytest.approx(min(0.9, 0.99 - 0.0))
    fixed = stage_thresholds(CacheConfig(**{**cfg.to_dict(), "adaptive_threshold": False}), sim, {169: 100, 256: 169})
    assert fixed == {169: 0.9, 256: 0.9}
    assert all(thr[k] <= fixed[k] for k in thr)  # adaptive reuses a superset
    # a stage recorded from another source stage does not count
    assert stage_thresholds(cfg, sim, {256: 100})[256] == 0.9
    # mlp disabled: only attention records count
    cfg_a = CacheConfig(**{**cfg.to_dict(), "enable_mlp_cache": False})
    va = list(vals.values())
    assert stage_thresholds(cfg_a, sim, {256: 169})[256] == pytest.approx(min(0.9, statistics.fmean(va) - statistics.pstdev(va)))


def test_adaptive_inference_follows_per_stage_thresholds(pipe, calibrated):
    path, _ = calibrated
    sim = load_similarity_data(path)
    cfg = get_cache_preset("original", threshold=0.99, adaptive_threshold=True, sim_path=str(path))
    hooks = pipe(CLASSES, seed=7, plan=_cached(cfg), record=True).stats["hooks"]
    tok = SCHED.token_counts
    for (si, layer, b), v in hooks.decisions.items():
        stage = tok[si]
        means = [sim.mean(k) for k in sim.values if k[1] == stage]
        t = min(0.99, max(0.0, statistics.fmean(means) - statistics.pstdev(means)))
        assert v == (sim.mean((layer, stage, b)) >= t - 1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic", "area"])
def test_reuse_is_the_interpolated_cache(mode):
    sim = SimilarityData()
    sim.add(0, 16, "ffn", 4, 1.0)
    cfg = CacheConfig(cache_stages=("4",), skip_stages=("16",), threshold=0.5, interpolation_mode=mode)
    hooks = CachingHooks(AccelPlan(cache=cfg), depth=1, similarity=sim)
    hooks.begin([(1, 1), (2, 2), (4, 4)], batch=2)
    hooks.begin_scale(1, (2, 2))
    cached = torch.randn(2, 4, 3)
    hooks.branch(0, "ffn", torch.randn(2, 4, 3), lambda t, idx: cached)
    hooks.begin_scale(2, (4, 4))
    out = hooks.branch(0, "ffn", torch.randn(2, 16, 3), lambda t, idx: pytest.fail("branch must not run"))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    up = F.interpolate(cached.view(2, 2, 2, 3).permute(0, 3, 1, 2), size=(4, 4), mode=mode, **kw)
    torch.testing.assert_close(out, up.permute(0, 2, 3, 1).reshape(2, 16, 3))
    assert hooks.hits["ffn"] == [1]


def test_runtime_config_statistics_and_memory(pipe, baseline, tmp_path):
    model = pipe.model
    try:
        model.set_cache_config(get_cache_preset("original", calibration=True))
        assert torch.equal(pipe(CLASSES, seed=7).images, baseline.images)
        st = model.get_cache_statistics()
        assert st["mode"] == "calibration" and st["similarity_stats"]["overall"]["n"] == DEPTH * 2 * 2
        # peak: at the end of stage 169 every layer holds a 169-token slot per branch (batch 2 x CFG 2, width 64, fp32)
        assert st["memory"]["cache_peak_bytes"] == DEPTH * 2 * (2 * len(CLASSES)) * 169 * 64 * 4
        assert st["memory"]["cache_bytes"] == 0  # freed at the end of the generation
        model.set_cache_config(get_cache_preset("original", threshold=0.0))  # carries the in-memory data
        res = pipe(CLASSES, seed=7)
        st = get_cache_statistics(pipe)
        assert st["mode"] == "inference" and st["hit_rate"] == 1.0
        assert st["hits_per_layer"] == {"attn": [2] * DEPTH, "ffn": [2] * DEPTH}
        assert not torch.equal(res.images, baseline.images)
        json.dumps(st)
        from fastvar.accel.caching import save_similarity_data

        p = save_similarity_data(model, tmp_path / "s.json")
        assert len(load_similarity_data(p)) == DEPTH * 2 * 2
    finally:
        model.set_cache_config(None)
    assert get_cache_statistics(model)["cache_config"] is None
    assert torch.equal(pipe(CLASSES, seed=7).images, baseline.images)


def test_similarity_file_round_trip(calibrated, tmp_path):
    path, _ = calibrated
    sim = load_similarity_data(path)
    p2 = sim.save(tmp_path / "copy.json")
    assert load_similarity_data(p2) == sim
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp file


def test_config_json_round_trip():
    cfg = CacheConfig(skip_stages=(169, "t256"), cache_stages=("#-3", "13x13"), threshold=0.5,
                      interpolation_mode="area", adaptive_threshold=True, enable_mlp_cache=False)
    assert cfg.skip_stages == ("169", "t256")
    assert CacheConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    plan = AccelPlan(name="both", keep={"16": 0.5}, cache=cfg)
    assert AccelPlan.from_json(plan.to_json()) == plan
    assert cfg.resolve_stages(SCHED) == ((7, 8), (8, 9))


@pytest.mark.parametrize("ref", ["169", "t169", "#8", "#-2", "13x13", 169])
def test_stage_refs(ref):
    assert CacheConfig(cache_stages=("#0",), skip_stages=(ref,)).resolve_stages(SCHED)[1] == (8,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=-0.1), r"outside \[0, 1\]"),
        (dict(threshold=1.5), r"outside \[0, 1\]"),
        (dict(threshold=math.nan), r"outside \[0, 1\]"),
        (dict(interpolation_mode="linear"), "interpolation_mode"),
        (dict(skip_stages=("256",)), "cache_stages is empty"),
        (dict(cache_stages=("big",)), "not understood"),
    ],
)
def test_bad_cache_configs_raise(kwargs, match):
    with pytest.raises(PlanError, match=match):
        CacheConfig(**kwargs)


def test_bad_configs_at_runtime(pipe, tmp_path):
    with pytest.raises(PlanError, match="unknown cache preset"):
        get_cache_preset("turbo")
    with pytest.raises(PlanError, match="not in this schedule"):
        pipe(CLASSES, seed=0, plan=_cached(CacheConfig(cache_stages=("100",), skip_stages=("200",), calibration=True)))
    with pytest.raises(PlanError, match="no cache stage before"):
        pipe(CLASSES, seed=0, plan=_cached(CacheConfig(cache_stages=("256",), skip_stages=("169",), calibration=True)))
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"--sim-path.*--calibration"):
        pipe(CLASSES, seed=0, plan=_cached(get_cache_preset("original", sim_path=str(missing))))
    with pytest.raises(PlanError, match="needs similarity data"):
        pipe(CLASSES, seed=0, plan=_cached(get_cache_preset("original")))
    with pytest.raises(PlanError, match="unknown cache field"):
        AccelPlan.from_dict({"cache": {"skip": [256]}})
    with pytest.raises(PlanError, match="not in this schedule"):
        pipe.model.set_cache_config(CacheConfig(cache_stages=("100",), skip_stages=("999",), calibration=True))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(PlanError, match="not a fastvar similarity file"):
        load_similarity_data(bad)


def test_compare_configs_and_plot(pipe, tmp_path):
    from fastvar.eval.compare import compare_configs, format_compare, plot_compare

    rows = compare_configs(pipe, CLASSES, ["no-cache", "original", "fastvar", "fastvar+attn-only"], seed=7,
                           repeats=1, warmup=0)
    assert [r["config"] for r in rows] == ["baseline", "no-cache", "original", "fastvar", "fastvar+attn-only"]
    base, nocache = rows[0], rows[1]
    assert base["speedup"] == 1.0 and base["psnr"] is None and nocache["psnr"] is None
    for r in rows:
        assert set(r) >= {"config", "seconds", "speedup", "peak_mem_mb", "cache_mem_mb", "psnr", "ssim"}
    assert rows[2]["cache_mem_mb"] > 0 and rows[3]["cache_mem_mb"] > 0  # feature cache / pruning cache held
    assert rows[2]["psnr"] is not None and 0 < rows[2]["ssim"] < 1
    assert "fastvar+attn-only" in format_compare(rows)
    out = plot_compare(rows, tmp_path / "cmp" / "chart.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PlanError, match="neither a cache preset"):
        compare_configs(pipe, CLASSES, ["warp-speed"], seed=0)

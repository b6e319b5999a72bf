"""KV-cache compression: budgets that shrink the real buffers, exact byte counts, per-head subsets whose
attention equals masking the dropped keys, the plan field and the kv-compress preset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastvar.accel import AccelPlan, Engine, KVConfig, KVPolicy, PlanError, get_preset
from fastvar.accel.kv import budget_table, calibrate_drafters
from fastvar.accel.stats import estimate_flops
from fastvar.layers.attention import KVCache, attend
from fastvar.pipelines.common import dense_kv
from fastvar.schedules import Schedule

from .test_backbone_contract import FAMILIES, _tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    pipe, cond = _tiny(request.param)
    base = pipe(cond, seed=3, decode=False)
    return request.param, pipe, cond, base


def _sizes(base) -> list[tuple[int, int]]:
    return [tuple(s) for s in base.stats["sizes"]]


class _BufferSpy:
    """Records every KV buffer the caches allocate (bytes of K and V buffers) during a generation."""

    def __init__(self, monkeypatch) -> None:
        self.allocated: dict[int, int] = {}
        real = KVCache._store
        spy = self

        def store(cache, k, v):
            real(cache, k, v)
            if cache._kbuf is not None:
                spy.allocated[id(cache)] = (cache._kbuf.numel() * cache._kbuf.element_size()
                                            + cache._vbuf.numel() * cache._vbuf.element_size())

        monkeypatch.setattr(KVCache, "_store", store)

    def total(self) -> int:
        return sum(self.allocated.values())


def test_noop_settings_are_bit_identical_and_not_storing_the_last_scale_changes_no_output(case):
    _f, pipe, cond, base = case
    depth = pipe.model.depth
    n = len(_sizes(base))
    for kv in (KVConfig(keep={f"#{n - 2}": 1.0}), KVConfig(keep={"#-3": 1.0}, drafters=[0], refiner_keep=1.0)):
        res = pipe(cond, seed=3, decode=False, plan=Engine([KVPolicy(kv)], depth=depth))
        assert torch.equal(res.latent, base.latent)
        assert res.stats["kv_bytes"] == base.stats["kv_bytes"]
    # the last scale's K/V is read by no later scale: not storing it is output-exact and holds less
    res = pipe(cond, seed=3, decode=False, plan=Engine([KVPolicy(KVConfig(keep_last=False))], depth=depth))
    assert torch.equal(res.latent, base.latent)
    assert res.stats["kv_bytes"] < base.stats["kv_bytes"]


def test_baseline_bytes_are_what_the_official_cache_holds(case):
    _f, pipe, cond, base = case
    eng = Engine(depth=pipe.model.depth)
    res = pipe(cond, seed=3, decode=False, plan=eng)
    rows = eng.recorder.batch
    counted = {k: res.stats[k] for k in ("kv_bytes", "kv_peak_bytes", "kv_bytes_per_scale", "kv_bytes_per_layer")}
    est = dense_kv(pipe.model, _sizes(base), rows)
    assert counted == {k: est[k] for k in counted}
    # and the identity hooks (no engine) report the same numbers for the official code
    assert base.stats["kv_bytes"] == res.stats["kv_bytes"] and base.stats["kv_peak_bytes"] == res.stats["kv_peak_bytes"]
    # with no KV policy the keys each attention read are the running token count the FLOP estimate assumes
    rec, dims = eng.recorder, pipe.model.flop_dims()
    assert estimate_flops(rec.counts, rec.sizes, dims, rows, kv_len=rec.kv_len) == estimate_flops(
        rec.counts, rec.sizes, dims, rows)


def test_buffers_are_allocated_smaller_and_the_recorder_counts_them(case, monkeypatch):
    _f, pipe, cond, base = case
    depth = pipe.model.depth
    full = _BufferSpy(monkeypatch)
    pipe(cond, seed=3, decode=False, plan=Engine(depth=depth))
    monkeypatch.undo()
    small = _BufferSpy(monkeypatch)
    plan = get_preset("kv-compress", pipe.model.family, depth=depth, schedule=Schedule(_sizes(base)))
    res = pipe(cond, seed=3, decode=False, plan=plan)
    assert len(small.allocated) == len(full.allocated) == depth
    assert small.total() < full.total()
    # the buffers hold exactly the budget: allocated bytes == bytes held at the end == the recorder's peak
    assert small.total() == res.stats["kv_bytes"] == res.stats["kv_peak_bytes"]
    assert full.total() == base.stats["kv_bytes"]
    # the later scales' attention reads fewer keys: fewer attention FLOPs, the same linear ones
    ref = pipe(cond, seed=3, decode=False, plan=Engine(depth=depth)).stats
    assert res.stats["attn_flops"] < ref["attn_flops"] and res.stats["linear_flops"] == ref["linear_flops"]


def test_recorder_bytes_equal_a_hand_count():
    pipe, cond = _tiny("var")  # sizes 1,2,3,4,6,8; depth 2; width 32; fp32; 2 CFG rows for 1 class
    kv = KVConfig(keep={"6": 0.25, "#-4": 0.5}, keep_last=False, per_head=False, score="dist")
    res = pipe(cond[:1], seed=0, decode=False, plan=AccelPlan(name="kv", kv=kv))
    rows, width, el = 2, 32, 4
    # per layer: 1 + 4 + ceil(0.5*9)=5 + 16 + ceil(0.25*36)=9 + 0 (the last scale is not stored)
    per_scale_tokens = [1, 4, 5, 16, 9, 0]
    per_layer = [2 * rows * width * el * t for t in per_scale_tokens]
    assert res.stats["kv_bytes"] == 2 * sum(per_layer)
    assert res.stats["kv_peak_bytes"] == 2 * sum(per_layer)
    assert res.stats["kv_bytes_per_layer"] == {"0": sum(per_layer), "1": sum(per_layer)}
    cum = [2 * sum(per_layer[: i + 1]) for i in range(6)]
    assert res.stats["kv_bytes_per_scale"] == {str(i): c for i, c in enumerate(cum)}
    # the largest attention read: layer's held history before 8x8 plus all 64 of its tokens
    assert res.stats["kv_attended_peak_bytes"] == 2 * rows * width * el * (1 + 4 + 5 + 16 + 9 + 64)


@pytest.mark.parametrize("score", ["attn", "grid", "mix", "dist"])
def test_per_head_subsets_differ_and_equal_masking_the_dropped_keys(score):
    torch.manual_seed(0)
    B, H, c, scale = 2, 4, 8, 0.3
    sizes = [(1, 1), (6, 6), (5, 5)]
    eng = Engine([KVPolicy(KVConfig(keep={"#1": 0.25}, per_head=True, score=score))], depth=1)
    eng.begin(sizes, B)
    cache = KVCache(eng.kv_tokens(sizes, 0), 0, eng)
    k0, v0, q0 = (torch.randn(B, H, 1, c) for _ in range(3))
    k1, v1, q1 = (torch.randn(B, H, 36, c) for _ in range(3))
    k2, v2, q2 = (torch.randn(B, H, 25, c) for _ in range(3))
    eng.begin_scale(0, sizes[0])
    cache.append(k0, v0, q0, scale)
    eng.begin_scale(1, sizes[1])
    ka, va = cache.append(k1, v1, q1, scale)
    assert torch.equal(ka, torch.cat((k0, k1), 2))  # scale 1 itself attends to all its keys
    held = cache.k[:, :, 1:]
    assert held.shape == (B, H, 9, c)  # ceil(0.25 * 36) per head
    eng.begin_scale(2, sizes[2])
    kb, vb = cache.append(k2, v2, q2, scale)
    assert kb.shape[2] == 1 + 9 + 25
    # which of scale 1's keys each head kept (keys are distinct random vectors: match them back)
    kept = torch.zeros(B, H, 36, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in range(9):
                hit = (k1[b, h] == held[b, h, j]).all(dim=-1).nonzero().flatten()
                assert len(hit) == 1
                kept[b, h, hit[0]] = True
    assert int(kept.sum()) == B * H * 9
    assert any(not torch.equal(kept[b, 0], kept[b, h]) for b in range(B) for h in range(1, H))
    # the next scale's attention over the compressed cache == full attention with the dropped keys masked
    out = attend(q2, kb, vb, scale)
    full_k, full_v = torch.cat((k0, k1, k2), 2), torch.cat((v0, v1, v2), 2)
    mask = torch.zeros(B, H, 25, 1 + 36 + 25)
    mask[:, :, :, 1:37] = torch.where(kept, 0.0, float("-inf")).unsqueeze(2)
    ref = attend(q2, full_k, full_v, scale, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_per_head_policy_runs_on_every_backbone_under_its_budget(case):
    _f, pipe, cond, base = case
    sizes = _sizes(base)
    n = len(sizes)
    keep = {f"#{si}": 0.25 for si in range(1, n - 3)}  # enough that even tiny Infinity's sign bits change
    kv = KVConfig(keep={**keep, "#-2": 0.3, "#-3": 0.5}, per_head=True, score="mix")
    a = pipe(cond, seed=3, decode=False, plan=AccelPlan(name="kv", kv=kv))
    b = pipe(cond, seed=3, decode=False, plan=AccelPlan(name="kv", kv=kv))
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, base.latent)
    assert a.latent.shape == base.latent.shape and torch.isfinite(a.latent.float()).all()
    for si, f in ((n - 2, 0.3), (n - 3, 0.5)):
        h, w = sizes[si]
        whole = base.stats["kv_bytes_per_scale"][str(si)] - base.stats["kv_bytes_per_scale"][str(si - 1)]
        got = a.stats["kv_bytes_per_scale"][str(si)] - a.stats["kv_bytes_per_scale"][str(si - 1)]
        assert got * h * w == whole * math.ceil(f * h * w)


def test_drafters_keep_more_than_refiners():
    cfg = KVConfig(keep={"#-2": 0.5}, refiner_keep=0.1, drafters={"#-2": [1]}, keep_last=False)
    table = budget_table(cfg, [(1, 1), (2, 2), (4, 4), (8, 8)], depth=3)
    assert table == {(2, 0): 0.1, (2, 1): 0.5, (2, 2): 0.1, (3, 0): 0.0, (3, 1): 0.0, (3, 2): 0.0}
    # scale 0 (HART: the text prefix) is never compressed; layers outside the range keep everything
    cfg = KVConfig(keep={"#0": 0.5, "#1": 0.5}, layers=(1, 2))
    assert budget_table(cfg, [(1, 1), (2, 2), (4, 4)], depth=3) == {(1, 1): 0.5}


def test_calibrate_drafters_names_layers_per_scale():
    pipe, cond = _tiny("var")
    drafters = calibrate_drafters(lambda e: pipe(cond, seed=0, plan=e, decode=False), n_drafters=1)
    assert set(drafters) == {f"#{i}" for i in range(1, 6)}
    assert all(len(v) == 1 and 0 <= v[0] < 2 for v in drafters.values())
    KVConfig(keep={"#-2": 0.5}, refiner_keep=0.1, drafters=drafters)  # usable as a plan field


def test_plan_field_round_trip():
    kv = {"keep": {"13": 0.25, "#-2": 0.1}, "refiner_keep": {"13": 0.05}, "drafters": {"#8": [0, 2]},
          "layers": [0, 6], "per_head": True, "score": "grid", "keep_last": False}
    plan = AccelPlan(name="k", kv=kv)
    assert isinstance(plan.kv, KVConfig) and plan.kv.layers == (0, 6)
    back = AccelPlan.from_json(plan.to_json())
    assert back == plan and back.to_dict()["kv"] == kv
    assert json.loads(plan.to_json())["kv"]["drafters"] == {"#8": [0, 2]}
    assert not plan.is_identity and AccelPlan(name="i", kv={"keep": {"13": 1.0}}).is_identity


@pytest.mark.parametrize("kv, words", [
    ({"keep": {"13": 1.5}}, ["kv.keep['13']", "[0, 1]"]),
    ({"keep": {"13": "lots"}}, ["kv.keep['13']", "fraction"]),
    ({"keep": [0.5]}, ["kv.keep", "map"]),
    ({"keep": {"middle": 0.5}}, ["kv scale ref", "'#-2'"]),
    ({"keep": {"13": 0.5}, "score": "magic"}, ["kv.score", "attn"]),
    ({"keep": {"13": 0.5}, "layers": [4, 2]}, ["kv.layers", "start < end"]),
    ({"keep": {"13": 0.5}, "refiner_keep": 0.1}, ["kv.refiner_keep", "kv.drafters"]),
    ({"keep": {"13": 0.5}, "drafters": [0, -1]}, ["kv.drafters", ">= 0"]),
    ({"keep": {"13": 0.5}, "per_head": "yes"}, ["kv.per_head", "true or false"]),
    ({"keep": {"13": 0.5}, "budget": 3}, ["unknown kv field", "budget"]),
    ("13", ["plan field kv", "object"]),
])
def test_plan_field_errors_name_the_field_and_the_fix(kv, words):
    with pytest.raises(PlanError) as e:
        AccelPlan.from_dict({"name": "bad", "kv": kv})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_refs_the_schedule_lacks():
    cfg = KVConfig(keep={"#-12": 0.5})
    with pytest.raises(PlanError, match="before the start"):
        budget_table(cfg, [(1, 1), (2, 2), (4, 4)], depth=2)
    assert budget_table(cfg, [(1, 1), (2, 2), (4, 4)], depth=2, strict=False) == {}


@pytest.mark.parametrize("family, schedule", [
    ("var", None), ("var", [(s, s) for s in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)]),
    ("infinity", None), ("infinity", [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]),
    ("hart", None),
])
def test_kv_compress_resolves_on_every_family(family, schedule):
    plan = get_preset("kv-compress", family, depth=12, schedule=schedule)
    sched = Schedule(tuple(schedule)) if schedule else None
    if sched is None:
        from fastvar.accel.presets import DEFAULT_LAST_SIDE, default_schedule

        sched = default_schedule(family, DEFAULT_LAST_SIDE[family])
    n = len(sched)
    table = budget_table(plan.kv, sched.sizes, 12, strict=plan.strict)
    assert {si for si, _l in table} == {n - 3, n - 2, n - 1}
    assert table[(n - 2, 0)] > table[(n - 2, 5)] == 0.0  # block 0 drafts, block 5 refines
    tokens = [h * w for h, w in sched.sizes]
    held = sum(math.ceil(table.get((si, layer), 1.0) * t - 1e-9) for si, t in enumerate(tokens) for layer in range(12))
    assert held * 3 < sum(tokens) * 12  # at least 3x fewer K/V tokens held on every schedule
    with pytest.raises(PlanError, match="at least 4 scales"):
        get_preset("kv-compress", family, depth=12, schedule=[(1, 1), (2, 2), (4, 4)])


def test_compare_configs_reports_kv_memory():
    from fastvar.eval.compare import compare_configs, format_compare

    pipe, cond = _tiny("var")
    rows = compare_configs(pipe, cond, ["kv-compress"], seed=0, repeats=1, warmup=0)
    assert [r["config"] for r in rows] == ["baseline", "kv-compress"]
    assert 0 < rows[1]["kv_mem_mb"] < rows[0]["kv_mem_mb"]
    assert "kvMB" in format_compare(rows).splitlines()[0]

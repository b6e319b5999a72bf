"""The acceleration engine on a small random VAR: identity, exact token counts, skipping, plans as data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastvar
from fastvar.accel import AccelPlan, PlanError, PlanHooks, get_preset
from fastvar.accel.pruning import pivotal_indices
from fastvar.schedules import Schedule

from ._tiny_var import tiny_var_pipe

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@pytest.fixture(scope="module")
def pipe():
    return tiny_var_pipe(PATCH_NUMS)


def test_identity_plan_is_bit_identical(pipe):
    base = pipe([0, 3], seed=7)
    ident = AccelPlan(name="identity", keep={str(s): 1.0 for s in PATCH_NUMS})
    res = pipe([0, 3], seed=7, plan=ident)
    assert torch.equal(base.images, res.images)
    res2 = pipe([0, 3], seed=7, plan=AccelPlan(name="empty"))
    assert torch.equal(base.images, res2.images)


def test_same_seed_same_plan_same_image(pipe):
    a = pipe([1, 2], seed=3, plan="fastvar")
    b = pipe([1, 2], seed=3, plan="fastvar")
    assert torch.equal(a.images, b.images)


def test_token_counts_match_plan_exactly(pipe):
    plan = AccelPlan(name="t", keep={"13": 0.6, "16": 0.25}, layers=(1, 3), branches=("attn", "ffn"))
    res = pipe([0, 1], seed=0, plan=plan, record=True)
    hooks: PlanHooks = res.stats["hooks"]
    sched = Schedule.square(PATCH_NUMS)
    for (si, layer, branch), (n_in, n_comp) in hooks.counts.items():
        h, w = sched[si]
        assert n_in == h * w
        side = max(h, w)
        if side in (13, 16) and 1 <= layer < 3:
            keep = {13: 0.6, 16: 0.25}[side]
            assert n_comp == h * w - int(h * w * (1 - keep))
            assert hooks.kept[(si, layer, branch)].shape == (4, n_comp)
        else:
            assert n_comp == n_in
    assert len(hooks.counts) == len(PATCH_NUMS) * 4 * 2
    assert res.stats["tokens_forwarded"] < res.stats["tokens_total"]


def test_pruned_generation_changes_only_after_cache_scale(pipe):
    base = pipe([0, 1], seed=0, record=False)
    res = pipe([0, 1], seed=0, plan=get_preset("fastvar", "var", 16, 4))
    assert res.images.shape == base.images.shape
    assert not torch.equal(res.images, base.images)


def test_skip_plan_never_runs_blocks_at_skipped_scales(pipe, monkeypatch):
    calls = []
    blk = pipe.model.blocks[0]
    orig = blk.forward

    def counting(x, *a, **k):
        calls.append(x.shape[1])
        return orig(x, *a, **k)

    monkeypatch.setattr(blk, "forward", counting)
    res = pipe([0, 1], seed=0, plan=AccelPlan(name="skip", skip=("16",), keep={"13": 0.0}), record=True)
    assert calls == [p * p for p in PATCH_NUMS[:-2]]
    assert res.stats["hooks"].skipped == [8, 9]
    assert res.images.shape[-1] == pipe([0], seed=0).images.shape[-1]


def test_skip_plan_draws_no_rng_at_skipped_scales(pipe):
    """The generator state after a skip-last run equals the state after the same scales without skipping."""
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    model, vae = pipe.model, pipe.vae
    with torch.inference_mode():
        fastvar.apply(model, AccelPlan(skip=("16",)))
        model.autoregressive_infer(vae, 1, torch.tensor([0]), cfg=1.0, top_k=5, generator=g1)
        fastvar.apply(model, AccelPlan(skip=("13", "16")))
        model.autoregressive_infer(vae, 1, torch.tensor([0]), cfg=1.0, top_k=5, generator=g2)
        fastvar.remove(model)
    # one more scale sampled in the first run -> generator advanced further
    assert not torch.equal(g1.get_state(), g2.get_state())


def test_plan_json_round_trip(tmp_path):
    plan = get_preset("fastvar", "infinity")
    plan2 = AccelPlan.from_json(plan.to_json(tmp_path / "p.json"))
    assert plan2 == plan
    assert json.loads(plan2.to_json()) == json.loads(plan.to_json())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep={"16": 1.5}), "keep ratio"),
        (dict(keep={"16": -0.1}), "keep ratio"),
        (dict(interp="linear"), "interp"),
        (dict(branches=("attn", "mlp")), "branch"),
        (dict(layers=(3, 2)), "layer range"),
    ],
)
def test_invalid_plans_raise(kwargs, match):
    with pytest.raises(PlanError, match=match):
        AccelPlan(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep={"7": 0.5}), "not in this schedule"),
        (dict(keep={"16": 0.5}, layers=(0, 99)), "outside the model's depth"),
        (dict(keep={"13": 0.5}, cache_scale="16"), "cache scale"),
        (dict(keep={"13": 0.5, "10": 0.5}, cache_scale="10"), "cache scale"),
        (dict(skip=("1",)), "first scale"),
    ],
)
def test_plans_invalid_for_a_schedule_raise(kwargs, match):
    with pytest.raises(PlanError, match=match):
        AccelPlan(**kwargs).resolve(Schedule.square(PATCH_NUMS), depth=4)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(PlanError, match="unknown preset"):
        get_preset("warp-speed", "var")
    with pytest.raises(PlanError, match="unknown plan field"):
        AccelPlan.from_dict({"keep": {}, "ratio": 0.5})


def test_pivotal_indices_are_the_farthest_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 36, 8)
    idx = pivotal_indices(x, (6, 6), 10)
    score = ((x - x.mean(1, keepdim=True)) ** 2).sum(-1)
    ref = score.topk(10, dim=1).indices
    assert torch.equal(idx.sort(1).values, ref.sort(1).values)


def test_restore_fills_pruned_slots_from_resized_cache():
    plan = AccelPlan(keep={"4": 0.5}, cache_scale="2", branches=("ffn",))
    hooks = PlanHooks(plan, depth=1, record=True)
    hooks.begin([(1, 1), (2, 2), (4, 4)], batch=2)
    hooks.begin_scale(1, (2, 2))
    cached = torch.randn(2, 4, 3)
    hooks.branch(0, "ffn", torch.randn(2, 4, 3), lambda t, idx: cached)
    hooks.begin_scale(2, (4, 4))
    x = torch.randn(2, 16, 3)
    out = hooks.branch(0, "ffn", x, lambda t, idx: torch.full_like(t, 7.0))
    idx = hooks.kept[(2, 0, "ffn")]
    assert idx.shape == (2, 8)
    up = F.interpolate(cached.view(2, 2, 2, 3).permute(0, 3, 1, 2), size=(4, 4), mode="area")
    up = up.permute(0, 2, 3, 1).reshape(2, 16, 3)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    assert torch.all(out[mask] == 7.0)
    torch.testing.assert_close(out[~mask], up[~mask])


def test_side_refs_never_fall_back_to_token_counts():
    """At Infinity 0.06M there is no 64-side scale; "64" must not hit the 8x8 scale (64 tokens)."""
    sched = Schedule.square([1, 2, 4, 6, 8, 12, 16])
    r = get_preset("fastvar", "infinity").resolve(sched, 6)
    assert r.skip == frozenset() and r.keep == {}
    assert sched.resolve("t64") == 4


def test_kv_cache_buffer_gives_the_concatenation():
    from fastvar.layers.attention import KVCache

    torch.manual_seed(0)
    chunks = [(torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)) for n in (1, 4, 9, 16)]
    for capacity in (30, 14, None):  # exact, too small (falls back to concatenation), no hint
        cache = KVCache(capacity)
        for i, (k, v) in enumerate(chunks):
            ck, cv = cache.append(k.transpose(1, 2).contiguous().transpose(1, 2), v)  # strided k like a permuted qkv
            assert torch.equal(ck, torch.cat([c[0] for c in chunks[: i + 1]], dim=2))
            assert torch.equal(cv, torch.cat([c[1] for c in chunks[: i + 1]], dim=2))
        assert cache.length == 30


@pytest.mark.parametrize("plan", ["fastvar", "fastvar-strong", "skip-last",
                                  AccelPlan(name="t", keep={"13": 0.6, "16": 0.25}, layers=(1, 3), branches=("attn", "ffn"))])
def test_kv_capacity_is_exactly_what_each_layer_appends(pipe, plan, monkeypatch):
    """The plan sizes every layer's KV buffer; a wrong size would silently fall back to concatenation."""
    from fastvar.layers import attention

    made = []
    orig = attention.KVCache.__init__

    def spy(self, capacity=None, *args, **kw):
        orig(self, capacity, *args, **kw)
        made.append(self)

    monkeypatch.setattr(attention.KVCache, "__init__", spy)
    res = pipe([0, 1], seed=0, plan=plan, record=True)
    hooks: PlanHooks = res.stats["hooks"]
    sizes = Schedule.square(PATCH_NUMS).sizes
    assert len(made) == 4
    for layer, cache in enumerate(made):
        appended = sum(n for (si, ly, b), (_, n) in hooks.counts.items() if ly == layer and b == "attn")
        assert hooks.kv_tokens(sizes, layer) == appended
        assert cache.capacity == appended  # no fallback happened
        assert cache._kbuf is not None and cache._kbuf.shape[2] == appended


def test_pivotal_order_is_the_published_one():
    """Same ops as the published FastVAR code (pool mean, squared distance, descending argsort): same order."""
    torch.manual_seed(1)
    x = torch.randn(2, 40 * 40, 32)
    grid = x.view(2, 40, 40, 32).permute(0, 3, 1, 2)
    mean = F.adaptive_avg_pool2d(grid, (1, 1)).permute(0, 2, 3, 1).view(2, 1, 32)
    ref = torch.argsort(torch.sum((x - mean) ** 2, dim=-1, keepdim=True), dim=1, descending=True)[:, :800, 0]
    assert torch.equal(pivotal_indices(x, (40, 40), 800), ref)

"""One contract over the three tiny random backbones (VAR, Infinity, HART), as diffusers' PipelineTesterMixin.

Every family must: give bit-identical output under an engine with no policy and under every policy at
its no-op setting; give the same output for the same seed; not sample at a skipped scale; forward
exactly the tokens the plan says; route its guidance through the ``guidance`` hook.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastvar.accel import AccelPlan, CacheConfig, Engine, GuidancePolicy, KVPolicy, PrunePolicy, SkipPolicy
from fastvar.accel.caching import CachePolicy
from fastvar.accel.engine import Backbone, noop_engine
from fastvar.schedules import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("var", "infinity", "hart")


def _tiny(family: str):
    if family == "var":
        from fastvar.models.var import VAR
        from fastvar.pipelines.var import VARPipeline
        from fastvar.tokenizers.vqvae import VQVAE

        pn = (1, 2, 3, 4, 6, 8)
        torch.manual_seed(0)
        model = VAR(vocab_size=64, cvae=8, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=pn)
        model.init_weights()
        with torch.no_grad():
            for blk in model.blocks:
                blk.ada_lin[-1].weight.normal_(0, 0.05)
                blk.ada_lin[-1].bias.normal_(0, 0.3)  # the trainable init's AdaLN gains are ~0: make branches matter
            model.head.weight.mul_(20)
            model.class_emb.weight.normal_(0, 1.0)  # classes (and the unconditional one) must differ for CFG to matter
        vae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=pn, using_sa=False,
                    using_mid_sa=False)
        return VARPipeline(model.eval(), vae.eval(), "tiny", defaults=dict(cfg=2.0, top_k=10, top_p=0.9)), [0, 3]
    if family == "infinity":
        from fastvar.pipelines.infinity import InfinityPipeline

        pipe = InfinityPipeline.random_init(device="cpu", depth=2, embed_dim=32, num_heads=2, text_channels=16,
                                            text_maxlen=16, d_vae=16, pn="0.06M")
        return pipe, ["a red cat", "a blue house"]
    from fastvar.pipelines.hart import HARTPipeline

    pipe = HARTPipeline.random_init(device="cpu", depth=2, embed_dim=16, num_heads=1, text_tokens=8, text_channels=16,
                                    diff_width=16, diff_depth=1, vocab_size=32, cvae=4,
                                    patch_nums=(1, 2, 36, 48, 64))
    return pipe, ["a red cat"]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    pipe, cond = _tiny(request.param)
    base = pipe(cond, seed=3, decode=False)
    return request.param, pipe, cond, base


def _sizes(pipe, base) -> list[tuple[int, int]]:
    return [tuple(s) for s in base.stats["sizes"]]


def _first_hooked(family: str) -> int:
    """HART's scale 0 is the text prefill: its blocks run outside the hooks (not a token map), so the
    recorder starts at scale 1 there (the dense no-plan statistics still count it as one token)."""
    return 1 if family == "hart" else 0


def test_contract_attributes(case):
    family, pipe, _cond, base = case
    model = pipe.model
    assert isinstance(model, Backbone)
    assert pipe.family == family == model.family
    assert model.depth >= 1 and model.flop_dims().width > 0
    assert len(_sizes(pipe, base)) >= 4


def test_engine_without_policies_is_bit_identical(case):
    family, pipe, cond, base = case
    res = pipe(cond, seed=3, decode=False, plan=Engine(depth=pipe.model.depth))
    assert torch.equal(res.latent, base.latent)
    sizes = _sizes(pipe, base)
    first = _first_hooked(family)
    assert set(res.stats["tokens_per_scale"]) == {str(i) for i in range(first, len(sizes))}
    assert res.stats["tokens_forwarded"] == res.stats["tokens_total"]
    assert set(res.stats["scale_seconds"]) == {str(i) for i in range(len(sizes))}  # the recorder always times


def test_every_policy_at_its_noop_setting_is_bit_identical(case):
    _f, pipe, cond, base = case
    depth = pipe.model.depth
    noop = AccelPlan(name="noop")
    n = len(_sizes(pipe, base))
    eng = Engine([SkipPolicy(noop), PrunePolicy(noop), CachePolicy(CacheConfig(), depth), GuidancePolicy(),
                  KVPolicy({f"#{n - 2}": 1.0})], depth=depth)
    res = pipe(cond, seed=3, decode=False, plan=eng)
    assert torch.equal(res.latent, base.latent)
    # the engine the overhead benchmark measures (benchmarks/engine_overhead.json): every policy kind present
    full = noop_engine(depth)
    kinds = {type(p) for p in full.policies}
    assert kinds >= {SkipPolicy, PrunePolicy, CachePolicy, GuidancePolicy, KVPolicy}
    res = pipe(cond, seed=3, decode=False, plan=full)
    assert torch.equal(res.latent, base.latent) and res.stats["tokens_forwarded"] == res.stats["tokens_total"]
    assert full.skipped == [] and full.policy(CachePolicy).statistics()["hit_rate"] == 0.0


def test_caching_api_on_every_backbone(case, tmp_path):
    """set_cache_config / get_cache_statistics / save_similarity_data (the HART caching extension's model
    API): calibrate (output = baseline), save atomically, infer from the carried data, switch off."""
    import dataclasses

    from fastvar.accel import IDENTITY, PlanError
    from fastvar.accel.caching import load_similarity_data

    _f, pipe, cond, base = case
    model = pipe.model
    n, depth = len(_sizes(pipe, base)), model.depth
    branches = len(model.flop_dims().branches)
    cfg = CacheConfig(cache_stages=(f"#{n - 3}",), skip_stages=(f"#{n - 2}", f"#{n - 1}"), calibration=True)
    try:
        model.set_cache_config(cfg)
        assert torch.equal(pipe(cond, seed=3, decode=False).latent, base.latent)  # calibration computes everything
        st = model.get_cache_statistics()
        assert st["mode"] == "calibration" and st["similarity_stats"]["overall"]["n"] == depth * 2 * branches
        assert st["memory"]["cache_peak_bytes"] > 0 and st["memory"]["cache_bytes"] == 0
        path = model.save_similarity_data(tmp_path / "sim.json")
        assert len(load_similarity_data(path)) == depth * 2 * branches
        assert [p.name for p in tmp_path.iterdir()] == ["sim.json"]  # no temporary file left behind
        model.set_cache_config(dataclasses.replace(cfg, calibration=False, threshold=0.0))  # carries the data
        res = pipe(cond, seed=3, decode=False)
        st = model.get_cache_statistics()
        assert st["mode"] == "inference" and st["generations"] == 1
        assert sum(map(sum, st["lookups_per_layer"].values())) == depth * 2 * branches
        assert st["hit_rate"] > 0 and res.latent.shape == base.latent.shape
    finally:
        model.set_cache_config(None)
    assert model.hooks is IDENTITY and model.get_cache_statistics()["cache_config"] is None
    with pytest.raises(PlanError, match="no feature caching is active"):
        model.save_similarity_data(tmp_path / "x.json")


def test_same_seed_same_output(case):
    _f, pipe, cond, base = case
    n = len(_sizes(pipe, base))
    plan = AccelPlan(name="p", keep={f"#{n - 1}": 0.5})
    a = pipe(cond, seed=5, decode=False, plan=plan)
    b = pipe(cond, seed=5, decode=False, plan=plan)
    assert torch.equal(a.latent, b.latent)


def test_skipped_scale_samples_nothing(case, monkeypatch):
    family, pipe, cond, base = case
    import importlib

    mod = importlib.import_module(f"fastvar.models.{family}")
    real = mod.sample_top_k_top_p_
    calls: list[int] = []

    def counting(logits, *a, **kw):
        calls.append(1)
        return real(logits, *a, **kw)

    monkeypatch.setattr(mod, "sample_top_k_top_p_", counting)
    n = len(_sizes(pipe, base))
    res = pipe(cond, seed=3, decode=False, plan=AccelPlan(name="skip", skip=(f"#{n - 2}",)), record=True)
    assert len(calls) == n - 1
    assert res.stats["hooks"].skipped == [n - 2]
    assert str(n - 2) not in res.stats["tokens_per_scale"]


def test_token_counts_equal_the_plan(case):
    family, pipe, cond, base = case
    sizes = _sizes(pipe, base)
    n, depth = len(sizes), pipe.model.depth
    plan = AccelPlan(name="p", keep={f"#{n - 1}": 0.5, f"#{n - 2}": 0.75})
    res = pipe(cond, seed=3, decode=False, plan=plan)
    r = plan.resolve(Schedule(sizes), depth)
    branches = pipe.model.flop_dims().branches
    for si, (h, w) in list(enumerate(sizes))[_first_hooked(family):]:
        got = res.stats["tokens_per_scale"][str(si)]
        want = sum(r.n_keep(si, h * w) if r.prunes(si, layer, b) else h * w for layer in range(depth) for b in branches)
        assert got == {"in": h * w * depth * len(branches), "computed": want}, si


def test_guidance_goes_through_the_hook(case):
    _f, pipe, cond, base = case
    seen: list[int] = []

    class Spy(GuidancePolicy):
        def guidance(self, si, c, u, t, inner):
            if self.engine.guidance_site == "logits":  # HART's diffusion head guides its noise there too
                seen.append(si)
            assert c.shape == u.shape
            return super().guidance(si, c, u, t, inner)

    n = len(_sizes(pipe, base))
    res = pipe(cond, seed=3, decode=False, plan=Engine([Spy()], depth=pipe.model.depth))
    assert torch.equal(res.latent, base.latent) and seen == list(range(n))
    # guidance off from scale 1 on changes what is sampled
    off = pipe(cond, seed=3, decode=False, plan=Engine([GuidancePolicy(cond_only_from="#1")],
                                                       depth=pipe.model.depth))
    assert off.latent.shape == base.latent.shape and not torch.equal(off.latent, base.latent)


def test_kv_policy_keeps_its_budget(case):
    _f, pipe, cond, base = case
    sizes = _sizes(pipe, base)
    n, depth = len(sizes), pipe.model.depth
    keep = {f"#{si}": 0.25 for si in range(1, n - 1)}  # every scale a later scale attends to
    full = Engine(depth=depth)
    pipe(cond, seed=3, decode=False, plan=full)
    eng = Engine([KVPolicy(keep)], depth=depth)
    a = pipe(cond, seed=3, decode=False, plan=eng)
    b = pipe(cond, seed=3, decode=False, plan=Engine([KVPolicy(keep)], depth=depth))
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, base.latent)
    for si in range(1, n - 1):
        h, w = sizes[si]
        for layer in range(depth):
            whole, kept = full.recorder.kv_bytes[(si, layer)], eng.recorder.kv_bytes[(si, layer)]
            assert kept * h * w == whole * math.ceil(0.25 * h * w)
    assert sum(eng.recorder.kv_bytes.values()) < sum(full.recorder.kv_bytes.values())


def test_kv_cache_compaction_equals_concatenating_the_kept_subset():
    from fastvar.layers.attention import KVCache

    class Keep2:
        def kv_append(self, layer, k, v):
            return k[:, :, :2].clone(), v[:, :, :2].clone()

    for cap in (None, 64):
        c = KVCache(cap, 0, Keep2())
        k1, v1, k2, v2 = (torch.randn(1, 2, n, 4) for n in (5, 5, 3, 3))
        ka, _ = c.append(k1, v1)
        assert torch.equal(ka, k1)  # the scale itself attends to all its keys
        kb, vb = c.append(k2, v2)
        assert torch.equal(kb, torch.cat((k1[:, :, :2], k2), 2)) and torch.equal(vb, torch.cat((v1[:, :, :2], v2), 2))

"""Guidance policy over the three tiny backbones: conditional-only scales really forward B rows and give the
image that forwarding both halves and keeping the conditional logits gives; counts, KV rows, plan field,
preset, reuse of the unconditional output, and the Infinity / HART guidance sites."""

from __future__ import annotations

import json

import pytest
import torch

from fastvar.accel import AccelPlan, Engine, GuidanceConfig, GuidancePolicy, PlanError, Policy, get_preset, plan_engine
from fastvar.accel.guidance import resize_token_map, resolve_scale_ref
from fastvar.schedules import Schedule

from .test_backbone_contract import FAMILIES, _tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    pipe, cond = _tiny(request.param)
    base = pipe(cond, seed=3, decode=False, plan=Engine(depth=pipe.model.depth))
    return request.param, pipe, cond, base


class BothHalves(GuidancePolicy):
    """The part-1 reference: never narrows the batch, returns the conditional logits from the cut on."""

    def cond_only(self, si: int) -> bool:
        return False

    def guidance(self, si, cond, uncond, t, inner):
        if si >= self._cond_only:
            return cond.clone()
        return inner(cond, uncond, t)


class RowSpy(Policy):
    """Records the batch rows of every K/V append (per scale) and the guidance sites seen."""

    order = 45

    def __init__(self) -> None:
        self.kv_rows: dict[int, set[int]] = {}
        self.sites: list[tuple[int, str, bool]] = []

    def kv_append(self, layer, k, v, **kw):
        self.kv_rows.setdefault(self.engine.si, set()).add(k.shape[0])
        return k, v

    def guidance(self, si, cond, uncond, t, inner):
        self.sites.append((si, self.engine.guidance_site, uncond is None))
        return inner(cond, uncond, t)


def _n(base) -> int:
    return len(base.stats["sizes"])


def _run(pipe, cond, *policies, **kw):
    return pipe(cond, seed=3, decode=False, plan=Engine(list(policies), depth=pipe.model.depth), **kw)


def test_noop_settings_are_bit_identical(case):
    _f, pipe, cond, base = case
    for pol in (GuidancePolicy(), GuidancePolicy(weights={}), GuidancePolicy(reuse_uncond=False)):
        assert torch.equal(_run(pipe, cond, pol).latent, base.latent)
    plan = AccelPlan(name="g", guidance={})
    assert plan.is_identity
    assert torch.equal(pipe(cond, seed=3, decode=False, plan=plan).latent, base.latent)


@pytest.mark.parametrize("cut", ["early", "late"])
def test_cond_only_equals_both_halves_with_conditional_logits(case, cut):
    family, pipe, cond, base = case
    k = 1 if cut == "early" else _n(base) - 2
    ref = _run(pipe, cond, BothHalves(cond_only_from=f"#{k}"))
    spy = RowSpy()
    real = _run(pipe, cond, GuidancePolicy(cond_only_from=f"#{k}"), spy)
    if cut == "early":
        assert not torch.equal(ref.latent, base.latent)  # the cut changes the image: guidance mattered
    # same image: bit-exact on CPU float32 for VAR / Infinity. HART's residual diffusion head draws the same
    # RNG stream, but its MLP runs on N rows instead of 2N, and the GEMM of another row count rounds the
    # last bits differently (~1e-5 on a latent of magnitude ~1).
    tol = 1e-4 if family == "hart" else 0.0
    torch.testing.assert_close(real.latent, ref.latent, rtol=0, atol=tol)
    # the guidance hook saw no unconditional half from the cut on, both halves before it
    logit_sites = [(si, none) for si, where, none in spy.sites if where == "logits"]
    assert logit_sites == [(si, si >= k) for si in range(_n(base))]


def test_rows_flops_and_kv_rows_halve(case):
    family, pipe, cond, base = case
    n, k = _n(base), _n(base) - 2
    spy = RowSpy()
    res = _run(pipe, cond, GuidancePolicy(cond_only_from=f"#{k}"), spy)
    B = len(cond)
    first = 1 if family == "hart" else 0  # HART's text prefill runs outside the hooks
    assert res.stats["rows_per_scale"] == {str(si): (B if si >= k else 2 * B) for si in range(first, n)}
    for si in range(first, n):
        want = base.stats["scale_flops"][str(si)] / (2 if si >= k else 1)
        assert res.stats["scale_flops"][str(si)] == pytest.approx(want)
    assert res.stats["total_flops"] < base.stats["total_flops"]
    assert res.stats["row_tokens_forwarded"] < res.stats["row_tokens_total"] == base.stats["row_tokens_forwarded"]
    assert res.stats["tokens_forwarded"] == base.stats["tokens_forwarded"]  # per-sequence budget unchanged
    # KV appends of the cut scales carry the conditional rows only (HART's text prefill appends too)
    assert spy.kv_rows == {si: {B if si >= k else 2 * B} for si in range(n)}
    e_full = Engine(depth=pipe.model.depth)
    e_cut = Engine([GuidancePolicy(cond_only_from=f"#{k}")], depth=pipe.model.depth)
    pipe(cond, seed=3, decode=False, plan=e_full)
    pipe(cond, seed=3, decode=False, plan=e_cut)
    assert e_full.recorder.kv_bytes
    for (si, layer), b in e_full.recorder.kv_bytes.items():
        assert e_cut.recorder.kv_bytes[(si, layer)] * (2 if si >= k else 1) == b


def test_kv_cache_keep_rows_drops_rows_for_good():
    from fastvar.layers.attention import KVCache

    for cap in (None, 16):
        c = KVCache(cap)
        k1, v1 = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 5)
        c.append(k1, v1)
        c.keep_rows(2)
        assert c.k.shape == (2, 2, 3, 5) and torch.equal(c.k, k1[:2]) and torch.equal(c.v, v1[:2])
        k2, v2 = torch.randn(2, 2, 4, 5), torch.randn(2, 2, 4, 5)
        kk, vv = c.append(k2, v2)
        assert torch.equal(kk, torch.cat((k1[:2], k2), 2)) and torch.equal(vv, torch.cat((v1[:2], v2), 2))
        if cap is not None:
            assert c._kbuf.shape[0] == 2  # the dropped rows' buffer is gone, not just hidden behind a view


def test_reuse_uncond_keeps_some_guidance(case):
    family, pipe, cond, base = case
    k = _n(base) - 2
    plain = _run(pipe, cond, GuidancePolicy(cond_only_from=f"#{k}"))
    for mode in ("direction", "uncond"):
        pol = GuidancePolicy(cond_only_from=f"#{k}", reuse_uncond=mode)
        a = _run(pipe, cond, pol)
        assert [si for si, where in pol.reused if where == "logits"] == list(range(k, _n(base)))
        assert not torch.equal(a.latent, plain.latent)
        b = _run(pipe, cond, GuidancePolicy(cond_only_from=f"#{k}", reuse_uncond=mode))
        assert torch.equal(a.latent, b.latent)


def test_reuse_direction_is_resized_difference():
    """At a cut scale the unconditional estimate is cond − resize(cond' − uncond') of the last full scale."""
    eng = Engine([GuidancePolicy(cond_only_from="#2", reuse_uncond=True)], depth=1)
    eng.begin([(1, 1), (2, 2), (4, 4)], 2)
    comb = lambda c, u, t: (1 + t) * c - t * u  # noqa: E731
    c1, u1 = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    eng.begin_scale(1, (2, 2))
    eng.guidance(1, c1, u1, 2.0, comb)
    eng.begin_scale(2, (4, 4))
    assert eng.cond_only(2)
    c2 = torch.randn(1, 16, 3)
    got = eng.guidance(2, c2, None, 2.0, comb)
    est = c2 - resize_token_map(c1 - u1, (2, 2), (4, 4))
    torch.testing.assert_close(got, comb(c2, est, 2.0))
    up = resize_token_map(torch.arange(4.0).view(1, 4, 1), (2, 2), (4, 4))
    assert up.shape == (1, 16, 1) and up.min() == 0 and up.max() == 3


@pytest.mark.parametrize("mode", ["direction", "uncond"])
def test_reuse_shrink_scales_the_reused_direction(mode):
    """shrink s: the guided result is that of uncond ≈ cond − s·(cond − estimate); s = 1 is the plain reuse."""
    comb = lambda c, u, t: (1 + t) * c - t * u  # noqa: E731
    c1, u1, c2 = torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.randn(1, 16, 3)
    got = {}
    for s in (1.0, 0.5, 0.0):
        eng = Engine([GuidancePolicy(cond_only_from="#2", reuse_uncond=mode, reuse_shrink=s)], depth=1)
        eng.begin([(1, 1), (2, 2), (4, 4)], 2)
        eng.begin_scale(1, (2, 2))
        eng.guidance(1, c1, u1, 2.0, comb)
        eng.begin_scale(2, (4, 4))
        got[s] = eng.guidance(2, c2, None, 2.0, comb)
    kept = (c1 - u1) if mode == "direction" else u1
    r = resize_token_map(kept, (2, 2), (4, 4))
    d = r if mode == "direction" else c2 - r
    torch.testing.assert_close(got[1.0], comb(c2, c2 - d, 2.0))
    torch.testing.assert_close(got[0.5], comb(c2, c2 - 0.5 * d, 2.0))
    torch.testing.assert_close(got[0.0], c2)
    assert not torch.allclose(got[0.5], got[1.0])


def test_weights_replace_the_backbone_weight(case):
    _f, pipe, cond, base = case
    n = _n(base)
    seen: list[float] = []

    class W(Policy):
        order = 40

        def guidance(self, si, c, u, t, inner):
            seen.append((si, t))
            return inner(c, u, t)

    _run(pipe, cond, GuidancePolicy(weights={f"#{n - 1}": 0.25}), W())
    assert (n - 1, 0.25) in seen


def test_infinity_cfg_insertion_layer_goes_through_the_hook():
    pipe, cond = _tiny("infinity")
    depth = pipe.model.depth
    base = pipe(cond, seed=3, decode=False, cfg_insertion_layer=-1)
    spy = RowSpy()
    res = pipe(cond, seed=3, decode=False, cfg_insertion_layer=-1, plan=Engine([spy], depth=depth))
    assert torch.equal(res.latent, base.latent)
    n = len(base.stats["sizes"])
    assert [(si, where) for si, where, _ in spy.sites] == [(si, f"hidden:{depth - 1}") for si in range(n)]
    ref = pipe(cond, seed=3, decode=False, cfg_insertion_layer=-1,
               plan=Engine([BothHalves(cond_only_from=f"#{n - 2}")], depth=depth))
    cut = pipe(cond, seed=3, decode=False, cfg_insertion_layer=-1,
               plan=Engine([GuidancePolicy(cond_only_from=f"#{n - 2}")], depth=depth))
    assert not torch.equal(ref.latent, base.latent)
    torch.testing.assert_close(cut.latent, ref.latent, rtol=0, atol=0)


def test_hart_diffusion_guidance_goes_through_the_hook():
    pipe, cond = _tiny("hart")
    base = pipe(cond, seed=3, decode=False)
    spy = RowSpy()
    res = _run(pipe, cond, spy)
    assert torch.equal(res.latent, base.latent)
    n = len(base.stats["sizes"])
    diff = [(si, none) for si, where, none in spy.sites if where == "diffusion"]
    steps = pipe.model.diffloss.gen_diffusion.num_timesteps
    assert diff == [(n - 1, False)] * steps
    spy2 = RowSpy()
    _run(pipe, cond, GuidancePolicy(cond_only_from=f"#{n - 1}"), spy2)
    assert [(si, none) for si, where, none in spy2.sites if where == "diffusion"] == [(n - 1, True)] * steps


# ------------------------------------------------------------------ plan field and preset
def test_plan_field_round_trip():
    d = {"cond_only_from": "13", "weights": {"16": 1.0}, "reuse_uncond": True}
    p = AccelPlan(name="g", guidance=d)
    assert isinstance(p.guidance, GuidanceConfig) and not p.is_identity
    q = AccelPlan.from_json(p.to_json())
    assert q == p and json.loads(p.to_json())["guidance"] == d
    assert p.guidance.reuse_mode == "direction"
    d2 = {**d, "reuse_shrink": 0.5}
    p2 = AccelPlan(name="g", guidance=d2)
    assert json.loads(p2.to_json())["guidance"] == d2 and AccelPlan.from_json(p2.to_json()) == p2


@pytest.mark.parametrize(
    "guidance, match",
    [
        ({"cond_only_from": "13y"}, "guidance.cond_only_from"),
        ({"weights": {"1 6": 1.0}}, "guidance.weights"),
        ({"weights": {"16": "high"}}, r"guidance.weights\['16'\]"),
        ({"weights": {"16": float("nan")}}, "finite"),
        ({"weights": [1.0]}, "guidance.weights must be an object"),
        ({"reuse_uncond": True}, "cond_only_from is not"),
        ({"cond_only_from": "#-2", "reuse_uncond": "maybe"}, "guidance.reuse_uncond"),
        ({"cond_only": "#-2"}, "unknown guidance field"),
        ({"cond_only_from": "#-2", "reuse_uncond": True, "reuse_shrink": 3}, "guidance.reuse_shrink"),
        ({"cond_only_from": "#-2", "reuse_uncond": True, "reuse_shrink": "half"}, "guidance.reuse_shrink"),
        ({"cond_only_from": "#-2", "reuse_shrink": 0.5}, "reuse_uncond is not"),
        (3, "plan field guidance must be an object"),
    ],
)
def test_plan_field_errors_name_the_field(guidance, match):
    with pytest.raises(PlanError, match=match):
        AccelPlan(name="bad", guidance=guidance)


def test_strict_plan_ref_missing_from_schedule_is_an_error_naming_the_field():
    eng = plan_engine(AccelPlan(name="g", guidance={"cond_only_from": "7"}), depth=2)
    with pytest.raises(PlanError, match="guidance.cond_only_from"):
        eng.begin([(1, 1), (2, 2), (4, 4)], 2)
    loose = plan_engine(AccelPlan(name="g", guidance={"cond_only_from": "7"}, strict=False), depth=2)
    loose.begin([(1, 1), (2, 2), (4, 4)], 2)
    assert not loose.cond_only(2)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_cut_preset_follows_every_schedule(family):
    from fastvar.schedules_infinity import infinity_schedule

    scheds = {
        "var": [Schedule.square((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)), Schedule.square((1, 2, 3, 4, 6, 9, 13, 18, 24, 32))],
        "infinity": [Schedule(infinity_schedule("1:1", pn)) for pn in ("0.25M", "1M", "2K")],
        "hart": [Schedule.square((1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))],
    }[family]
    for sched in scheds:
        p = get_preset("cfg-cut", family, depth=16, schedule=sched)
        assert p.guidance is not None and p.guidance.cond_only_from is not None
        eng = plan_engine(p, 16)
        eng.begin(sched.sizes, 2)
        cut = [si for si in range(len(sched)) if eng.policy(GuidancePolicy).cond_only(si)]
        assert cut == [len(sched) - 2, len(sched) - 1], (family, sched.sizes)
    assert resolve_scale_ref(scheds[0], "#-1") == len(scheds[0]) - 1


def test_cfg_cut_preset_runs_on_the_pipelines(case):
    family, pipe, cond, base = case
    res = pipe(cond, seed=3, decode=False, plan="cfg-cut")
    n, B = _n(base), len(cond)
    assert res.stats["plan"] == "cfg-cut"
    assert res.stats["rows_per_scale"][str(n - 1)] == B and res.stats["rows_per_scale"][str(n - 3)] == 2 * B
    assert res.stats["total_flops"] < base.stats["total_flops"]


def test_cli_check_embedded_takes_a_plan_and_plan_prints_the_guidance_field(tmp_path, capsys):
    from fastvar.cli import main

    assert main(["check-embedded", "--preset", "warp-speed"]) == 2  # refused before any model loads
    bad = tmp_path / "bad.json"
    bad.write_text('{"guidance": {"cond_only_from": "13y"}}')
    assert main(["check-embedded", "--plan", str(bad)]) == 2
    assert "guidance.cond_only_from" in capsys.readouterr().err
    assert main(["plan", "cfg-cut", "--family", "hart"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance"]["cond_only_from"] == "#-2"
    assert main(["plan", "--list"]) == 0
    assert "cfg-cut" in capsys.readouterr().out


def test_pruned_scale_after_the_cut_restores_from_a_both_halves_cache(case):
    # the restore cache is filled at a scale that forwarded both CFG halves; the pruned scale after the cut
    # forwards the conditional half only and must restore from the cache's conditional rows
    from fastvar.accel.pruning import plan_policies

    family, pipe, cond, base = case
    n = _n(base)
    plan = AccelPlan(name="p", keep={f"#{n - 1}": 0.5}, cache_scale=f"#{n - 2}")
    ref = _run(pipe, cond, *plan_policies(plan), BothHalves(cond_only_from=f"#{n - 1}"))
    real = _run(pipe, cond, *plan_policies(plan), GuidancePolicy(cond_only_from=f"#{n - 1}"))
    tol = 1e-4 if family == "hart" else 0.0
    torch.testing.assert_close(real.latent, ref.latent, rtol=0, atol=tol)
    assert real.stats["rows_per_scale"][str(n - 1)] == len(cond)

"""Presets follow the schedule they run on: every preset, on every family and on many schedules (official
budgets, 2K, non-square aspect ratios, VAR 16/32 and custom last sides, embedded models' custom schedules,
several depths) resolves to a plan that changes something, or fails with a one-line PlanError."""

from __future__ import annotations

import pytest

from fastvar.accel import AccelPlan, PlanError
from fastvar.accel.presets import NO_OP_PRESETS, PRESETS, get_preset, preset_for_model
from fastvar.accel.stats import FlopDims, estimate_flops
from fastvar.schedules import VAR_PATCH_NUMS, Schedule
from fastvar.schedules_infinity import infinity_schedule

from ._tiny_var import tiny_var_pipe

HART_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)

SCHEDULES: list[tuple[str, str, Schedule]] = [
    ("var", "256", Schedule.square(VAR_PATCH_NUMS[256])),
    ("var", "512", Schedule.square(VAR_PATCH_NUMS[512])),
    ("var", "last-24", Schedule.square((1, 2, 4, 6, 9, 13, 18, 24))),
    ("var", "last-8", Schedule.square((1, 2, 3, 4, 6, 8))),
    ("hart", "1024", Schedule.square(HART_1024)),
    ("hart", "custom", Schedule.square((1, 2, 3, 4, 6, 8))),
    ("infinity", "embedded-t2i", Schedule.square((1, 2, 3, 4, 6, 8, 11, 16))),
]
for _pn in ("0.06M", "0.25M", "0.60M", "1M", "2K"):
    for _aspect in ("1:1", "4:3", "1:2", "5:2"):
        SCHEDULES.append(("infinity", f"{_pn}-{_aspect}", infinity_schedule(_aspect, _pn)))


def _index(schedule: Schedule, ref: str) -> int:
    """A scale ref's index, including "#-k" (k-th from the end), which guidance/KV/cache fields use."""
    r = ref.strip().lower()
    if r.startswith("#-"):
        i = len(schedule) - int(r[2:])
        if not 0 <= i < len(schedule):
            raise ValueError(f"{ref} is outside the schedule")
        return i
    return schedule.resolve(r)


def changes(plan: AccelPlan, schedule: Schedule, depth: int) -> list[str]:
    """What a plan changes on a schedule, from its data (an empty list: a no-op)."""
    out = []
    r = plan.resolve(schedule, depth)
    if r.keep and r.layers and r.branches:
        out.append(f"prunes {sorted(r.keep)} in layers {r.layers.start}-{r.layers.stop}")
    if r.skip:
        out.append(f"skips {sorted(r.skip)}")
    if plan.cache is not None:
        cache, skip = plan.cache.resolve_stages(schedule)
        reuse = [s for s in skip if s not in r.skip]
        if reuse and plan.cache.threshold < 1.0:
            out.append(f"may reuse cached features at {reuse}")
    g = getattr(plan, "guidance", None)
    if g is not None:
        if g.cond_only_from is not None:
            i = _index(schedule, g.cond_only_from)
            if any(s not in r.skip for s in range(i, len(schedule))):
                out.append(f"conditional only from {i}")
        out += [f"guidance weight at {_index(schedule, k)}" for k in g.weights]
    kv = getattr(plan, "kv", None)
    if kv is not None and not kv.is_identity:
        out += [f"kv keeps {v} at {_index(schedule, k)}" for k, v in kv.keep.items() if v < 1.0]
    return out


CASES = [(name, fam, label, sched, depth) for name in PRESETS for fam, label, sched in SCHEDULES
         for depth in (6, 32)]


@pytest.mark.parametrize("name, family, label, schedule, depth", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-d{c[4]}" for c in CASES])
def test_every_preset_changes_something_or_says_why(name, family, label, schedule, depth):
    try:
        plan = get_preset(name, family, depth=depth, schedule=schedule)
    except PlanError as e:  # a schedule too short for the preset: one line naming the preset and the schedule
        msg = str(e)
        assert "\n" not in msg and name in msg and str(len(schedule)) in msg
        assert len(schedule) < 6, f"{name} refused a {len(schedule)}-scale schedule: {msg}"
        return
    assert plan.name == name
    did = changes(plan, schedule, depth)
    if name in NO_OP_PRESETS:
        assert did == [] and plan.is_identity
    else:
        assert did, f"preset {name} is a no-op on {family} {label} ({schedule.describe()})"
    AccelPlan.from_json(plan.to_json())  # every preset survives the JSON round trip


def test_published_tables_where_the_official_code_applies_them():
    inf1m = get_preset("fastvar", "infinity", depth=32, schedule=infinity_schedule("1:1", "1M"))
    assert inf1m.keep == {"32": 0.6, "40": 0.5} and set(inf1m.skip) == {"48", "64"}
    assert inf1m.layers == (3, 28) and inf1m.cache_scale == "24"
    inf025 = get_preset("fastvar", "infinity", depth=32, schedule=infinity_schedule("1:1", "0.25M"))
    assert inf025.keep == {"32": 0.6} and inf025.skip == ()  # the official code's table at 0.25M
    hart = get_preset("fastvar", "hart", schedule=Schedule.square(HART_1024))
    assert hart.keep == {"48": 0.5, "64": 0.25} and hart.cache_scale == "36" and hart.layers is None
    var = get_preset("fastvar", "var", depth=16, schedule=Schedule.square(VAR_PATCH_NUMS[256]))
    assert var.keep == {"13": 0.6, "16": 0.5} and var.cache_scale == "10" and var.skip == ()
    var512 = get_preset("fastvar", "var", depth=16, schedule=Schedule.square(VAR_PATCH_NUMS[512]))
    assert var512.keep == {"24": 0.6, "32": 0.5} and var512.cache_scale == "18"


def test_2k_prunes_and_skips_the_largest_scales_not_the_middle():
    sched = infinity_schedule("1:1", "2K")
    plan = get_preset("fastvar", "infinity", depth=32, schedule=sched)
    r = plan.resolve(sched, 32)
    n = len(sched)
    assert r.skip == frozenset({n - 2, n - 1})  # 96² and 128², the two largest
    assert set(r.keep) == {n - 4, n - 3}  # 48² and 64², directly below them
    assert max(r.keep) < min(r.skip) and r.cache_si == n - 5
    # on the full-size Infinity-2B dimensions the plan keeps under a quarter of the FLOPs (>= 4x)
    dims = FlopDims(width=2048, ffn_hidden=8192, vocab_out=64, cross_len=24, branches=("attn", "cross", "ffn"))
    sizes = sched.sizes
    dense = {(si, layer, b): (h * w, h * w) for si, (h, w) in enumerate(sizes) for layer in range(32)
             for b in dims.branches}
    planned = {}
    for (si, layer, b), (t, _) in dense.items():
        if si in r.skip:
            continue
        planned[(si, layer, b)] = (t, r.n_keep(si, t) if r.prunes(si, layer, b) else t)
    ratio = estimate_flops(planned, sizes, dims, 2)["total_flops"] / estimate_flops(dense, sizes, dims, 2)["total_flops"]
    assert ratio < 0.25


def test_other_aspect_ratios_use_the_template_positions():
    for aspect in ("4:3", "1:2", "3:1"):
        sched = infinity_schedule(aspect, "1M")
        plan = get_preset("fastvar", "infinity", depth=32, schedule=sched)
        r = plan.resolve(sched, 32)
        assert set(r.keep) == {9, 10} and r.skip == frozenset({11, 12})
        s025 = infinity_schedule(aspect, "0.25M")
        r025 = get_preset("fastvar", "infinity", depth=32, schedule=s025).resolve(s025, 32)
        assert set(r025.keep) == {9} and not r025.skip


def test_custom_infinity_schedule_gets_the_var_rule_with_cross_attention():
    sched = Schedule.square((1, 2, 3, 4, 6, 8, 11, 16))
    plan = get_preset("fastvar", "infinity", depth=6, schedule=sched)
    assert plan.keep == {"11": 0.6, "16": 0.5} and plan.skip == () and "cross" in plan.branches


def test_layer_band_scales_with_depth():
    sched = infinity_schedule("1:1", "1M")
    # Infinity's templates keep the official code's literal blocks 3-27 (what its FastVAR code prunes on any depth)
    assert get_preset("fastvar", "infinity", depth=16, schedule=sched).layers == (3, 28)
    custom = Schedule.square((1, 2, 3, 4, 6, 8, 11, 16))
    assert get_preset("fastvar", "infinity", depth=16, schedule=custom).layers == (2, 14)
    assert get_preset("fastvar", "infinity", depth=3, schedule=sched).layers == (0, 3)  # never an empty band
    assert get_preset("fastvar", "var", depth=30).layers == (3, 26)


def test_preset_for_model_reads_the_backbone_contract():
    class Model:
        family, depth = "infinity", 32
        schedule = infinity_schedule("1:1", "2K")

    assert preset_for_model("fastvar", Model).skip == ("96", "128")
    Model.schedule = None  # no schedule chosen yet: the family's default (1M)
    assert preset_for_model("fastvar", Model).skip == ("48", "64")


def test_short_schedule_and_unknown_last_side_fail_in_one_line():
    with pytest.raises(PlanError, match=r"needs at least \d+ scales; this schedule has 3"):
        get_preset("fastvar-strong", "infinity", schedule=Schedule.square((1, 2, 4)))
    with pytest.raises(PlanError, match="no default VAR schedule ending at 24"):
        get_preset("fastvar", "var", last_side=24)


def test_turbo_runs_all_its_policies_on_a_tiny_var():
    """turbo through the run primitive: its caching calibrated first, then pruning, the guidance cut and
    caching all act (fewer tokens, conditional-only rows at the last three scales, reused features)."""
    import torch

    from fastvar.accel.caching import CachePolicy
    from fastvar.eval.run import run_plans

    sides = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    pipe = tiny_var_pipe(sides)
    none, turbo = run_plans(pipe, [0, 1, 2], [("none", None), ("turbo", "turbo")], repeats=1, warmup=0, decode=False)
    assert turbo.calibrated and turbo.calibrated > 0
    assert turbo.stats["tokens_forwarded"] < none.stats["tokens_forwarded"]
    assert turbo.stats["total_flops"] < 0.6 * none.stats["total_flops"]
    cache = turbo.hooks.policy(CachePolicy)
    assert sum(map(sum, cache.lookups.values())) > 0  # the cache policy decided at the pruned scale
    assert not torch.equal(turbo.latent, none.latent)

"""Named plans. A preset is a function of the backbone's family, the schedule it runs on and its depth
(:func:`preset_for_model` reads them from the model: the ``Backbone`` contract), so one name means the
same *intent* on every backbone, resolution and aspect ratio, and is rebuilt for every generation's
schedule (Infinity changes schedule with ``--pn`` / ``--aspect``).

How a preset follows the schedule (the FastVAR principle: the largest scales are the cost and their
tokens have mostly converged, so those are the ones pruned, and the largest of all are skipped
outright where the paper skips them). Every table below is written as *positions counted back from the
end of the schedule* (``-1`` = the last, largest scale):

- **Infinity** (paper/official code, 1024² 1:1: keep 60 % at 32², 50 % at 40², skip 48² and 64², cache
  from 24², blocks 3–27 of 32): positions -4 (keep 60 %), -3 (50 %), -2 and -1 skipped, cache -5.
  Infinity's official budgets (0.25M, 0.60M, 1M) are prefixes of one 13-scale template per aspect ratio,
  and the official code names 1:1 template scales (32, 40, 48, 64 = template positions -4…-1), so on an
  official budget the positions count back from the *template's* end: 1:1 0.25M (…, 24, 32) keeps 60 % of
  32² and skips nothing, 0.60M (…, 40, 48) prunes 32²/40² and skips 48², 1M is the published table — exactly
  the official code — and every other aspect ratio of those budgets gets the same template positions (the
  official code keys on widths and silently does nothing on most of them). Schedules that are not such a
  prefix count back from their own last scale: the zero-shot 2K schedule (…, 48, 64, 96, 128) prunes 48²
  and 64² and skips 96² and 128² (not 48²/64² in the middle while 96²/128² run in full), 0.06M and custom
  schedule likewise. A custom (non-template) Infinity schedule, e.g. embedded-t2i's 1…16, gets VAR's
  table below on its own largest scales (cross-attention pruned too): the 1024² table is written for
  Infinity's templates.
- **HART** (paper, 1024²: keep 50 % at 48², 25 % at 64², cache 36², every block): positions -2 (50 %),
  -1 (25 %), cache -3 — the published table on HART 1024, the same positions on any other schedule.
- **VAR** (the paper has no VAR row; our analogue): prune -2 (60 %) and -1 (50 %), cache -3 — on VAR 256
  (…, 10, 13, 16) and 512 (…, 18, 24, 32) as before, and on any other VAR schedule (other last sides,
  the embedded model's) the same positions.

Layer bands: on Infinity's templates the official code's literal blocks 3–27 (any depth above 3, so the
official tables stay exact); elsewhere Infinity's published 3–27 of 32 blocks as a fraction of the depth,
``round(3·d/32) … round(28·d/32)`` (VAR, custom Infinity schedules); HART prunes every block. A schedule too short
for a preset's table is a one-line :class:`PlanError`; no preset resolves to a plan that changes
nothing (``none`` and ``identity`` are no-ops by definition).

Intent of each name:
- ``none``: no plan (everything forwarded); the reference for every comparison.
- ``identity``: the engine's hooks run and record, but keep every token; measures the engine's overhead.
- ``fastvar``: the tables above.
- ``fastvar-mild``: fastvar's pruned scales at 80 % / 70 %, nothing skipped; for when fidelity matters more.
- ``fastvar-strong``: one more scale pruned (60 %), and 40 % / 30 % (Infinity) or 40 % / 25 % of the next
  two; Infinity still skips its last two.
- ``skip-last``: scale skipping only: the largest scale is not forwarded (Infinity: the two largest),
  always counted from the schedule's own end.
- ``cfg-cut``: classifier-free guidance cut: the last scales of the schedule (by position, ``#-2`` on) forward
  the conditional half of the batch only (see :mod:`fastvar.accel.guidance`).
- ``turbo``: speed first: pruning (VAR/HART: the last three/two scales at 60–25 %, every block; Infinity:
  fastvar-strong's three scales plus its two skipped ones), conditional-only guidance from the restore-cache
  scale on (guided by the reused direction, halved), and feature caching at the pruned scales (calibrated data
  needed: the run primitive and ``fastvar generate`` calibrate it first); see :func:`_turbo`.
- ``kv-compress``: KV-cache compression with scale-aware budgets (ScaleKV's drafters/refiners, HACK's
  per-head subsets), by position: see :func:`_kv_compress`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..schedules import VAR_PATCH_NUMS, Schedule
from .plan import AccelPlan, PlanError

FAMILIES = ("var", "infinity", "hart")

HART_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
_INFINITY_PN_BY_SIDE = {16: "0.06M", 32: "0.25M", 48: "0.60M", 64: "1M", 128: "2K"}


def _band(depth: int) -> tuple[int, int]:
    """The published Infinity block band 3–27 of 32 as a fraction of ``depth`` (at least one block)."""
    a = round(3 * depth / 32)
    return (a, max(round(28 * depth / 32), a + 1))


_var_layers = _band  # the old name (VAR used the band first)


def default_schedule(family: str, last_side: int, sides: tuple[int, ...] | None = None) -> Schedule:
    """The schedule a family's preset is written for when no model is at hand (``fastvar plan``):
    VAR 256/512 by last side 16/32 (``sides``: a custom VAR schedule's sides), the 1:1 Infinity budget
    ending at ``last_side`` (16 0.06M, 32 0.25M, 48 0.60M, 64 1M, 128 2K), HART 1024."""
    if family not in FAMILIES:
        raise PlanError(f"unknown model family {family!r}; known: {FAMILIES}")
    if sides:
        return Schedule.square(sides)
    if family == "var":
        by_side = {pn[-1]: pn for pn in VAR_PATCH_NUMS.values()}
        if last_side not in by_side:
            raise PlanError(f"no default VAR schedule ending at {last_side} (VAR 256/512 end at 16/32); pass the "
                            "model's schedule (preset_for_model) or its sides")
        return Schedule.square(by_side[last_side])
    if family == "hart":
        if last_side != HART_1024[-1]:
            raise PlanError(f"no default HART schedule ending at {last_side} (HART 1024 ends at 64); pass the "
                            "model's schedule (preset_for_model)")
        return Schedule.square(HART_1024)
    if last_side not in _INFINITY_PN_BY_SIDE:
        raise PlanError(f"no 1:1 Infinity budget ends at {last_side} (sides {sorted(_INFINITY_PN_BY_SIDE)}); pass "
                        "the model's schedule (preset_for_model)")
    from ..schedules_infinity import infinity_schedule

    return infinity_schedule("1:1", _INFINITY_PN_BY_SIDE[last_side])


@functools.lru_cache(maxsize=1)
def _infinity_official_prefixes() -> dict[tuple[tuple[int, int], ...], int]:
    """Schedules of Infinity's official 0.25M/0.60M/1M budgets (every aspect ratio) -> template length."""
    from ..schedules_infinity import INFINITY_ASPECTS, infinity_schedule

    out = {}
    for aspect in INFINITY_ASPECTS:
        full = infinity_schedule(aspect, "1M").sizes
        for pn in ("0.25M", "0.60M", "1M"):
            out[infinity_schedule(aspect, pn).sizes] = len(full)
    return out


def _rule(family: str, schedule: Schedule) -> str:
    """Which family's table a schedule follows: Infinity templates Infinity's, custom Infinity schedules VAR's."""
    if family == "infinity":
        from ..schedules_infinity import is_template_schedule

        return "infinity" if is_template_schedule(schedule) else "var"
    return family


def _anchor(family: str, schedule: Schedule) -> int:
    """Where position -1 of the tables sits, as an index + 1: the template end on official Infinity budgets,
    the schedule's own end otherwise (see the module docstring)."""
    if family == "infinity":
        return _infinity_official_prefixes().get(tuple(schedule.sizes), len(schedule))
    return len(schedule)


class _Layout:
    """Scale refs for positions counted back from an anchor; positions past the schedule's end are dropped."""

    def __init__(self, name: str, family: str, schedule: Schedule, anchor: int | None = None) -> None:
        self.name, self.family, self.schedule = name, family, schedule
        self.n = len(schedule)
        self.anchor = _anchor(family, schedule) if anchor is None else anchor
        self.square = all(h == w for h, w in schedule.sizes)

    def index(self, pos: int) -> int | None:
        i = self.anchor + pos
        if i < 0:
            raise PlanError(f"preset {self.name!r} ({self.family}) needs at least {-pos + 1} scales; this schedule "
                            f"has {self.n} ({self.schedule.describe()}); use a longer schedule or a custom plan")
        return i if i < self.n else None

    def ref(self, pos: int) -> str | None:
        i = self.index(pos)
        if i is None:
            return None
        h, w = self.schedule[i]
        return str(h) if self.square else f"{h}x{w}"

    def keep(self, table: dict[int, float]) -> dict[str, float]:
        return {r: v for p, v in table.items() if (r := self.ref(p)) is not None}

    def refs(self, positions) -> tuple[str, ...]:
        return tuple(r for p in positions if (r := self.ref(p)) is not None)


# The tables, as positions from the end (see the module docstring), keyed by the rule a schedule follows
# (:func:`_rule`). Infinity's skip count is the paper's (its last two scales); VAR and HART skip nothing.
_TABLES = {
    "infinity": dict(keep={-4: 0.6, -3: 0.5}, skip=(-2, -1), cache=-5),
    "hart": dict(keep={-2: 0.5, -1: 0.25}, skip=(), cache=-3),
    "var": dict(keep={-2: 0.6, -1: 0.5}, skip=(), cache=-3),
}
_STRONG = {
    "infinity": dict(keep={-5: 0.6, -4: 0.4, -3: 0.3}, cache=-6),
    "hart": dict(keep={-3: 0.6, -2: 0.4, -1: 0.25}, cache=-4),
    "var": dict(keep={-3: 0.6, -2: 0.4, -1: 0.25}, cache=-4),
}
_BRANCHES = {"infinity": ("attn", "cross", "ffn"), "hart": ("attn", "ffn"), "var": ("attn", "ffn")}


def _layers(rule: str, depth: int) -> tuple[int, int] | None:
    """Pruned block range for a table rule: HART every block; Infinity's templates the official code's literal
    blocks 3-27 whatever the depth (what its FastVAR code does, so the official tables stay bit-exact on every
    Infinity depth; below 4 blocks that band is empty and the scaled band is used instead, so the preset is
    never silently a no-op); VAR and custom Infinity schedules the same band as a fraction of the depth."""
    if rule == "hart":
        return None
    return (3, 28) if rule == "infinity" and depth > 3 else _band(depth)


def _table_plan(name: str, family: str, schedule: Schedule, depth: int, keep: dict[int, float],
                skip: tuple[int, ...], cache_pos: int, description: str, anchor: int | None = None,
                **extra) -> AccelPlan:
    """A plan from a table (positions from the anchor); ``cache_pos``: the position of the restore cache."""
    lay = _Layout(name, family, schedule, anchor)
    for p in (cache_pos, *keep, *skip):
        lay.index(p)  # too short a schedule -> one-line error
    kept = lay.keep(keep)
    return AccelPlan(
        name=name, keep=kept, skip=lay.refs(skip), layers=_layers(_rule(family, schedule), depth), branches=_BRANCHES[family],
        cache_scale=lay.ref(cache_pos) if kept else None, interp="area", strict=False, description=description, **extra,
    )


def _fastvar(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    rule = _rule(family, schedule)
    t = _TABLES[rule]
    what = {"infinity": "FastVAR paper settings (Infinity 1024² table, by position)",
            "hart": "FastVAR paper settings (HART 1024² table, by position)",
            "var": "FastVAR analogue: prune the two largest scales"}[rule]
    return _table_plan("fastvar", family, schedule, depth, t["keep"], t["skip"], t["cache"], what)


def _mild(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    t = _TABLES[_rule(family, schedule)]
    lo, hi = sorted(t["keep"])
    return _table_plan("fastvar-mild", family, schedule, depth, {lo: 0.8, hi: 0.7}, (), t["cache"],
                       "fastvar's scales, more tokens kept, nothing skipped")


def _strong(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    rule = _rule(family, schedule)
    s = _STRONG[rule]
    return _table_plan("fastvar-strong", family, schedule, depth, s["keep"], _TABLES[rule]["skip"], s["cache"],
                       "prune one more scale and keep fewer tokens")


def _skip_last(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    lay = _Layout("skip-last", family, schedule, anchor=len(schedule))  # always the schedule's own end
    positions = (-2, -1) if _rule(family, schedule) == "infinity" else (-1,)
    lay.index(positions[0] - 1)  # the first scale is never skipped
    return AccelPlan(name="skip-last", skip=lay.refs(positions), strict=False, description="scale skipping only")


CFG_CUT_FROM = "#-2"
"""Where ``cfg-cut`` starts forwarding the conditional half only: a position counted from the end of the
schedule (the last two scales: 62 % of the tokens of VAR's 16² schedule), so it follows every schedule
and never silently becomes a no-op. Chosen on the embedded model (seeds 0/1, benchmarks/embedded_cfgcut.json)."""


def _cfg_cut(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    return AccelPlan(
        name="cfg-cut", guidance={"cond_only_from": CFG_CUT_FROM}, strict=False,
        description="conditional half only (no CFG) at the last two scales of any schedule",
    )


TURBO = {
    "var": dict(keep={-2: 0.5, -1: 0.25}, skip=(), cache=-3, all_layers=True),
    "hart": dict(keep={-3: 0.6, -2: 0.4, -1: 0.25}, skip=(), cache=-4, all_layers=True),
    "infinity": dict(keep={-5: 0.6, -4: 0.4, -3: 0.3}, skip=(-2, -1), cache=-6, all_layers=False),
}
"""turbo's pruning and skipping per rule, as positions from the schedule's own end (its caching:
:func:`fastvar.accel.cache_presets.turbo_cache`). ``all_layers``: prune every block, not the 3/32–28/32 band."""

TURBO_REUSE = "direction"
"""turbo's guidance at conditional-only scales: keep guiding with the last two-half scale's direction
(cond − uncond, resized), which kept more fidelity than dropping guidance on the embedded model."""

TURBO_SHRINK = 0.5
"""turbo's ``reuse_shrink``: the reused direction is scaled by 0.5. It comes from a smaller scale, so it only
estimates the current scale's direction, and halving that estimate lowers its expected error. On the embedded
model (calibration seeds 0-7) SSIM went from 0.893 to 0.899 at the same FLOPs; held-out numbers are in
benchmarks/embedded_turbo.json."""


def _turbo(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    """Pruning + skipping + feature caching + the guidance cut stacked, by positions from the schedule's end.

    The guidance cut starts at turbo's restore-cache scale (the scale before the first pruned one), so every
    pruned scale also runs its conditional half only, guided by the reused direction (:data:`TURBO_REUSE`).
    Tuned on the embedded model (VAR, seeds 0/1; benchmarks/embedded_turbo.json) for the most speed at
    SSIM >= 0.90 against the baseline; Infinity keeps the paper's two skipped scales and prunes harder below.
    """
    from .cache_presets import turbo_cache

    rule = _rule(family, schedule)
    tb = TURBO[rule]
    plan = _table_plan("turbo", family, schedule, depth, tb["keep"], tb["skip"], tb["cache"],
                       "pruning + skipping + caching + cfg-cut stacked (speed first)", anchor=len(schedule),
                       cache=turbo_cache(rule, schedule),
                       guidance={"cond_only_from": f"#{tb['cache']}", "reuse_uncond": TURBO_REUSE,
                                 "reuse_shrink": TURBO_SHRINK})
    if tb["all_layers"]:
        plan.layers = None
    return plan


KV_COMPRESS_KEEP = {"#-3": 0.3, "#-2": 0.1}
"""kv-compress: the fractions of the third- and second-to-last scales that the drafter layers keep (the
refiners keep none of them, nobody keeps the last scale, every earlier scale is kept whole)."""

KV_DRAFTER_FRACTION = 1 / 6
"""kv-compress: the first ``round(depth / 6)`` blocks (at least one) are the drafters. A documented proxy
for ScaleKV's per-scale identification: on the embedded model the share of attention on earlier scales
(``fastvar.accel.kv.history_shares``) is largest in block 0 at every scale from the fourth on and mostly
falls with depth; ``fastvar.accel.kv.calibrate_drafters`` measures a model's own drafters for a plan file."""


def _kv_compress(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    """Scale-aware KV budgets by position from the schedule's end (so they follow every schedule).

    Measured on the embedded model (seeds 0/1; benchmarks/embedded_kv.json): the history of the large
    late scales is cheap to drop (keeping 10 % of the 13² scale alone: SSIM 0.98), that of the small
    early scales is not (30 % of scales 4²…8²: SSIM 0.83), so the budget goes to the early scales whole
    and to the drafters' share of the two largest earlier scales; the last scale is read by no later
    scale and is not stored. Held KV bytes: 4.2x fewer on VAR's 16² schedule, ~4x on Infinity 1M.
    """
    if len(schedule) < 4:
        raise PlanError(f"kv-compress needs a schedule of at least 4 scales (it compresses the third- and "
                        f"second-to-last); this one has {len(schedule)}")
    drafters = list(range(max(1, round(depth * KV_DRAFTER_FRACTION))))
    return AccelPlan(
        name="kv-compress", strict=False,
        kv={"keep": dict(KV_COMPRESS_KEEP), "refiner_keep": 0.0, "drafters": drafters, "keep_last": False,
            "per_head": True, "score": "mix"},
        description="KV cache: drafters keep 30 %/10 % of the 3rd/2nd-to-last scales, refiners none, last scale unstored",
    )


def _none(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    return AccelPlan(name="none", description="no plan: the official computation")


def _identity(family: str, schedule: Schedule, depth: int) -> AccelPlan:
    return AccelPlan(name="identity", description="the engine's hooks active but keeping everything (overhead check)")


PresetFn = Callable[[str, Schedule, int], AccelPlan]
"""``fn(family, schedule, depth) -> AccelPlan``: what every entry of :data:`PRESETS` is."""

PRESETS: dict[str, PresetFn] = {
    "none": _none,
    "identity": _identity,
    "fastvar": _fastvar,
    "fastvar-mild": _mild,
    "fastvar-strong": _strong,
    "skip-last": _skip_last,
    "cfg-cut": _cfg_cut,
    "turbo": _turbo,
    "kv-compress": _kv_compress,
}

NO_OP_PRESETS = ("none", "identity")
"""Presets that change nothing by definition; every other preset changes something on every schedule."""


DEFAULT_LAST_SIDE = {"var": 16, "infinity": 64, "hart": 64}


def get_preset(name: str, family: str = "var", last_side: int | None = None, depth: int = 16,
               sides: tuple[int, ...] | None = None, schedule: Schedule | None = None) -> AccelPlan:
    """The named plan for a family, a schedule and a depth. Without ``schedule``, the family's default
    schedule ending at ``last_side`` (see :func:`default_schedule`; None: VAR 256, Infinity 1M, HART 1024;
    ``sides``: a custom schedule's sides)."""
    if family not in FAMILIES:
        raise PlanError(f"unknown model family {family!r}; known: {FAMILIES}")
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    if schedule is None:
        side = DEFAULT_LAST_SIDE[family] if last_side is None else int(last_side)
        schedule = default_schedule(family, side, tuple(sides) if sides else None)
    elif not isinstance(schedule, Schedule):
        schedule = Schedule(tuple((int(h), int(w)) for h, w in schedule))
    return PRESETS[name](family, schedule, int(depth))


def preset_for_model(name: str, model) -> AccelPlan:
    """The named plan for a model object (a ``Backbone``: its family, schedule and depth)."""
    sched = getattr(model, "schedule", None)
    if sched is None:
        sched = default_schedule(model.family, DEFAULT_LAST_SIDE[model.family])
    return get_preset(name, model.family, depth=model.depth, schedule=sched)

"""One run primitive: a pipeline under several plans, N times each, interleaved, after a warm-up.

Why one: ``fastvar bench``, ``generate --compare-configs`` and ``generate --benchmark`` each had a
timing loop of their own, with their own warm-up, order and idea of what a time covers, so their
numbers did not compare. Here, for all of them (and ``fastvar tune``):

- every plan's hooks are built once, before anything is timed (:func:`prepare_hooks`): no plan or
  ``"none"`` is the plain model (identity hooks), a preset name or plan is the one engine
  :func:`fastvar.accel.plan_engine` builds, a hooks object runs as given. A caching plan in inference
  mode without similarity data is calibrated first on the same conditions, seed and sampling
  (calibration output equals the baseline's, so this costs one generation and no fidelity);
- ``warmup`` rounds run every plan once, then ``repeats`` rounds run A, B, C, A, B, C, … so machine noise
  spreads evenly over the plans and a speedup is a property of the plan, not of when it ran;
- a time is the pipeline's transformer time (decoding is done once, afterwards, untimed: its cost does
  not depend on the plan): ``perf_counter`` on CPU, one pair of CUDA events and one synchronisation per
  generation on CUDA (:class:`fastvar.pipelines.common.PlanRunner`);
- statistics, latent and decoded images are the first timed round's.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import validate
from ..accel import AccelPlan, plan_engine, preset_for_model
from ..accel.engine import Engine, P
from ..accel.hooks import IDENTITY, Hooks

RunPlan = AccelPlan | str | Hooks | None
"""What a plan entry may be: None or "none" (the plain model), a preset name, a plan, or a hooks object."""


@dataclass
class PlanResult:
    """One plan's runs: every timed round's seconds, and the first timed round's statistics and output."""

    name: str
    hooks: Hooks
    seconds: list[float] = field(default_factory=list)  # per timed round, on the run's clock
    wall_seconds: list[float] = field(default_factory=list)  # per timed round, the pipeline's own (wall) time
    stats: dict = field(default_factory=dict)  # the first chunk's statistics of the first timed round
    latent: Tensor | None = None
    images: Tensor | None = None  # decoded latent (decode=True), (N, 3, H, W) in [0, 1], CPU
    scale_seconds: list[dict[str, float]] = field(default_factory=list)  # per timed round (engines only)
    cache: dict | None = None  # the CachePolicy's statistics after the first timed round (None: no caching)
    memory: dict[str, int] = field(default_factory=dict)  # peak bytes held by the feature / pruning caches
    calibrated: int | None = None  # (layer, stage, branch) similarities of the calibration run, if one ran

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def engine(self) -> Engine | None:
        return self.hooks if isinstance(self.hooks, Engine) else None

    def policy(self, kind: type[P]) -> P | None:
        """The engine's policy of class ``kind`` (None without an engine or without that policy)."""
        return self.hooks.policy(kind) if isinstance(self.hooks, Engine) else None


def needs_calibration(plan: AccelPlan | None) -> bool:
    """A caching plan in inference mode with neither a similarity file nor calibration of its own."""
    c = getattr(plan, "cache", None)
    return c is not None and not c.calibration and c.sim_path is None and bool(c.skip_stages)


def resolve_plan(model, plan: RunPlan) -> AccelPlan | Hooks:
    """``plan`` as a plan or hooks object for ``model`` (IDENTITY for None / "none", a preset name resolved
    for the model's family, schedule and depth); a one-line error for anything else, before anything runs."""
    if isinstance(plan, Hooks):
        return plan
    if plan is None or plan == "none":
        return IDENTITY
    validate.plan(plan, "plan")
    return preset_for_model(plan, model) if isinstance(plan, str) else plan


def prepare_hooks(model, plan: RunPlan, calibrate: Callable[[Hooks], Any] | None = None,
                  log: Callable[[str], None] | None = None, name: str | None = None) -> Hooks:
    """The hooks ``plan`` runs under on ``model`` (see the module docstring).

    ``calibrate(hooks)``: runs one generation under ``hooks`` on the caller's conditions; called with a
    calibration engine when the plan needs similarity data it does not have (without it, such a plan
    fails as it would in ``pipe(..., plan=plan)``: "needs similarity data").
    """
    from ..accel.caching import CachePolicy

    plan = resolve_plan(model, plan)
    if isinstance(plan, Hooks):
        return plan
    similarity = None
    if calibrate is not None and needs_calibration(plan):
        cal = plan_engine(dataclasses.replace(plan, cache=dataclasses.replace(plan.cache, calibration=True)),
                          model.depth)
        calibrate(cal)
        similarity = cal.policy(CachePolicy).similarity
        if log:
            log(f"calibrated {name or plan.name}: {len(similarity)} (layer, stage, branch) similarities")
    return plan_engine(plan, model.depth, similarity=similarity)


def held_memory(hooks: Hooks) -> dict[str, int]:
    """Peak bytes the feature cache and the pruning (restore) cache held in the last generation(s)."""
    from ..accel.caching import CachePolicy
    from ..accel.pruning import PrunePolicy

    if not isinstance(hooks, Engine):
        return {"cache_peak_bytes": 0, "pruning_cache_peak_bytes": 0}
    cache, prune = hooks.policy(CachePolicy), hooks.policy(PrunePolicy)
    return {"cache_peak_bytes": cache.peak_bytes if cache is not None else 0,
            "pruning_cache_peak_bytes": prune.peak_bytes if prune is not None else 0}


def run_plans(pipe, conditions: Sequence, plans: Sequence[tuple[str, RunPlan]], repeats: int = 3, warmup: int = 1,
              seed: int | None = 0, sampling: Mapping[str, Any] | None = None, calibrate: bool = True,
              decode: bool = True, batch_size: int | None = None, clock: str = "wall",
              log: Callable[[str], None] | None = None) -> list[PlanResult]:
    """Run ``pipe(conditions, …)`` under every plan: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds, each round every plan once in the given order. Returns one :class:`PlanResult` per plan, in order.

    ``plans``: (name, plan) pairs, the plan as :data:`RunPlan`. ``sampling``: keyword arguments of the
    pipeline call (``cfg``, ``top_k``, ``top_p``, …). ``batch_size``: conditions per pipeline call (all
    by default); chunk ``i`` uses ``seed + i`` as ``fastvar generate`` does, and a round's time is the
    sum over chunks. ``calibrate``: calibrate caching plans that lack similarity data (see
    :func:`prepare_hooks`). ``decode``: decode the first timed round's latent into ``images``.
    ``clock``: "wall" (the pipeline's transformer time) or "cpu" (this process's CPU seconds around each
    pipeline call, ``time.process_time``: on a CPU shared with other jobs it counts only this run's work,
    where wall time mostly measures the other jobs; meaningless on CUDA, where the work is the device's).
    """
    from ..accel.caching import CachePolicy

    conditions = list(conditions)
    if not conditions:
        raise validate.fail("conditions", conditions, "empty", "give at least one class id or prompt")
    validate.int_at_least(repeats, "repeats", 1, "timed rounds", 3)
    validate.int_at_least(warmup, "warmup", 0, "untimed rounds first")
    if batch_size is not None:
        validate.int_at_least(batch_size, "batch_size", 1, "conditions per pipeline call", 4)
    validate.seed(seed, "seed")
    if clock not in ("wall", "cpu"):
        raise validate.fail("clock", clock, "unknown clock", "use clock='wall' or clock='cpu'")
    kwargs = dict(sampling or {})
    bs = batch_size or len(conditions)
    chunks = [conditions[i:i + bs] for i in range(0, len(conditions), bs)]

    def generate(hooks: Hooks) -> tuple[float, float, dict, Tensor]:
        secs = wall = 0.0
        stats, latents = None, []
        for ci, chunk in enumerate(chunks):
            c0 = time.process_time()
            res = pipe(chunk, seed=None if seed is None else seed + ci, plan=hooks, decode=False, **kwargs)
            secs += time.process_time() - c0 if clock == "cpu" else res.seconds
            wall += res.seconds
            stats = stats if stats is not None else res.stats
            latents.append(res.latent)
        return secs, wall, stats, (latents[0] if len(latents) == 1 else torch.cat(latents))

    resolved = [(name, resolve_plan(pipe.model, plan)) for name, plan in plans]  # every name checked first
    results = []
    for name, plan in resolved:
        hooks = prepare_hooks(pipe.model, plan, calibrate=generate if calibrate else None, log=log, name=name)
        r = PlanResult(str(name), hooks)
        cache = r.policy(CachePolicy)
        if calibrate and cache is not None and needs_calibration(hooks.plan):
            r.calibrated = len(cache.similarity)
        results.append(r)
    for _ in range(warmup):
        for r in results:
            generate(r.hooks)
    for rep in range(repeats):
        for r in results:
            secs, wall, stats, latent = generate(r.hooks)
            r.seconds.append(secs)
            r.wall_seconds.append(wall)
            if stats.get("scale_seconds"):
                r.scale_seconds.append(stats["scale_seconds"])
            if rep == 0:
                r.stats, r.latent = stats, latent
                r.memory = held_memory(r.hooks)
                cache = r.policy(CachePolicy)
                r.cache = cache.statistics() if cache is not None else None
            if log:
                log(f"repeat {rep + 1}/{repeats} {r.name}: {secs:.3f}s")
    if decode:
        for r in results:
            r.images = pipe.decode(r.latent)
    return results



def engine_overhead(pipe, conditions: Sequence, repeats: int = 10, warmup: int = 2, seed: int | None = 0,
                    clock: str = "wall", log: Callable[[str], None] | None = None) -> dict:
    """The engine's own cost: no plan vs the ``identity`` preset vs every policy at its no-op setting
    (:func:`fastvar.accel.engine.noop_engine`), interleaved, same seed; also checks the outputs are equal.

    ``overhead`` is median(plan) / median(none) - 1; ``paired_overhead`` the median over rounds of the
    per-round ratio minus 1 (rounds are interleaved, so a ratio within one round sees the same machine
    load: the sturdier number on a busy machine).
    """
    from ..accel.engine import noop_engine

    res = run_plans(pipe, conditions, [("none", None), ("identity", "identity"),
                                       ("noop-all", noop_engine(pipe.model.depth))],
                    repeats=repeats, warmup=warmup, seed=seed, decode=False, clock=clock, log=log)
    base = res[0]
    rows = []
    for r in res:
        paired = [t / b for t, b in zip(r.seconds, base.seconds)]
        wall = statistics.median(r.wall_seconds)
        rows.append({"plan": r.name, "policies": [type(p).__name__ for p in getattr(r.hooks, "policies", ())],
                     "seconds_median": r.median, "seconds_all": r.seconds,
                     "overhead": r.median / base.median - 1.0, "paired_overhead": statistics.median(paired) - 1.0,
                     "wall_seconds_median": wall, "wall_seconds_all": r.wall_seconds,
                     "wall_overhead": wall / statistics.median(base.wall_seconds) - 1.0,
                     "bit_identical": bool(torch.equal(r.latent, base.latent))})
    return {"clock": clock, "repeats": repeats, "warmup": warmup, "conditions": list(conditions), "rows": rows}

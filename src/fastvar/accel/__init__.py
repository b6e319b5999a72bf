"""The acceleration engine: plans (data), presets (named plans) and the hooks that execute them.

Public API, in the spirit of tomesd::

    hooks = fastvar.apply(model_or_pipeline, "fastvar")   # or an AccelPlan
    ...generate...
    fastvar.remove(model_or_pipeline)
"""

from __future__ import annotations

from .engine import Engine, Policy, Recorder, compose
from .guidance import GuidancePolicy
from .hooks import IDENTITY, Hooks
from .kv import KVPolicy
from .plan import AccelPlan, CacheConfig, GuidanceConfig, KVConfig, PlanError, ResolvedPlan
from .presets import PRESETS, get_preset, preset_for_model
from .pruning import PlanHooks, PrunePolicy, SkipPolicy, plan_policies


def _model_of(obj):
    return getattr(obj, "model", obj)


def make_hooks(model, plan: AccelPlan | str | Hooks | None, record: bool = False) -> Hooks:
    """Hooks executing ``plan`` on ``model`` (identity hooks for ``None`` / ``"none"``; a hooks object,
    e.g. an :class:`Engine` of hand-picked policies, is used as it is)."""
    if isinstance(plan, Hooks):
        return plan
    if plan is None or (isinstance(plan, str) and plan == "none"):
        return IDENTITY
    if isinstance(plan, str):
        plan = preset_for_model(plan, model)
    return plan_engine(plan, model.depth, record=record)


def plan_engine(plan: AccelPlan, depth: int, record: bool = False, similarity=None, timing: bool = True) -> Engine:
    """The one engine for a plan: each plan field that is set contributes its policy.

    Why one builder: runners, the demo and the CLI used to pick a hooks class per plan kind
    (``PlanHooks`` or ``CachingHooks``); a new method now only adds its policy here, and every caller
    gets it. ``similarity``: feature-caching data to decide from or calibrate into (see CachePolicy).
    """
    policies: list[Policy] = list(plan_policies(plan, record))
    if plan.cache is not None:
        from .caching import CachePolicy

        policies.append(CachePolicy(plan.cache, depth, similarity))
    if plan.guidance is not None and not plan.guidance.is_identity:
        policies.append(GuidancePolicy.from_config(plan.guidance, strict=plan.strict))
    if plan.kv is not None and not plan.kv.is_identity:
        policies.append(KVPolicy(plan.kv, strict=plan.strict))
    return Engine(policies, depth=depth, plan=plan, timing=timing)


def apply(model_or_pipeline, plan: AccelPlan | str | None, record: bool = False) -> Hooks:
    """Install ``plan`` on a model (or a pipeline's model); returns the active hooks."""
    model = _model_of(model_or_pipeline)
    hooks = make_hooks(model, plan, record=record)
    model.hooks = hooks
    return hooks


def remove(model_or_pipeline) -> None:
    """Back to the plain model: identity hooks, bit-identical to never having applied a plan."""
    _model_of(model_or_pipeline).hooks = IDENTITY


__all__ = [
    "AccelPlan", "CacheConfig", "GuidanceConfig", "KVConfig", "PlanError", "ResolvedPlan", "Hooks", "IDENTITY", "PlanHooks",
    "PRESETS", "get_preset", "preset_for_model", "apply", "remove", "make_hooks", "plan_engine",
    "Engine", "Policy", "Recorder", "compose", "SkipPolicy", "PrunePolicy", "GuidancePolicy", "KVPolicy",
]

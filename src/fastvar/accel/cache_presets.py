"""Named feature-caching configurations.

Stages are written from the end of the schedule ("#-1" = the last, largest stage), so one preset means
the same thing on every schedule; on VAR 256 px (…, 8², 10², 13², 16²) "#-3", "#-2", "#-1" are the
stages of 100, 169 and 256 tokens. ``get_cache_preset(name, schedule)`` spells them as token counts.

=================  ===============  ===============  ====  ===  =====  ========  ========
name               cache stages     skip stages      attn  mlp  thr.   adaptive  interp
=================  ===============  ===============  ====  ===  =====  ========  ========
no-cache           –                –                yes   yes  0.90   no        bilinear
conservative       #-2              #-1              yes   yes  0.95   no        bilinear
original           #-3 #-2          #-2 #-1          yes   yes  0.70   no        bilinear
aggressive         #-4 #-3 #-2      #-3 #-2 #-1      yes   yes  0.60   no        bilinear
ultra-fast         #-5 … #-2        #-4 … #-1        yes   yes  0.50   yes       nearest
attn-only          #-3 #-2          #-2 #-1          yes   no   0.70   no        bilinear
mlp-only           #-3 #-2          #-2 #-1          no    yes  0.70   no        bilinear
high-quality       #-3 #-2          #-2 #-1          yes   yes  0.90   no        bicubic
memory-efficient   #-3              #-2 #-1          yes   no   0.80   no        bilinear
=================  ===============  ===============  ====  ===  =====  ========  ========

Every preset is in inference mode; pass ``calibration=True`` (and ``sim_path``) to record the
similarity data it needs, then the same preset with ``sim_path`` to use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schedules import Schedule
from .plan import CacheConfig, PlanError


@dataclass(frozen=True)
class CachePreset:
    settings: dict = field(default_factory=dict)
    intent: str = ""


_ORIGINAL = dict(cache_stages=("#-3", "#-2"), skip_stages=("#-2", "#-1"))

CACHE_PRESETS: dict[str, CachePreset] = {
    "no-cache": CachePreset(
        dict(), "the caching hooks active but reusing nothing: bit-identical to no plan; the reference row and "
                "a measure of the hooks' overhead"),
    "conservative": CachePreset(
        dict(cache_stages=("#-2",), skip_stages=("#-1",), threshold=0.95),
        "reuse only at the last (largest, most expensive) stage and only branches that barely change: "
        "best quality, smallest speedup"),
    "original": CachePreset(
        dict(**_ORIGINAL, threshold=0.7),
        "the reference VAR-style settings (cache 100 & 169, reuse at 169 & 256 on VAR 256 px, threshold 0.7): "
        "the balanced default"),
    "aggressive": CachePreset(
        dict(cache_stages=("#-4", "#-3", "#-2"), skip_stages=("#-3", "#-2", "#-1"), threshold=0.6),
        "one more stage and a lower bar: speed first, visible but moderate quality loss"),
    "ultra-fast": CachePreset(
        dict(cache_stages=("#-5", "#-4", "#-3", "#-2"), skip_stages=("#-4", "#-3", "#-2", "#-1"), threshold=0.5,
             adaptive_threshold=True, interpolation_mode="nearest"),
        "maximum reuse: four stages, adaptive per-stage thresholds (reuse every non-outlier layer), the "
        "cheapest resize; for previews"),
    "attn-only": CachePreset(
        dict(**_ORIGINAL, threshold=0.7, enable_mlp_cache=False),
        "reuse attention only: the per-token MLP stays exact, and reused attention also keeps those stages' "
        "keys out of the KV cache"),
    "mlp-only": CachePreset(
        dict(**_ORIGINAL, threshold=0.7, enable_attn_cache=False),
        "reuse the MLP only: attention (cross-token context) stays exact at every stage"),
    "high-quality": CachePreset(
        dict(**_ORIGINAL, threshold=0.9, interpolation_mode="bicubic"),
        "original's stages with a higher bar and a smoother resize: small speedup, near-baseline images"),
    "memory-efficient": CachePreset(
        dict(cache_stages=("#-3",), skip_stages=("#-2", "#-1"), threshold=0.8, enable_mlp_cache=False),
        "least memory held: one slot stage at the smaller map, attention only (reused attention also shrinks "
        "the KV cache)"),
}


TURBO_CACHE = {
    "var": dict(cache_stages=("#-3",), skip_stages=("#-2",), threshold=0.9),
    "hart": dict(cache_stages=("#-4", "#-3", "#-2"), skip_stages=("#-3", "#-2", "#-1"), threshold=0.9),
    "infinity": dict(cache_stages=("#-6", "#-5", "#-4"), skip_stages=("#-5", "#-4", "#-3"), threshold=0.9),
}
"""The feature caching of the ``turbo`` preset per table rule (see :mod:`fastvar.accel.presets`): reuse at the
scales turbo prunes, from the scale before, where calibration measured the branch output similar enough."""


def turbo_cache(rule: str, schedule: Schedule | None = None) -> CacheConfig:
    """turbo's CacheConfig: inference mode without ``sim_path``, like every cache preset, so it needs similarity
    data: the run primitive (``fastvar bench``, ``--compare-configs``) calibrates it on the caller's conditions
    first; library users calibrate with ``calibration=True`` or pass ``sim_path``."""
    return CacheConfig(**TURBO_CACHE[rule])


def get_cache_preset(name: str, schedule: Schedule | None = None, **overrides) -> CacheConfig:
    """The named CacheConfig; with a schedule its stages are spelled as token counts; ``overrides``
    set other fields (``calibration=True, sim_path=...``)."""
    if name not in CACHE_PRESETS:
        raise PlanError(f"unknown cache preset {name!r}; known cache presets: {', '.join(CACHE_PRESETS)}")
    cfg = CacheConfig(**{**CACHE_PRESETS[name].settings, **overrides})
    if schedule is not None:
        tok = schedule.token_counts
        cache, skip = cfg.resolve_stages(schedule)
        cfg.cache_stages = tuple(str(tok[i]) for i in cache)
        cfg.skip_stages = tuple(str(tok[i]) for i in skip)
    return cfg


def describe_cache_presets(schedule: Schedule | None = None) -> str:
    """One line per preset: name, its stages (as token counts with a schedule) and its intent."""
    lines = []
    for name, p in CACHE_PRESETS.items():
        try:
            c = get_cache_preset(name, schedule)
            stages = f"cache {','.join(c.cache_stages) or '-'} skip {','.join(c.skip_stages) or '-'}"
        except PlanError as e:  # schedule too short for the preset
            stages = f"(not applicable: {e})"
        lines.append(f"{name:<17}{stages:<34}{p.intent}")
    return "\n".join(lines)

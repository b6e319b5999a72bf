"""Acceleration plans: plain data that says which tokens each (scale, layer, branch) forwards.

A plan is written against scale *references* ("32" = the scale whose larger side is 32, "t576",
"#8", "32x32") so one plan can be carried across schedules; it is resolved against a concrete schedule
and depth at the start of every generation (Infinity changes schedule with the aspect ratio).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..schedules import Schedule

INTERP_MODES = ("area", "nearest", "bilinear", "bicubic")
BRANCHES = ("attn", "cross", "ffn")


class PlanError(ValueError):
    """A plan that cannot be applied; the message names the field and the fix."""


_STAGE_REF = re.compile(r"^(#-?\d+|t?\d+|\d+x\d+)$")


@dataclass
class CacheConfig:
    """Feature caching: reuse a branch output computed at a cache stage at later skip stages.

    Stages: a plain number is a *token count* ("169" = the 13x13 stage; unlike pruning refs, where a
    plain number is a side), "t169" the same, "#8" an index and "#-1" an index from the end (presets use
    these so they fit every schedule), "13x13" a size. They are resolved against the schedule of every
    generation; a ref the schedule lacks is an error.

    Reuse rule (inference mode): a (layer, branch) reuses at a skip stage when the similarity recorded
    for it in calibration is >= the stage's threshold. ``threshold`` must lie in [0, 1]; 1.0 is reserved
    to mean "reuse nothing" (a float cosine similarity can round to 1.0, so "never" must not depend on
    it), which is bit-identical to having no cache. ``adaptive_threshold`` lowers the threshold per
    stage to min(threshold, clip(mean - std, 0, 1)) of that stage's recorded similarities: where every
    layer is systematically less similar (late, large stages) the layers that are not low outliers
    still reuse; it never raises the threshold, so it reuses a superset of the fixed rule.
    "cross" branches (cross-attention) follow ``enable_attn_cache``.
    """

    skip_stages: tuple[str, ...] = ()
    cache_stages: tuple[str, ...] = ()
    enable_attn_cache: bool = True
    enable_mlp_cache: bool = True
    threshold: float = 0.9
    adaptive_threshold: bool = False
    interpolation_mode: str = "bilinear"
    calibration: bool = False
    sim_path: str | None = None

    def __post_init__(self) -> None:
        self.skip_stages = tuple(str(s).strip() for s in self.skip_stages)
        self.cache_stages = tuple(str(s).strip() for s in self.cache_stages)
        self.threshold = float(self.threshold)
        if self.sim_path is not None:
            self.sim_path = str(self.sim_path)
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise PlanError(
                f"cache threshold {self.threshold} is outside [0, 1]; it is compared with a cosine similarity "
                "(use 1.0 to reuse nothing)"
            )
        if self.interpolation_mode not in INTERP_MODES:
            raise PlanError(
                f"cache interpolation_mode {self.interpolation_mode!r} is unknown; choose one of {INTERP_MODES}"
            )
        bad = [s for s in self.skip_stages + self.cache_stages if not _STAGE_REF.match(s.lower())]
        if bad:
            raise PlanError(f"cache stage ref(s) {bad} are not understood; use a token count ('169'), 't169', "
                            "an index ('#8', '#-1') or a size ('13x13')")
        if self.skip_stages and not self.cache_stages:
            raise PlanError("cache skip_stages are set but cache_stages is empty; name the stage(s) to cache from")

    def resolve_stages(self, schedule: Schedule) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(cache stage indices, skip stage indices), sorted; every skip stage needs an earlier cache stage."""
        cache = tuple(sorted({_stage_index(schedule, r) for r in self.cache_stages}))
        skip = tuple(sorted({_stage_index(schedule, r) for r in self.skip_stages}))
        for si in skip:
            if not any(c < si for c in cache):
                raise PlanError(
                    f"cache skip stage {schedule[si][0] * schedule[si][1]} (index {si}) has no cache stage before "
                    "it; a stage can only reuse an output cached at an earlier stage"
                )
        return cache, skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_stages"], d["cache_stages"] = list(self.skip_stages), list(self.cache_stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown cache field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


def _stage_index(schedule: Schedule, ref: str) -> int:
    k = str(ref).strip().lower()
    n = len(schedule)
    if k.startswith("#"):
        i = int(k[1:])
        i = i + n if i < 0 else i
        if 0 <= i < n:
            return i
    elif "x" in k:
        h, w = (int(v) for v in k.split("x"))
        if (h, w) in schedule.sizes:
            return schedule.sizes.index((h, w))
    else:
        t = int(k.lstrip("t"))
        if t in schedule.token_counts:
            return schedule.token_counts.index(t)
    raise PlanError(
        f"cache stage {ref!r} is not in this schedule (token counts {', '.join(map(str, schedule.token_counts))}); "
        f"name a stage by token count (e.g. '{schedule.token_counts[-1]}'), index ('#{n - 1}', '#-1') or size"
    )


_SCALE_REF = re.compile(r"^(#-?\d+|i\d+|t?\d+|\d+x\d+)$")
REUSE_MODES = ("direction", "uncond")


@dataclass
class GuidanceConfig:
    """Classifier-free guidance per scale (executed by :class:`fastvar.accel.guidance.GuidancePolicy`).

    Scale refs are pruning refs ("13" = the scale whose larger side is 13, "t169", "13x13", "#8") plus
    "#-k" (the k-th scale from the end: presets use it so they follow every schedule).

    cond_only_from: from this scale on the backbone forwards the conditional half of the batch only
        (B rows instead of 2B: inputs, conditioning and KV caches narrowed; the scales pay once instead of
        twice) and samples from the conditional logits (or, with ``reuse_uncond``, from a guided result).
    weights: scale ref -> guidance weight in the backbone's own units (VAR/HART: t in (1+t)·c − t·u, after
        VAR's ramp; Infinity: c in c·cond + (1−c)·uncond), replacing the backbone's weight at that scale.
    reuse_uncond: at conditional-only scales, keep guiding with what the last scale that ran both halves
        produced, resized to the current scale (bilinear): ``true`` / "direction" reuses the guidance
        direction cond − uncond (uncond ≈ cond − resize(direction)); "uncond" reuses the unconditional
        logits themselves (uncond ≈ resize(uncond)). ``false``: no guidance at those scales.
    reuse_shrink: multiplies the reused guidance direction (uncond ≈ cond − s·resize(direction); with
        "uncond", uncond ≈ cond − s·(cond − resize(uncond))). The kept direction of a smaller scale is a
        noisy estimate of the current one, and shrinking a noisy estimate towards zero lowers its expected
        error: on the embedded model s = 0.5 kept more fidelity than 1 (benchmarks/embedded_turbo.json).
    """

    cond_only_from: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    reuse_uncond: bool | str = False
    reuse_shrink: float = 1.0

    def __post_init__(self) -> None:
        if self.cond_only_from is not None:
            self.cond_only_from = str(self.cond_only_from).strip()
        if not isinstance(self.weights, dict):
            raise PlanError(f"guidance.weights must be an object of scale ref -> weight (e.g. {{\"16\": 1.0}}), "
                            f"not {type(self.weights).__name__}")
        w: dict[str, float] = {}
        for k, v in self.weights.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise PlanError(f"guidance.weights[{k!r}] is {v!r}; give a number (the backbone's guidance weight)") from None
            if not math.isfinite(f):
                raise PlanError(f"guidance.weights[{k!r}] is {v}; give a finite number")
            w[str(k).strip()] = f
        self.weights = w
        try:
            self.reuse_shrink = float(self.reuse_shrink)
        except (TypeError, ValueError):
            raise PlanError(f"guidance.reuse_shrink is {self.reuse_shrink!r}; give a number in [0, 1] "
                            "(1 = the reused direction as kept)") from None
        self.validate()

    @property
    def reuse_mode(self) -> str | None:
        """"direction", "uncond" or None (no reuse)."""
        r = self.reuse_uncond
        if r is True:
            return "direction"
        return None if r is False or r is None else str(r)

    def validate(self) -> None:
        refs = ([self.cond_only_from] if self.cond_only_from is not None else []) + list(self.weights)
        bad = [r for r in refs if not _SCALE_REF.match(r.lower())]
        if bad:
            field_name = "guidance.cond_only_from" if self.cond_only_from in bad else "guidance.weights"
            raise PlanError(f"{field_name}: scale ref(s) {bad} are not understood; use a side ('13'), 't169', "
                            "a size ('13x13') or an index ('#8', '#-2' = second to last)")
        r = self.reuse_uncond
        if not (isinstance(r, bool) or r is None or r in REUSE_MODES):
            raise PlanError(f"guidance.reuse_uncond is {r!r}; use true/false or one of {REUSE_MODES}")
        if self.reuse_mode is not None and self.cond_only_from is None:
            raise PlanError("guidance.reuse_uncond is set but guidance.cond_only_from is not; name the scale "
                            "from which only the conditional half runs (e.g. \"cond_only_from\": \"#-2\")")
        if not (math.isfinite(self.reuse_shrink) and 0.0 <= self.reuse_shrink <= 2.0):
            raise PlanError(f"guidance.reuse_shrink is {self.reuse_shrink}; give a number in [0, 2] "
                            "(1 = the reused direction as kept, 0.5 = half of it)")
        if self.reuse_shrink != 1.0 and self.reuse_mode is None:
            raise PlanError("guidance.reuse_shrink is set but guidance.reuse_uncond is not; set "
                            "\"reuse_uncond\": \"direction\" (or drop reuse_shrink)")

    @property
    def is_identity(self) -> bool:
        return self.cond_only_from is None and not self.weights

    def to_dict(self) -> dict[str, Any]:
        d = {"cond_only_from": self.cond_only_from, "weights": dict(self.weights), "reuse_uncond": self.reuse_uncond}
        if self.reuse_shrink != 1.0:  # omitted at its default: plan files written before the field stay equal
            d["reuse_shrink"] = self.reuse_shrink
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidanceConfig:
        if not isinstance(d, dict):
            raise PlanError(f"plan field guidance must be an object like {{\"cond_only_from\": \"#-2\"}}, "
                            f"not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown guidance field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


KV_SCORES = ("attn", "dist", "grid", "mix")
_KV_REF = re.compile(r"^(#-?\d+|i\d+|t?\d+|\d+x\d+)$")


@dataclass
class KVConfig:
    """KV-cache compression: how many of each scale's keys/values every layer keeps for later scales.

    keep: scale ref -> fraction of that scale's tokens kept (in [0, 1]; 1 or absent = all). Refs as in
        pruning ("13" = side 13, "t169", "13x13", "#8"), plus "#-k" = k-th scale from the end, so a
        budget written by position follows any schedule. With ``drafters`` set these are the drafter
        layers' budgets.
    refiner_keep: the refiner layers' fractions (ScaleKV: layers whose attention stays on the current
        map need little history): a number = the same fraction at every scale ``keep`` names, a map =
        per scale ref, None = as ``keep``. Only used with ``drafters``.
    drafters: the layers that keep ``keep`` (ScaleKV's drafters: broad attention over earlier scales);
        every other layer in ``layers`` is a refiner. A list = the same layers at every scale, a map
        scale ref -> list = per scale (what :func:`fastvar.accel.kv.calibrate_drafters` writes), None =
        no split (every layer keeps ``keep``).
    layers: half-open [start, end) of the blocks that compress (None = all); others keep everything.
    per_head: each head keeps its own subset of the scale's tokens (HACK: heads attend differently);
        False = one subset per layer shared by the heads. Every head keeps the same count.
    score: which tokens are kept: "attn" = the most attended by the scale's own queries (falls back
        to "dist" where a backbone gives no queries), "dist" = keys farthest from the scale's mean key,
        "grid" = a spatially even subset (ordered dithering; shifted per head with ``per_head``),
        "mix" = half the budget by "attn", the rest spread by "grid".
    keep_last: store the last scale's keys/values. No later scale reads them, so False changes no
        output; it only frees memory (True = what the official code holds).
    """

    keep: dict[str, float] = field(default_factory=dict)
    refiner_keep: dict[str, float] | float | None = None
    drafters: list[int] | dict[str, list[int]] | None = None
    layers: tuple[int, int] | None = None
    per_head: bool = True
    score: str = "attn"
    keep_last: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.keep, dict):
            raise PlanError(f"kv.keep must be a map scale ref -> fraction, e.g. {{\"#-2\": 0.25}}; got {self.keep!r}")
        self.keep = {str(k).strip(): _kv_fraction(f"kv.keep[{k!r}]", v) for k, v in self.keep.items()}
        if isinstance(self.refiner_keep, dict):
            self.refiner_keep = {str(k).strip(): _kv_fraction(f"kv.refiner_keep[{k!r}]", v)
                                 for k, v in self.refiner_keep.items()}
        elif self.refiner_keep is not None:
            self.refiner_keep = _kv_fraction("kv.refiner_keep", self.refiner_keep)
        if isinstance(self.drafters, dict):
            self.drafters = {str(k).strip(): _kv_layers(f"kv.drafters[{k!r}]", v) for k, v in self.drafters.items()}
        elif self.drafters is not None:
            self.drafters = _kv_layers("kv.drafters", self.drafters)
        if self.layers is not None:
            try:
                self.layers = (int(self.layers[0]), int(self.layers[1]))
            except (TypeError, ValueError, IndexError):
                raise PlanError(f"kv.layers {self.layers!r} is not a [start, end) pair; give e.g. [0, 16] "
                                "or null for every layer") from None
        self.validate()

    def validate(self) -> None:
        refs = list(self.keep)
        if isinstance(self.refiner_keep, dict):
            refs += list(self.refiner_keep)
        if isinstance(self.drafters, dict):
            refs += list(self.drafters)
        bad = [r for r in refs if not _KV_REF.match(r.lower())]
        if bad:
            raise PlanError(f"kv scale ref(s) {bad} are not understood; use a side ('13'), 't169', '13x13', "
                            "an index ('#8') or an index from the end ('#-2')")
        if self.layers is not None:
            a, b = self.layers
            if a < 0 or b <= a:
                raise PlanError(f"kv.layers {list(self.layers)} is empty or negative; give [start, end) with "
                                "0 <= start < end, or null for every layer")
        if self.score not in KV_SCORES:
            raise PlanError(f"kv.score {self.score!r} is unknown; choose one of {KV_SCORES}")
        for name in ("per_head", "keep_last"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"kv.{name} must be true or false; got {getattr(self, name)!r}")
        if self.refiner_keep is not None and self.drafters is None:
            raise PlanError("kv.refiner_keep is set but kv.drafters is not; name the drafter layers (a list, or a "
                            "map scale ref -> list from `calibrate_drafters`) or drop refiner_keep")

    @property
    def is_identity(self) -> bool:
        """Keeps every token of every scale (output and memory as without the field)."""
        rk = self.refiner_keep
        rk_vals = list(rk.values()) if isinstance(rk, dict) else ([] if rk is None else [rk])
        return self.keep_last and all(v == 1.0 for v in [*self.keep.values(), *rk_vals])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVConfig:
        if not isinstance(d, dict):
            raise PlanError(f"plan field kv must be an object like {{\"keep\": {{\"#-2\": 0.25}}}}; got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown kv field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


def _kv_fraction(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise PlanError(f"{name} is {v!r}; give a fraction in [0, 1] of the scale's tokens to keep") from None
    if not 0.0 <= f <= 1.0:
        raise PlanError(f"{name} is {f}; give a fraction in [0, 1] of the scale's tokens to keep (1 keeps all)")
    return f


def _kv_layers(name: str, v: Any) -> list[int]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise PlanError(f"{name} is {v!r}; give a list of layer indices, e.g. [0, 3]")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise PlanError(f"{name} has {x!r}; layer indices are whole numbers >= 0")
        out.append(int(x))
    return sorted(set(out))


@dataclass
class AccelPlan:
    """Per-scale keep ratios, the layers and branches they apply to, and where restored tokens come from.

    keep: scale ref -> fraction of that scale's tokens each pruned branch forwards (0 = skip the scale).
    layers: half-open [start, end) block range where pruning applies (None = every block).
    branches: which residual branches are pruned ("attn", "cross", "ffn"; absent ones are ignored).
    cache_scale: the scale whose branch outputs fill pruned slots (None = the scale just before the
        first pruned one).
    interp: how the cached map is resized to the pruned scale.
    skip: scales that are not forwarded at all.
    strict: if False, refs that the current schedule lacks are ignored (presets use this so one preset
        serves every resolution); if True they are an error.
    kv: KV-cache compression budgets per scale and layer (see :class:`KVConfig`).
    guidance: classifier-free guidance per scale (conditional-only scales, per-scale weights, reuse of
        the unconditional output; see :class:`GuidanceConfig`).
    """

    name: str = "custom"
    keep: dict[str, float] = field(default_factory=dict)
    layers: tuple[int, int] | None = None
    branches: tuple[str, ...] = BRANCHES
    cache_scale: str | None = None
    interp: str = "area"
    skip: tuple[str, ...] = ()
    strict: bool = True
    cache: CacheConfig | None = None
    kv: KVConfig | None = None
    guidance: GuidanceConfig | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.keep = {str(k): float(v) for k, v in dict(self.keep).items()}
        self.skip = tuple(str(s) for s in self.skip)
        self.branches = tuple(self.branches)
        if self.layers is not None:
            self.layers = (int(self.layers[0]), int(self.layers[1]))
        if self.cache_scale is not None:
            self.cache_scale = str(self.cache_scale)
        if isinstance(self.cache, dict):
            self.cache = CacheConfig.from_dict(self.cache)
        if self.kv is not None and not isinstance(self.kv, KVConfig):
            self.kv = KVConfig.from_dict(self.kv)
        if self.guidance is not None and not isinstance(self.guidance, GuidanceConfig):
            self.guidance = GuidanceConfig.from_dict(self.guidance)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for k, v in self.keep.items():
            if not 0.0 <= v <= 1.0:
                raise PlanError(f"keep ratio for scale {k!r} is {v}; keep ratios must be in [0, 1] (0 skips the scale)")
        if self.interp not in INTERP_MODES:
            raise PlanError(f"interp {self.interp!r} is unknown; choose one of {INTERP_MODES}")
        bad = [b for b in self.branches if b not in BRANCHES]
        if bad:
            raise PlanError(f"unknown branch(es) {bad}; branches are {BRANCHES}")
        if self.layers is not None:
            a, b = self.layers
            if a < 0 or b <= a:
                raise PlanError(f"layer range {self.layers} is empty or negative; give [start, end) with 0 <= start < end")
        if self.cache is not None:
            self.cache.validate()
        if self.kv is not None:
            self.kv.validate()
        if self.guidance is not None:
            self.guidance.validate()

    @property
    def is_identity(self) -> bool:
        return (all(v == 1.0 for v in self.keep.values()) and not self.skip and self.cache is None
                and (self.kv is None or self.kv.is_identity)
                and (self.guidance is None or self.guidance.is_identity))

    # ------------------------------------------------------------------ resolution
    def resolve(self, schedule: Schedule, depth: int) -> ResolvedPlan:
        def idx(ref: str) -> int | None:
            try:
                return schedule.resolve(ref)
            except ValueError:
                if self.strict:
                    raise PlanError(f"plan {self.name!r}: " + str(_last_error(schedule, ref))) from None
                return None

        keep: dict[int, float] = {}
        skip: set[int] = set()
        for ref, ratio in self.keep.items():
            si = idx(ref)
            if si is None:
                continue
            if ratio == 0.0:
                skip.add(si)
            elif ratio < 1.0:
                keep[si] = ratio
        for ref in self.skip:
            si = idx(ref)
            if si is not None:
                skip.add(si)
        if 0 in skip:
            raise PlanError(f"plan {self.name!r} skips the first scale; nothing would be generated")
        layers = self.layers or (0, depth)
        if layers[1] > depth and self.strict:
            raise PlanError(
                f"plan {self.name!r}: layer range {self.layers} is outside the model's depth {depth}; "
                f"use an end <= {depth}"
            )
        layers = (min(layers[0], depth), min(layers[1], depth))
        cache_si = None
        if keep:
            first = min(keep)
            if self.cache_scale is not None:
                cache_si = idx(self.cache_scale)
            if cache_si is None:
                cache_si = first - 1
            if cache_si < 0 or cache_si >= first:
                raise PlanError(
                    f"plan {self.name!r} prunes scale {schedule[first]} but its cache scale "
                    f"{schedule[cache_si] if 0 <= cache_si < len(schedule) else cache_si} does not come before it; "
                    "prune only scales after the cache scale"
                )
            if cache_si in keep or cache_si in skip:
                raise PlanError(
                    f"plan {self.name!r}: the cache scale {schedule[cache_si]} is itself pruned or skipped; "
                    "the cache must be a fully computed scale"
                )
        return ResolvedPlan(keep, frozenset(skip), range(*layers), frozenset(self.branches), cache_si, self.interp)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["branches"] = list(self.branches)
        d["skip"] = list(self.skip)
        if self.cache is not None:
            d["cache"] = self.cache.to_dict()
        if self.kv is not None:
            d["kv"] = self.kv.to_dict()
        if self.guidance is not None:
            d["guidance"] = self.guidance.to_dict()
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        s = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(s)
        return s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccelPlan:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown plan field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, src: str | Path) -> AccelPlan:
        if isinstance(src, str) and src.lstrip().startswith("{"):
            text = src
        else:
            p = Path(src)
            if not p.is_file():
                raise PlanError(f"plan file {src} does not exist; write one with `fastvar plan fastvar > plan.json`")
            text = p.read_text()
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {src} is not valid JSON ({e}); start from `fastvar plan fastvar`") from None


def _last_error(schedule: Schedule, ref: str) -> str:
    try:
        schedule.resolve(ref)
    except ValueError as e:
        return str(e)
    return ""


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan bound to one schedule and depth: scale indices instead of references."""

    keep: dict[int, float]
    skip: frozenset[int]
    layers: range
    branches: frozenset[str]
    cache_si: int | None
    interp: str

    def n_keep(self, si: int, n_tokens: int) -> int:
        """Tokens forwarded at a pruned scale: all minus ``int(n · (1 - keep))`` (FastVAR's rounding)."""
        drop = int(n_tokens * (1.0 - self.keep[si]) + 1e-9)
        return max(1, n_tokens - drop)

    def prunes(self, si: int, layer: int, branch: str) -> bool:
        return si in self.keep and layer in self.layers and branch in self.branches

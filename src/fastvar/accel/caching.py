"""Feature caching ("VAR-style" caching) as a policy on the same hook points as token pruning.

At a *cache stage* every enabled branch output of every block is kept (one slot per layer per branch,
overwritten by later cache stages). At a later *skip stage* a (layer, branch) may return its slot,
resized to the new grid, instead of running the branch. Which pairs reuse is decided offline:

- calibration mode computes the fresh output as usual (so the images equal the baseline's), also
  builds the reuse candidate, and records their similarity per (layer, stage, branch);
- inference mode reuses where the recorded similarity reaches the stage's threshold.

Similarity = mean over tokens (and the CFG-doubled batch) of the per-token cosine similarity along
channels, clipped to [-1, 1]; per-token rather than whole-map cosine so that a few badly predicted
tokens are not hidden by a large well-predicted background. Each record also names the stage its slot
came from, so a file recorded under other cache stages is never applied to the wrong source.

A reused attention branch does not run, so that stage's keys/values never enter the KV cache (the same
contract as a pruned token). :class:`CachePolicy` composes with the pruning and skipping policies on
one :class:`~fastvar.accel.engine.Engine`: a reused (layer, branch) skips pruning, the others are pruned
as the plan says.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schedules import Schedule
from .engine import Engine, Policy
from .hooks import IDENTITY, BranchFn, Hooks
from .plan import BRANCHES, AccelPlan, CacheConfig, PlanError
from .pruning import PlanHooks, PrunePolicy, resize_tokens

SIM_FORMAT = "fastvar-cache-similarity/1"
SIM_DEFINITION = "mean over tokens and batch of the per-token cosine similarity (channels) of fresh vs reused output"

Key = tuple[int, int, str]  # (layer, stage token count, branch)


def branch_enabled(cfg: CacheConfig, name: str) -> bool:
    """Attention-like branches ("attn", "cross") follow enable_attn_cache; "ffn" follows enable_mlp_cache."""
    if name in ("attn", "cross"):
        return cfg.enable_attn_cache
    return cfg.enable_mlp_cache if name == "ffn" else False


def cosine_similarity(fresh: Tensor, reused: Tensor) -> float:
    s = F.cosine_similarity(fresh.float(), reused.float(), dim=-1).mean()
    return float(s.clamp(-1.0, 1.0))


def _std(v: Sequence[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def _summary(v: Sequence[float]) -> dict[str, float]:
    return {"mean": sum(v) / len(v), "std": _std(v), "min": min(v), "max": max(v), "n": len(v)}


# ---------------------------------------------------------------------------------------------- data
@dataclass
class SimilarityData:
    """Calibration records: per (layer, stage tokens, branch) the slot's source stage and the values seen."""

    values: dict[Key, list[float]] = field(default_factory=dict)
    sources: dict[Key, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def add(self, layer: int, stage: int, branch: str, source: int, value: float) -> None:
        key = (layer, stage, branch)
        if self.sources.get(key, source) != source:  # cached from another stage now: old values are stale
            self.values.pop(key, None)
        self.sources[key] = source
        self.values.setdefault(key, []).append(float(value))

    def mean(self, key: Key) -> float:
        v = self.values[key]
        return sum(v) / len(v)

    def lookup(self, layer: int, stage: int, branch: str, source: int) -> float | None:
        """The recorded mean similarity, or None if absent or recorded from another source stage."""
        key = (layer, stage, branch)
        if key not in self.values or self.sources.get(key) != source:
            return None
        return self.mean(key)

    def __len__(self) -> int:
        return len(self.values)

    def stage_means(self, stage: int, source: int, branches: Iterable[str]) -> list[float]:
        bs = set(branches)
        return [self.mean(k) for k in self.values if k[1] == stage and k[2] in bs and self.sources[k] == source]

    def summary(self) -> dict:
        """Similarity statistics per stage, per branch and overall (over the per-key means)."""
        if not self.values:
            return {"per_stage": {}, "per_branch": {}, "overall": None}
        means = {k: self.mean(k) for k in self.values}
        stages = sorted({k[1] for k in means})
        branches = sorted({k[2] for k in means})
        return {
            "per_stage": {str(s): _summary([m for k, m in means.items() if k[1] == s]) for s in stages},
            "per_branch": {b: _summary([m for k, m in means.items() if k[2] == b]) for b in branches},
            "overall": _summary(list(means.values())),
        }

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        entries = [
            {"layer": layer, "stage": stage, "branch": branch, "source": self.sources[(layer, stage, branch)],
             "mean": self.mean((layer, stage, branch)), "n": len(v), "values": v}
            for (layer, stage, branch), v in sorted(self.values.items())
        ]
        return {"format": SIM_FORMAT, "similarity": SIM_DEFINITION, "meta": self.meta, "entries": entries}

    @classmethod
    def from_dict(cls, d: dict, origin: str = "similarity data") -> SimilarityData:
        if d.get("format") != SIM_FORMAT:
            raise PlanError(f"{origin} is not a fastvar similarity file (format {d.get('format')!r}, "
                            f"expected {SIM_FORMAT!r}); re-run calibration (--calibration) to write one")
        out = cls(meta=dict(d.get("meta", {})))
        for e in d["entries"]:
            key = (int(e["layer"]), int(e["stage"]), str(e["branch"]))
            out.values[key] = [float(v) for v in e["values"]]
            out.sources[key] = int(e["source"])
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a file."""
        from ..pipelines.common import atomic_write_text

        atomic_write_text(json.dumps(self.to_dict(), indent=1), Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SimilarityData:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"similarity file {p} (--sim-path) does not exist; inference mode reuses features only where a "
                f"calibration run measured them: run once with --calibration --sim-path {p} first"
            )
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"similarity file {p} (--sim-path) is not valid JSON ({e}); re-run calibration") from None
        return cls.from_dict(d, f"similarity file {p}")


def load_similarity_data(path: str | Path) -> SimilarityData:
    return SimilarityData.load(path)


def stage_thresholds(cfg: CacheConfig, sim: SimilarityData, stages: dict[int, int]) -> dict[int, float]:
    """Threshold per skip stage (by token count); ``stages`` maps a skip stage's tokens to its source's tokens.

    Fixed: ``cfg.threshold``. Adaptive: min(threshold, clip(mean - std, 0, 1)) over the recorded means of
    that stage's enabled (layer, branch) pairs; a stage with no records keeps the fixed threshold.
    """
    out: dict[int, float] = {}
    enabled = [b for b in BRANCHES if branch_enabled(cfg, b)]
    for stage, source in stages.items():
        thr = cfg.threshold
        vals = sim.stage_means(stage, source, enabled)
        if cfg.adaptive_threshold and vals:
            m = sum(vals) / len(vals)
            thr = min(thr, min(1.0, max(0.0, m - _std(vals))))
        out[stage] = thr
    return out


# ---------------------------------------------------------------------------------------------- hooks
@dataclass
class _Slot:
    tensor: Tensor
    hw: tuple[int, int]
    stage: int  # token count of the stage it was stored at

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class CachePolicy(Policy):
    """Feature caching (``plan.cache``) as a policy: store branch outputs at cache stages, reuse them at
    skip stages where calibration measured them similar enough (or, in calibration, measure).

    ``similarity``: data to decide from (inference) or to accumulate into (calibration); by default
    inference loads ``cfg.sim_path`` and calibration starts empty. Calibration statistics accumulate
    over every generation run through this object and, when ``sim_path`` is set, the file is rewritten
    at the end of each generation with everything pooled so far. It runs outside pruning (order 10 <
    20): a reused (layer, branch) is not pruned, the others are pruned as the plan says.
    """

    order = 10

    def __init__(self, cfg: CacheConfig, depth: int, similarity: SimilarityData | None = None) -> None:
        if similarity is None:
            if cfg.calibration:
                similarity = SimilarityData()
            elif cfg.sim_path is not None:
                similarity = SimilarityData.load(cfg.sim_path)
            elif cfg.skip_stages:
                raise PlanError(
                    "cache inference mode needs similarity data: give sim_path (--sim-path) written by a "
                    "calibration run (--calibration), or run with calibration=True first"
                )
            else:
                similarity = SimilarityData()
        self.config = cfg
        self.depth = depth
        self.similarity = similarity
        self.hits = {b: [0] * depth for b in BRANCHES}
        self.lookups = {b: [0] * depth for b in BRANCHES}
        self.generations = 0
        self.peak_bytes = 0
        self._reset()

    def _reset(self) -> None:
        self.slots: dict[tuple[int, str], _Slot] = {}
        self.slot_bytes = 0
        self.decisions: dict[tuple[int, int, str], bool] = {}
        self.run_similarity: dict[tuple[int, int, str], float] = {}
        self.cache_si: tuple[int, ...] = ()
        self.skip_si: tuple[int, ...] = ()
        self.source_si: dict[int, int] = {}
        self.store_si: frozenset[int] = frozenset()
        self.thresholds: dict[int, float] = {}
        self.tokens: tuple[int, ...] = ()

    # ------------------------------------------------------------------ hooks
    def begin(self, engine) -> None:
        super().begin(engine)
        self._reset()
        sched = Schedule(engine.sizes)
        self.tokens = sched.token_counts
        cache, skip = self.config.resolve_stages(sched)
        computed = [c for c in cache if c not in engine.planned_skip]
        for si in skip:
            src = [c for c in computed if c < si]
            if not src:
                raise PlanError(f"cache skip stage {self.tokens[si]} has no computed cache stage before it "
                                "(its cache stages are skipped by the plan)")
            self.source_si[si] = src[-1]
        self.cache_si, self.skip_si = cache, skip
        self.store_si = frozenset(c for c in computed if any(s > c for s in skip))
        self.thresholds = stage_thresholds(
            self.config, self.similarity, {self.tokens[s]: self.tokens[self.source_si[s]] for s in skip})
        self.similarity.meta.setdefault("sizes", [list(s) for s in engine.sizes])
        self.similarity.meta.update(depth=self.depth, interpolation_mode=self.config.interpolation_mode)

    def branch(self, layer: int, name: str, x: Tensor, idx: Tensor | None, inner: BranchFn) -> Tensor:
        si = self.engine.si
        enabled = branch_enabled(self.config, name)
        slot = self.slots.get((layer, name)) if enabled and si in self.source_si else None
        if slot is None:
            out = inner(x, idx)
        elif self.config.calibration:
            out = inner(x, idx)
            sim = cosine_similarity(out, self._resized(slot, out.shape[0]))
            self.similarity.add(layer, self.tokens[si], name, slot.stage, sim)
            self.run_similarity[(si, layer, name)] = sim
            self.lookups[name][layer] += 1
        else:
            self.lookups[name][layer] += 1
            out = self._maybe_reuse(layer, name, x, idx, inner, slot)
        if enabled and si in self.store_si:
            self._put(layer, name, out)
        return out

    def _maybe_reuse(self, layer: int, name: str, x: Tensor, idx: Tensor | None, inner: BranchFn,
                     slot: _Slot) -> Tensor:
        si = self.engine.si
        sim = self.similarity.lookup(layer, self.tokens[si], name, slot.stage)
        reuse = sim is not None and self.config.threshold < 1.0 and sim >= self.thresholds[self.tokens[si]]
        self.decisions[(si, layer, name)] = reuse
        if not reuse:
            return inner(x, idx)
        self.hits[name][layer] += 1
        return self._resized(slot, x.shape[0])

    def _resized(self, slot: _Slot, rows: int) -> Tensor:
        """The slot at the current scale's size, for the ``rows`` batch rows forwarded now (a slot stored before a
        guidance cut holds both CFG halves; the conditional half is its first rows, the ones still forwarded)."""
        hw = self.engine.hw
        t = slot.tensor[:rows]
        if slot.hw == hw:
            return t.clone()  # never hand out the slot itself: a backbone may modify outputs in place
        work = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return resize_tokens(work.contiguous(), slot.hw, hw, self.config.interpolation_mode).to(t.dtype)

    def _put(self, layer: int, name: str, out: Tensor) -> None:
        old = self.slots.get((layer, name))
        self.slot_bytes -= old.nbytes if old is not None else 0
        slot = _Slot(out, self.engine.hw, self.tokens[self.engine.si])
        self.slots[(layer, name)] = slot
        self.slot_bytes += slot.nbytes
        self.peak_bytes = max(self.peak_bytes, self.slot_bytes)

    def end(self) -> None:
        self.slots, self.slot_bytes = {}, 0
        self.generations += 1
        if self.config.calibration and self.config.sim_path:
            self.similarity.save(self.config.sim_path)

    # ------------------------------------------------------------------ reporting
    def statistics(self) -> dict:
        """Config, per-layer hit counts, similarity statistics and memory held (JSON-able)."""
        cfg = self.config
        hits = {b: list(v) for b, v in self.hits.items() if sum(self.lookups[b])}
        looks = {b: list(v) for b, v in self.lookups.items() if sum(v)}
        n_hits, n_looks = sum(map(sum, hits.values())), sum(map(sum, looks.values()))
        prune = self.engine.policy(PrunePolicy) if self.engine is not None else None
        return {
            "cache_config": cfg.to_dict(),
            "mode": "calibration" if cfg.calibration else "inference",
            "generations": self.generations,
            "stages": {"cache": [self.tokens[s] for s in self.cache_si], "skip": [self.tokens[s] for s in self.skip_si]},
            "thresholds": {str(k): v for k, v in self.thresholds.items()},
            "hits_per_layer": hits,
            "lookups_per_layer": looks,
            "hit_rate": n_hits / n_looks if n_looks else 0.0,
            "decisions": {f"{self.tokens[si]}/{layer}/{b}": v for (si, layer, b), v in sorted(self.decisions.items())},
            "similarity_stats": self.similarity.summary(),
            "memory": {
                "cache_bytes": self.slot_bytes,
                "cache_peak_bytes": self.peak_bytes,
                "pruning_cache_peak_bytes": prune.peak_bytes if prune is not None else 0,
                "slots": len(self.slots),
            },
        }


class CachingHooks(PlanHooks):
    """Pruning and skipping (the plan's keep/skip) plus feature caching (``plan.cache``) in one engine.

    Kept for backwards compatibility: it is ``Engine([SkipPolicy, CachePolicy, PrunePolicy])``; the cache
    policy's state (``similarity``, ``decisions``, ``hits``, ``statistics()``) reads through.
    """

    def __init__(self, plan: AccelPlan, depth: int, record: bool = False, timing: bool = True,
                 similarity: SimilarityData | None = None) -> None:
        if plan.cache is None:
            raise PlanError("CachingHooks needs a plan with a cache config (plan.cache)")
        super().__init__(plan, depth, record=record, timing=timing,
                         extra=[CachePolicy(plan.cache, depth, similarity)])

    def statistics(self) -> dict:
        return self.policy(CachePolicy).statistics()


# ---------------------------------------------------------------------------------------------- model API
def _model_of(obj):
    return getattr(obj, "model", obj)


def _cache_policy(hooks: Hooks) -> CachePolicy | None:
    return hooks.policy(CachePolicy) if isinstance(hooks, Engine) else None


def set_cache_config(model, cfg: CacheConfig | str | None, record: bool = False) -> Hooks:
    """Install feature caching on ``model`` (or a pipeline), keeping the rest of its current plan.

    ``cfg`` is a CacheConfig, a cache preset name, or None (caching off). The in-memory similarity data
    of the current cache policy carries over unless the new config names a ``sim_path`` (then that
    file is the data in inference mode and the destination in calibration mode), so
    calibrate-then-infer works without a file. The hooks are the one engine of the resulting plan
    (:func:`fastvar.accel.plan_engine`).
    """
    from . import plan_engine

    model = _model_of(model)
    prev = model.hooks
    base = getattr(prev, "plan", None) if isinstance(prev, Engine) else None
    base = base if base is not None else AccelPlan(name="cache")
    if isinstance(cfg, str):
        from .cache_presets import get_cache_preset

        cfg = get_cache_preset(cfg)
    plan = dataclasses.replace(base, cache=cfg)
    if cfg is None:
        model.hooks = IDENTITY if plan.is_identity else plan_engine(plan, model.depth, record=record)
        return model.hooks
    if getattr(model, "schedule", None) is not None:
        cfg.resolve_stages(model.schedule)  # fail now, not at the first generation
    prev_cache = _cache_policy(prev)
    carry = prev_cache.similarity if prev_cache is not None and cfg.sim_path is None else None
    model.hooks = plan_engine(plan, model.depth, record=record, similarity=carry)
    return model.hooks


def get_cache_statistics(model) -> dict:
    """The active cache policy's statistics; a model without caching reports ``cache_config: None``."""
    cache = _cache_policy(_model_of(model).hooks)
    if cache is not None:
        return cache.statistics()
    return {"cache_config": None, "mode": None, "hits_per_layer": {}, "hit_rate": 0.0, "similarity_stats": None,
            "memory": {"cache_bytes": 0, "cache_peak_bytes": 0, "pruning_cache_peak_bytes": 0, "slots": 0}}


def save_similarity_data(model, path: str | Path | None = None) -> Path:
    """Write the active cache policy's similarity data (to ``path`` or the config's sim_path), atomically."""
    cache = _cache_policy(_model_of(model).hooks)
    if cache is None:
        raise PlanError("no feature caching is active on this model; call set_cache_config(...) first")
    dest = path or cache.config.sim_path
    if dest is None:
        raise PlanError("no path to save similarity data to: pass one or set sim_path (--sim-path)")
    return cache.similarity.save(dest)


class CachingAPI:
    """The caching methods the HART caching extension documents on the model, for every backbone.

    Why a mixin: VAR, Infinity and HART share one engine, so the methods are the same three calls on
    ``self.hooks``; each backbone class inherits them instead of repeating them (the backbone contract,
    :class:`fastvar.accel.engine.Backbone`, lists them).
    """

    def set_cache_config(self, cfg: CacheConfig | str | None, record: bool = False) -> Hooks:
        """Feature caching at runtime (CacheConfig, cache preset name or None); see :func:`set_cache_config`."""
        return set_cache_config(self, cfg, record)

    def get_cache_statistics(self) -> dict:
        """Config, hits per layer, similarity statistics and memory of the active cache policy."""
        return get_cache_statistics(self)

    def save_similarity_data(self, path: str | Path | None = None) -> Path:
        """Write the calibration data (to ``path`` or the config's ``sim_path``) atomically."""
        return save_similarity_data(self, path)

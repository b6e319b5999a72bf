"""``fastvar tune``: the fastest plan that meets a quality budget, found by measurement.

Why a search and not a table: every method ships hand-picked ratios for one backbone and resolution;
a user with another model, schedule or quality budget would have to guess. The search here spends
real generations only where they decide and uses what is cheap to know first:

1. **Cost before quality.** One timed baseline run gives the seconds of every scale's blocks; the FLOP
   counter gives, for any plan and without running it, the FLOPs of every scale (:func:`predict_counts`
   mirrors the engine's pruning, skipping and caching decisions exactly). A plan's predicted time is the
   baseline's per-scale time scaled by its per-scale FLOP ratio. Ranking moves costs no generation.
2. **Sensitivity from one calibration pass.** A feature-caching calibration run (its images equal the
   baseline's) records, per (layer, stage, branch), how similar a branch output is to the same branch's
   output at the previous scale resized — exactly what pruning and caching substitute for the computed
   output. It orders the layers the pruned range grows into and sets the cache knob's thresholds at the
   quantiles of the measured similarities (each step reuses the next most similar pairs).
3. **Monotone knobs, lazy greedy, bisection.** Each knob (a scale's keep ratio down to skipping it, the
   pruned layer range, the cache threshold, and — where the plan has them — guidance and KV budgets) is
   a ladder of levels where a higher level never costs more and is assumed not to be better. From the
   baseline, the move with the best "predicted seconds saved per unit of budget slack consumed" is
   taken (lazy greedy: a move's efficiency measured at an older point is re-measured before it is
   accepted). A move that breaks the budget halves its step (bisection); a one-level move that breaks
   it retires the knob for good (monotonicity: from any later, more aggressive point it breaks it too).
   Successful moves double their knob's step.
4. **Measured speed decides.** Predicted speedups only rank. The fastest budget-meeting candidates
   (and every preset that meets the budget) are timed against the baseline with interleaved repeats
   after a warm-up (median); the fastest measured one is chosen, then re-measured — quality and speed —
   on held-out conditions and seeds, beside the presets.

Every evaluated candidate is appended (one ``write`` of one JSON line, fsynced) to a state file, the
baseline images and the calibration similarities are cached, so a killed run resumes without
re-generating anything it already measured (the search is deterministic given those records).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError
from ..schedules import Schedule
from .caching import SimilarityData, branch_enabled, stage_thresholds
from .hooks import IDENTITY, Hooks
from .plan import AccelPlan, CacheConfig, PlanError
from .stats import Counts, FlopDims, dense_counts, estimate_flops

FORMAT = "fastvar-tune/1"
KEEP_LADDER = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
"""Keep ratios a scale's knob walks through; 0.0 skips the scale (the plan's keep-0 convention)."""
PSNR_CAP = 100.0
"""Per-image PSNR of identical images (infinite) is counted as this many dB so means stay finite."""


# ============================================================================================== budgets
@dataclass(frozen=True)
class Metric:
    """A quality measure the budget may bound. ``reference``: computed against the baseline's images."""

    name: str
    higher_is_better: bool
    lo: float
    hi: float
    reference: bool
    meaning: str


METRICS: dict[str, Metric] = {
    "ssim": Metric("ssim", True, -1.0, 1.0, True, "mean per-image SSIM against the baseline's image"),
    "psnr": Metric("psnr", True, 0.0, PSNR_CAP, True, "mean per-image PSNR (dB) against the baseline's image"),
    "lpips": Metric("lpips", False, 0.0, 1.0, True, "mean LPIPS (AlexNet) against the baseline's image"),
    "accuracy": Metric("accuracy", True, 0.0, 1.0, False,
                       "fraction of images the procedural checker recognises as the requested class"),
    "geneval": Metric("geneval", True, 0.0, 1.0, False, "procedural GenEval score of text-to-image generations"),
}

_BUDGET = re.compile(r"^\s*([a-z_]+)\s*(>=|<=)\s*(baseline\s*(?:([+-])\s*([0-9.]+(?:e-?\d+)?))?|[-+]?[0-9.]+(?:e-?\d+)?)\s*$",
                     re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """``metric op value``; ``value`` absolute, or ``baseline ± offset`` (``relative`` set)."""

    metric: str
    op: str
    value: float
    relative: bool = False
    text: str = ""

    @property
    def spec(self) -> Metric:
        return METRICS[self.metric]

    def threshold(self, baseline: dict[str, float]) -> float:
        return baseline[self.metric] + self.value if self.relative else self.value

    def slack(self, q: dict[str, float], baseline: dict[str, float]) -> float:
        """How far ``q`` is inside the budget (>= 0: met), in the metric's units."""
        t = self.threshold(baseline)
        return q[self.metric] - t if self.op == ">=" else t - q[self.metric]

    def holds(self, q: dict[str, float], baseline: dict[str, float]) -> bool:
        return self.slack(q, baseline) >= -1e-12

    def to_dict(self) -> dict:
        return {"text": self.text, "metric": self.metric, "op": self.op, "value": self.value, "relative": self.relative}


def parse_budget(text: str, flag: str = "--budget") -> Budget:
    """``ssim>=0.95``, ``psnr>=30``, ``lpips<=0.1``, ``accuracy>=0.9``, ``accuracy>=baseline-0.02``; a one-line
    UsageError naming the problem and the fix otherwise."""
    known = ", ".join(METRICS)
    if not isinstance(text, str):
        raise UsageError(f"{flag} {text!r}: not a budget; write METRIC>=VALUE, e.g. {flag} ssim>=0.95")
    m = _BUDGET.match(text)
    if not m:
        raise UsageError(f"{flag} {text}: not a budget; write METRIC>=VALUE or METRIC<=VALUE (or METRIC>=baseline-0.02), "
                         f"e.g. {flag} ssim>=0.95; metrics: {known}")
    name, op, rhs, sign, off = m.group(1).lower(), m.group(2), m.group(3), m.group(4), m.group(5)
    if name not in METRICS:
        raise UsageError(f"{flag} {text}: unknown metric {name!r}; known metrics: {known}")
    spec = METRICS[name]
    want = ">=" if spec.higher_is_better else "<="
    if op != want:
        raise UsageError(f"{flag} {text}: {name} is {'higher' if spec.higher_is_better else 'lower'}-is-better, so a "
                         f"budget bounds it from {'below' if spec.higher_is_better else 'above'}; write {name}{want}...")
    if rhs.lower().startswith("baseline"):
        try:
            v = float(off) if off else 0.0
        except ValueError:
            raise UsageError(f"{flag} {text}: {off!r} is not a number; e.g. {flag} {name}{op}baseline-0.02") from None
        v = -v if sign == "-" else v
        if abs(v) > spec.hi - spec.lo:
            raise UsageError(f"{flag} {text}: offset {v:g} is larger than {name}'s whole range [{spec.lo:g}, {spec.hi:g}]; "
                             f"e.g. {flag} {name}{op}baseline-0.02")
        return Budget(name, op, v, True, text.strip())
    try:
        v = float(rhs)
    except ValueError:
        raise UsageError(f"{flag} {text}: {rhs!r} is not a number; e.g. {flag} ssim>=0.95") from None
    if not spec.lo <= v <= spec.hi:
        raise UsageError(f"{flag} {text}: {name} lies in [{spec.lo:g}, {spec.hi:g}], so {v:g} can never be met "
                         f"(or is always met); e.g. {flag} {name}{op}{_example(name)}")
    return Budget(name, op, v, False, text.strip())


def _example(name: str) -> str:
    return {"ssim": "0.95", "psnr": "30", "lpips": "0.1", "accuracy": "0.9", "geneval": "0.8"}[name]


def check_metrics_available(budgets: Sequence[Budget], family: str, model_name: str, flag: str = "--budget") -> None:
    """Fail before any model loads when a budget's metric cannot be computed for this model or install."""
    for b in budgets:
        if b.metric == "lpips":
            try:
                import lpips  # noqa: F401
            except ImportError:
                raise UsageError(f"{flag} {b.text}: LPIPS needs the lpips package: pip install lpips "
                                 "(or pip install 'fastvar-vision[eval-gpu]'); or budget ssim/psnr instead") from None
        if b.metric == "accuracy" and model_name != "embedded":
            raise UsageError(f"{flag} {b.text}: accuracy is the procedural checker's, which knows only the embedded "
                             f"model's classes (not {model_name}'s); use --model embedded or budget ssim/psnr/lpips")
        if b.metric == "geneval":
            # Extension point: the procedural GenEval of the text-to-image embedded model (issue 16) scores
            # images against GenEval prompt metadata; wire it here once that model and its prompt file ship.
            raise UsageError(f"{flag} {b.text}: geneval budgets need the text-to-image embedded model and its "
                             "procedural GenEval prompts, which this build does not have yet; budget ssim/psnr/lpips")


# ============================================================================================== quality
def score_per_image(metrics: Sequence[str], images: Tensor, reference: Tensor, labels: Sequence[Any] | None = None,
                    lpips_fn: Callable | None = None) -> dict[str, list[float]]:
    """Every metric's value per image (images (N, 3, H, W) in [0, 1]; ``labels``: class ids for ``accuracy``,
    whose per-image value is 1 when the checker recognises the requested class)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = images.float().clamp(0, 1)
    y = reference.float().clamp(0, 1)
    out: dict[str, list[float]] = {}
    for m in metrics:
        if m == "ssim":
            v = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
            same = (x == y).flatten(1).all(1)
            out[m] = torch.where(same, torch.ones_like(v), v).tolist()
        elif m == "psnr":
            mse = (x - y).pow(2).flatten(1).mean(1)
            p = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-30)), torch.full_like(mse, PSNR_CAP))
            out[m] = p.clamp(max=PSNR_CAP).tolist()
        elif m == "lpips":
            if lpips_fn is None:
                from ..eval.metrics import load_lpips

                lpips_fn = load_lpips()
            with torch.no_grad():
                out[m] = lpips_fn(x * 2 - 1, y * 2 - 1).flatten().tolist()
        elif m == "accuracy":
            from ..train.data import classify_batch

            if labels is None:
                raise ValueError("accuracy needs the class labels of the images")
            out[m] = [float(p == t) for p, t in zip(classify_batch(x), labels)]
        else:
            raise ValueError(f"metric {m!r} is not computed in memory (known: {', '.join(METRICS)})")
    return out


def score_images(metrics: Sequence[str], images: Tensor, reference: Tensor, labels: Sequence[Any] | None = None,
                 lpips_fn: Callable | None = None) -> dict[str, float]:
    """Mean per-image value of every metric (see :func:`score_per_image`)."""
    per = score_per_image(metrics, images, reference, labels, lpips_fn)
    return {m: sum(v) / max(len(v), 1) for m, v in per.items()}


def standard_errors(per_image: dict[str, list[float]]) -> dict[str, float]:
    """Standard error of each metric's mean over the images (sample std / sqrt(n); 0 for one image)."""
    out = {}
    for m, v in per_image.items():
        n = len(v)
        mean = sum(v) / max(n, 1)
        out[m] = math.sqrt(sum((a - mean) ** 2 for a in v) / (n - 1) / n) if n > 1 else 0.0
    return out


# ============================================================================================== cost model
def predict_counts(plan: AccelPlan | None, sizes: Sequence[tuple[int, int]], depth: int, branches: Sequence[str],
                   similarity: SimilarityData | None = None) -> Counts:
    """Tokens each (scale, layer, branch) will compute under ``plan``, without running the model.

    Mirrors the engine: skipped scales compute nothing; a (layer, branch) reused by feature caching
    computes 0 tokens (its calibration similarity against its source stage reaches the stage's threshold);
    a pruned one computes ``ResolvedPlan.n_keep``. The test suite checks it against the recorder.
    """
    if plan is None:
        return dense_counts(sizes, depth, branches)
    sched = Schedule(tuple(tuple(s) for s in sizes))
    r = plan.resolve(sched, depth)
    reuse: set[tuple[int, int, str]] = set()
    cfg = plan.cache
    if cfg is not None and not cfg.calibration and cfg.threshold < 1.0 and cfg.skip_stages:
        if similarity is None:
            raise PlanError("predicting a caching plan needs its calibration similarity data")
        tokens = sched.token_counts
        cache, skip = cfg.resolve_stages(sched)
        computed = [c for c in cache if c not in r.skip]
        source: dict[int, int] = {}
        for si in skip:
            src = [c for c in computed if c < si]
            if not src:
                raise PlanError(f"cache skip stage {tokens[si]} has no computed cache stage before it")
            source[si] = src[-1]
        thr = stage_thresholds(cfg, similarity, {tokens[s]: tokens[source[s]] for s in skip})
        for si in skip:
            if si in r.skip:
                continue
            for layer in range(depth):
                for b in branches:
                    if not branch_enabled(cfg, b):
                        continue
                    sim = similarity.lookup(layer, tokens[si], b, tokens[source[si]])
                    if sim is not None and sim >= thr[tokens[si]]:
                        reuse.add((si, layer, b))
    counts: Counts = {}
    for si, (h, w) in enumerate(sizes):
        if si in r.skip:
            continue
        n = h * w
        for layer in range(depth):
            for b in branches:
                if (si, layer, b) in reuse:
                    c = 0
                elif r.cache_si is not None and r.prunes(si, layer, b):
                    c = r.n_keep(si, n)
                else:
                    c = n
                counts[(si, layer, b)] = (n, c)
    return counts


@dataclass
class CostModel:
    """Predicted seconds of a generation: the baseline's block time per scale scaled by the plan's FLOP
    ratio at that scale, plus the baseline's time outside the blocks (sampling, head, upsampling)."""

    sizes: tuple[tuple[int, int], ...]
    depth: int
    dims: FlopDims
    batch: int
    total_seconds: float
    scale_seconds: dict[int, float]

    def __post_init__(self) -> None:
        base = estimate_flops(dense_counts(self.sizes, self.depth, self.dims.branches), self.sizes, self.dims, self.batch)
        self.base_flops = base["total_flops"]
        self.base_scale_flops = base["scale_flops"]
        self.outside = max(0.0, self.total_seconds - sum(self.scale_seconds.values()))

    def predict(self, counts: Counts, rows: dict[int, int] | None = None,
                kv: dict[int, float] | None = None) -> dict[str, float]:
        """Predicted seconds, speedup and FLOP ratio of a generation with these token ``counts``,
        ``rows`` (batch rows of conditional-only scales) and ``kv`` (scale -> fraction of its appended
        keys/values kept for later scales: their attention reads fewer keys; the FLOP counter itself
        counts attention over every computed token, so the KV term is added here)."""
        f = estimate_flops(counts, self.sizes, self.dims, self.batch, rows) if rows else \
            estimate_flops(counts, self.sizes, self.dims, self.batch)
        scale_flops = dict(f["scale_flops"])
        total = f["total_flops"]
        if kv:
            for si, d in kv_attention_delta(counts, self.sizes, self.depth, self.dims, self.batch, rows or {}, kv).items():
                scale_flops[si] = scale_flops.get(si, 0.0) + d
                total += d
        secs = self.outside
        for si, t in self.scale_seconds.items():
            bf = self.base_scale_flops.get(si, 0.0)
            secs += t * (scale_flops.get(si, 0.0) / bf if bf else 1.0)
        return {"seconds_est": secs, "speedup_est": self.total_seconds / max(secs, 1e-12),
                "flop_ratio": total / self.base_flops, "total_flops": total}


def kv_attention_delta(counts: Counts, sizes: Sequence[tuple[int, int]], depth: int, dims: FlopDims, batch: int,
                       rows: dict[int, int], kv: dict[int, float]) -> dict[int, float]:
    """Attention FLOPs saved per scale (negative numbers) when scale ``si`` keeps ``ceil(kv[si] · n)`` of the
    ``n`` keys/values it appends (the KV policy's budget): later scales attend over fewer keys; a scale
    still attends to all its own keys. Mirrors :func:`estimate_flops`' attention term (4·n·kv·C per row)."""
    C = dims.width
    delta: dict[int, float] = {}
    for layer in range(depth):
        held_full = held = dims.prefix_kv
        for si in range(len(sizes)):
            c = counts.get((si, layer, "attn"))
            if c is None:
                continue
            n = c[1]
            d = 4.0 * n * C * rows.get(si, batch) * (held - held_full)
            if d:
                delta[si] = delta.get(si, 0.0) + d
            held_full += n
            fr = kv.get(si)
            held += n if fr is None or not n else (0 if fr == 0.0 else max(1, min(n, math.ceil(fr * n - 1e-9))))
    return delta


# ============================================================================================== knobs
@dataclass
class Knob:
    """One monotone dimension of the plan space: ``levels[0]`` is where the search starts, each later level
    is at least as aggressive (never more computation, assumed never better)."""

    name: str
    kind: str  # "keep", "layers", "cache", or an extension kind ("guidance", "kv")
    levels: list
    target: Any = None  # the scale ref of a keep knob
    step: int = 1  # the initial step of the search, in levels

    def describe(self, level: int) -> str:
        v = self.levels[level]
        if self.kind == "keep":
            return f"{self.name}={'skip' if v == 0.0 else f'{v:g}'}"
        if self.kind == "layers":
            return f"layers=[{v[0]},{v[1]})"
        if self.kind == "cache":
            return "cache=off" if v is None else f"cache>={v:.4f}"
        return f"{self.name}={v}"


def extension_knobs(tuner: Tuner) -> list[Knob]:
    """Knobs for plan fields other helpers add to :class:`AccelPlan` (guidance cut scale, KV budgets).

    Extension point: the plan space grows with the plan. A knob only needs an ordered ladder of levels
    (least aggressive first) and :meth:`Tuner.plan_for` to write its level into the plan; the cost model
    sees its effect through :func:`predict_counts` once the engine's FLOP accounting covers it. Until
    ``AccelPlan`` has a ``guidance`` / ``kv`` field this returns no knob (checked at run time, so the
    knobs appear as soon as the fields land).
    """
    names = {f.name for f in dataclasses.fields(AccelPlan)}
    knobs: list[Knob] = []
    if "guidance" in names:
        knobs += tuner.guidance_knobs()
    if "kv" in names:
        knobs += tuner.kv_knobs()
    return knobs


# ============================================================================================== state
class StateFile:
    """Append-only JSON lines; each record is one ``write`` + fsync, a torn last line is dropped on open."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a kill during the last write: drop the partial line
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                data = data[:end]
            for line in data.decode("utf-8").splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue

    def find(self, kind: str, key: str) -> dict | None:
        for r in reversed(self.records):
            if r.get("type") == kind and r.get("key") == key:
                return r
        return None

    def append(self, record: dict) -> None:
        line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(json.loads(line))


def _json_default(o):
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def _plan_identity(plan: AccelPlan | None) -> Any:
    """What decides a plan's computation (names, descriptions and file paths do not)."""
    if plan is None:
        return None
    d = plan.to_dict()
    for k in ("name", "description", "strict"):  # strict only decides whether a missing ref is an error
        d.pop(k, None)
    if d.get("cache"):
        d["cache"].pop("sim_path", None)
    return d


# ============================================================================================== conditions
@dataclass
class CondSet:
    """Conditions (class ids or prompts) generated once per seed; images come out seed-major."""

    conditions: list
    seeds: list[int]

    def labels(self) -> list:
        return [c for _ in self.seeds for c in self.conditions]

    def to_dict(self) -> dict:
        return {"conditions": list(self.conditions), "seeds": list(self.seeds)}


@dataclass
class Candidate:
    id: int
    key: str
    source: str
    plan: AccelPlan | None
    point: dict[str, int] | None
    quality: dict[str, float]
    meets: bool
    seconds: float
    flop_ratio: float
    speedup_est: float
    seconds_est: float
    speedup_measured: float | None = None
    cached: bool = False
    sim_key: str | None = None
    generated: bool = False  # this evaluation ran generations (not read back, not the baseline itself)
    quality_se: dict[str, float] = field(default_factory=dict)  # standard error of each mean over the images

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "plan": self.plan.to_dict() if self.plan else None,
                "point": self.point, "quality": self.quality, "quality_se": self.quality_se, "meets_budget": self.meets,
                "speedup_est": self.speedup_est, "flop_ratio": self.flop_ratio,
                "seconds_single_run": self.seconds, "seconds_est": self.seconds_est,
                "speedup": self.speedup_measured, "reused_from_state": self.cached}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (speed, quality), both larger-is-better, sorted by speed.
    A point is dominated when another is at least as good in both and better in one."""
    idx = []
    for i, (s, q) in enumerate(points):
        dominated = any((s2 >= s and q2 >= q) and (s2 > s or q2 > q) for j, (s2, q2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    # keep one of exact duplicates
    seen, out = set(), []
    for i in sorted(idx, key=lambda i: (points[i][0], points[i][1])):
        if points[i] not in seen:
            seen.add(points[i])
            out.append(i)
    return out


# ============================================================================================== the tuner
class Tuner:
    """The search on one pipeline; see the module docstring. ``run()`` returns the report (a dict)."""

    def __init__(self, pipe, budgets: Sequence[Budget], calib: CondSet, heldout: CondSet | None, state_dir: str | Path,
                 presets: Sequence[str] = (), repeats: int = 3, warmup: int = 1, finalists: int = 3,
                 max_evals: int = 80, time_limit_s: float | None = None, n_scales: int | None = None,
                 log: Callable[[str], None] | None = None, context: dict | None = None, time_all_presets: bool = False,
                 margin: float = 0.0, clock: str = "wall", confidence: float = 1.0,
                 on_candidate: Callable[[Candidate], None] | None = None, lpips_fn: Callable | None = None) -> None:
        if not budgets:
            raise UsageError("tune needs at least one budget, e.g. --budget ssim>=0.95")
        self.pipe, self.model = pipe, pipe.model
        self.budgets = list(budgets)
        self.metrics = list(dict.fromkeys(b.metric for b in self.budgets))
        self.primary = self.budgets[0]
        self.calib, self.heldout = calib, heldout
        self.state_dir = Path(state_dir)
        self.state = StateFile(self.state_dir / "state.jsonl")
        self.presets = list(presets)
        self.repeats, self.warmup, self.finalists = repeats, warmup, finalists
        self.max_evals, self.time_limit_s = max_evals, time_limit_s
        self.n_scales = n_scales
        self.time_all_presets = time_all_presets
        self.margin = float(margin)
        self.confidence = float(confidence)
        if clock not in ("wall", "cpu"):
            raise UsageError(f"clock={clock!r}: unknown clock; use 'wall' or 'cpu'")
        self.clock = clock
        self.timings: dict[str, dict] = {}
        self.log = log or (lambda s: None)
        self.on_candidate = on_candidate
        self.lpips_fn = lpips_fn
        self.context = {"model": getattr(pipe, "name", "?"), "defaults": getattr(pipe, "defaults", {}),
                        "depth": self.model.depth, "sizes": [list(s) for s in self.model.schedule.sizes],
                        "dtype": str(getattr(pipe, "dtype", "")), "device": self.model.device.type, **(context or {})}
        self.candidates: list[Candidate] = []
        self.preset_cands: dict[str, Candidate] = {}
        self._by_key: dict[str, Candidate] = {}
        self.generated = 0  # candidate evaluations that ran generations (not reused from the state file)
        self.reused = 0
        self.similarity: dict[str, SimilarityData] = {}
        self._sim_meta: dict[str, tuple[list, str, SimilarityData]] = {}
        self._baselines: dict[str, tuple[Tensor, dict[str, float]]] = {}
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ generation primitives
    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(s) for s in self.model.schedule.sizes)

    def _condkey(self, cs: CondSet) -> str:
        return _digest({"ctx": self.context, "cs": cs.to_dict()})

    def _run(self, hooks: Hooks, cs: CondSet, decode: bool) -> tuple[Tensor | None, float, list[dict]]:
        """Every seed of ``cs`` under ``hooks``: decoded images (seed-major) or None, transformer seconds, stats."""
        model = self.model
        prev = model.hooks
        imgs, secs, stats = [], 0.0, []
        try:
            for s in cs.seeds:
                model.hooks = hooks
                res = self.pipe(list(cs.conditions), seed=s, plan=None, decode=False)
                model.hooks = prev
                secs += res.seconds
                stats.append(res.stats)
                if decode:
                    imgs.append(self.pipe.decode(res.latent))
        finally:
            model.hooks = prev
        return (torch.cat(imgs) if decode else None), secs, stats

    def _engine(self, plan: AccelPlan | None, sim: SimilarityData | None = None) -> Hooks:
        from . import plan_engine

        if plan is None:
            return IDENTITY
        return plan_engine(plan, self.model.depth, similarity=sim)

    def baseline(self, cs: CondSet) -> tuple[Tensor, dict[str, float]]:
        """The baseline's images on ``cs`` (generated once, cached in the state folder) and its quality
        (reference metrics against themselves; absolute ones measured)."""
        key = self._condkey(cs)
        if key in self._baselines:
            return self._baselines[key]
        path = self.state_dir / f"baseline-{key}.pt"
        if path.is_file():
            imgs = torch.load(path, map_location="cpu", weights_only=True)
        else:
            imgs, _, _ = self._run(IDENTITY, cs, decode=True)
            from ..checkpoints import atomic_output

            with atomic_output(path) as f:
                torch.save(imgs, f)
        q = score_images(self.metrics, imgs, imgs, cs.labels(), self.lpips_fn)
        self._baselines[key] = (imgs, q)
        return imgs, q

    # ------------------------------------------------------------------ calibration (similarity)
    def similarity_for(self, cfg: CacheConfig) -> tuple[str, SimilarityData]:
        """Calibration similarity for a cache config's stages and resize mode, on the calibration set
        (one generation per seed; its images equal the baseline's); cached in the state folder."""
        sched = Schedule(self.sizes)
        cache, skip = cfg.resolve_stages(sched)
        tokens = sched.token_counts
        mapping = sorted((tokens[s], tokens[max(c for c in cache if c < s)]) for s in skip)
        # records are per (layer, stage, branch, source stage) and calibration outputs are always fresh, so a
        # calibration of more stages with the same resize serves any subset of its (stage, source) pairs
        for k, (m, interp, sim) in self._sim_meta.items():
            if interp == cfg.interpolation_mode and set(map(tuple, mapping)) <= set(map(tuple, m)):
                return k, sim
        key = _digest({"cs": self._condkey(self.calib), "map": mapping, "interp": cfg.interpolation_mode})
        path = self.state_dir / f"sim-{key}.json"
        if path.is_file():
            sim = SimilarityData.load(path)
        else:
            cal = dataclasses.replace(cfg, calibration=True, sim_path=None, enable_attn_cache=True,
                                      enable_mlp_cache=True, threshold=0.9, adaptive_threshold=False)
            hooks = self._engine(AccelPlan(name="calibration", cache=cal))
            self._run(hooks, self.calib, decode=False)
            from .caching import CachePolicy

            sim = hooks.policy(CachePolicy).similarity
            sim.save(path)
            self.log(f"calibrated caching stages {mapping} ({cfg.interpolation_mode}): {len(sim)} similarities")
        self.similarity[key] = sim
        self._sim_meta[key] = (mapping, cfg.interpolation_mode, sim)
        return key, sim

    # ------------------------------------------------------------------ candidates
    def evaluate(self, plan: AccelPlan | None, source: str, point: dict[str, int] | None = None) -> Candidate:
        """Quality on the calibration set and predicted speed of ``plan`` (reused from the state file if
        this exact computation was measured before)."""
        sim_key, sim = (None, None)
        if plan is not None and plan.cache is not None and plan.cache.skip_stages and not plan.cache.calibration:
            sim_key, sim = self.similarity_for(plan.cache)
        counts = predict_counts(plan, self.sizes, self.model.depth, self.model.flop_dims().branches, sim)
        est = self.cost.predict(counts, self.rows(plan), self.kv_fractions(plan))
        key = _digest({"cs": self._condkey(self.calib), "plan": _plan_identity(plan), "sim": sim_key,
                       "metrics": self.metrics})
        if key in self._by_key:
            c = self._by_key[key]
            if source.startswith("preset:") and not c.source.startswith("preset:"):
                c.source = f"{c.source}|{source}"
            return c
        _, base_q = self.baseline(self.calib)
        rec = self.state.find("candidate", key)
        cached, generated = rec is not None, False
        if plan is None or plan.is_identity:  # computes exactly the baseline: nothing to generate
            quality, seconds, cached = dict(base_q), self.cost.total_seconds * len(self.calib.seeds), False
            se = {m: 0.0 for m in self.metrics}
        elif cached:
            quality, seconds = rec["quality"], rec["seconds"]
            se = rec.get("quality_se") or {m: 0.0 for m in self.metrics}
            self.reused += 1
        else:
            base_imgs, _ = self.baseline(self.calib)
            imgs, seconds, stats = self._run(self._engine(plan, sim), self.calib, decode=True)
            per = score_per_image(self.metrics, imgs, base_imgs, self.calib.labels(), self.lpips_fn)
            quality = {m: sum(v) / len(v) for m, v in per.items()}
            se = standard_errors(per)
            rec = {"type": "candidate", "key": key, "source": source, "plan": _plan_identity(plan),
                   "quality": quality, "quality_se": se, "per_image": per, "seconds": seconds,
                   "flops": sum(s.get("total_flops", 0) for s in stats)}
            self.state.append(rec)
            self.generated += 1
            generated = True
        meets = self.meets(quality, base_q, se)
        c = Candidate(len(self.candidates), key, source, plan, dict(point) if point else None, quality, meets, seconds,
                      est["flop_ratio"], est["speedup_est"], est["seconds_est"], cached=cached, sim_key=sim_key,
                      generated=generated, quality_se=se)
        self.candidates.append(c)
        self._by_key[key] = c
        q = " ".join(f"{m} {quality[m]:.4f}" for m in self.metrics)
        self.log(f"[{c.id:3d}] {source:<34} {q} | est {c.speedup_est:.2f}x flops {c.flop_ratio:.2f} | "
                 f"{'meets' if meets else 'misses'} budget{' (reused)' if cached else f' ({seconds:.1f}s)'}")
        if self.on_candidate is not None:
            self.on_candidate(c)
        return c

    def meets(self, q: dict[str, float], base_q: dict[str, float], se: dict[str, float] | None = None) -> bool:
        """Every budget holds on the calibration set with ``confidence`` standard errors of its mean (over the
        images) and ``margin`` (metric units) to spare: the mean of a few images overstates what other
        conditions get about as often as it understates it, so a plan on the edge misses half the time."""
        se = se or {}
        return all(b.slack(q, base_q) - self.confidence * se.get(b.metric, 0.0) >= self.margin - 1e-12
                   for b in self.budgets)

    def slack(self, c: Candidate) -> float:
        """Budget slack left, normalised by the baseline's (1 = baseline, 0 = on the budget, < 0 = missed)."""
        _, base_q = self.baseline(self.calib)
        out = math.inf
        for b in self.budgets:
            s0 = b.slack(base_q, base_q)
            v = b.slack(c.quality, base_q) - self.confidence * c.quality_se.get(b.metric, 0.0)
            out = min(out, v / s0 if s0 > 0 else (0.0 if v >= -1e-12 else -math.inf))
        return out

    # ------------------------------------------------------------------ plan space
    def tunable_scales(self) -> list[int]:
        """The scales worth a knob: the largest ones, holding most of the FLOPs (never the first two)."""
        sizes = self.sizes
        flops = self.cost.base_scale_flops
        total = sum(flops.values())
        order = [si for si in range(len(sizes)) if si >= 2]
        if self.n_scales is not None:
            return order[-self.n_scales:] if self.n_scales else []
        chosen = [si for si in order if flops.get(si, 0) / total >= 0.04]
        return chosen[-5:]

    def _ref(self, si: int) -> str:
        sizes = self.sizes
        h, w = sizes[si]
        side = max(h, w)
        if h == w and sum(1 for s in sizes if max(s) == side) == 1:
            return str(side)
        return f"#{si}"

    def build_knobs(self) -> list[Knob]:
        scales = self.tunable_scales()
        self.scales = scales
        knobs = [Knob(f"keep@{self._ref(si)}", "keep", list(KEEP_LADDER), target=self._ref(si), step=2) for si in scales]
        # sensitivity: the caching calibration of every tunable stage against its predecessor
        self.cache_cfg = CacheConfig(cache_stages=tuple(str(self.sizes[si - 1][0] * self.sizes[si - 1][1]) for si in scales),
                                     skip_stages=tuple(str(self.sizes[si][0] * self.sizes[si][1]) for si in scales),
                                     threshold=0.9)
        self.sim_key, sim = self.similarity_for(self.cache_cfg) if scales else (None, SimilarityData())
        self.layer_similarity = self._layer_similarity(sim, scales)
        knobs.append(Knob("layers", "layers", self._layer_ladder(), step=1))
        means = sorted((sim.mean(k) for k in sim.values), reverse=True)
        if means:
            n = 10
            thr = []
            for i in range(1, n + 1):
                v = min(means[min(len(means) - 1, math.ceil(i * len(means) / n) - 1)], 0.9999)
                if not thr or v < thr[-1] - 1e-6:
                    thr.append(v)
            knobs.append(Knob("cache", "cache", [None, *thr], step=2))
        knobs += extension_knobs(self)
        return [k for k in knobs if len(k.levels) > 1]

    def _layer_similarity(self, sim: SimilarityData, scales: Sequence[int]) -> dict[int, float]:
        tokens = Schedule(self.sizes).token_counts
        stages = {tokens[si] for si in scales}
        per: dict[int, list[float]] = {}
        for (layer, stage, _b) in sim.values:
            if stage in stages:
                per.setdefault(layer, []).append(sim.mean((layer, stage, _b)))
        return {layer: sum(v) / len(v) for layer, v in sorted(per.items())}

    def _layer_ladder(self) -> list[tuple[int, int]]:
        """Pruned layer ranges from FastVAR's band (3/32 … 28/32 of the depth) growing to every layer, one
        layer a step, on the side whose layer the calibration found more similar (safer to prune)."""
        depth = self.model.depth
        a = round(3 * depth / 32)
        b = max(round(28 * depth / 32), a + 1)
        ladder = [(a, b)]
        sim = self.layer_similarity
        while a > 0 or b < depth:
            left = sim.get(a - 1, -math.inf) if a > 0 else None
            right = sim.get(b, -math.inf) if b < depth else None
            if right is None or (left is not None and left >= right):
                a -= 1
            else:
                b += 1
            ladder.append((a, b))
        return ladder

    def guidance_knobs(self) -> list[Knob]:
        """The guidance cut: from which scale (counted from the end) only the conditional half of the CFG
        batch is forwarded (``guidance.cond_only_from``, as the ``cfg-cut`` preset); earlier = faster."""
        n_max = min(max(len(self.scales), 1) + 1, len(self.sizes) - 2)
        return [Knob("cfg-cut", "guidance", [None, *(f"#-{k}" for k in range(1, n_max + 1))], step=1)]

    def kv_knobs(self) -> list[Knob]:
        """KV-cache budget: the fraction of their keys/values the tunable scales (but the last, which no
        scale reads) keep for later scales, every layer alike, scored by distance to the mean key (no
        queries needed: the cheapest score, so the budget's saving is not spent on choosing). Its saving
        is the later scales' attention (:func:`kv_attention_delta`)."""
        if len(self.scales) < 2:
            return []
        return [Knob("kv", "kv", [None, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1], step=2)]

    def plan_for(self, point: dict[str, int]) -> AccelPlan:
        """The plan of a point of the knob lattice."""
        keep: dict[str, float] = {}
        layers = None
        cache = None
        extra: dict[str, Any] = {}
        for k in self.knobs:
            v = k.levels[point[k.name]]
            if k.kind == "keep" and v < 1.0:
                keep[k.target] = v
            elif k.kind == "layers":
                layers = v
            elif k.kind == "cache" and v is not None:
                cache = dataclasses.replace(self.cache_cfg, threshold=float(v))
            elif k.kind == "guidance" and v is not None:
                extra["guidance"] = {"cond_only_from": v}
            elif k.kind == "kv" and v is not None:
                extra["kv"] = {"keep": {self._ref(si): float(v) for si in self.scales[:-1]}, "score": "dist"}
        sched = Schedule(self.sizes)
        pruned = sorted(sched.resolve(r) for r, v in keep.items() if v > 0.0)
        skipped = {sched.resolve(r) for r, v in keep.items() if v == 0.0}
        cut = self.rows_from(extra["guidance"]["cond_only_from"]) if "guidance" in extra else None
        cache_scale = None
        if pruned:
            first = pruned[0]
            lo = 0
            if cut is not None and pruned[-1] >= cut:
                # the restore cache must hold the rows the pruned scales forward (B after the guidance cut)
                if first < cut:
                    raise PlanError("pruned scales on both sides of the guidance cut")
                lo = cut
            cs = [si for si in range(lo, first) if si not in skipped]
            if not cs:
                raise PlanError("no computed scale between the guidance cut and the first pruned scale")
            cache_scale = self._ref(cs[-1])
        if cache is not None and cut is not None:
            # a reused feature must come from a stage with the same rows: drop reuse across the cut
            tokens = sched.token_counts
            cache_si = [sched.token_counts.index(int(t)) for t in cache.cache_stages]
            computed = [c for c in cache_si if c not in skipped]
            keep_skip = []
            for t in cache.skip_stages:
                si = tokens.index(int(t))
                src = [c for c in computed if c < si]
                if src and not (si >= cut and src[-1] < cut):
                    keep_skip.append(t)
            if not keep_skip:
                cache = None
            else:
                cache = dataclasses.replace(cache, skip_stages=tuple(keep_skip))
        desc = ", ".join(k.describe(point[k.name]) for k in self.knobs if point[k.name])
        return AccelPlan(name="tuned", keep=keep, layers=layers if pruned else None,
                         branches=tuple(self.model.flop_dims().branches), cache_scale=cache_scale, cache=cache,
                         description=desc or "no acceleration", **extra)

    def rows_from(self, ref: str | None) -> int | None:
        """The index of the first conditional-only scale of a ``cond_only_from`` ref (None: no cut)."""
        if ref is None:
            return None
        n = len(self.sizes)
        r = str(ref).strip()
        try:
            return n + int(r[1:]) if r.startswith("#-") else Schedule(self.sizes).resolve(r)
        except ValueError:
            return None

    # ------------------------------------------------------------------ search
    def _out_of_time(self) -> bool:
        """Past the time limit, counting the time the final timing and the held-out check will still need
        (predicted from the baseline's seconds per generation), so the whole run aims at the limit."""
        if self.time_limit_s is None:
            return False
        n_pre = sum(1 for c in self.preset_cands.values() if c.meets)
        rounds = self.warmup + self.repeats
        gens = (1 + self.finalists + n_pre) * rounds  # finalists timing, one seed
        if self.heldout is not None:
            gens += len(self.heldout.seeds) * (2 + len(self.preset_cands))  # held-out quality
            gens += (2 + n_pre) * rounds  # held-out timing
        reserve = gens * self.cost.total_seconds
        return time.perf_counter() - self.t0 + reserve > self.time_limit_s

    def _eval_point(self, point: dict[str, int], why: str) -> Candidate | None:
        try:
            plan = self.plan_for(point)
            return self.evaluate(plan, why, point)
        except PlanError as e:
            self.log(f"      skipped {why}: {e}")
            return None
        except RuntimeError as e:  # a combination the engine cannot run: a hole in the space, not the end
            self.log(f"      failed {why}: {str(e).splitlines()[0]}")
            return None

    def predict(self, plan: AccelPlan | None) -> dict[str, float]:
        """Predicted seconds / speedup / FLOP ratio of a plan (no generation)."""
        sim = None
        if plan is not None and plan.cache is not None and plan.cache.skip_stages and not plan.cache.calibration:
            sim = self.similarity_for(plan.cache)[1]
        counts = predict_counts(plan, self.sizes, self.model.depth, self.model.flop_dims().branches, sim)
        return self.cost.predict(counts, self.rows(plan), self.kv_fractions(plan))

    def kv_fractions(self, plan: AccelPlan | None) -> dict[int, float]:
        """Scale -> fraction of its keys/values kept, for a plan whose ``kv`` budget applies to every layer
        with one fraction per scale (what the KV knob writes; other KV plans are predicted without it)."""
        kv = getattr(plan, "kv", None)
        if kv is None or kv.is_identity or kv.layers is not None or kv.drafters is not None:
            return {}
        out = {}
        for ref, f in kv.keep.items():
            si = self.rows_from(ref)
            if si is not None and f < 1.0:
                out[si] = f
        return out

    def rows(self, plan: AccelPlan | None) -> dict[int, int]:
        """Batch rows per scale where they differ from the CFG-doubled batch (conditional-only scales)."""
        g = getattr(plan, "guidance", None)
        if g is None or g.cond_only_from is None:
            return {}
        first = self.rows_from(g.cond_only_from)
        if first is None:
            return {}
        return {si: self.cost.batch // 2 for si in range(first, len(self.sizes))}

    def search(self) -> None:
        """Lazy greedy over the knobs from the start point; see the module docstring.

        A *move* is a knob and a kind: "step" advances the knob by its ``step`` (levels: doubled after
        an accepted move, halved after a move that breaks the budget — bisection; a one-level step that
        breaks it retires the knob: by monotonicity it breaks it from every later point too); "jump"
        (keep knobs) goes straight to the knob's last level, skipping the scale, which saves more per
        unit of quality than the pruning steps towards it suggest (no pivotal selection, no restore, no
        sampling at that scale); a jump that breaks the budget retires the jump only. Each move's
        ``eff`` (predicted seconds saved per unit of normalised budget slack used) is remembered with
        whether it was measured at the current point (``fresh``); the best move is taken only when
        fresh, a stale best is re-measured first. A move that saves nothing predicted is not measured
        (checked again at every new point: pruning more layers saves nothing until a scale is pruned).
        """
        kn = {k.name: k for k in self.knobs}
        x = {k.name: 0 for k in self.knobs}
        cur = self._eval_point(x, "start")
        if cur is None:
            raise PlanError("the start point of the search is not a valid plan")
        step = {k.name: k.step for k in self.knobs}
        alive: set[tuple[str, str]] = {(k.name, "step") for k in self.knobs}
        alive |= {(k.name, "jump") for k in self.knobs if k.kind == "keep"}
        eff: dict[tuple[str, str], float] = {}
        last: dict[tuple[str, str], tuple[dict[str, int], Candidate]] = {}
        fresh: set[tuple[str, str]] = set()
        evals = 0

        def target(move: tuple[str, str]) -> dict[str, int]:
            name, kind = move
            top = len(kn[name].levels) - 1
            y = dict(x)
            y[name] = top if kind == "jump" else min(top, x[name] + step[name])
            return y

        def retire_knob(name: str) -> None:
            for m in [m for m in alive if m[0] == name]:
                alive.discard(m)

        while True:
            for name in {m[0] for m in alive}:
                if x[name] >= len(kn[name].levels) - 1:
                    retire_knob(name)
            saving: dict[tuple[str, str], float] = {}
            for m in sorted(alive):
                if m[1] == "jump" and target(m) == target((m[0], "step")):
                    continue  # the step reaches the last level itself
                try:
                    saving[m] = cur.seconds_est - self.predict(self.plan_for(target(m)))["seconds_est"]
                except PlanError:
                    saving[m] = 0.0
            live = [m for m in sorted(saving) if saving[m] > 1e-9 * max(cur.seconds_est, 1e-9)]
            if not live:
                break
            if self._out_of_time() or evals >= self.max_evals:
                self.log("search stopped: " + ("time limit" if self._out_of_time() else "evaluation limit (--max-evals)"))
                break
            unprobed = [m for m in live if m not in eff]
            move = unprobed[0] if unprobed else max(live, key=lambda m: (eff[m], m))
            name, kind = move
            if move in fresh:  # the best move was measured at this point: take it
                x, cur = last[move][0], last[move][1]
                self.log(f"      -> move {kn[name].describe(x[name])}: predicted {cur.speedup_est:.2f}x, "
                         f"slack {self.slack(cur):.3f}")
                if kind == "step":
                    step[name] *= 2
                fresh = set()
                continue
            y = target(move)
            c = self._eval_point(y, f"{kn[name].describe(y[name])} ({kind} +{y[name] - x[name]})")
            evals += 1
            if c is None:
                alive.discard(move)
                continue
            if not c.meets:
                eff.pop(move, None)
                fresh.discard(move)
                if kind == "jump":
                    alive.discard(move)
                elif step[name] > 1:
                    step[name] = max(1, step[name] // 2)
                else:
                    retire_knob(name)
                continue
            used = self.slack(cur) - self.slack(c)
            eff[move] = saving[move] / max(used, 1e-6)
            last[move] = (y, c)
            fresh.add(move)
        self.point = x

    # ------------------------------------------------------------------ timing
    def time_interleaved(self, entries: Sequence[tuple[str, Hooks]], cs: CondSet, tag: str) -> dict[str, float]:
        """Median transformer seconds per entry on the conditions of ``cs`` with its first seed (speed does
        not depend on the seed; one seed halves the cost): ``warmup`` untimed rounds, then ``repeats``
        rounds running every entry once each, interleaved so machine load falls on all alike — the run
        primitive (:func:`fastvar.eval.run.run_plans`) where this install has it. Cached in the state file."""
        key = _digest({"cs": self._condkey(cs), "entries": [n for n, _ in entries], "tag": tag,
                       "r": self.repeats, "w": self.warmup, "seed": cs.seeds[0], "clock": self.clock})
        rec = self.state.find("timing", key)
        if rec is not None:
            self.timings[tag] = rec
            return rec["seconds"]
        try:
            from ..eval.run import run_plans
        except ImportError:  # an install without the run primitive: the same loop, here
            run_plans = None
        secs: dict[str, list[float]] = {}
        wall: dict[str, list[float]] = {}
        if run_plans is not None:
            kw = {"clock": self.clock} if self.clock != "wall" else {}
            res = run_plans(self.pipe, list(cs.conditions), list(entries), repeats=self.repeats, warmup=self.warmup,
                            seed=cs.seeds[0], calibrate=False, decode=False, log=None, **kw)
            secs = {r.name: list(r.seconds) for r in res}
            wall = {r.name: list(getattr(r, "wall_seconds", None) or r.seconds) for r in res}
        else:
            if self.clock != "wall":
                raise UsageError("--clock cpu needs the run primitive (fastvar.eval.run) of a newer fastvar")
            one = CondSet(cs.conditions, cs.seeds[:1])
            for _ in range(self.warmup):
                for _n, h in entries:
                    self._run(h, one, decode=False)
            secs = {n: [] for n, _ in entries}
            for _ in range(self.repeats):
                for n, h in entries:
                    secs[n].append(self._run(h, one, decode=False)[1])
            wall = secs
        med = {n: statistics.median(v) for n, v in secs.items()}
        self.log(f"timing {tag} ({self.clock} clock, median of {self.repeats} interleaved, seed {cs.seeds[0]}): " +
                 " ".join(f"{n} {med[n]:.2f}s" for n, _ in entries))
        rec = {"type": "timing", "key": key, "clock": self.clock, "seconds": med, "all": secs,
               "wall_median": {n: statistics.median(v) for n, v in wall.items()}, "wall_all": wall}
        self.state.append(rec)
        self.timings[tag] = rec
        return med

    def profile(self) -> CostModel:
        """The baseline's per-scale block seconds (recorder of a policy-free engine), median of repeats."""
        from .engine import Engine

        one = CondSet(self.calib.conditions, self.calib.seeds[:1])
        key = self._condkey(one)
        rec = self.state.find("profile", key)
        if rec is None:
            runs = []
            for i in range(self.warmup + self.repeats):
                eng = Engine([], depth=self.model.depth)
                _, secs, stats = self._run(eng, one, decode=False)
                if i >= self.warmup:
                    per: dict[int, float] = {}
                    for st in stats:
                        for si, t in st["scale_seconds"].items():
                            per[int(si)] = per.get(int(si), 0.0) + t
                    runs.append((secs, per))
            rec = {"type": "profile", "key": key, "seconds": statistics.median(r[0] for r in runs),
                   "scale_seconds": {str(si): statistics.median(r[1][si] for r in runs) for si in runs[0][1]}}
            self.state.append(rec)
        return CostModel(self.sizes, self.model.depth, self.model.flop_dims(), 2 * len(self.calib.conditions),
                         rec["seconds"], {int(k): v for k, v in rec["scale_seconds"].items()})

    # ------------------------------------------------------------------ presets
    def preset_plans(self) -> list[tuple[str, AccelPlan]]:
        from ..eval.compare import resolve_config

        out = []
        for name in self.presets:
            plan = resolve_config(name, self.model)
            if plan is None or plan.is_identity:
                continue
            out.append((name, plan))
        return out

    # ------------------------------------------------------------------ the whole run
    def run(self) -> dict[str, Any]:
        t_start, cpu0 = time.time(), time.process_time()
        load0 = _loadavg()
        base_imgs, base_q = self.baseline(self.calib)
        for b in self.budgets:
            if b.slack(base_q, base_q) < 0:
                raise UsageError(f"--budget {b.text}: the baseline itself scores {b.metric} {base_q[b.metric]:.4f} "
                                 "on the calibration set, so no plan can meet it; loosen the budget")
        self.cost = self.profile()
        self.log(f"baseline: {self.cost.total_seconds:.2f}s per generation of {len(self.calib.conditions)} "
                 f"(calibration: {len(self.calib.conditions)} conditions x {len(self.calib.seeds)} seeds)")
        self.knobs = self.build_knobs()
        self.log("knobs: " + "; ".join(f"{k.name} ({len(k.levels)} levels)" for k in self.knobs))
        # presets as candidates on the calibration set (they compete for the final choice)
        preset_cands: dict[str, Candidate] = {}
        self.preset_cands = preset_cands
        for name, plan in self.preset_plans():
            try:
                preset_cands[name] = self.evaluate(plan, f"preset:{name}")
            except PlanError as e:
                self.log(f"preset {name} skipped: {e}")
        self.search()
        # finalists: the fastest predicted searched candidates meeting the budget, and every preset meeting it
        searched = sorted((c for c in self.candidates if c.meets and c.plan is not None and not c.plan.is_identity
                           and not c.source.startswith("preset:")), key=lambda c: -c.speedup_est)
        final = searched[: self.finalists]
        final += [c for c in preset_cands.values() if c.meets and c not in final]
        chosen: Candidate | None = None
        if final:
            entries = [("baseline", IDENTITY)] + [(f"c{c.id}", self._engine(c.plan, self.similarity.get(c.sim_key)))
                                                 for c in final]
            med = self.time_interleaved(entries, self.calib, "finalists")
            for c in final:
                c.speedup_measured = med["baseline"] / med[f"c{c.id}"]
            chosen = max(final, key=lambda c: (c.speedup_measured, self.slack(c)))
        else:
            self.log("no candidate meets the budget: the chosen plan is no plan")
        # held-out check: the chosen plan (and the presets, side by side) on conditions and seeds not searched
        heldout = None
        if self.heldout is not None:
            heldout = self.heldout_check(chosen, preset_cands)
        report = self.report(chosen, preset_cands, heldout, base_q)
        report["wall_seconds"] = time.time() - t_start
        report["cpu_seconds"] = time.process_time() - cpu0  # this process's CPU time: the load-free cost
        report["machine"] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                             "loadavg_start": load0, "loadavg_end": _loadavg(),
                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        report["evaluations"] = {"generated": self.generated, "reused_from_state": self.reused,
                                 "candidates": len(self.candidates)}
        return report

    def heldout_check(self, chosen: Candidate | None, presets: dict[str, Candidate]) -> dict[str, Any]:
        cs = self.heldout
        base_imgs, base_q = self.baseline(cs)
        rows: dict[str, dict[str, Any]] = {}
        entries: list[tuple[str, Hooks]] = [("baseline", IDENTITY)]
        todo: list[tuple[str, Candidate]] = []
        if chosen is not None:
            todo.append(("tuned", chosen))
        todo += [(f"preset:{n}", c) for n, c in presets.items()]
        for name, c in todo:
            key = _digest({"cs": self._condkey(cs), "plan": _plan_identity(c.plan), "sim": c.sim_key, "m": self.metrics})
            rec = self.state.find("heldout", key)
            if rec is None:
                imgs, secs, _ = self._run(self._engine(c.plan, self.similarity.get(c.sim_key)), cs, decode=True)
                per = score_per_image(self.metrics, imgs, base_imgs, cs.labels(), self.lpips_fn)
                rec = {"type": "heldout", "key": key, "quality": {m: sum(v) / len(v) for m, v in per.items()},
                       "quality_se": standard_errors(per), "per_image": per}
                self.state.append(rec)
            meets = all(b.holds(rec["quality"], base_q) for b in self.budgets)
            rows[name] = {"quality": rec["quality"], "quality_se": rec.get("quality_se"), "meets_budget": meets,
                          "flop_ratio": c.flop_ratio,
                          "speedup_est": c.speedup_est, "candidate": c.id, "speedup": None, "seconds": None}
            # timed: the tuned plan and the presets that meet the budget here (the ones it must beat)
            if name == "tuned" or meets or self.time_all_presets:
                entries.append((name, self._engine(c.plan, self.similarity.get(c.sim_key))))
            self.log(f"held-out {name:<28} " + " ".join(f"{m} {rec['quality'][m]:.4f}" for m in self.metrics)
                     + ("" if meets else " (misses the budget)"))
        med = self.time_interleaved(entries, cs, "heldout")
        wall = self.timings["heldout"].get("wall_median", med)
        for name, _ in entries[1:]:
            rows[name]["speedup"] = med["baseline"] / med[name]
            rows[name]["seconds"] = med[name]
            rows[name]["speedup_wall"] = wall["baseline"] / wall[name]
        return {"set": cs.to_dict(), "baseline_seconds": med["baseline"], "baseline_quality": base_q, "rows": rows}

    def report(self, chosen: Candidate | None, presets: dict[str, Candidate], heldout: dict | None,
               base_q: dict[str, float]) -> dict[str, Any]:
        sign = 1.0 if self.primary.spec.higher_is_better else -1.0
        pts = [(c.speedup_est, sign * c.quality[self.primary.metric]) for c in self.candidates]
        front = [self.candidates[i].id for i in pareto_front(pts)]
        out: dict[str, Any] = {
            "format": FORMAT,
            "budget": [b.to_dict() for b in self.budgets],
            "margin": self.margin,
            "confidence": self.confidence,
            "primary_metric": self.primary.metric,
            "context": self.context,
            "calibration": self.calib.to_dict(),
            "heldout_set": self.heldout.to_dict() if self.heldout else None,
            "baseline": {"seconds_per_generation": self.cost.total_seconds,
                         "scale_seconds": {str(k): v for k, v in self.cost.scale_seconds.items()},
                         "total_flops": self.cost.base_flops, "quality": base_q},
            "knobs": [{"name": k.name, "kind": k.kind, "levels": k.levels} for k in self.knobs],
            "layer_similarity": {str(k): v for k, v in self.layer_similarity.items()},
            "clock": self.clock,
            "timings": self.timings,
            "speed_note": ("speedup_est: the baseline's per-scale block seconds scaled by each scale's FLOP ratio "
                           "(ranks the search); speedup: measured, median of interleaved repeats against the baseline "
                           "after a warm-up (finalists, chosen plan, held-out rows), on the clock named by 'clock' "
                           "(held-out rows also give speedup_wall)"),
            "candidates": [c.to_dict() for c in self.candidates],
            "pareto_front": front,
            "presets": {n: {"candidate": c.id, "quality": c.quality, "meets_budget": c.meets, "speedup_est": c.speedup_est,
                            "flop_ratio": c.flop_ratio, "speedup": c.speedup_measured} for n, c in presets.items()},
            "chosen": None,
            "heldout": heldout,
        }
        if chosen is not None:
            out["chosen"] = {"candidate": chosen.id, "source": chosen.source,
                             "plan": chosen.plan.to_dict() if chosen.plan else None,
                             "calibration": {"quality": chosen.quality, "quality_se": chosen.quality_se,
                                             "speedup": chosen.speedup_measured,
                                             "speedup_est": chosen.speedup_est, "flop_ratio": chosen.flop_ratio,
                                             "meets_budget": chosen.meets}}
            if heldout is not None and "tuned" in heldout["rows"]:
                out["chosen"]["heldout"] = heldout["rows"]["tuned"]
        return out


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ============================================================================================== outputs
def write_plan(report: dict, tuner: Tuner, out: str | Path) -> Path | None:
    """The chosen plan as JSON (with its similarity file beside it when it caches features)."""
    from ..pipelines.common import atomic_write_text

    ch = report.get("chosen")
    if ch is None or ch["plan"] is None:
        return None
    c = tuner.candidates[ch["candidate"]]
    plan = c.plan
    q = ch["calibration"]["quality"]
    desc = (f"fastvar tune: {' and '.join(b.text for b in tuner.budgets)}; calibration "
            + ", ".join(f"{m} {v:.4f}" for m, v in q.items())
            + (f", {ch['calibration']['speedup']:.2f}x measured" if ch["calibration"]["speedup"] else "")
            + f"; {plan.description}")
    plan = dataclasses.replace(plan, name="tuned", description=desc)
    out = Path(out)
    if plan.cache is not None and plan.cache.skip_stages:
        sim_path = out.with_name(out.stem + ".sim.json")
        tuner.similarity[c.sim_key].save(sim_path)
        plan = dataclasses.replace(plan, cache=dataclasses.replace(plan.cache, sim_path=str(sim_path)))
    atomic_write_text(plan.to_json() + "\n", out)
    return out


def plot_report(report: dict, path: str | Path) -> Path:
    """Quality vs speedup: every candidate (predicted speedup), the Pareto front, the presets marked, and
    the chosen plan with its measured calibration and held-out speedups."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or pip install 'fastvar-vision[plot]')") from None
    from ..checkpoints import atomic_output

    m = report["primary_metric"]
    cands = report["candidates"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.scatter([c["speedup_est"] for c in cands], [c["quality"][m] for c in cands], s=14, c="0.6",
               label="candidates (predicted speedup)")
    front = [cands[i] for i in report["pareto_front"]]
    ax.plot([c["speedup_est"] for c in front], [c["quality"][m] for c in front], "-", c="tab:blue", lw=1,
            label="Pareto front")
    for name, p in report["presets"].items():
        ax.scatter([p["speedup_est"]], [p["quality"][m]], marker="s", s=30, c="tab:orange")
        ax.annotate(name, (p["speedup_est"], p["quality"][m]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ch = report.get("chosen")
    if ch is not None:
        c = cands[ch["candidate"]]
        ax.scatter([c["speedup_est"]], [c["quality"][m]], marker="*", s=160, c="tab:red", label="chosen (predicted)")
        if ch["calibration"].get("speedup"):
            ax.scatter([ch["calibration"]["speedup"]], [c["quality"][m]], marker="*", s=160, facecolors="none",
                       edgecolors="tab:red", label="chosen (measured, calibration)")
        ho = ch.get("heldout")
        if ho and ho.get("speedup"):
            ax.scatter([ho["speedup"]], [ho["quality"][m]], marker="D", s=50, c="tab:green", label="chosen (held-out)")
    for b in report["budget"]:
        if b["metric"] == m and not b["relative"]:
            ax.axhline(b["value"], ls="--", c="tab:red", lw=0.8)
    ax.set_xlabel("speedup over the baseline (x)")
    ax.set_ylabel(f"{m} (calibration set)")
    ax.set_title(f"fastvar tune: {', '.join(b['text'] for b in report['budget'])}", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_output(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def summary_lines(report: dict) -> list[str]:
    m = report["primary_metric"]
    lines = []
    ch = report.get("chosen")
    if ch is None:
        return ["no plan meets the budget on the calibration set (the baseline is the answer)"]
    cal = ch["calibration"]
    lines.append(f"chosen plan (candidate {ch['candidate']}, {ch['source']}): calibration {m} {cal['quality'][m]:.4f}, "
                 f"speedup {cal['speedup']:.2f}x measured ({cal['speedup_est']:.2f}x predicted), FLOPs x{cal['flop_ratio']:.2f}")
    ho = ch.get("heldout")
    if ho:
        lines.append(f"held-out: {m} {ho['quality'][m]:.4f} ({'meets' if ho['meets_budget'] else 'MISSES'} the budget), "
                     f"speedup {ho['speedup']:.2f}x measured")
        rows = report["heldout"]["rows"]
        for name, r in rows.items():
            if name != "tuned":
                sp = "   (untimed)" if r["speedup"] is None else f"  {r['speedup']:.2f}x"
                lines.append(f"  {name:<28} {m} {r['quality'][m]:.4f}{sp}  {'meets' if r['meets_budget'] else 'misses'}")
    return lines


# ============================================================================================== CLI
DEFAULT_HELDOUT_SEEDS = (100, 101)


def default_presets() -> list[str]:
    """Every named plan a user could pick instead: the pruning/skipping presets, the caching presets and
    FastVAR + the original caching (new presets appear here as they are added)."""
    from .cache_presets import CACHE_PRESETS
    from .presets import PRESETS

    names = [n for n in PRESETS if n not in ("none", "identity")]
    names += [n for n in CACHE_PRESETS if n != "no-cache"]
    return names + ["fastvar+original"]


def add_tune_parser(subparsers) -> None:
    """Register ``fastvar tune`` on the main parser (called by :func:`fastvar.cli.build_parser`)."""
    from .. import cli as main_cli
    from ..validate import cli_float, cli_int

    t = subparsers.add_parser("tune", help="find the fastest plan that meets a quality budget (search, report, held-out check)")
    main_cli._add_model_args(t, default_model="embedded")
    t.add_argument("--budget", action="append", required=False, default=None,
                   help="quality budget, repeatable: ssim>=0.95, psnr>=30, lpips<=0.1, accuracy>=0.9, "
                        "accuracy>=baseline-0.02")
    t.add_argument("--calib-classes", dest="calib_classes", type=cli_int, nargs="+", default=None,
                   help="class ids searched on (default: the first half of the first 10 classes)")
    t.add_argument("--calib-prompts", dest="calib_prompts", nargs="+", default=None, help="prompts searched on")
    t.add_argument("--calib-seeds", dest="calib_seeds", type=cli_int, nargs="+", default=[0, 1])
    t.add_argument("--heldout-classes", dest="heldout_classes", type=cli_int, nargs="+", default=None,
                   help="class ids of the held-out check (default: the other half)")
    t.add_argument("--heldout-prompts", dest="heldout_prompts", nargs="+", default=None)
    t.add_argument("--heldout-seeds", dest="heldout_seeds", type=cli_int, nargs="+", default=list(DEFAULT_HELDOUT_SEEDS))
    t.add_argument("--no-heldout", dest="no_heldout", action="store_true", help="skip the held-out check")
    t.add_argument("--presets", nargs="*", default=None,
                   help="presets compared side by side and competing for the choice (default: all; none: --presets)")
    t.add_argument("--time-limit", dest="time_limit", type=cli_float, default=None, metavar="MIN",
                   help="aim to finish within MIN minutes: the search stops early, leaving the predicted time of "
                        "the final timing and the held-out check")
    t.add_argument("--max-evals", dest="max_evals", type=cli_int, default=80, help="most candidates evaluated")
    t.add_argument("--repeats", type=cli_int, default=3, help="interleaved timed repeats (median)")
    t.add_argument("--warmup", type=cli_int, default=1)
    t.add_argument("--finalists", type=cli_int, default=3, help="searched candidates timed for the final choice")
    t.add_argument("--scales", type=cli_int, default=None,
                   help="tune the last N scales (default: those with >= 4%% of the FLOPs)")
    t.add_argument("--state", default=None, help="state folder (default: <--json or --out>.tune); a rerun resumes from it")
    t.add_argument("--out", default="tuned_plan.json", help="the chosen plan (JSON)")
    t.add_argument("--json", default=None, help="the report: every candidate, Pareto front, presets, held-out check")
    t.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="quality vs speedup with the presets marked (default: beside the report); needs matplotlib")
    t.add_argument("--margin", type=cli_float, default=0.0,
                   help="search with this much slack kept in every budget (metric units, e.g. 0.005 for SSIM): "
                        "calibration sets are small, a margin makes the held-out check likelier to pass")
    t.add_argument("--confidence", type=cli_float, default=1.0, metavar="Z",
                   help="a candidate meets the budget when its calibration mean minus Z standard errors (over the "
                        "images) does (default 1; 0 = the mean alone)")
    t.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the final timing measures: the pipeline's wall time, or this process's CPU time "
                        "(steadier on a CPU shared with other jobs; both are recorded)")
    t.add_argument("--time-all-presets", dest="time_all_presets", action="store_true",
                   help="held-out: also time the presets that miss the budget (default: only those that meet it)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_tune)


def _condset(args, spec, which: str, default: list) -> CondSet:
    from .. import validate

    classes, prompts, seeds = (getattr(args, f"{which}_classes"), getattr(args, f"{which}_prompts"),
                               getattr(args, f"{which}_seeds"))
    flag = f"--{which}"
    text = spec.family != "var"
    if text and classes:
        raise UsageError(f"{flag}-classes: {spec.name} is a text-to-image model; give {flag}-prompts")
    if not text and prompts:
        raise UsageError(f"{flag}-prompts: {spec.name} is class-conditional; give {flag}-classes")
    if text:
        conds = validate.prompts(prompts if prompts else default, f"{flag}-prompts", spec.name)
    else:
        conds = validate.class_ids(classes if classes else default, spec.config["num_classes"], f"{flag}-classes",
                                   spec.name)
    if not seeds:
        raise UsageError(f"{flag}-seeds: give at least one seed, e.g. {flag}-seeds 0")
    for s in seeds:
        validate.seed(s, f"{flag}-seeds")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"{flag}-seeds {' '.join(map(str, seeds))}: a seed is repeated; give distinct seeds")
    return CondSet(list(conds), list(seeds))


def check_tune_args(args, spec) -> tuple[list[Budget], CondSet, CondSet | None, list[str], Path]:
    """Everything checkable before the model loads: budgets, sets, presets, numbers, output paths."""
    from .. import validate
    from ..cli import DEFAULT_PROMPTS

    if not args.budget:
        raise UsageError("--budget is required, e.g. --budget ssim>=0.95 (repeat it for several bounds)")
    budgets = [parse_budget(b) for b in args.budget]
    check_metrics_available(budgets, spec.family, spec.name)
    if spec.family == "var":
        n = min(spec.config["num_classes"], 10)
        half = max(1, n // 2)
        cdef, hdef = list(range(half)), list(range(half, n)) or list(range(half))
    else:
        cdef, hdef = list(DEFAULT_PROMPTS[:2]), list(DEFAULT_PROMPTS[2:])
    calib = _condset(args, spec, "calib", cdef)
    heldout = None if args.no_heldout else _condset(args, spec, "heldout", hdef)
    if heldout is not None and set(heldout.seeds) & set(calib.seeds) and set(heldout.conditions) & set(calib.conditions):
        raise UsageError("--heldout-classes/--heldout-seeds overlap the calibration set (same condition and seed); "
                         "give held-out conditions or seeds the search does not use, e.g. --heldout-seeds 100 101")
    presets = default_presets() if args.presets is None else list(args.presets)
    if presets:
        from ..cli import _check_compare_configs

        _check_compare_configs(presets)
    validate.int_at_least(args.max_evals, "--max-evals", 1, "candidates evaluated", 80)
    validate.int_at_least(args.repeats, "--repeats", 1, "timed repeats", 3)
    validate.int_at_least(args.warmup, "--warmup", 0, "untimed rounds")
    validate.int_at_least(args.finalists, "--finalists", 1, "candidates timed at the end", 3)
    validate.number_in(args.margin, "--margin", 0.0, None, meaning="slack kept in every budget", example="0.005")
    validate.number_in(args.confidence, "--confidence", 0.0, None, meaning="standard errors of the mean", example="1")
    if args.scales is not None:
        validate.int_at_least(args.scales, "--scales", 1, "tuned scales", 4)
    if args.time_limit is not None:
        validate.number_in(args.time_limit, "--time-limit", 0.0, None, lo_open=True, meaning="minutes", example="20")
    validate.output_file(args.out, "--out")
    if args.json is not None:
        validate.output_file(args.json, "--json")
    if args.plot not in (None, ""):
        validate.output_file(args.plot, "--plot")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or drop --plot)") from None
    state = Path(args.state) if args.state else Path(args.json or args.out).with_suffix(".tune")
    if state.exists() and not state.is_dir():
        raise UsageError(f"--state {state}: is a file; pass a folder (it holds the resumable search state)")
    return budgets, calib, heldout, presets, state


def cmd_tune(args) -> int:
    from .. import cli as main_cli
    from ..pipelines.common import atomic_write_text

    spec = main_cli._spec_for(args)
    budgets, calib, heldout, presets, state = check_tune_args(args, spec)
    main_cli._family_kwargs(args, spec)
    main_cli._schedule_for(spec, args)
    pipe = main_cli._build_pipeline(args, spec)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    ctx = {"weights": args.weights, "vae_weights": args.vae_weights, "random_init": args.random_init}
    tuner = Tuner(pipe, budgets, calib, heldout, state, presets=presets, repeats=args.repeats, warmup=args.warmup,
                  finalists=args.finalists, max_evals=args.max_evals,
                  time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit, n_scales=args.scales,
                  log=log, context=ctx, time_all_presets=args.time_all_presets, margin=args.margin,
                  clock=args.clock, confidence=args.confidence)
    report = tuner.run()
    prog = Path(sys.argv[0]).name if sys.argv else ""
    report["command"] = " ".join(["fastvar", *sys.argv[1:]]) if prog in ("fastvar", "__main__.py") else None
    plan_path = write_plan(report, tuner, args.out)
    report["plan_file"] = str(plan_path) if plan_path else None
    if args.json:
        atomic_write_text(json.dumps(report, indent=1, default=_json_default), Path(args.json))
    if args.plot is not None:
        png = Path(args.plot) if args.plot else Path(args.json or args.out).with_suffix(".png")
        plot_report(report, png)
        print(f"wrote {png}")
    for line in summary_lines(report):
        print(line)
    load = report["machine"]["loadavg_end"]
    print(f"wrote {plan_path or '(no plan: nothing meets the budget)'}" + (f" and {args.json}" if args.json else "")
          + f" in {report['wall_seconds'] / 60:.1f} min wall, {report['cpu_seconds'] / 60:.1f} min CPU"
          + (f" (load average {load[0]:.1f})" if load else "")
          + f"; {report['evaluations']['generated']} candidates generated, "
          f"{report['evaluations']['reused_from_state']} reused")
    return 0


__all__ = ["Budget", "CondSet", "CostModel", "KEEP_LADDER", "METRICS", "Tuner", "add_tune_parser", "cmd_tune",
           "parse_budget", "pareto_front", "predict_counts", "score_images", "write_plan", "plot_report"]

"""KV-cache compression as a policy: each layer keeps a budgeted subset of every scale's keys/values.

Why: with next-scale prediction every scale's keys/values stay in every layer's cache for all later
scales, so the cache of the large scales dominates memory (ScaleKV, arXiv 2505.19602: Infinity-8B
85 GB -> 8.5 GB). The methods this policy follows, in our own code:

- **Budgets per scale and layer** (ScaleKV). Layers differ: *drafters* spread their attention over the
  earlier scales and need a large cache, *refiners* attend to the current token map and need little.
  A budget is a fraction of a scale's tokens, given per scale for drafters (``keep``) and refiners
  (``refiner_keep``); which layers are drafters (per scale) is either named in the plan or measured by
  :func:`calibrate_drafters` from one calibration generation: the share of attention a layer's queries
  put on earlier scales (its dispersion over the history) — the drafters are the layers with the most.
- **Per-head subsets** (HACK, arXiv 2504.09261). Heads attend differently (some to a few keys every
  query shares, some to the query's own neighbourhood), so with ``per_head`` each head keeps its own
  subset, gathered per head; every head of a layer keeps the same count (one rectangular tensor, so
  SDPA / flash-attn / the official math paths take it unchanged: attention over a set of keys does not
  depend on their order, and RoPE is applied before caching in Infinity and HART).
- **Scores**: "attn" ranks a scale's keys by the attention its own queries give them (a subsample of at
  most :data:`OBS_QUERIES` queries: the observation window), "dist" by the distance of the key to the
  scale's mean key (no queries needed), "grid" keeps a spatially even subset (ordered dithering; shifted
  per head so the heads together cover more positions), "mix" half by "attn" and the rest by "grid".
- **The last scale** is read by no later scale: ``keep_last=False`` stores none of it (no output changes).

Memory is really saved: :meth:`KVPolicy.kv_tokens` returns the budgeted count, which the backbones use to
size each layer's cache buffer; the current scale still attends to all its own keys (a transient the
cache frees after the attention). The first scale is never compressed (in HART it holds the text prefix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..schedules import Schedule
from .engine import Engine, Policy
from .plan import KVConfig, PlanError

OBS_QUERIES = 256
"""Most queries of a scale used to score its keys (strided subsample: the cost stays O(256·n) per layer)."""


def kv_scores(k: Tensor) -> Tensor:
    """(B, n) score of every appended token: squared distance of its key to the mean key, summed over heads."""
    return _dist_scores(k).sum(dim=1)


def _dist_scores(k: Tensor) -> Tensor:
    """(B, H, n): squared distance of each head's key to that head's mean key of the scale."""
    d = k.float() - k.float().mean(dim=2, keepdim=True)
    return d.mul_(d).sum(dim=3)


def _obs(q: Tensor) -> Tensor:
    n = q.shape[2]
    if n <= OBS_QUERIES:
        return q
    idx = torch.linspace(0, n - 1, OBS_QUERIES, device=q.device).round().long()
    return q.index_select(2, idx)


def _attn_scores(k: Tensor, q: Tensor, scale: float | None) -> Tensor:
    """(B, H, n): attention each key of the scale receives from the scale's (observation) queries."""
    qo = _obs(q).float()
    s = 1.0 if scale is None else float(scale)
    logits = torch.matmul(qo, k.float().transpose(-1, -2)).mul_(s)
    return logits.softmax(dim=-1).sum(dim=2)


def _bayer_rank(h: int, w: int, dy: int = 0, dx: int = 0, device=None) -> Tensor:
    """(h*w,) ordered-dithering rank of each raster position (low = kept first): any prefix of the order
    is spread evenly over the map. ``dy``/``dx`` shift the pattern (a different subset per head)."""
    b = max(1, math.ceil(math.log2(max(h, w, 2))))
    size = 1 << b
    y = (torch.arange(h, device=device).view(h, 1) + dy) % size
    x = (torch.arange(w, device=device).view(1, w) + dx) % size
    y, x = y.expand(h, w), x.expand(h, w)
    xy = x ^ y
    r = torch.zeros(h, w, dtype=torch.long, device=device)
    for bit in range(b):  # interleave the bits of (x ^ y, y), most significant last -> reversed order
        r |= ((xy >> bit) & 1) << (2 * (b - 1 - bit) + 1)
        r |= ((y >> bit) & 1) << (2 * (b - 1 - bit))
    return r.reshape(-1)


_HEAD_SHIFTS = ((0, 0), (1, 1), (0, 1), (1, 0), (2, 1), (1, 2), (3, 3), (2, 3))


def _grid_scores(B: int, H: int, n: int, hw: tuple[int, int], per_head: bool, device) -> Tensor:
    """(B, H, n) scores whose top-m is a spatially even subset (per head shifted with ``per_head``)."""
    h, w = hw
    rows = []
    for head in range(H if per_head else 1):
        if h * w == n:
            dy, dx = _HEAD_SHIFTS[head % len(_HEAD_SHIFTS)]
            rank = _bayer_rank(h, w, dy + head // len(_HEAD_SHIFTS), dx, device)
        else:  # a pruned scale: positions unknown, spread over the sequence instead
            rank = _bayer_rank(1, n, 0, head, device)
        rows.append(-rank.float())
    s = torch.stack(rows).view(1, len(rows), n)
    return s.expand(B, H, n)


class KVPolicy(Policy):
    """Keep ``ceil(f · n)`` (at least one) of the ``n`` keys/values a scale appends, ``f`` the budget of
    (scale, layer); see the module docstring. ``KVPolicy({"#-2": 0.25})`` or ``KVPolicy(KVConfig(...))``."""

    order = 40

    def __init__(self, keep: Mapping[str, float] | KVConfig | None = None, layers: tuple[int, int] | None = None,
                 strict: bool = True, **options: Any) -> None:
        if isinstance(keep, KVConfig):
            if layers is not None or options:
                raise PlanError("KVPolicy: give either a KVConfig or keep/layers/options, not both")
            self.config = keep
        else:
            self.config = KVConfig(keep=dict(keep or {}), layers=layers, **options)
        self.strict = strict
        self.keep = self.config.keep
        self.layers = self.config.layers
        self._table: dict[tuple[int, int], float] = {}
        self.calibrating = False
        self.history_mass: dict[tuple[int, int], list[float]] = {}

    # ------------------------------------------------------------------ budgets
    def begin(self, engine: Engine) -> None:
        super().begin(engine)
        self._table = budget_table(self.config, engine.sizes, engine.depth, self.strict)

    def fraction(self, si: int, layer: int) -> float:
        """The budget of (scale, layer) in this generation (1.0 = keep everything)."""
        return self._table.get((si, layer), 1.0)

    def budget(self, si: int, layer: int, n: int) -> int:
        f = self._table.get((si, layer))
        if f is None:
            return n
        return 0 if f == 0.0 else max(1, min(n, math.ceil(f * n - 1e-9)))

    def kv_tokens(self, si: int, layer: int, n: int) -> int:
        return self.budget(si, layer, n)

    # ------------------------------------------------------------------ selection
    def kv_append(self, layer: int, k: Tensor, v: Tensor, q: Tensor | None = None, scale: float | None = None,
                  past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        si = self.engine.si
        if self.calibrating and q is not None and past is not None and past.shape[2] > 0:
            self._record_history(si, layer, q, k, past, scale)
        n = k.shape[2]
        m = self.budget(si, layer, n)
        if m >= n:
            return k, v
        if m == 0:
            return k[:, :, :0], v[:, :, :0]
        cfg = self.config
        B, H = k.shape[:2]
        scores = self._scores(k, q, scale)
        if not cfg.per_head:
            idx = torch.topk(scores.sum(dim=1), m, dim=1).indices.sort(dim=1).values.view(B, 1, m, 1)
            idx = idx.expand(B, H, m, 1)
        else:
            idx = torch.topk(scores, m, dim=2).indices.sort(dim=2).values.unsqueeze(-1)  # (B, H, m, 1)
        return k.gather(2, idx.expand(B, H, m, k.shape[-1])), v.gather(2, idx.expand(B, H, m, v.shape[-1]))

    def _scores(self, k: Tensor, q: Tensor | None, scale: float | None) -> Tensor:
        """(B, H, n) scores (higher = kept first)."""
        kind = self.config.score
        B, H, n, _ = k.shape
        if kind in ("attn", "mix") and q is None:
            kind = "dist" if kind == "attn" else "grid"
        if kind == "dist":
            return _dist_scores(k)
        if kind == "attn":
            return _attn_scores(k, q, scale)
        grid = _grid_scores(B, H, n, self.engine.hw, self.config.per_head, k.device)
        if kind == "grid":
            return grid
        # mix: the attention's top half of the budget first, then the most even spread of the rest
        a = _attn_scores(k, q, scale)
        if not self.config.per_head:
            a = a.sum(dim=1, keepdim=True).expand(B, H, n)
        return _mix(a, grid, self._mix_top)

    _mix_top = 0.5

    def _record_history(self, si: int, layer: int, q: Tensor, k: Tensor, past: Tensor, scale: float | None) -> None:
        """Calibration: the share of attention the scale's queries put on earlier scales (per layer)."""
        qo = _obs(q).float()
        s = 1.0 if scale is None else float(scale)
        keys = torch.cat((past.float(), k.float()), dim=2)
        att = torch.matmul(qo, keys.transpose(-1, -2)).mul_(s).softmax(dim=-1)
        share = att[..., : past.shape[2]].sum(dim=-1).mean().item()
        self.history_mass.setdefault((si, layer), []).append(share)


def _mix(a: Tensor, grid: Tensor, top: float) -> Tensor:
    """Scores whose top-m takes ~``top`` of m by ``a`` and the rest by ``grid``: keys are ranked by the
    better of their two ranks, with ``a``'s ranks stretched by 1/top so both shares fill evenly."""
    n = a.shape[-1]
    ra = torch.argsort(torch.argsort(a, dim=-1, descending=True), dim=-1).float() / top
    rg = torch.argsort(torch.argsort(grid, dim=-1, descending=True), dim=-1).float() / (1.0 - top)
    return -(torch.minimum(ra, rg) + torch.arange(n, device=a.device) * 1e-6)


# ---------------------------------------------------------------------- resolution


def resolve_ref(schedule: Schedule, ref: str, strict: bool = True) -> int | None:
    """A scale ref's index; "#-k" counts from the end of the schedule (None: not in it and not strict)."""
    r = str(ref).strip().lower()
    if r.startswith("#-"):
        i = len(schedule) + int(r[1:])
        if 0 <= i < len(schedule):
            return i
        if not strict:
            return None
        raise PlanError(f"kv scale ref {ref!r} is before the start of this schedule ({len(schedule)} scales); "
                        f"use '#-1' .. '#-{len(schedule)}'")
    try:
        return schedule.resolve(ref)
    except ValueError as e:
        if not strict:
            return None
        raise PlanError(f"kv: {e}") from None


def budget_table(cfg: KVConfig, sizes: Sequence[tuple[int, int]], depth: int,
                 strict: bool = True) -> dict[tuple[int, int], float]:
    """(scale, layer) -> fraction kept, for the entries below 1 (scale 0 is never compressed; with
    ``strict`` False refs the schedule lacks are ignored, as presets want)."""
    sched = Schedule(tuple(tuple(s) for s in sizes))
    n = len(sched)
    lo, hi = cfg.layers if cfg.layers is not None else (0, depth)
    hi = min(hi, depth)
    if cfg.layers is not None and cfg.layers[0] >= depth:
        raise PlanError(f"kv.layers {list(cfg.layers)} starts at or after the model's depth {depth}; "
                        f"use a start < {depth}")
    def refs(m: Mapping[str, Any]) -> dict[int, Any]:
        out = {}
        for r, val in m.items():
            si = resolve_ref(sched, r, strict)
            if si is not None:
                out[si] = val
        return out

    keep = refs(cfg.keep)
    if isinstance(cfg.refiner_keep, dict):
        rkeep = refs(cfg.refiner_keep)
    elif cfg.refiner_keep is not None:
        rkeep = {si: cfg.refiner_keep for si in keep}
    else:
        rkeep = dict(keep)
    if isinstance(cfg.drafters, dict):
        drafters = {si: set(ls) for si, ls in refs(cfg.drafters).items()}
    elif cfg.drafters is not None:
        drafters = {si: set(cfg.drafters) for si in range(n)}
    else:
        drafters = None
    table: dict[tuple[int, int], float] = {}
    for si in range(1, n):
        for layer in range(lo, hi):
            if drafters is None or layer in drafters.get(si, set()):
                f = keep.get(si, 1.0)
            else:
                f = rkeep.get(si, keep.get(si, 1.0))
            if f < 1.0:
                table[(si, layer)] = f
    if not cfg.keep_last:
        for layer in range(depth):
            table[(n - 1, layer)] = 0.0
    return table


def calibrate_drafters(run, n_drafters: int | float = 0.5, keep_scales: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Drafters per scale from one calibration generation (ScaleKV's identification, a cheap proxy).

    ``run(engine)`` runs one generation with the given hooks (e.g. ``lambda e: pipe(conds, plan=e)``).
    Every layer's share of attention on earlier scales (the current scale's observation queries, all
    heads and rows) is measured at every scale; at each scale the ``n_drafters`` layers (a count, or a
    fraction of the depth) with the largest share are its drafters. Returns ``{"#si": [layers]}``,
    ready for ``KVConfig.drafters`` (``keep_scales``: only those refs' entries).
    """
    probe = KVPolicy({})
    probe.calibrating = True
    run(Engine([probe], depth=0))
    per_scale: dict[int, dict[int, float]] = {}
    for (si, layer), shares in probe.history_mass.items():
        per_scale.setdefault(si, {})[layer] = sum(shares) / len(shares)
    out: dict[str, list[int]] = {}
    for si, by_layer in sorted(per_scale.items()):
        depth = len(by_layer)
        d = n_drafters if isinstance(n_drafters, int) else max(1, round(n_drafters * depth))
        top = sorted(by_layer, key=lambda lay: -by_layer[lay])[:d]
        out[f"#{si}"] = sorted(top)
    if keep_scales is not None:
        out = {k: v for k, v in out.items() if k in set(keep_scales)}
    return out


def history_shares(run) -> dict[tuple[int, int], float]:
    """(scale, layer) -> mean share of attention on earlier scales in one generation (see calibrate_drafters)."""
    probe = KVPolicy({})
    probe.calibrating = True
    run(Engine([probe], depth=0))
    return {key: sum(v) / len(v) for key, v in sorted(probe.history_mass.items())}

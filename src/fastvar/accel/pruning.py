"""Cached token pruning (FastVAR) and scale skipping, as two policies of the engine.

At a pruned (scale, layer, branch) the branch forwards only the "pivotal" tokens — those farthest from
the scale's mean token, a cheap high-frequency proxy — and the other slots are filled with the same
branch's output cached at an earlier, fully computed scale, resized to the current grid.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schedules import Schedule
from .engine import Engine, Policy
from .hooks import BranchFn
from .plan import AccelPlan, ResolvedPlan


def pivotal_indices(x: Tensor, hw: tuple[int, int], n_keep: int) -> Tensor:
    """Positions of the ``n_keep`` tokens farthest (squared L2) from the mean token, farthest first.

    The mean is an adaptive average pool over the (h, w) grid and the order comes from a descending
    ``argsort`` — the same ops the published FastVAR code uses, so pivotal sets match it bit for bit.
    """
    B, L, C = x.shape
    h, w = hw
    grid = x.view(B, h, w, C).permute(0, 3, 1, 2)
    mean = F.adaptive_avg_pool2d(grid, (1, 1)).permute(0, 2, 3, 1).view(B, 1, C)
    d = x - mean
    score = d.mul_(d).sum(-1)  # == ((x - mean) ** 2).sum(-1): pow 2 is d·d; in place and 2-D, ~3x faster
    return torch.argsort(score, dim=1, descending=True)[:, :n_keep]


def resize_tokens(y: Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int], mode: str) -> Tensor:
    """(B, h·w, C) token map resized to (B, h'·w', C) through a (B, C, h, w) view."""
    B, _, C = y.shape
    grid = y.view(B, src_hw[0], src_hw[1], C).permute(0, 3, 1, 2)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(grid, size=dst_hw, mode=mode, **kw)
    return out.permute(0, 2, 3, 1).reshape(B, dst_hw[0] * dst_hw[1], C)


def _resolve(plan: AccelPlan, engine) -> ResolvedPlan:
    return plan.resolve(Schedule(engine.sizes), engine.depth)


class SkipPolicy(Policy):
    """Scale skipping: the plan's skipped scales (``skip`` and keep ratio 0) are not forwarded at all."""

    order = 0

    def __init__(self, plan: AccelPlan) -> None:
        self.plan = plan
        self._skip: frozenset[int] = frozenset()

    def begin(self, engine) -> None:
        super().begin(engine)
        self._skip = _resolve(self.plan, engine).skip

    def planned_skip(self) -> frozenset[int]:
        return self._skip

    def kv_tokens(self, si: int, layer: int, n: int) -> int:
        return 0 if si in self._skip else n


class PrunePolicy(Policy):
    """Cached token pruning (FastVAR): at a pruned (scale, layer, branch) forward the pivotal tokens only
    and fill the other slots from the branch output at the plan's cache scale, resized.

    ``record=True`` keeps the kept indices per (scale, layer, branch) in :attr:`kept`.
    """

    order = 20

    def __init__(self, plan: AccelPlan, record: bool = False) -> None:
        self.plan, self.record = plan, record
        self.resolved: ResolvedPlan | None = None
        self.cache: dict[tuple[int, str], Tensor] = {}
        self.cache_hw: tuple[int, int] | None = None
        self.kept: dict[tuple[int, int, str], Tensor] = {}
        self.pruning = self.caching = False
        self.peak_bytes = 0  # the restore cache's size once filled (held until the generation ends), max over runs

    def begin(self, engine) -> None:
        super().begin(engine)
        self.resolved = _resolve(self.plan, engine)
        self.cache, self.cache_hw, self.kept = {}, None, {}

    def kv_tokens(self, si: int, layer: int, n: int) -> int:
        return self.resolved.n_keep(si, n) if n and self.resolved.prunes(si, layer, "attn") else n

    def begin_scale(self, si: int, hw: tuple[int, int]) -> None:
        r = self.resolved
        self.pruning = si in r.keep
        self.caching = r.cache_si == si
        if self.caching:
            self.cache_hw = hw

    def branch(self, layer: int, name: str, x: Tensor, idx: Tensor | None, inner: BranchFn) -> Tensor:
        r = self.resolved
        if idx is not None or not (self.pruning and layer in r.layers and name in r.branches
                                   and (layer, name) in self.cache):
            return inner(x, idx)
        si, hw = self.engine.si, self.engine.hw
        B, L, C = x.shape
        n_keep = r.n_keep(si, L)
        idx = pivotal_indices(x, hw, n_keep)
        # rows of the flattened (B·L, C) map: index_select / index_copy_ move the same values as
        # gather / scatter_ along dim 1 with an expanded index, several times faster on CPU
        rows = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * L).reshape(-1)
        y = inner(x.reshape(B * L, C).index_select(0, rows).view(B, n_keep, C), idx)
        # A restore cache filled before a guidance cut holds both CFG halves; the rows forwarded now are its
        # first (conditional) ones.
        base = resize_tokens(self.cache[(layer, name)][:B], self.cache_hw, hw, r.interp).to(y.dtype)
        out = base.reshape(B * L, C).index_copy_(0, rows, y.reshape(B * n_keep, C)).view(B, L, C)
        if self.record:
            self.kept[(si, layer, name)] = idx
        return out

    def branch_output(self, layer: int, name: str, out: Tensor) -> None:
        # Whatever produced the cache scale's output (the block, or a feature-cache reuse) is what
        # later pruned scales restore from.
        r = self.resolved
        if self.caching and layer in r.layers and name in r.branches:
            self.cache[(layer, name)] = out

    def end_scale(self, si: int) -> None:
        if self.caching:
            self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in self.cache.values()))

    def end(self) -> None:
        # Caches hold activations of the whole batch; free them as soon as the generation is over.
        self.cache = {}

    def per_scale_tokens(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = defaultdict(lambda: {"in": 0, "computed": 0})
        for (si, _layer, _name), (n_in, n_comp) in self.engine.recorder.counts.items():
            out[si]["in"] += n_in
            out[si]["computed"] += n_comp
        return dict(out)


def plan_policies(plan: AccelPlan, record: bool = False) -> list[Policy]:
    """The skip and prune policies of a plan's ``keep`` / ``skip`` / ``layers`` fields."""
    return [SkipPolicy(plan), PrunePolicy(plan, record=record)]


class PlanHooks(Engine):
    """An engine executing an :class:`AccelPlan`'s skipping and pruning (kept for backwards compatibility:
    ``PlanHooks(plan, depth)`` is ``Engine(plan_policies(plan), depth)``)."""

    def __init__(self, plan: AccelPlan, depth: int, record: bool = False, timing: bool = True,
                 extra: Sequence[Policy] = ()) -> None:
        super().__init__([*plan_policies(plan, record), *extra], depth=depth, plan=plan, timing=timing)

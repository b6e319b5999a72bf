"""Cached token pruning (FastVAR) and scale skipping, as an implementation of the engine's hooks.

At a pruned (scale, layer, branch) the branch forwards only the "pivotal" tokens — those farthest from
the scale's mean token, a cheap high-frequency proxy — and the other slots are filled with the same
branch's output cached at an earlier, fully computed scale, resized to the current grid.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schedules import Schedule
from .hooks import BranchFn, Hooks
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


class PlanHooks(Hooks):
    """Executes an :class:`AccelPlan` through the hook points; also records what was computed.

    Records per (scale, layer, branch) the tokens entering and the tokens computed (for statistics),
    wall time per scale, and, with ``record=True``, the kept indices themselves.
    """

    active = True

    def __init__(self, plan: AccelPlan, depth: int, record: bool = False, timing: bool = True) -> None:
        self.plan, self.depth, self.record, self.timing = plan, depth, record, timing
        self.resolved: ResolvedPlan | None = None
        self._reset()

    def _reset(self) -> None:
        self.cache: dict[tuple[int, str], Tensor] = {}
        self.cache_hw: tuple[int, int] | None = None
        self.counts: dict[tuple[int, int, str], tuple[int, int]] = {}
        self.kept: dict[tuple[int, int, str], Tensor] = {}
        self.scale_seconds: dict[int, float] = {}
        self.skipped: list[int] = []
        self.sizes: tuple[tuple[int, int], ...] = ()
        self.batch = 0
        self._t0 = 0.0

    # ------------------------------------------------------------------ hooks
    def begin(self, sizes: Sequence[tuple[int, int]], batch: int) -> None:
        self._reset()
        self.sizes = tuple(tuple(s) for s in sizes)
        self.batch = batch
        self.resolved = self.plan.resolve(Schedule(self.sizes), self.depth)

    def skip_scale(self, si: int) -> bool:
        skip = si in self.resolved.skip
        if skip:
            self.skipped.append(si)
        return skip

    def kv_tokens(self, sizes: Sequence[tuple[int, int]], layer: int) -> int:
        r = self.resolved
        if r is None:
            return super().kv_tokens(sizes, layer)
        total = 0
        for si, (h, w) in enumerate(sizes):
            if si not in r.skip:
                total += r.n_keep(si, h * w) if r.prunes(si, layer, "attn") else h * w
        return total

    def begin_scale(self, si: int, hw: tuple[int, int]) -> None:
        self.si, self.hw = si, tuple(hw)
        r = self.resolved
        self.pruning = si in r.keep
        self.caching = r.cache_si == si
        if self.caching:
            self.cache_hw = self.hw
        if self.timing:
            self._t0 = time.perf_counter()

    def branch(self, layer: int, name: str, x: Tensor, fn: BranchFn) -> Tensor:
        r = self.resolved
        L = x.shape[1]
        self._device = x.device
        if self.pruning and layer in r.layers and name in r.branches and (layer, name) in self.cache:
            n_keep = r.n_keep(self.si, L)
            idx = pivotal_indices(x, self.hw, n_keep)
            B, C = x.shape[0], x.shape[-1]
            # rows of the flattened (B·L, C) map: index_select / index_copy_ move the same values as
            # gather / scatter_ along dim 1 with an expanded index, several times faster on CPU
            rows = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * L).reshape(-1)
            y = fn(x.reshape(B * L, C).index_select(0, rows).view(B, n_keep, C), idx)
            base = resize_tokens(self.cache[(layer, name)], self.cache_hw, self.hw, r.interp).to(y.dtype)
            out = base.reshape(B * L, C).index_copy_(0, rows, y.reshape(B * n_keep, C)).view(B, L, C)
            self.counts[(self.si, layer, name)] = (L, n_keep)
            if self.record:
                self.kept[(self.si, layer, name)] = idx
            return out
        y = fn(x, None)
        if self.caching and layer in r.layers and name in r.branches:
            self.cache[(layer, name)] = y
        self.counts[(self.si, layer, name)] = (L, L)
        return y

    def end_scale(self, si: int) -> None:
        if self.timing:
            dev = getattr(self, "_device", None)
            if dev is not None and dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.scale_seconds[si] = time.perf_counter() - self._t0

    def end(self) -> None:
        # Caches hold activations of the whole batch; free them as soon as the generation is over.
        self.cache = {}

    # ------------------------------------------------------------------ reporting
    def token_counts(self) -> dict[tuple[int, int, str], tuple[int, int]]:
        return dict(self.counts)

    def per_scale_tokens(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = defaultdict(lambda: {"in": 0, "computed": 0})
        for (si, _layer, _name), (n_in, n_comp) in self.counts.items():
            out[si]["in"] += n_in
            out[si]["computed"] += n_comp
        return dict(out)

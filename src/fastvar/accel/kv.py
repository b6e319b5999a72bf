"""KV-cache compression as a policy: keep a budgeted subset of a scale's keys/values per layer.

Why: at large scales the KV cache dominates memory and attention time of every later scale; ScaleKV
and HACK show most of a scale's keys can be dropped for the scales after it. This first policy is
head-agnostic (one token subset per layer, batch row and scale, shared by all heads) and scores a token
by how far its key lies from the scale's mean key, summed over heads — the same "far from the mean is
informative" proxy FastVAR uses for pivotal tokens, cheap and with no attention weights needed. The
kept tokens stay in position order. The current scale's own queries still attend to every key; only
later scales see the subset.

``keep``: scale ref -> fraction of that scale's tokens kept (1.0 or absent = all); ``layers``:
half-open [start, end) of blocks it applies to (None = all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..schedules import Schedule
from .engine import Engine, Policy
from .plan import PlanError


def kv_scores(k: Tensor) -> Tensor:
    """(B, n) score of every appended token: squared distance of its key to the mean key, summed over heads."""
    d = k - k.mean(dim=2, keepdim=True)
    return d.mul_(d).sum(dim=(1, 3))


class KVPolicy(Policy):
    """Keep ``ceil(keep · n)`` of the ``n`` keys/values a scale appends (at least one), by :func:`kv_scores`."""

    order = 40

    def __init__(self, keep: Mapping[str, float], layers: tuple[int, int] | None = None) -> None:
        self.keep = {str(k): float(v) for k, v in dict(keep).items()}
        bad = {k: v for k, v in self.keep.items() if not 0.0 < v <= 1.0}
        if bad:
            raise PlanError(f"KV keep ratio(s) {bad} outside (0, 1]; to drop a scale entirely skip it instead")
        self.layers = layers
        self._keep: dict[int, float] = {}

    def begin(self, engine: Engine) -> None:
        super().begin(engine)
        sched = Schedule(engine.sizes)
        try:
            self._keep = {sched.resolve(k): v for k, v in self.keep.items() if v < 1.0}
        except ValueError as e:
            raise PlanError(f"KV policy: {e}") from None

    def kv_append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        ratio = self._keep.get(self.engine.si)
        if ratio is None or (self.layers is not None and not self.layers[0] <= layer < self.layers[1]):
            return k, v
        B, H, n, c = k.shape
        m = max(1, min(n, math.ceil(ratio * n)))
        if m == n:
            return k, v
        idx = torch.topk(kv_scores(k), m, dim=1).indices.sort(dim=1).values  # (B, m), position order
        gk = idx.view(B, 1, m, 1).expand(B, H, m, c)
        gv = idx.view(B, 1, m, 1).expand(B, H, m, v.shape[-1])
        return k.gather(2, gk), v.gather(2, gv)

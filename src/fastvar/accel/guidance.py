"""Guidance policies: change how a scale combines its conditional and unconditional logits.

Why a policy: SkipVAR / StageVAR show that late scales need little or no classifier-free guidance;
expressing that as data on the engine's ``guidance`` hook lets any backbone use it without a copy of
its sampling loop. The backbone passes its official arithmetic (``combine``) and its own weight ``t``
(VAR/HART: ``t`` in ``(1 + t)·cond − t·uncond``, after VAR's linear ramp; Infinity: ``c`` in
``c·cond + (1 − c)·uncond``); this policy only chooses the weight per scale or returns the conditional
logits alone, so with no setting it is bit-identical to no policy.

Scales are scale references as in :class:`~fastvar.accel.plan.AccelPlan` ("32", "t576", "#8",
"32x32"), resolved against every generation's schedule.

Part 1 limit: ``cond_only_from`` drops the unconditional logits from the combination but the
backbone still forwards both halves (running the conditional half alone changes the batch size and
needs the backbone to ask before the forward; that is the next step of the engine).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..schedules import Schedule
from .engine import Engine, Policy
from .hooks import GuidanceFn
from .plan import PlanError


class GuidancePolicy(Policy):
    """Per-scale guidance weights (in the backbone's own units) and "conditional only from scale k"."""

    order = 30

    def __init__(self, weights: Mapping[str, float] | None = None, cond_only_from: str | None = None) -> None:
        self.weights = {str(k): float(v) for k, v in dict(weights or {}).items()}
        self.cond_only_from = None if cond_only_from is None else str(cond_only_from)
        self._weights: dict[int, float] = {}
        self._cond_only: int | None = None

    def begin(self, engine: Engine) -> None:
        super().begin(engine)
        sched = Schedule(engine.sizes)
        try:
            self._weights = {sched.resolve(k): v for k, v in self.weights.items()}
            self._cond_only = None if self.cond_only_from is None else sched.resolve(self.cond_only_from)
        except ValueError as e:
            raise PlanError(f"guidance policy: {e}") from None

    def guidance(self, si: int, cond: Tensor, uncond: Tensor, t: float, inner: GuidanceFn) -> Tensor:
        if self._cond_only is not None and si >= self._cond_only:
            return cond.clone()  # the backbone samples from it in place; never hand out its logits
        return inner(cond, uncond, self._weights.get(si, t))

"""Guidance policy: conditional-only late scales, per-scale guidance weights, reuse of an earlier
unconditional output.

Why: with classifier-free guidance every scale forwards the batch twice (conditional and
unconditional rows), so the large late scales — most of the cost — pay twice. SkipVAR (arXiv
2506.08908) observes that the gap between the two branches is small at the late, high-frequency
steps and bypasses the unconditional branch there ("unconditional branch replacement"); StageVAR and
LD-Pruning drop CFG in the final refinement scales. Expressed as a policy on the engine's hook points
any backbone gets it without a copy of its sampling loop.

What the policy does, exactly:

* ``cond_only_from`` = scale k: the backbone is told (``cond_only(si)`` is True for si >= k, asked
  before the forward) to forward only the conditional half from scale k on: B rows instead of 2B for
  inputs, AdaLN conditioning, text keys / cross-attention state, and the KV caches lose their
  unconditional rows for good. FLOPs and KV bytes of those scales halve. The scale then samples from
  the conditional logits — the same image (bit for bit on CPU float32, see tests/test_guidance.py) as
  forwarding both halves and returning the conditional half.
* ``reuse_uncond`` (our variant of SkipVAR's replacement, which bypasses the unconditional branch with
  the conditional one): the policy keeps, at the last scale that ran both halves, either the guidance
  direction ``d = cond − uncond`` ("direction", also ``True``) or the unconditional output ``u``
  ("uncond"), per guidance site. At a conditional-only scale of size (h, w) it resizes that (B, h'·w', V)
  map to (h, w) (bilinear, align_corners=False; "area" when shrinking) and guides with
  ``uncond ≈ cond − resize(d)`` resp. ``uncond ≈ resize(u)`` through the backbone's own arithmetic and
  weight, so the late scales keep some guidance without forwarding the unconditional half. ``reuse_shrink``
  s scales the reused direction (``cond − s·resize(d)``): a shrunk noisy estimate has lower expected error. A site whose
  outputs are not a token map of the scale (HART's text prefill) is never kept; a conditional-only
  scale with nothing kept samples from ``cond``.
* ``weights``: scale ref -> the guidance weight in the backbone's own units (VAR/HART: ``t`` in
  ``(1 + t)·cond − t·uncond``, after VAR's linear ramp; Infinity: ``c`` in ``c·cond + (1 − c)·uncond``),
  replacing the backbone's weight at that scale (also at reused scales).

With no setting the policy is bit-identical to no policy. A backbone that cannot narrow its batch
(none today) still gets the conditional logits: at si >= k with both halves present the policy returns
``cond`` (the part-1 behaviour).

Scale refs are those of :class:`~fastvar.accel.plan.AccelPlan` ("13", "t169", "13x13", "#8") plus
"#-k" (k-th from the end), resolved against every generation's schedule; with ``strict=False`` (presets)
a ref the schedule lacks is ignored, with ``strict=True`` it is an error naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from ..schedules import Schedule
from .engine import Engine, Policy
from .hooks import GuidanceFn
from .plan import GuidanceConfig, PlanError


def resolve_scale_ref(sched: Schedule, ref: str) -> int:
    """Index of a scale ref in ``sched``; "#-k" counts from the end (ValueError if absent)."""
    k = str(ref).strip().lower()
    if k.startswith("#-"):
        i = len(sched) - int(k[2:])
        if 0 <= i < len(sched):
            return i
        raise ValueError(f"scale {ref!r} is not in this schedule ({len(sched)} scales); use '#-1' .. '#-{len(sched)}'")
    return sched.resolve(k)


def resize_token_map(t: Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Tensor:
    """(B, h·w, C) token map of a scale of size ``src_hw`` -> (B, H·W, C) at ``dst_hw``."""
    if tuple(src_hw) == tuple(dst_hw):
        return t
    B, _, C = t.shape
    img = t.transpose(1, 2).reshape(B, C, *src_hw)
    shrink = dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]
    out = F.interpolate(img, size=tuple(dst_hw), mode="area") if shrink else \
        F.interpolate(img, size=tuple(dst_hw), mode="bilinear", align_corners=False)
    return out.reshape(B, C, -1).transpose(1, 2)


class GuidancePolicy(Policy):
    """Per-scale guidance weights, "conditional only from scale k" and reuse of an earlier unconditional output."""

    order = 30

    def __init__(self, weights: Mapping[str, float] | None = None, cond_only_from: str | None = None,
                 reuse_uncond: bool | str = False, strict: bool = True, reuse_shrink: float = 1.0) -> None:
        cfg = GuidanceConfig(cond_only_from=cond_only_from, weights=dict(weights or {}), reuse_uncond=reuse_uncond,
                             reuse_shrink=reuse_shrink)
        self.config = cfg
        self.weights = cfg.weights
        self.cond_only_from = cfg.cond_only_from
        self.reuse = cfg.reuse_mode
        self.shrink = cfg.reuse_shrink
        self.strict = strict
        self._weights: dict[int, float] = {}
        self._cond_only: int | None = None
        self._kept: dict[str, tuple[Tensor, tuple[int, int]]] = {}
        self.reused: list[tuple[int, str]] = []  # (scale, site) where a kept output guided a cond-only scale

    @classmethod
    def from_config(cls, cfg: GuidanceConfig, strict: bool = True) -> GuidancePolicy:
        return cls(cfg.weights, cfg.cond_only_from, cfg.reuse_uncond, strict, cfg.reuse_shrink)

    def _resolve(self, sched: Schedule, ref: str, field: str) -> int | None:
        try:
            return resolve_scale_ref(sched, ref)
        except ValueError as e:
            if self.strict:
                raise PlanError(f"{field}: {e}") from None
            return None

    def begin(self, engine: Engine) -> None:
        super().begin(engine)
        sched = Schedule(engine.sizes)
        self._weights = {}
        for k, v in self.weights.items():
            si = self._resolve(sched, k, f"guidance.weights[{k!r}]")
            if si is not None:
                self._weights[si] = v
        self._cond_only = None if self.cond_only_from is None else \
            self._resolve(sched, self.cond_only_from, "guidance.cond_only_from")
        self._kept = {}
        self.reused = []

    def cond_only(self, si: int) -> bool:
        return self._cond_only is not None and si >= self._cond_only

    def guidance(self, si: int, cond: Tensor, uncond: Tensor | None, t: float, inner: GuidanceFn) -> Tensor:
        w = self._weights.get(si, t)
        site = self.engine.guidance_site if self.engine is not None else "logits"
        if uncond is None:  # the backbone forwarded the conditional half only
            est = self._estimate_uncond(si, site, cond)
            return inner(cond, None, w) if est is None else inner(cond, est, w)
        if self.cond_only(si):  # a backbone that forwarded both halves anyway: the conditional logits
            return cond.clone()  # sampled from in place; never hand out the backbone's logits
        if self.reuse is not None and self._cond_only is not None and site != "diffusion":
            self._keep(si, site, cond, uncond)
        return inner(cond, uncond, w)

    # ------------------------------------------------------------------ reuse
    def _keep(self, si: int, site: str, cond: Tensor, uncond: Tensor) -> None:
        hw = self.engine.sizes[si]
        if cond.ndim != 3 or cond.shape[1] != hw[0] * hw[1]:
            return  # not a token map of this scale (HART's text prefill)
        kept = (cond - uncond) if self.reuse == "direction" else uncond.clone()
        self._kept[site] = (kept, tuple(hw))

    def _estimate_uncond(self, si: int, site: str, cond: Tensor) -> Tensor | None:
        if self.reuse is None or site not in self._kept:
            return None
        kept, src = self._kept[site]
        hw = self.engine.sizes[si]
        if cond.ndim != 3 or cond.shape[1] != hw[0] * hw[1] or kept.shape[0] != cond.shape[0]:
            return None
        r = resize_token_map(kept, src, hw).to(cond.dtype)
        self.reused.append((si, site))
        s = self.shrink
        if self.reuse == "direction":
            return cond - r if s == 1.0 else cond - s * r
        return r if s == 1.0 else cond - s * (cond - r)

    def end(self) -> None:
        self._kept = {}

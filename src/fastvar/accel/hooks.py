"""The hook points every backbone calls, and the identity implementation used when no plan is active.

A backbone's scale loop calls ``begin`` / ``skip_scale`` / ``begin_scale`` / ``end_scale`` / ``end``;
each transformer block wraps each of its residual branches in ``branch``::

    x = x + hooks.branch(self.layer, "attn", x, lambda t, idx: self.attn(norm(t), rope_idx=idx) * gamma1)

``fn(t, idx)`` must compute the branch *output that is added to the residual stream* (gain included)
for the tokens ``t`` it is given. ``idx`` is ``None`` when every token of the current scale is
forwarded, else a ``(B, n_kept)`` int64 tensor of the kept token positions within the scale, which a
block uses to gather per-position tables (RoPE). ``fn`` must append keys/values only for the tokens it
was given (pruned tokens never enter the KV cache).

The identity hooks make every call a pass-through, so a model with no plan computes exactly what the
official code computes, bit for bit. Accelerations are policies composed by
:class:`fastvar.accel.engine.Engine` (a :class:`Hooks`); backbones never know which one is active.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

BranchFn = Callable[[Tensor, "Tensor | None"], Tensor]
GuidanceFn = Callable[[Tensor, Tensor, float], Tensor]
"""``combine(cond, uncond, t)``: a backbone's official classifier-free guidance arithmetic, op for op."""


class Hooks:
    """Identity hooks (no acceleration)."""

    active: bool = False

    def begin(self, sizes: Sequence[tuple[int, int]], batch: int, device: torch.device | None = None) -> None:
        """Called once at the start of a generation with the scale sizes, the (CFG-doubled) batch and the
        device (so a recorder can time with CUDA events instead of synchronising)."""

    def skip_scale(self, si: int) -> bool:
        """True if scale ``si`` must not be forwarded at all (no blocks, no sampling, no RNG draw)."""
        return False

    def begin_scale(self, si: int, hw: tuple[int, int]) -> None:
        """Called before the blocks run on the tokens of scale ``si`` of size ``hw``."""

    def kv_tokens(self, sizes: Sequence[tuple[int, int]], layer: int) -> int:
        """Most tokens block ``layer`` appends to its KV cache in this generation (after ``begin``).

        Backbones size their caches with it (one buffer instead of a concatenation per scale); a policy
        that forwards fewer tokens returns less. Never used for results: an underestimate only costs speed.
        """
        return sum(h * w for h, w in sizes)

    def branch(self, layer: int, name: str, x: Tensor, fn: BranchFn) -> Tensor:
        return fn(x, None)

    def guidance(self, si: int, cond: Tensor, uncond: Tensor, t: float, combine: GuidanceFn) -> Tensor:
        """Where scale ``si`` combines its conditional and unconditional logits.

        ``t`` is the backbone's guidance weight at this scale and ``combine`` its official arithmetic
        (the backbone keeps its own op order, so the identity is bit-exact); a policy may call
        ``combine`` with another weight or other inputs.
        """
        return combine(cond, uncond, t)

    def kv_append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """What block ``layer`` keeps in its KV cache of the (B, H, n, c) keys/values it appends now.

        The identity keeps everything by returning its inputs (the cache then rewrites nothing); a
        policy returns new tensors with fewer tokens. The current scale still attends to all of them.
        """
        return k, v

    def end_scale(self, si: int) -> None:
        """Called after the blocks of scale ``si`` ran."""

    def end(self) -> None:
        """Called once at the end of a generation; policies drop their per-generation caches here."""


IDENTITY = Hooks()

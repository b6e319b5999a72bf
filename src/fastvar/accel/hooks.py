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

    def cond_only(self, si: int) -> bool:
        """True if scale ``si`` (and every later one) forwards only the conditional half of the CFG batch.

        Asked by a backbone running classifier-free guidance before it builds the inputs of each executed
        scale, until the answer is True; from then on it forwards B rows instead of 2B (inputs,
        conditioning, text keys) and drops the unconditional rows of its KV caches for good, and calls
        ``guidance`` with ``uncond=None``. Never asked without CFG. The identity never asks for it.
        """
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

    def guidance(self, si: int, cond: Tensor, uncond: Tensor | None, t: float, combine: GuidanceFn,
                 where: str = "logits") -> Tensor:
        """Where scale ``si`` combines its conditional and unconditional outputs.

        ``t`` is the backbone's guidance weight at this scale and ``combine`` its official arithmetic
        (the backbone keeps its own op order, so the identity is bit-exact); a policy may call
        ``combine`` with another weight or other inputs. ``where`` names the site: "logits" (every
        family), "hidden:<layer>" (Infinity's ``cfg_insertion_layer`` mixes hidden states after a block),
        "diffusion" (HART's diffusion head, once per denoising step, on the predicted noise).
        ``uncond`` is None at a conditional-only scale (see :meth:`cond_only`): the result must then come
        from ``cond`` (or from what a policy kept of an earlier scale). The result may be sampled from in
        place: never return a view of a tensor the backbone still needs.
        """
        if uncond is None:
            return cond.clone()
        return combine(cond, uncond, t)

    def kv_append(self, layer: int, k: Tensor, v: Tensor, q: Tensor | None = None, scale: float | None = None,
                  past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What block ``layer`` keeps in its KV cache of the (B, H, n, c) keys/values it appends now.

        The identity keeps everything by returning its inputs (the cache then rewrites nothing); a
        policy returns new tensors with fewer tokens (the same count for every head, possibly a different
        subset per head; zero tokens to keep nothing). The current scale still attends to all of them.
        Backbones also pass the current queries ``q`` (B, H, Lq, c), the attention ``scale`` and the keys
        held so far ``past`` (or None), so a policy can score keys by the attention they receive.
        """
        return k, v

    def end_scale(self, si: int) -> None:
        """Called after the blocks of scale ``si`` ran."""

    def end(self) -> None:
        """Called once at the end of a generation; policies drop their per-generation caches here."""


IDENTITY = Hooks()

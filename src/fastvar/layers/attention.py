"""Attention with a per-layer KV cache over scales.

All families attend the same way during next-scale inference: queries are the current scale's
(possibly pruned) tokens, keys/values are every token cached so far plus the current ones, no mask.
flash-attn is used only when it is installed, the tensors are on CUDA in half precision, and no mask
or unusual layout is needed; otherwise ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional fast path
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - flash-attn is never installed on CPU machines
    _flash_attn_func = None


class KVCache:
    """Keys and values of earlier scales along the sequence dim (B, H, L, c).

    With a ``capacity`` (tokens this layer will append over the generation, known from the schedule and
    the active plan) the first append allocates one buffer and later appends write into it: no copy of
    the whole cache at every scale, no fresh allocation (on CPU, page faults) per scale. ``k`` / ``v``
    are then views of the filled part, with the same values a concatenation would give. Appending past
    the capacity falls back to concatenation, so a wrong hint costs speed, never correctness.

    With ``hooks`` and ``layer`` every append asks ``hooks.kv_append(layer, k, v, ...)`` what to *keep*
    of the appended keys/values (KV-cache compression; ``q``/``scale`` are the current queries and the
    attention scale, ``past`` the keys held so far, for policies that score by attention). The current
    scale's queries still attend to all of its own keys: the returned tensors are then a transient
    concatenation of what is held and the whole current scale, freed after the attention, while only the
    kept subset is stored (so the buffer needs only the budgeted tokens: ``hooks.kv_tokens`` sizes it).
    The identity hook returns its inputs and the buffer path above is taken unchanged.
    """

    def __init__(self, capacity: int | None = None, layer: int | None = None, hooks=None) -> None:
        self.capacity = capacity
        self.layer, self.hooks = layer, hooks
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._kbuf: Tensor | None = None
        self._vbuf: Tensor | None = None

    def _store(self, k: Tensor, v: Tensor) -> None:
        """Append ``k``/``v`` to what is held: into the buffer while it has room, else by concatenation."""
        n, old = k.shape[2], self.length
        if self.capacity is not None and old + n <= self.capacity:
            if self._kbuf is None:
                B, H, _, c = k.shape
                self._kbuf = k.new_empty(B, H, self.capacity, c)
                self._vbuf = v.new_empty(B, H, self.capacity, v.shape[-1])
            self._kbuf[:, :, old:old + n].copy_(k)
            self._vbuf[:, :, old:old + n].copy_(v)
            self.k, self.v = self._kbuf[:, :, :old + n], self._vbuf[:, :, :old + n]
        elif self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
            self._kbuf = self._vbuf = None
            self.capacity = None

    def append(self, k: Tensor, v: Tensor, q: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, Tensor]:
        if self.hooks is not None:
            if q is None:
                kk, vv = self.hooks.kv_append(self.layer, k, v)
            else:
                kk, vv = self.hooks.kv_append(self.layer, k, v, q=q, scale=scale, past=self.k)
            if kk is not k or vv is not v:  # a subset is kept: attend to held + all current, store the subset
                ka = k if self.k is None else torch.cat((self.k, k), dim=2)
                va = v if self.v is None else torch.cat((self.v, v), dim=2)
                self._store(kk, vv)
                return ka, va
        self._store(k, v)
        return self.k, self.v

    def keep_rows(self, n: int) -> None:
        """Keep batch rows ``[0, n)`` only, for good (conditional-only CFG scales: the unconditional rows
        are never attended again). The kept rows are copied so the dropped rows' memory is freed."""
        if self.k is None or self.k.shape[0] <= n:
            return
        length = self.length
        if self._kbuf is not None:
            self._kbuf, self._vbuf = self._kbuf[:n].clone(), self._vbuf[:n].clone()
            self.k, self.v = self._kbuf[:, :, :length], self._vbuf[:, :, :length]
        else:
            self.k, self.v = self.k[:n].clone(), self.v[:n].clone()

    def clear(self) -> None:
        self.k = self.v = self._kbuf = self._vbuf = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, flash: bool = True) -> Tensor:
    """softmax(q kᵀ · scale + mask) v for (B, H, L, c) tensors."""
    if (
        flash
        and _flash_attn_func is not None
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

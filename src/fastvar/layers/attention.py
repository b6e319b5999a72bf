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

    With ``hooks`` and ``layer`` every append asks ``hooks.kv_append(layer, k, v)`` what to *keep* of
    the appended keys/values (KV-cache compression). The current scale's queries still attend to all of
    its own keys (the returned views hold them); the kept subset replaces them at the next append, so
    later scales see only what was kept. The identity hook returns its inputs and nothing is rewritten.
    """

    def __init__(self, capacity: int | None = None, layer: int | None = None, hooks=None) -> None:
        self.capacity = capacity
        self.layer, self.hooks = layer, hooks
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._kbuf: Tensor | None = None
        self._vbuf: Tensor | None = None
        self._pending: tuple[int, Tensor, Tensor] | None = None

    def _compact(self) -> None:
        """Replace the last append (from position ``start``) by the subset the hook kept."""
        start, kk, vv = self._pending
        self._pending = None
        if self._kbuf is not None and self.k.data_ptr() == self._kbuf.data_ptr():
            m = kk.shape[2]
            self._kbuf[:, :, start:start + m].copy_(kk)
            self._vbuf[:, :, start:start + m].copy_(vv)
            self.k, self.v = self._kbuf[:, :, :start + m], self._vbuf[:, :, :start + m]
        else:
            self.k = torch.cat((self.k[:, :, :start], kk), dim=2)
            self.v = torch.cat((self.v[:, :, :start], vv), dim=2)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self._pending is not None:
            self._compact()
        if self.hooks is not None:
            kk, vv = self.hooks.kv_append(self.layer, k, v)
            if kk is not k or vv is not v:
                self._pending = (self.length, kk, vv)
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
        return self.k, self.v

    def clear(self) -> None:
        self.k = self.v = self._kbuf = self._vbuf = None
        self._pending = None

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

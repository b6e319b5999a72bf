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
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self._kbuf: Tensor | None = None
        self._vbuf: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
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

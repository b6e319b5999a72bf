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
    """Keys and values of earlier scales, concatenated along the sequence dim (B, H, L, c)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def clear(self) -> None:
        self.k = self.v = None

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

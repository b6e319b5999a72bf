"""The packed text condition Infinity consumes: valid T5 rows of every caption, concatenated.

Infinity never pads captions: its cross-attention runs per caption over ``cu_seqlens_k`` segments, so
padding would change which keys a query sees. Keeping the official 4-tuple layout (a NamedTuple, so
an official ``(kv_compact, lens, cu_seqlens_k, Ltext)`` tuple is accepted unchanged) means conditions
built by the official ``encode_prompt`` and by :mod:`fastvar.text.t5` are interchangeable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TextCondition(NamedTuple):
    """``kv_compact`` (sum(lens), C), ``lens`` per caption, ``cu_seqlens_k`` int32 (B+1,), ``max_len``."""

    kv_compact: Tensor
    lens: list[int]
    cu_seqlens_k: Tensor
    max_len: int

    @property
    def batch(self) -> int:
        return len(self.lens)

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.kv_compact.to(device), list(self.lens), self.cu_seqlens_k.to(device), self.max_len)


def as_text_condition(cond: tuple) -> TextCondition:
    """Accept an official 4-tuple (``lens`` may be a tensor, ``cu_seqlens_k`` any int dtype)."""
    kv, lens, cu, max_len = cond
    lens = [int(v) for v in (lens.tolist() if isinstance(lens, Tensor) else lens)]
    if not isinstance(cu, Tensor):
        cu = torch.tensor(cu)
    cu = cu.to(device=kv.device, dtype=torch.int32)
    if cu.numel() != len(lens) + 1 or int(cu[-1]) != kv.shape[0]:
        raise ValueError(
            f"text condition is inconsistent: {len(lens)} caption(s), cu_seqlens_k={cu.tolist()}, "
            f"kv_compact has {kv.shape[0]} rows; cu_seqlens_k must be [0, cumsum(lens)...] ending at the row count"
        )
    return TextCondition(kv, lens, cu, int(max_len))


def pack_text_features(features: Tensor, mask: Tensor) -> TextCondition:
    """Pack (B, T, C) encoder features with a (B, T) attention mask, as the official ``encode_prompt``.

    The mask must be right-padded (T5 tokenizers pad on the right): the first ``mask.sum()`` rows of
    every caption are its valid tokens.
    """
    lens_t = mask.sum(dim=-1)
    lens = [int(v) for v in lens_t.tolist()]
    cu = F.pad(lens_t.to(dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    kv = torch.cat([f[:n] for n, f in zip(lens, features.unbind(0))], dim=0)
    return TextCondition(kv, lens, cu.to(features.device), max(lens))

"""Infinity's cross-attention fast path against the computation the parity fixtures were made with."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvar.models.infinity_layers import cross_attend, prepare_cross_kv

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(q: torch.Tensor, kv: torch.Tensor, segments: list[tuple[int, int]], scale: float) -> torch.Tensor:
    """flash-attn varlen in bf16, emulated as the fixtures' reference did: round to bf16, one fp32 3-D SDPA per
    caption, round the output to bf16."""
    q = q.to(torch.bfloat16).float()
    kv = kv.to(torch.bfloat16).float()
    outs = []
    for b, (s, e) in enumerate(segments):
        qb, kb, vb = q[b].transpose(0, 1), kv[s:e, 0].transpose(0, 1), kv[s:e, 1].transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(0, 1))
    o = torch.stack(outs).to(torch.bfloat16).float()
    return o.reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("lens", [[24, 24], [7, 5], [1, 77, 3], [300]])
@pytest.mark.parametrize("lq", [1, 37, 1600])
def test_cross_attention_is_bit_identical_to_the_reference(lens, lq):
    g = torch.Generator().manual_seed(len(lens) * 1000 + lq)
    H, c = 4, 64
    q = torch.randn(len(lens), lq, H, c, generator=g) * 2
    kv = torch.randn(sum(lens), 2, H, c, generator=g)
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    segments = list(zip(bounds[:-1], bounds[1:]))
    scale = 1 / math.sqrt(c)
    prepared = prepare_cross_kv(kv, segments, emulate=True, scale=scale)
    assert prepared.packed == (len(set(lens)) == 1)
    assert torch.equal(cross_attend(q, prepared), _reference(q, kv, segments, scale))
    # the prepared keys are reusable: a second call (next scale) gives the same result again
    assert torch.equal(cross_attend(q, prepared), _reference(q, kv, segments, scale))

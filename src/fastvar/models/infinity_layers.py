"""Infinity's layers: cosine self-attention with RoPE-2D and KV cache, per-caption cross-attention (with the
official bf16 rounding in float32 mode), FFN, the AdaLN block wired through the acceleration hooks, the
attentive text pool and the AdaLN head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..accel.hooks import Hooks
from ..layers.attention import KVCache, attend
from .infinity_config import InfinityConfig

# ----------------------------------------------------------------------------------------- small layers


def ada_layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, then ``·(1+scale)+shift`` (the official fused_ada_layer_norm, in fp32)."""
    return ada_layer_norm_p1(x, scale.add(1), shift, eps)


def ada_layer_norm_p1(x: Tensor, scale_plus_one: Tensor, shift: Tensor, eps: float) -> Tensor:
    """:func:`ada_layer_norm` with ``1 + scale`` already computed (blocks do it once per generation)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return y.mul_(scale_plus_one).add_(shift).to(x.dtype)  # in place on the fresh layer_norm output


def rope_pair_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(.., c/2) cos/sin angles -> the (.., c) tables :func:`apply_rope2d` takes: ``cos`` repeated per pair,
    ``sin`` as ``(-sin, +sin)`` per pair. Built once per schedule so every block rotates with whole-tensor ops."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope2d(q: Tensor, k: Tensor, cos2: Tensor, sin2: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate adjacent pairs (2i, 2i+1) of q and k (B, H, L, c) by per-token angles, in fp32.

    ``cos2`` / ``sin2`` are the (.., L, c) tables of :func:`rope_pair_tables`. The pair rotation
    ``(cos·a − sin·b, sin·a + cos·b)`` is computed as ``t·cos2 + swap(t)·sin2`` with ``swap(a, b) = (b, a)``:
    every product and sum is the same IEEE operation on the same operands (``x + (−y)`` is ``x − y``;
    products and sums commute), so the result is bit-identical to the per-pair form, but it runs on
    contiguous whole tensors instead of strided halves (about twice as fast on CPU). Outputs are contiguous.
    """

    def rot(t: Tensor) -> Tensor:
        tf = t.float()
        pairs = tf.unflatten(-1, (-1, 2))
        swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        if tf.requires_grad and torch.is_grad_enabled():  # training: the same products and sum, without out=
            return torch.mul(tf, cos2).add(swapped * sin2).to(t.dtype)
        out = torch.empty_like(tf, memory_format=torch.contiguous_format)  # the tables broadcast into t's shape
        torch.mul(tf, cos2, out=out)
        return out.add_(swapped.mul_(sin2)).to(t.dtype)

    return rot(q), rot(k)


@dataclass
class TextKV:
    """Per-generation text state: normalised features for cross-attention and their caption segments."""

    kv: Tensor
    segments: list[tuple[int, int]]

    def narrow(self, n: int) -> TextKV:
        """The first ``n`` captions (conditional-only CFG scales drop the unconditional ones)."""
        segs = self.segments[:n]
        return TextKV(self.kv[: segs[-1][1]] if segs else self.kv[:0], segs)


@dataclass
class CrossKV:
    """Caption keys/values in the layout the attention call takes, prepared once per generation per block.

    The text is the same at every scale, so its projection, bf16 rounding, head-major copies and (fp32
    emulation) the key scaling are computed once instead of once per scale (same operations, same values).
    ``k`` is then ``kᵀ·sqrt(scale)`` (see :func:`_math_attention`)."""

    packed: bool
    emulate: bool
    scale: float
    k: Tensor | list[Tensor]
    v: Tensor | list[Tensor]

    def narrow(self, n: int, batch: int) -> CrossKV:
        """The keys/values of the first ``n`` of ``batch`` captions (same tensors, sliced: bit-identical)."""
        if not self.packed:
            return CrossKV(False, self.emulate, self.scale, self.k[:n], self.v[:n])
        if self.emulate:  # (batch·H, ·, ·) head-major rows
            m = n * (self.k.shape[0] // batch)
            return CrossKV(True, True, self.scale, self.k[:m], self.v[:m])
        return CrossKV(True, False, self.scale, self.k[:n], self.v[:n])


def prepare_cross_kv(kv: Tensor, segments: list[tuple[int, int]], emulate: bool, scale: float) -> CrossKV:
    """``kv`` (N, 2, H, c) caption keys/values -> :class:`CrossKV` for :func:`cross_attend`."""
    _, _, H, c = kv.shape
    root = math.sqrt(scale)
    if emulate:  # flash-attn's bf16 inputs, attended in fp32 (see cross_attend)
        kv = kv.to(torch.bfloat16).float()
    lens = {e - s for s, e in segments}
    packed = len(lens) == 1 and segments[0][0] == 0 and all(
        segments[i][1] == segments[i + 1][0] for i in range(len(segments) - 1)
    )
    if packed:  # every caption has the same length: one batched call
        B, le = len(segments), lens.pop()
        kvb = kv[: B * le].view(B, le, 2, H, c)
        kt, vt = kvb[:, :, 0].transpose(1, 2), kvb[:, :, 1].transpose(1, 2)
        if emulate:
            kt, vt = kt.reshape(B * H, le, c).transpose(-2, -1) * root, vt.reshape(B * H, le, c)
        return CrossKV(True, emulate, scale, kt, vt)
    ks, vs = [], []
    for s, e in segments:
        kb, vb = kv[s:e, 0].transpose(0, 1), kv[s:e, 1].transpose(0, 1)
        if emulate:
            kb = kb.transpose(-2, -1) * root
        else:
            kb, vb = kb.unsqueeze(0), vb.unsqueeze(0)
        ks.append(kb)
        vs.append(vb)
    return CrossKV(False, emulate, scale, ks, vs)


def _math_attention(q: Tensor, k_t_scaled: Tensor, v: Tensor, scale: float) -> Tensor:
    """3-D fp32 attention with the operations of PyTorch's math SDPA kernel, which the fixtures' reference
    ran: q and k each pre-scaled by sqrt(scale), ``bmm``, softmax, ``bmm``. Bit-identical to
    ``F.scaled_dot_product_attention`` without a mask (tests/test_infinity_layers.py), but the key scaling
    is done once per generation and the kernel's fully-masked-row passes (no mask here) are skipped."""
    return torch.bmm(torch.softmax(torch.bmm(q * math.sqrt(scale), k_t_scaled), -1), v)


def cross_attend(q: Tensor, kv: CrossKV) -> Tensor:
    """Query row b of ``q`` (B, Lq, H, c) attends only to the keys of caption b.

    Equivalent to flash-attn's varlen kvpacked call the official code makes. In float32 that call runs
    in bf16 (inputs and output rounded), which ``kv.emulate`` reproduces with fp32 attention in between,
    computed as the fixtures' reference did (PyTorch's math kernel per caption, :func:`_math_attention`).
    Otherwise (bf16/fp16 models) one 4-D SDPA call per group of equal-length captions uses the fused kernels.
    """
    B, Lq, H, c = q.shape
    out_dtype = q.dtype
    emulate = kv.emulate and q.dtype == torch.float32
    if emulate:  # q stays bf16 until its layout changes: rounding and fp32 upcast then cost one copy each
        q = q.to(torch.bfloat16)
    if kv.packed:
        qt = q.transpose(1, 2)
        if emulate:
            q3 = qt.to(torch.float32, memory_format=torch.contiguous_format).view(B * H, Lq, c)
            o = _math_attention(q3, kv.k, kv.v, kv.scale).view(B, H, Lq, c)
        else:
            o = F.scaled_dot_product_attention(qt, kv.k, kv.v, scale=kv.scale)
        o = o.transpose(1, 2)
    else:
        q = q.float() if emulate else q
        outs = []
        for b, (kb, vb) in enumerate(zip(kv.k, kv.v)):
            qb = q[b].transpose(0, 1)
            if emulate:
                ob = _math_attention(qb, kb, vb, kv.scale)
            else:
                ob = F.scaled_dot_product_attention(qb.unsqueeze(0), kb, vb, scale=kv.scale)
            outs.append(ob.reshape(H, Lq, c).transpose(0, 1))
        o = torch.stack(outs, dim=0)
    if emulate:  # round through bf16; the fp32 upcast also makes the (transposed) output contiguous
        o = o.to(torch.bfloat16).to(torch.float32, memory_format=torch.contiguous_format)
    return o.reshape(B, Lq, H * c).to(out_dtype)


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query per head, ``pool=True``) to caption tokens."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, pool: bool = False, emulate_bf16: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.pool, self.emulate_bf16 = pool, emulate_bf16
        if pool:
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, text: TextKV) -> CrossKV:
        """The caption keys/values of this layer (depend only on the text: once per generation)."""
        N = text.kv.shape[0]
        kv = F.linear(text.kv, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(N, 2, self.num_heads, self.head_dim)
        return prepare_cross_kv(kv, text.segments, self.emulate_bf16 and kv.dtype == torch.float32,
                                1 / math.sqrt(self.head_dim))

    def forward(self, x: Tensor | None, text: TextKV, kv: CrossKV | None = None) -> Tensor:
        kv = self.text_kv(text) if kv is None else kv
        if self.pool:
            B = len(text.segments)
            q = self.mat_q.repeat(B, 1, 1).to(text.kv.dtype).view(B, 1, self.num_heads, self.head_dim)
        else:
            B, Lq = x.shape[:2]
            q = self.mat_q(x).view(B, Lq, self.num_heads, self.head_dim)
        return self.proj(cross_attend(q, kv))


class SelfAttention(nn.Module):
    """Cosine attention (L2-normalised q, k; learnable per-head scale) with RoPE-2D and a KV cache."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def constants(self) -> tuple[Tensor, Tensor]:
        """qkv bias and per-head attention scale: functions of the weights only (once per generation)."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        return bias, self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                consts: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``cos`` / ``sin``: (.., L, c) tables of :func:`rope_pair_tables` for the tokens of ``x``."""
        B, L, C = x.shape
        bias, scale_mul = self.constants() if consts is None else consts
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)  # out of place: under autocast it promotes
        k = F.normalize(k, dim=-1, eps=1e-12)
        if cache is None or (cache.length == 0 and cache.capacity is None):
            v = v.contiguous()  # otherwise the cache copies v (into its buffer, or by concatenation)
        q, k = apply_rope2d(q, k, cos, sin)  # contiguous outputs: no copy of the permuted q, k before
        if cache is not None:
            k, v = cache.append(k, v, q, 1.0)
        out = attend(q, k, v, scale=1.0, mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class BlockConstants:
    """What a block computes from the condition and its weights alone: identical at every scale."""

    gamma1: Tensor
    gamma2: Tensor
    scale1p: Tensor  # 1 + scale1
    scale2p: Tensor
    shift1: Tensor
    shift2: Tensor
    sa: tuple[Tensor, Tensor]
    ca_kv: CrossKV

    def narrow(self, n: int, batch: int) -> BlockConstants:
        """The constants of the first ``n`` of ``batch`` rows (conditional-only CFG scales)."""
        def rows(t: Tensor) -> Tensor:
            return t[:n] if t.shape[0] == batch else t

        return BlockConstants(rows(self.gamma1), rows(self.gamma2), rows(self.scale1p), rows(self.scale2p),
                              rows(self.shift1), rows(self.shift2), self.sa, self.ca_kv.narrow(n, batch))


@dataclass
class StepContext:
    """What every block needs for the current forward: RoPE angles of its tokens, mask, KV caches."""

    cos: Tensor  # (L, c) RoPE tables (rope_pair_tables) of every token of the current scale (or the whole sequence)
    sin: Tensor
    mask: Tensor | None = None
    caches: list[KVCache] | None = None
    # per-generation constants of each block (AdaLN terms, caption keys/values), filled by the first scale
    # and reused by the others; None (one forward) computes them in place
    memo: dict[int, BlockConstants] | None = None

    def rope(self, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        if idx is None:
            return self.cos, self.sin
        # per batch row: (B, n, c) -> broadcast over heads
        return self.cos[idx].unsqueeze(1), self.sin[idx].unsqueeze(1)


class InfinityBlock(nn.Module):
    """Self-attention + cross-attention + FFN, with the shared AdaLN (gamma1, gamma2, scale1, scale2, shift1, shift2)."""

    def __init__(self, layer_idx: int, cfg: InfinityConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.layer_idx, self.eps = layer_idx, cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.empty(1, 1, 6, C))
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads, emulate_bf16=cfg.emulate_bf16_cross_attn)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=True)
        if cfg.cross_attn_layer_scale >= 0:
            self.ca_gamma = nn.Parameter(torch.full((C,), float(cfg.cross_attn_layer_scale)))
        else:
            self.ca_gamma = None

    def constants(self, cond_gss: Tensor, text: TextKV) -> BlockConstants:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_gss).unbind(2)
        return BlockConstants(gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2,
                              self.sa.constants(), self.ca.text_kv(text))

    def forward(self, x: Tensor, cond_gss: Tensor, text: TextKV, step: StepContext, hooks: Hooks) -> Tensor:
        memo = step.memo
        k = memo.get(self.layer_idx) if memo is not None else None
        if k is None:
            k = self.constants(cond_gss, text)
            if memo is not None:
                memo[self.layer_idx] = k
        cache = step.caches[self.layer_idx] if step.caches is not None else None

        def attn(t: Tensor, idx: Tensor | None) -> Tensor:
            cos, sin = step.rope(idx)
            h = ada_layer_norm_p1(t, k.scale1p, k.shift1, self.eps)
            return self.sa(h, cos, sin, step.mask, cache, k.sa).mul_(k.gamma1)

        def cross(t: Tensor, idx: Tensor | None) -> Tensor:
            y = self.ca(self.ca_norm(t), text, k.ca_kv)
            return y if self.ca_gamma is None else y.mul_(self.ca_gamma)

        def ffn(t: Tensor, idx: Tensor | None) -> Tensor:
            return self.ffn(ada_layer_norm_p1(t, k.scale2p, k.shift2, self.eps)).mul(k.gamma2)

        x = x + hooks.branch(self.layer_idx, "attn", x, attn)
        x = x + hooks.branch(self.layer_idx, "cross", x, cross)
        x = x + hooks.branch(self.layer_idx, "ffn", x, ffn)
        return x


class BlockChunk(nn.Module):
    """Only here so that block keys read ``block_chunks.<c>.module.<j>.`` like the official checkpoints."""

    def __init__(self, blocks: Sequence[InfinityBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class TextAttentivePool(nn.Module):
    """Caption -> one vector: a learned query per head attends over the caption's tokens."""

    def __init__(self, text_channels: int, dim: int, emulate_bf16: bool) -> None:
        super().__init__()
        head_dim = 64 if dim > 4096 else 128
        self.ca = CrossAttention(dim, text_channels, max(1, text_channels // head_dim), pool=True, emulate_bf16=emulate_bf16)

    def forward(self, text: TextKV) -> Tensor:
        return self.ca(None, text).squeeze(1)


class SharedAdaLin(nn.Linear):
    def forward(self, cond: Tensor) -> Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond).reshape(-1, 1, 6, C)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return ada_layer_norm(x, scale, shift, self.eps)

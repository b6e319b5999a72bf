"""A pure-torch T5 encoder whose state dict uses Hugging Face ``T5EncoderModel``'s key names.

Why a second T5: the embedded text-to-image model must run from the base install (no ``transformers``),
and official Flan-T5 checkpoints should still load into the same module, so the keys follow the public
layout (``shared.weight``, ``encoder.block.{i}.layer.0.SelfAttention.q.weight``, ...,
``encoder.final_layer_norm.weight``).

The architecture, as published for T5 / T5 v1.1:

* token embedding, no absolute positions; a learned relative-position bias (log-spaced buckets,
  bidirectional) lives in the first block and is shared by every layer;
* pre-norm residual blocks (self-attention, then feed-forward) with an RMS norm that does not subtract
  the mean, computed in float32;
* attention without the 1/sqrt(d) factor (T5 folds it into the initialisation), no biases anywhere;
* feed-forward ``relu`` (T5) or gated (``gated-gelu``: T5 v1.1 / Flan-T5, with the tanh GELU);
* a final RMS norm.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["T5Encoder", "T5EncoderConfig", "load_t5_folder", "load_t5_state", "relative_position_buckets"]


@dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a T5 ``config.json`` that the encoder needs (names as in that file)."""

    vocab_size: int
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated") or act[-1] not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use relu, gelu, silu "
                             "or their gated- forms (Flan-T5: gated-gelu)")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"T5 config {name}={getattr(self, name)!r} must be >= 1")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # Hugging Face maps "gated-gelu" to the tanh approximation ("gelu_new"), which T5 v1.1 was trained with
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_tanh" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T5EncoderConfig:
        """From a ``config.json`` dict (unknown keys such as the decoder's are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                              device: torch.device | None = None) -> Tensor:
    """(q_len, k_len) bucket index of every (query, key) offset, bidirectional as in the T5 encoder.

    Half the buckets are for keys after the query, half for keys before; within a half, offsets below
    ``num_buckets / 4`` get their own bucket and larger ones share log-spaced buckets up to ``max_distance``.
    """
    ctx = torch.arange(q_len, dtype=torch.long, device=device)[:, None]
    mem = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
    rel = mem - ctx
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    small = rel < exact
    large = exact + (
        torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return buckets + torch.where(small, rel, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; the statistic in float32, the result in the weight dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, has_relative_bias: bool) -> None:
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.dropout = cfg.dropout_rate

    def position_bias(self, q_len: int, k_len: int) -> Tensor:
        """(1, heads, q_len, k_len) learned bias of every offset (only the first block owns the table)."""
        w = self.relative_attention_bias.weight
        b = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_distance, w.device)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # no 1/sqrt(d_kv): folded into T5's init
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        attn = F.dropout(attn, self.dropout, self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, -1)
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, has_relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias))


class T5DenseFF(nn.Module):
    """``wi`` (plain) or ``wi_0``/``wi_1`` (gated: act(wi_0 x) * wi_1 x), then ``wo``; no biases."""

    def __init__(self, cfg: T5EncoderConfig) -> None:
        super().__init__()
        self.gated = cfg.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        h = self.dropout(h)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5EncoderConfig) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseFF(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


def _clamp_fp16(x: Tensor) -> Tensor:
    """fp16 T5 activations can overflow; clamp just below the fp16 range (as the reference implementation)."""
    if x.dtype == torch.float16 and not torch.isfinite(x).all():
        m = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-m, m)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, has_relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.dropout(self.embed_tokens(input_ids))
        T = input_ids.shape[1]
        bias = self.block[0].layer[0].SelfAttention.position_bias(T, T).to(x.dtype)
        if attention_mask is not None:
            # padded keys get the most negative finite value: exactly zero weight after the softmax
            keep = attention_mask.to(torch.bool)[:, None, None, :]
            bias = bias + torch.where(keep, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        for blk in self.block:
            x = blk(x, bias)
        return self.dropout(self.final_layer_norm(x))


class T5Encoder(nn.Module):
    """``T5Encoder(cfg)(input_ids, attention_mask)`` -> (B, T, d_model) last hidden state.

    ``shared`` and ``encoder.embed_tokens`` are one module (tied), so the state dict lists the table
    under both names like Hugging Face's; :func:`load_t5_state` accepts checkpoints that store only one.
    """

    def __init__(self, cfg: T5EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.encoder(input_ids, attention_mask)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random init with T5's published scales (the attention factor folded into q), seeded on the CPU."""
        cfg = self.config
        g = torch.Generator().manual_seed(seed)

        def fill(t: Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=g) * std)

        fill(self.shared.weight, 1.0)
        for blk in self.encoder.block:
            att = blk.layer[0].SelfAttention
            fill(att.q.weight, (cfg.d_model * cfg.d_kv) ** -0.5)
            fill(att.k.weight, cfg.d_model**-0.5)
            fill(att.v.weight, cfg.d_model**-0.5)
            fill(att.o.weight, (cfg.num_heads * cfg.d_kv) ** -0.5)
            if hasattr(att, "relative_attention_bias"):
                fill(att.relative_attention_bias.weight, cfg.d_model**-0.5)
            ff = blk.layer[1].DenseReluDense
            for name in ("wi_0", "wi_1", "wi"):
                if hasattr(ff, name):
                    fill(getattr(ff, name).weight, cfg.d_model**-0.5)
            fill(ff.wo.weight, cfg.d_ff**-0.5)
        for m in self.modules():
            if isinstance(m, T5LayerNorm):
                m.weight.fill_(1.0)


def load_t5_folder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> T5Encoder:
    """A :class:`T5Encoder` from a Hugging Face model folder (``config.json`` + ``*.safetensors``/``*.bin``,
    sharded or not), e.g. a local clone of ``google/flan-t5-xl``; decoder weights are skipped."""
    from ..checkpoints import read_state_dict

    d = Path(folder).expanduser()
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d}: no config.json; pass the folder of a T5 checkpoint (e.g. a clone of google/flan-t5-xl)")
    cfg = T5EncoderConfig.from_dict(json.loads(cfg_file.read_text(encoding="utf-8")))
    index = sorted(d.glob("*.index.json"))
    if index:
        files = sorted({d / f for f in json.loads(index[0].read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors or pytorch_model*.bin weights next to config.json")
    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f, flag="T5 folder"))
    model = T5Encoder(cfg)
    load_t5_state(model, sd)
    return model.to(dtype).eval()


def load_t5_state(model: T5Encoder, state_dict: Mapping[str, Tensor]) -> None:
    """Load a T5 state dict (encoder-only, or a full encoder-decoder checkpoint such as Flan-T5's).

    Decoder and LM-head tensors are dropped; a checkpoint that stores the tied embedding only once
    (``shared.weight`` or ``encoder.embed_tokens.weight``) fills the other name. Anything else missing,
    unexpected or mis-shaped raises a ValueError naming the keys.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(("decoder.", "lm_head."))}
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a in sd and b not in sd:
            sd[b] = sd[a]
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"T5 weights do not fit this encoder ({model.config.num_layers} layers, d_model "
                         f"{model.config.d_model}): missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
